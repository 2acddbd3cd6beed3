"""rocket_decode_attention (two Pallas kernels, compiled on a GPU, interpret mode elsewhere) vs its
reference: permuted pages, ragged lengths (incl. 0), a page table wider than needed (-1 padded),
NaN in every KT block and every K/V slot no row owns, exact ties, several radix widths and chunk
sizes."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import named_shapes as ns
from pallas_kernels.paged_decode import paged_decode_attention_reference
from pallas_kernels.rocket_decode import (
    rocket_decode_attention,
    rocket_decode_attention_reference,
)
from tests.kernel_platform import INTERPRET

# The selection is compared exactly; the outputs differ only in summation order and in the
# bf16 rounding of the softmax weights before the P.V product on the Pallas path.
OUT_TOLERANCES = {"float32": dict(atol=2e-5, rtol=1e-5), "bfloat16": dict(atol=2e-2, rtol=2e-2)}


def _pools(case, shape, seed):
  """K/V pools [kv_heads, num_pages, page_size, D] in q's dtype, NaN in every slot that
  holds none of a row's stored tokens."""
  rng = np.random.default_rng(seed)
  kv_heads, num_pages = case.kt.shape[:2]
  owned = np.zeros((num_pages, shape.page_size), bool)
  table, lengths = np.asarray(case.page_table), np.asarray(case.lengths)
  for b, length in enumerate(lengths):
    for t in range(length):
      owned[table[b, t // shape.page_size], t % shape.page_size] = True
  out = []
  for _ in range(2):
    x = rng.standard_normal((kv_heads, num_pages, shape.page_size, shape.head_dim))
    x = np.where(owned[None, :, :, None], x, np.nan).astype(np.float32)
    out.append(jnp.asarray(x).astype(case.q.dtype))
  return out


def _expected_ids(scores, page_table, k, blocks_per_page):
  """Top-k of the kernel's own scores, ties to the lower block, as unit ids in block order."""
  scores, table = np.asarray(scores), np.asarray(page_table)
  batch, kv_heads, total = scores.shape
  ids = np.full((batch, kv_heads, k), -1, np.int32)
  for b in range(batch):
    for h in range(kv_heads):
      order = np.lexsort((np.arange(total), -scores[b, h]))  # score desc, then index asc
      top = np.sort([t for t in order[:k] if scores[b, h, t] > -np.inf])
      ids[b, h, :len(top)] = table[b, top // blocks_per_page] * blocks_per_page + top % blocks_per_page
  return ids


def _check(case, shape, k_pages, v_pages, topk, **kernel_kwargs):
  kwargs = dict(topr=shape.topr, topk=topk, block_size=shape.block_size)
  args = (case.q, k_pages, v_pages, case.kt, case.page_table, case.lengths)
  got = rocket_decode_attention(*args, interpret=INTERPRET, **kwargs, **kernel_kwargs)
  ref = rocket_decode_attention_reference(*args, **kwargs)
  bpp = shape.page_size // shape.block_size
  width = min(topk, shape.max_pages * bpp)
  chex.assert_shape(got.unit_ids, (shape.batch, shape.kv_heads, width))
  chex.assert_type(got.out, case.q.dtype)
  assert not np.isnan(np.asarray(got.out, np.float32)).any(), "read an unowned slot"
  # The radix select is exact on the kernel's own scores, and those match the reference's.
  np.testing.assert_array_equal(got.unit_ids, _expected_ids(got.block_scores, case.page_table,
                                                            width, bpp))
  finite = np.isfinite(np.asarray(ref.block_scores))
  np.testing.assert_array_equal(np.isfinite(np.asarray(got.block_scores)), finite)
  np.testing.assert_allclose(np.asarray(got.block_scores)[finite],
                             np.asarray(ref.block_scores)[finite], atol=1e-6, rtol=1e-5)
  np.testing.assert_array_equal(got.unit_ids, ref.unit_ids)
  np.testing.assert_array_equal(got.kv_lens, ref.kv_lens)
  tol = OUT_TOLERANCES[jnp.dtype(case.q.dtype).name]
  np.testing.assert_allclose(np.asarray(got.out, np.float32), np.asarray(ref.out, np.float32), **tol)
  # An independent composition: attention over exactly the units the kernel listed.
  units = lambda x: x.reshape(shape.kv_heads, -1, shape.block_size, shape.head_dim)
  own = paged_decode_attention_reference(case.q, units(k_pages), units(v_pages), got.unit_ids,
                                         got.kv_lens)
  np.testing.assert_allclose(np.asarray(got.out, np.float32), np.asarray(own, np.float32), **tol)
  empty = np.asarray(case.lengths) == 0
  assert (np.asarray(got.out, np.float32)[empty] == 0).all()
  return got


@pytest.mark.parametrize("name,topk,chunk,radix_bits", [
    ("test_g4_d64_b4_f32", 5, 16, 4),
    ("test_g8_d64_b4_fp8", 3, 32, 8),
])
def test_matches_reference(name, topk, chunk, radix_bits):
  shape = ns.ROCKET_SHAPES[name]
  case = ns.rocket_case(shape, seed=3, poison=True)
  k_pages, v_pages = _pools(case, shape, seed=3)
  _check(case, shape, k_pages, v_pages, topk, chunk=chunk, radix_bits=radix_bits)


def test_ties_go_to_the_lower_block_and_topk_wider_than_the_row():
  """Every KT block equal: every score ties, so each row keeps its first topk - 1 blocks and
  the newest; a topk above a row's block count keeps the whole row."""
  shape = ns.ROCKET_SHAPES["test_g4_d128_b4_f32_topr1"]
  case = ns.rocket_case(shape, seed=1, poison=True)
  one_block = np.random.default_rng(1).standard_normal((shape.kv_heads, 1, 1, 2, shape.head_dim))
  case.kt = jnp.asarray(np.broadcast_to(np.sort(one_block, axis=3), case.kt.shape), jnp.float32)
  k_pages, v_pages = _pools(case, shape, seed=1)
  got = _check(case, shape, k_pages, v_pages, topk=4, chunk=16, radix_bits=1)
  lengths = np.asarray(case.lengths)
  for b, length in enumerate(lengths):
    n_valid = -(-length // shape.block_size)
    want = list(range(min(3, n_valid - 1))) + [n_valid - 1] if n_valid else []
    blocks = [u for u in np.asarray(got.unit_ids)[b, 0] if u >= 0]
    assert len(blocks) == len(want), (b, length, blocks)


def test_rejects_bad_arguments_by_name():
  shape = ns.ROCKET_SHAPES["test_g4_d64_b4_f32"]
  case = ns.rocket_case(shape, seed=0)
  k_pages, v_pages = _pools(case, shape, seed=0)
  args = (case.q, k_pages, v_pages, case.kt, case.page_table, case.lengths)
  kwargs = dict(topr=shape.topr, topk=4, block_size=shape.block_size)
  with pytest.raises(ValueError, match="radix_bits"):
    rocket_decode_attention(*args, radix_bits=3, **kwargs)
  with pytest.raises(ValueError, match="page_size"):
    rocket_decode_attention(*args, **dict(kwargs, block_size=8))
  with pytest.raises(ValueError, match="topk"):
    rocket_decode_attention(*args, **dict(kwargs, topk=0))
