"""Token-sparse MLA prefill: every prompt query attends, in absorbed form, to its own tokens.

    sparse_mla_prefill(q [B, T, H, R + r], latent_pool [num_pages, page_size, R],
                       rope_pool [num_pages, page_size, r], page_table int32[B, max_pages],
                       token_ids int32[B, T, K], scale) -> [B, T, H, R]

    out[b, t, h] = sum_j softmax_j(scale * q[b, t, h] . [c_j, kr_j]) c_j

over the valid ids j of query (b, t) (ascending, -1 padded): DSA's per-query top-k of the
prompt (causality is in the ids). The prompt's latents are already in the paged cache, so
the kernel reads them through the page table like decode does. A query with no valid id
outputs zeros.

Kernel: grid (row, query, head block), one query token per program with `block_h` heads as
the matmul rows, its K ids walked in blocks of `block_k` with an online softmax
(`sparse_mla_decode.attend_tokens`). Prompts are long, so the grid is large without
splitting a query's ids.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.common import check_backend

from pallas_kernels.sparse_mla_decode import attend_tokens, default_num_warps, gather_latents



def _kernel(q_ref, lat_ref, rope_ref, pt_ref, ids_ref, o_ref, *, queries, block_h, block_k, page_size, scale):
  row, t, hb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rank = lat_ref.shape[1]
  heads = pl.ds(hb * block_h, block_h)
  flat = row * queries + t
  q_lat = q_ref[flat, heads, pl.ds(0, rank)]                                # [bh, R]  (R + r is no power of 2)
  q_rope = q_ref[flat, heads, pl.ds(rank, rope_ref.shape[1])]               # [bh, r]
  acc, _, l = attend_tokens(q_lat, q_rope, lat_ref, rope_ref, ids_ref, pt_ref, ids_row=flat, pt_row=row,
                            start=0, stop=ids_ref.shape[1], block_k=block_k, page_size=page_size, scale=scale)
  o_ref[flat, heads, :] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h", "block_k", "num_warps", "num_stages"))
def _pallas(q, latent_pool, rope_pool, page_table, token_ids, *, scale, interpret, block_h, block_k, num_warps,
            num_stages):
  batch, t, heads, dim = q.shape
  num_pages, page_size, rank = latent_pool.shape
  heads_pad = max(16, pl.cdiv(heads, block_h) * block_h)
  block_h = min(block_h, heads_pad)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, heads_pad - heads), (0, 0))).reshape(batch * t, heads_pad, dim)
  kernel = functools.partial(_kernel, queries=t, block_h=block_h, block_k=block_k, page_size=page_size, scale=scale)
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((batch * t, heads_pad, rank), q.dtype),
      grid=(batch, t, heads_pad // block_h),
      compiler_params=_compat.compiler_params(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="sparse_mla_prefill",
  )(q, latent_pool.reshape(num_pages * page_size, rank), rope_pool.reshape(num_pages * page_size, -1), page_table,
    token_ids.reshape(batch * t, -1))
  return out.reshape(batch, t, heads_pad, rank)[:, :, :heads]


def _check(q, latent_pool, rope_pool, page_table, token_ids):
  batch, t, heads, dim = q.shape
  chex.assert_rank((latent_pool, rope_pool), 3)
  if dim != latent_pool.shape[-1] + rope_pool.shape[-1]:
    raise ValueError(f"q's last dim {dim} must be kv_lora_rank + rope_dim = "
                     f"{latent_pool.shape[-1]} + {rope_pool.shape[-1]}")
  chex.assert_shape(page_table, (batch, None))
  chex.assert_shape(token_ids, (batch, t, None))


def sparse_mla_prefill(q: jax.Array, latent_pool: jax.Array, rope_pool: jax.Array, page_table: jax.Array,
                       token_ids: jax.Array, scale: float, *, backend: str = "pallas", interpret: bool | None = None,
                       block_h: int = 64, block_k: int = 32, num_warps: int | None = None,
                       num_stages: int = 2) -> jax.Array:
  """Absorbed MLA attention of each prompt query over its own token ids (see module docstring).
  num_warps: None = 8 for 32+ heads per program, else 4."""
  check_backend(backend)
  _check(q, latent_pool, rope_pool, page_table, token_ids)
  if backend == "reference":
    return sparse_mla_prefill_reference(q, latent_pool, rope_pool, page_table, token_ids, scale)
  return _pallas(q, latent_pool, rope_pool, page_table, token_ids.astype(jnp.int32), scale=float(scale),
                 interpret=_compat.resolve_interpret(interpret), block_h=block_h, block_k=block_k,
                 num_warps=default_num_warps(num_warps, block_h), num_stages=num_stages)


def sparse_mla_prefill_reference(q: jax.Array, latent_pool: jax.Array, rope_pool: jax.Array, page_table: jax.Array,
                                 token_ids: jax.Array, scale: float, *, backend: str = "reference",
                                 interpret: bool | None = None, block_h: int = 64, block_k: int = 32,
                                 num_warps: int | None = None, num_stages: int = 2,
                                 query_chunk: int = 256) -> jax.Array:
  """Plain jnp, queries in chunks (the gathered [chunk, K, R] latents bound the memory)."""
  del backend, interpret, block_h, block_k, num_warps, num_stages
  _check(q, latent_pool, rope_pool, page_table, token_ids)
  batch, t, heads, dim = q.shape
  rank = latent_pool.shape[-1]
  chunk = min(t, query_chunk)
  n = -(-t // chunk)
  pad = n * chunk - t
  qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(batch, n, chunk, heads, dim)
  ic = jnp.pad(token_ids, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(batch, n, chunk, -1)
  hp = jax.lax.Precision.HIGHEST

  def one(args):
    qi, ii = args                                                 # [B, chunk, H, D], [B, chunk, K]
    lat, kr, valid = gather_latents(latent_pool, rope_pool, page_table, ii)
    s = (jnp.einsum("bqhr,bqkr->bqhk", qi[..., :rank], lat, preferred_element_type=jnp.float32, precision=hp)
         + jnp.einsum("bqhr,bqkr->bqhk", qi[..., rank:], kr, preferred_element_type=jnp.float32, precision=hp))
    s = jnp.where(valid[:, :, None, :], s * scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bqhk,bqkr->bqhr", p, lat.astype(jnp.float32), precision=hp) / jnp.where(l > 0, l, 1.0)
    return out.astype(q.dtype)

  out = jax.lax.map(one, (jnp.moveaxis(qc, 1, 0), jnp.moveaxis(ic, 1, 0)))
  return jnp.moveaxis(out, 0, 1).reshape(batch, n * chunk, heads, rank)[:, :t]
