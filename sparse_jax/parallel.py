"""Tensor parallelism with jax.sharding: one mesh axis ("tp") over the local GPUs.

What is split (Megatron-style, so each transformer block needs one all-reduce after attention
and one after the MLP, both inserted by XLA from the shardings):
  * q/k/v projections by output columns (whole heads), o_proj by input rows;
  * MLP gate/up by columns, down by rows;
  * the paged KV cache and every aux pool by KV head (axis 0 of each pool), so each device
    holds, predicts over and attends to its own KV heads: `Runtime.per_kv_shard` runs the
    whole per-KV-head attention (cache writes, predict_kv, compaction, aux updates,
    predict_attn, the Pallas decode kernel) under `shard_map`, with no communication;
  * embeddings, norms, lm_head and the page table are replicated.
Models with a single KV head (MQA, and MLA whose cache holds one latent shared by every head)
cannot be split by head: their attention (and cache, and DSA's indexer) is replicated on every
device and only the MLP / MoE experts are split; splitting query heads alone would need
the group's prediction scores all-reduced every step, and splitting head_dim would break the
per-head softmax. Models with several KV heads need num_key_value_heads divisible by the size.

Multi-host is out of scope for the engine's host-side feeding (one process drives all local
devices); nothing here assumes device 0 is the only one.
"""
from __future__ import annotations


import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_jax.attention import TP_AXIS
from sparse_jax.config import ConfigError


def make_mesh(size: int) -> Mesh:
  devices = jax.devices()
  if size > len(devices):
    raise ConfigError(f"tensor_parallel_size={size} but only {len(devices)} device(s) are visible "
                      f"({jax.default_backend()})")
  return Mesh(np.array(devices[:size]), (TP_AXIS,))


def check_divisible(model, size: int) -> bool:
  """Validates the model against the parallel size; returns whether KV heads are split
  (models whose cache has one KV head, MQA and MLA's shared latent, replicate it)."""
  config = model.config
  heads = config.num_attention_heads
  kv_heads = model.kv_heads
  if heads % size:
    raise ConfigError(f"tensor_parallel_size={size} does not divide num_attention_heads={heads}")
  for field in ("intermediate_size", "moe_intermediate_size"):
    inner = getattr(config, field, None)
    if inner is not None and inner % size:
      raise ConfigError(f"tensor_parallel_size={size} does not divide {field}={inner}")
  if kv_heads == 1:
    return False
  if kv_heads % size:
    raise ConfigError(f"tensor_parallel_size={size} does not divide num_key_value_heads={kv_heads}")
  return True


def shard_model(model: nnx.Module, mesh: Mesh, shard_kv: bool) -> None:
  """Places every parameter of `model` on the mesh by `model.tensor_parallel_spec` (in place)."""
  if not hasattr(model, "tensor_parallel_spec"):
    raise ConfigError(f"{type(model).__name__} does not support tensor parallelism")
  state = nnx.state(model)

  def place(path, x):
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    names = names[:-1] if names[-1] == "value" else names
    return jax.device_put(x, NamedSharding(mesh, model.tensor_parallel_spec(names, shard_kv)))

  nnx.update(model, jax.tree_util.tree_map_with_path(place, state))


def cache_shardings(cache, mesh: Mesh, shard_kv: bool):
  """NamedShardings for a PagedKVCache: pools split by KV head, the rest replicated."""
  kv_heads = cache.k[0].shape[0]

  def pool(x):
    return NamedSharding(mesh, P(TP_AXIS) if shard_kv and x.shape[0] == kv_heads else P())

  rep = NamedSharding(mesh, P())
  return cache.replace(k=tuple(pool(x) for x in cache.k), v=tuple(pool(x) for x in cache.v),
                       aux={n: tuple(pool(x) for x in pools) for n, pools in cache.aux.items()},
                       page_table=rep, lengths=rep, positions=rep)
