"""Token-sparse MLA decode in absorbed form (DSA's attention; dense when given every token).

    sparse_mla_decode(q [B, H, R + r], latent_pool [num_pages, page_size, R],
                      rope_pool [num_pages, page_size, r], page_table int32[B, max_pages],
                      token_ids int32[B, K], scale) -> [B, H, R]

    out[b, h] = sum_j softmax_j(scale * q[b, h] . [c_j, kr_j]) c_j

over the valid ids j of row b (ascending, -1 padded after them): c_j / kr_j are the latent /
rope key of logical token j, stored at page page_table[b, j // page_size], offset
j % page_size. All heads share the latent, so it is both key (with the rope part) and value.
A row with no valid id outputs zeros.

Kernel: flash-decoding. Grid (row, split, head block): each program takes a contiguous share
of the row's ids, gathers `block_k` tokens' latent and rope rows at a time through the page
table, and runs an online softmax with q [block_h, R + r] resident; partial outputs and
log-sum-exps of the splits are merged in plain XLA. The head block is the fastest grid axis,
so the programs reading the same tokens run together and share them through L2.
`sparse_mla_prefill` reuses `attend_tokens` with one query token per program.
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



def gather_rows_zeroed(ref, rows, width, ok):
  """ref[rows, :width] for int32[n] rows, zero where not ok (all-array indices: see dsa_indexer)."""
  cols = jnp.arange(width, dtype=jnp.int32)
  mask = jnp.broadcast_to(ok[:, None], (rows.shape[0], width))
  return plt.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0)


def softmax_step(q_lat, q_rope, lat, kr, ok, carry, scale):
  """One online-softmax step of q_lat [bh, R] / q_rope [bh, r] over a block of tokens' latents
  lat [bk, R] and rope keys kr [bk, r] (zero where not ok: bool[bk]).

  carry = (acc float32[bh, R] unnormalised, m float32[bh] running max, l float32[bh] sum);
  returns the updated carry. The latent is both the key (with the rope part) and the value.
  """
  acc, m, l = carry
  hp = jax.lax.Precision.HIGHEST if lat.dtype == jnp.float32 else None   # float32 in float32, not TF32
  s = jax.lax.dot_general(q_lat, lat, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=hp)
  s = s + jax.lax.dot_general(q_rope, kr, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                              precision=hp)
  s = jnp.where(ok[None, :], s * scale, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)            # all-masked so far: keep exp finite
  p = jnp.exp(s - m_safe[:, None])
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=1)
  acc = alpha[:, None] * acc + jax.lax.dot(p.astype(lat.dtype), lat, preferred_element_type=jnp.float32,
                                           precision=hp)
  return acc, m_new, l


def attend_tokens(q_lat, q_rope, lat_ref, rope_ref, ids_ref, pt_ref, *, ids_row, pt_row, start, stop, block_k,
                  page_size, scale):
  """Online-softmax attention of q_lat [bh, R] / q_rope [bh, r] over ids_ref[ids_row, start:stop].

  Returns (acc float32[bh, R] unnormalised, m float32[bh] running max, l float32[bh] sum).
  Each step already holds its tokens' pool slots and looks up the next step's (id, then page
  table) while its own latents load: the gather never waits on the two index loads.
  """
  block_h, rank = q_lat.shape
  rope_dim = q_rope.shape[1]
  max_pages = pt_ref.shape[1]
  n_ids = ids_ref.shape[1]

  def slots_of(i):
    pos = start + i * block_k + jnp.arange(block_k, dtype=jnp.int32)
    in_range = (pos < stop) & (pos < n_ids)
    tok = plt.load(ids_ref.at[ids_row, jnp.clip(pos, 0, n_ids - 1)], mask=in_range, other=-1)
    ok = tok >= 0
    page = plt.load(pt_ref.at[pt_row, jnp.clip(tok // page_size, 0, max_pages - 1)], mask=ok, other=0)
    ok = ok & (page >= 0)
    return jnp.maximum(page, 0) * page_size + jnp.maximum(tok, 0) % page_size, ok

  def body(i, carry):
    acc, m, l, slot, ok = carry
    next_slot, next_ok = slots_of(i + 1)
    lat = gather_rows_zeroed(lat_ref, slot, rank, ok)                       # [bk, R]
    kr = gather_rows_zeroed(rope_ref, slot, rope_dim, ok)                   # [bk, r]
    return (*softmax_step(q_lat, q_rope, lat, kr, ok, (acc, m, l), scale), next_slot, next_ok)

  n_blocks = (jnp.maximum(stop - start, 0) + block_k - 1) // block_k
  init = (jnp.zeros((block_h, rank), jnp.float32), jnp.full((block_h,), -jnp.inf, jnp.float32),
          jnp.zeros((block_h,), jnp.float32), *slots_of(0))
  acc, m, l, _, _ = jax.lax.fori_loop(0, n_blocks, body, init)
  return acc, m, l


def _kernel(q_ref, lat_ref, rope_ref, pt_ref, ids_ref, count_ref, o_ref, lse_ref, *, block_h, block_k, per_split,
            page_size, scale):
  row, split, hb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rank = lat_ref.shape[1]
  heads = pl.ds(hb * block_h, block_h)
  q_lat = q_ref[row, heads, pl.ds(0, rank)]                                 # [bh, R]  (R + r is no power of 2)
  q_rope = q_ref[row, heads, pl.ds(rank, rope_ref.shape[1])]                # [bh, r]
  start = split * per_split
  stop = jnp.minimum(start + per_split, count_ref[row])
  acc, m, l = attend_tokens(q_lat, q_rope, lat_ref, rope_ref, ids_ref, pt_ref, ids_row=row, pt_row=row,
                            start=start, stop=stop, block_k=block_k, page_size=page_size, scale=scale)
  store_split(o_ref, lse_ref, row, split, heads, acc, m, l)


def store_split(o_ref, lse_ref, row, split, heads, acc, m, l):
  """Write a split's normalised output acc / l and its log-sum-exp m + log l (-inf and zeros
  for a split that saw no token)."""
  o_ref[row, split, heads, :] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[row, split, heads] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def merge_splits(out: jax.Array, lse: jax.Array, dtype) -> jax.Array:
  """out [B, S, H, R] per-split normalised outputs, lse float32[B, S, H] -> [B, H, R]."""
  m = jnp.max(lse, axis=1, keepdims=True)
  w = jnp.exp(lse - jnp.where(m == -jnp.inf, 0.0, m))                       # [B, S, H], 0 for empty splits
  total = jnp.sum(w, axis=1)
  merged = jnp.einsum("bsh,bshr->bhr", w, out.astype(jnp.float32)) / jnp.where(total > 0, total, 1.0)[..., None]
  return merged.astype(dtype)


def plan_splits(batch: int, head_blocks: int, n_ids: int, block_k: int, num_splits: int | None) -> int:
  if num_splits is None:
    # ~2 programs per SM of an H100 (132 SMs), but >= 256 ids per split: a split writes (and the
    # merge reads) heads x R partial outputs, 128 KB in bf16 at 128 x 512, vs 288 KB of latents
    # for 256 tokens.
    num_splits = max(1, min(pl.cdiv(264, batch * head_blocks), n_ids // 256))
  return max(1, min(num_splits, pl.cdiv(n_ids, block_k)))


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h", "block_k", "num_splits", "num_warps",
                                             "num_stages"))
def _pallas(q, latent_pool, rope_pool, page_table, token_ids, *, scale, interpret, block_h, block_k, num_splits,
            num_warps, num_stages):
  counts = jnp.sum(token_ids >= 0, axis=1).astype(jnp.int32)
  return split_decode_call(_kernel, q, latent_pool, rope_pool, page_table, (token_ids, counts),
                           n_tokens=token_ids.shape[1], name="sparse_mla_decode", scale=scale, interpret=interpret,
                           block_h=block_h, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
                           num_stages=num_stages)


def split_decode_call(kernel, q, latent_pool, rope_pool, page_table, row_inputs, *, n_tokens, name, scale,
                      interpret, block_h, block_k, num_splits, num_warps, num_stages):
  """Run a flash-decoding `kernel` over grid (row, split, head block) and merge its splits.

  kernel(q, latent rows, rope rows, page_table, *row_inputs, out, lse; block_h, block_k,
  per_split, page_size, scale) covers token positions [split * per_split, + per_split) of
  `n_tokens`. Heads are padded to whole blocks of at least 16 (a tensor-core tile needs 16
  rows) and cut off again. Returns [B, H, R] in q's dtype.
  """
  batch, heads, _ = q.shape
  num_pages, page_size, rank = latent_pool.shape
  heads_pad = max(16, pl.cdiv(heads, block_h) * block_h)
  block_h = min(block_h, heads_pad)
  q = jnp.pad(q, ((0, 0), (0, heads_pad - heads), (0, 0)))
  head_blocks = heads_pad // block_h
  splits = plan_splits(batch, head_blocks, n_tokens, block_k, num_splits)
  per_split = pl.cdiv(pl.cdiv(n_tokens, splits), block_k) * block_k
  splits = pl.cdiv(n_tokens, per_split)
  kernel = functools.partial(kernel, block_h=block_h, block_k=block_k, per_split=per_split, page_size=page_size,
                             scale=scale)
  # Split partials in q's dtype (bf16 on the GPU: at 2K tokens the partials are as many bytes
  # as the latents read; the merge weights stay float32), float32 for float32 queries.
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((batch, splits, heads_pad, rank), q.dtype),
                 jax.ShapeDtypeStruct((batch, splits, heads_pad), jnp.float32)),
      grid=(batch, splits, head_blocks),
      compiler_params=_compat.compiler_params(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name,
  )(q, latent_pool.reshape(num_pages * page_size, rank), rope_pool.reshape(num_pages * page_size, -1),
    page_table, *row_inputs)
  out = out[:, 0] if splits == 1 else merge_splits(out, lse, q.dtype)
  return out[:, :heads].astype(q.dtype)


def check_decode_pools(q, latent_pool, rope_pool, page_table):
  """Shape checks of an absorbed decode's query [B, H, R + r], paged pools and page table."""
  batch, _, dim = q.shape
  chex.assert_rank((latent_pool, rope_pool), 3)
  rank, rope_dim = latent_pool.shape[-1], rope_pool.shape[-1]
  if dim != rank + rope_dim:
    raise ValueError(f"q's last dim {dim} must be kv_lora_rank + rope_dim = {rank} + {rope_dim}")
  chex.assert_equal_shape_prefix((latent_pool, rope_pool), 2)
  chex.assert_shape(page_table, (batch, None))


def _check(q, latent_pool, rope_pool, page_table, token_ids):
  check_decode_pools(q, latent_pool, rope_pool, page_table)
  chex.assert_shape(token_ids, (q.shape[0], None))


def sparse_mla_decode(q: jax.Array, latent_pool: jax.Array, rope_pool: jax.Array, page_table: jax.Array,
                      token_ids: jax.Array, scale: float, *, backend: str = "pallas", interpret: bool | None = None,
                      block_h: int = 64, block_k: int = 32, num_splits: int | None = None,
                      num_warps: int | None = None, num_stages: int = 2) -> jax.Array:
  """Absorbed MLA decode over the listed tokens of each row (see module docstring).

  backend: "pallas" or "reference"; interpret: None = interpret mode only off-GPU.
  block_h: heads per program; block_k: tokens per step; num_splits: programs per row and
  head block (None: enough to fill an H100); num_warps: None = 8 for 32+ heads per program
  (the [block_h, R] float32 accumulator and the resident query need the registers), else 4.
  """
  check_backend(backend)
  _check(q, latent_pool, rope_pool, page_table, token_ids)
  if backend == "reference":
    return sparse_mla_decode_reference(q, latent_pool, rope_pool, page_table, token_ids, scale)
  return _pallas(q, latent_pool, rope_pool, page_table, token_ids.astype(jnp.int32), scale=float(scale),
                 interpret=_compat.resolve_interpret(interpret), block_h=block_h, block_k=block_k,
                 num_splits=num_splits, num_warps=default_num_warps(num_warps, block_h), num_stages=num_stages)


def default_num_warps(num_warps: int | None, block_h: int) -> int:
  """num_warps, or for None 8 with 32+ heads per program (the [block_h, R] float32 accumulator
  and the resident query need the registers), else 4."""
  if num_warps is None:
    return 8 if block_h >= 32 else 4
  return num_warps


def gather_latents(latent_pool, rope_pool, page_table, token_ids):
  """Reference gather: (latent [..., K, R], rope [..., K, r], valid bool[..., K]) of token ids
  [B, ..., K] through page_table [B, max_pages]; zeros where not valid (pool garbage never leaks)."""
  page_size = latent_pool.shape[1]
  batch = page_table.shape[0]
  rows = page_table.reshape(batch, *([1] * (token_ids.ndim - 2)), -1)
  rows = jnp.broadcast_to(rows, (*token_ids.shape[:-1], page_table.shape[1]))
  tok = jnp.maximum(token_ids, 0)
  page = jnp.take_along_axis(rows, jnp.clip(tok // page_size, 0, page_table.shape[1] - 1), axis=-1)
  valid = (token_ids >= 0) & (page >= 0)
  page = jnp.maximum(page, 0)
  zero = lambda x: jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
  return zero(latent_pool[page, tok % page_size]), zero(rope_pool[page, tok % page_size]), valid


def sparse_mla_decode_reference(q: jax.Array, latent_pool: jax.Array, rope_pool: jax.Array, page_table: jax.Array,
                                token_ids: jax.Array, scale: float, *, backend: str = "reference",
                                interpret: bool | None = None, block_h: int = 64, block_k: int = 32,
                                num_splits: int | None = None, num_warps: int | None = None,
                                num_stages: int = 2) -> jax.Array:
  """Plain jnp: gather the listed tokens, softmax in float32."""
  del backend, interpret, block_h, block_k, num_splits, num_warps, num_stages
  _check(q, latent_pool, rope_pool, page_table, token_ids)
  rank = latent_pool.shape[-1]
  lat, kr, valid = gather_latents(latent_pool, rope_pool, page_table, token_ids)      # [B, K, R], [B, K, r]
  hp = jax.lax.Precision.HIGHEST
  s = (jnp.einsum("bhr,bkr->bhk", q[..., :rank], lat, preferred_element_type=jnp.float32, precision=hp)
       + jnp.einsum("bhr,bkr->bhk", q[..., rank:], kr, preferred_element_type=jnp.float32, precision=hp)) * scale
  s = jnp.where(valid[:, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhk,bkr->bhr", p, lat.astype(jnp.float32), precision=hp) / jnp.where(l > 0, l, 1.0)
  return out.astype(q.dtype)
