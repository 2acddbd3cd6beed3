"""Property tests of the index contracts in sparse_jax.selection (`sort_padded`, `topk_selection`,
`to_units`, `to_pages`) against brute-force expansions written token by token in plain Python.

Random selections, page tables with missing (-1) pages and permuted ids, ragged lengths,
blocks past the stored tokens or past the page table, duplicate blocks, and unit sizes that
do and do not divide the block size (the latter is the de-duplicating branch of `to_units`:
whole pages gathered for blocks smaller than a page)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings, strategies as st

from sparse_jax.selection import AttnSelection, sort_padded, to_pages, to_units, topk_selection, unit_size_for

EXAMPLES = 60
BATCH, HEADS, MAX_PAGES, MAX_BLOCKS = 2, 2, 6, 8  # fixed shapes: one compilation per static choice

_to_units = jax.jit(to_units, static_argnames=("page_size", "unit_size"))
_to_pages = jax.jit(to_pages, static_argnames=("page_size",))
_topk = jax.jit(topk_selection, static_argnames=("k", "block_size"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(rows=st.lists(st.lists(st.integers(-3, 40), min_size=6, max_size=6), min_size=1, max_size=3))
def test_sort_padded_sorts_and_moves_every_negative_to_the_end_as_minus_one(rows):
  got = np.asarray(sort_padded(jnp.asarray(rows, jnp.int32)))
  for row, out in zip(rows, got):
    valid = sorted(x for x in row if x >= 0)
    np.testing.assert_array_equal(out, valid + [-1] * (len(row) - len(valid)))


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_topk_selection_is_the_sorted_top_k_of_the_finite_scores(data):
  """Distinct scores (no ties); -inf entries are never selected and pad with -1; +inf wins."""
  batch, heads, num_blocks = BATCH, HEADS, 12
  k = data.draw(st.sampled_from([1, 5, 12, 14]))
  block_size = data.draw(st.sampled_from([1, 6]))
  rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
  scores = rng.permutation(batch * heads * num_blocks).reshape(batch, heads, num_blocks).astype(np.float32)
  scores[rng.random(scores.shape) < data.draw(st.sampled_from([0.0, 0.3, 0.8]))] = -np.inf
  scores[rng.random(scores.shape) < 0.1] = np.inf
  sel = _topk(jnp.asarray(scores), k=k, block_size=block_size)
  assert sel.block_size == block_size
  idx = np.asarray(sel.indices)
  width = min(k, num_blocks)
  assert idx.shape == (batch, heads, width) and idx.dtype == np.int32
  for b in range(batch):
    for h in range(heads):
      s = scores[b, h]
      finite_order = [i for i in np.argsort(-s, kind="stable") if not np.isneginf(s[i])]
      # +inf entries tie with each other; any of them may be chosen when there are more than k.
      n_inf = int(np.isposinf(s).sum())
      chosen = [int(x) for x in idx[b, h] if x >= 0]
      assert chosen == sorted(set(chosen)), f"not ascending and unique: {idx[b, h]}"
      assert list(idx[b, h, len(chosen):]) == [-1] * (width - len(chosen)), f"-1 padding must come last: {idx[b, h]}"
      assert len(chosen) == min(width, len(finite_order))
      if n_inf >= width:
        assert all(np.isposinf(s[c]) for c in chosen)
      else:
        assert set(chosen) == set(finite_order[:width])


def brute_force_units(blocks, block_size, table, length, page_size, unit_size):
  """Token-level expansion of one (row, head): the units holding any selected, stored token, in
  logical order, as (unit ids, valid tokens of those units)."""
  max_tokens = len(table) * page_size
  tokens = {t for b in blocks if b >= 0 for t in range(b * block_size, (b + 1) * block_size)
            if t < length and t < max_tokens}
  logical = sorted({t // unit_size for t in tokens})
  upp = page_size // unit_size
  ids, kv_len = [], 0
  for lu in logical:
    page = table[lu * unit_size // page_size]
    if page < 0:
      continue
    ids.append(int(page) * upp + lu % upp)
    kv_len += min(unit_size, length - lu * unit_size)
  return ids, kv_len


@st.composite
def selection_case(draw, unit_divides_block):
  """A random selection over a random page table; `unit_divides_block` picks the unit size
  gcd(block, page) (to_units' aligned branch) or the page size with blocks smaller than a page
  (to_pages, the de-duplicating branch)."""
  page_size = draw(st.sampled_from([4, 8, 16]))
  if unit_divides_block:
    block_size = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24, 32]))
    unit_size = unit_size_for(block_size, page_size)
  else:
    block_size = draw(st.sampled_from([b for b in (1, 2, 3, 4, 5, 6, 8, 12) if b < page_size]))
    unit_size = page_size
  assume(block_size % unit_size == 0 or not unit_divides_block)
  batch, heads, max_pages, max_blocks = BATCH, HEADS, MAX_PAGES, MAX_BLOCKS
  num_pages = max_pages * batch + draw(st.integers(0, 5))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages).astype(np.int32)
  lengths = np.array([draw(st.integers(0, max_pages * page_size)) for _ in range(batch)], np.int32)
  for b in range(batch):  # rows end in unallocated pages (-1) somewhere past their stored tokens
    table[b, draw(st.integers(-(-int(lengths[b]) // page_size), max_pages)):] = -1
  n_blocks = -(-max_pages * page_size // block_size)
  duplicates = draw(st.booleans()) and not unit_divides_block
  indices = np.full((batch, heads, max_blocks), -1, np.int32)
  for b in range(batch):
    for h in range(heads):
      # Blocks may lie past the stored tokens or past the page table (up to 3 blocks beyond).
      pool = np.arange(n_blocks + 3)
      count = int(rng.integers(0, min(max_blocks, len(pool)) + 1))
      chosen = rng.choice(pool, size=count, replace=duplicates)
      indices[b, h, :count] = np.sort(chosen)
  return dict(indices=indices, block_size=block_size, table=table, lengths=lengths, page_size=page_size,
              unit_size=unit_size)


def check_against_brute_force(case, unit_ids, kv_lens):
  unit_ids, kv_lens = np.asarray(unit_ids), np.asarray(kv_lens)
  batch, heads, _ = case["indices"].shape
  assert unit_ids.dtype == np.int32 and kv_lens.dtype == np.int32
  assert unit_ids.shape[:2] == (batch, heads) and kv_lens.shape == (batch, heads)
  for b in range(batch):
    for h in range(heads):
      ids, kv_len = brute_force_units(case["indices"][b, h], case["block_size"], case["table"][b],
                                      int(case["lengths"][b]), case["page_size"], case["unit_size"])
      assert unit_ids.shape[-1] >= len(ids)
      expected = ids + [-1] * (unit_ids.shape[-1] - len(ids))
      assert unit_ids[b, h].tolist() == expected, (b, h, case)
      assert kv_lens[b, h] == kv_len, (b, h, case)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=selection_case(unit_divides_block=True))
def test_to_units_gathers_exactly_the_selected_stored_tokens(case):
  sel = AttnSelection(indices=jnp.asarray(case["indices"]), block_size=case["block_size"])
  unit_ids, kv_lens = _to_units(sel, jnp.asarray(case["table"]), jnp.asarray(case["lengths"]),
                                page_size=case["page_size"])
  check_against_brute_force(case, unit_ids, kv_lens)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=selection_case(unit_divides_block=False))
def test_to_pages_lists_each_page_once_for_blocks_smaller_than_a_page(case):
  """Several selected blocks (and duplicate block ids) share a page: it is listed once."""
  sel = AttnSelection(indices=jnp.asarray(case["indices"]), block_size=case["block_size"])
  unit_ids, kv_lens = _to_pages(sel, jnp.asarray(case["table"]), jnp.asarray(case["lengths"]),
                                page_size=case["page_size"])
  check_against_brute_force(case, unit_ids, kv_lens)


def test_to_units_examples():
  """Hand-worked: page 8, blocks of 6 (units of 2); page table [5, 2]; 13 tokens stored."""
  table = jnp.asarray([[5, 2]], jnp.int32)
  sel = AttnSelection(indices=jnp.asarray([[[0, 2, -1]]], jnp.int32), block_size=6)
  ids, lens = to_units(sel, table, jnp.asarray([13], jnp.int32), 8)
  # Block 0 = tokens 0-5 = logical units 0, 1, 2 (page 5: unit ids 20, 21, 22); block 2 = tokens 12-17,
  # of which 12 is stored: logical unit 6 = page 2's unit 2 -> id 10, holding 1 valid token.
  assert np.asarray(ids)[0, 0].tolist()[:4] == [20, 21, 22, 10] and np.all(np.asarray(ids)[0, 0, 4:] == -1)
  assert np.asarray(lens).tolist() == [[7]]
  pages, page_lens = to_pages(AttnSelection(indices=jnp.asarray([[[0, 1, 2]]], jnp.int32), block_size=4), table,
                              jnp.asarray([13], jnp.int32), 8)
  assert np.asarray(pages)[0, 0].tolist()[:2] == [5, 2] and np.all(np.asarray(pages)[0, 0, 2:] == -1)
  assert np.asarray(page_lens).tolist() == [[13]]
