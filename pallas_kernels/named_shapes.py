"""Named shapes shared by the kernel tests (``test_*``: small, interpret mode on the CPU)
and the benchmarks (``bench_*``: the H100 goals), so what is tested is what is measured.

Each ``*_case`` builder turns a shape and a seed into kernel inputs: fresh random values,
physical pages in a random permutation (contiguous pages cannot hide an indexing bug),
optionally ragged lengths and NaN poison in every pool slot the kernel must not read.
Index structures are built with numpy on the host; big value arrays with jax.random on the
default device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


_HOST_RNG_MAX_ELEMENTS = 1 << 20


def _values(key, shape, dtype, poison_mask=None):
  """Standard-normal values; NaN where ``poison_mask`` (numpy bool, broadcastable).
  Small arrays come from numpy (no compile), big ones from jax.random on the device."""
  if np.prod(shape) <= _HOST_RNG_MAX_ELEMENTS:
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    x = rng.standard_normal(shape, dtype=np.float32)
    if poison_mask is not None:
      x = np.where(poison_mask, np.nan, x)
    return jnp.asarray(x).astype(dtype)
  x = jax.random.normal(key, shape, jnp.float32)
  if poison_mask is not None:
    x = jnp.where(jnp.asarray(poison_mask), jnp.nan, x)
  return x.astype(dtype)


# ----------------------------------------------------------------------------------------
# Paged / block-sparse decode attention
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  batch: int
  q_heads: int
  kv_heads: int
  head_dim: int
  page_size: int
  unit_size: int  # gather granule (divides page_size)
  context: int  # tokens stored per sequence (the maximum when ragged)
  selected: int | None  # tokens listed per kv head; None = dense (every unit of the context)
  dtype: str = "bfloat16"
  ragged: bool = False  # random per-(row, head) selections (incl. empty, partial last unit)
  extra_units: int = 0  # -1 padding beyond the largest selection
  spare_pages: int = 0  # pool pages no sequence owns


DECODE_SHAPES: dict[str, DecodeShape] = {
    # Tests (interpret mode): groups 1/4/8, head_dim 64/128, units 4/8/16/32, f32 and bf16.
    "test_g1_d64_u4_f32": DecodeShape(2, 4, 4, 64, 8, 4, 64, 24, "float32", True, 3, 3),
    "test_g4_d128_u8_bf16": DecodeShape(2, 8, 2, 128, 16, 8, 128, 48, "bfloat16", True, 2, 2),
    "test_g8_d64_u16_f32": DecodeShape(2, 16, 2, 64, 32, 16, 128, 64, "float32", True, 1, 1),
    "test_g4_d64_u32_dense_bf16": DecodeShape(2, 8, 2, 64, 32, 32, 160, None, "bfloat16",
                                              True, 1, 2),
    "test_g4_d128_u4_f32": DecodeShape(3, 8, 2, 128, 16, 4, 96, 32, "float32", True, 0, 2),
    # Benchmarks (H100): batch 8, 32 q heads / 8 kv heads, D 128, bf16, 32-token pages.
    "bench_b8_h32_kv8_d128_ctx32k_sel2k": DecodeShape(8, 32, 8, 128, 32, 4, 32768, 2048),
    "bench_b8_h32_kv8_d128_ctx64k_sel2k": DecodeShape(8, 32, 8, 128, 32, 4, 65536, 2048),
    "bench_b8_h32_kv8_d128_ctx128k_sel2k": DecodeShape(8, 32, 8, 128, 32, 4, 131072, 2048),
    "bench_b8_h32_kv8_d128_ctx128k_sel8k": DecodeShape(8, 32, 8, 128, 32, 4, 131072, 8192),
    "bench_b8_h32_kv8_d128_ctx128k_sel16k": DecodeShape(8, 32, 8, 128, 32, 4, 131072,
                                                        16384),
    "bench_b8_h32_kv8_d128_ctx32k_dense": DecodeShape(8, 32, 8, 128, 32, 32, 32768, None),
    "bench_b8_h32_kv8_d128_ctx64k_dense": DecodeShape(8, 32, 8, 128, 32, 32, 65536, None),
    "bench_b8_h32_kv8_d128_ctx128k_dense": DecodeShape(8, 32, 8, 128, 32, 32, 131072, None),
}


@dataclasses.dataclass
class DecodeCase:
  q: jax.Array  # [batch, q_heads, D]
  k_pages: jax.Array  # [kv_heads, num_pages, page_size, D]   (the pool)
  v_pages: jax.Array
  unit_ids: jax.Array  # int32[batch, kv_heads, max_units]
  kv_lens: jax.Array  # int32[batch, kv_heads]
  page_table: np.ndarray  # int32[batch, pages_per_seq] (permuted physical pages)
  seq_lens: np.ndarray  # int32[batch] tokens stored per sequence
  unit_size: int

  @property
  def k_units(self) -> jax.Array:
    """The pool viewed at gather granularity: [kv_heads, num_units, unit_size, D]."""
    return _unit_view(self.k_pages, self.unit_size)

  @property
  def v_units(self) -> jax.Array:
    return _unit_view(self.v_pages, self.unit_size)

  def kernel_args(self):
    return (self.q, self.k_units, self.v_units, self.unit_ids, self.kv_lens)


def _unit_view(pages, unit_size):
  heads, num_pages, page_size, dim = pages.shape
  return pages.reshape(heads, num_pages * page_size // unit_size, unit_size, dim)


def decode_case(shape: DecodeShape, seed: int = 0, *, poison: bool = False) -> DecodeCase:
  """Random inputs for :func:`pallas_kernels.paged_decode.paged_decode_attention`."""
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  s = shape
  if s.page_size % s.unit_size or s.context % s.page_size:
    raise ValueError(f"unit_size | page_size | context violated by {s}")
  units_per_page = s.page_size // s.unit_size
  pages_per_seq = s.context // s.page_size
  num_pages = s.batch * pages_per_seq + s.spare_pages
  page_table = rng.permutation(num_pages)[: s.batch * pages_per_seq].reshape(
      s.batch, pages_per_seq).astype(np.int32)

  if s.ragged:
    seq_lens = rng.integers(0, s.context + 1, size=s.batch)
    seq_lens[rng.integers(s.batch)] = s.context  # one full row
  else:
    seq_lens = np.full(s.batch, s.context)
  seq_lens = seq_lens.astype(np.int32)

  if s.selected is None:
    cap = _cdiv(s.context, s.unit_size)
  else:
    cap = s.selected // s.unit_size
  max_units = cap + s.extra_units
  unit_ids = np.full((s.batch, s.kv_heads, max_units), -1, np.int32)
  kv_lens = np.zeros((s.batch, s.kv_heads), np.int32)
  readable = np.zeros((s.kv_heads, num_pages * units_per_page, s.unit_size), bool)
  for b in range(s.batch):  # host loop: fine up to the bench shapes (8 x 8 selections)
    stored_units = _cdiv(int(seq_lens[b]), s.unit_size)
    for h in range(s.kv_heads):
      if s.selected is None:
        logical = np.arange(stored_units)
      else:
        count = min(cap, stored_units)
        if s.ragged:
          count = int(rng.integers(0, count + 1))
        logical = np.sort(rng.choice(stored_units, size=count, replace=False))
      # Valid tokens of the concatenation: the stored tokens of the listed units; the
      # sequence's own partial last unit can only be the last one listed.
      valid = len(logical) * s.unit_size
      if len(logical) and logical[-1] == stored_units - 1:
        valid -= stored_units * s.unit_size - int(seq_lens[b])
      if s.ragged and valid > 0 and rng.random() < 0.5:
        valid -= int(rng.integers(0, min(valid, s.unit_size)))  # shorter kv_len
      physical = (page_table[b, logical // units_per_page] * units_per_page
                  + logical % units_per_page)
      unit_ids[b, h, : len(logical)] = physical
      kv_lens[b, h] = valid
      if poison:
        for t in range(valid):
          readable[h, physical[t // s.unit_size], t % s.unit_size] = True

  pool_shape = (s.kv_heads, num_pages, s.page_size, s.head_dim)
  poison_mask = None
  if poison:
    poison_mask = ~readable.reshape(s.kv_heads, num_pages, s.page_size, 1)
  kq, kk, kv = jax.random.split(key, 3)
  dtype = jnp.dtype(s.dtype)
  return DecodeCase(
      q=_values(kq, (s.batch, s.q_heads, s.head_dim), dtype),
      k_pages=_values(kk, pool_shape, dtype, poison_mask),
      v_pages=_values(kv, pool_shape, dtype, poison_mask),
      unit_ids=jnp.asarray(unit_ids),
      kv_lens=jnp.asarray(kv_lens),
      page_table=page_table,
      seq_lens=seq_lens,
      unit_size=s.unit_size,
  )


# ----------------------------------------------------------------------------------------
# Compaction
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompactionShape:
  batch_slots: int  # rows of the page table
  compacted: int  # rows compacted (len(slots))
  kv_heads: int
  head_dim: int
  page_size: int
  prompt: int  # tokens stored per row (the maximum when ragged)
  budget: int  # kept tokens per head (the maximum when ragged)
  dtype: str = "bfloat16"
  aux_features: tuple[int, ...] | None = None  # an extra per-token f32 pool
  ragged: bool = False
  spare_pages: int = 0


COMPACTION_SHAPES: dict[str, CompactionShape] = {
    "test_p4_d16_f32_aux": CompactionShape(4, 3, 2, 16, 4, 40, 16, "float32", (2,), True, 3),
    "test_p8_d64_bf16": CompactionShape(3, 3, 2, 64, 8, 64, 24, "bfloat16", None, True, 2),
    "test_p16_d128_bf16_aux": CompactionShape(2, 1, 1, 128, 16, 96, 40, "bfloat16", (3, 2),
                                              True, 1),
    # 32K prompt -> 2048 tokens per kv head, batch 8, kv 8, D 128, bf16 (K and V pools).
    "bench_b8_kv8_d128_p32k_keep2k": CompactionShape(8, 8, 8, 128, 32, 32768, 2048),
}


@dataclasses.dataclass
class CompactionCase:
  pools: tuple[jax.Array, ...]  # K, V[, aux]: [kv_heads, num_pages, page_size, *feature]
  page_table: jax.Array  # int32[batch_slots, max_pages]
  slots: jax.Array  # int32[n]
  keep_indices: jax.Array  # int32[n, kv_heads, budget]
  keep_counts: jax.Array  # int32[n]
  seq_lens: np.ndarray  # int32[batch_slots]

  def kernel_args(self):
    return (self.pools, self.page_table, self.slots, self.keep_indices, self.keep_counts)


def random_keep_indices(rng, length: int, count: int, heads: int, budget: int):
  """Per head ``count`` ascending unique positions in [0, length), -1 padded to budget."""
  keep = np.full((heads, budget), -1, np.int32)
  for h in range(heads):
    keep[h, :count] = np.sort(rng.choice(length, size=count, replace=False))
  return keep


def compaction_case(shape: CompactionShape, seed: int = 0) -> CompactionCase:
  """Random inputs for :func:`pallas_kernels.compaction.compact_pages`."""
  rng = np.random.default_rng(seed)
  s = shape
  pages_per_row = _cdiv(s.prompt, s.page_size)
  num_pages = s.batch_slots * pages_per_row + s.spare_pages
  physical = rng.permutation(num_pages)
  page_table = np.full((s.batch_slots, pages_per_row), -1, np.int32)
  seq_lens = np.zeros(s.batch_slots, np.int32)
  for r in range(s.batch_slots):
    length = int(rng.integers(1, s.prompt + 1)) if s.ragged else s.prompt
    used = _cdiv(length, s.page_size)
    page_table[r, :used] = physical[r * pages_per_row: r * pages_per_row + used]
    seq_lens[r] = length
  slots = rng.permutation(s.batch_slots)[: s.compacted].astype(np.int32)
  keep = np.full((s.compacted, s.kv_heads, s.budget), -1, np.int32)
  counts = np.zeros(s.compacted, np.int32)
  for i, r in enumerate(slots):
    count = min(s.budget, int(seq_lens[r]))
    if s.ragged:
      count = int(rng.integers(0, count + 1))
    counts[i] = count
    keep[i] = random_keep_indices(rng, int(seq_lens[r]), count, s.kv_heads, s.budget)

  key = jax.random.key(seed)
  keys = jax.random.split(key, 3)
  base = (s.kv_heads, num_pages, s.page_size)
  dtype = jnp.dtype(s.dtype)
  pools = [_values(keys[0], base + (s.head_dim,), dtype),
           _values(keys[1], base + (s.head_dim,), dtype)]
  if s.aux_features is not None:
    pools.append(_values(keys[2], base + tuple(s.aux_features), jnp.float32))
  return CompactionCase(tuple(pools), jnp.asarray(page_table), jnp.asarray(slots),
                        jnp.asarray(keep), jnp.asarray(counts), seq_lens)


# ----------------------------------------------------------------------------------------
# RocketKV KT-cache scoring
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RocketShape:
  batch: int
  q_heads: int
  kv_heads: int
  head_dim: int
  page_size: int
  block_size: int  # tokens per KT block (divides page_size)
  tokens: int  # tokens stored per row (the maximum when ragged)
  max_pages: int  # page-table width (capacity; >= pages in use)
  kt_dtype: str = "float8_e5m2"
  topr: int = 32
  ragged: bool = False
  spare_pages: int = 0


ROCKET_SHAPES: dict[str, RocketShape] = {
    "test_g4_d64_b4_f32": RocketShape(3, 8, 2, 64, 16, 4, 80, 7, "float32", 16, True, 3),
    "test_g1_d128_b8_bf16": RocketShape(2, 2, 2, 128, 32, 8, 96, 4, "bfloat16", 128, True, 1),
    "test_g8_d64_b4_fp8": RocketShape(2, 16, 2, 64, 16, 4, 64, 6, "float8_e5m2", 8, True, 2),
    "test_g4_d128_b4_f32_topr1": RocketShape(2, 8, 2, 128, 8, 4, 40, 5, "float32", 1, True,
                                             1),
    # After compaction: 2048 kept tokens per kv head, 4-token blocks, 16-token pages,
    # a page table sized for a 32K context.
    "bench_b8_h32_kv8_d128_keep2k_fp8": RocketShape(8, 32, 8, 128, 16, 4, 2048, 2048,
                                                    "float8_e5m2", 32),
    "bench_b8_h32_kv8_d128_keep2k_bf16": RocketShape(8, 32, 8, 128, 16, 4, 2048, 2048,
                                                     "bfloat16", 32),
}


@dataclasses.dataclass
class RocketCase:
  q: jax.Array  # [batch, q_heads, D]
  kt: jax.Array  # [kv_heads, num_pages, blocks_per_page, 2, D]
  page_table: jax.Array  # int32[batch, max_pages]
  lengths: jax.Array  # int32[batch]

  def kernel_args(self):
    return (self.q, self.kt, self.page_table, self.lengths)


def rocket_case(shape: RocketShape, seed: int = 0, *, poison: bool = False) -> RocketCase:
  """Random inputs for :func:`pallas_kernels.rocket_score.rocket_block_scores`."""
  rng = np.random.default_rng(seed)
  s = shape
  blocks_per_page = s.page_size // s.block_size
  pages_per_row = _cdiv(s.tokens, s.page_size)
  if pages_per_row > s.max_pages:
    raise ValueError(f"max_pages {s.max_pages} < pages needed {pages_per_row}")
  num_pages = s.batch * pages_per_row + s.spare_pages
  physical = rng.permutation(num_pages)
  page_table = np.full((s.batch, s.max_pages), -1, np.int32)
  lengths = np.zeros(s.batch, np.int32)
  readable = np.zeros((num_pages, blocks_per_page), bool)
  for b in range(s.batch):
    length = int(rng.integers(0, s.tokens + 1)) if s.ragged else s.tokens
    used = _cdiv(length, s.page_size)
    page_table[b, :used] = physical[b * pages_per_row: b * pages_per_row + used]
    lengths[b] = length
    for t in range(_cdiv(length, s.block_size)):
      readable[page_table[b, t // blocks_per_page], t % blocks_per_page] = True

  kq, kk = jax.random.split(jax.random.key(seed))
  keys = _values(kk, (s.kv_heads, num_pages, blocks_per_page, 2, s.head_dim), jnp.float32)
  kt = jnp.stack([keys.min(axis=3), keys.max(axis=3)], axis=3)  # min <= max
  if poison:
    kt = jnp.where(jnp.asarray(~readable)[None, :, :, None, None], jnp.nan, kt)
  return RocketCase(
      q=_values(kq, (s.batch, s.q_heads, s.head_dim),
                jnp.float32 if s.kt_dtype == "float32" else jnp.bfloat16),
      kt=kt.astype(jnp.dtype(s.kt_dtype)),
      page_table=jnp.asarray(page_table),
      lengths=jnp.asarray(lengths),
  )
