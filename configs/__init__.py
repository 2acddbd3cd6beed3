"""Files shipped with sparse_jax: YAML option files (TensorRT-LLM `--extra_llm_api_options`
layout) and, in models/, config.json shapes of common models for benchmarks with random weights."""
import json
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
MODEL_CONFIGS = os.path.join(CONFIG_DIR, "models")


def path(name: str) -> str:
  """Path of a shipped config, e.g. path("rocket") or path("rocket.yaml")."""
  file = name if name.endswith(".yaml") else name + ".yaml"
  full = os.path.join(CONFIG_DIR, file)
  if not os.path.exists(full):
    shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise FileNotFoundError(f"no shipped config {name!r}; shipped: {shipped}")
  return full


def model_config(name: str) -> dict:
  """A config.json dict: a shipped model shape (e.g. "llama-3.1-8b", see configs/models) or a path."""
  shipped = os.path.join(MODEL_CONFIGS, name + ".json")
  file = shipped if os.path.exists(shipped) else name
  if not os.path.isfile(file):
    names = sorted(f[:-5] for f in os.listdir(MODEL_CONFIGS) if f.endswith(".json"))
    raise FileNotFoundError(f"no model config {name!r}: not a file and not one of {names}")
  with open(file) as f:
    return json.load(f)
