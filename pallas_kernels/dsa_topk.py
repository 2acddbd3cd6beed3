"""Exact top-k token selection for DSA: the k best scores of each row, as sorted token ids.

    dsa_topk(scores float32[B, N], k) -> int32[B, k]

Row b's result holds the indices of its min(k, valid) largest scores, ascending, then -1.
A score is valid unless it is -inf or NaN. Ties at the k-th value are broken towards the
lower index, so the result is unique (the same contract as `lax.top_k`, whose order we
then sort).

Both kernels are exact radix selects (MSB first, 8 bits per pass) on order-preserving int32
keys; a pass histograms one digit of the keys that match the prefix of the k-th key found
so far (a 16x16 one-hot matmul on the tensor cores instead of 256 compares per key).

kernel="row" (default): ONE launch, one program per row, every histogram on chip:

  pass 1      the row's top digit (or the sum of first-pass histograms that the scoring
              kernel made as it went: `histograms=`, see pallas_kernels/dsa_indexer.py).
  compaction  one read of the row: every key at or above the pass-1 bucket goes, with its
              id and in id order, to a per-row candidate list (the scatter needs them all;
              passes 2-4 only look at the bucket). Taken from the top bucket down, that is
              about k keys plus the bucket holding the k-th.
  passes 2-4  histograms over the candidates only; skipped once the bucket holding the
              k-th key is taken whole.
  scatter     each taken candidate writes its id at its rank (ties: lowest ids first), so
              the output comes out sorted with no sort; then the -1 padding.

  The row is read twice (once with `histograms=`); nothing runs between the passes. One
  program per row keeps the whole select in registers, but a batch of 8 keeps only 8 SMs busy.

kernel="chunked": the row split over (row, chunk) programs in six launches (four histogram
  passes summed over chunks in XLA, a count, a scatter): more programs, more launches, no
  atomics (Triton's atomic adds into an aliased histogram read back as zeros on the H100
  with jax 0.11.2). At N=128K, B=8 each pass reads the 4 MB of scores from L2.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import _compat
from pallas_kernels.common import check_backend

KERNELS = ("row", "chunked")
_PASSES = 4
_INT32_MIN = np.int32(-2 ** 31)


# -- order-preserving keys ---------------------------------------------------------------

def order_key(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (signed compare); -0.0 < +0.0 is harmless."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _digit(key: jax.Array, level: int) -> jax.Array:
  """Bits [32 - 8*level, 40 - 8*level) of the key as 0..255, in the keys' order."""
  d = jax.lax.shift_right_arithmetic(key, jnp.int32(32 - 8 * level)) & 255
  return d ^ 128 if level == 1 else d


def _top_bits(key: jax.Array, level: int) -> jax.Array:
  """The top 8*level bits, order-preserving (arithmetic shift); level 4 = the key."""
  return key if level == _PASSES else jax.lax.shift_right_arithmetic(key, jnp.int32(32 - 8 * level))


# -- the select state, derived from the pass histograms ---------------------------------------

def _next_state(state, hist, k, level):
  """state = (prefix, k_rem, full, level_done) after `level - 1` passes; hist int32[16, 16] of
  pass `level` -> the state after it. All scalars int32/bool; plain jnp (kernels and host)."""
  prefix, k_rem, full, done = state
  lanes = jnp.arange(16, dtype=jnp.int32)
  flat = lanes[:, None] * 16 + lanes[None, :]
  # Suffix counts by 16x16 triangular matmuls, not scans: no cumsum over the small, oddly laid
  # out tensors of this prologue. The counts go in as three 8-bit pieces in bfloat16, exact under
  # any dot precision (a float32 dot may run as TF32 on the GPU, exact only up to 2048; a 32K
  # context overflows that), each summed in float32 (16 x 255 is exact) and recombined in int32.
  lo_ge = (lanes[:, None] >= lanes[None, :]).astype(jnp.bfloat16)          # [lo', lo] = lo' >= lo
  hi_gt = (lanes[None, :] > lanes[:, None]).astype(jnp.bfloat16)           # [hi, hi'] = hi' > hi
  within = jnp.zeros((16, 16), jnp.int32)                                  # same hi, lo' >= lo
  higher = jnp.zeros((16,), jnp.int32)                                     # hi' > hi
  for shift in (0, 8, 16):
    piece = ((hist >> shift) & 255).astype(jnp.bfloat16)
    w = jax.lax.dot(piece, lo_ge, preferred_element_type=jnp.float32).astype(jnp.int32)
    h = jnp.sum(jax.lax.dot(hi_gt, piece, preferred_element_type=jnp.float32).astype(jnp.int32), axis=1)
    within, higher = within + (w << shift), higher + (h << shift)
  count_ge = higher[:, None] + within                                      # keys with digit >= hi * 16 + lo
  total = jnp.sum(hist)
  d_star = jnp.sum((count_ge >= k_rem).astype(jnp.int32)) - 1
  in_bucket = jnp.sum(jnp.where(flat == d_star, hist, 0))
  above = jnp.sum(jnp.where(flat > d_star, hist, 0))
  new_prefix = (d_star - 128) if level == 1 else prefix * 256 + d_star
  new_k_rem = k_rem - above
  # Selects between traced values only: Triton's lowering mistypes selects of weak constants.
  if level == 1:
    all_valid = total <= k          # fewer valid keys than k: take them all (level 0, full)
    return (jnp.where(all_valid, new_prefix * 0, new_prefix), jnp.where(all_valid, total, new_k_rem),
            all_valid | (in_bucket == new_k_rem), 1 - all_valid.astype(jnp.int32))
  keep = full
  return (jnp.where(keep, prefix, new_prefix), jnp.where(keep, k_rem, new_k_rem),
          keep | (in_bucket == new_k_rem), jnp.where(keep, done, done * 0 + level))


def _state_after(hists, k, levels):
  """hists: callable level -> int32[16, 16]. The state after `levels` passes."""
  state = (jnp.int32(0), jnp.int32(k), jnp.bool_(False), jnp.int32(0))
  for level in range(1, levels + 1):
    state = _next_state(state, hists(level), k, level)
  return state


def _classify(key, valid, state):
  """(strictly above the threshold bucket, inside it) for keys under a final state."""
  prefix, _, _, done = state
  above = valid & (done == 0)                      # level 0: every valid key, none "equal"
  equal = valid & False
  for level in range(1, _PASSES + 1):
    top = _top_bits(key, level)
    at = done == level
    above = above | (valid & at & (top > prefix))
    equal = equal | (valid & at & (top == prefix))
  return above, equal


# -- kernels ------------------------------------------------------------------------------

def _load_block(scores_ref, row, start, block, n):
  idx = start + jnp.arange(block, dtype=jnp.int32)
  x = plt.load(scores_ref.at[row, pl.ds(start, block)], mask=idx < n, other=-jnp.inf)
  valid = (idx < n) & (x > -jnp.inf)                       # NaN > -inf is False: invalid
  return idx, order_key(x), valid


def digit_histogram(key: jax.Array, match: jax.Array, level: int) -> jax.Array:
  """float32[16, 16] counts of the `level` digit (hi nibble, lo nibble) of the keys where
  `match`: a one-hot [16, n] x [n, 16] matmul on the tensor cores instead of 256 compares."""
  lanes = jnp.arange(16, dtype=jnp.int32)
  d = _digit(key, level)
  hi = ((d[None, :] >> 4) == lanes[:, None]) & match[None, :]               # [16, n]
  lo = (d[:, None] & 15) == lanes[None, :]                                   # [n, 16]
  return jax.lax.dot(hi.astype(jnp.bfloat16), lo.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def first_pass_histograms(scores: jax.Array) -> jax.Array:
  """int32[B, 1, 16, 16]: each row's pass-1 histogram (plain jnp), in the layout of
  `dsa_topk(histograms=)`: int32[B, P, 16, 16] partial histograms that add up to the row's.

  Kernels that produce the scores (pallas_kernels/dsa_indexer.py) fill one part per program
  as they go; dsa_topk then skips its first pass and adds the parts up itself.
  """
  x = scores.astype(jnp.float32)
  valid = x > -jnp.inf
  d = _digit(order_key(x), 1)
  hist = jnp.sum((d[..., None] == jnp.arange(256)) & valid[..., None], axis=1, dtype=jnp.int32)
  return hist.reshape(-1, 1, 16, 16)


# -- kernel="row": the whole select of a row in one program --------------------------------------

def _row_kernel(scores_ref, parts_ref, out_ref, cand_key_ref, cand_id_ref, hist_ref, *, k, n, block, interpret):
  """One row: pass 1 (or the sum of `parts_ref`), compaction, passes 2-4 over the candidates,
  scatter. cand_*_ref: int32[B, n + block] per-row candidate lists (keys, ids); the `block`
  tail only takes interpret mode's writes of masked lanes. hist_ref: int32[B, 4, 16, 16], the
  pass histograms, for diagnostics."""
  row = pl.program_id(0)
  lanes = jnp.arange(block, dtype=jnp.int32)
  n_blocks = pl.cdiv(n, block)
  zeros = jnp.zeros((16, 16), jnp.float32)

  if parts_ref is None:
    def pass_one(i, acc):
      _, key, valid = _load_block(scores_ref, row, i * block, block, n)
      return acc + digit_histogram(key, valid, 1)
    hist = jax.lax.fori_loop(0, n_blocks, pass_one, zeros).astype(jnp.int32)
  else:
    hist = parts_ref[row, 0]
    for p in range(1, parts_ref.shape[1]):
      hist = hist + parts_ref[row, p]
  hist_ref[row, 0] = hist
  state = _next_state((jnp.int32(0), jnp.int32(k), jnp.bool_(False), jnp.int32(0)), hist, k, 1)
  prefix, _, _, done = state

  def compact(i, count):
    idx, key, valid = _load_block(scores_ref, row, i * block, block, n)
    keep = valid & ((done == 0) | (_top_bits(key, 1) >= prefix))       # done == 0: every valid key
    rank = count + jnp.cumsum(keep.astype(jnp.int32)) - 1
    where = jnp.where(keep, rank, n + lanes)   # masked lanes: distinct in-bounds addresses (interpret mode)
    plt.store(cand_key_ref.at[row, where], key, mask=keep)
    plt.store(cand_id_ref.at[row, where], idx, mask=keep)
    return count + jnp.sum(keep.astype(jnp.int32))

  n_cand = jax.lax.fori_loop(0, n_blocks, compact, jnp.int32(0))
  cand_blocks = (n_cand + block - 1) // block
  # The candidates were written by other threads of this program: make them visible.
  _compat.cta_barrier(interpret)

  def load_candidates(i):
    pos = i * block + lanes
    ok = pos < n_cand
    key = plt.load(cand_key_ref.at[row, pl.ds(i * block, block)], mask=ok, other=0)
    idx = plt.load(cand_id_ref.at[row, pl.ds(i * block, block)], mask=ok, other=0)
    return idx, key, ok

  for level in range(2, _PASSES + 1):
    prefix, _, full, _ = state

    def histogram(i, acc, prefix=prefix, level=level):
      _, key, ok = load_candidates(i)
      return acc + digit_histogram(key, ok & (_top_bits(key, level - 1) == prefix), level)

    trips = cand_blocks * (1 - full.astype(jnp.int32))          # none once the bucket is taken whole
    hist = jax.lax.fori_loop(0, trips, histogram, zeros).astype(jnp.int32)
    hist_ref[row, level - 1] = hist
    state = _next_state(state, hist, k, level)

  _, k_rem, full, _ = state

  def scatter(i, carry):
    taken, equal_seen = carry
    idx, key, ok = load_candidates(i)
    above, equal = _classify(key, ok, state)
    equal_rank = equal_seen + jnp.cumsum(equal.astype(jnp.int32)) - 1
    take = above | (equal & (full | (equal_rank < k_rem)))
    rank = taken + jnp.cumsum(take.astype(jnp.int32)) - 1
    keep = take & (rank < k)
    plt.store(out_ref.at[row, jnp.where(keep, rank, k + lanes)], idx, mask=keep)
    return taken + jnp.sum(take.astype(jnp.int32)), equal_seen + jnp.sum(equal.astype(jnp.int32))

  taken, _ = jax.lax.fori_loop(0, cand_blocks, scatter, (jnp.int32(0), jnp.int32(0)))
  for j in range(pl.cdiv(k, block)):                 # -1 after the last taken id (no pre-fill)
    pos = j * block + lanes
    plt.store(out_ref.at[row, pl.ds(j * block, block)], jnp.full((block,), -1, jnp.int32),
              mask=(pos >= taken) & (pos < k))


def _hist_kernel(scores_ref, hist_ref, part_ref, *, level, k, n, chunk, block):
  """Pass `level` over one (row, chunk): its digit histogram of the keys that match the prefix
  found so far (from hist_ref, the row totals of the earlier passes) into part_ref[row, chunk]. Plain
  stores, summed over chunks by the caller: no atomics (Triton's atomic adds into the aliased
  histogram left it all zeros on the H100 with jax 0.11.2, while interpret mode was right)."""
  row, c = pl.program_id(0), pl.program_id(1)

  def histogram(prefix):
    def body(i, acc):
      _, key, valid = _load_block(scores_ref, row, c * chunk + i * block, block, n)
      match = valid if level == 1 else valid & (_top_bits(key, level - 1) == prefix)
      return acc + digit_histogram(key, match, level)
    acc = jax.lax.fori_loop(0, chunk // block, body, jnp.zeros((16, 16), jnp.float32))
    part_ref[row, c] = acc.astype(jnp.int32)

  if level == 1:
    histogram(None)
    return
  prefix, _, full, _ = _state_after(lambda lv: hist_ref[lv - 1, row], k, level - 1)
  pl.when(jnp.logical_not(full))(lambda: histogram(prefix))

  @pl.when(full)
  def _():
    part_ref[row, c] = jnp.zeros((16, 16), jnp.int32)


def _count_kernel(scores_ref, hist_ref, counts_ref, *, k, n, chunk, block):
  row, c = pl.program_id(0), pl.program_id(1)
  state = _state_after(lambda lv: hist_ref[lv - 1, row], k, _PASSES)

  def body(i, carry):
    n_above, n_equal = carry
    _, key, valid = _load_block(scores_ref, row, c * chunk + i * block, block, n)
    above, equal = _classify(key, valid, state)
    return n_above + jnp.sum(above.astype(jnp.int32)), n_equal + jnp.sum(equal.astype(jnp.int32))

  n_above, n_equal = jax.lax.fori_loop(0, chunk // block, body, (jnp.int32(0), jnp.int32(0)))
  counts_ref[row, 0, c] = n_above
  counts_ref[row, 1, c] = n_equal


def _scatter_kernel(scores_ref, hist_ref, counts_ref, out_ref, *, k, n, chunk, block, chunks):
  row, c = pl.program_id(0), pl.program_id(1)
  state = _state_after(lambda lv: hist_ref[lv - 1, row], k, _PASSES)
  _, k_rem, full, _ = state
  chunk_id = jnp.arange(counts_ref.shape[2], dtype=jnp.int32)        # padded to a power of two
  n_above, n_equal = counts_ref[row, 0, :], counts_ref[row, 1, :]
  earlier = chunk_id < c
  above_before = jnp.sum(jnp.where(earlier, n_above, 0))
  equal_before = jnp.sum(jnp.where(earlier, n_equal, 0))
  taken_before = above_before + jnp.where(full, equal_before, jnp.minimum(equal_before, k_rem))

  def body(i, carry):
    taken, equal_seen = carry
    idx, key, valid = _load_block(scores_ref, row, c * chunk + i * block, block, n)
    above, equal = _classify(key, valid, state)
    equal_rank = equal_seen + jnp.cumsum(equal.astype(jnp.int32)) - 1
    take = above | (equal & (full | (equal_rank < k_rem)))
    rank = taken + jnp.cumsum(take.astype(jnp.int32)) - 1
    keep = take & (rank < k)
    # Lanes that write nothing still get distinct addresses (k + lane: the scratch tail interpret
    # mode has, which implements masked scatters as read-modify-write of every lane).
    where = jnp.where(keep, rank, k + jnp.arange(block, dtype=jnp.int32))
    plt.store(out_ref.at[row, where], idx, mask=keep)
    return taken + jnp.sum(take.astype(jnp.int32)), equal_seen + jnp.sum(equal.astype(jnp.int32))

  jax.lax.fori_loop(0, chunk // block, body, (taken_before, equal_before))

  @pl.when(c == 0)
  def _():                                             # -1 after the last taken id (no pre-fill)
    real = chunk_id < chunks
    total = jnp.sum(jnp.where(real, n_above, 0)) + jnp.minimum(jnp.sum(jnp.where(real, n_equal, 0)), k_rem)
    total = jnp.where(full, jnp.sum(jnp.where(real, n_above + n_equal, 0)), total)
    for j in range(pl.cdiv(k, block)):
      pos = j * block + jnp.arange(block, dtype=jnp.int32)
      plt.store(out_ref.at[row, pl.ds(j * block, block)], jnp.full((block,), -1, jnp.int32),
                mask=(pos >= total) & (pos < k))


def _plan(batch: int, n: int, block: int | None, chunks: int | None) -> tuple[int, int, int]:
  """(block, chunk, chunks): power-of-two blocks, enough programs to fill a GPU."""
  block = block or min(1024, max(16, pl.next_power_of_2(n)))
  blocks = pl.cdiv(n, block)
  if chunks is None:
    chunks = max(1, min(blocks, pl.cdiv(512, batch)))
  per_chunk = pl.cdiv(blocks, chunks)
  chunks = pl.cdiv(blocks, per_chunk)
  return block, per_chunk * block, chunks


@functools.partial(jax.jit, static_argnames=("k", "interpret", "block", "num_warps"))
def _row_pallas(scores, histograms, k, *, interpret, block=None, num_warps=8):
  """(ids int32[B, k], pass histograms int32[4, B, 16, 16]) of kernel="row"."""
  batch, n = scores.shape
  block = min(block or 1024, max(16, pl.next_power_of_2(n)))
  width = n + block
  kernel = functools.partial(_row_kernel, k=k, n=n, block=block, interpret=interpret)
  if histograms is None:
    kernel = functools.partial(lambda s_ref, *refs, f: f(s_ref, None, *refs), f=kernel)
    args = (scores,)
  else:
    args = (scores, histograms)
  # Interpret mode writes masked lanes too (k + lane: a scratch tail); on the GPU they write nothing.
  out, _, _, hist = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((batch, k + block if interpret else k), jnp.int32),
                 jax.ShapeDtypeStruct((batch, width), jnp.int32), jax.ShapeDtypeStruct((batch, width), jnp.int32),
                 jax.ShapeDtypeStruct((batch, _PASSES, 16, 16), jnp.int32)),
      grid=(batch,), compiler_params=_compat.compiler_params(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="dsa_topk_row")(*args)
  return out[:, :k], jnp.moveaxis(hist, 1, 0)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "block", "chunks", "num_warps", "internals"))
def _chunked_pallas(scores, histograms, k, *, interpret, block=None, chunks=None, num_warps=4, internals=False):
  batch, n = scores.shape
  block, chunk, chunks = _plan(batch, n, block, chunks)
  chunks_pad = pl.next_power_of_2(chunks)
  grid = (batch, chunks)
  params = dict(compiler_params=_compat.compiler_params(num_warps=num_warps, num_stages=1), interpret=interpret)
  hist = jnp.zeros((_PASSES, batch, 16, 16), jnp.int32)
  if histograms is None:
    first = 1
  else:
    hist, first = hist.at[0].set(jnp.sum(histograms, axis=1)), 2
  for level in range(first, _PASSES + 1):
    part = pl.pallas_call(       # [row, chunk, 16, 16]: each chunk's histogram of this pass
        functools.partial(_hist_kernel, level=level, k=k, n=n, chunk=chunk, block=block),
        out_shape=jax.ShapeDtypeStruct((batch, chunks, 16, 16), jnp.int32), grid=grid,
        name=f"dsa_topk_hist{level}", **params)(scores, hist)
    hist = hist.at[level - 1].set(jnp.sum(part, axis=1))
  counts = pl.pallas_call(       # [row, above | equal, chunk]; chunk slots past `chunks` stay unwritten
      functools.partial(_count_kernel, k=k, n=n, chunk=chunk, block=block),
      out_shape=jax.ShapeDtypeStruct((batch, 2, chunks_pad), jnp.int32), grid=grid, name="dsa_topk_count",
      **params)(scores, hist)
  # Interpret mode needs a scratch tail (see _scatter_kernel); on the GPU masked lanes write nothing.
  width = k + block if interpret else k
  out = pl.pallas_call(
      functools.partial(_scatter_kernel, k=k, n=n, chunk=chunk, block=block, chunks=chunks),
      out_shape=jax.ShapeDtypeStruct((batch, width), jnp.int32), grid=grid, name="dsa_topk_scatter",
      **params)(scores, hist, counts)
  out = out[:, :k] if width > k else out
  return (out, hist, counts[:, :, :chunks]) if internals else out


def dsa_topk(scores: jax.Array, k: int, *, histograms: jax.Array | None = None, backend: str = "pallas",
             kernel: str = "row", interpret: bool | None = None, block: int | None = None,
             chunks: int | None = None, num_warps: int | None = None) -> jax.Array:
  """Top-k ids per row: scores float32[B, N] -> int32[B, k] ascending, -1 padded (ties -> lower index).

  histograms: int32[B, P, 16, 16] partial pass-1 histograms adding up to each row's
    (`first_pass_histograms`, or one per program of the kernel that computed the scores):
    the select starts at pass 2.
  backend: "pallas" or "reference" (lax.top_k + sort).
  kernel: "row" (one launch, one program per row) or "chunked" (six launches over (row,
    chunk) programs); see the module docstring.
  interpret: run the Pallas kernels in interpret mode; None = only when not on a GPU.
  block: keys per inner step; chunks ("chunked" only): programs per row; num_warps: None =
    8 for "row", 4 for "chunked".
  """
  check_backend(backend)
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}; expected one of {KERNELS}")
  if scores.ndim != 2:
    raise ValueError(f"scores must be [batch, tokens], got shape {scores.shape}")
  if not isinstance(k, int) or k <= 0:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  if histograms is not None:
    chex.assert_shape(histograms, (scores.shape[0], None, 16, 16))
  if kernel == "row" and chunks is not None:
    raise ValueError(f"chunks={chunks} applies to kernel='chunked' only (kernel='row' runs one program per row)")
  if backend == "reference":
    return dsa_topk_reference(scores, k)
  interpret = _compat.resolve_interpret(interpret)
  scores = scores.astype(jnp.float32)
  if kernel == "row":
    out, _ = _row_pallas(scores, histograms, k, interpret=interpret, block=block, num_warps=num_warps or 8)
  else:
    out = _chunked_pallas(scores, histograms, k, interpret=interpret, block=block, chunks=chunks,
                          num_warps=num_warps or 4)
  chex.assert_shape(out, (scores.shape[0], k))
  return out


def pass_histograms_reference(scores: jax.Array, k: int) -> jax.Array:
  """int32[4, B, 16, 16]: the histogram each radix pass must produce (plain jnp, one row at a
  time through the same state machine); a diagnostic for the kernels."""
  def row(x):
    key, valid = order_key(x), x > -jnp.inf
    hists, state = [], (jnp.int32(0), jnp.int32(k), jnp.bool_(False), jnp.int32(0))
    for level in range(1, _PASSES + 1):
      prefix, _, full, _ = state
      match = valid if level == 1 else valid & (_top_bits(key, level - 1) == prefix) & ~full
      d = _digit(key, level)
      h = jnp.sum((d[:, None] == jnp.arange(256)) & match[:, None], axis=0, dtype=jnp.int32).reshape(16, 16)
      hists.append(h)
      state = _next_state(state, h, k, level)
    return jnp.stack(hists)
  x = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
  return jnp.moveaxis(jax.vmap(row)(x), 0, 1)


def dsa_topk_internals(scores: jax.Array, k: int, *, kernel: str = "row", interpret: bool | None = None,
                       **plan):
  """(ids, pass histograms int32[4, B, 16, 16]) of a Pallas select: compare the histograms with
  `pass_histograms_reference` to find a failing pass."""
  scores, interpret = scores.astype(jnp.float32), _compat.resolve_interpret(interpret)
  if kernel == "row":
    return _row_pallas(scores, None, k, interpret=interpret, **plan)
  ids, hist, _ = _chunked_pallas(scores, None, k, interpret=interpret, internals=True, **plan)
  return ids, hist


def dsa_topk_reference(scores: jax.Array, k: int, *, histograms: jax.Array | None = None, backend: str = "reference",
                       kernel: str = "row", interpret: bool | None = None, block: int | None = None,
                       chunks: int | None = None, num_warps: int | None = None) -> jax.Array:
  """Plain-XLA top-k with the same contract (lax.top_k prefers lower indices among equal values)."""
  del histograms, backend, kernel, interpret, block, chunks, num_warps
  batch, n = scores.shape
  x = scores.astype(jnp.float32)
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)
  kk = min(k, n)
  values, idx = jax.lax.top_k(x, kk)
  idx = jnp.where(values > -jnp.inf, idx, jnp.iinfo(jnp.int32).max).astype(jnp.int32)
  idx = jnp.sort(idx, axis=-1)
  idx = jnp.where(idx == jnp.iinfo(jnp.int32).max, -1, idx)
  if kk < k:
    idx = jnp.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
  return idx
