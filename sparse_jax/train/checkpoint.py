"""Hugging Face checkpoints of the trained model: config, tokenizer, bf16 safetensors (sharded
above a size), and the training log; every file is written under a temporary name and renamed,
so a reader never sees a half-written one."""
from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import tasks
from sparse_jax.train.config import BOS_ID, EOS_ID, PAD_ID, ModelShape

TRAINING_LOG = "training_log.json"


def tokenizer_config() -> dict[str, Any]:
  return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tasks.BOS_TOKEN, "eos_token": tasks.EOS_TOKEN,
          "pad_token": tasks.PAD_TOKEN, "add_bos_token": True, "add_eos_token": False,
          "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def jsonable(obj):
  """`obj` with numpy scalars as Python numbers, tuples as lists and non-finite floats as None."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_static_files(output_dir: str, shape: ModelShape, tokenizer) -> None:
  """config.json, generation_config.json, tokenizer.json, tokenizer_config.json."""
  os.makedirs(output_dir, exist_ok=True)
  write_json(os.path.join(output_dir, "config.json"), shape.hf_config())
  write_json(os.path.join(output_dir, "generation_config.json"),
             {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False})
  write_json(os.path.join(output_dir, "tokenizer_config.json"), tokenizer_config())
  tmp = os.path.join(output_dir, "tokenizer.json.tmp")
  tokenizer.save(tmp)
  os.replace(tmp, os.path.join(output_dir, "tokenizer.json"))


def hf_tensors(params) -> dict[str, np.ndarray]:
  """Our parameters (nnx.State, host or device) -> {HF name: bf16 array}, kernels transposed to [out, in]."""
  from models.loading import model_type_of
  mt = model_type_of({"model_type": "llama"})
  out = {}
  for path, var in nnx.to_flat_state(params):
    name, transpose = mt.hf_name(tuple(path))
    arr = np.asarray(var.get_value(), dtype=np.float32)
    out[name] = np.ascontiguousarray(arr.T if transpose else arr).astype(jnp.bfloat16)
  return out


def _hf_order(name: str) -> tuple:
  parts = name.split(".")
  layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else (-1 if "embed" in name else 1 << 30)
  return layer, name


def _save_safetensors(output_dir: str, fname: str, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  path = os.path.join(output_dir, fname)
  save_file(tensors, path + ".tmp", metadata={"format": "pt"})
  os.chmod(path + ".tmp", 0o644)
  os.replace(path + ".tmp", path)


def _shards(tensors: dict[str, np.ndarray], names: list[str], max_shard_bytes: int) -> list[list[str]]:
  shards, cur, size = [], [], 0
  for n in names:
    nbytes = tensors[n].nbytes
    if nbytes > max_shard_bytes:
      raise ValueError(f"tensor {n} ({nbytes} bytes) exceeds max_shard_bytes={max_shard_bytes}")
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(n)
    size += nbytes
  shards.append(cur)
  return shards


def write_weights(output_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when
  larger than max_shard_bytes (every shard stays under it); weight files of an earlier save
  that this one does not write are removed. Returns the files written."""
  names = sorted(tensors, key=_hf_order)
  total = sum(tensors[n].nbytes for n in names)
  stale = [f for f in os.listdir(output_dir) if f.startswith("model") and f.endswith((".safetensors", ".json"))]
  if total <= max_shard_bytes:
    _save_safetensors(output_dir, "model.safetensors", {n: tensors[n] for n in names})
    written = ["model.safetensors"]
  else:
    shards = _shards(tensors, names, max_shard_bytes)
    weight_map, written = {}, []
    for i, shard in enumerate(shards, 1):
      fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
      _save_safetensors(output_dir, fname, {n: tensors[n] for n in shard})
      weight_map.update({n: fname for n in shard})
      written.append(fname)
    write_json(os.path.join(output_dir, "model.safetensors.index.json"),
               {"metadata": {"total_size": int(total)}, "weight_map": weight_map})
    written.append("model.safetensors.index.json")
  for f in stale:
    if f not in written:
      os.remove(os.path.join(output_dir, f))
  return written


class Saver:
  """Writes the weights and the training log: periodic saves in a background thread (one at a
  time), the final one inline. An error of a background save is raised by the next save."""

  def __init__(self, output_dir: str, max_shard_bytes: int, log: Callable[[str], None]):
    self.output_dir, self.max_shard_bytes, self.log = output_dir, max_shard_bytes, log
    self.thread: threading.Thread | None = None
    self.error: BaseException | None = None

  def join(self) -> None:
    if self.thread is not None:
      self.thread.join()
      self.thread = None
    if self.error is not None:
      error, self.error = self.error, None
      raise error

  def write_log(self, record: dict[str, Any]) -> None:
    write_json(os.path.join(self.output_dir, TRAINING_LOG), jsonable(record))

  def save(self, params_host, record: dict[str, Any], background: bool) -> None:
    self.join()
    payload = jsonable(record)
    tensors = hf_tensors(params_host)

    def work():
      t = time.monotonic()
      files = write_weights(self.output_dir, tensors, self.max_shard_bytes)
      write_json(os.path.join(self.output_dir, TRAINING_LOG), payload)
      self.log(f"saved {files} ({time.monotonic() - t:.1f}s)")

    if not background:
      work()
      return

    def guarded():
      try:
        work()
      except BaseException as e:  # handed to the training thread by the next join()
        self.error = e

    self.thread = threading.Thread(target=guarded)
    self.thread.start()
