"""Paged / block-sparse decode attention: one query token per sequence, keys and values
gathered from a paged KV pool at "unit" granularity (flash-decoding, split-K over units).

A *unit* is a gather granule of ``unit_size`` consecutive tokens of one page. The caller
views its pool ``[kv_heads, num_pages, page_size, D]`` as
``[kv_heads, num_pages * page_size // unit_size, unit_size, D]`` (a free reshape), so one
kernel serves dense paged decode (units = pages, every page listed), page-sparse decode and
block-sparse decode at a finer granularity (RocketKV: 4-token blocks inside 16/32-token
pages, ``unit_size=4``).

Layout of the file: kernel body, ``pallas_call`` launcher, public jitted function,
``paged_decode_attention_reference`` (plain jax.numpy).
"""

from __future__ import annotations

import functools
import math

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.common import MASK_VALUE, is_power_of_two, pow2_at_most

_LOG2E = math.log2(math.e)


def attend_units(q_ref, k_ref, v_ref, load_ids, kv_len, start, end, *, block_g,
                 units_per_block, qk_scale_log2, precision, interpret):
  """Online softmax (log2 domain) of a GQA group over listed units ``[start, end)``.

  ``q_ref [group, D]``; ``k_ref``, ``v_ref [num_units, unit_size, D]``; ``load_ids(first)``
  returns the ``units_per_block`` unit ids listed from position ``first`` (-1 = none).
  Token j of the concatenation of the listed units is valid iff ``j < kv_len`` and its
  unit id is >= 0. Masked tokens are never loaded on the GPU (masked gather); their ids
  are clamped to 0 so no -1 is ever dereferenced. The group's q rows are padded to
  ``block_g`` (>= 16, as tl.dot needs) in registers, not in memory.

  Returns unnormalised ``o [block_g, D]`` f32, running max ``m [block_g]`` (log2 domain)
  and sum ``l [block_g]``; rows >= group are zero.
  """
  group, head_dim = q_ref.shape
  unit_size = k_ref.shape[1]
  upb = units_per_block
  block_tokens = upb * unit_size
  num_iters = pl.cdiv(jnp.maximum(end - start, 0), upb)

  rows = jnp.arange(block_g, dtype=jnp.int32)
  real_row = rows < group
  q = q_ref[jnp.minimum(rows, group - 1)]  # [block_g, D]: rows >= group repeat the last
  q = jnp.where(real_row[:, None], q, jnp.zeros((), q.dtype))

  def body(i, carry):
    o_prev, m_prev, l_prev = carry
    first_unit = start + i * upb
    ids = load_ids(first_unit)  # [upb]
    unit_ok = ids >= 0
    safe_ids = jnp.where(unit_ok, ids, 0)
    token = (first_unit + jnp.arange(upb, dtype=jnp.int32))[:, None] * unit_size + (
        jnp.arange(unit_size, dtype=jnp.int32)[None, :]
    )  # [upb, unit_size] logical token index
    token_ok = (token < kv_len) & unit_ok[:, None]
    load_mask = token_ok[:, :, None]
    k = _compat.gather_load(
        k_ref, safe_ids, mask=load_mask, other=0, interpret=interpret
    ).reshape(block_tokens, head_dim)
    v = _compat.gather_load(
        v_ref, safe_ids, mask=load_mask, other=0, interpret=interpret
    ).reshape(block_tokens, head_dim)
    ok = token_ok.reshape(block_tokens)[None, :]  # [1, block_tokens]

    s = _compat.dot(q, k, trans_b=True, precision=precision) * qk_scale_log2
    s = jnp.where(ok, s, MASK_VALUE)  # [block_g, block_tokens] f32
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.where(ok, jnp.exp2(s - m_next[:, None]), 0.0)
    l_next = correction * l_prev + p.sum(axis=1)
    o_next = correction[:, None] * o_prev + _compat.dot(
        p.astype(v.dtype), v, precision=precision
    )
    return o_next, m_next, l_next

  o0 = jnp.zeros((block_g, head_dim), jnp.float32)
  m0 = jnp.full((block_g,), MASK_VALUE, jnp.float32)
  l0 = jnp.zeros((block_g,), jnp.float32)
  return lax.fori_loop(0, num_iters, body, (o0, m0, l0))


def _paged_decode_kernel(
    q_ref,  # [group, D]               the q heads of one GQA group
    k_ref,  # [num_units, unit_size, D]  the K pool of this kv head
    v_ref,  # [num_units, unit_size, D]
    ids_ref,  # [max_units]            unit ids of this (batch, kv head), -1 padded
    len_ref,  # [1]                    kv_len of this (batch, kv head)
    o_ref,  # [block_g, D] f32        unnormalised output of this split (rows < group)
    m_ref,  # [block_g] f32           running max (log2 domain) of this split
    l_ref,  # [block_g] f32           running sum of exp2(logit - m)
    *,
    num_splits: int,
    units_per_block: int,
    qk_scale_log2: float,
    precision,
    interpret: bool,
):
  """One program = one (batch row, kv head, split); :func:`attend_units` does the work.

  The split owns units ``[split * per, min((split + 1) * per, n_units))`` where
  ``n_units = ceil(kv_len / unit_size)`` and ``per = ceil(n_units / num_splits)`` rounded
  up to whole iterations: the work is balanced on the *actual* length, and a split whose
  range is empty runs zero iterations (no K/V loads). Each iteration gathers
  ``units_per_block`` units (``units_per_block * unit_size`` tokens) of K and V. Only
  the ``group`` real rows of the partial results are stored.
  """
  split = pl.program_id(2)
  group = q_ref.shape[0]
  block_g = o_ref.shape[0]
  unit_size = k_ref.shape[1]
  max_units = ids_ref.shape[0]
  upb = units_per_block

  kv_len = len_ref[0]
  n_units = jnp.clip(pl.cdiv(kv_len, unit_size), 0, max_units)
  per_split = pl.cdiv(pl.cdiv(n_units, num_splits), upb) * upb
  start = split * per_split
  end = jnp.minimum(start + per_split, n_units)
  unit_index = jnp.arange(upb, dtype=jnp.int32)

  def load_ids(first_unit):
    return _compat.slice_load(ids_ref, pl.ds(first_unit, upb),
                              mask=first_unit + unit_index < max_units, other=-1,
                              interpret=interpret)

  o, m, l = attend_units(q_ref, k_ref, v_ref, load_ids, kv_len, start, end,
                         block_g=block_g, units_per_block=upb,
                         qk_scale_log2=qk_scale_log2, precision=precision,
                         interpret=interpret)
  real_row = jnp.arange(block_g, dtype=jnp.int32) < group
  everything = (slice(None),)
  _compat.store_slice(o_ref, everything * 2, o,
                      mask=jnp.broadcast_to(real_row[:, None], o.shape), interpret=interpret)
  _compat.store_slice(m_ref, everything, m, mask=real_row, interpret=interpret)
  _compat.store_slice(l_ref, everything, l, mask=real_row, interpret=interpret)


def _paged_decode_pallas(
    q, k_pages, v_pages, unit_ids, kv_lens, *, scale, units_per_block, num_splits,
    num_warps, num_stages, interpret,
):
  batch, q_heads, head_dim = q.shape
  kv_heads, num_units, unit_size, _ = k_pages.shape
  max_units = unit_ids.shape[-1]
  group = q_heads // kv_heads
  block_g = max(16, pl.next_power_of_2(group))  # tl.dot needs M >= 16

  q_grouped = q.reshape(batch, kv_heads, group, head_dim)  # free: no padding copy
  ids = unit_ids.astype(jnp.int32)
  lens = kv_lens.astype(jnp.int32).reshape(batch, kv_heads, 1)

  precision = (lax.Precision.HIGHEST if q.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  kernel = functools.partial(
      _paged_decode_kernel,
      num_splits=num_splits,
      units_per_block=units_per_block,
      qk_scale_log2=float(scale) * _LOG2E,
      precision=precision,
      interpret=interpret,
  )
  pool_spec = pl.BlockSpec(
      (None, num_units, unit_size, head_dim), lambda b, h, s: (h, 0, 0, 0)
  )
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
          pool_spec,
          pool_spec,
          pl.BlockSpec((None, None, max_units), lambda b, h, s: (b, h, 0)),
          pl.BlockSpec((None, None, 1), lambda b, h, s: (b, h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_g, head_dim),
                       lambda b, h, s: (s, b, h, 0, 0)),
          pl.BlockSpec((None, None, None, block_g), lambda b, h, s: (s, b, h, 0)),
          pl.BlockSpec((None, None, None, block_g), lambda b, h, s: (s, b, h, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((num_splits, batch, kv_heads, block_g, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((num_splits, batch, kv_heads, block_g), jnp.float32),
          jax.ShapeDtypeStruct((num_splits, batch, kv_heads, block_g), jnp.float32),
      ],
      compiler_params=_compat.compiler_params(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="paged_decode_attention",
  )(q_grouped, k_pages, v_pages, ids, lens)

  # Merge the splits (log-sum-exp in the log2 domain). A split that saw no token has
  # m = NEG, l = 0 and gets weight 0 (or weight 1 with l = 0 when every split is empty).
  # Rows >= group were never written: slice them off first (XLA fuses the slice).
  o, m, l = o[..., :group, :], m[..., :group], l[..., :group]
  m_max = m.max(axis=0)
  weight = jnp.exp2(m - m_max[None])
  l_total = (weight * l).sum(axis=0)
  o_total = (weight[..., None] * o).sum(axis=0)
  has_tokens = l_total > 0
  out = jnp.where(
      has_tokens[..., None],
      o_total / jnp.where(has_tokens, l_total, 1.0)[..., None],
      0.0,
  )
  return out.reshape(batch, q_heads, head_dim).astype(q.dtype)


def default_units_per_block(unit_size: int) -> int:
  """About 64 tokens per iteration, and at least 16 (tl.dot needs N >= 16)."""
  return max(1, 64 // unit_size, pl.cdiv(16, unit_size))


def default_num_splits(batch: int, kv_heads: int, max_units: int,
                       units_per_block: int, core_count: int | None = None) -> int:
  """Split-K factor: about 4 programs per SM, but at least 2 iterations per split at full
  capacity; a power of two (at most 64).

  batch 8 x kv 8 on 132 SMs: 8 splits (512 programs). batch 1: up to 64 splits.
  """
  if core_count is None:
    core_count = _compat.device_core_count()
  iterations = pl.cdiv(max_units, units_per_block)
  want = pl.cdiv(4 * core_count, batch * kv_heads)
  splits = max(1, min(want, iterations // 2, 64))
  return pow2_at_most(splits)


def check_decode_inputs(q, k_pages, v_pages, unit_ids, kv_lens):
  if q.ndim != 3:
    raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
  if k_pages.ndim != 4:
    raise ValueError(
        "k_pages must be [kv_heads, num_units, unit_size, head_dim], got shape"
        f" {k_pages.shape}")
  if v_pages.shape != k_pages.shape:
    raise ValueError(
        f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
  batch, q_heads, head_dim = q.shape
  kv_heads, _, _, kv_head_dim = k_pages.shape
  if kv_head_dim != head_dim:
    raise ValueError(
        f"k_pages head_dim {kv_head_dim} must equal q head_dim {head_dim}")
  if q_heads % kv_heads:
    raise ValueError(
        f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
  if unit_ids.ndim != 3 or unit_ids.shape[:2] != (batch, kv_heads):
    raise ValueError(
        f"unit_ids must be [batch={batch}, kv_heads={kv_heads}, max_units], got"
        f" shape {unit_ids.shape}")
  if not jnp.issubdtype(unit_ids.dtype, jnp.integer):
    raise ValueError(f"unit_ids must be int32, got {unit_ids.dtype}")
  if kv_lens.shape != (batch, kv_heads):
    raise ValueError(
        f"kv_lens must be [batch={batch}, kv_heads={kv_heads}], got shape"
        f" {kv_lens.shape}")
  if not jnp.issubdtype(kv_lens.dtype, jnp.integer):
    raise ValueError(f"kv_lens must be int32, got {kv_lens.dtype}")
  chex.assert_shape(unit_ids, (batch, kv_heads, None))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "backend", "interpret", "units_per_block", "num_splits",
                     "num_warps", "num_stages"),
)
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    unit_ids: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float | None = None,
    backend: str = "pallas",
    interpret: bool | None = None,
    units_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
  """Decode attention over gathered units of a paged KV pool (GQA, split-K).

  Args:
    q: ``[batch, q_heads, head_dim]`` (bf16 or f32), one query token per row.
    k_pages: ``[kv_heads, num_units, unit_size, head_dim]``: the K pool of one layer,
      viewed at gather granularity.
    v_pages: same shape as ``k_pages``.
    unit_ids: ``int32[batch, kv_heads, max_units]``: physical unit ids per kv head in
      logical (ascending position) order, -1 padded at the end.
    kv_lens: ``int32[batch, kv_heads]``: valid tokens of the concatenation of the listed
      units (token t is valid iff t < kv_len; only the last listed unit may be partial).
      0 gives an output of exactly 0.
    scale: logit scale, default ``head_dim ** -0.5``.
    backend: ``"pallas"`` (Triton kernel) or ``"reference"`` (plain XLA).
    interpret: run the Pallas kernel in interpret mode; None = when the default backend
      is the CPU.
    units_per_block: units gathered per loop iteration (``units_per_block * unit_size``
      tokens, a power of two >= 16); default about 64 tokens.
    num_splits: split-K programs per (batch, kv head); default fills the SMs.
    num_warps, num_stages: Triton compiler parameters.

  Returns:
    ``[batch, q_heads, head_dim]`` in ``q.dtype``; q head h attends with kv head
    ``h // (q_heads // kv_heads)``.
  """
  check_decode_inputs(q, k_pages, v_pages, unit_ids, kv_lens)
  head_dim = q.shape[-1]
  if scale is None:
    scale = head_dim ** -0.5
  if backend == "reference":
    return paged_decode_attention_reference(q, k_pages, v_pages, unit_ids, kv_lens,
                                            scale=scale)
  if backend != "pallas":
    raise ValueError(f"backend must be 'pallas' or 'reference', got {backend!r}")

  batch = q.shape[0]
  kv_heads, _, unit_size, _ = k_pages.shape
  if not is_power_of_two(unit_size):
    raise ValueError(f"unit_size (k_pages.shape[2]) must be a power of two, got {unit_size}")
  if not is_power_of_two(head_dim) or head_dim < 16:
    raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
  if units_per_block is None:
    units_per_block = default_units_per_block(unit_size)
  block_tokens = units_per_block * unit_size
  if not is_power_of_two(units_per_block) or block_tokens < 16:
    raise ValueError(
        "units_per_block must be a power of two with units_per_block * unit_size >= 16,"
        f" got units_per_block={units_per_block}, unit_size={unit_size}")
  if num_splits is None:
    num_splits = default_num_splits(batch, kv_heads, unit_ids.shape[-1],
                                    units_per_block)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  return _paged_decode_pallas(
      q, k_pages, v_pages, unit_ids, kv_lens, scale=scale,
      units_per_block=units_per_block, num_splits=num_splits, num_warps=num_warps,
      num_stages=num_stages, interpret=_compat.resolve_interpret(interpret),
  )


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    unit_ids: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
  """Plain-XLA reference of :func:`paged_decode_attention` (same shapes and contract):
  gathers the listed units into ``[batch, kv_heads, max_units * unit_size, D]``, masks,
  softmax in f32."""
  check_decode_inputs(q, k_pages, v_pages, unit_ids, kv_lens)
  batch, q_heads, head_dim = q.shape
  kv_heads, _, unit_size, _ = k_pages.shape
  max_units = unit_ids.shape[-1]
  group = q_heads // kv_heads
  if scale is None:
    scale = head_dim ** -0.5

  safe_ids = jnp.maximum(unit_ids, 0)
  head = jnp.arange(kv_heads)[None, :, None]
  k = k_pages[head, safe_ids].reshape(batch, kv_heads, max_units * unit_size, head_dim)
  v = v_pages[head, safe_ids].reshape(batch, kv_heads, max_units * unit_size, head_dim)
  token = jnp.arange(max_units * unit_size)
  valid = (token[None, None, :] < kv_lens[:, :, None]) & jnp.repeat(
      unit_ids >= 0, unit_size, axis=-1)  # [batch, kv_heads, tokens]

  qg = q.reshape(batch, kv_heads, group, head_dim)
  logits = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * scale
  logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
  m = logits.max(axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)  # exactly 0 where masked
  l = p.sum(axis=-1, keepdims=True)
  v = jnp.where(valid[..., None], v, jnp.zeros((), v.dtype))  # unlisted memory may be NaN
  o = jnp.einsum("bhgt,bhtd->bhgd", p, v, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST)
  o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
  return o.reshape(batch, q_heads, head_dim).astype(q.dtype)
