"""YAML option files shipped with sparse_jax (TensorRT-LLM `--extra_llm_api_options` layout)."""
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """Path of a shipped config, e.g. path("rocket") or path("rocket.yaml")."""
  file = name if name.endswith(".yaml") else name + ".yaml"
  full = os.path.join(CONFIG_DIR, file)
  if not os.path.exists(full):
    shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise FileNotFoundError(f"no shipped config {name!r}; shipped: {shipped}")
  return full
