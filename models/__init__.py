"""Model architectures (Flax NNX) and Hugging Face checkpoint loading."""
from models.loading import (CheckpointError, Tokenizer, build_model, from_pretrained, load_tokenizer,
                            read_config, register_model_type)

__all__ = ["CheckpointError", "Tokenizer", "build_model", "from_pretrained", "load_tokenizer", "read_config",
           "register_model_type"]
