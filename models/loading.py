"""Hugging Face checkpoint loading: config.json and safetensors (single or sharded); the tokenizer,
chat template and generation_config.json are read by models/tokenizer.py.

`from_pretrained(path, dtype)` builds the module for the checkpoint's `model_type` (looked
up in `MODEL_TYPES`, where each architecture registers itself) without random init, then
maps every parameter from its HF tensor. A missing, unexpected or mis-shaped tensor, an
unreadable file or an unsupported model_type raises `CheckpointError` naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
  """A checkpoint cannot be loaded; the message names the file, tensor or field."""


@dataclasses.dataclass(frozen=True)
class ModelType:
  """How one architecture is built and named in HF checkpoints.

  config_from_hf: config.json dict -> our frozen config.
  build: (config, dtype, param_dtype, rngs) -> nnx.Module.
  hf_name: our parameter path (tuple of str/int) -> (HF tensor name, transpose?) ; None = not in checkpoints.
  optional: HF tensor names that may be absent or unused (e.g. a tied lm_head).
  prepare_tensor: optional hook (hf_name, array, tensors) -> array, e.g. dequantize FP8 weights.
  """
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  build: Callable[..., nnx.Module]
  hf_name: Callable[[tuple], tuple[str, bool] | None]
  ignored: Callable[[str], bool] = lambda name: False
  prepare_tensor: Callable[..., np.ndarray] | None = None


MODEL_TYPES: dict[str, ModelType] = {}


def register_model_type(name: str, model_type: ModelType) -> None:
  MODEL_TYPES[name] = model_type


def resolve_dtype(dtype: Any) -> Any:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None
  if dt not in [jnp.dtype(d) for d in DTYPES.values()]:
    raise ValueError(f"unsupported dtype {dt}; expected one of {sorted(DTYPES)}")
  return dt.type


def read_json(path: str) -> Any:
  """A checkpoint's JSON file; a corrupt or unreadable one raises CheckpointError naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON: {e}") from None
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read it: {e}") from None


#: config.json fields that are counts when present and not null: name -> smallest valid value.
_CONFIG_COUNTS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "max_position_embeddings": 1, "sliding_window": 1,
    "moe_intermediate_size": 1, "q_lora_rank": 1, "kv_lora_rank": 1, "qk_nope_head_dim": 1, "qk_rope_head_dim": 1,
    "v_head_dim": 1, "n_routed_experts": 0, "n_shared_experts": 0, "num_experts_per_tok": 0, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_freq": 1, "index_topk": 1, "index_n_heads": 1,
    "index_head_dim": 1}
#: config.json fields that are positive real numbers when present and not null.
_CONFIG_POSITIVE = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")


def check_config_values(cfg: Mapping[str, Any], where: str) -> None:
  """Raises CheckpointError naming the first config.json field whose value has the wrong type."""
  from sparse_jax.config import is_int, is_real
  for name, minimum in _CONFIG_COUNTS.items():
    value = cfg.get(name)
    if value is not None and (not is_int(value) or value < minimum):
      raise CheckpointError(f"{where}: {name}={value!r} must be an integer >= {minimum}")
  for name in _CONFIG_POSITIVE:
    value = cfg.get(name)
    if value is not None and (not is_real(value) or value <= 0):
      raise CheckpointError(f"{where}: {name}={value!r} must be a positive number")
  for name in ("eos_token_id", "bos_token_id"):
    value = cfg.get(name)
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(is_int(i) and i >= 0 for i in ids):
      raise CheckpointError(f"{where}: {name}={value!r} must be a token id or a list of token ids")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory not found: {path}")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{path}: no config.json")
  cfg = read_json(cfg_path)
  if not isinstance(cfg, dict) or "model_type" not in cfg:
    raise CheckpointError(f"{cfg_path}: no model_type field")
  check_config_values(cfg, cfg_path)
  return cfg


def model_type_of(cfg: Mapping[str, Any]) -> ModelType:
  _register_builtin()
  name = cfg.get("model_type")
  if name not in MODEL_TYPES:
    raise CheckpointError(f"unsupported model_type {name!r}; supported: {sorted(MODEL_TYPES)}")
  return MODEL_TYPES[name]


def build_model(cfg: Mapping[str, Any], dtype=jnp.float32, param_dtype=None, *, abstract: bool = False,
                rngs: nnx.Rngs | None = None) -> nnx.Module:
  """The module for a config.json dict; `abstract` skips allocating parameters (for loading)."""
  mt = model_type_of(cfg)
  try:
    config = mt.config_from_hf(cfg)
  except KeyError as e:
    raise CheckpointError(f"config.json lacks required field {e.args[0]!r}") from None
  except CheckpointError:
    raise
  except (TypeError, ValueError) as e:  # a value of a type or range the architecture cannot use
    raise CheckpointError(f"config.json: {type(e).__name__}: {e}") from None
  make = lambda: mt.build(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=rngs or nnx.Rngs(0))
  return nnx.eval_shape(make) if abstract else make()


def _weight_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
      raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map of tensor name -> file name)")
    files = sorted(set(weight_map.values()))
    root = os.path.realpath(path)
    outside = [f for f in files if os.path.isabs(f) or
               os.path.commonpath([root, os.path.realpath(os.path.join(path, f))]) != root]
    if outside:  # a shard name must not make the loader open files elsewhere on the machine
      raise CheckpointError(f"{index} names shard(s) outside the checkpoint directory: {outside}")
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
      raise CheckpointError(f"{index} names shard(s) that do not exist: {missing}")
    return [os.path.join(path, f) for f in files]
  if os.path.exists(single):
    return [single]
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


class TensorStore:
  """Lazy access to the tensors of one checkpoint (any number of shards)."""

  def __init__(self, path: str):
    from safetensors import safe_open
    self._handles = {}
    self._where: dict[str, str] = {}
    for file in _weight_files(path):
      try:
        handle = safe_open(file, framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
      self._handles[file] = handle
      for name in handle.keys():
        self._where[name] = file

  def names(self) -> Iterable[str]:
    return self._where.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    try:
      return self._handles[self._where[name]].get_tensor(name)
    except Exception as e:
      raise CheckpointError(f"{self._where[name]}: cannot read tensor {name!r} ({e})") from None


def load_weights(model: nnx.Module, mt: ModelType, store: TensorStore, dtype, param_dtype) -> nnx.Module:
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  used: set[str] = set()
  new_values = {}
  for path, var in flat.items():
    mapped = mt.hf_name(tuple(path))
    if mapped is None:
      raise CheckpointError(f"no checkpoint name for parameter {'.'.join(map(str, path))}")
    name, transpose = mapped
    if name not in store:
      raise CheckpointError(f"checkpoint is missing tensor {name!r} (for parameter {'.'.join(map(str, path))})")
    array = store.get(name)
    if mt.prepare_tensor is not None:
      array = mt.prepare_tensor(name, array, store)
    if transpose:
      array = array.T
    expected = tuple(var.shape) if hasattr(var, "shape") else tuple(var.value.shape)
    if tuple(array.shape) != expected:
      raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {expected} "
                            f"(for parameter {'.'.join(map(str, path))})")
    used.add(name)
    target = param_dtype or dtype
    new_values[path] = jnp.asarray(np.asarray(array, dtype=np.float32) if array.dtype.kind == "f" and
                                   array.dtype != np.float32 and target == jnp.float32 else array, dtype=target)
  unexpected = sorted(n for n in store.names() if n not in used and not mt.ignored(n))
  if unexpected:
    raise CheckpointError(f"checkpoint has unexpected tensor(s) {unexpected[:8]}"
                          f"{' ...' if len(unexpected) > 8 else ''}")
  for path, value in new_values.items():
    flat[path] = flat[path].replace(value) if hasattr(flat[path], "replace") else value
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None) -> nnx.Module:
  """Loads an HF checkpoint directory into our module (float32 unless `dtype` says otherwise)."""
  path = os.fspath(path)
  dtype = resolve_dtype(dtype)
  param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else dtype
  cfg = read_config(path)
  mt = model_type_of(cfg)
  model = build_model(cfg, dtype, param_dtype, abstract=True)
  return load_weights(model, mt, TensorStore(path), dtype, param_dtype)


# -- built-in architectures --------------------------------------------------------------

def llama_hf_name(path: tuple) -> tuple[str, bool] | None:
  """Our parameter path -> (Hugging Face tensor name, transpose?) in the Llama layout
  (`model.` + the path; Linear kernels transposed to [out, in]); None for no tensor."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  if parts[0] == "lm_head":
    return "lm_head.weight", True
  if leaf == "embedding":
    return "model." + ".".join(parts[:-1]) + ".weight", False
  if leaf == "kernel":
    return "model." + ".".join(parts[:-1]) + ".weight", True
  if leaf in ("bias", "weight"):
    return "model." + ".".join(parts), False
  return None


_registered = False


def _register_builtin() -> None:
  global _registered
  if _registered:
    return
  _registered = True
  from models import llama
  for name in llama.LLAMA_FAMILY:
    register_model_type(name, ModelType(
        config_from_hf=llama.LlamaConfig.from_hf,
        build=lambda config, dtype, param_dtype, rngs: llama.LlamaForCausalLM(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        hf_name=llama_hf_name,
        # A tied checkpoint may still carry lm_head.weight; rotary caches are not parameters.
        ignored=lambda n: n == "lm_head.weight" or n.endswith("rotary_emb.inv_freq")))
  import importlib.util
  if importlib.util.find_spec("models.deepseek") is not None:
    import models.deepseek  # noqa: F401  (registers deepseek_v32)
