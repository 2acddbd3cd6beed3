"""Page allocator and cached forward: the paged path equals the no-cache forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.attention import Runtime
from sparse_jax.cache import CacheExhaustedError, PageAllocator, create_cache_for
from tests.model_fixtures import tiny_llama


def test_allocate_free_cycles_leak_nothing():
  alloc = PageAllocator(num_pages=20, page_size=4, batch_slots=3, max_pages_per_seq=8)
  rng = np.random.default_rng(0)
  for _ in range(200):
    slot = int(rng.integers(3))
    if rng.random() < 0.5:
      try:
        alloc.ensure(slot, int(rng.integers(0, 33)))
      except CacheExhaustedError:
        pass
    else:
      alloc.free(slot)
    owned = [p for s in range(3) for p in alloc.pages(s)]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    assert len(owned) + alloc.free_pages == 20
    table = alloc.table()
    for s in range(3):
      row = [p for p in table[s] if p >= 0]
      assert row == alloc.pages(s)
  for s in range(3):
    alloc.free(s)
  assert alloc.free_pages == 20


def test_exhaustion_is_clear_and_leaves_others_intact():
  alloc = PageAllocator(num_pages=6, page_size=4, batch_slots=2, max_pages_per_seq=8)
  alloc.ensure(0, 16)
  before = alloc.pages(0), alloc.table().copy(), alloc.free_pages
  with pytest.raises(CacheExhaustedError, match="slot 1 needs 3 more pages .* only 2 of 6"):
    alloc.ensure(1, 12)
  assert (alloc.pages(0), alloc.free_pages) == (before[0], before[2])
  np.testing.assert_array_equal(alloc.table(), before[1])
  with pytest.raises(CacheExhaustedError, match="max_pages_per_seq=8"):
    alloc.ensure(1, 33)
  with pytest.raises(ValueError, match="slot 5 out of range"):
    alloc.ensure(5, 1)


def test_truncate_and_release_pages():
  alloc = PageAllocator(num_pages=10, page_size=4, batch_slots=1, max_pages_per_seq=10)
  pages = alloc.ensure(0, 40)
  assert alloc.truncate(0, 9) == pages[3:]
  assert alloc.pages(0) == pages[:3]
  assert alloc.release_pages(0, [1]) == [pages[1]]
  assert alloc.pages(0) == [pages[0], pages[2]]
  assert alloc.free_pages == 8


def _permuted_allocator(num_pages, page_size, slots, max_pages, seed):
  """An allocator whose free list is shuffled, so sequences get non-contiguous pages."""
  alloc = PageAllocator(num_pages, page_size, slots, max_pages)
  alloc._free = list(np.random.default_rng(seed).permutation(num_pages))
  return alloc


@pytest.mark.parametrize("page_size", [4, 8])
def test_cached_prefill_and_decode_equal_no_cache_forward(page_size):
  model = tiny_llama(1)
  rng = np.random.default_rng(2)
  lens = [5, 13, 9]
  steps = 6
  total = max(lens) + steps
  seqs = [rng.integers(0, 97, size=l + steps).tolist() for l in lens]
  alloc = _permuted_allocator(64, page_size, 4, 16, seed=3)
  slots = [2, 0, 3]
  for s, l in zip(slots, lens):
    alloc.ensure(s, l + steps)
  cache = create_cache_for(model.cache_layout(None, page_size), num_pages=64, page_size=page_size, batch_slots=4,
                           max_pages_per_seq=16, dtype=jnp.float32)
  cache = cache.replace(page_table=jnp.asarray(alloc.table()))
  t = 16
  tokens = np.zeros((3, t), np.int32)
  for i, (seq, l) in enumerate(zip(seqs, lens)):
    tokens[i, :l] = seq[:l]
  prefill = jax.jit(model.prefill, static_argnames=("runtime",))
  logits, cache = prefill(jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(slots), cache)
  full = [np.asarray(model(jnp.asarray([seq])))[0] for seq in seqs]
  for i, l in enumerate(lens):
    np.testing.assert_allclose(np.asarray(logits[i]), full[i][l - 1], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache.lengths)[slots], lens)
  decode = jax.jit(model.decode, static_argnames=("runtime",))
  active = np.zeros(4, bool)
  active[slots] = True
  for step in range(steps):
    tok = np.zeros(4, np.int32)
    for i, s in enumerate(slots):
      tok[s] = seqs[i][lens[i] + step]
    logits, cache = decode(jnp.asarray(tok), cache, jnp.asarray(active))
    for i, s in enumerate(slots):
      np.testing.assert_allclose(np.asarray(logits[s]), full[i][lens[i] + step], atol=1e-5,
                                 err_msg=f"step {step} row {i}")
  assert np.asarray(cache.lengths)[1] == 0, "an inactive slot must not grow"
