"""RocketKV's whole generation-phase attention in two launches: KT scoring, then block
selection and sparse attention in one kernel (no ``lax.top_k``, sort, unit mapping or
split combine between them).

Per (batch row b, kv head g), with ``n_valid = ceil(length / block_size)`` blocks:

1. ``rocket_block_scores`` (launch 1, split over blocks): per q head h of the group the
   scaled block logits ``raw[h, t]`` from the top-``topr`` channels and the KT min/max.
2. This file's kernel (launch 2, one program per (b, g)):

   * ``p[t] = mean_h softmax_t(raw[h, :n_valid])``; the newest block (``n_valid - 1``)
     gets ``+inf`` so that it is always kept;
   * the ``k = min(topk, n_valid)`` largest ``p`` by a radix search for the k-th largest
     value over the float bit patterns (``radix_bits`` per pass, a histogram of digits per
     pass), exact, ties broken towards the lower block index (as ``lax.top_k``);
   * the selected blocks' unit ids in ascending block order (prefix sums of the selection
     mask, scattered): a block is one gather unit of ``block_size`` tokens, unit id
     ``page_table[t // blocks_per_page] * blocks_per_page + t % blocks_per_page``;
   * online-softmax attention of the group's q heads over those units (the body of
     :func:`pallas_kernels.paged_decode.attend_units`) and the normalised output.

   The block probabilities live in a per-(b, g) int32 buffer (their bit patterns) that
   the program writes once and reads in every radix pass; the unit ids are an output too
   (the attention reads them back after a barrier), so the selection can be checked.

The attention is not split over programs: one program per (b, g) reads only the selected
``k * block_size`` tokens, and a split would need a combine (a third launch, or atomics).

Every block below ``n_valid`` must have a page (the engine's invariant). Layout of the
file: kernel body, ``pallas_call`` launcher, public jitted function,
``rocket_decode_attention_reference`` (plain jax.numpy).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.paged_decode import (
    attend_units,
    default_units_per_block,
    paged_decode_attention_reference,
)
from pallas_kernels.rocket_score import (
    check_score_inputs,
    default_num_splits,
    group_mean_softmax,
    rocket_block_logits,
    rocket_block_scores_reference,
)

_LOG2E = math.log2(math.e)
_INF_BITS = 0x7F800000  # float32 +inf: above every probability's bit pattern


class RocketDecodeResult(NamedTuple):
  """out ``[batch, q_heads, D]`` (q.dtype); unit_ids ``int32[batch, kv_heads, k]``
  ascending, -1 padded (``k = min(topk, max_pages * blocks_per_page)``); kv_lens
  ``int32[batch, kv_heads]``; block_scores ``float32[batch, kv_heads, max_pages *
  blocks_per_page]``: the group-mean probabilities that were ranked, +inf for the newest
  block, -inf for invalid blocks."""
  out: jax.Array
  unit_ids: jax.Array
  kv_lens: jax.Array
  block_scores: jax.Array


def _select_attend_kernel(
    raw_ref,  # [G, T_pad] f32    scaled block logits (valid below n_valid)
    pt_ref,  # [max_pages]        page-table row
    len_ref,  # [1]               tokens stored (the decode token included)
    q_ref,  # [G, D]              the q heads of this group
    k_ref,  # [num_units, block_size, D]  the K pool of this kv head, one unit per block
    v_ref,  # [num_units, block_size, D]
    o_ref,  # [G, D]              output (q dtype)
    ids_ref,  # [ids_size] int32  selected unit ids, ascending, -1 padded
    kvlen_ref,  # [1] int32       valid tokens of the listed units
    bits_ref,  # [T_pad] int32    probability bit patterns (-1 = not a block)
    *,
    topk: int,
    blocks_per_page: int,
    chunk: int,
    radix_bits: int,
    units_per_block: int,
    qk_scale_log2: float,
    precision,
    interpret: bool,
):
  """One program = one (batch row, kv head): statistics, probabilities, radix select,
  ids, attention. Every loop runs over the valid blocks only (``n_valid``), in chunks of
  ``chunk`` blocks, so the page-table width costs nothing but the buffer sizes."""
  group = raw_ref.shape[0]
  block_size = k_ref.shape[1]
  total = pt_ref.shape[0] * blocks_per_page
  ids_size = ids_ref.shape[0]
  length = len_ref[0]
  n_valid = jnp.clip(pl.cdiv(length, block_size), 0, total)
  n_chunks = pl.cdiv(n_valid, chunk)
  lane = jnp.arange(chunk, dtype=jnp.int32)

  mean_probs = group_mean_softmax(raw_ref, n_valid, chunk)

  # Group-mean probabilities as int32 bit patterns: for floats >= 0 (and +inf) the
  # integer order is the float order; -1 marks blocks that cannot be selected.
  def probs(c, carry):
    t, acc = mean_probs(c)
    bits = jnp.where(t < n_valid, lax.bitcast_convert_type(acc, jnp.int32), -1)
    bits_ref[pl.ds(c * chunk, chunk)] = jnp.where(t == n_valid - 1, _INF_BITS, bits)
    return carry

  lax.fori_loop(0, n_chunks, probs, 0)
  _compat.cta_barrier(interpret)

  def load_bits(c):
    return _compat.reload(bits_ref, pl.ds(c * chunk, chunk), interpret=interpret)

  # Radix select of the k-th largest bit pattern, most significant digit first. Invariant:
  # `need` (>= 1 while k >= 1) of the blocks whose high bits equal `prefix` are still to
  # be taken, and every block above that prefix is taken.
  k = jnp.minimum(topk, n_valid)
  digits = jnp.arange(1 << radix_bits, dtype=jnp.int32)
  prefix, need = jnp.int32(0), k
  for shift in range(32 - radix_bits, -1, -radix_bits):
    high = shift + radix_bits

    def count(c, counts, shift=shift, high=high, prefix=prefix):
      bits = load_bits(c)
      match = bits >= 0
      if high < 32:
        match &= (bits >> high) == (prefix >> high)
      digit = (bits >> shift) & ((1 << radix_bits) - 1)
      at_least = match[:, None] & (digit[:, None] >= digits[None, :])
      return counts + at_least.astype(jnp.int32).sum(axis=0)

    counts = lax.fori_loop(0, n_chunks, count, jnp.zeros(digits.shape, jnp.int32))
    best = jnp.max(jnp.where(counts >= need, digits, 0))  # the k-th largest's digit
    need = need - jnp.sum(jnp.where(digits == best + 1, counts, 0))
    prefix = prefix | (best << shift)
  threshold = prefix  # bit pattern of the k-th largest; `need` of its ties are taken

  # Ids: blocks above the threshold, and the first `need` ties in block order, at their
  # rank among the selected (a prefix sum); the rest of the list is -1.
  slot = jnp.arange(ids_size, dtype=jnp.int32)
  _compat.store_slice(ids_ref, (slice(None),), jnp.full((ids_size,), -1, jnp.int32),
                      mask=slot >= k, interpret=interpret)

  def emit(c, carry):
    taken_before, ties_before = carry
    bits = load_bits(c)
    t = c * chunk + lane
    ok = bits >= 0
    tie = ok & (bits == threshold)
    tie_rank = ties_before + jnp.cumsum(tie.astype(jnp.int32))
    take = (ok & (bits > threshold)) | (tie & (tie_rank <= need))
    rank = taken_before + jnp.cumsum(take.astype(jnp.int32)) - 1
    page_index = jnp.minimum(t // blocks_per_page, pt_ref.shape[0] - 1)
    page = _compat.gather_load(pt_ref, page_index, mask=take, other=0, interpret=interpret)
    unit = page * blocks_per_page + t % blocks_per_page
    _compat.scatter_store(ids_ref, jnp.where(take, rank, 0), unit, mask=take,
                          interpret=interpret)
    return (taken_before + take.astype(jnp.int32).sum(),
            ties_before + tie.astype(jnp.int32).sum())

  lax.fori_loop(0, n_chunks, emit, (jnp.int32(0), jnp.int32(0)))
  # The newest block (always taken, and the last listed) is the only partial one.
  kv_len = jnp.where(k > 0, k * block_size - (n_valid * block_size - length), 0)
  kvlen_ref[...] = jnp.full((1,), kv_len, jnp.int32)
  _compat.cta_barrier(interpret)

  upb = units_per_block
  unit_index = jnp.arange(upb, dtype=jnp.int32)

  def load_ids(first_unit):
    ids = _compat.reload(ids_ref, pl.ds(first_unit, upb), interpret=interpret)
    return jnp.where(first_unit + unit_index < k, ids, -1)

  block_g = max(16, pl.next_power_of_2(group))
  o, _, l = attend_units(q_ref, k_ref, v_ref, load_ids, kv_len, jnp.int32(0), k,
                         block_g=block_g, units_per_block=upb,
                         qk_scale_log2=qk_scale_log2, precision=precision,
                         interpret=interpret)
  out = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
  rows = jnp.arange(block_g, dtype=jnp.int32)
  _compat.scatter_store(o_ref, jnp.minimum(rows, group - 1), out.astype(o_ref.dtype),
                        mask=(rows < group)[:, None], interpret=interpret)


def _select_attend_pallas(raw, page_table, lengths, q, k_units, v_units, *, topk,
                          blocks_per_page, chunk, radix_bits, units_per_block, scale,
                          num_warps, num_stages, interpret):
  batch, kv_heads, group, padded = raw.shape
  _, num_units, block_size, head_dim = k_units.shape
  max_pages = page_table.shape[1]
  ids_size = max(units_per_block, pl.next_power_of_2(topk + 1))  # room for -1 reads past k
  precision = (lax.Precision.HIGHEST if q.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  kernel = functools.partial(
      _select_attend_kernel, topk=topk, blocks_per_page=blocks_per_page, chunk=chunk,
      radix_bits=radix_bits, units_per_block=units_per_block,
      qk_scale_log2=float(scale) * _LOG2E, precision=precision, interpret=interpret)
  pool_spec = pl.BlockSpec((None, num_units, block_size, head_dim),
                           lambda b, g: (g, 0, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, group, padded), lambda b, g: (b, g, 0, 0)),
          pl.BlockSpec((None, max_pages), lambda b, g: (b, 0)),
          pl.BlockSpec((None, 1), lambda b, g: (b, 0)),
          pl.BlockSpec((None, None, group, head_dim), lambda b, g: (b, g, 0, 0)),
          pool_spec,
          pool_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, group, head_dim), lambda b, g: (b, g, 0, 0)),
          pl.BlockSpec((None, None, ids_size), lambda b, g: (b, g, 0)),
          pl.BlockSpec((None, None, 1), lambda b, g: (b, g, 0)),
          pl.BlockSpec((None, None, padded), lambda b, g: (b, g, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), q.dtype),
          jax.ShapeDtypeStruct((batch, kv_heads, ids_size), jnp.int32),
          jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
          jax.ShapeDtypeStruct((batch, kv_heads, padded), jnp.int32),
      ],
      compiler_params=_compat.compiler_params(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="rocket_select_attend",
  )(raw, page_table.astype(jnp.int32), lengths.astype(jnp.int32).reshape(batch, 1),
    q.reshape(batch, kv_heads, group, head_dim), k_units, v_units)


def _check_inputs(q, k_pages, v_pages, kt, page_table, lengths, topr, topk, block_size):
  if q.ndim != 3:
    raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
  check_score_inputs(q, kt, page_table, lengths, topr)
  kv_heads, num_pages, blocks_per_page = kt.shape[:3]
  head_dim = q.shape[-1]
  if k_pages.ndim != 4 or k_pages.shape[:2] != (kv_heads, num_pages) or (
      k_pages.shape[3] != head_dim):
    raise ValueError(
        f"k_pages must be [kv_heads={kv_heads}, num_pages={num_pages}, page_size,"
        f" head_dim={head_dim}], got shape {k_pages.shape}")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
  if k_pages.shape[2] != blocks_per_page * block_size:
    raise ValueError(
        f"page_size {k_pages.shape[2]} must equal blocks_per_page ({blocks_per_page}) x"
        f" block_size ({block_size})")
  if not isinstance(topk, int) or topk < 1:
    raise ValueError(f"topk must be a positive int, got {topk!r}")


@functools.partial(
    jax.jit,
    static_argnames=("topr", "topk", "block_size", "scale", "backend", "interpret",
                     "blocks_per_iter", "score_splits", "units_per_block", "chunk",
                     "radix_bits", "num_warps", "num_stages"),
)
def rocket_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kt: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    topr: int,
    topk: int,
    block_size: int,
    scale: float | None = None,
    backend: str = "pallas",
    interpret: bool | None = None,
    blocks_per_iter: int = 32,
    score_splits: int | None = None,
    units_per_block: int | None = None,
    chunk: int = 512,
    radix_bits: int = 4,
    num_warps: int = 4,
    num_stages: int = 2,
) -> RocketDecodeResult:
  """RocketKV decode attention of one token per row: KT scoring, top-k blocks, attention.

  Args:
    q: ``[batch, q_heads, head_dim]`` roped query of the decode token (bf16 or f32).
    k_pages, v_pages: ``[kv_heads, num_pages, page_size, head_dim]``: one layer's pools,
      the decode token's K/V already stored.
    kt: ``[kv_heads, num_pages, page_size // block_size, 2, head_dim]`` KT cache (per
      block the min and max of the keys), same page ids as the pools.
    page_table: ``int32[batch, max_pages]`` (-1 = none).
    lengths: ``int32[batch]`` tokens stored, the decode token included.
    topr: channels kept per kv head for scoring; topk: blocks attended per kv head.
    block_size: tokens per KT block (divides the page size).
    scale: logit scale, default ``head_dim ** -0.5``.
    backend: ``"pallas"`` (two kernels) or ``"reference"`` (plain XLA).
    interpret: Pallas interpret mode; None = when the default backend is the CPU.
    blocks_per_iter, score_splits: the scoring kernel's blocks per iteration and
      programs per (row, kv head).
    units_per_block: blocks gathered per attention iteration (default about 64 tokens).
    chunk: blocks per selection-loop iteration (power of two).
    radix_bits: bits decided per radix pass (1, 2, 4 or 8).
    num_warps, num_stages: Triton compiler parameters of both kernels.

  Returns:
    :class:`RocketDecodeResult`. A row of length 0 gives an output of exactly 0.
  """
  _check_inputs(q, k_pages, v_pages, kt, page_table, lengths, topr, topk, block_size)
  head_dim = q.shape[-1]
  if scale is None:
    scale = head_dim ** -0.5
  kwargs = dict(topr=topr, topk=topk, block_size=block_size, scale=scale)
  if backend == "reference":
    return rocket_decode_attention_reference(q, k_pages, v_pages, kt, page_table, lengths,
                                             **kwargs)
  if backend != "pallas":
    raise ValueError(f"backend must be 'pallas' or 'reference', got {backend!r}")
  if radix_bits not in (1, 2, 4, 8):
    raise ValueError(f"radix_bits must be 1, 2, 4 or 8, got {radix_bits}")
  if chunk < 16 or chunk & (chunk - 1):
    raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
  if blocks_per_iter < 1 or blocks_per_iter & (blocks_per_iter - 1):
    raise ValueError(f"blocks_per_iter must be a power of two, got {blocks_per_iter}")
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
  if block_size & (block_size - 1):
    raise ValueError(f"block_size must be a power of two, got {block_size}")
  if units_per_block is None:
    units_per_block = default_units_per_block(block_size)
  if units_per_block & (units_per_block - 1) or units_per_block * block_size < 16:
    raise ValueError(
        "units_per_block must be a power of two with units_per_block * block_size >= 16,"
        f" got {units_per_block}")

  batch = q.shape[0]
  kv_heads, num_pages, blocks_per_page = kt.shape[:3]
  total = page_table.shape[1] * blocks_per_page
  width = min(topk, total)
  if score_splits is None:
    score_splits = default_num_splits(batch, kv_heads, total, blocks_per_iter)
  interpret = _compat.resolve_interpret(interpret)
  lengths = lengths.astype(jnp.int32)
  raw = rocket_block_logits(
      q, kt, page_table, pl.cdiv(lengths, block_size), topr=topr, scale=scale,
      num_splits=score_splits, blocks_per_iter=blocks_per_iter, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, pad_multiple=chunk)
  shape = (kv_heads, num_pages * blocks_per_page, block_size, head_dim)
  out, ids, kv_lens, bits = _select_attend_pallas(
      raw, page_table, lengths, q, k_pages.reshape(shape), v_pages.reshape(shape),
      topk=width, blocks_per_page=blocks_per_page, chunk=chunk, radix_bits=radix_bits,
      units_per_block=units_per_block, scale=scale, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret)
  bits = bits[..., :total]
  scores = jnp.where(bits < 0, -jnp.inf, lax.bitcast_convert_type(bits, jnp.float32))
  n_valid = pl.cdiv(lengths, block_size)
  scores = jnp.where(jnp.arange(total)[None, None, :] < n_valid[:, None, None], scores,
                     -jnp.inf)
  return RocketDecodeResult(out.reshape(q.shape), ids[..., :width], kv_lens[..., 0],
                            scores)


@functools.partial(jax.jit, static_argnames=("topr", "topk", "block_size", "scale"))
def rocket_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kt: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    topr: int,
    topk: int,
    block_size: int,
    scale: float | None = None,
) -> RocketDecodeResult:
  """Plain-XLA reference of :func:`rocket_decode_attention` (same shapes and contract),
  composed as the unfused path does it: scores, ``lax.top_k`` (ties to the lower index),
  a sort, the unit mapping, then gathered attention."""
  _check_inputs(q, k_pages, v_pages, kt, page_table, lengths, topr, topk, block_size)
  kv_heads, num_pages, blocks_per_page = kt.shape[:3]
  head_dim = q.shape[-1]
  if scale is None:
    scale = head_dim ** -0.5
  scores = rocket_block_scores_reference(q, kt, page_table, lengths, topr=topr,
                                         block_size=block_size, scale=scale)
  total = scores.shape[-1]
  n_valid = (lengths + block_size - 1) // block_size
  newest = jnp.arange(total)[None, None, :] == (n_valid - 1)[:, None, None]
  scores = jnp.where(newest, jnp.inf, scores)
  values, blocks = lax.top_k(scores, min(topk, total))
  blocks = jnp.where(jnp.isneginf(values), total, blocks)
  blocks = jnp.sort(blocks, axis=-1)  # ascending, the padding (total) last
  taken = blocks < total
  safe = jnp.where(taken, blocks, 0)
  page = jnp.take_along_axis(page_table[:, None, :], safe // blocks_per_page, axis=-1)
  unit_ids = jnp.where(taken, page * blocks_per_page + safe % blocks_per_page, -1)
  tokens = jnp.clip(lengths[:, None, None] - safe * block_size, 0, block_size)
  kv_lens = jnp.sum(jnp.where(taken, tokens, 0), axis=-1).astype(jnp.int32)
  shape = (kv_heads, num_pages * blocks_per_page, block_size, head_dim)
  out = paged_decode_attention_reference(q, k_pages.reshape(shape), v_pages.reshape(shape),
                                         unit_ids.astype(jnp.int32), kv_lens, scale=scale)
  return RocketDecodeResult(out, unit_ids.astype(jnp.int32), kv_lens, scores)
