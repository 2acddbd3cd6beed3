"""Model architectures (Flax NNX) and Hugging Face checkpoint loading."""
from models.loading import CheckpointError, build_model, from_pretrained, read_config, register_model_type
from models.tokenizer import (ChatTemplateError, GenerationConfig, Tokenizer, load_generation_config,
                              load_tokenizer)

__all__ = ["CheckpointError", "ChatTemplateError", "GenerationConfig", "Tokenizer", "build_model", "from_pretrained",
           "load_generation_config", "load_tokenizer", "read_config", "register_model_type"]
