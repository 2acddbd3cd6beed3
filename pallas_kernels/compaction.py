"""In-place compaction of paged pools: move the kept tokens of a sequence to logical
positions ``0 .. count-1`` (TensorRT-LLM's KV-cache compaction after ``sparse_kv_predict``).

Logical position p of batch row r lives at physical page ``page_table[r, p // page_size]``,
offset ``p % page_size``. For every compacted row i, head h and j < keep_counts[i], the token
at logical position ``keep_indices[i, h, j]`` ends at logical position j; positions >= count
and other rows are untouched.

Two methods (the benchmark decides):

* ``"inplace"`` (default): one pass, reads and writes the pool through the same aliased
  buffer. One program per (row, head, feature block) walks its kept tokens in ascending
  chunks. Bytes moved: 2 x kept bytes.
* ``"two_pass"``: gather every chunk into a scratch buffer (all chunks in parallel), then
  scatter the scratch back (all chunks in parallel). Bytes moved: 4 x kept bytes, but no
  serial chain per head.

Layout of the file: kernel bodies, ``pallas_call`` launchers, public jitted function,
``compact_pages_reference`` (plain jax.numpy).
"""

from __future__ import annotations

import functools
from typing import Sequence

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.common import is_power_of_two


def _token_addresses(pt_ref, slot, keep_ref, count, chunk_index, *, chunk, page_size):
  """Flat physical token rows (page * page_size + offset) of one chunk of kept tokens.

  Lanes j >= count (only in the last chunk) are redirected to the last kept token
  (source keep[count-1], destination count-1): they write the very value lane count-1
  writes, so no mask is needed and nothing outside the kept set is touched.
  """
  base = chunk_index * chunk
  j = base + jnp.arange(chunk, dtype=jnp.int32)
  valid = j < count
  last = jnp.maximum(count - 1, 0)
  last_src = keep_ref[last]
  src_pos = jnp.where(valid, keep_ref[pl.ds(base, chunk)], last_src)
  dst_pos = jnp.where(valid, j, last)
  src_page = jnp.maximum(pt_ref[slot, src_pos // page_size], 0)
  dst_page = jnp.maximum(pt_ref[slot, dst_pos // page_size], 0)
  src = src_page * page_size + src_pos % page_size
  dst = dst_page * page_size + dst_pos % page_size
  return src, dst


def _compact_inplace_kernel(pt_ref, slot_ref, keep_ref, count_ref, *refs, num_pools: int,
                            chunk: int, page_size: int, interpret: bool):
  """One program = one (compacted row, head, feature block); chunks run in order.

  Refs: ``pt_ref [batch_slots, max_pages]`` the page table; ``slot_ref [1]`` the row;
  ``keep_ref [budget_padded]`` kept logical positions of this (row, head);
  ``count_ref [1]``; then the pool inputs (unused: they are
  aliased to the outputs) and the pool outputs ``[num_pages * page_size, block_f]``.
  Every read and write goes through the *output* refs, i.e. the one aliased buffer.

  Why in place is race-free (keep is ascending and unique, hence keep[j] >= j):
    * Chunk c writes destinations [cC, (c+1)C) and reads sources keep[cC..(c+1)C) which
      are all >= cC. A source position p is read only by the token j with keep[j] = p,
      and j <= p. So position p is overwritten (by token p) no earlier than the chunk
      that reads it, never by an earlier chunk:
    * within a chunk all lanes load, then ``cta_barrier`` (``__syncthreads``: the
      loading thread and the storing thread of a position may differ), then all store;
    * a later chunk's stores come after its own barrier, hence after every earlier
      chunk's loads; a later chunk's loads read positions >= (c+1)C, which no store of
      chunk c touches, so loads may run ahead (software pipelining is safe).
    * chunks of one head must therefore stay in one program, in order. Programs of
      different heads / feature blocks / pools touch disjoint memory; programs of
      different rows touch disjoint pages, provided rows own their pages (no page
      shared between compacted rows or with other rows) and ``slots`` has no duplicates.
  """
  pool_refs = refs[num_pools:]
  budget = keep_ref.shape[0]
  count = jnp.clip(count_ref[0], 0, budget)
  slot = slot_ref[0]

  def body(c, carry):
    src, dst = _token_addresses(pt_ref, slot, keep_ref, count, c, chunk=chunk,
                                page_size=page_size)
    values = [ref[src] for ref in pool_refs]  # [chunk, block_f] each
    _compat.cta_barrier(interpret)
    for ref, value in zip(pool_refs, values):
      ref[dst] = value
    return carry

  lax.fori_loop(0, pl.cdiv(count, chunk), body, 0)


def _gather_kernel(pt_ref, slot_ref, keep_ref, count_ref, *refs, num_pools: int, chunk: int,
                   page_size: int, feature_blocks: Sequence[int]):
  """Two-pass, pass 1: one program = one (row, head, chunk): kept tokens -> scratch."""
  pool_refs, scratch_refs = refs[:num_pools], refs[num_pools:]
  _copy_chunk(pt_ref, slot_ref, keep_ref, count_ref, pool_refs, scratch_refs, chunk=chunk, page_size=page_size,
              feature_blocks=feature_blocks, to_scratch=True)


def _scatter_kernel(pt_ref, slot_ref, keep_ref, count_ref, *refs, num_pools: int, chunk: int,
                    page_size: int, feature_blocks: Sequence[int]):
  """Two-pass, pass 2: one program = one (row, head, chunk): scratch -> positions 0..count-1.
  Destinations of different chunks are disjoint and the pool is not read: race-free."""
  scratch_refs, pool_refs = refs[:num_pools], refs[2 * num_pools:]
  _copy_chunk(pt_ref, slot_ref, keep_ref, count_ref, pool_refs, scratch_refs, chunk=chunk, page_size=page_size,
              feature_blocks=feature_blocks, to_scratch=False)


def _copy_chunk(pt_ref, slot_ref, keep_ref, count_ref, pool_refs, scratch_refs, *, chunk: int, page_size: int,
                feature_blocks: Sequence[int], to_scratch: bool):
  """Chunk pl.program_id(2) of the kept tokens, feature block by feature block: pool rows at the
  kept positions -> scratch (to_scratch), else scratch -> pool rows at positions 0..count-1."""
  budget = keep_ref.shape[0]
  count = jnp.clip(count_ref[0], 0, budget)
  c = pl.program_id(2)

  @pl.when(c * chunk < count)
  def _():
    src, dst = _token_addresses(pt_ref, slot_ref[0], keep_ref, count, c, chunk=chunk,
                                page_size=page_size)
    for pool_ref, scratch_ref, block_f in zip(pool_refs, scratch_refs, feature_blocks):
      for f in range(pool_ref.shape[-1] // block_f):
        cols = pl.ds(f * block_f, block_f)
        if to_scratch:
          scratch_ref[:, cols] = pool_ref[src, cols]
        else:
          pool_ref[dst, cols] = scratch_ref[:, cols]


def _largest_power_of_two_divisor(x: int) -> int:
  return x & -x


def _compact_group_pallas(flat_pools, page_table, slots, keep, counts, *, page_size,
                          method, chunk, feature_block, num_warps, num_stages, interpret):
  """Compacts pools that share the flattened feature size F: each ``[heads, tokens, F]``."""
  heads, num_tokens, features = flat_pools[0].shape
  n, _, budget_padded = keep.shape
  num_pools = len(flat_pools)
  block_f = min(feature_block, _largest_power_of_two_divisor(features))
  params = _compat.compiler_params(num_warps=num_warps, num_stages=num_stages)
  pt_spec = pl.BlockSpec(page_table.shape, lambda i, h, f: (0, 0))  # the slot is read inside
  slot_spec = pl.BlockSpec((1,), lambda i, h, f: (i,))
  keep_spec = pl.BlockSpec((None, None, budget_padded), lambda i, h, f: (i, h, 0))
  count_spec = pl.BlockSpec((None, 1), lambda i, h, f: (i, 0))
  counts = counts.reshape(n, 1)

  if method == "inplace":
    pool_spec = pl.BlockSpec((None, num_tokens, block_f), lambda i, h, f: (h, 0, f))
    kernel = functools.partial(_compact_inplace_kernel, num_pools=num_pools,
                               chunk=chunk, page_size=page_size, interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(n, heads, features // block_f),
        in_specs=[pt_spec, slot_spec, keep_spec, count_spec] + [pool_spec] * num_pools,
        out_specs=[pool_spec] * num_pools,
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in flat_pools],
        input_output_aliases={4 + k: k for k in range(num_pools)},
        compiler_params=params,
        interpret=interpret,
        name="compact_pages_inplace",
    )(page_table, slots, keep, counts, *flat_pools)

  # two_pass
  num_chunks = budget_padded // chunk
  feature_blocks = (block_f,) * num_pools
  whole_pool_spec = pl.BlockSpec((None, num_tokens, features), lambda i, h, c: (h, 0, 0))
  scratch_spec = pl.BlockSpec((None, None, chunk, features), lambda i, h, c: (i, h, c, 0))
  scratch = pl.pallas_call(
      functools.partial(_gather_kernel, num_pools=num_pools, chunk=chunk,
                        page_size=page_size, feature_blocks=feature_blocks),
      grid=(n, heads, num_chunks),
      in_specs=[pt_spec, slot_spec, keep_spec, count_spec] + [whole_pool_spec] * num_pools,
      out_specs=[scratch_spec] * num_pools,
      out_shape=[jax.ShapeDtypeStruct((n, heads, budget_padded, features), p.dtype)
                 for p in flat_pools],
      compiler_params=params,
      interpret=interpret,
      name="compact_pages_gather",
  )(page_table, slots, keep, counts, *flat_pools)
  return pl.pallas_call(
      functools.partial(_scatter_kernel, num_pools=num_pools, chunk=chunk,
                        page_size=page_size, feature_blocks=feature_blocks),
      grid=(n, heads, num_chunks),
      in_specs=([pt_spec, slot_spec, keep_spec, count_spec] + [scratch_spec] * num_pools
                + [whole_pool_spec] * num_pools),
      out_specs=[whole_pool_spec] * num_pools,
      out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in flat_pools],
      input_output_aliases={4 + num_pools + k: k for k in range(num_pools)},
      compiler_params=params,
      interpret=interpret,
      name="compact_pages_scatter",
  )(page_table, slots, keep, counts, *scratch, *flat_pools)


def _check_inputs(pools, page_table, slots, keep_indices, keep_counts):
  if not isinstance(pools, (tuple, list)) or not pools:
    raise ValueError("pools must be a non-empty tuple of arrays")
  for k, pool in enumerate(pools):
    if pool.ndim < 3:
      raise ValueError(
          f"pools[{k}] must be [heads, num_pages, page_size, *feature], got shape"
          f" {pool.shape}")
    if pool.shape[:3] != pools[0].shape[:3]:
      raise ValueError(
          f"pools[{k}] leading dims {pool.shape[:3]} differ from pools[0]"
          f" {pools[0].shape[:3]} (heads, num_pages, page_size must match)")
  heads = pools[0].shape[0]
  if page_table.ndim != 2 or not jnp.issubdtype(page_table.dtype, jnp.integer):
    raise ValueError(
        "page_table must be int32[batch_slots, max_pages_per_seq], got"
        f" {page_table.dtype}{list(page_table.shape)}")
  if slots.ndim != 1 or not jnp.issubdtype(slots.dtype, jnp.integer):
    raise ValueError(f"slots must be int32[n], got {slots.dtype}{list(slots.shape)}")
  n = slots.shape[0]
  if (keep_indices.ndim != 3 or keep_indices.shape[:2] != (n, heads)
      or not jnp.issubdtype(keep_indices.dtype, jnp.integer)):
    raise ValueError(
        f"keep_indices must be int32[n={n}, heads={heads}, budget], got"
        f" {keep_indices.dtype}{list(keep_indices.shape)}")
  if keep_counts.shape != (n,) or not jnp.issubdtype(keep_counts.dtype, jnp.integer):
    raise ValueError(
        f"keep_counts must be int32[n={n}], got"
        f" {keep_counts.dtype}{list(keep_counts.shape)}")
  chex.assert_shape(keep_indices, (n, heads, None))


@functools.partial(
    jax.jit,
    static_argnames=("backend", "interpret", "method", "chunk", "feature_block",
                     "num_warps", "num_stages"),
)
def compact_pages(
    pools: tuple[jax.Array, ...],
    page_table: jax.Array,
    slots: jax.Array,
    keep_indices: jax.Array,
    keep_counts: jax.Array,
    *,
    backend: str = "pallas",
    interpret: bool | None = None,
    method: str = "inplace",
    chunk: int = 256,
    feature_block: int = 64,   # best on the H100 (BENCHMARKS.md: 66 us, 76% of the copy ceiling)
    num_warps: int = 8,
    num_stages: int = 2,
) -> tuple[jax.Array, ...]:
  """Moves kept tokens to the front of each compacted sequence, in place.

  Args:
    pools: tuple of ``[heads, num_pages, page_size, *feature]`` pools (K, V, per-token aux
      pools; trailing feature dims and dtypes may differ per pool). Donate them (the
      caller's ``jax.jit(..., donate_argnums=...)``) for a true in-place update; without
      donation XLA copies each pool once before the kernel.
    page_table: ``int32[batch_slots, max_pages_per_seq]``, -1 = no page.
    slots: ``int32[n]``: the batch rows compacted (unique; rows must not share pages).
    keep_indices: ``int32[n, heads, budget]``: per head, ascending unique logical
      positions to keep, -1 padded after ``keep_counts``.
    keep_counts: ``int32[n]``: kept tokens per row (same for every head); 0 = no-op.
    backend: ``"pallas"`` or ``"reference"`` (functional gather + scatter).
    interpret: Pallas interpret mode; None = when the default backend is the CPU.
    method: ``"inplace"`` (one pass) or ``"two_pass"`` (gather to scratch, scatter back).
    chunk: kept tokens moved per step (power of two).
    feature_block: feature columns per program (capped by the largest power of two
      dividing the flattened feature size); the in-place grid is
      rows x heads x feature blocks, per group of pools with the same feature size.
    num_warps, num_stages: Triton compiler parameters.

  Returns:
    The updated pools, same shapes and dtypes, same order.
  """
  pools = tuple(pools)
  _check_inputs(pools, page_table, slots, keep_indices, keep_counts)
  if backend == "reference":
    return compact_pages_reference(pools, page_table, slots, keep_indices, keep_counts)
  if backend != "pallas":
    raise ValueError(f"backend must be 'pallas' or 'reference', got {backend!r}")
  if method not in ("inplace", "two_pass"):
    raise ValueError(f"method must be 'inplace' or 'two_pass', got {method!r}")
  if not is_power_of_two(chunk):
    raise ValueError(f"chunk must be a power of two, got {chunk}")
  if not is_power_of_two(feature_block):
    raise ValueError(f"feature_block must be a power of two, got {feature_block}")
  interpret = _compat.resolve_interpret(interpret)

  heads, num_pages, page_size = pools[0].shape[:3]
  budget = keep_indices.shape[-1]
  budget_padded = pl.cdiv(budget, chunk) * chunk
  keep = keep_indices.astype(jnp.int32)
  if budget_padded != budget:
    keep = jnp.pad(keep, ((0, 0), (0, 0), (0, budget_padded - budget)),
                   constant_values=-1)
  page_table = page_table.astype(jnp.int32)
  slots = slots.astype(jnp.int32)
  counts = keep_counts.astype(jnp.int32)

  flat = [p.reshape(heads, num_pages * page_size, -1) for p in pools]
  groups: dict[int, list[int]] = {}
  for k, p in enumerate(flat):
    groups.setdefault(p.shape[-1], []).append(k)
  out: list[jax.Array | None] = [None] * len(pools)
  for members in groups.values():
    results = _compact_group_pallas(
        [flat[k] for k in members], page_table, slots, keep, counts, page_size=page_size,
        method=method, chunk=chunk, feature_block=feature_block, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    for k, r in zip(members, results):
      out[k] = r.reshape(pools[k].shape)
  return tuple(out)


@jax.jit
def compact_pages_reference(
    pools: tuple[jax.Array, ...],
    page_table: jax.Array,
    slots: jax.Array,
    keep_indices: jax.Array,
    keep_counts: jax.Array,
) -> tuple[jax.Array, ...]:
  """Plain-XLA reference of :func:`compact_pages`: gathers every kept token from the
  original pools, then scatters them to positions 0..count-1 (functional, no aliasing)."""
  pools = tuple(pools)
  _check_inputs(pools, page_table, slots, keep_indices, keep_counts)
  heads, num_pages, page_size = pools[0].shape[:3]
  n, _, budget = keep_indices.shape
  num_tokens = num_pages * page_size
  rows_pt = page_table[slots]  # [n, max_pages]

  j = jnp.arange(budget)
  valid = (j[None, :] < keep_counts[:, None])[:, None, :]  # [n, 1, budget]
  src_pos = jnp.where(valid, keep_indices, 0)  # [n, heads, budget]
  src_page = jnp.take_along_axis(rows_pt[:, None, :], src_pos // page_size, axis=-1)
  src = src_page * page_size + src_pos % page_size
  dst_pos = jnp.broadcast_to(j, (n, heads, budget))
  dst_page = jnp.take_along_axis(rows_pt[:, None, :],
                                 jnp.where(valid, dst_pos, 0) // page_size, axis=-1)
  dst = jnp.where(valid, dst_page * page_size + dst_pos % page_size, num_tokens)
  head = jnp.arange(heads)[None, :, None]

  out = []
  for pool in pools:
    flat = pool.reshape(heads, num_tokens, -1)
    values = flat[head, jnp.clip(src, 0, num_tokens - 1)]  # [n, heads, budget, F]
    flat = flat.at[head, dst].set(values, mode="drop")
    out.append(flat.reshape(pool.shape))
  return tuple(out)
