"""GPU benchmarks (results in BENCHMARKS.md)."""
import json
import os

MODEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def model_config(name: str) -> dict:
  """A config.json dict: a name in bench/model_configs (e.g. "llama-3.1-8b") or a path."""
  here = os.path.join(MODEL_CONFIGS, name + ".json")
  path = here if os.path.exists(here) else name
  if not os.path.exists(path):
    shipped = sorted(f[:-5] for f in os.listdir(MODEL_CONFIGS) if f.endswith(".json"))
    raise FileNotFoundError(f"no model config {name!r}: not a file and not one of {shipped}")
  with open(path) as f:
    return json.load(f)
