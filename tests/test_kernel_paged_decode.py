"""paged_decode_attention (Pallas, compiled on a GPU, interpret mode elsewhere) vs its XLA
reference, and the reference vs a float64 numpy loop. Inputs: permuted page tables, ragged
selections (including empty ones), -1 padding, partial last units, NaN in every pool slot the
kernel must not read."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import named_shapes as ns
from pallas_kernels.paged_decode import (
    default_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from tests.kernel_platform import INTERPRET

# Per dtype of q/K/V. f32: the kernel's exp2/log2-domain softmax and split merge vs the
# reference's exp differ by a few ulps. bf16: the output itself is rounded to bf16 and P is
# cast to bf16 before P @ V (as in FlashAttention).
TOLERANCES = {
    "float32": dict(atol=1e-5, rtol=1e-5),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
}
TEST_SHAPES = [name for name in ns.DECODE_SHAPES if name.startswith("test_")]


def _as_f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _check_against_reference(case, dtype, **knobs):
  args = case.kernel_args()
  out = paged_decode_attention(*args, interpret=INTERPRET, **knobs)
  ref = paged_decode_attention_reference(*args)
  chex.assert_shape(out, case.q.shape)
  chex.assert_type(out, case.q.dtype)
  out32, ref32 = _as_f32(out), _as_f32(ref)
  assert not np.isnan(out32).any(), "kernel read a poisoned (unlisted) slot"
  assert not np.isnan(ref32).any(), "reference read a poisoned (unlisted) slot"
  np.testing.assert_allclose(out32, ref32, **TOLERANCES[dtype])
  # Empty selections give exactly zero.
  kv_lens = np.asarray(case.kv_lens)
  group = case.q.shape[1] // kv_lens.shape[1]
  empty = np.repeat(kv_lens == 0, group, axis=1)
  assert (out32[empty] == 0).all()
  return out32, ref32


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", TEST_SHAPES)
def test_matches_reference(name, seed):
  shape = ns.DECODE_SHAPES[name]
  case = ns.decode_case(shape, seed, poison=True)
  _check_against_reference(case, shape.dtype)


@pytest.mark.parametrize(
    "units_per_block,num_splits",
    [(4, 1), (8, 3), (16, 4), (4, 7)],
)
def test_split_and_block_knobs(units_per_block, num_splits):
  """More splits than work, uneven splits, several iterations per split."""
  shape = ns.DECODE_SHAPES["test_g4_d128_u4_f32"]
  case = ns.decode_case(shape, seed=7, poison=True)
  _check_against_reference(case, shape.dtype, units_per_block=units_per_block,
                           num_splits=num_splits)


def test_all_empty_is_exactly_zero():
  shape = ns.DECODE_SHAPES["test_g4_d128_u8_bf16"]
  case = ns.decode_case(shape, seed=3)
  case.kv_lens = jnp.zeros_like(case.kv_lens)
  case.unit_ids = jnp.full_like(case.unit_ids, -1)
  case.k_pages = jnp.full_like(case.k_pages, jnp.nan)
  case.v_pages = jnp.full_like(case.v_pages, jnp.nan)
  out = paged_decode_attention(*case.kernel_args(), interpret=INTERPRET)
  assert (_as_f32(out) == 0).all()


def test_scale_argument():
  shape = ns.DECODE_SHAPES["test_g1_d64_u4_f32"]
  case = ns.decode_case(shape, seed=5, poison=True)
  out = paged_decode_attention(*case.kernel_args(), scale=0.3, interpret=INTERPRET)
  ref = paged_decode_attention_reference(*case.kernel_args(), scale=0.3)
  default = paged_decode_attention_reference(*case.kernel_args())
  np.testing.assert_allclose(_as_f32(out), _as_f32(ref), **TOLERANCES["float32"])
  assert not np.allclose(_as_f32(ref), _as_f32(default), atol=1e-3)


def test_reference_backend_switch():
  shape = ns.DECODE_SHAPES["test_g1_d64_u4_f32"]
  case = ns.decode_case(shape, seed=2)
  out = paged_decode_attention(*case.kernel_args(), backend="reference")
  ref = paged_decode_attention_reference(*case.kernel_args())
  np.testing.assert_array_equal(_as_f32(out), _as_f32(ref))


def _numpy_decode(case, scale):
  """Float64 loop over (batch, q head) using the page table directly (not the unit view)."""
  q = _as_f32(case.q).astype(np.float64)
  k_units = _as_f32(case.k_units).astype(np.float64)
  v_units = _as_f32(case.v_units).astype(np.float64)
  ids, lens = np.asarray(case.unit_ids), np.asarray(case.kv_lens)
  batch, q_heads, dim = q.shape
  kv_heads = k_units.shape[0]
  group = q_heads // kv_heads
  out = np.zeros_like(q)
  for b in range(batch):
    for hq in range(q_heads):
      h = hq // group
      n = lens[b, h]
      if n == 0:
        continue
      listed = ids[b, h][ids[b, h] >= 0]
      k = np.concatenate([k_units[h, u] for u in listed])[:n]
      v = np.concatenate([v_units[h, u] for u in listed])[:n]
      logits = k @ q[b, hq] * scale
      p = np.exp(logits - logits.max())
      out[b, hq] = p @ v / p.sum()
  return out


@pytest.mark.parametrize("name", ["test_g4_d128_u4_f32", "test_g4_d64_u32_dense_bf16"])
def test_reference_matches_numpy(name):
  shape = ns.DECODE_SHAPES[name]
  case = ns.decode_case(shape, seed=11)
  ref = paged_decode_attention_reference(*case.kernel_args())
  expected = _numpy_decode(case, shape.head_dim ** -0.5)
  np.testing.assert_allclose(_as_f32(ref), expected, **TOLERANCES[shape.dtype])


def test_bad_arguments_raise():
  shape = ns.DECODE_SHAPES["test_g4_d128_u8_bf16"]
  case = ns.decode_case(shape, seed=0)
  q, k, v, ids, lens = case.kernel_args()
  with pytest.raises(ValueError, match="unit_ids"):
    paged_decode_attention(q, k, v, ids[:, :1], lens, interpret=INTERPRET)
  with pytest.raises(ValueError, match="kv_lens"):
    paged_decode_attention(q, k, v, ids, lens[:, :1], interpret=INTERPRET)
  with pytest.raises(ValueError, match="v_pages"):
    paged_decode_attention(q, k, v[:, :-1], ids, lens, interpret=INTERPRET)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    paged_decode_attention(q[:, :3], k, v, ids, lens, interpret=INTERPRET)
  with pytest.raises(ValueError, match="units_per_block"):
    paged_decode_attention(q, k, v, ids, lens, units_per_block=1, interpret=INTERPRET)
  with pytest.raises(ValueError, match="backend"):
    paged_decode_attention(q, k, v, ids, lens, backend="triton")


def test_default_num_splits_fills_an_h100():
  # Bench shape: batch 8 x 8 kv heads, 512 units of 4 tokens, 16 units per iteration.
  splits = default_num_splits(8, 8, 512, 16, core_count=132)
  assert 8 * 8 * splits >= 2 * 132
  assert splits & (splits - 1) == 0
  assert default_num_splits(1, 8, 8, 16, core_count=132) == 1  # too little work to split
