"""Paged KV cache: the device pytree, the host page allocator, and pure update functions.

Layout (ARCHITECTURE.md): every layer owns a K pool and a V pool of shape
`[kv_heads, num_pages, page_size, head_dim]`. A page id names the same slot in every layer,
head and auxiliary pool, so one allocator owns all of them. Per-head pages are contiguous,
so a KV head can gather its own pages, and after compaction each head keeps its own tokens
in the same pages.

The pools are a tuple of per-layer arrays rather than one `[layers, ...]` array: a Pallas
kernel then receives a layer's pool as a whole buffer (a slice of a stacked array would be
copied before every custom call), and XLA updates each donated buffer in place.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class CacheExhaustedError(RuntimeError):
  """Raised when the page pool cannot hold what a request needs."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Paged KV cache of one model (a registered pytree; donate it to every jitted step).

  k, v: per layer `[kv_heads, num_pages, page_size, head_dim]` (MLA models: the compressed
    latent in `k` and the rope key in `v`, with kv_heads 1).
  page_table: int32[batch_slots, max_pages_per_seq]; -1 = no page.
  lengths: int32[batch_slots] tokens stored per sequence.
  positions: int32[batch_slots] RoPE position of the next token; larger than `lengths`
    once compaction dropped tokens.
  aux: name -> per-layer auxiliary pools indexed by the same page ids
    (`[heads, num_pages, entries_per_page, ...]`).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  page_table: jax.Array
  lengths: jax.Array
  positions: jax.Array
  aux: Mapping[str, tuple[jax.Array, ...]] = dataclasses.field(default_factory=dict)

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def page_size(self) -> int:
    return self.k[0].shape[2]

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch_slots(self) -> int:
    return self.page_table.shape[0]

  @property
  def max_pages_per_seq(self) -> int:
    return self.page_table.shape[1]

  def layer(self, i: int) -> "LayerCache":
    return LayerCache(k=self.k[i], v=self.v[i], aux={name: pools[i] for name, pools in self.aux.items()})

  def with_layer(self, i: int, layer: "LayerCache") -> "PagedKVCache":
    replace_at = lambda pools, new: pools[:i] + (new,) + pools[i + 1:]
    aux = {name: replace_at(pools, layer.aux[name]) for name, pools in self.aux.items()}
    return dataclasses.replace(self, k=replace_at(self.k, layer.k), v=replace_at(self.v, layer.v), aux=aux)

  def replace(self, **changes: Any) -> "PagedKVCache":
    return dataclasses.replace(self, **changes)

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((self.k, self.v, self.aux)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """The pools of one layer: what an attention layer reads and updates."""
  k: jax.Array
  v: jax.Array
  aux: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)

  def replace(self, **changes: Any) -> "LayerCache":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class AuxPoolSpec:
  """One auxiliary pool per layer: `[heads, num_pages, *entry_shape]` of `dtype`.

  entry_shape starts with the entries per page, e.g. RocketKV's KT cache is
  `(page_size // kt_block, 2, head_dim)`.
  """
  heads: int
  entry_shape: tuple[int, ...]
  dtype: Any


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """What a model needs in its cache; models return it from `model.cache_layout(sparse, page_size)`.

  head_dim / v_head_dim: per-token width of the `k` / `v` pools (MLA: latent / rope key).
  """
  num_layers: int
  kv_heads: int
  head_dim: int
  v_head_dim: int
  aux_specs: Mapping[str, AuxPoolSpec] = dataclasses.field(default_factory=dict)

  def bytes_per_token(self, dtype) -> int:
    itemsize = jnp.dtype(dtype).itemsize
    per_layer = self.kv_heads * (self.head_dim + self.v_head_dim) * itemsize
    return self.num_layers * per_layer


def create_cache_for(layout: CacheLayout, *, num_pages: int, page_size: int, batch_slots: int,
                     max_pages_per_seq: int, dtype=jnp.bfloat16) -> "PagedKVCache":
  return create_cache(num_layers=layout.num_layers, kv_heads=layout.kv_heads, head_dim=layout.head_dim,
                      v_head_dim=layout.v_head_dim, num_pages=num_pages, page_size=page_size,
                      batch_slots=batch_slots, max_pages_per_seq=max_pages_per_seq, dtype=dtype,
                      aux_specs=layout.aux_specs)


def create_cache(*, num_layers: int, kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                 batch_slots: int, max_pages_per_seq: int, dtype=jnp.bfloat16, v_head_dim: int | None = None,
                 aux_specs: Mapping[str, AuxPoolSpec] | None = None, sharding=None) -> PagedKVCache:
  """Allocates a zero-filled cache (zeros, so masked reads of unused slots stay finite)."""
  for name, value in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                      ("num_pages", num_pages), ("page_size", page_size), ("batch_slots", batch_slots),
                      ("max_pages_per_seq", max_pages_per_seq)):
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {value}")
  v_head_dim = head_dim if v_head_dim is None else v_head_dim
  zeros = lambda shape, dt: jnp.zeros(shape, dt, device=sharding) if sharding is not None else jnp.zeros(shape, dt)
  k = tuple(zeros((kv_heads, num_pages, page_size, head_dim), dtype) for _ in range(num_layers))
  v = tuple(zeros((kv_heads, num_pages, page_size, v_head_dim), dtype) for _ in range(num_layers))
  aux = {name: tuple(jnp.zeros((spec.heads, num_pages, *spec.entry_shape), spec.dtype) for _ in range(num_layers))
         for name, spec in (aux_specs or {}).items()}
  return PagedKVCache(
      k=k, v=v,
      page_table=jnp.full((batch_slots, max_pages_per_seq), -1, jnp.int32),
      lengths=jnp.zeros((batch_slots,), jnp.int32),
      positions=jnp.zeros((batch_slots,), jnp.int32),
      aux=aux)


def page_hashes(token_ids: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
  """Hash chain of the full pages of a token sequence: page i's key digests its token ids and
  page i - 1's key, so equal keys mean equal prefixes (vLLM's automatic prefix caching,
  TensorRT-LLM's block reuse). A trailing partial page gets no key."""
  keys = []
  for start in range(0, len(token_ids) - page_size + 1, page_size):
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids[start:start + page_size], np.int64).tobytes())
    parent = h.digest()
    keys.append(parent)
  return keys


class PageAllocator:
  """Host-side owner of page ids (outside jit), with reference counts and a prefix cache.

  Keeps a numpy mirror of the page table; `table()` is what the next jitted step receives.
  Every failing call leaves the allocator exactly as it was.

  Prefix cache (`enable_reuse`): a full page whose K/V (and aux entries, which share its id)
  are final can be registered under its hash-chain key (`register`). A later sequence with
  the same prefix takes those pages by reference (`match_prefix`, `share`) instead of
  computing them. A page returns to the pool when no sequence holds it; a registered page
  then waits in an LRU of cached pages and is evicted (unregistered, reused for new tokens)
  only when no truly free page is left. `free_pages` counts both kinds: a cached page is as
  available to new requests as a free one, so caching never makes admission stricter.
  """

  def __init__(self, num_pages: int, page_size: int, batch_slots: int, max_pages_per_seq: int,
               enable_reuse: bool = False):
    if num_pages <= 0 or page_size <= 0 or batch_slots <= 0 or max_pages_per_seq <= 0:
      raise ValueError(f"allocator sizes must be positive: num_pages={num_pages}, page_size={page_size}, "
                       f"batch_slots={batch_slots}, max_pages_per_seq={max_pages_per_seq}")
    self.num_pages = num_pages
    self.page_size = page_size
    self.batch_slots = batch_slots
    self.max_pages_per_seq = max_pages_per_seq
    self.enable_reuse = enable_reuse
    # Pop from the end: hand out low page ids first (easier to read in a debugger).
    self._free: list[int] = list(range(num_pages - 1, -1, -1))
    self._pages: list[list[int]] = [[] for _ in range(batch_slots)]
    self._table = np.full((batch_slots, max_pages_per_seq), -1, np.int32)
    self._refs = np.zeros(num_pages, np.int32)  # sequences holding each page
    self._page_of: dict[bytes, int] = {}  # hash-chain key -> registered page
    self._key_of: dict[int, bytes] = {}   # registered page -> its key
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unheld registered pages, oldest first
    self.stats = collections.Counter()  # hit_pages, queried_pages, evicted_cached_pages

  # -- queries ---------------------------------------------------------------
  @property
  def free_pages(self) -> int:
    """Pages a new sequence can take: free ones plus cached ones nobody holds."""
    return len(self._free) + len(self._lru)

  @property
  def used_pages(self) -> int:
    """Pages held by at least one sequence."""
    return self.num_pages - self.free_pages

  @property
  def cached_pages(self) -> int:
    """Registered pages nobody holds (evictable)."""
    return len(self._lru)

  def refcount(self, page: int) -> int:
    return int(self._refs[page])

  def pages(self, slot: int) -> list[int]:
    self._check_slot(slot)
    return list(self._pages[slot])

  def pages_for(self, num_tokens: int) -> int:
    return math.ceil(num_tokens / self.page_size)

  def table(self) -> np.ndarray:
    return self._table.copy()

  def free_slots(self) -> list[int]:
    return [s for s in range(self.batch_slots) if not self._pages[s]]

  def match_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
    """Registered pages holding the longest cached prefix of `token_ids`, at most `max_tokens`
    tokens (default: all but the last token, whose logits a prefill must compute). Counts
    hits in `stats`; takes no reference (see `share`)."""
    if not self.enable_reuse:
      return []
    limit = len(token_ids) - 1 if max_tokens is None else min(max_tokens, len(token_ids))
    keys = page_hashes(token_ids[:max(limit, 0)], self.page_size)
    found = []
    for key in keys:
      page = self._page_of.get(key)
      if page is None:
        break
      found.append(page)
    self.stats["queried_pages"] += len(keys)
    self.stats["hit_pages"] += len(found)
    return found

  # -- updates ---------------------------------------------------------------
  def share(self, slot: int, pages: Sequence[int]) -> None:
    """Makes an empty `slot` start with the given registered pages (one more reference each)."""
    self._check_slot(slot)
    if self._pages[slot]:
      raise ValueError(f"slot {slot} already holds {len(self._pages[slot])} pages; share() starts a sequence")
    if len(pages) > self.max_pages_per_seq:
      raise CacheExhaustedError(f"slot {slot}: {len(pages)} shared pages exceed max_pages_per_seq="
                                f"{self.max_pages_per_seq}")
    unknown = [p for p in pages if p not in self._key_of]
    if unknown:
      raise ValueError(f"pages {unknown[:5]} are not registered in the prefix cache")
    for p in pages:
      self._hold(p)
    self._pages[slot] = list(pages)
    self._table[slot, :len(pages)] = pages

  def register(self, slot: int, token_ids: Sequence[int], pages: Sequence[int] | None = None) -> int:
    """Registers the full pages of `token_ids` (the tokens stored from position 0) held by `slot`
    (or the given page ids, e.g. a row that compaction is about to replace). A key that is
    already registered keeps its page (the duplicate stays private). Returns pages registered."""
    if not self.enable_reuse:
      return 0
    pages = self._pages[slot] if pages is None else list(pages)
    added = 0
    for key, page in zip(page_hashes(token_ids, self.page_size), pages):
      if key in self._page_of or page in self._key_of:
        continue
      self._page_of[key] = page
      self._key_of[page] = key
      added += 1
    return added

  def ensure(self, slot: int, num_tokens: int) -> list[int]:
    """Makes `slot` hold pages for at least `num_tokens` tokens; returns the new page ids."""
    self._check_slot(slot)
    if num_tokens < 0:
      raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    need = self.pages_for(num_tokens)
    if need > self.max_pages_per_seq:
      raise CacheExhaustedError(
          f"slot {slot}: {num_tokens} tokens need {need} pages of {self.page_size} tokens, more than "
          f"max_pages_per_seq={self.max_pages_per_seq} (max_seq_len={self.max_pages_per_seq * self.page_size})")
    extra = need - len(self._pages[slot])
    if extra <= 0:
      return []
    new = self.take(extra, f"slot {slot} needs {extra} more pages for {num_tokens} tokens")
    start = len(self._pages[slot])
    self._pages[slot].extend(new)
    self._table[slot, start:start + extra] = new
    return new

  def take(self, count: int, why: str = "") -> list[int]:
    """`count` pages held by nobody yet, one reference each (free ones first, then the least
    recently used cached ones, which leave the prefix cache)."""
    if count > self.free_pages:
      raise CacheExhaustedError(
          f"KV cache exhausted: {why or f'{count} pages requested'} but only {self.free_pages} of "
          f"{self.num_pages} pages are free")
    new = []
    for _ in range(count):
      if self._free:
        page = self._free.pop()
      else:
        page, _ = self._lru.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        self.stats["evicted_cached_pages"] += 1
      self._refs[page] = 1
      new.append(page)
    return new

  def drop(self, pages: Sequence[int]) -> None:
    """Gives up one reference to each page (pages from `take` that no slot row holds)."""
    for p in pages:
      self._unhold(p)

  def replace_row(self, slot: int, pages: Sequence[int]) -> list[int]:
    """Gives `slot` a new row of pages it already holds a reference to (from `take`); drops its
    old row's references (registered pages stay cached). Returns the old row."""
    self._check_slot(slot)
    if len(pages) > self.max_pages_per_seq:
      raise CacheExhaustedError(f"slot {slot}: {len(pages)} pages exceed max_pages_per_seq={self.max_pages_per_seq}")
    old = self._pages[slot]
    self._pages[slot] = list(pages)
    self._table[slot, :] = -1
    self._table[slot, :len(pages)] = pages
    self.drop(old)
    return old

  def truncate(self, slot: int, num_tokens: int) -> list[int]:
    """Keeps the pages holding the first `num_tokens` tokens of `slot`; releases the rest."""
    self._check_slot(slot)
    keep = self.pages_for(num_tokens)
    released = self._pages[slot][keep:]
    self._pages[slot] = self._pages[slot][:keep]
    self._table[slot, keep:] = -1
    self.drop(reversed(released))
    return released

  def release_pages(self, slot: int, logical_pages: list[int]) -> list[int]:
    """Releases the given logical pages of `slot` and closes the gap (eviction).

    The surviving pages keep their order; the page table row is rewritten.
    """
    self._check_slot(slot)
    drop = set(logical_pages)
    if any(p < 0 or p >= len(self._pages[slot]) for p in drop):
      raise ValueError(f"slot {slot}: logical pages {sorted(drop)} out of range 0..{len(self._pages[slot]) - 1}")
    released = [pid for i, pid in enumerate(self._pages[slot]) if i in drop]
    self._pages[slot] = [pid for i, pid in enumerate(self._pages[slot]) if i not in drop]
    self._table[slot, :] = -1
    self._table[slot, :len(self._pages[slot])] = self._pages[slot]
    self.drop(reversed(released))
    return released

  def recycle_pages(self, slot: int, logical_pages: list[int]) -> list[int]:
    """Eviction without giving pages up: the given logical pages of `slot` (their tokens are
    dropped) move to the end of its row, where they will hold the sequence's next tokens.
    Returns their page ids. The slot keeps its page count, so it can never run out mid-decode.
    Recycled pages will be overwritten, so they leave the prefix cache; a page another
    sequence also holds cannot be recycled (ValueError)."""
    self._check_slot(slot)
    drop = set(logical_pages)
    row = self._pages[slot]
    if any(p < 0 or p >= len(row) for p in drop):
      raise ValueError(f"slot {slot}: logical pages {sorted(drop)} out of range 0..{len(row) - 1}")
    moved = [pid for i, pid in enumerate(row) if i in drop]
    shared = [p for p in moved if self._refs[p] > 1]
    if shared:
      raise ValueError(f"slot {slot}: pages {shared[:5]} are shared with other sequences and cannot be recycled")
    for p in moved:
      key = self._key_of.pop(p, None)
      if key is not None:
        del self._page_of[key]
    self._pages[slot] = [pid for i, pid in enumerate(row) if i not in drop] + moved
    self._table[slot, :len(row)] = self._pages[slot]
    return moved

  def free(self, slot: int) -> list[int]:
    return self.truncate(slot, 0)

  def clear_cache(self) -> int:
    """Forgets every cached page nobody holds (they become free); returns how many."""
    n = len(self._lru)
    for page in self._lru:
      del self._page_of[self._key_of.pop(page)]
      self._free.append(page)
    self._lru.clear()
    return n

  def _hold(self, page: int) -> None:
    if self._refs[page] == 0:
      self._lru.pop(page)
    self._refs[page] += 1

  def _unhold(self, page: int) -> None:
    if self._refs[page] <= 0:
      raise RuntimeError(f"page {page} released more often than it was taken")
    self._refs[page] -= 1
    if self._refs[page] == 0:
      if page in self._key_of:
        self._lru[page] = None  # most recently used last
      else:
        self._free.append(page)

  def _check_slot(self, slot: int) -> None:
    if not 0 <= slot < self.batch_slots:
      raise ValueError(f"slot {slot} out of range 0..{self.batch_slots - 1}")


# -- pure cache updates (inside jit) -------------------------------------------

def token_slots(page_table_rows: jax.Array, token_pos: jax.Array, valid: jax.Array, page_size: int,
                num_pages: int) -> jax.Array:
  """Flat pool slot (page * page_size + offset) of each token; invalid tokens -> out of range.

  page_table_rows: int32[n, max_pages]; token_pos: int32[n, T] logical positions; valid: bool[n, T].
  Returns int32[n, T] in [0, num_pages * page_size] where num_pages * page_size means "drop".
  """
  logical_page = token_pos // page_size
  max_pages = page_table_rows.shape[1]
  page = jnp.take_along_axis(page_table_rows, jnp.clip(logical_page, 0, max_pages - 1), axis=1)
  ok = valid & (page >= 0) & (logical_page < max_pages)
  return jnp.where(ok, page * page_size + token_pos % page_size, num_pages * page_size)


def write_tokens(pool: jax.Array, flat_slots: jax.Array, values: jax.Array) -> jax.Array:
  """Scatters per-token values into a pool (in place when the pool is donated).

  pool: [heads, num_pages, page_size, *feat]; flat_slots: int32[N] (out of range = dropped);
  values: [N, heads, *feat].
  """
  heads, num_pages, page_size = pool.shape[:3]
  feat = pool.shape[3:]
  flat = pool.reshape(heads, num_pages * page_size, *feat)
  flat = flat.at[:, flat_slots].set(jnp.moveaxis(values, 0, 1).astype(pool.dtype), mode="drop")
  return flat.reshape(pool.shape)


def gather_tokens(pool: jax.Array, page_table_rows: jax.Array, max_tokens: int) -> jax.Array:
  """Reads the first `max_tokens` logical tokens of some sequences (reference paths, tests).

  pool: [heads, num_pages, page_size, *feat]; page_table_rows: int32[n, max_pages].
  Returns [n, heads, max_tokens, *feat] (tokens of missing pages read page 0; mask them).
  """
  page_size = pool.shape[2]
  n_pages = math.ceil(max_tokens / page_size)
  pages = jnp.clip(page_table_rows[:, :n_pages], 0)
  g = pool[:, pages]  # [heads, n, n_pages, page_size, *feat]
  g = g.reshape(pool.shape[0], pages.shape[0], n_pages * page_size, *pool.shape[3:])[:, :, :max_tokens]
  return jnp.moveaxis(g, 1, 0)

