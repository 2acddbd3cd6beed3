"""DSA lightning-indexer scores of decode queries over the paged indexer-key cache.

    dsa_indexer_scores(q [B, H, D], w float32[B, H], k_pool [num_pages, page_size, D],
                       k_scale_pool float32[num_pages, page_size, D // 128] | None,
                       page_table int32[B, max_pages], lengths int32[B]) -> float32[B, N]

    I[b, s] = sum_h w[b, h] * ReLU(q[b, h] . k[b, s])      for s < lengths[b], else -inf

with N = max_pages * page_size, k[b, s] the key of logical token s of row b (page
page_table[b, s // page_size], offset s % page_size), dequantized as k_q * scale per block
of 128 channels when the pool is FP8. (The caller folds the indexer's scalings into w; see
sparse_jax/algorithms/dsa.py.)

Kernel: grid (row, token span); each program keeps q [H, D] resident and walks its span in
blocks of `block` tokens: gather the block's keys through the page table (each cached key
is read once), scores [block, H] = k @ q^T on the tensor cores (FP8 keys are widened to q's
dtype; one scale per 128-channel block multiplies that block's partial product), ReLU,
weighted sum over heads. Blocks past the row's length are not read. Optionally the program
also histograms its scores' top radix digit for dsa_topk (whose first pass this replaces).
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _compat
from pallas_kernels.common import check_backend
from pallas_kernels.dsa_topk import digit_histogram, first_pass_histograms, order_key

FP8_BLOCK = 128


def gather_rows(ref, rows, col_start, width, ok):
  """ref[rows, col_start:col_start + width] for int32[block] rows; rows not ok are not read
  and hold garbage (the caller masks their scores).

  All-array indices (not a row array plus a slice): Triton lowers both, interpret mode only
  these. No `other=`: Triton cannot splat a fill value into float8.
  """
  cols = col_start + jnp.arange(width, dtype=jnp.int32)
  mask = jnp.broadcast_to(ok[:, None], (rows.shape[0], width))
  return plt.load(ref.at[rows[:, None], cols[None, :]], mask=mask)


def _kernel(q_ref, w_ref, k_ref, scale_ref, pt_ref, len_ref, o_ref, hist_ref, *, page_size, n_tokens,
            span, block, n_scale_blocks):
  """hist_ref (or None): int32[B, spans, 16, 16], this program's pass-1 histogram at [row, p]
  (plain stores, no atomics; dsa_topk adds the parts up)."""
  row, p = pl.program_id(0), pl.program_id(1)
  heads_pad, dim = q_ref.shape[1], q_ref.shape[2]
  chunk = dim // n_scale_blocks
  # q [Hp, D] resident for the whole span, one tile per scale block (no in-register slicing).
  q = [q_ref[row, :, pl.ds(j * chunk, chunk)] for j in range(n_scale_blocks)]
  w = w_ref[row]                                      # [Hp] (zero for padded heads)
  length = len_ref[row]
  max_pages = pt_ref.shape[1]

  def pages_of(i):
    tok = p * span + i * block + jnp.arange(block, dtype=jnp.int32)
    return plt.load(pt_ref.at[row, jnp.clip(tok // page_size, 0, max_pages - 1)], mask=tok < length, other=-1)

  def body(i, carry):
    # `page` (this block's page ids) was loaded one step ahead: the key gather never waits on it.
    page, hist = carry
    start = p * span + i * block
    tok = start + jnp.arange(block, dtype=jnp.int32)
    next_page = pages_of(i + 1)

    def compute():
      ok = (tok < length) & (page >= 0)
      slot = jnp.maximum(page, 0) * page_size + tok % page_size
      # Tokens are the matmul rows and heads its columns, so the weighted sum over heads below
      # reduces along the fast axis (within a thread and its quad, no cross-warp exchange).
      scores = jnp.zeros((block, heads_pad), jnp.float32)
      for j in range(n_scale_blocks):
        kq = gather_rows(k_ref, slot, j * chunk, chunk, ok)                                   # [block, chunk]
        part = jax.lax.dot_general(kq.astype(q[j].dtype), q[j], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32,                       # [block, Hp]
                                   precision=jax.lax.Precision.HIGHEST if q[j].dtype == jnp.float32 else None)
        if scale_ref is not None:
          s = plt.load(scale_ref.at[slot, j], mask=ok, other=0.0)                              # [block]
          part = part * s[:, None]
        scores = scores + part
      total = jnp.sum(jnp.maximum(scores, 0.0) * w[None, :], axis=1)
      return jnp.where(ok, total, -jnp.inf)

    vals = jax.lax.cond(start < length, compute, lambda: jnp.full((block,), -jnp.inf, jnp.float32))
    plt.store(o_ref.at[row, pl.ds(start, block)], vals, mask=tok < n_tokens)
    if hist_ref is not None:   # dsa_topk's first radix pass, on the scores while they are here
      hist = hist + digit_histogram(order_key(vals), vals > -jnp.inf, 1)
    return next_page, hist

  _, hist = jax.lax.fori_loop(0, span // block, body, (pages_of(0), jnp.zeros((16, 16), jnp.float32)))
  if hist_ref is not None:
    hist_ref[row, p] = hist.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("interpret", "block", "span", "num_warps", "num_stages",
                                             "topk_histograms"))
def _pallas(q, w, k_pool, k_scale_pool, page_table, lengths, *, interpret, block, span, num_warps, num_stages,
            topk_histograms):
  batch, heads, dim = q.shape
  num_pages, page_size, _ = k_pool.shape
  n_tokens = page_table.shape[1] * page_size
  block = min(block, pl.next_power_of_2(n_tokens))
  span = max(block, min(span, pl.next_power_of_2(n_tokens)))
  k_flat = k_pool.reshape(num_pages * page_size, dim)
  scale_flat = None if k_scale_pool is None else k_scale_pool.reshape(num_pages * page_size, -1)
  n_scale_blocks = 1 if k_scale_pool is None else k_scale_pool.shape[-1]
  heads_pad = max(16, pl.next_power_of_2(heads))    # a tensor-core tile needs >= 16 rows
  q = jnp.pad(q, ((0, 0), (0, heads_pad - heads), (0, 0)))
  w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, heads_pad - heads)))
  kernel = functools.partial(_kernel, page_size=page_size, n_tokens=n_tokens, span=span, block=block,
                             n_scale_blocks=n_scale_blocks)
  scores = jax.ShapeDtypeStruct((batch, n_tokens), jnp.float32)
  args = (q, w, k_flat, scale_flat, page_table, lengths.astype(jnp.int32))
  spans = pl.cdiv(n_tokens, span)
  call = functools.partial(pl.pallas_call, grid=(batch, spans), interpret=interpret,
                           compiler_params=_compat.compiler_params(num_warps=num_warps, num_stages=num_stages),
                           name="dsa_indexer_scores")
  if not topk_histograms:
    return call(lambda *refs: kernel(*refs, None), out_shape=scores)(*args)
  return call(kernel, out_shape=(scores, jax.ShapeDtypeStruct((batch, spans, 16, 16), jnp.int32)))(*args)


def _check(q, w, k_pool, k_scale_pool, page_table, lengths):
  batch, heads, dim = q.shape
  chex.assert_shape(w, (batch, heads))
  chex.assert_shape(k_pool, (None, None, dim))
  chex.assert_shape(page_table, (batch, None))
  chex.assert_shape(lengths, (batch,))
  if k_scale_pool is not None:
    chex.assert_shape(k_scale_pool, (*k_pool.shape[:2], max(1, dim // FP8_BLOCK)))
  elif k_pool.dtype == jnp.float8_e4m3fn:
    raise ValueError("an FP8 indexer key pool needs k_scale_pool")


def dsa_indexer_scores(q: jax.Array, w: jax.Array, k_pool: jax.Array, k_scale_pool: jax.Array | None,
                       page_table: jax.Array, lengths: jax.Array, *, topk_histograms: bool = False,
                       backend: str = "pallas", interpret: bool | None = None, block: int = 64, span: int = 1024,
                       num_warps: int = 4, num_stages: int = 2):
  """Indexer scores float32[B, max_pages * page_size] (-inf at and past each row's length).

  topk_histograms: also return dsa_topk's first radix pass, done on the scores as they are
    computed: int32[B, spans, 16, 16], one partial histogram per program (pass them as
    dsa_topk(histograms=), which adds them up in its own kernel).
  backend: "pallas" or "reference"; interpret: None = interpret mode only off-GPU.
  block: tokens per inner step; span: tokens per program (powers of two).
  """
  check_backend(backend)
  _check(q, w, k_pool, k_scale_pool, page_table, lengths)
  if backend == "reference":
    return dsa_indexer_scores_reference(q, w, k_pool, k_scale_pool, page_table, lengths,
                                        topk_histograms=topk_histograms)
  interpret = _compat.resolve_interpret(interpret)
  return _pallas(q, w, k_pool, k_scale_pool, page_table, lengths, interpret=interpret, block=block, span=span,
                 num_warps=num_warps, num_stages=num_stages, topk_histograms=topk_histograms)


def dsa_indexer_scores_reference(q: jax.Array, w: jax.Array, k_pool: jax.Array, k_scale_pool: jax.Array | None,
                                 page_table: jax.Array, lengths: jax.Array, *, topk_histograms: bool = False,
                                 backend: str = "reference", interpret: bool | None = None, block: int = 64,
                                 span: int = 1024, num_warps: int = 4, num_stages: int = 2):
  """Plain jnp: gather every row's keys through the page table, dequantize, score."""
  del backend, interpret, block, span, num_warps, num_stages
  _check(q, w, k_pool, k_scale_pool, page_table, lengths)
  batch, max_pages = page_table.shape
  page_size, dim = k_pool.shape[1], k_pool.shape[2]
  pages = jnp.clip(page_table, 0)
  keys = k_pool[pages].reshape(batch, max_pages * page_size, dim).astype(jnp.float32)
  if k_scale_pool is not None:
    nb = k_scale_pool.shape[-1]
    scales = k_scale_pool[pages].reshape(batch, max_pages * page_size, nb)
    keys = (keys.reshape(batch, -1, nb, dim // nb) * scales[..., None]).reshape(keys.shape)
  dots = jnp.einsum("bhd,bsd->bhs", q.astype(jnp.float32), keys, precision=jax.lax.Precision.HIGHEST)
  scores = jnp.einsum("bh,bhs->bs", w.astype(jnp.float32), jax.nn.relu(dots), precision=jax.lax.Precision.HIGHEST)
  tok = jnp.arange(max_pages * page_size)
  ok = (tok[None, :] < lengths[:, None]) & (jnp.repeat(page_table, page_size, axis=1) >= 0)
  scores = jnp.where(ok, scores, -jnp.inf)
  return (scores, first_pass_histograms(scores)) if topk_histograms else scores
