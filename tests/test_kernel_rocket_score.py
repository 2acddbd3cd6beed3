"""rocket_block_scores (Pallas, compiled on a GPU, interpret mode elsewhere) vs its reference, and
the reference vs a float64 numpy transcription of the RocketKV formula. Permuted pages, ragged
lengths (incl. 0), a page table wider than needed, NaN in every KT block the kernel must not
read, KT in float32 / bfloat16 / float8_e5m2."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import named_shapes as ns
from pallas_kernels.rocket_score import (
    rocket_block_scores,
    rocket_block_scores_reference,
)
from tests.kernel_platform import INTERPRET

# Both paths upcast the same stored KT values to f32 and compute in f32; they differ only
# in summation order (and exp vs exp) -> tight tolerances for every KT dtype.
TOLERANCES = {
    "float32": dict(atol=1e-6, rtol=1e-5),
    "bfloat16": dict(atol=1e-6, rtol=1e-5),
    "float8_e5m2": dict(atol=1e-6, rtol=1e-5),
}
TEST_SHAPES = [name for name in ns.ROCKET_SHAPES if name.startswith("test_")]


def _check_scores(out, ref, shape, lengths, normalised=True):
  out, ref = np.asarray(out), np.asarray(ref)
  n_valid = -(-np.asarray(lengths) // shape.block_size)
  total = out.shape[-1]
  valid = np.arange(total)[None, :] < n_valid[:, None]  # [batch, blocks]
  valid = np.broadcast_to(valid[:, None, :], out.shape)
  assert not np.isnan(out).any(), "kernel read a poisoned KT block"
  assert (out[~valid] == -np.inf).all() and (ref[~valid] == -np.inf).all()
  assert np.isfinite(out[valid]).all()
  np.testing.assert_allclose(out[valid], ref[valid], **TOLERANCES[shape.kt_dtype])
  if normalised:  # a mean of softmaxes sums to 1
    sums = np.where(valid, out, 0.0).sum(-1)
    np.testing.assert_allclose(sums[n_valid > 0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", TEST_SHAPES)
def test_matches_reference(name, seed):
  shape = ns.ROCKET_SHAPES[name]
  case = ns.rocket_case(shape, seed, poison=True)
  kwargs = dict(topr=shape.topr, block_size=shape.block_size)
  out = rocket_block_scores(*case.kernel_args(), interpret=INTERPRET, blocks_per_iter=16,
                            **kwargs)
  ref = rocket_block_scores_reference(*case.kernel_args(), **kwargs)
  chex.assert_shape(out, (shape.batch, shape.kv_heads,
                          shape.max_pages * (shape.page_size // shape.block_size)))
  chex.assert_type(out, jnp.float32)
  _check_scores(out, ref, shape, case.lengths)


@pytest.mark.parametrize("blocks_per_iter,num_splits,epilogue",
                         [(16, 1, "pallas"), (16, 3, "xla"), (32, 2, "pallas")])
def test_split_knobs_and_epilogues(blocks_per_iter, num_splits, epilogue):
  shape = ns.ROCKET_SHAPES["test_g4_d64_b4_f32"]
  case = ns.rocket_case(shape, seed=5, poison=True)
  kwargs = dict(topr=shape.topr, block_size=shape.block_size)
  out = rocket_block_scores(*case.kernel_args(), interpret=INTERPRET,
                            blocks_per_iter=blocks_per_iter, num_splits=num_splits,
                            epilogue=epilogue, **kwargs)
  ref = rocket_block_scores_reference(*case.kernel_args(), **kwargs)
  _check_scores(out, ref, shape, case.lengths)


@pytest.mark.parametrize("epilogue", ["pallas", "xla"])
def test_several_queries_per_row_in_one_pass(epilogue):
  """q [batch, samples, q_heads, D] (a prefill chunk's sampled queries): one kernel pass gives
  the max over the queries of each one's scores."""
  shape = ns.ROCKET_SHAPES["test_g4_d64_b4_f32"]
  case = ns.rocket_case(shape, seed=6, poison=True)
  queries = jnp.stack([case.q, -case.q, ns.rocket_case(shape, seed=7).q], axis=1)
  kwargs = dict(topr=shape.topr, block_size=shape.block_size)
  args = (queries, case.kt, case.page_table, case.lengths)
  out = rocket_block_scores(*args, interpret=INTERPRET, blocks_per_iter=16, epilogue=epilogue,
                            **kwargs)
  singles = [rocket_block_scores_reference(queries[:, r], *args[1:], **kwargs) for r in range(3)]
  np.testing.assert_array_equal(rocket_block_scores_reference(*args, **kwargs),
                                np.max(np.stack(singles), axis=0))
  _check_scores(out, np.max(np.stack(singles), axis=0), shape, case.lengths, normalised=False)


def _numpy_scores(case, topr, block_size, scale):
  """The RocketKV formula, float64, one (b, g) at a time, channel choice by np.argsort."""
  q = np.asarray(jnp.asarray(case.q, jnp.float32), np.float64)
  kt = np.asarray(jnp.asarray(case.kt, jnp.float32), np.float64)
  page_table, lengths = np.asarray(case.page_table), np.asarray(case.lengths)
  batch, q_heads, dim = q.shape
  kv_heads, _, bpp, _, _ = kt.shape
  group = q_heads // kv_heads
  total = page_table.shape[1] * bpp
  out = np.full((batch, kv_heads, total), -np.inf)
  for b in range(batch):
    n_valid = -(-lengths[b] // block_size)
    if n_valid == 0:
      continue
    t = np.arange(n_valid)
    blocks = kt[:, page_table[b, t // bpp], t % bpp]  # [kv_heads, n_valid, 2, D]
    for g in range(kv_heads):
      qg = q[b, g * group:(g + 1) * group]
      importance = np.abs(qg).mean(0)
      top = np.argsort(-importance, kind="stable")[:topr]
      qm = np.zeros_like(qg)
      qm[:, top] = qg[:, top]
      use_max = qm.sum(0) > 0
      k_sel = np.where(use_max, blocks[g, :, 1], blocks[g, :, 0])  # [n_valid, D]
      raw = scale * qm @ k_sel.T  # [group, n_valid]
      p = np.exp(raw - raw.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, g, :n_valid] = p.mean(0)
  return out


@pytest.mark.parametrize("name", ["test_g4_d64_b4_f32", "test_g8_d64_b4_fp8"])
def test_reference_matches_numpy(name):
  shape = ns.ROCKET_SHAPES[name]
  case = ns.rocket_case(shape, seed=3)
  ref = rocket_block_scores_reference(*case.kernel_args(), topr=shape.topr,
                                      block_size=shape.block_size)
  expected = _numpy_scores(case, shape.topr, shape.block_size, shape.head_dim ** -0.5)
  ref = np.asarray(ref)
  assert ((ref == -np.inf) == (expected == -np.inf)).all()
  finite = np.isfinite(expected)
  np.testing.assert_allclose(ref[finite], expected[finite], rtol=1e-5, atol=1e-7)


def test_topr_changes_scores_and_is_validated():
  shape = ns.ROCKET_SHAPES["test_g4_d64_b4_f32"]
  case = ns.rocket_case(shape, seed=1)
  args = case.kernel_args()
  few = rocket_block_scores(*args, topr=2, block_size=shape.block_size, interpret=INTERPRET)
  many = rocket_block_scores(*args, topr=64, block_size=shape.block_size, interpret=INTERPRET)
  finite = np.isfinite(np.asarray(few))
  assert not np.allclose(np.asarray(few)[finite], np.asarray(many)[finite])
  for bad in (0, shape.head_dim + 1):
    with pytest.raises(ValueError, match="topr"):
      rocket_block_scores(*args, topr=bad, block_size=shape.block_size, interpret=INTERPRET)


def test_bad_arguments_raise():
  shape = ns.ROCKET_SHAPES["test_g4_d64_b4_f32"]
  case = ns.rocket_case(shape, seed=0)
  q, kt, pt, lengths = case.kernel_args()
  kw = dict(topr=4, block_size=shape.block_size, interpret=INTERPRET)
  with pytest.raises(ValueError, match="kt"):
    rocket_block_scores(q, kt[..., :1, :], pt, lengths, **kw)
  with pytest.raises(ValueError, match="page_table"):
    rocket_block_scores(q, kt, pt[:1], lengths, **kw)
  with pytest.raises(ValueError, match="lengths"):
    rocket_block_scores(q, kt, pt, lengths[:1], **kw)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    rocket_block_scores(q[:, :3], kt, pt, lengths, **kw)


def test_channel_ties_go_to_the_lower_channel():
  """The kernel's own top-r channel choice splits a run of equal importances as lax.top_k
  does (lower channel first): importance 1 + c // 10 over 64 channels ties the 10 channels of
  each run, and top-16 takes 60..63, 50..59 and only 40, 41 of the next run."""
  shape = ns.ROCKET_SHAPES["test_g4_d64_b4_f32"]
  case = ns.rocket_case(shape, 0, poison=True)
  rng = np.random.default_rng(3)
  magnitude = 1.0 + np.arange(shape.head_dim) // 10
  case.q = jnp.asarray(magnitude * rng.choice([-1.0, 1.0], size=case.q.shape), jnp.float32)
  kwargs = dict(topr=16, block_size=shape.block_size)
  out = rocket_block_scores(*case.kernel_args(), interpret=INTERPRET, **kwargs)
  ref = rocket_block_scores_reference(*case.kernel_args(), **kwargs)
  _check_scores(out, ref, shape, case.lengths)
  # The split tie matters: 40, 41 swapped for two other channels of their run changes the scores.
  swapped = case.q.at[..., 40:42].set(case.q[..., 48:50]).at[..., 48:50].set(case.q[..., 40:42])
  other = rocket_block_scores(swapped, *case.kernel_args()[1:], interpret=INTERPRET, **kwargs)
  assert not np.allclose(np.asarray(other), np.asarray(out))
