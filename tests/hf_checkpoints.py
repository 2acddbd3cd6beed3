"""Small random-init `transformers` checkpoints the tests write themselves (torch is a test-only peer)."""
from __future__ import annotations

import os

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

# name -> (transformers class name, config class name, extra config)
LLAMA_FAMILY_CASES = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0, attention_bias=False)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32, num_key_value_heads=1)),
}


def write_checkpoint(directory: str, case: str, seed: int = 0, **overrides) -> tuple[str, "object"]:
  """Writes `case` with save_pretrained; returns (path, the torch model in eval mode, float32)."""
  import torch
  import transformers
  cls_name, cfg_name, extra = LLAMA_FAMILY_CASES[case]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cfg_name)(**{**SMALL, **extra, **overrides})
  model = getattr(transformers, cls_name)(cfg).eval().to(torch.float32)
  path = os.path.join(directory, case)
  model.save_pretrained(path)
  return path, model
