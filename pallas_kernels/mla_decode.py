"""Dense MLA decode in absorbed form: each row's query over every token it has cached.

    mla_decode(q [B, H, R + r], latent_pool [num_pages, page_size, R],
               rope_pool [num_pages, page_size, r], page_table int32[B, max_pages],
               lengths int32[B], scale) -> [B, H, R]

    out[b, h] = sum_{s < lengths[b]} softmax_s(scale * q[b, h] . [c_s, kr_s]) c_s

c_s / kr_s: the latent / rope key of logical token s, at page page_table[b, s // page_size],
offset s % page_size. All heads share the latent, so it is both key (with the rope part) and
value. A row of length 0 outputs zeros. Same result as `sparse_mla_decode` given the ids
0..length-1, without the [B, max_pages * page_size] id array.

With DeepSeek's 128 heads this is compute-bound (per token and head 2 * (2R + r) FLOPs on
R + r cached values shared by all heads: ~140 FLOPs per byte in bf16), so the kernel is laid
out as a matmul:

  M  the heads of one row: `block_h` of them per program (the float32 [block_h, R]
     accumulator is the register budget: 64 x 512 takes half an H100 SM's registers);
  K  the latent (plus the rope key) in the scores q . c, then the tokens in p @ c;
  N  `block_k` tokens per step, loaded once for both matmuls;
  split-K over tokens: the grid is (row, split, head block), each split a contiguous token
     range whose partial output and log-sum-exp are merged afterwards (`merge_splits`); the
     head block is the fastest axis, so the programs reading the same tokens run together
     and share them through L2.

A step's pool rows come from the page table at the step's own token positions (no id list,
no index carried between steps), a plain affine load the compiler can pipeline ahead of the
latent loads (`num_stages`).
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
from pallas_kernels.sparse_mla_decode import (check_decode_pools, gather_rows_zeroed, softmax_step,
                                              sparse_mla_decode_reference, split_decode_call, store_split)



def _kernel(q_ref, lat_ref, rope_ref, pt_ref, len_ref, o_ref, lse_ref, *, block_h, block_k, per_split, page_size,
            scale):
  row, split, hb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rank, rope_dim = lat_ref.shape[1], rope_ref.shape[1]
  max_pages = pt_ref.shape[1]
  heads = pl.ds(hb * block_h, block_h)
  q_lat = q_ref[row, heads, pl.ds(0, rank)]                                 # [bh, R]  (R + r is no power of 2)
  q_rope = q_ref[row, heads, pl.ds(rank, rope_dim)]                         # [bh, r]
  start = split * per_split
  stop = jnp.minimum(start + per_split, len_ref[row])

  def body(i, carry):
    tok = start + i * block_k + jnp.arange(block_k, dtype=jnp.int32)
    ok = tok < stop
    page = plt.load(pt_ref.at[row, jnp.clip(tok // page_size, 0, max_pages - 1)], mask=ok, other=0)
    ok = ok & (page >= 0)
    slot = jnp.maximum(page, 0) * page_size + tok % page_size
    lat = gather_rows_zeroed(lat_ref, slot, rank, ok)                       # [bk, R]
    kr = gather_rows_zeroed(rope_ref, slot, rope_dim, ok)                   # [bk, r]
    return softmax_step(q_lat, q_rope, lat, kr, ok, carry, scale)

  n_blocks = (jnp.maximum(stop - start, 0) + block_k - 1) // block_k
  init = (jnp.zeros((block_h, rank), jnp.float32), jnp.full((block_h,), -jnp.inf, jnp.float32),
          jnp.zeros((block_h,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, n_blocks, body, init)
  store_split(o_ref, lse_ref, row, split, heads, acc, m, l)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h", "block_k", "num_splits", "num_warps",
                                             "num_stages"))
def _pallas(q, latent_pool, rope_pool, page_table, lengths, *, scale, interpret, block_h, block_k, num_splits,
            num_warps, num_stages):
  n_tokens = page_table.shape[1] * latent_pool.shape[1]
  return split_decode_call(_kernel, q, latent_pool, rope_pool, page_table,
                           (jnp.minimum(lengths.astype(jnp.int32), n_tokens),), n_tokens=n_tokens, name="mla_decode",
                           scale=scale, interpret=interpret, block_h=block_h, block_k=block_k,
                           num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


def _check(q, latent_pool, rope_pool, page_table, lengths):
  check_decode_pools(q, latent_pool, rope_pool, page_table)
  chex.assert_shape(lengths, (q.shape[0],))


def mla_decode(q: jax.Array, latent_pool: jax.Array, rope_pool: jax.Array, page_table: jax.Array,
               lengths: jax.Array, scale: float, *, backend: str = "pallas", interpret: bool | None = None,
               block_h: int = 64, block_k: int = 64, num_splits: int | None = None, num_warps: int = 8,
               num_stages: int = 2) -> jax.Array:
  """Dense absorbed MLA decode over tokens 0..lengths[b]-1 of each row (module docstring).

  backend: "pallas" or "reference"; interpret: None = interpret mode only off-GPU.
  block_h: heads per program (the matmul's M); block_k: tokens per step (>= 16 on a GPU);
  num_splits: token ranges per row and head block (None: about two programs per SM of an
  H100, at least 256 tokens each); num_warps / num_stages: Triton's.
  """
  check_backend(backend)
  _check(q, latent_pool, rope_pool, page_table, lengths)
  if backend == "reference":
    return mla_decode_reference(q, latent_pool, rope_pool, page_table, lengths, scale)
  return _pallas(q, latent_pool, rope_pool, page_table, lengths, scale=float(scale),
                 interpret=_compat.resolve_interpret(interpret), block_h=block_h, block_k=block_k,
                 num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


def mla_decode_reference(q: jax.Array, latent_pool: jax.Array, rope_pool: jax.Array, page_table: jax.Array,
                         lengths: jax.Array, scale: float, *, backend: str = "reference",
                         interpret: bool | None = None, block_h: int = 64, block_k: int = 64,
                         num_splits: int | None = None, num_warps: int = 8, num_stages: int = 2) -> jax.Array:
  """Plain jnp: every row's tokens as the ids 0..length-1 of the sparse reference."""
  del backend, interpret, block_h, block_k, num_splits, num_warps, num_stages
  _check(q, latent_pool, rope_pool, page_table, lengths)
  pos = jnp.arange(page_table.shape[1] * latent_pool.shape[1], dtype=jnp.int32)
  ids = jnp.where(pos[None, :] < lengths[:, None], pos[None, :], -1)
  return sparse_mla_decode_reference(q, latent_pool, rope_pool, page_table, ids, scale)


def mla_decode_flops(batch: int, heads: int, tokens: int, rank: int, rope_dim: int) -> int:
  """Matmul FLOPs of dense absorbed MLA decode: scores over R + r, then p @ latent over R."""
  return 2 * batch * heads * tokens * (2 * rank + rope_dim)
