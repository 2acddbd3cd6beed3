"""DSA kernels (compiled on a GPU, interpret mode elsewhere) against their plain-jnp references:
the lightning-indexer scores over a paged FP8 / bf16 / f32 key cache, and the exact top-k
select."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.dsa_indexer import dsa_indexer_scores, dsa_indexer_scores_reference
from pallas_kernels.dsa_topk import (_next_state, dsa_topk, dsa_topk_internals, dsa_topk_reference,
                                     pass_histograms_reference)
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.sparse_mla_decode import sparse_mla_decode
from pallas_kernels.sparse_mla_prefill import sparse_mla_prefill
from sparse_jax.algorithms import dsa
from tests.kernel_platform import INTERPRET, lower_for_cuda, permuted_pages


# -- top-k -------------------------------------------------------------------------------------

def _topk_pair(scores, k, **kw):
  """(kernel ids, reference ids); also checks every radix pass's histogram against plain jnp."""
  x = jnp.asarray(scores, jnp.float32)
  ids, hist = dsa_topk_internals(x, k, interpret=INTERPRET, **kw)
  np.testing.assert_array_equal(np.asarray(hist), np.asarray(pass_histograms_reference(x, k)))
  return np.asarray(ids), np.asarray(dsa_topk_reference(x, k))


def _check_contract(out, scores, k):
  """Exactly min(k, valid) ascending unique ids of the largest valid scores, then -1."""
  for row, x in zip(out, np.asarray(scores, np.float32)):
    valid = np.isfinite(x) | (x == np.inf)
    n = min(k, int(valid.sum()))
    assert np.all(row[n:] == -1) and np.all(np.diff(row[:n]) > 0)
    if n:
      chosen = x[row[:n]]
      assert np.all(valid[row[:n]])
      rest = np.delete(np.where(valid, x, -np.inf), row[:n])
      assert rest.size == 0 or chosen.min() >= rest.max()


def _scenario_rows(rng, n):
  """One row per situation the select must get exactly right (one compile for all of them)."""
  pos = np.arange(n)
  return np.stack([
      rng.standard_normal(n),                                              # distinct values
      np.round(rng.standard_normal(n) * 2) / 2,                            # ties at the k-th place
      np.ones(n),                                                          # all equal: lowest ids
      np.where(pos < 5, rng.standard_normal(n), -np.inf),                  # fewer valid than k
      np.full(n, -np.inf),                                                 # nothing valid
      np.where(pos % 3, np.nan, 1.0),                                      # NaN is invalid
      np.where(pos % 2, -0.0, 0.0) - (pos % 7 == 0),                       # signed zeros, negatives
      rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, size=n),      # every exponent
      np.where(pos % 50 == 0, np.inf, rng.standard_normal(n)),             # +inf is valid
  ]).astype(np.float32)


@pytest.mark.parametrize("n,k,plan", [
    (250, 16, dict(kernel="row", block=32)),                   # several blocks of candidates, ragged N
    (20, 32, dict(kernel="row")),                              # default plan, k > N
    (250, 16, dict(kernel="chunked", block=16, chunks=4))])    # several chunks, ragged N
def test_topk_matches_reference(n, k, plan):
  scores = _scenario_rows(np.random.default_rng(0), n)
  out, ref = _topk_pair(scores, k, **plan)
  assert out.shape == (scores.shape[0], k) and out.dtype == np.int32
  np.testing.assert_array_equal(out, ref)
  _check_contract(out, scores, k)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from([-np.inf, -2.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0]), min_size=2 * 192,
                max_size=2 * 192))
def test_topk_ties_property(values):
  """Few distinct values, so ties straddle the k-th place in most rows and across chunks:
  the kernel must take exactly k, the lowest-index ones among the tied."""
  scores = np.asarray(values, np.float32).reshape(2, 192)
  for plan in (dict(kernel="row", block=32), dict(kernel="chunked", block=16, chunks=6)):
    out, ref = _topk_pair(scores, 24, **plan)
    np.testing.assert_array_equal(out, ref)
    _check_contract(out, scores, 24)


@pytest.mark.parametrize("scale", [2000, 70_000, 3_000_000])
def test_select_state_exact_with_large_bucket_counts(scale):
  """The radix state machine's suffix counts stay exact far past 2048 per bucket (a TF32 dot is
  exact only up to 2048; a 32K-token row puts more keys than that in one pass-1 bucket)."""
  rng = np.random.default_rng(scale)
  hist = rng.integers(0, scale, size=(16, 16)).astype(np.int32)
  hist.reshape(-1)[rng.integers(0, 256, size=8)] += 2049          # odd counts above the TF32 limit
  flat = hist.reshape(-1)
  suffix = np.cumsum(flat[::-1])[::-1]                              # keys with digit >= d
  for k in (1, 2049, int(suffix[0]) // 3, int(suffix[0]) - 1):
    d_star = int(np.sum(suffix >= k)) - 1
    for level in (1, 2):
      state = (jnp.int32(5), jnp.int32(k), jnp.bool_(False), jnp.int32(1))
      prefix, k_rem, full, _ = jax.jit(lambda h, s=state, lv=level: _next_state(s, h, k, lv))(jnp.asarray(hist))
      above = int(flat[d_star + 1:].sum())
      assert int(k_rem) == k - above
      assert int(prefix) == (d_star - 128 if level == 1 else 5 * 256 + d_star)
      assert bool(full) == (int(flat[d_star]) == k - above)


# -- indexer scores ------------------------------------------------------------------------------

def _indexer_case(seed, *, batch, heads, dim, page_size, max_pages, dtype, lengths):
  """Random queries/weights and a paged key cache; each row's pages a random permutation of
  the pool, -1 past its length; NaN in every pool slot no row owns (must never be read)."""
  rng = np.random.default_rng(seed)
  table, owned = permuted_pages(rng, lengths, page_size=page_size, max_pages=max_pages, spare_pages=3,
                                readable=[range(n) for n in lengths])
  num_pages = owned.shape[0]
  keys = rng.standard_normal((num_pages, page_size, dim)).astype(np.float32)
  keys[:, :, :3] *= 20.0                                   # outlier channels
  q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((batch, heads)), jnp.float32)
  cfg = dsa.DSASparseAttentionConfig(indexer_k_dtype=dtype)
  k_pool, scales = dsa.encode_keys(cfg, jnp.asarray(keys))
  if scales is not None:
    scales = jnp.where(jnp.asarray(owned)[..., None], scales, jnp.nan)
  else:
    k_pool = jnp.where(jnp.asarray(owned)[..., None], k_pool, jnp.nan).astype(k_pool.dtype)
  if dtype == "bfloat16":
    q = q.astype(jnp.bfloat16)
  return q, w, k_pool, scales, jnp.asarray(table), jnp.asarray(np.asarray(lengths, np.int32))


INDEXER_CASES = {
    # name: case kwargs, kernel kwargs
    "fp8_d128_ragged": (dict(batch=3, heads=16, dim=128, page_size=16, max_pages=6, dtype="float8_e4m3fn",
                             lengths=[0, 37, 96]), dict(block=16, span=32)),
    "fp8_d256_two_scales": (dict(batch=2, heads=8, dim=256, page_size=8, max_pages=5, dtype="float8_e4m3fn",
                                 lengths=[40, 13]), dict(block=16, span=16)),
    "bf16_h12_page4": (dict(batch=2, heads=12, dim=64, page_size=4, max_pages=9, dtype="bfloat16",
                            lengths=[33, 1]), dict(block=16, span=64)),
    "f32_one_span": (dict(batch=2, heads=4, dim=32, page_size=32, max_pages=3, dtype="float32",
                          lengths=[96, 50]), {}),
}


@pytest.mark.parametrize("name", sorted(INDEXER_CASES))
def test_indexer_scores_match_reference(name):
  case_kw, kernel_kw = INDEXER_CASES[name]
  args = _indexer_case(0, **case_kw)
  out = np.asarray(dsa_indexer_scores(*args, interpret=INTERPRET, **kernel_kw))
  ref = np.asarray(dsa_indexer_scores_reference(*args))
  lengths = np.asarray(args[-1])
  n_tokens = args[4].shape[1] * args[2].shape[1]
  assert out.shape == (len(lengths), n_tokens)
  valid = np.arange(n_tokens)[None, :] < lengths[:, None]
  assert np.all(np.isneginf(out[~valid])) and np.all(np.isneginf(ref[~valid]))
  assert np.all(np.isfinite(out[valid]))                          # no NaN slot was read
  scale = np.abs(ref[valid]).max() if valid.any() else 1.0
  tol = 2e-2 if case_kw["dtype"] == "bfloat16" else 1e-5
  np.testing.assert_allclose(out[valid], ref[valid], rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16", "float32"])
def test_indexer_does_the_first_topk_pass(dtype):
  """dsa_indexer_scores(topk_histograms=True) histograms its scores' top radix digit as it
  computes them, one part per program; dsa_topk(histograms=) adds the parts up, starts at
  pass 2 and selects exactly as alone.
  Non-FP8 caches have no scale operand (the histogram output must still be the right one)."""
  from pallas_kernels.dsa_topk import first_pass_histograms
  args = _indexer_case(1, batch=3, heads=16, dim=128, page_size=16, max_pages=6, dtype=dtype,
                       lengths=[0, 37, 96])
  scores, parts = dsa_indexer_scores(*args, topk_histograms=True, interpret=INTERPRET, block=16, span=32)
  assert parts.shape == (3, 3, 16, 16)                               # one part per 32-token span
  np.testing.assert_array_equal(np.asarray(parts).sum(axis=1, keepdims=True),
                                np.asarray(first_pass_histograms(scores)))
  assert np.asarray(parts).sum(axis=(1, 2, 3)).tolist() == [0, 37, 96]
  ref = np.asarray(dsa_topk_reference(scores, 16))
  plans = [dict(kernel="row", block=16)] + ([dict(kernel="chunked", block=16, chunks=4)] if dtype == "float8_e4m3fn" else [])
  for plan in plans:
    np.testing.assert_array_equal(np.asarray(dsa_topk(scores, 16, histograms=parts, interpret=INTERPRET, **plan)), ref)


# -- lowering ----------------------------------------------------------------------------------

def _bench_args():
  """Abstract DeepSeek-V3.2 decode shapes at 128K context, batch 8 (nothing allocated)."""
  s = jax.ShapeDtypeStruct
  batch, n, page = 8, 131072, 64
  pages = batch * n // page
  return {
      "dsa_topk": (lambda x: dsa_topk(x, 2048, interpret=False), (s((batch, n), jnp.float32),)),
      "dsa_topk chunked": (lambda x: dsa_topk(x, 2048, kernel="chunked", interpret=False),
                           (s((batch, n), jnp.float32),)),
      "dsa_indexer_scores+topk_histograms": (
          lambda q, w, k, sc, pt, l: dsa_indexer_scores(q, w, k, sc, pt, l, topk_histograms=True, interpret=False),
          (s((batch, 64, 128), jnp.bfloat16), s((batch, 64), jnp.float32), s((pages, page, 128), jnp.float8_e4m3fn),
           s((pages, page, 1), jnp.float32), s((batch, n // page), jnp.int32), s((batch,), jnp.int32))),
      # A bf16 cache has no scale operand (bench_tp.py's float32 check took this path).
      "dsa_indexer_scores+topk_histograms, bf16 cache": (
          lambda q, w, k, pt, l: dsa_indexer_scores(q, w, k, None, pt, l, topk_histograms=True, interpret=False),
          (s((batch, 64, 128), jnp.bfloat16), s((batch, 64), jnp.float32), s((pages, page, 128), jnp.bfloat16),
           s((batch, n // page), jnp.int32), s((batch,), jnp.int32))),
      "dsa_topk+histograms": (lambda x, h: dsa_topk(x, 2048, histograms=h, interpret=False),
                              (s((batch, n), jnp.float32), s((batch, n // 1024, 16, 16), jnp.int32))),
      "dsa_topk chunked+histograms": (lambda x, h: dsa_topk(x, 2048, histograms=h, kernel="chunked", interpret=False),
                                      (s((batch, n), jnp.float32), s((batch, n // 1024, 16, 16), jnp.int32))),
      "dsa_indexer_scores": (
          lambda q, w, k, sc, pt, l: dsa_indexer_scores(q, w, k, sc, pt, l, interpret=False),
          (s((batch, 64, 128), jnp.bfloat16), s((batch, 64), jnp.float32), s((pages, page, 128), jnp.float8_e4m3fn),
           s((pages, page, 1), jnp.float32), s((batch, n // page), jnp.int32), s((batch,), jnp.int32))),
      "sparse_mla_decode": (
          lambda q, lat, r, pt, ids: sparse_mla_decode(q, lat, r, pt, ids, 0.1, interpret=False),
          (s((batch, 128, 576), jnp.bfloat16), s((pages, page, 512), jnp.bfloat16), s((pages, page, 64), jnp.bfloat16),
           s((batch, n // page), jnp.int32), s((batch, 2048), jnp.int32))),
      "mla_decode": (
          lambda q, lat, r, pt, l: mla_decode(q, lat, r, pt, l, 0.1, interpret=False),
          (s((batch, 128, 576), jnp.bfloat16), s((pages, page, 512), jnp.bfloat16), s((pages, page, 64), jnp.bfloat16),
           s((batch, n // page), jnp.int32), s((batch,), jnp.int32))),
      # float32 (the engine's float32 checks on a GPU): full-precision dots, not TF32.
      "mla_decode float32": (
          lambda q, lat, r, pt, l: mla_decode(q, lat, r, pt, l, 0.1, interpret=False),
          (s((batch, 128, 576), jnp.float32), s((pages, page, 512), jnp.float32), s((pages, page, 64), jnp.float32),
           s((batch, n // page), jnp.int32), s((batch,), jnp.int32))),
      "dsa_indexer_scores float32": (
          lambda q, w, k, pt, l: dsa_indexer_scores(q, w, k, None, pt, l, interpret=False),
          (s((batch, 64, 128), jnp.float32), s((batch, 64), jnp.float32), s((pages, page, 128), jnp.float32),
           s((batch, n // page), jnp.int32), s((batch,), jnp.int32))),
      "sparse_mla_prefill": (
          lambda q, lat, r, pt, ids: sparse_mla_prefill(q, lat, r, pt, ids, 0.1, interpret=False),
          (s((1, 128, 128, 576), jnp.bfloat16), s((pages, page, 512), jnp.bfloat16), s((pages, page, 64), jnp.bfloat16),
           s((1, n // page), jnp.int32), s((1, 128, 2048), jnp.int32))),
  }


@pytest.mark.parametrize("name,launches", [("dsa_topk", 1), ("dsa_topk+histograms", 1), ("dsa_topk chunked", 6),
                                           ("dsa_topk chunked+histograms", 5), ("dsa_indexer_scores", 1),
                                           ("dsa_indexer_scores+topk_histograms", 1),
                                           ("dsa_indexer_scores+topk_histograms, bf16 cache", 1), ("sparse_mla_decode", 1),
                                           ("mla_decode", 1), ("mla_decode float32", 1),
                                           ("dsa_indexer_scores float32", 1), ("sparse_mla_prefill", 1)])
def test_kernels_lower_to_triton_at_bench_shapes(name, launches):
  """backend="pallas" really is the Triton kernel (no fallback), and the Pallas -> Triton-IR
  lowering accepts it for CUDA at the benchmark shapes (power-of-two tiles, fp8 loads, ...)."""
  from pallas_kernels import _compat
  fn, args = _bench_args()[name]
  text = lower_for_cuda(fn, *args)
  calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line
           and any(f"@{t}(" in line for t in _compat.TRITON_CUSTOM_CALL_TARGETS)]
  assert len(calls) == launches


def test_fused_select_is_two_kernels_and_nothing_between():
  """Indexer scores (with the top-k's first pass) then the one-launch top-k: two Triton calls
  and no XLA reduction, sort or arithmetic between them (the histogram parts go in as they are)."""
  _, args = _bench_args()["dsa_indexer_scores"]

  def select(q, w, k, sc, pt, l):
    scores, parts = dsa_indexer_scores(q, w, k, sc, pt, l, topk_histograms=True, interpret=False)
    return dsa_topk(scores, 2048, histograms=parts, interpret=False)

  text = lower_for_cuda(select, *args)
  ops = [line.split("=", 1)[-1].split()[0] for line in text.splitlines() if "stablehlo." in line]
  assert ops.count("stablehlo.custom_call") == 2, ops
  for op in ("stablehlo.reduce", "stablehlo.sort", "stablehlo.add", "stablehlo.scatter", "stablehlo.transpose"):
    assert op not in ops, f"{op} around the kernels"
