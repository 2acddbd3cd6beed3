"""compact_pages (Pallas, compiled on a GPU, interpret mode elsewhere; in place and two-pass) vs
its reference, and the reference vs the contract checked token by token in numpy. Interpret mode
reads and writes through the one aliased output buffer, program after program, so a chunk order
or a read-after-write bug of the in-place algorithm shows up as a wrong result here."""

import hypothesis
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import named_shapes as ns
from pallas_kernels.compaction import compact_pages, compact_pages_reference
from tests.kernel_platform import INTERPRET

TEST_SHAPES = [name for name in ns.COMPACTION_SHAPES if name.startswith("test_")]
METHODS = ["inplace", "two_pass"]


def _np(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _expected(case):
  """The contract in numpy: kept token keep[i, h, j] -> logical position j of row slots[i]."""
  pools = [_np(p) for p in case.pools]
  page_table = np.asarray(case.page_table)
  slots, keep = np.asarray(case.slots), np.asarray(case.keep_indices)
  counts = np.asarray(case.keep_counts)
  page_size = pools[0].shape[2]
  out = [p.copy() for p in pools]
  for i, row in enumerate(slots):
    for h in range(keep.shape[1]):
      for j in range(counts[i]):
        src = keep[i, h, j]
        sp, so = page_table[row, src // page_size], src % page_size
        dp, do = page_table[row, j // page_size], j % page_size
        for original, new in zip(pools, out):
          new[h, dp, do] = original[h, sp, so]
  return out


def _check(case, outs):
  expected = _expected(case)
  assert len(outs) == len(case.pools)
  for out, pool, exp in zip(outs, case.pools, expected):
    assert out.shape == pool.shape and out.dtype == pool.dtype
    np.testing.assert_array_equal(_np(out), exp)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", TEST_SHAPES)
def test_matches_contract_and_reference(name, seed, method):
  case = ns.compaction_case(ns.COMPACTION_SHAPES[name], seed)
  outs = compact_pages(*case.kernel_args(), method=method, chunk=8, feature_block=16,
                       interpret=INTERPRET)
  _check(case, outs)
  ref = compact_pages_reference(*case.kernel_args())
  for out, r in zip(outs, ref):
    np.testing.assert_array_equal(_np(out), _np(r))


def test_reference_matches_contract():
  for seed in range(3):
    case = ns.compaction_case(ns.COMPACTION_SHAPES["test_p4_d16_f32_aux"], seed)
    _check(case, compact_pages_reference(*case.kernel_args()))


def test_untouched_memory():
  """Rows not compacted, positions >= count and pages nobody owns keep their bytes."""
  case = ns.compaction_case(ns.COMPACTION_SHAPES["test_p8_d64_bf16"], seed=4)
  outs = compact_pages(*case.kernel_args(), chunk=4, interpret=INTERPRET)
  page_table, slots = np.asarray(case.page_table), np.asarray(case.slots)
  counts = np.asarray(case.keep_counts)
  page_size = case.pools[0].shape[2]
  written = np.zeros(case.pools[0].shape[:3], bool)  # [heads, pages, page_size]
  for i, row in enumerate(slots):
    for j in range(counts[i]):
      written[:, page_table[row, j // page_size], j % page_size] = True
  assert written.any() and not written.all()
  for out, pool in zip(outs, case.pools):
    np.testing.assert_array_equal(_np(out)[~written], _np(pool)[~written])


_HYP_SHAPE = dict(heads=2, page_size=4, pages_per_row=6, rows=3, budget=12, dim=8)


@st.composite
def _keep_sets(draw):
  """Random rows, lengths, counts, sorted keep sets and a random page permutation."""
  s = _HYP_SHAPE
  rows, page_size, ppr = s["rows"], s["page_size"], s["pages_per_row"]
  lengths = [draw(st.integers(1, ppr * page_size)) for _ in range(rows)]
  n = draw(st.integers(1, rows))
  slots = draw(st.permutations(range(rows)))[:n]
  keep = np.full((n, s["heads"], s["budget"]), -1, np.int32)
  counts = np.zeros(n, np.int32)
  for i, row in enumerate(slots):
    count = draw(st.integers(0, min(s["budget"], lengths[row])))
    counts[i] = count
    for h in range(s["heads"]):
      chosen = draw(st.lists(st.integers(0, lengths[row] - 1), min_size=count,
                             max_size=count, unique=True))
      keep[i, h, :count] = sorted(chosen)
  perm = draw(st.permutations(range(rows * ppr)))
  page_table = np.full((rows, ppr), -1, np.int32)
  for r in range(rows):
    used = -(-lengths[r] // page_size)
    page_table[r, :used] = perm[r * ppr: r * ppr + used]
  return page_table, np.asarray(slots, np.int32), keep, counts


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(data=_keep_sets(), method=st.sampled_from(METHODS))
def test_hypothesis_keep_sets(data, method):
  page_table, slots, keep, counts = data
  s = _HYP_SHAPE
  num_pages = s["rows"] * s["pages_per_row"]
  rng = np.random.default_rng(int(keep.sum()) & 0xFFFF)
  pools = (
      jnp.asarray(rng.standard_normal((s["heads"], num_pages, s["page_size"], s["dim"])),
                  jnp.float32),
      jnp.asarray(rng.standard_normal((s["heads"], num_pages, s["page_size"], 2)),
                  jnp.bfloat16),
  )
  case = ns.CompactionCase(pools, jnp.asarray(page_table), jnp.asarray(slots),
                           jnp.asarray(keep), jnp.asarray(counts), None)
  outs = compact_pages(*case.kernel_args(), method=method, chunk=4, feature_block=4,
                       interpret=INTERPRET)
  _check(case, outs)


def test_worst_case_displacement_and_identity():
  """Keep the last tokens (every chunk reads far ahead) and keep[j] == j (no-op)."""
  heads, pages, page_size, dim, budget = 2, 8, 4, 8, 12
  rng = np.random.default_rng(0)
  pool = jnp.asarray(rng.standard_normal((heads, pages, page_size, dim)), jnp.float32)
  page_table = jnp.asarray(rng.permutation(pages).reshape(1, pages).astype(np.int32))
  slots = jnp.asarray([0], jnp.int32)
  last = np.broadcast_to(np.arange(32 - budget, 32, dtype=np.int32), (1, heads, budget))
  identity = np.broadcast_to(np.arange(budget, dtype=np.int32), (1, heads, budget))
  for keep in (last, identity):
    case = ns.CompactionCase((pool,), page_table, slots, jnp.asarray(keep),
                             jnp.asarray([budget], jnp.int32), None)
    (out,) = compact_pages(*case.kernel_args(), chunk=4, interpret=INTERPRET)
    _check(case, (out,))
  np.testing.assert_array_equal(_np(out), _np(pool))  # identity leaves the pool as is


def test_bad_arguments_raise():
  case = ns.compaction_case(ns.COMPACTION_SHAPES["test_p4_d16_f32_aux"], 0)
  pools, pt, slots, keep, counts = case.kernel_args()
  with pytest.raises(ValueError, match="keep_indices"):
    compact_pages(pools, pt, slots, keep[:, :1], counts, interpret=INTERPRET)
  with pytest.raises(ValueError, match="keep_counts"):
    compact_pages(pools, pt, slots, keep, counts[:1], interpret=INTERPRET)
  with pytest.raises(ValueError, match="pools"):
    compact_pages((pools[0], pools[1][:, :-1]), pt, slots, keep, counts, interpret=INTERPRET)
  with pytest.raises(ValueError, match="chunk"):
    compact_pages(pools, pt, slots, keep, counts, chunk=6, interpret=INTERPRET)
  with pytest.raises(ValueError, match="method"):
    compact_pages(pools, pt, slots, keep, counts, method="copy", interpret=INTERPRET)
