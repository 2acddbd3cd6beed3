"""Prefix cache of the page allocator: hash chains, reference counts, LRU eviction under pressure."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_jax.cache import CacheExhaustedError, PageAllocator, page_hashes


def test_hash_chain_keys_depend_on_the_whole_prefix():
  a = page_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
  b = page_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
  assert len(a) == 2 and len(b) == 2  # the partial third page gets no key
  assert a[1] != b[1], "equal pages after different prefixes must get different keys"
  assert page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a


def test_match_share_register_and_lru_eviction():
  alloc = PageAllocator(num_pages=6, page_size=4, batch_slots=2, max_pages_per_seq=6, enable_reuse=True)
  prompt = list(range(10))  # 2 full pages + 2 tokens
  assert alloc.match_prefix(prompt) == []
  alloc.ensure(0, 10)
  assert alloc.register(0, prompt) == 2
  first = alloc.pages(0)[:2]
  assert alloc.match_prefix(prompt + [50, 51]) == first
  # Never the page holding the last token: its logits must be computed.
  assert alloc.match_prefix(prompt[:8]) == first[:1]
  alloc.share(1, first)
  assert [alloc.refcount(p) for p in first] == [2, 2]
  alloc.free(0)
  assert alloc.free_pages == 4 and alloc.cached_pages == 0, "pages still held by slot 1 are not free"
  alloc.free(1)
  assert alloc.cached_pages == 2 and alloc.free_pages == 6 and alloc.used_pages == 0
  # Pressure: 5 pages leave only one free page. A sequence releases its pages last to first,
  # so a chain's tail is the least recently used part and is evicted first: the head stays.
  alloc.ensure(0, 20)
  assert alloc.stats["evicted_cached_pages"] == 1
  assert alloc.match_prefix(prompt) == first[:1]
  assert alloc.stats["hit_pages"] == 4


def test_exhaustion_leaves_the_cache_intact():
  alloc = PageAllocator(num_pages=4, page_size=4, batch_slots=2, max_pages_per_seq=8, enable_reuse=True)
  alloc.ensure(0, 9)
  alloc.register(0, list(range(9)))
  alloc.free(0)
  alloc.ensure(1, 4)
  with pytest.raises(CacheExhaustedError, match="only 3 of 4 pages are free"):
    alloc.ensure(0, 16)
  assert alloc.cached_pages == 2 and alloc.match_prefix(list(range(9))) != []


def test_recycling_a_registered_page_unregisters_it_and_shared_pages_refuse():
  alloc = PageAllocator(num_pages=8, page_size=4, batch_slots=2, max_pages_per_seq=8, enable_reuse=True)
  alloc.ensure(0, 12)
  alloc.register(0, list(range(12)))
  alloc.share(1, alloc.pages(0)[:1])
  with pytest.raises(ValueError, match="shared with other sequences"):
    alloc.recycle_pages(0, [0])
  alloc.recycle_pages(0, [1])
  assert len(alloc.match_prefix(list(range(13)))) == 1


def test_replace_row_keeps_the_dense_prefix_cached():
  """Compaction into a sequence's own pages: the dense prompt pages become evictable cache."""
  alloc = PageAllocator(num_pages=10, page_size=4, batch_slots=1, max_pages_per_seq=8, enable_reuse=True)
  prompt = list(range(14))
  alloc.ensure(0, 14)
  own = alloc.take(2)
  alloc.register(0, prompt)
  old = alloc.replace_row(0, own)
  assert alloc.pages(0) == own and alloc.cached_pages == 3 and len(old) == 4
  assert alloc.match_prefix(prompt) == old[:3]
  alloc.free(0)
  assert alloc.used_pages == 0 and alloc.free_pages == 10


@settings(max_examples=8, deadline=None)
@given(page_size=st.sampled_from([2, 4, 8]), num_pages=st.integers(12, 48), slots=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_random_requests_with_shared_prefixes_leak_nothing(page_size, num_pages, slots, seed):
  """1,000 requests whose prompts share prefixes. `content` mirrors what each page holds: a
  shared page always holds the sharer's tokens (so no page in use is ever evicted and reused),
  reference counts equal the rows holding a page, and everything returns to the pool."""
  rng = np.random.default_rng(seed)
  alloc = PageAllocator(num_pages, page_size, slots, max_pages_per_seq=num_pages, enable_reuse=True)
  bases = [rng.integers(0, 5, size=int(rng.integers(0, 6 * page_size))).tolist() for _ in range(4)]
  content: dict[int, tuple] = {}
  running: dict[int, list[int]] = {}
  hits = 0
  for _ in range(1000):
    if running and (len(running) == slots or rng.random() < 0.45):
      slot = int(rng.choice(list(running)))
      del running[slot]
      alloc.free(slot)
    else:
      slot = next(s for s in range(slots) if s not in running)
      prompt = bases[int(rng.integers(len(bases)))] + rng.integers(0, 5, size=int(rng.integers(1, 3 * page_size))).tolist()
      shared = alloc.match_prefix(prompt)
      for i, p in enumerate(shared):
        assert content[p] == tuple(prompt[i * page_size:(i + 1) * page_size]), "a cached page changed"
      hits += len(shared)
      total = len(prompt) + int(rng.integers(0, 2 * page_size))
      if alloc.pages_for(total) - len(shared) > alloc.free_pages - sum(alloc.refcount(p) == 0 for p in shared):
        with pytest.raises(CacheExhaustedError):
          alloc.share(slot, shared)
          alloc.ensure(slot, total)
        alloc.free(slot)
        continue
      alloc.share(slot, shared)
      alloc.ensure(slot, total)
      for i, p in enumerate(alloc.pages(slot)[len(shared):], start=len(shared)):
        content[p] = tuple(prompt[i * page_size:(i + 1) * page_size])  # the prefill writes these
      alloc.register(slot, prompt)
      running[slot] = prompt
    held = [p for s in running for p in alloc.pages(s)]
    refs = np.bincount(np.asarray(held, np.int64), minlength=num_pages) if held else np.zeros(num_pages, int)
    np.testing.assert_array_equal(refs, alloc._refs)
    assert alloc.used_pages == int((refs > 0).sum())
    assert not set(held) & (set(alloc._free) | set(alloc._lru)), "a held page is free or evictable"
    assert len(alloc._free) + len(alloc._lru) + int((refs > 0).sum()) == num_pages
  for slot in list(running):
    alloc.free(slot)
  assert int(alloc._refs.sum()) == 0 and alloc.free_pages == num_pages
  assert alloc.stats["hit_pages"] == hits
