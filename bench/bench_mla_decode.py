"""Dense absorbed MLA decode (DeepSeek-V3.2 attention shapes): TFLOP/s and bytes, three ways in one run.

Shapes: batch 8, 128 heads, kv_lora_rank 512 + rope 64 (576-dim keys, 512-dim values, one
latent per token shared by all heads), bf16, 64-token pages in a permuted pool, every
sequence full at 128K / 32K tokens.

  mla_decode         pallas_kernels/mla_decode.py: heads as the matmul's M, split-K over
                     tokens (config sweep at the first context)
  sparse_mla_decode  the token-list kernel given every token id (the dense decode path this
                     kernel replaces)
  xla_lean           a lean XLA composition: the row's pages gathered through the page table,
                     two bf16 einsums for the scores (float32 accumulation), a masked softmax,
                     one bf16 einsum for the output
  xla                the plain-jnp reference (gather every latent, float32 einsums at HIGHEST
                     precision, softmax)

Per row: time (us, bench/common.time_fn), matmul FLOPs 2 * B * H * tokens * (2R + r) and
TFLOP/s, % of the bf16 dense peak of the device's datasheet (989 TFLOP/s on an H100 SXM;
not measured), bytes read (latents + rope keys + page table + queries), TB/s and % of the
copy ceiling measured in this run. Each variant's output is compared with the reference
(max abs error) at the smallest context first. Goal: >= 50% of the bf16 peak.

  python bench/bench_mla_decode.py --out=$OUT          # GPU; JSON bench_mla_decode.json
  python bench/bench_mla_decode.py --smoke             # CPU, tiny shapes, interpret mode (or SMOKE=1)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.mla_decode import mla_decode, mla_decode_flops, mla_decode_reference  # noqa: E402
from pallas_kernels.sparse_mla_decode import sparse_mla_decode  # noqa: E402

COLUMNS = ["context", "impl", "config", "us", "tflop_s", "pct_peak", "tb_s", "pct_ceiling", "bytes", "max_err",
           "error"]
# bf16 dense tensor-core peaks from the vendors' datasheets (no sparsity), by device kind.
DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12}
SWEEP = [dict(), dict(block_k=32), dict(block_k=32, num_stages=3), dict(block_k=64, num_stages=3),
         dict(block_h=32, block_k=64, num_warps=4), dict(block_h=64, block_k=64, num_warps=16),
         dict(block_h=128, block_k=32, num_warps=16), dict(num_splits=8), dict(num_splits=32)]


class Shape:
  def __init__(self, batch=8, heads=128, rank=512, rope=64, page=64, dtype=jnp.bfloat16):
    self.batch, self.heads, self.rank, self.rope, self.page, self.dtype = batch, heads, rank, rope, page, dtype


SMOKE = Shape(batch=2, heads=16, rank=64, rope=16, page=16, dtype=jnp.float32)
SOFTMAX_SCALE = (128 + 64) ** -0.5      # DeepSeek-V3.2: qk_head_dim = nope 128 + rope 64


def make_inputs(s: Shape, context: int, seed: int = 0):
  """Pools of `batch` full sequences of `context` tokens in a permuted page pool, and queries."""
  pages_per_seq = context // s.page
  num_pages = s.batch * pages_per_seq + 4
  rng = np.random.default_rng(seed)
  table = rng.permutation(num_pages)[:s.batch * pages_per_seq].reshape(s.batch, pages_per_seq).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), 3)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(s.dtype)
  lengths = jnp.asarray([context - 3 * b for b in range(s.batch)], jnp.int32)       # ragged by a few tokens
  return dict(q=normal(keys[0], (s.batch, s.heads, s.rank + s.rope)),
              latent=normal(keys[1], (num_pages, s.page, s.rank)), rope=normal(keys[2], (num_pages, s.page, s.rope)),
              table=jnp.asarray(table), lengths=lengths,
              ids=jnp.where(jnp.arange(context)[None, :] < lengths[:, None], jnp.arange(context, dtype=jnp.int32), -1))


def dense_fn(cfg, interpret, backend="pallas"):
  return jax.jit(lambda q, lat, rope, pt, lengths: mla_decode(q, lat, rope, pt, lengths, SOFTMAX_SCALE, backend=backend,
                                                              interpret=interpret, **cfg))


def lean_xla(q, latent_pool, rope_pool, page_table, lengths, scale=SOFTMAX_SCALE):
  """Dense absorbed MLA decode as plain XLA ops, no reference-grade precision: whole pages
  gathered by the table, bf16 matmuls accumulating in float32, a masked softmax."""
  batch, max_pages = page_table.shape
  page, rank = latent_pool.shape[1], latent_pool.shape[2]
  lat = latent_pool[page_table].reshape(batch, max_pages * page, rank)              # [B, T, R]
  kr = rope_pool[page_table].reshape(batch, max_pages * page, -1)                   # [B, T, r]
  s = (jnp.einsum("bhr,btr->bht", q[..., :rank], lat, preferred_element_type=jnp.float32)
       + jnp.einsum("bhr,btr->bht", q[..., rank:], kr, preferred_element_type=jnp.float32)) * scale
  valid = jnp.arange(max_pages * page)[None, None, :] < lengths[:, None, None]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bht,btr->bhr", p.astype(lat.dtype), lat, preferred_element_type=jnp.float32)
  return (out / jnp.where(l > 0, l, 1.0)).astype(q.dtype)


def token_list_fn(interpret):
  return jax.jit(lambda q, lat, rope, pt, ids: sparse_mla_decode(q, lat, rope, pt, ids, SOFTMAX_SCALE,
                                                                 interpret=interpret))


def label(cfg: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in DATASHEET_BF16_PEAK.items() if k in kind), None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--contexts", default="131072,32768", help="the first one gets the config sweep")
  parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                      help="tiny shapes, interpret mode (CPU); also SMOKE=1")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--budget-s", type=float, default=150.0)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  info = common.setup()
  budget = common.Budget(args.budget_s)
  interpret = args.smoke or not common.on_gpu()
  s = SMOKE if args.smoke else Shape()
  contexts = [32] if args.smoke else [int(c) for c in args.contexts.split(",")]
  iters = 3 if args.smoke else args.iters
  ceiling = common.measure_copy_ceiling()
  peak = None if args.smoke else peak_flops()
  print(f"# copy ceiling {ceiling / 1e12:.3f} TB/s; bf16 datasheet peak "
        f"{'-' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)
  rows, best = [], {}
  for i, ctx in enumerate(contexts):
    if i and budget.spent(reserve=20):
      print(f"# budget spent: skipping context {ctx}", flush=True)
      continue
    x = make_inputs(s, ctx, seed=i)
    args_len = (x["q"], x["latent"], x["rope"], x["table"], x["lengths"])
    args_ids = (x["q"], x["latent"], x["rope"], x["table"], x["ids"])
    tokens = int(jnp.sum(x["lengths"]))
    flops = mla_decode_flops(1, s.heads, tokens, s.rank, s.rope)
    nbytes = (tokens * (s.rank + s.rope) * jnp.dtype(s.dtype).itemsize + s.batch * (ctx // s.page) * 4
              + s.batch * s.heads * (s.rank + s.rope) * jnp.dtype(s.dtype).itemsize)
    ref = jax.jit(lambda *a: mla_decode_reference(*a, SOFTMAX_SCALE))(*args_len) if i == len(contexts) - 1 else None

    def timed(impl, config, fn, fargs):
      row = dict(context=ctx, impl=impl, config=config)
      result, err = common.guarded(f"{impl} {config}", common.time_fn, fn, *fargs, iters=iters,
                                   loop=not args.smoke)
      row["error"] = err
      if result is not None:
        row.update(us=round(result.us, 2), tflop_s=float(f"{flops / result.us / 1e6:.4g}"),
                   **common.bandwidth(nbytes, result.us, ceiling))
        if peak:
          row["pct_peak"] = round(100 * flops / (result.us * 1e-6) / peak, 1)
        if ref is not None:
          row["max_err"] = common.max_abs_error(fn(*fargs), ref)
      rows.append(row)
      print(f"  {ctx:>7} {impl:<18} {config:<40} {row.get('us', '-'):>9} us  {row.get('tflop_s', '-')} TFLOP/s  "
            f"{row.get('pct_peak', '-')}% peak  {row.get('tb_s', '-')} TB/s  err {row.get('max_err', '-')}", flush=True)
      return row

    cfgs = SWEEP if i == 0 and not args.smoke else [best.get("cfg", {})]
    results = [(timed("mla_decode", label(c), dense_fn(c, interpret), args_len), c) for c in cfgs]
    good = [(r["us"], c) for r, c in results if r.get("us")]
    if i == 0 and good:
      best["cfg"] = min(good, key=lambda t: t[0])[1]
    timed("sparse_mla_decode", "every token id", token_list_fn(interpret), args_ids)
    timed("xla_lean", "gather pages, bf16 einsums", jax.jit(lean_xla), args_len)
    if not budget.spent(reserve=15):
      timed("xla", "reference", dense_fn({}, interpret, backend="reference"), args_len)
    del x
  common.print_table(rows, COLUMNS, title=f"Dense absorbed MLA decode, batch {s.batch}, {s.heads} heads, latent "
                                          f"{s.rank}+{s.rope}, {jnp.dtype(s.dtype).name}")
  print(f"# best mla_decode config: {label(best.get('cfg', {}))}")
  path = common.dump_json("bench_mla_decode", dict(info=info, ceiling_bytes_per_s=ceiling, bf16_peak_flops=peak,
                                                   rows=rows, best=best.get("cfg")), args.out or None)
  if path:
    print(f"# wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
