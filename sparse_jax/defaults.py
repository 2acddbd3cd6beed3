"""Where the embedded default model lives (package data: sparse_jax/assets/default_model/)."""
from __future__ import annotations

import os

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")
_REQUIRED = ("config.json", "tokenizer.json")


def default_model_path() -> str:
  """The default model's checkpoint directory; raises FileNotFoundError saying what is missing
  (and how to produce it) when the trained model has not been installed there yet."""
  missing = [f for f in _REQUIRED if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, f))]
  has_weights = any(os.path.exists(os.path.join(DEFAULT_MODEL_DIR, f))
                    for f in ("model.safetensors", "model.safetensors.index.json"))
  if missing or not has_weights:
    what = missing + ([] if has_weights else ["model.safetensors (or model.safetensors.index.json + shards)"])
    raise FileNotFoundError(
        f"the default model is not installed: {DEFAULT_MODEL_DIR} lacks {', '.join(what)}. Train it with "
        f"`python -m sparse_jax.train --output_dir=DIR` (see bench/run_train_gpu.sh) and copy DIR/* there, "
        f"or pass model=<checkpoint directory>.")
  return DEFAULT_MODEL_DIR
