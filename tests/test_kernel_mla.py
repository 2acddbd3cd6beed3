"""Sparse MLA kernels (compiled on a GPU, interpret mode elsewhere) against their plain-jnp
references: absorbed decode over per-row token lists (split-K) and prefill over per-query token
lists. Pages are a random permutation; every pool slot no listed token owns holds NaN (must
never be read)."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_mla_decode import sparse_mla_decode, sparse_mla_decode_reference
from pallas_kernels.sparse_mla_prefill import sparse_mla_prefill, sparse_mla_prefill_reference
from tests.kernel_platform import INTERPRET, permuted_pages


def _pools(rng, lengths, *, rank, rope_dim, page_size, max_pages, dtype, listed):
  """(latent_pool, rope_pool, page_table): NaN wherever `listed` (per row, a set of tokens) has no token."""
  table, readable = permuted_pages(rng, lengths, page_size=page_size, max_pages=max_pages, spare_pages=2,
                                   readable=listed)
  num_pages = readable.shape[0]
  lat = rng.standard_normal((num_pages, page_size, rank)).astype(np.float32)
  rope = rng.standard_normal((num_pages, page_size, rope_dim)).astype(np.float32)
  lat[~readable], rope[~readable] = np.nan, np.nan
  return jnp.asarray(lat, dtype), jnp.asarray(rope, dtype), jnp.asarray(table)


def _sorted_ids(rng, length, count, width):
  ids = np.full(width, -1, np.int32)
  ids[:count] = np.sort(rng.choice(length, size=count, replace=False)) if count else []
  return ids


DECODE_CASES = {
    # name: (lengths, ids per row (None = every token), heads, rank, rope, page, width, dtype, kernel kwargs)
    "sparse_ragged_split3": ([0, 70, 130], [0, 20, 48], 16, 64, 16, 16, 48, "float32",
                             dict(block_h=16, block_k=8, num_splits=3)),
    "dense_all_tokens_bf16": ([37, 64], None, 32, 128, 32, 8, 64, "bfloat16", dict(block_h=16, block_k=16)),
    "heads_not_a_block_multiple": ([50, 9], [31, 9], 20, 32, 16, 4, 32, "float32",
                                   dict(block_h=16, block_k=16, num_splits=1)),
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_sparse_mla_decode_matches_reference(name):
  lengths, counts, heads, rank, rope_dim, page, width, dtype, kw = DECODE_CASES[name]
  rng = np.random.default_rng(0)
  if counts is None:
    ids = np.stack([np.where(np.arange(width) < n, np.arange(width), -1) for n in lengths]).astype(np.int32)
  else:
    ids = np.stack([_sorted_ids(rng, n, c, width) for n, c in zip(lengths, counts)])
  listed = [set(row[row >= 0].tolist()) for row in ids]
  lat, rope, table = _pools(rng, lengths, rank=rank, rope_dim=rope_dim, page_size=page,
                            max_pages=-(-max(lengths) // page) + 1, dtype=dtype, listed=listed)
  q = jnp.asarray(rng.standard_normal((len(lengths), heads, rank + rope_dim)), dtype)
  scale = (rank + rope_dim) ** -0.5
  out = sparse_mla_decode(q, lat, rope, table, jnp.asarray(ids), scale, interpret=INTERPRET, **kw)
  ref = sparse_mla_decode_reference(q, lat, rope, table, jnp.asarray(ids), scale)
  assert out.shape == (len(lengths), heads, rank) and out.dtype == q.dtype
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.isfinite(out))
  for b, row in enumerate(ids):
    if not (row >= 0).any():
      assert np.all(out[b] == 0)                                   # nothing listed: zeros
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-2 if dtype == "bfloat16" else 1e-5)


def test_sparse_mla_prefill_matches_reference():
  """Causal per-query lists: query t of row b lists up to K of its first t + 1 tokens."""
  rng = np.random.default_rng(1)
  lengths, t, heads, rank, rope_dim, page, k = [19, 6], 19, 16, 64, 16, 4, 8
  ids = np.full((2, t, k), -1, np.int32)
  for b, n in enumerate(lengths):
    for i in range(n):
      ids[b, i] = _sorted_ids(rng, i + 1, min(k, i + 1) - (i % 3 == 0 and i > 0), k)
  listed = [set(ids[b][ids[b] >= 0].tolist()) for b in range(2)]
  lat, rope, table = _pools(rng, lengths, rank=rank, rope_dim=rope_dim, page_size=page, max_pages=6,
                            dtype=jnp.float32, listed=listed)
  q = jnp.asarray(rng.standard_normal((2, t, heads, rank + rope_dim)), jnp.float32)
  out = sparse_mla_prefill(q, lat, rope, table, jnp.asarray(ids), 0.1, interpret=INTERPRET, block_h=16, block_k=4)
  ref = sparse_mla_prefill_reference(q, lat, rope, table, jnp.asarray(ids), 0.1, query_chunk=7)
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == (2, t, heads, rank) and np.all(np.isfinite(out))
  assert np.all(out[1, 6:] == 0)                                     # padded queries list nothing
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# -- dense absorbed decode -------------------------------------------------------------------------

DENSE_CASES = {
    # name: (lengths, heads, rank, rope, page, max_pages, dtype, kernel kwargs)
    "ragged_split3_empty_row_bf16": ([0, 70, 130, 1], 20, 64, 16, 16, 10, "bfloat16",
                                     dict(block_h=16, block_k=16, num_splits=3)),
}


def _dense_numpy(q, lat, rope, table, lengths, scale):
  """Independent float64 reference: walk each row's page table token by token."""
  q, lat, rope = (np.asarray(x, np.float64) for x in (q, lat, rope))
  page = lat.shape[1]
  out = np.zeros(q.shape[:2] + (lat.shape[-1],))
  for b, n in enumerate(lengths):
    if n == 0:
      continue
    c = np.stack([lat[table[b, t // page], t % page] for t in range(n)])
    kr = np.stack([rope[table[b, t // page], t % page] for t in range(n)])
    s = (q[b] @ np.concatenate([c, kr], axis=1).T) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    out[b] = (p / p.sum(axis=1, keepdims=True)) @ c
  return out


@pytest.mark.parametrize("name", sorted(DENSE_CASES))
def test_mla_decode_matches_reference(name):
  """Every token of each ragged row, pages permuted, NaN in every slot past a row's length
  (and in pages no row owns), a row of length 0 (zeros), lengths past a block boundary, a
  head count that is no multiple of the head block, three token splits merged."""
  from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
  lengths, heads, rank, rope_dim, page, max_pages, dtype, kw = DENSE_CASES[name]
  rng = np.random.default_rng(3)
  lat, rope, table = _pools(rng, lengths, rank=rank, rope_dim=rope_dim, page_size=page, max_pages=max_pages,
                            dtype=dtype, listed=[set(range(n)) for n in lengths])
  q = jnp.asarray(rng.standard_normal((len(lengths), heads, rank + rope_dim)), dtype)
  scale = (rank + rope_dim) ** -0.5
  args = (q, lat, rope, table, jnp.asarray(lengths, jnp.int32), scale)
  out = mla_decode(*args, interpret=INTERPRET, **kw)
  assert out.shape == (len(lengths), heads, rank) and out.dtype == q.dtype
  out = np.asarray(out, np.float32)
  assert np.all(np.isfinite(out))
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(out, np.asarray(mla_decode_reference(*args), np.float32), rtol=0, atol=tol)
  np.testing.assert_allclose(out, _dense_numpy(q, lat, rope, np.asarray(table), lengths, scale), rtol=0, atol=tol)
  for b, n in enumerate(lengths):
    if n == 0:
      assert np.all(out[b] == 0)
