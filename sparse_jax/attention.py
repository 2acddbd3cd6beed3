"""Attention: dense causal attention, and `SparseAttention`, the NNX attention layer.

`SparseAttention` is the attention layer of our own GQA models and a drop-in for any Flax NNX
decoder: it projects, applies RoPE, writes the paged cache, runs the configured algorithm's
predictors, and attends (dense or sparse by config). Algorithms are looked up in the registry
(`sparse_jax.config.get_algorithm`), never chosen by name here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import rope as rope_lib
from sparse_jax.cache import (AuxPoolSpec, CacheLayout, LayerCache, PagedKVCache, gather_tokens, token_slots,
                              write_tokens)
from sparse_jax.config import BaseSparseAttentionConfig, get_algorithm
from pallas_kernels import _compat
from pallas_kernels._compat import shard_map
from pallas_kernels.common import MASK_VALUE, check_backend, on_gpu
from sparse_jax.selection import dense_units, pool_as_units, to_units, topk_selection, unit_size_for

TP_AXIS = "tp"
IMPORTANCE = "page_importance"  # aux pool [1, num_pages, 1] float32: summed page scores


# -- eviction importance: the algorithm's page_scores summed per page over layers and steps --

def with_importance_pool(layout: CacheLayout) -> CacheLayout:
  """`layout` plus the eviction-importance aux pool (one float32 per page)."""
  return dataclasses.replace(layout, aux_specs={
      **layout.aux_specs, IMPORTANCE: AuxPoolSpec(heads=1, entry_shape=(1,), dtype=jnp.float32)})


def clear_importance(cache: PagedKVCache, page_ids: jax.Array) -> PagedKVCache:
  """Zeroes the importance of pages page_ids int32[N] (out of range = ignored) in every layer."""
  pools = tuple(p.at[0, page_ids, 0].set(0.0, mode="drop") for p in cache.aux[IMPORTANCE])
  return cache.replace(aux={**cache.aux, IMPORTANCE: pools})


def sequence_importance(cache: PagedKVCache) -> jax.Array:
  """float32[batch_slots, max_pages]: each logical page's importance summed over layers (+inf
  where the page table holds no page, so such entries are never chosen for eviction)."""
  rows = cache.page_table
  importance = sum(p[0, jnp.clip(rows, 0), 0] for p in cache.aux[IMPORTANCE])
  return jnp.where(rows >= 0, importance, jnp.inf)


@dataclasses.dataclass(frozen=True)
class Runtime:
  """Static choices of one compiled step (hashable; part of the jit cache key).

  backend: "reference" (pure jnp everywhere) or "pallas" (Pallas kernels for decode,
    compaction and scoring; cuDNN for dense prefill on GPUs).
  sparse: the sparse-attention config, or None for dense attention.
  interpret: run Pallas kernels in interpret mode (CPU tests); None = only off-GPU.
  """
  backend: str = "reference"
  sparse: BaseSparseAttentionConfig | None = None
  interpret: bool | None = None
  mesh: Any = None          # jax.sharding.Mesh with axis TP_AXIS, or None
  shard_kv: bool = False    # KV heads split over the mesh (else attention runs replicated)
  evict: bool = False       # accumulate page importance for eviction (aux pool IMPORTANCE)
  predict: bool = True      # False: keep aux pools current but attend densely (short sequences, dense layers)
  sparse_prefill: bool = True  # a prompt chunk attends to the algorithm's selection of earlier chunks (else all)

  def __post_init__(self):
    check_backend(self.backend)

  def per_kv_shard(self, fn, in_kinds, out_kinds):
    """Runs `fn` on each tensor-parallel shard's KV heads (shard_map), or as is without a mesh.

    kinds: True = heads on axis -2, split; "layer" = a LayerCache whose pools split on axis 0;
    False = replicated. Everything `fn` does is per KV head, so no communication is needed.
    """
    if self.mesh is None or not self.shard_kv:
      return fn
    from jax.sharding import PartitionSpec as P

    def spec(kind, x):
      if kind is True:
        return P(*([None] * (x.ndim - 2)), TP_AXIS, None)
      if kind == "layer":
        split = lambda a: P(TP_AXIS) if a.shape[0] == x.k.shape[0] else P()
        return jax.tree_util.tree_map(split, x)
      return jax.tree_util.tree_map(lambda _: P(), x)

    def wrapped(*args):
      in_specs = tuple(spec(kind, a) for kind, a in zip(in_kinds, args))
      layer = next(a for kind, a in zip(in_kinds, args) if kind == "layer")
      out_specs = tuple(spec(kind, layer) if kind == "layer" else (P(None, TP_AXIS, None) if kind else P())
                        for kind in out_kinds)
      # The heads-split output keeps the input's rank: fix the spec from the first split input.
      first = next(a for kind, a in zip(in_kinds, args) if kind is True)
      out_specs = tuple(spec(True, first) if kind is True else o for kind, o in zip(out_kinds, out_specs))
      return shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)(*args)

    return wrapped

  def for_layer(self, layer_index: int) -> "Runtime":
    """The runtime of layer `layer_index`: without prediction where the sparse config keeps that
    layer dense (`dense_layers`)."""
    if self.sparse is None or not self.predict or layer_index >= self.sparse.dense_layers:
      return self
    return dataclasses.replace(self, predict=False)

  @property
  def algorithm(self):
    return None if self.sparse is None else get_algorithm(self.sparse)

  def kernel_kwargs(self) -> dict[str, Any]:
    return dict(backend=self.backend, interpret=self.interpret)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """What an algorithm needs to know about the layer it serves (static)."""
  q_heads: int
  kv_heads: int
  head_dim: int
  page_size: int
  scale: float
  runtime: Runtime = Runtime()

  @property
  def group_size(self) -> int:
    """Query heads per KV head."""
    return self.q_heads // self.kv_heads


# -- dense attention -------------------------------------------------------------

def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None, scale: float,
                     *, backend: str = "reference", query_chunk: int = 1024) -> jax.Array:
  """Causal GQA self-attention of a fresh prompt.

  q: [batch, T, q_heads, D]; k, v: [batch, T, kv_heads, D(v)]; lengths: int32[batch] valid
  tokens (right padding) or None. Returns [batch, T, q_heads, Dv] in q.dtype. Softmax in float32.
  """
  batch, t, q_heads, d = q.shape
  kv_heads = k.shape[2]
  if backend == "pallas" and on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) and d == v.shape[-1]:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                                        key_value_seq_lengths=lengths, query_seq_lengths=lengths)
  group = q_heads // kv_heads
  qg = q.reshape(batch, t, kv_heads, group, d)
  key_pos = jnp.arange(t)
  key_ok = key_pos[None, :] < (lengths[:, None] if lengths is not None else t)  # [B, T]

  def block(q_blk, q_pos):
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k, preferred_element_type=jnp.float32) * scale
    mask = (key_pos[None, :] <= q_pos[:, None])[None, None, None] & key_ok[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)

  if t <= query_chunk:
    out = block(qg, key_pos)
  else:
    n = -(-t // query_chunk)
    pad = n * query_chunk - t
    qp = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    qp = jnp.moveaxis(qp.reshape(batch, n, query_chunk, kv_heads, group, d), 1, 0)
    pos = jnp.arange(n * query_chunk).reshape(n, query_chunk)
    out = jax.lax.map(lambda args: block(*args), (qp, pos))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, n * query_chunk, kv_heads, group, -1)[:, :t]
  return out.reshape(batch, t, q_heads, -1).astype(q.dtype)


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk_lens: jax.Array, k_ctx: jax.Array,
                    v_ctx: jax.Array, ctx_lens: jax.Array, scale: float, *, query_chunk: int = 512) -> jax.Array:
  """A prompt chunk attending to earlier context (any subset, no mask among it) and causally to itself.

  q: [n, C, Hq, D]; k, v: [n, C, Hkv, D] the chunk's own keys; chunk_lens: int32[n];
  k_ctx, v_ctx: [n, Hkv, U, D] earlier-context tokens per KV head, valid below ctx_lens
  int32[n, Hkv]. Returns [n, C, Hq, D] in q.dtype; one softmax over both parts (float32).
  """
  n, c, q_heads, d = q.shape
  kv_heads = k.shape[2]
  group = q_heads // kv_heads
  qg = q.reshape(n, c, kv_heads, group, d)
  ctx_ok = jnp.arange(k_ctx.shape[2])[None, None, :] < ctx_lens[:, :, None]  # [n, H, U]
  own_pos = jnp.arange(c)
  own_ok = own_pos[None, :] < chunk_lens[:, None]  # [n, C]

  def block(q_blk, q_pos):
    l_ctx = jnp.einsum("bqhgd,bhud->bhgqu", q_blk, k_ctx, preferred_element_type=jnp.float32) * scale
    l_ctx = jnp.where(ctx_ok[:, :, None, None, :], l_ctx, MASK_VALUE)
    l_own = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k, preferred_element_type=jnp.float32) * scale
    own_mask = (own_pos[None, :] <= q_pos[:, None])[None, None, None] & own_ok[:, None, None, None, :]
    l_own = jnp.where(own_mask, l_own, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([l_ctx, l_own], axis=-1), axis=-1)
    u = k_ctx.shape[2]
    return (jnp.einsum("bhgqu,bhud->bqhgd", probs[..., :u].astype(v.dtype), v_ctx) +
            jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., u:].astype(v.dtype), v))

  if c <= query_chunk:
    out = block(qg, own_pos)
  else:
    nb = -(-c // query_chunk)
    qp = jnp.pad(qg, ((0, 0), (0, nb * query_chunk - c), (0, 0), (0, 0), (0, 0)))
    qp = jnp.moveaxis(qp.reshape(n, nb, query_chunk, kv_heads, group, d), 1, 0)
    out = jax.lax.map(lambda a: block(*a), (qp, jnp.arange(nb * query_chunk).reshape(nb, query_chunk)))
    out = jnp.moveaxis(out, 0, 1).reshape(n, nb * query_chunk, kv_heads, group, -1)[:, :c]
  return out.reshape(n, c, q_heads, -1).astype(q.dtype)


def chunk_attention_packed(q: jax.Array, k: jax.Array, v: jax.Array, chunk_lens: jax.Array, k_ctx: jax.Array,
                           v_ctx: jax.Array, ctx_lens: jax.Array, scale: float, *,
                           implementation: str | None = None) -> jax.Array:
  """`chunk_attention` as one square causal attention per (row, KV head), so that a fused
  flash kernel (cuDNN on GPUs) runs it without materialising scores.

  Each (row, head) gets a sequence of S = U + C keys: its L = ctx_lens valid context tokens,
  then the chunk's own C keys (at offset L, overwriting the context's padding). The chunk's
  queries sit at the same offset L, so top-left causal masking lets query i see all L context
  keys and own keys <= i; key/query lengths L + chunk_len mask the rest. Rows [0, L) hold zero
  queries whose outputs are dropped: the price is (U + C)^2 / 2 score pairs instead of
  U * C + C^2 / 2 (1.28x at U = C), paid at flash-kernel speed. Shapes as `chunk_attention`.
  """
  n, c, q_heads, d = q.shape
  kv_heads, u = k.shape[2], k_ctx.shape[2]
  group = q_heads // kv_heads
  chex.assert_shape(ctx_lens, (n, kv_heads))
  s = u + c
  qh = jnp.moveaxis(q.reshape(n, c, kv_heads, group, d), 1, 2)  # [n, H, C, G, D]
  kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [n, H, C, D]
  offset = jnp.clip(ctx_lens, 0, u).astype(jnp.int32)

  def pack(q1, k1, v1, kc, vc, off):
    keys = jax.lax.dynamic_update_slice(jnp.pad(kc, ((0, c), (0, 0))), k1, (off, 0))
    vals = jax.lax.dynamic_update_slice(jnp.pad(vc, ((0, c), (0, 0))), v1, (off, 0))
    qs = jax.lax.dynamic_update_slice(jnp.zeros((s, group, d), q1.dtype), q1, (off, 0, 0))
    return qs, keys, vals

  qs, keys, vals = jax.vmap(jax.vmap(pack))(qh, kh, vh, k_ctx, v_ctx, offset)
  valid = (offset + chunk_lens[:, None]).reshape(-1).astype(jnp.int32)
  out = jax.nn.dot_product_attention(
      qs.reshape(n * kv_heads, s, group, d), keys.reshape(n * kv_heads, s, 1, d),
      vals.reshape(n * kv_heads, s, 1, -1), scale=scale, is_causal=True, query_seq_lengths=valid,
      key_value_seq_lengths=valid, implementation=implementation)
  out = out.reshape(n, kv_heads, s, group, -1)
  out = jax.vmap(jax.vmap(lambda o, off: jax.lax.dynamic_slice_in_dim(o, off, c, axis=0)))(out, offset)
  return jnp.moveaxis(out, 2, 1).reshape(n, c, q_heads, -1).astype(q.dtype)


def merge_by_lse(parts) -> jax.Array:
  """Attention over disjoint key sets merged into attention over their union.

  parts: (out [..., D], lse float32[...]) pairs, one per key set. A part whose log-sum-exp
  is not a finite number above -1e30 saw no valid key (flash kernels report -inf there and
  leave NaN or garbage in `out`): it gets weight 0 and its output is never read, so a row
  with no valid key in any part is exactly 0 (a padding query row), never NaN.
  """
  seen = [lse > -1e30 for _, lse in parts]  # False for -inf and NaN too
  m = functools.reduce(jnp.maximum, [jnp.where(ok, lse, -jnp.inf) for ok, (_, lse) in zip(seen, parts)])
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  weights = [jnp.where(ok, jnp.exp(jnp.where(ok, lse, 0.0) - m), 0.0) for ok, (_, lse) in zip(seen, parts)]
  total = sum(weights)
  out = sum(w[..., None] * jnp.where(ok[..., None], o.astype(jnp.float32), 0.0)
            for w, ok, (o, _) in zip(weights, seen, parts))
  return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


def chunk_attention_split(q: jax.Array, k: jax.Array, v: jax.Array, chunk_lens: jax.Array, k_ctx: jax.Array,
                          v_ctx: jax.Array, ctx_lens: jax.Array, scale: float, *,
                          implementation: str | None = None) -> jax.Array:
  """`chunk_attention` as two flash-attention calls merged by their log-sum-exps: the chunk
  causally over itself, and the chunk over its context with the KV heads folded into the batch
  (each head has its own context). Exactly U * C + C^2 / 2 score pairs, against (U + C)^2 / 2 for
  `chunk_attention_packed`. Rows without a valid key (padding query rows, empty contexts) are
  told by the lengths, not by the kernels' statistics, which flash kernels leave unspecified there
  (cuDNN on an H100 reports finite values beside a NaN output): their log-sum-exps are set to
  -inf, so `merge_by_lse` gives them weight 0 and padding rows are exactly 0. Shapes as
  `chunk_attention`.
  """
  n, c, q_heads, d = q.shape
  kv_heads, u = k.shape[2], k_ctx.shape[2]
  group = q_heads // kv_heads
  chex.assert_shape(ctx_lens, (n, kv_heads))
  lens = chunk_lens.astype(jnp.int32)
  own = _compat.attention_with_lse(q, k, v, scale=scale, is_causal=True, q_lens=lens, kv_lens=lens,
                                   implementation=implementation)
  qh = jnp.moveaxis(q.reshape(n, c, kv_heads, group, d), 2, 1).reshape(n * kv_heads, c, group, d)
  out, lse = _compat.attention_with_lse(
      qh, k_ctx.reshape(n * kv_heads, u, 1, d), v_ctx.reshape(n * kv_heads, u, 1, -1), scale=scale,
      is_causal=False, q_lens=jnp.repeat(lens, kv_heads), kv_lens=ctx_lens.reshape(-1).astype(jnp.int32),
      implementation=implementation)
  unfold = lambda x: jnp.moveaxis(x.reshape(n, kv_heads, c, group, *x.shape[3:]), 1, 2).reshape(
      n, c, q_heads, *x.shape[3:])
  q_ok = (jnp.arange(c)[None, :] < lens[:, None])[:, :, None]                      # [n, C, 1]
  ctx_ok = q_ok & jnp.repeat(ctx_lens > 0, group, axis=1)[:, None, :]             # [n, C, q_heads]
  own = (own[0], jnp.where(q_ok, own[1], -jnp.inf))
  ctx_part = (unfold(out), jnp.where(ctx_ok, unfold(lse), -jnp.inf))
  return merge_by_lse([own, ctx_part]).astype(q.dtype)


def sparse_chunk_attention(q, k, v, chunk_lens, k_ctx, v_ctx, ctx_lens, scale: float, *,
                           backend: str = "reference") -> jax.Array:
  """A prompt chunk's attention to its selected context and itself: with the pallas backend two
  flash-attention calls merged by their log-sum-exps (`chunk_attention_split`; cuDNN on GPUs,
  XLA's fused attention elsewhere), else the jnp reference."""
  if backend == "pallas" and q.shape[-1] == v.shape[-1]:
    implementation = "cudnn" if on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    return chunk_attention_split(q, k, v, chunk_lens, k_ctx, v_ctx, ctx_lens, scale, implementation=implementation)
  return chunk_attention(q, k, v, chunk_lens, k_ctx, v_ctx, ctx_lens, scale)


def gather_units(pool: jax.Array, unit_ids: jax.Array, unit_size: int) -> jax.Array:
  """Per-KV-head gather: pool [H, num_pages, page_size, D], unit_ids int32[n, H, M] (-1 read as 0;
  mask them) -> [n, H, M * unit_size, D]."""
  units = pool_as_units(pool, unit_size)
  heads = units.shape[0]
  g = units[jnp.arange(heads)[None, :, None], jnp.clip(unit_ids, 0)]  # [n, H, M, u, D]
  return g.reshape(*unit_ids.shape[:2], -1, units.shape[-1])


def paged_decode(q: jax.Array, layer: LayerCache, unit_ids: jax.Array, kv_lens: jax.Array, unit_size: int,
                 scale: float, runtime: Runtime) -> jax.Array:
  """Decode attention over the listed gather units of one layer's pools (see pallas_kernels)."""
  from pallas_kernels.paged_decode import paged_decode_attention
  return paged_decode_attention(q, pool_as_units(layer.k, unit_size), pool_as_units(layer.v, unit_size),
                                unit_ids, kv_lens, scale=scale, **runtime.kernel_kwargs())


def compact(layer: LayerCache, page_table_rows: jax.Array, indices: jax.Array, counts: jax.Array,
            runtime: Runtime) -> LayerCache:
  """Moves each head's kept tokens to the front of its sequence, in place (K and V)."""
  from pallas_kernels.compaction import compact_pages
  slots = jnp.arange(page_table_rows.shape[0], dtype=jnp.int32)
  k, v = compact_pages((layer.k, layer.v), page_table_rows, slots, indices, counts, **runtime.kernel_kwargs())
  return layer.replace(k=k, v=v)


def compact_into(layer: LayerCache, src_rows: jax.Array, dst_rows: jax.Array, indices: jax.Array,
                 counts: jax.Array) -> LayerCache:
  """Copies each head's kept tokens to positions 0..count-1 of other pages (K and V), leaving
  the source pages as they are: a prompt's dense pages stay reusable by the prefix cache.

  src_rows, dst_rows: int32[n, max_pages]; indices: int32[n, kv_heads, budget] logical
  positions in the source rows (ascending, -1 padded); counts: int32[n].
  """
  heads, num_pages, page_size = layer.k.shape[:3]
  n, _, budget = indices.shape
  kept = (jnp.arange(budget)[None, None, :] < counts[:, None, None]) & (indices >= 0)
  src = jnp.clip(indices, 0)
  src_page = jnp.take_along_axis(src_rows, (src // page_size).reshape(n, -1), axis=1).reshape(src.shape)
  src_flat = jnp.clip(src_page, 0) * page_size + src % page_size
  dst_pos = jnp.broadcast_to(jnp.arange(budget, dtype=jnp.int32)[None, None, :], src.shape)
  dst_page = jnp.take_along_axis(dst_rows, (dst_pos // page_size).reshape(n, -1), axis=1).reshape(src.shape)
  dst_flat = jnp.where(kept & (dst_page >= 0), dst_page * page_size + dst_pos % page_size, num_pages * page_size)
  head = jnp.arange(heads)[None, :, None]

  def move(pool):
    flat = pool.reshape(heads, num_pages * page_size, *pool.shape[3:])
    return flat.at[head, dst_flat].set(flat[head, src_flat], mode="drop").reshape(pool.shape)

  return layer.replace(k=move(layer.k), v=move(layer.v))


# -- the layer --------------------------------------------------------------------

class RMSNorm(nnx.Module):
  """RMSNorm as transformers computes it: normalise in float32, scale in the input dtype."""

  def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class SparseAttention(nnx.Module):
  """GQA attention with RoPE, a paged KV cache and pluggable sparse prediction.

  Three calls:
    `attn(x, positions)`: causal attention over x with no cache (training, tests).
    `attn.prefill(x, lengths, layer, page_table_rows, runtime)`: a fresh prompt per row; writes
      K/V pages, then (sparse) predicts the tokens to keep and compacts in place, then updates aux.
    `attn.decode(x, positions, layer, page_table, lengths, active, runtime)`: one token per slot.
  """

  def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope: rope_lib.RopeSpec, qkv_bias: bool = False, o_bias: bool = False,
               qk_norm_eps: float | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.scale = head_dim ** -0.5
    self.rope = rope
    self.dtype = dtype
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.02))
    self.q_proj = linear(hidden_size, num_heads * head_dim, use_bias=qkv_bias)
    self.k_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias)
    self.v_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias)
    self.o_proj = linear(num_heads * head_dim, hidden_size, use_bias=o_bias)
    if qk_norm_eps is not None:
      self.q_norm = RMSNorm(head_dim, qk_norm_eps, param_dtype=param_dtype)
      self.k_norm = RMSNorm(head_dim, qk_norm_eps, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    # A learned predictor (nnx.Module) some algorithms attach (see Algorithm.build_predictor);
    # it is called purely and receives this layer's input hidden states. Declared as data: NNX
    # fixes an attribute's static/data status at its first assignment, and None alone is static.
    self.predictor = nnx.data(None)

  def _predictor_kwargs(self, hidden: jax.Array) -> dict[str, Any]:
    return {} if self.predictor is None else dict(predictor=self.predictor, hidden=hidden)

  def spec(self, page_size: int, runtime: Runtime) -> AttentionSpec:
    return AttentionSpec(q_heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                         page_size=page_size, scale=self.scale, runtime=runtime)

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [B, T, hidden], positions: int32[B, T] -> roped q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D]."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = rope_lib.cos_sin(self.rope, positions, q.dtype)
    return rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin), v

  def output(self, attn: jax.Array) -> jax.Array:
    return self.o_proj(attn.reshape(*attn.shape[:-2], self.num_heads * self.head_dim))

  def __call__(self, x: jax.Array, positions: jax.Array, lengths: jax.Array | None = None,
               backend: str = "reference") -> jax.Array:
    q, k, v = self.project(x, positions)
    return self.output(causal_attention(q, k, v, lengths, self.scale, backend=backend))

  def prefill(self, x: jax.Array, lengths: jax.Array, layer: LayerCache, page_table_rows: jax.Array,
              runtime: Runtime, starts: jax.Array | None = None, final: bool = True,
              compact_rows: jax.Array | None = None) -> tuple[jax.Array, LayerCache, jax.Array]:
    """x: [n, T, hidden] right-padded prompts (or prompt chunks); lengths: int32[n] tokens of x;
    page_table_rows: int32[n, max_pages] (pages already allocated). With `starts` (int32[n]
    tokens already stored: a chunked prefill), x holds positions starts.. and attends to the
    stored context (dense, or the algorithm's selection within `prefill_budget`); `final`
    marks a prompt's last chunk (prompt compression runs then). `compact_rows` (int32[n,
    max_pages]): prompt compression writes the kept tokens there instead of in place, so the
    dense prompt pages stay reusable. Returns (out [n, T, hidden], layer, counts int32[n] =
    tokens each row now holds)."""
    n, t, _ = x.shape
    chex.assert_shape(lengths, (n,))
    chex.assert_shape(page_table_rows, (n, None))
    offset = jnp.zeros((n,), jnp.int32) if starts is None else starts
    pos = offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    q, k, v = self.project(x, pos)
    core = functools.partial(prefill_core, scale=self.scale, runtime=runtime, extra=self._predictor_kwargs(x),
                             chunked=starts is not None, final=final)
    out, layer, counts = runtime.per_kv_shard(core, (True, True, True, False, "layer", False, False, False),
                                              (True, "layer", False))(q, k, v, lengths, layer, page_table_rows,
                                                                      offset, compact_rows)
    return self.output(out), layer, counts

  def decode(self, x: jax.Array, positions: jax.Array, layer: LayerCache, page_table: jax.Array,
             lengths: jax.Array, active: jax.Array, runtime: Runtime) -> tuple[jax.Array, LayerCache]:
    """x: [S, hidden] one token per batch slot; positions: int32[S] RoPE positions;
    lengths: int32[S] tokens stored before this one; active: bool[S] (inactive slots write and
    read nothing). Returns (out [S, hidden], layer)."""
    s = x.shape[0]
    chex.assert_shape((positions, lengths, active), (s,))
    q, k, v = self.project(x[:, None], positions[:, None])
    core = functools.partial(decode_core, scale=self.scale, runtime=runtime,
                             extra=self._predictor_kwargs(x[:, None]))
    out, layer = runtime.per_kv_shard(core, (True, True, True, "layer", False, False, False),
                                      (True, "layer"))(q[:, 0], k[:, 0], v[:, 0], layer, page_table, lengths, active)
    return self.output(out), layer


def _spec_for(q: jax.Array, layer: LayerCache, scale: float, runtime: Runtime) -> AttentionSpec:
  """The spec of the heads this call sees (all of them, or one tensor-parallel shard's)."""
  return AttentionSpec(q_heads=q.shape[-2], kv_heads=layer.k.shape[0], head_dim=q.shape[-1],
                       page_size=layer.k.shape[2], scale=scale, runtime=runtime)


def chunk_block_scores(q, layer: LayerCache, rows, starts, chunk_lens, spec: AttentionSpec, runtime: Runtime):
  """The algorithm's block scores of the stored context for a prompt chunk: the max over up to 8
  chunk queries sampled evenly up to its last one, scored together. Returns (float32[n, H, blocks],
  block_size)."""
  samples = min(8, q.shape[1])
  pick = (jnp.maximum(chunk_lens - 1, 0)[:, None] * jnp.arange(1, samples + 1)[None, :]) // samples  # [n, R]
  q_rep = jnp.take_along_axis(q, pick[:, :, None, None], axis=1)  # [n, R, Hq, D]
  return runtime.algorithm.chunk_scores(runtime.sparse, spec, q_rep, layer, rows, starts)


def chunk_context_units(scores, block_size: int, rows, starts, page_size: int, prefill_budget: int,
                        granularity: str = "block"):
  """The top blocks (or, with granularity "page", the top KV pages by their blocks' summed scores)
  within `prefill_budget` tokens as gather units: (unit ids, lengths, unit size). Pages gather in
  page-sized contiguous units, and their top-k runs over page_size / block_size times fewer scores."""
  if granularity == "page" and block_size < page_size:
    batch, kv_heads, blocks = scores.shape
    per_page = scores.reshape(batch, kv_heads, blocks * block_size // page_size, page_size // block_size)
    stored = ~jnp.isneginf(per_page)
    scores = jnp.where(stored.any(-1), jnp.where(stored, per_page, 0.0).sum(-1), -jnp.inf)
    block_size = page_size
  selection = topk_selection(scores, max(1, prefill_budget // block_size), block_size)
  unit_size = unit_size_for(block_size, page_size)
  ids, lens = to_units(selection, rows, starts, page_size, unit_size)
  return ids, lens, unit_size


def _context_for_chunk(q, layer: LayerCache, rows, starts, chunk_lens, scale, runtime: Runtime):
  """Units of the stored context a prompt chunk attends to: all of them (dense), or the
  algorithm's top blocks within `prefill_budget`, scored by the max over sampled chunk queries."""
  kv_heads, page_size = layer.k.shape[0], layer.k.shape[2]
  algo = runtime.algorithm
  if algo is None or algo.chunk_scores is None or not runtime.predict or not runtime.sparse_prefill:
    ids, lens = dense_units(rows, starts, kv_heads)
    return ids, lens, page_size
  scores, block_size = chunk_block_scores(q, layer, rows, starts, chunk_lens, _spec_for(q, layer, scale, runtime),
                                          runtime)
  return chunk_context_units(scores, block_size, rows, starts, page_size, runtime.sparse.prefill_budget,
                             runtime.sparse.prefill_granularity)


def write_chunk(layer: LayerCache, k, v, rows, starts, lengths) -> LayerCache:
  """Stores a call's K/V ([n, T, Hkv, D], `lengths` valid per row) at positions starts.. of each row."""
  n, t, kv_heads = k.shape[:3]
  page_size, num_pages = layer.k.shape[2], layer.k.shape[1]
  pos = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  slots = token_slots(rows, pos, jnp.arange(t)[None, :] < lengths[:, None], page_size, num_pages).reshape(-1)
  return layer.replace(k=write_tokens(layer.k, slots, k.reshape(n * t, kv_heads, -1)),
                       v=write_tokens(layer.v, slots, v.reshape(n * t, kv_heads, -1)))


def prefill_core(q, k, v, lengths, layer: LayerCache, rows, starts, compact_rows=None, *, scale, runtime: Runtime,
                 extra, chunked: bool = False, final: bool = True):
  """Per-KV-head part of prefill: attention, cache write, predict_kv + compaction, aux update.

  q: [n, T, Hq, D], k, v: [n, T, Hkv, D] roped; lengths: int32[n] tokens of this call;
  rows: int32[n, max_pages]; starts: int32[n] tokens already stored (chunked prefill);
  compact_rows: int32[n, max_pages] or None: where compaction writes the kept tokens (None:
  in place).
  Returns (attention output [n, T, Hq, D], layer, counts int32[n] = tokens each row holds).
  """
  n, t, kv_heads = k.shape[0], k.shape[1], k.shape[2]
  page_size = layer.k.shape[2]
  if chunked:
    ids, ctx_lens, unit_size = _context_for_chunk(q, layer, rows, starts, lengths, scale, runtime)
    out = sparse_chunk_attention(q, k, v, lengths, gather_units(layer.k, ids, unit_size),
                                 gather_units(layer.v, ids, unit_size), ctx_lens, scale, backend=runtime.backend)
  else:
    out = causal_attention(q, k, v, lengths, scale, backend=runtime.backend)
  layer = write_chunk(layer, k, v, rows, starts, lengths)
  total = (starts + lengths).astype(jnp.int32)
  counts = total
  algo = runtime.algorithm
  if algo is not None:
    spec = _spec_for(q, layer, scale, runtime)
    if chunked:
      layer = algo.update_aux(runtime.sparse, spec, layer, rows, starts, total, t, **extra)
      if not final:
        return out, layer, counts
      # The whole prompt's keys, read back from the pages, for prompt compression.
      k_all = jnp.swapaxes(gather_tokens(layer.k, rows, rows.shape[1] * page_size), 1, 2)
      keep = algo.predict_kv(runtime.sparse, spec, q, k_all, total, q_start=starts, **extra)
      stored = k_all.shape[1]
    else:
      keep = algo.predict_kv(runtime.sparse, spec, q, k, lengths, **extra)
      stored = t
    aux_rows = rows
    if keep is not None:
      chex.assert_shape(keep.indices, (n, kv_heads, None))
      if compact_rows is None:
        layer = compact(layer, rows, keep.indices, keep.counts, runtime)
      else:
        if not chunked:  # the dense pages' aux entries, reused with them by a later prefix match
          layer = algo.update_aux(runtime.sparse, spec, layer, rows, jnp.zeros_like(total), total, stored, **extra)
        layer = compact_into(layer, rows, compact_rows, keep.indices, keep.counts)
        aux_rows = compact_rows
      counts = keep.counts
      stored = keep.indices.shape[-1]
    if keep is not None or not chunked:
      layer = algo.update_aux(runtime.sparse, spec, layer, aux_rows, jnp.zeros_like(counts), counts, stored, **extra)
  if runtime.evict:  # fresh pages start with no importance
    imp = layer.aux[IMPORTANCE]
    fresh = rows if compact_rows is None else jnp.concatenate([rows, compact_rows], axis=1)
    ids = jnp.where(fresh >= 0, fresh, imp.shape[1]).reshape(-1)
    layer = layer.replace(aux={**layer.aux, IMPORTANCE: imp.at[0, ids, 0].set(0.0, mode="drop")})
  return out, layer, counts


def decode_core(q, k, v, layer: LayerCache, page_table, lengths, active, *, scale, runtime: Runtime, extra):
  """Per-KV-head part of a decode step: append K/V, update aux, predict, sparse paged attention.

  q: [S, Hq, D], k, v: [S, Hkv, D] roped; page_table: int32[S, max_pages]; lengths: int32[S]
  before this token; active: bool[S]. Returns (attention output [S, Hq, D], layer).
  """
  kv_heads = k.shape[1]
  page_size, num_pages = layer.k.shape[2], layer.k.shape[1]
  slot = token_slots(page_table, lengths[:, None], active[:, None], page_size, num_pages)[:, 0]
  layer = layer.replace(k=write_tokens(layer.k, slot, k), v=write_tokens(layer.v, slot, v))
  new_lengths = lengths + active.astype(jnp.int32)
  algo = runtime.algorithm
  selection = out = None
  if algo is not None:
    spec = _spec_for(q, layer, scale, runtime)
    layer = algo.update_aux(runtime.sparse, spec, layer, page_table, lengths, new_lengths, 1, **extra)
    if runtime.predict and algo.decode_attention is not None:
      out = algo.decode_attention(runtime.sparse, spec, q, layer, page_table, new_lengths, **extra)
    if runtime.predict and out is None:
      selection = algo.predict_attn(runtime.sparse, spec, q, layer, page_table, new_lengths, **extra)
    if runtime.evict:
      scores = algo.page_scores(runtime.sparse, spec, q, layer, page_table, new_lengths, **extra)  # [S, max_pages]
      imp = layer.aux[IMPORTANCE]
      ids = jnp.where((page_table >= 0) & active[:, None], page_table, imp.shape[1])
      imp = imp.at[0, ids.reshape(-1), 0].add(scores.reshape(-1).astype(imp.dtype), mode="drop")
      layer = layer.replace(aux={**layer.aux, IMPORTANCE: imp})
  if out is not None:
    return out, layer
  if selection is None:
    unit_size = page_size
    unit_ids, kv_lens = dense_units(page_table, new_lengths, kv_heads)
  else:
    unit_size = unit_size_for(selection.block_size, page_size)
    unit_ids, kv_lens = to_units(selection, page_table, new_lengths, page_size, unit_size)
  return paged_decode(q, layer, unit_ids, kv_lens, unit_size, scale, runtime), layer
