"""RocketKV generation-phase block scoring over the KT cache (TensorRT-LLM's RocketKV).

The KT cache stores, per block of ``block_size`` tokens, the elementwise min and max of the
keys. Per (batch row b, kv head g) with its group of G query heads ``q[g*G:(g+1)*G]``
(``[G, D]``, f32)::

    importance[c] = mean_h |q[h, c]|            R = top-``topr`` channels of importance
    qm = q masked to channels R                 sign[c] = sum_h qm[h, c] > 0
    raw[h, t] = scale * sum_c qm[h, c] * (kt[t, max, c] if sign[c] else kt[t, min, c])
    p[h, :] = softmax over valid blocks t of raw[h, :]
    out[t] = mean_h p[h, t]   (-inf for t >= n_valid = ceil(length / block_size))

Split of the work: the kernel picks the channels of its group (a rank count over the D
channel importances, ties to the lower channel as ``lax.top_k``; no XLA preamble), builds
``scale * qm`` and ``sign``, reads the KT cache once (the dominant bytes), does the
sign-dependent min/max select and the G dot products in f32 and writes ``raw`` (G x 4 bytes
per block, small next to the 2 x D KT bytes); a second small kernel does the masked softmax
and the group mean reading only the valid blocks (the page table, hence the output, may be
far wider than the valid blocks), or optionally one XLA fusion.

Layout of the file: kernel body, ``pallas_call`` launcher, public jitted function,
``rocket_block_scores_reference`` (plain jax.numpy).
"""

from __future__ import annotations

import functools

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.common import MASK_VALUE, pow2_at_most

_EPILOGUE_CHUNK = 256


def _rocket_score_kernel(q_ref, pt_ref, nvalid_ref, kt_ref, raw_ref, *, samples: int, topr: int,
                         scale: float, num_splits: int, blocks_per_iter: int, blocks_per_page: int):
  """One program = one (batch row, kv head, split) over a balanced range of valid blocks.

  Refs: ``q_ref [S * G, D]`` (the group's q heads of S queries, sample-major, any float
  dtype), ``pt_ref [max_pages]`` page-table row, ``nvalid_ref [1]``, ``kt_ref
  [num_pages * blocks_per_page, 2, D]`` the KT cache of this kv head, ``raw_ref [S * G,
  T_padded]`` f32. Every KT block is loaded once for all S queries.
  The channel choice is made here, per query, from its group's rows (no XLA preamble):
  ``importance = mean_h |q[h]|``, a channel is kept when fewer than ``topr`` channels beat it
  (larger importance, or equal and a lower index: ``lax.top_k``'s ties), and
  ``sign = sum_h qm[h] > 0``.
  The split owns blocks ``[split * per, min((split+1) * per, n_valid))`` with
  ``per = ceil(n_valid / num_splits)`` rounded up to whole iterations, so the work is
  balanced on the actual length (the page table may be much wider), ranges never overlap,
  and blocks >= n_valid are not read (lanes of a partial last iteration read block 0 of
  page 0 of the pool and are discarded by the epilogue).
  """
  split = pl.program_id(2)
  rows, head_dim = q_ref.shape
  group = rows // samples
  n = blocks_per_iter
  n_valid = nvalid_ref[0]
  per_split = pl.cdiv(pl.cdiv(n_valid, num_splits), n) * n
  start = split * per_split
  end = jnp.minimum(start + per_split, n_valid)
  num_iters = pl.cdiv(jnp.maximum(end - start, 0), n)

  use_max, q_rows = [], []  # S x [1, D] bool; S * G x [1, D] f32 (scaled, channel-masked)
  channel = jnp.arange(head_dim, dtype=jnp.int32)
  for r in range(samples):
    qs = [q_ref[h].astype(jnp.float32) for h in range(r * group, (r + 1) * group)]
    if topr < head_dim:
      importance = functools.reduce(jnp.add, [jnp.abs(x) for x in qs]) / group       # [D]
      other, this = importance[:, None], importance[None, :]
      beats = (other > this) | ((other == this) & (channel[:, None] < channel[None, :]))
      keep = jnp.sum(beats.astype(jnp.int32), axis=0) < topr                         # [D]
      qs = [jnp.where(keep, x, 0.0) for x in qs]
    use_max.append((functools.reduce(jnp.add, qs) > 0)[None, :])
    q_rows += [(x * scale)[None, :] for x in qs]

  def body(i, carry):
    t0 = start + i * n
    t = t0 + jnp.arange(n, dtype=jnp.int32)
    valid = t < n_valid
    t = jnp.where(valid, t, 0)
    page = pt_ref[t // blocks_per_page]
    valid = valid & (page >= 0)
    row = jnp.where(valid, page * blocks_per_page + t % blocks_per_page, 0)
    kmin, kmax = kt_ref[row, 0, :], kt_ref[row, 1, :]  # [n, D] each
    if kmin.dtype.itemsize == 1:  # fp8 e5m2 -> bf16 is exact; select on 16-bit values
      kmin, kmax = kmin.astype(jnp.bfloat16), kmax.astype(jnp.bfloat16)
    # Select before the f32 upcast: one f32 tile of [n, D] live instead of three.
    for r in range(samples):
      k_sel = jnp.where(use_max[r], kmax, kmin).astype(jnp.float32)
      for h in range(r * group, (r + 1) * group):
        raw_ref[h, pl.ds(t0, n)] = jnp.sum(k_sel * q_rows[h], axis=1)
    return carry

  lax.fori_loop(0, num_iters, body, 0)


def group_mean_softmax(raw_ref, n_valid, chunk: int, heads: range | None = None):
  """``mean_h softmax(raw_ref[h, :n_valid])`` over the rows ``heads`` (default all) of
  ``raw_ref [rows, T_padded]``, by chunks: one pass here for the per-head max and sum, then
  the returned ``probs(i)`` gives chunk i as ``(t [chunk] block indices, p [chunk] f32)``;
  p is meaningless for ``t >= n_valid``."""
  heads = range(raw_ref.shape[0]) if heads is None else heads
  group = len(heads)

  def load(h, i):
    t = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    return t, jnp.where(t < n_valid, raw_ref[h, pl.ds(i * chunk, chunk)], MASK_VALUE)

  def stats(i, carry):
    ms, ls = carry
    new_ms, new_ls = [], []
    for h, row in enumerate(heads):
      _, x = load(row, i)
      m = jnp.maximum(ms[h], x.max())
      new_ls.append(ls[h] * jnp.exp(ms[h] - m) + jnp.exp(x - m).sum())
      new_ms.append(m)
    return tuple(new_ms), tuple(new_ls)

  init = (tuple(jnp.float32(MASK_VALUE) for _ in range(group)),
          tuple(jnp.float32(0.0) for _ in range(group)))
  ms, ls = lax.fori_loop(0, pl.cdiv(n_valid, chunk), stats, init)
  inv = [1.0 / (group * jnp.maximum(l, 1e-30)) for l in ls]

  def probs(i):
    acc = jnp.zeros((chunk,), jnp.float32)
    for h, row in enumerate(heads):
      t, x = load(row, i)
      acc += jnp.exp(x - ms[h]) * inv[h]
    return t, acc

  return probs


def _softmax_mean_kernel(raw_ref, nvalid_ref, out_ref, *, samples: int, chunk: int,
                         interpret: bool):
  """One program = one (batch row, kv head): masked softmax per q head + group mean (the
  max over the S queries' group means).

  Refs: ``raw_ref [S * G, T_padded]`` f32 (valid for t < n_valid, garbage after),
  ``nvalid_ref [1]``, ``out_ref [T]`` f32. Reads raw only up to n_valid (the page table,
  hence T, may be far wider than the valid blocks): pass 1 online max/sum per head,
  pass 2 writes ``mean_h exp(raw - m_h) / l_h``, pass 3 fills -inf up to T.
  """
  total = out_ref.shape[0]
  n_valid = nvalid_ref[0]
  valid_chunks = pl.cdiv(n_valid, chunk)
  group = raw_ref.shape[0] // samples
  probs = [group_mean_softmax(raw_ref, n_valid, chunk, range(r * group, (r + 1) * group))
           for r in range(samples)]

  def write(i, carry):
    t, acc = probs[0](i)
    for more in probs[1:]:
      acc = jnp.maximum(acc, more(i)[1])
    out = jnp.where(t < n_valid, acc, -jnp.inf)
    _compat.store_slice(out_ref, pl.ds(i * chunk, chunk), out, mask=t < total,
                        interpret=interpret)
    return carry

  lax.fori_loop(0, valid_chunks, write, 0)

  def fill(i, carry):
    t = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
    _compat.store_slice(out_ref, pl.ds(i * chunk, chunk),
                        jnp.full((chunk,), -jnp.inf, jnp.float32), mask=t < total,
                        interpret=interpret)
    return carry

  lax.fori_loop(valid_chunks, pl.cdiv(total, chunk), fill, 0)


def _softmax_mean_pallas(raw, n_valid, total_blocks, *, samples, chunk, interpret):
  batch, kv_heads, group, padded_blocks = raw.shape
  return pl.pallas_call(
      functools.partial(_softmax_mean_kernel, samples=samples, chunk=chunk,
                        interpret=interpret),
      grid=(batch, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, group, padded_blocks), lambda b, g: (b, g, 0, 0)),
          pl.BlockSpec((None, 1), lambda b, g: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, total_blocks), lambda b, g: (b, g, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, total_blocks), jnp.float32),
      compiler_params=_compat.compiler_params(num_warps=4, num_stages=1),
      interpret=interpret,
      name="rocket_softmax_mean",
  )(raw, n_valid.reshape(batch, 1))


def _rocket_scores_pallas(qg, kt, page_table, n_valid, *, samples, topr, scale, num_splits,
                          blocks_per_iter, num_warps, num_stages, interpret,
                          pad_multiple=_EPILOGUE_CHUNK):
  """qg: [B, Hkv, S * G, D] (the group's q heads per query, sample-major)
  -> raw [B, Hkv, S * G, T_pad]."""
  batch, kv_heads, group, head_dim = qg.shape
  _, num_pages, blocks_per_page, _, _ = kt.shape
  max_pages = page_table.shape[1]
  total_blocks = max_pages * blocks_per_page
  step = max(blocks_per_iter, pad_multiple)
  padded_blocks = pl.cdiv(total_blocks, step) * step
  kt_rows = kt.reshape(kv_heads, num_pages * blocks_per_page, 2, head_dim)
  kernel = functools.partial(
      _rocket_score_kernel, samples=samples, topr=topr, scale=scale, num_splits=num_splits,
      blocks_per_iter=blocks_per_iter, blocks_per_page=blocks_per_page)
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, group, head_dim), lambda b, g, s: (b, g, 0, 0)),
          pl.BlockSpec((None, max_pages), lambda b, g, s: (b, 0)),
          pl.BlockSpec((None, 1), lambda b, g, s: (b, 0)),
          pl.BlockSpec((None, num_pages * blocks_per_page, 2, head_dim),
                       lambda b, g, s: (g, 0, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, group, padded_blocks),
                             lambda b, g, s: (b, g, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, padded_blocks),
                                     jnp.float32),
      compiler_params=_compat.compiler_params(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="rocket_block_scores",
  )(qg, page_table.astype(jnp.int32), n_valid.reshape(batch, 1), kt_rows)


def rocket_block_logits(q, kt, page_table, n_valid, *, topr, scale, num_splits,
                        blocks_per_iter, num_warps, num_stages, interpret,
                        pad_multiple=_EPILOGUE_CHUNK):
  """The scoring launch alone (channel choice and KT scan in one kernel):
  ``raw [batch, kv_heads, S * group, T_padded]`` f32 (S = 1 for a 3-D q, else q's
  samples axis, sample-major), the scaled per-q-head block logits,
  valid for ``t < n_valid`` (int32[batch]) and garbage after. ``T_padded`` is the
  page-table width in blocks rounded up to a multiple of ``pad_multiple`` and of
  ``blocks_per_iter`` (powers of two). Inputs as :func:`rocket_block_scores`; no checks."""
  kv_heads = kt.shape[0]
  q4 = q[:, None] if q.ndim == 3 else q
  batch, samples, q_heads, head_dim = q4.shape
  group = q_heads // kv_heads
  if samples == 1:   # a reshape: q's heads are already grouped by kv head
    qg = q4.reshape(batch, kv_heads, group, head_dim)
  else:
    qg = jnp.swapaxes(q4.reshape(batch, samples, kv_heads, group, head_dim), 1, 2)
    qg = qg.reshape(batch, kv_heads, samples * group, head_dim)
  return _rocket_scores_pallas(
      qg, kt, page_table, n_valid, samples=samples, topr=topr, scale=scale,
      num_splits=num_splits, blocks_per_iter=blocks_per_iter, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, pad_multiple=pad_multiple)


def _softmax_group_mean(raw, n_valid, samples=1):
  """raw: [B, Hkv, S * G, T] f32 (garbage where t >= n_valid) -> [B, Hkv, T], the max over
  the S queries of their group means."""
  t = jnp.arange(raw.shape[-1])
  valid = t[None, :] < n_valid[:, None]  # [B, T]
  logits = jnp.where(valid[:, None, None, :], raw, -jnp.inf)
  m = logits.max(axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)
  denom = e.sum(axis=-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  batch, kv_heads, rows, total = p.shape
  p = p.reshape(batch, kv_heads, samples, rows // samples, total).mean(axis=3).max(axis=2)
  return jnp.where(valid[:, None, :], p, -jnp.inf)


def check_score_inputs(q, kt, page_table, lengths, topr):
  if q.ndim not in (3, 4):
    raise ValueError(
        f"q must be [batch, q_heads, head_dim] or [batch, samples, q_heads, head_dim], got"
        f" shape {q.shape}")
  batch, q_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
  if kt.ndim != 5 or kt.shape[3] != 2 or kt.shape[4] != head_dim:
    raise ValueError(
        "kt must be [kv_heads, num_pages, blocks_per_page, 2, head_dim="
        f"{head_dim}], got shape {kt.shape}")
  kv_heads = kt.shape[0]
  if q_heads % kv_heads:
    raise ValueError(
        f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
  if (page_table.ndim != 2 or page_table.shape[0] != batch
      or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(
        f"page_table must be int32[batch={batch}, max_pages], got"
        f" {page_table.dtype}{list(page_table.shape)}")
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
        f"lengths must be int32[batch={batch}], got {lengths.dtype}{list(lengths.shape)}")
  if not isinstance(topr, int) or not 1 <= topr <= head_dim:
    raise ValueError(f"topr must be an int in 1..head_dim={head_dim}, got {topr!r}")
  chex.assert_shape(page_table, (batch, None))


def default_num_splits(batch: int, kv_heads: int, max_blocks: int, blocks_per_iter: int,
                       core_count: int | None = None) -> int:
  """About 4 programs per SM (best measured on the H100: 8 splits at batch 8 x 8 KV heads),
  at least one iteration per split; a power of two <= 32."""
  if core_count is None:
    core_count = _compat.device_core_count()
  want = pl.cdiv(4 * core_count, batch * kv_heads)
  splits = max(1, min(want, pl.cdiv(max_blocks, blocks_per_iter), 32))
  return pow2_at_most(splits)


@functools.partial(
    jax.jit,
    static_argnames=("topr", "block_size", "scale", "backend", "interpret",
                     "blocks_per_iter", "num_splits", "num_warps", "num_stages",
                     "epilogue"),
)
def rocket_block_scores(
    q: jax.Array,
    kt: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    topr: int,
    block_size: int,
    scale: float | None = None,
    backend: str = "pallas",
    interpret: bool | None = None,
    blocks_per_iter: int = 32,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    epilogue: str = "pallas",
) -> jax.Array:
  """RocketKV block scores of the current decode token against the KT cache.

  Args:
    q: ``[batch, q_heads, head_dim]`` roped query of the decode token, or ``[batch,
      samples, q_heads, head_dim]``: several queries per row (a prefill chunk's), scored in
      one pass over the KT cache; the result is the max over them of their scores.
    kt: ``[kv_heads, num_pages, blocks_per_page, 2, head_dim]``: per block of
      ``block_size`` tokens the elementwise min (``[..., 0, :]``) and max
      (``[..., 1, :]``) of the keys; float8_e5m2, bfloat16 or float32.
    page_table: ``int32[batch, max_pages]`` (-1 = none); logical block t lives at page
      ``page_table[b, t // blocks_per_page]``, slot ``t % blocks_per_page``.
    lengths: ``int32[batch]`` tokens stored; valid blocks t < ceil(lengths / block_size).
    topr: channels kept per kv head, 1..head_dim.
    block_size: tokens per KT block (only used to count the valid blocks).
    scale: logit scale, default ``head_dim ** -0.5``.
    backend: ``"pallas"`` or ``"reference"``.
    interpret: Pallas interpret mode; None = when the default backend is the CPU.
    blocks_per_iter: KT blocks per loop iteration (power of two).
    num_splits: programs per (batch, kv head); default fills the SMs.
    num_warps, num_stages: Triton compiler parameters.
    epilogue: ``"pallas"`` (softmax + group mean in a second small kernel that reads only
      the valid blocks) or ``"xla"`` (one XLA fusion over the whole page-table width).

  Returns:
    ``float32[batch, kv_heads, max_pages * blocks_per_page]``: group-averaged softmax
    probabilities over the valid blocks, exactly -inf for invalid blocks.
  """
  check_score_inputs(q, kt, page_table, lengths, topr)
  head_dim = q.shape[-1]
  if scale is None:
    scale = head_dim ** -0.5
  if backend == "reference":
    return rocket_block_scores_reference(q, kt, page_table, lengths, topr=topr,
                                         block_size=block_size, scale=scale)
  if backend != "pallas":
    raise ValueError(f"backend must be 'pallas' or 'reference', got {backend!r}")
  if blocks_per_iter < 1 or blocks_per_iter & (blocks_per_iter - 1):
    raise ValueError(f"blocks_per_iter must be a power of two, got {blocks_per_iter}")
  if head_dim & (head_dim - 1):
    raise ValueError(f"head_dim must be a power of two, got {head_dim}")
  batch = q.shape[0]
  kv_heads, _, blocks_per_page, _, _ = kt.shape
  total_blocks = page_table.shape[1] * blocks_per_page
  if num_splits is None:
    num_splits = default_num_splits(batch, kv_heads, total_blocks, blocks_per_iter)

  if epilogue not in ("pallas", "xla"):
    raise ValueError(f"epilogue must be 'pallas' or 'xla', got {epilogue!r}")
  interpret = _compat.resolve_interpret(interpret)
  n_valid = pl.cdiv(lengths.astype(jnp.int32), block_size)
  raw = rocket_block_logits(
      q, kt, page_table, n_valid, topr=topr, scale=scale, num_splits=num_splits,
      blocks_per_iter=blocks_per_iter, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret)
  samples = 1 if q.ndim == 3 else q.shape[1]
  if epilogue == "xla":
    return _softmax_group_mean(raw[..., :total_blocks], n_valid, samples)
  return _softmax_mean_pallas(raw, n_valid, total_blocks, samples=samples,
                              chunk=_EPILOGUE_CHUNK, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("topr", "block_size", "scale"))
def rocket_block_scores_reference(
    q: jax.Array,
    kt: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    topr: int,
    block_size: int,
    scale: float | None = None,
) -> jax.Array:
  """Plain-XLA reference of :func:`rocket_block_scores`, written independently of the
  kernel path (stable argsort for the channel choice, full gather of the KT cache, one
  query at a time)."""
  check_score_inputs(q, kt, page_table, lengths, topr)
  if q.ndim == 4:
    one = functools.partial(rocket_block_scores_reference, kt=kt, page_table=page_table,
                            lengths=lengths, topr=topr, block_size=block_size, scale=scale)
    return jnp.max(jnp.stack([one(q[:, r]) for r in range(q.shape[1])]), axis=0)
  batch, q_heads, head_dim = q.shape
  kv_heads, _, blocks_per_page, _, _ = kt.shape
  group = q_heads // kv_heads
  if scale is None:
    scale = head_dim ** -0.5

  qg = q.reshape(batch, kv_heads, group, head_dim).astype(jnp.float32)
  importance = jnp.abs(qg).mean(axis=2)
  order = jnp.argsort(-importance, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)  # rank of every channel
  qm = jnp.where((rank < topr)[:, :, None, :], qg, 0.0)
  use_max = qm.sum(axis=2) > 0  # [B, Hkv, D]

  total_blocks = page_table.shape[1] * blocks_per_page
  t = jnp.arange(total_blocks)
  n_valid = (lengths + block_size - 1) // block_size
  page = page_table[:, t // blocks_per_page]  # [B, T]
  valid = t[None, :] < n_valid[:, None]  # [B, T]
  blocks = kt[:, jnp.maximum(page, 0), t % blocks_per_page]  # [Hkv, B, T, 2, D]
  blocks = jnp.moveaxis(blocks, 0, 1).astype(jnp.float32)  # [B, Hkv, T, 2, D]
  k_sel = jnp.where(use_max[:, :, None, :], blocks[..., 1, :], blocks[..., 0, :])
  raw = scale * jnp.einsum("bhgd,bhtd->bhgt", qm, k_sel,
                           precision=lax.Precision.HIGHEST)
  logits = jnp.where(valid[:, None, None, :], raw, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  p = jnp.where(jnp.isnan(p), 0.0, p)  # rows with no valid block
  return jnp.where(valid[:, None, :], p.mean(axis=2), -jnp.inf)
