"""Index contracts between predictors and kernels (static shapes, -1 padded, jit-safe).

KeepSelection (context phase, TensorRT-LLM's `sparse_kv_predict`): which prompt tokens each
KV head keeps. AttnSelection (generation phase, `sparse_attn_predict`): which blocks of
`block_size` tokens each KV head attends to. `to_units` / `to_pages` turn an AttnSelection
into the physical gather units the decode kernel reads (TensorRT-LLM's
`gatherKvPageOffsetsKernel`).
"""
from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

_BIG = jnp.iinfo(jnp.int32).max


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeepSelection:
  """indices: int32[batch, kv_heads, budget] ascending unique token positions, -1 padded
  after counts; counts: int32[batch] (every head of a row keeps the same count)."""
  indices: jax.Array
  counts: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnSelection:
  """indices: int32[batch, kv_heads, max_blocks] ascending unique block ids (block b covers
  tokens [b * block_size, (b + 1) * block_size)), -1 padded at the end."""
  indices: jax.Array
  block_size: int = dataclasses.field(metadata=dict(static=True))


def sort_padded(indices: jax.Array) -> jax.Array:
  """Sorts ascending along the last axis with every -1 moved to the end."""
  keyed = jnp.where(indices < 0, _BIG, indices)
  keyed = jnp.sort(keyed, axis=-1)
  return jnp.where(keyed == _BIG, -1, keyed)


def keep_all(lengths: jax.Array, kv_heads: int, budget: int) -> KeepSelection:
  """The selection that keeps every token of each row (rows no longer than budget)."""
  pos = jnp.arange(budget, dtype=jnp.int32)
  idx = jnp.where(pos[None, :] < lengths[:, None], pos[None, :], -1)
  return KeepSelection(indices=jnp.broadcast_to(idx[:, None, :], (lengths.shape[0], kv_heads, budget)),
                       counts=jnp.minimum(lengths, budget).astype(jnp.int32))


def topk_selection(scores: jax.Array, k: int, block_size: int) -> AttnSelection:
  """Top-k blocks by score; -inf scores mean "not a valid block" and become -1 padding.

  scores: float32[batch, kv_heads, num_blocks] -> AttnSelection of k blocks (k <= num_blocks).
  """
  k = min(k, scores.shape[-1])
  values, idx = jax.lax.top_k(scores, k)
  idx = jnp.where(jnp.isneginf(values), -1, idx).astype(jnp.int32)
  return AttnSelection(indices=sort_padded(idx), block_size=block_size)


def page_importance(block_scores: jax.Array, blocks_per_page: int) -> jax.Array:
  """Per-KV-page importance for eviction from per-block probabilities.

  block_scores: float32[batch, kv_heads, max_pages * blocks_per_page] (-inf = no block) ->
  float32[batch, max_pages]: each page's summed block mass, max over KV heads (a page is evicted
  for every head at once, so it must matter to none of them).
  """
  b, h, nb = block_scores.shape
  mass = jnp.where(jnp.isneginf(block_scores), 0.0, block_scores)
  return mass.reshape(b, h, nb // blocks_per_page, blocks_per_page).sum(-1).max(axis=1)


def unit_size_for(block_size: int, page_size: int) -> int:
  """The coarsest gather granule that reads no token outside the selected blocks."""
  return math.gcd(block_size, page_size)


def to_units(selection: AttnSelection, page_table: jax.Array, lengths: jax.Array, page_size: int,
             unit_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Selected blocks -> physical gather units and valid-token counts per KV head.

  selection.indices: int32[batch, kv_heads, max_blocks]; page_table: int32[batch, max_pages];
  lengths: int32[batch] tokens stored. The pool of one layer, viewed as
  `[kv_heads, num_pages * page_size // unit_size, unit_size, D]`, holds logical unit l of a
  sequence at unit id `page_table[l * unit_size // page_size] * (page_size // unit_size) +
  (l * unit_size % page_size) // unit_size`.

  Returns (unit_ids int32[batch, kv_heads, max_units] ascending and unique, -1 padded;
  kv_lens int32[batch, kv_heads] valid tokens of the listed units, of which only the last may
  be partial). Units of a block past `lengths` are dropped; units shared by several blocks
  (unit_size > block_size) are listed once.
  """
  bs = selection.block_size
  u = unit_size or unit_size_for(bs, page_size)
  if page_size % u:
    raise ValueError(f"unit_size {u} must divide page_size {page_size}")
  batch, kv_heads, max_blocks = selection.indices.shape
  chex.assert_shape(page_table, (batch, None))
  chex.assert_shape(lengths, (batch,))
  max_pages = page_table.shape[1]
  units_per_page = page_size // u
  max_logical_units = max_pages * units_per_page
  # Units a block can overlap: first = floor(b*bs/u), last = ceil((b+1)*bs/u) - 1.
  span = -(-bs // u) + (1 if bs % u else 0)
  blocks = selection.indices[..., None]  # [B, H, M, 1]
  first = (blocks * bs) // u
  logical = first + jnp.arange(span, dtype=jnp.int32)  # [B, H, M, span]
  end_unit = ((blocks + 1) * bs + u - 1) // u
  n_units = (lengths[:, None, None, None] + u - 1) // u
  # A block wholly past `lengths` adds nothing, not even the stored head of a unit it shares.
  stored = blocks * bs < lengths[:, None, None, None]
  ok = (blocks >= 0) & stored & (logical < end_unit) & (logical < n_units) & (logical < max_logical_units)
  logical = jnp.where(ok, logical, -1).reshape(batch, kv_heads, max_blocks * span)
  if bs % u:
    # Units may be shared by neighbouring blocks: sort, then drop repeats (adjacent after sorting).
    logical = sort_padded(logical)
    prev = jnp.concatenate([jnp.full_like(logical[..., :1], -2), logical[..., :-1]], axis=-1)
    logical = sort_padded(jnp.where(logical == prev, -1, logical))
  else:
    # Aligned units: ascending unique blocks give ascending unique units already; only the
    # units past `lengths` (all in the last selected block) may need moving to the end.
    logical = sort_padded(logical) if span > 1 else logical
  max_units = min(logical.shape[-1], max_logical_units)
  logical = logical[..., :max_units]
  valid = logical >= 0
  safe = jnp.where(valid, logical, 0)
  page = jnp.take_along_axis(page_table[:, None, :], (safe * u) // page_size, axis=-1)
  unit_ids = jnp.where(valid & (page >= 0), page * units_per_page + safe % units_per_page, -1)
  tokens = jnp.clip(lengths[:, None, None] - safe * u, 0, u)
  kv_lens = jnp.sum(jnp.where(unit_ids >= 0, tokens, 0), axis=-1).astype(jnp.int32)
  return unit_ids.astype(jnp.int32), kv_lens


def to_pages(selection: AttnSelection, page_table: jax.Array, lengths: jax.Array,
             page_size: int) -> tuple[jax.Array, jax.Array]:
  """Whole KV pages covering the selected blocks (TensorRT-LLM's gatherKvPageOffsets)."""
  return to_units(selection, page_table, lengths, page_size, unit_size=page_size)


def dense_units(page_table: jax.Array, lengths: jax.Array, kv_heads: int) -> tuple[jax.Array, jax.Array]:
  """Every page of every sequence, for dense paged decode (units = pages)."""
  batch, max_pages = page_table.shape
  ids = jnp.broadcast_to(page_table[:, None, :], (batch, kv_heads, max_pages))
  return ids, jnp.broadcast_to(lengths[:, None], (batch, kv_heads)).astype(jnp.int32)


def pool_as_units(pool: jax.Array, unit_size: int) -> jax.Array:
  """[heads, num_pages, page_size, D] -> [heads, num_pages * page_size // unit_size, unit_size, D] (free)."""
  heads, num_pages, page_size = pool.shape[:3]
  return pool.reshape(heads, num_pages * page_size // unit_size, unit_size, *pool.shape[3:])


def dense_token_ids(lengths: jax.Array, width: int) -> jax.Array:
  """int32[S, width]: 0..length-1 then -1 (every token of each sequence)."""
  pos = jnp.arange(width, dtype=jnp.int32)
  return jnp.where(pos[None, :] < lengths[:, None], pos[None, :], -1)
