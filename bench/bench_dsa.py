"""DeepSeek Sparse Attention decode on DeepSeek-V3.2 attention shapes, side by side in one run.

Shapes: batch 8, 128 heads, kv_lora_rank 512 + rope 64 (absorbed MLA: 576-dim keys, 512-dim
values, one latent per token shared by all heads), 64 indexer heads of dim 128, FP8 indexer
keys with one float32 scale per token (132 B/token), top-2048, 64-token pages in a permuted
pool; contexts 32K / 64K / 128K (every sequence full).

First a correctness check of every Pallas kernel against its reference on this device (a
small shape with NaN in every pool slot the kernel must not read, then the bench size), then:

  indexer    dsa_indexer_scores (Pallas, small config sweep at 128K) vs its plain-XLA reference
  top-k      dsa_topk (Pallas radix select: one launch, and the six-launch kernel) vs lax.top_k
             vs lax.approx_max_k on [8, context]
  sparse MLA sparse_mla_decode over the 2048 selected tokens (config sweep at 128K)
  dense MLA  mla_decode over every token (this engine's dense absorbed MLA decode; its config
             sweep and TFLOP/s are bench/bench_mla_decode.py's) vs plain XLA (the reference)
  DSA step   indexer over the FP8 cache + top-2048 + sparse MLA, one jit (best configs),
             vs the same step in plain XLA (references + lax.top_k)

Per row: time (us, bench/common.time_fn: warm-up, then medians over >= 20 calls inside jit),
bytes the op must read (its inputs: cache bytes it touches + queries + ids), TB/s, % of the
copy ceiling measured in this run. Goals at 128K: the DSA step within 1.5x of its byte limit
(about 90 us on an H100) and >= 4x faster than dense MLA; the top-k <= 30 us.

  python bench/bench_dsa.py                  # GPU: check, then the benchmark; JSON to $OUT
  python bench/bench_dsa.py --check          # only the correctness check
  python bench/bench_dsa.py --ops=topk       # only some ops (indexer,topk,mla_sparse,mla_dense,dsa_step)
  python bench/bench_dsa.py --smoke          # CPU, tiny shapes, interpret mode (or SMOKE=1)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (also puts the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.dsa_indexer import dsa_indexer_scores, dsa_indexer_scores_reference  # noqa: E402
from pallas_kernels.dsa_topk import (KERNELS, dsa_topk, dsa_topk_internals, dsa_topk_reference,  # noqa: E402
                                     pass_histograms_reference)
from pallas_kernels.mla_decode import mla_decode  # noqa: E402
from pallas_kernels.sparse_mla_decode import sparse_mla_decode  # noqa: E402
from pallas_kernels.sparse_mla_prefill import sparse_mla_prefill, sparse_mla_prefill_reference  # noqa: E402
from sparse_jax.algorithms.dsa import quantize_fp8  # noqa: E402

COLUMNS = ["context", "op", "impl", "config", "us", "tb_s", "pct_ceiling", "bytes", "vs", "error"]


# -- shapes and inputs ---------------------------------------------------------------------------

class Shape:
  """DeepSeek-V3.2 decode attention (or a tiny stand-in for --smoke)."""

  def __init__(self, batch=8, heads=128, rank=512, rope=64, index_heads=64, index_dim=128, topk=2048, page=64,
               dtype=jnp.bfloat16):
    self.batch, self.heads, self.rank, self.rope = batch, heads, rank, rope
    self.index_heads, self.index_dim, self.topk, self.page, self.dtype = index_heads, index_dim, topk, page, dtype

  @property
  def latent_bytes(self) -> int:        # one token's latent + rope key
    return (self.rank + self.rope) * jnp.dtype(self.dtype).itemsize

  @property
  def index_bytes(self) -> int:         # one token's FP8 key + float32 scale
    return self.index_dim + 4 * max(1, self.index_dim // 128)


SOFTMAX_SCALE = (128 + 64) ** -0.5      # DeepSeek-V3.2: qk_head_dim = nope 128 + rope 64
SMOKE = Shape(batch=2, heads=16, rank=64, rope=16, index_heads=16, index_dim=128, topk=32, page=16,
              dtype=jnp.float32)


def make_inputs(s: Shape, context: int, seed: int = 0, lengths=None):
  """Pools of `batch` sequences of `context` tokens in a permuted page pool, queries, and the
  DSA-selected ids (the top-k of the true indexer scores)."""
  rng = np.random.default_rng(seed)
  pages_per_seq = context // s.page
  num_pages = s.batch * pages_per_seq + 4
  table = rng.permutation(num_pages)[:s.batch * pages_per_seq].reshape(s.batch, pages_per_seq).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), 6)
  normal = lambda k, shape, dtype: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  latent = normal(keys[0], (num_pages, s.page, s.rank), s.dtype)
  rope = normal(keys[1], (num_pages, s.page, s.rope), s.dtype)
  index_k, index_scale = jax.jit(quantize_fp8)(normal(keys[2], (num_pages, s.page, s.index_dim), jnp.float32))
  q = normal(keys[3], (s.batch, s.heads, s.rank + s.rope), s.dtype)
  iq = normal(keys[4], (s.batch, s.index_heads, s.index_dim), s.dtype)
  w = normal(keys[5], (s.batch, s.index_heads), jnp.float32) * (s.index_heads * s.index_dim) ** -0.5
  lengths = jnp.full((s.batch,), context, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  table = jnp.asarray(table)
  scores = jax.jit(dsa_indexer_scores_reference)(iq, w, index_k, index_scale, table, lengths)
  ids = jax.jit(dsa_topk_reference, static_argnums=1)(scores, s.topk)
  dense_ids = jnp.where(jnp.arange(context)[None, :] < lengths[:, None], jnp.arange(context, dtype=jnp.int32), -1)
  return dict(latent=latent, rope=rope, index_k=index_k, index_scale=index_scale, q=q, iq=iq, w=w, table=table,
              lengths=lengths, scores=scores, ids=ids, dense_ids=dense_ids, scale=SOFTMAX_SCALE)


# -- the measured operations ---------------------------------------------------------------------

def indexer_fn(cfg=None, backend="pallas", interpret=False):
  cfg = cfg or {}
  return jax.jit(lambda iq, w, k, sc, pt, l: dsa_indexer_scores(iq, w, k, sc, pt, l, backend=backend,
                                                                interpret=interpret, **cfg))


def topk_fn(k, cfg=None, interpret=False):
  cfg = cfg or {}
  return jax.jit(lambda s: dsa_topk(s, k, interpret=interpret, **cfg))


def dense_fn(scale, backend="pallas", interpret=False):
  return jax.jit(lambda q, lat, rope, pt, lengths: mla_decode(q, lat, rope, pt, lengths, scale, backend=backend,
                                                              interpret=interpret))


def mla_fn(scale, cfg=None, backend="pallas", interpret=False):
  cfg = cfg or {}
  return jax.jit(lambda q, lat, rope, pt, ids: sparse_mla_decode(q, lat, rope, pt, ids, scale, backend=backend,
                                                                 interpret=interpret, **cfg))


def dsa_step_fn(s: Shape, scale, cfgs=None, backend="pallas", interpret=False, fused=True):
  """The attention of one DSA decode step: indexer over the FP8 cache, top-k, sparse MLA (as
  sparse_jax/algorithms/dsa.select_decode runs it; `fused`: the indexer kernel does the
  top-k's first radix pass)."""
  cfgs = cfgs or {}

  @jax.jit
  def step(iq, w, index_k, index_scale, table, lengths, q, latent, rope):
    if backend == "pallas" and fused:
      scores, hist = dsa_indexer_scores(iq, w, index_k, index_scale, table, lengths, topk_histograms=True,
                                        interpret=interpret, **cfgs.get("indexer", {}))
      ids = dsa_topk(scores, s.topk, histograms=hist, interpret=interpret, **cfgs.get("topk", {}))
    elif backend == "pallas":
      scores = dsa_indexer_scores(iq, w, index_k, index_scale, table, lengths, interpret=interpret,
                                  **cfgs.get("indexer", {}))
      ids = dsa_topk(scores, s.topk, interpret=interpret, **cfgs.get("topk", {}))
    else:
      scores = dsa_indexer_scores_reference(iq, w, index_k, index_scale, table, lengths)
      ids = dsa_topk_reference(scores, s.topk)
    return sparse_mla_decode(q, latent, rope, table, ids, scale, backend=backend, interpret=interpret,
                             **cfgs.get("mla", {}))
  return step


def _fused_select(args, k, interpret):
  scores, hist = dsa_indexer_scores(*args, topk_histograms=True, interpret=interpret)
  return dsa_topk(scores, k, histograms=hist, interpret=interpret)


def indexer_args(x):
  return (x["iq"], x["w"], x["index_k"], x["index_scale"], x["table"], x["lengths"])


def step_args(x):
  return (*indexer_args(x), x["q"], x["latent"], x["rope"])


# bytes each op must read (its inputs as touched; outputs not counted)
def indexer_bytes(s, ctx):
  return s.batch * ctx * s.index_bytes + s.batch * (ctx // s.page) * 4 + s.batch * s.index_heads * (s.index_dim * 2 + 4)


def mla_bytes(s, tokens, ctx):
  return s.batch * tokens * (s.latent_bytes + 4) + s.batch * (ctx // s.page) * 4 + s.batch * s.heads * (
      s.rank + s.rope) * jnp.dtype(s.dtype).itemsize


def topk_bytes(s, ctx):
  return s.batch * ctx * 4


# -- correctness -----------------------------------------------------------------------------

def _poisoned(x, s: Shape, context: int):
  """NaN in every latent / rope / indexer-scale slot no sequence owns, beyond each length."""
  num_pages = x["latent"].shape[0]
  owned = np.zeros((num_pages, s.page), bool)
  table, lengths = np.asarray(x["table"]), np.asarray(x["lengths"])
  for b in range(s.batch):
    for t in range(int(lengths[b])):
      owned[table[b, t // s.page], t % s.page] = True
  bad = jnp.asarray(~owned)[..., None]
  x = dict(x)
  x["latent"] = jnp.where(bad, jnp.nan, x["latent"]).astype(x["latent"].dtype)
  x["rope"] = jnp.where(bad, jnp.nan, x["rope"]).astype(x["rope"].dtype)
  x["index_scale"] = jnp.where(bad, jnp.nan, x["index_scale"])
  return x


def topk_diagnostics(scores, k, interpret, kernel):
  """Per row: ids differing from lax.top_k, and the first radix pass whose histogram differs
  from plain jnp's (pass 1..4 of dsa_topk), with the kernel's and the reference's totals."""
  ids, hist = jax.jit(lambda sc: dsa_topk_internals(sc, k, kernel=kernel, interpret=interpret))(scores)
  ref_ids = np.asarray(jax.jit(lambda sc: dsa_topk_reference(sc, k))(scores))
  ref_hist = np.asarray(jax.jit(lambda sc: pass_histograms_reference(sc, k))(scores))
  ids, hist = np.asarray(ids), np.asarray(hist)
  problems = 0
  for b in range(scores.shape[0]):
    bad = [lv + 1 for lv in range(4) if not np.array_equal(hist[lv, b], ref_hist[lv, b])]
    if not bad and np.array_equal(ids[b], ref_ids[b]):
      continue
    problems += 1
    print(f"  topk row {b}: valid={int(np.isfinite(np.asarray(scores[b])).sum())} "
          f"ids differing={int(np.sum(ids[b] != ref_ids[b]))} taken={int(np.sum(ids[b] >= 0))}/"
          f"{int(np.sum(ref_ids[b] >= 0))} pass totals kernel={hist[:, b].sum(axis=(1, 2)).tolist()} "
          f"ref={ref_hist[:, b].sum(axis=(1, 2)).tolist()} first bad pass={bad[0] if bad else None}", flush=True)
  print(f"  topk diagnostics ({kernel}): {problems} of {scores.shape[0]} rows differ (ids or a pass histogram)",
        flush=True)


def check(s: Shape, contexts, interpret: bool) -> bool:
  """Every kernel vs its reference on this device; prints max errors. True when all pass."""
  ok = True
  tol = 1e-4 if s.dtype == jnp.float32 else 3e-2

  def report(name, ctx, err, bad, limit):
    nonlocal ok
    passed = err is not None and not bad and err <= limit
    ok &= passed
    print(f"CHECK {name} context={ctx}: max_err={err if err is None else f'{err:.3g}'} nan={bad} tol={limit} "
          f"{'OK' if passed else 'FAIL'}", flush=True)

  for i, ctx in enumerate(contexts):
    ragged = [ctx - (b * 37) % max(1, ctx // 3) for b in range(s.batch)]
    x = make_inputs(s, ctx, seed=i, lengths=ragged)
    if i == 0:
      x = _poisoned(x, s, ctx)

    def run(name, fn, ref_fn, args, limit, exact=False):
      def go():
        out, ref = fn(*args), ref_fn(*args)
        if exact:
          return float(np.sum(np.asarray(out) != np.asarray(ref))), False
        return common.max_abs_error(out, ref), bool(jnp.isnan(jnp.asarray(out, jnp.float32)).any())
      result, err = common.guarded(f"check {name}", go)
      report(name, ctx, None if result is None else result[0], result is not None and result[1], limit)

    scale = float(np.abs(np.asarray(x["scores"])[np.isfinite(np.asarray(x["scores"]))]).max())
    run("dsa_indexer_scores", indexer_fn(interpret=interpret), indexer_fn(backend="reference"), indexer_args(x),
        1e-3 * scale)
    for kernel in KERNELS:
      run(f"dsa_topk kernel={kernel} (mismatching ids)", topk_fn(s.topk, dict(kernel=kernel), interpret=interpret),
          jax.jit(lambda sc: dsa_topk_reference(sc, s.topk)), (x["scores"],), 0, exact=True)
      common.guarded("topk diagnostics", topk_diagnostics, x["scores"], s.topk, interpret, kernel)
    fused = jax.jit(lambda *a: _fused_select(a, s.topk, interpret))
    # vs lax.top_k of the kernel's own scores (the reference scores differ in rounding: near-ties may flip)
    run("indexer + top-k, fused first pass (mismatching ids)", fused,
        jax.jit(lambda *a: dsa_topk_reference(dsa_indexer_scores(*a, interpret=interpret), s.topk)),
        indexer_args(x), 0, exact=True)
    mla_args = (x["q"], x["latent"], x["rope"], x["table"])
    run("sparse_mla_decode (top-k ids)", mla_fn(x["scale"], interpret=interpret), mla_fn(x["scale"], backend="reference"),
        (*mla_args, x["ids"]), tol)
    run("sparse_mla_decode (every token)", mla_fn(x["scale"], interpret=interpret),
        mla_fn(x["scale"], backend="reference"), (*mla_args, x["dense_ids"]), tol)
    # Prefill: 64 queries of row 0 (up to 4 query rows on the smoke shape), causal top-k lists.
    n_q = min(64, ctx)
    qp = x["q"][:1, None].repeat(n_q, axis=1) * jnp.linspace(0.5, 1.5, n_q, dtype=jnp.float32)[None, :, None, None]
    qp = qp.astype(s.dtype)
    ends = ctx - n_q + jnp.arange(n_q)
    pids = jnp.where(x["ids"][:1, None, :] <= ends[None, :, None], x["ids"][:1, None, :], -1)
    pids = jax.vmap(jax.vmap(lambda r: jnp.sort(jnp.where(r < 0, jnp.iinfo(jnp.int32).max, r))))(pids)
    pids = jnp.where(pids == jnp.iinfo(jnp.int32).max, -1, pids)
    prefill = jax.jit(lambda q, lat, rope, pt, ids: sparse_mla_prefill(q, lat, rope, pt, ids, x["scale"],
                                                                       interpret=interpret))
    prefill_ref = jax.jit(lambda q, lat, rope, pt, ids: sparse_mla_prefill_reference(q, lat, rope, pt, ids,
                                                                                     x["scale"]))
    run("sparse_mla_prefill", prefill, prefill_ref, (qp, x["latent"], x["rope"], x["table"][:1], pids), tol)
    step = dsa_step_fn(s, x["scale"], interpret=interpret)
    step_ref = dsa_step_fn(s, x["scale"], backend="reference")
    run("dsa step (indexer + top-k + sparse MLA)", step, step_ref, step_args(x), tol)
  return ok


# -- benchmark --------------------------------------------------------------------------------

INDEXER_SWEEP = [dict(block=64, span=1024, num_warps=4, num_stages=2), dict(block=128, span=1024, num_warps=4),
                 dict(block=64, span=2048, num_warps=4), dict(block=128, span=2048, num_warps=8),
                 dict(block=64, span=1024, num_warps=8, num_stages=3), dict(block=32, span=512, num_warps=4)]
# kernel="row" (one launch, a program per row) against the six-launch kernel="chunked" it replaces.
TOPK_SWEEP = [dict(), dict(block=512), dict(block=2048), dict(block=1024, num_warps=4), dict(block=2048, num_warps=16),
              dict(block=4096, num_warps=16), dict(kernel="chunked"), dict(kernel="chunked", chunks=32),
              dict(kernel="chunked", block=512, chunks=128)]
CHUNKED_PEER = dict(kernel="chunked")
# The [block_h, 512] float32 accumulator and the resident [block_h, 576] query share the
# registers: 64 heads want 8+ warps, 32 heads 8, 16 heads 4 (the sweep says which spills least).
MLA_SPARSE_SWEEP = [dict(), dict(block_k=64), dict(num_splits=16), dict(num_splits=4),
                    dict(block_h=32, num_warps=8), dict(block_h=32, block_k=64, num_warps=8),
                    dict(block_h=16, block_k=64, num_warps=4), dict(block_h=128, num_warps=16),
                    dict(block_h=64, num_warps=16)]

OPS = ("indexer", "topk", "mla_sparse", "mla_dense", "dsa_step")


def label(cfg: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--contexts", default="131072,65536,32768", help="first one gets the config sweeps")
  parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                      help="tiny shapes, interpret mode (CPU); also SMOKE=1")
  parser.add_argument("--ops", default=",".join(OPS), help=f"which of {','.join(OPS)} to time")
  parser.add_argument("--check", action="store_true", help="only the correctness check")
  parser.add_argument("--no-check", action="store_true")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--budget-s", type=float, default=200.0,
                      help="wall-time budget: sweeps and XLA peers are skipped once it runs out (not under --smoke)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  ops = args.ops.split(",")
  if set(ops) - set(OPS):
    parser.error(f"--ops {args.ops!r}: unknown {sorted(set(ops) - set(OPS))}; expected a subset of {OPS}")

  info = common.setup()
  budget = common.Budget(float("inf") if args.smoke else args.budget_s)
  interpret = args.smoke or not common.on_gpu()
  s = SMOKE if args.smoke else Shape()
  contexts = [128] if args.smoke else [int(c) for c in args.contexts.split(",")]
  if args.smoke:
    args.iters = 3
  ok = True
  if not args.no_check:
    ok = check(s, [2048, min(contexts)] if not args.smoke else [128], interpret)
    print(f"CHECK SUMMARY dsa: {'OK' if ok else 'FAIL'}", flush=True)
    if args.check:
      return 0 if ok else 1
  ceiling = common.measure_copy_ceiling()
  print(f"# copy ceiling: {ceiling / 1e12:.3f} TB/s", flush=True)
  rows = []
  best = {}

  def timed(row, fn, *fargs, nbytes):
    result, err = common.guarded(f"{row['op']} {row['impl']} {row.get('config', '')}", common.time_fn, fn, *fargs,
                                 iters=args.iters, loop=not args.smoke)
    row = dict(row, error=err)
    if result is not None:
      row.update(us=round(result.us, 2), **common.bandwidth(nbytes, result.us, ceiling))
    rows.append(row)
    print(f"  {row['context']:>7} {row['op']:<11} {row['impl']:<16} {row.get('config', ''):<48} "
          f"{row.get('us', '-'):>9} us  {row.get('tb_s', '-')} TB/s  {row.get('pct_ceiling', '-')}%", flush=True)
    return row

  def sweep(ctx, op, sweep_cfgs, make, fargs, nbytes, first: bool):
    if args.smoke:        # one config per op: every op and peer runs, the sweeps are the GPU's
      sweep_cfgs = sweep_cfgs[:1]
    cfgs = sweep_cfgs if first and not budget.spent(reserve=60) else [best.get(op, {})]
    results = [timed(dict(context=ctx, op=op, impl="pallas", config=label(c)), make(c), *fargs, nbytes=nbytes)
               for c in cfgs]
    good = [(r["us"], c) for r, c in zip(results, cfgs) if r.get("us")]
    if first and good:
      best[op] = min(good, key=lambda t: t[0])[1]
    return min((r for r in results if r.get("us")), key=lambda r: r["us"], default=None)

  for i, ctx in enumerate(contexts):
    first = i == 0
    if not first and budget.spent(reserve=20):
      print(f"# budget spent: skipping context {ctx}", flush=True)
      continue
    x = make_inputs(s, ctx)
    print(f"# context {ctx}: indexer cache {s.batch * ctx * s.index_bytes / 1e6:.1f} MB, latent cache "
          f"{s.batch * ctx * s.latent_bytes / 1e6:.1f} MB", flush=True)
    ib, kb = indexer_bytes(s, ctx), topk_bytes(s, ctx)
    mb_sparse, mb_dense = mla_bytes(s, s.topk, ctx), mla_bytes(s, ctx, ctx)
    dense = None
    if "indexer" in ops:
      sweep(ctx, "indexer", INDEXER_SWEEP, lambda c: indexer_fn(c, interpret=interpret), indexer_args(x), ib, first)
      timed(dict(context=ctx, op="indexer", impl="xla"), indexer_fn(backend="reference"), *indexer_args(x), nbytes=ib)
    if "topk" in ops:
      top = sweep(ctx, "topk", TOPK_SWEEP, lambda c: topk_fn(s.topk, c, interpret=interpret), (x["scores"],), kb,
                  first)
      if not first or args.smoke:   # the six-launch kernel at every context, as the peer of the best one
        timed(dict(context=ctx, op="topk", impl="pallas", config=label(CHUNKED_PEER)),
              topk_fn(s.topk, CHUNKED_PEER, interpret=interpret), x["scores"], nbytes=kb)
      for impl, fn in (("lax.top_k", jax.jit(lambda sc: jax.lax.top_k(sc, s.topk)[1])),
                       ("lax.approx_max_k", jax.jit(lambda sc: jax.lax.approx_max_k(sc, s.topk)[1]))):
        r = timed(dict(context=ctx, op="topk", impl=impl), fn, x["scores"], nbytes=kb)
        if top and r.get("us"):
          r["vs"] = f"{r['us'] / top['us']:.2f}x the time of ours"
    mla_args = (x["q"], x["latent"], x["rope"], x["table"])
    if "mla_sparse" in ops:  # sparse MLA over the selected tokens
      sweep(ctx, "mla_sparse", MLA_SPARSE_SWEEP, lambda c: mla_fn(x["scale"], c, interpret=interpret),
            (*mla_args, x["ids"]), mb_sparse, first)
    if "mla_dense" in ops:   # dense absorbed MLA (its config sweep and TFLOP/s: bench_mla_decode.py), plain XLA
      dense = timed(dict(context=ctx, op="mla_dense", impl="pallas", config="mla_decode"),
                    dense_fn(x["scale"], interpret=interpret), *mla_args, x["lengths"], nbytes=mb_dense)
      if not budget.spent(reserve=30):
        timed(dict(context=ctx, op="mla_dense", impl="xla"), dense_fn(x["scale"], backend="reference"),
              *mla_args, x["lengths"], nbytes=mb_dense)
    if "dsa_step" in ops:
      cfgs = {"indexer": best.get("indexer", {}), "topk": best.get("topk", {}), "mla": best.get("mla_sparse", {})}
      step_bytes = ib + mb_sparse
      step = timed(dict(context=ctx, op="dsa_step", impl="pallas",
                        config=f"best: {label(cfgs['indexer'])} | {label(cfgs['topk'])} | {label(cfgs['mla'])}"),
                   dsa_step_fn(s, x["scale"], cfgs, interpret=interpret), *step_args(x), nbytes=step_bytes)
      if first:
        timed(dict(context=ctx, op="dsa_step", impl="pallas unfused", config="top-k does its own first pass"),
              dsa_step_fn(s, x["scale"], cfgs, interpret=interpret, fused=False), *step_args(x), nbytes=step_bytes)
        peer = dict(cfgs, topk=CHUNKED_PEER)
        timed(dict(context=ctx, op="dsa_step", impl="pallas", config=f"top-k {label(CHUNKED_PEER)}"),
              dsa_step_fn(s, x["scale"], peer, interpret=interpret), *step_args(x), nbytes=step_bytes)
      if step.get("us"):
        limit_us = step_bytes / ceiling * 1e6
        step["vs"] = f"{step['us'] / limit_us:.2f}x its byte limit ({limit_us:.1f} us)"
        if dense and dense.get("us"):
          step["vs"] += f"; {dense['us'] / step['us']:.1f}x faster than dense MLA"
      if not budget.spent(reserve=20):
        timed(dict(context=ctx, op="dsa_step", impl="xla"), dsa_step_fn(s, x["scale"], backend="reference"),
              *step_args(x), nbytes=step_bytes)
    del x
  common.print_table(rows, COLUMNS, title=f"DSA decode, batch {s.batch}, {s.heads} heads, latent {s.rank}+{s.rope}, "
                                          f"indexer {s.index_heads}x{s.index_dim} fp8, top-{s.topk}")
  print(f"# best configs: {best}")
  print(f"# wall time {budget.elapsed():.0f} s")
  common.dump_json("bench_dsa", dict(info=info, ceiling_bytes_per_s=ceiling, rows=rows, best=best,
                                     check_ok=ok), args.out or None)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
