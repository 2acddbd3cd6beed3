"""Paged / block-sparse decode attention: ours vs cuDNN, JAX's Pallas paged attention, XLA.

Per named bench shape (pallas_kernels/named_shapes.py: batch 8, 32 q heads / 8 kv heads,
D 128, bf16, 32-token pages in a permuted pool), side by side in one run:

* ours (``paged_decode_attention``), best of a small config sweep (units_per_block,
  num_splits, num_warps, num_stages) plus the default config;
* cuDNN ``jax.nn.dot_product_attention(implementation="cudnn")`` over the same selected
  tokens pre-gathered into a contiguous [B, T, H, D] buffer (sparse shapes), and over the
  full context (every shape: the dense alternative);
* JAX's Pallas paged-attention op on the same pages (dense shapes);
* plain XLA (``paged_decode_attention_reference``).

Reported: time (us), bytes actually read, TB/s, % of the copy ceiling measured in this run,
max |ours - reference|. The full sweep runs on the first shape of each category (sel2k,
larger selections, dense); the others run the default and that category's best config.

  python bench/bench_paged_decode.py                 # GPU, all bench shapes, JSON to $OUT
  python bench/bench_paged_decode.py --smoke         # CPU, tiny shapes, interpret mode
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (also puts the repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import _compat  # noqa: E402
from pallas_kernels import named_shapes as ns  # noqa: E402
from pallas_kernels.paged_decode import (  # noqa: E402
    default_num_splits,
    default_units_per_block,
    paged_decode_attention,
    paged_decode_attention_reference,
)

# Most important first (the run has a time budget): the first shape of each category
# (sel2k, larger selections, dense) gets the full config sweep.
BENCH_ORDER = [
    "bench_b8_h32_kv8_d128_ctx32k_sel2k",
    "bench_b8_h32_kv8_d128_ctx128k_sel16k",
    "bench_b8_h32_kv8_d128_ctx32k_dense",
    "bench_b8_h32_kv8_d128_ctx128k_sel2k",
    "bench_b8_h32_kv8_d128_ctx64k_sel2k",
    "bench_b8_h32_kv8_d128_ctx128k_sel8k",
    "bench_b8_h32_kv8_d128_ctx128k_dense",
    "bench_b8_h32_kv8_d128_ctx64k_dense",
]
CHECK_SHAPES = [n for n in ns.DECODE_SHAPES if n.startswith("test_")] + [
    "bench_b8_h32_kv8_d128_ctx32k_sel2k", "bench_b8_h32_kv8_d128_ctx32k_dense"]
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
SMOKE_ORDER = ["test_g4_d128_u4_f32", "test_g4_d64_u32_dense_bf16"]
COLUMNS = ["shape", "impl", "config", "us", "tb_s", "pct_ceiling", "bytes", "max_err",
           "speedup_vs_cudnn_sel", "error"]


def category(shape: ns.DecodeShape) -> str:
  if shape.selected is None:
    return "dense"
  return "sel2k" if shape.selected <= 2048 else "sel_large"


def max_units(shape: ns.DecodeShape) -> int:
  if shape.selected is None:
    return -(-shape.context // shape.unit_size)
  return shape.selected // shape.unit_size + shape.extra_units


def base_config(shape: ns.DecodeShape) -> dict:
  upb = default_units_per_block(shape.unit_size)
  return dict(units_per_block=upb,
              num_splits=default_num_splits(shape.batch, shape.kv_heads, max_units(shape),
                                            upb),
              num_warps=4, num_stages=2)


def sweep_configs(shape: ns.DecodeShape, level: str) -> list[dict]:
  """The default config first, then single- and double-knob variations around it."""
  base = base_config(shape)
  if level == "none":
    return [base]
  upb, splits = base["units_per_block"], base["num_splits"]
  min_upb = max(1, 16 // shape.unit_size)

  def with_(**kw):
    cfg = dict(base, **kw)
    if "units_per_block" in kw and "num_splits" not in kw:
      cfg["num_splits"] = default_num_splits(shape.batch, shape.kv_heads, max_units(shape),
                                             cfg["units_per_block"])
    return cfg

  variants = [
      base,
      with_(num_stages=3),
      with_(num_warps=8),
      with_(units_per_block=upb * 2),
      with_(units_per_block=upb * 2, num_warps=8, num_stages=3),
      with_(units_per_block=max(min_upb, upb // 2)),
      with_(num_splits=splits * 2),
      with_(num_splits=max(1, splits // 2)),
  ]
  if level == "quick":
    variants = variants[:3]
  unique = []
  for v in variants:
    if v not in unique:
      unique.append(v)
  return unique


def config_label(cfg: dict) -> str:
  return (f"upb={cfg['units_per_block']},splits={cfg['num_splits']},"
          f"w={cfg['num_warps']},s={cfg['num_stages']}")


def gathered_contiguous(case) -> tuple[jax.Array, jax.Array]:
  """The listed tokens of every (row, kv head) as contiguous [B, T_sel, Hkv, D] buffers
  (the bench selections are not ragged: every head lists the same number of tokens)."""
  k_units, v_units = case.k_units, case.v_units
  head = jnp.arange(k_units.shape[0])[None, :, None]
  ids = jnp.maximum(case.unit_ids, 0)
  batch, kv_heads, m = ids.shape
  unit, dim = k_units.shape[2], k_units.shape[3]

  @jax.jit
  def gather(units):
    x = units[head, ids].reshape(batch, kv_heads, m * unit, dim)
    return jnp.swapaxes(x, 1, 2)

  return gather(k_units), gather(v_units)


def cudnn_attention(q, k, v):
  """q [B, Hq, D]; k, v [B, T, Hkv, D] -> [B, Hq, D] (one query token)."""
  out = jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")
  return out[:, 0]


def check(names=CHECK_SHAPES, interpret: bool = False) -> bool:
  """Kernel vs reference on the current device (small shapes with NaN poison, then bench
  sizes); prints the max error per shape. Returns True when all are within tolerance."""
  ok = True
  for name in names:
    shape = ns.DECODE_SHAPES[name]
    case = ns.decode_case(shape, seed=0, poison=name.startswith("test_"))

    def run():
      out = paged_decode_attention(*case.kernel_args(), interpret=interpret)
      ref = paged_decode_attention_reference(*case.kernel_args())
      return common.max_abs_error(out, ref), bool(jnp.isnan(
          jnp.asarray(out, jnp.float32)).any())

    result, err = common.guarded(f"check {name}", run)
    tol = CHECK_TOLERANCE[shape.dtype]
    passed = result is not None and not result[1] and result[0] <= tol
    ok &= passed
    detail = err if result is None else f"max_err={result[0]:.3g} nan={result[1]}"
    print(f"CHECK paged_decode {name}: {detail} tol={tol} {'OK' if passed else 'FAIL'}",
          flush=True)
  return ok


def main(argv=None) -> int:
  parser = common.kernel_bench_parser(__doc__, budget_s=180.0)
  parser.add_argument("--shapes", default="", help="comma-separated DECODE_SHAPES names")
  parser.add_argument("--sweep", choices=["full", "quick", "none"], default="full")
  args = parser.parse_args(argv)

  info = common.setup()
  budget = common.Budget(args.budget_s)
  interpret = args.smoke or not common.on_gpu()
  if args.check:
    return 0 if check(SMOKE_ORDER if args.smoke else CHECK_SHAPES, interpret) else 1
  if args.smoke:
    names = SMOKE_ORDER
    args.iters = min(args.iters, 3)
    if args.sweep == "full":
      args.sweep = "quick"
  else:
    names = args.shapes.split(",") if args.shapes else BENCH_ORDER
  ceiling = common.measure_copy_ceiling()
  print(f"# copy ceiling: {ceiling / 1e12:.3f} TB/s", flush=True)
  time_kw = dict(iters=args.iters, loop=not interpret)

  best_by_category: dict[str, dict] = {}
  swept: set[str] = set()
  cudnn_full_cache: dict[int, tuple] = {}
  payload = dict(info, ceiling_bytes_per_s=ceiling)
  rows, add = common.json_rows("paged_decode", payload, args.out or None)

  for name in names:
    shape = ns.DECODE_SHAPES[name]
    if budget.spent():
      print(f"# budget spent: skipping {name}", flush=True)
      add(dict(shape=name, impl="ours", error="skipped: time budget"))
      continue
    print(f"\n# {name}: {shape}", flush=True)
    case = ns.decode_case(shape, seed=0)
    args_ours = case.kernel_args()
    itemsize = jnp.dtype(shape.dtype).itemsize
    kv_tokens = int(np.asarray(case.kv_lens).sum())
    q_out_bytes = 2 * case.q.size * itemsize
    ours_bytes = 2 * kv_tokens * shape.head_dim * itemsize + q_out_bytes + case.unit_ids.size * 4
    shape_rows = []

    ref_fn = jax.jit(paged_decode_attention_reference)
    ref_out, err = common.guarded("reference", lambda: jax.block_until_ready(ref_fn(*args_ours)))

    # -- ours: sweep on the first shape of a category, else default + category best.
    cat = category(shape)
    if cat not in swept:
      configs = sweep_configs(shape, args.sweep)
      swept.add(cat)
    else:
      configs = [base_config(shape)]
      if cat in best_by_category and best_by_category[cat] not in configs:
        configs.append(best_by_category[cat])
    best = None
    for cfg in configs:
      if budget.spent(reserve=30) and best is not None:
        print("  # budget: sweep cut short", flush=True)
        break
      fn = jax.jit(functools.partial(paged_decode_attention, interpret=interpret, **cfg))
      # Sweep on the pipelined estimate (one compile per config); the winner is re-timed
      # with the in-jit loop below.
      timing, err = common.guarded(f"ours {config_label(cfg)}", common.time_fn, fn,
                                   *args_ours, **dict(time_kw, loop=False))
      if timing is None:
        shape_rows.append(dict(shape=name, impl="ours", config=config_label(cfg), error=err))
        continue
      print(f"  ours {config_label(cfg)}: {timing.us:.1f} us", flush=True)
      if best is None or timing.us < best[1].us:
        best = (cfg, timing)
      if cfg == configs[0]:
        shape_rows.append(dict(shape=name, impl="ours_default", config=config_label(cfg),
                               us=timing.us, timing=timing.as_dict(),
                               **common.bandwidth(ours_bytes, timing.us, ceiling)))
    if best is not None:
      cfg, timing = best
      best_by_category.setdefault(cat, cfg)  # set by the category's swept shape
      fn = jax.jit(functools.partial(paged_decode_attention, interpret=interpret, **cfg))
      if time_kw["loop"]:
        retimed, _ = common.guarded("ours best (loop)", common.time_fn, fn, *args_ours,
                                    **time_kw)
        timing = retimed if retimed is not None and retimed.us < timing.us else timing
      out = fn(*args_ours)
      max_err = common.max_abs_error(out, ref_out) if ref_out is not None else None
      shape_rows.append(dict(shape=name, impl="ours", config=config_label(cfg),
                             us=timing.us, timing=timing.as_dict(), max_err=max_err,
                             **common.bandwidth(ours_bytes, timing.us, ceiling)))

    # -- XLA reference.
    if ref_out is not None and not budget.spent(reserve=20):
      timing, err = common.guarded("xla reference", common.time_fn, ref_fn, *args_ours,
                                   **time_kw)
      shape_rows.append(dict(shape=name, impl="xla_reference", us=getattr(timing, "us", None),
                             error=err, **(common.bandwidth(ours_bytes, timing.us, ceiling)
                                           if timing else {})))

    # -- cuDNN over the selected tokens, gathered into a contiguous buffer.
    cudnn_sel_us = None
    if shape.selected is not None and not budget.spent(reserve=20):
      gathered, err = common.guarded("gather for cudnn", gathered_contiguous, case)
      if gathered is not None:
        k_sel, v_sel = gathered
        fn = jax.jit(cudnn_attention)
        timing, err = common.guarded("cudnn selected", common.time_fn, fn, case.q, k_sel,
                                     v_sel, **time_kw)
        row = dict(shape=name, impl="cudnn_selected_contiguous", error=err)
        if timing is not None:
          cudnn_sel_us = timing.us
          sel_bytes = 2 * k_sel.size * itemsize + q_out_bytes
          row.update(us=timing.us, timing=timing.as_dict(),
                     **common.bandwidth(sel_bytes, timing.us, ceiling))
          if ref_out is not None:
            row["max_err"] = common.max_abs_error(fn(case.q, k_sel, v_sel), ref_out)
        shape_rows.append(row)
        del k_sel, v_sel
      else:
        shape_rows.append(dict(shape=name, impl="cudnn_selected_contiguous", error=err))

    # -- cuDNN over the full context (contiguous), once per context length.
    if not budget.spent(reserve=20):
      if shape.context not in cudnn_full_cache:
        full_shape = (shape.batch, shape.context, shape.kv_heads, shape.head_dim)
        kk, kv = jax.random.split(jax.random.key(1))
        dtype = jnp.dtype(shape.dtype)
        k_full = jax.random.normal(kk, full_shape, jnp.float32).astype(dtype)
        v_full = jax.random.normal(kv, full_shape, jnp.float32).astype(dtype)
        timing, err = common.guarded("cudnn full", common.time_fn, jax.jit(cudnn_attention),
                                     case.q, k_full, v_full, **time_kw)
        full_bytes = 2 * k_full.size * itemsize + q_out_bytes
        cudnn_full_cache[shape.context] = (timing, err, full_bytes)
        del k_full, v_full
      timing, err, full_bytes = cudnn_full_cache[shape.context]
      shape_rows.append(dict(shape=name, impl=f"cudnn_full_ctx{shape.context}",
                             us=getattr(timing, "us", None), error=err,
                             **(common.bandwidth(full_bytes, timing.us, ceiling)
                                if timing else {})))

    # -- JAX's Pallas paged attention on the same (dense) pages.
    if shape.selected is None and not budget.spent(reserve=20):
      jax_paged = _compat.import_jax_paged_attention()
      pages_per_seq = case.page_table.shape[1]
      page_table = jnp.asarray(case.page_table)
      seq_lens = jnp.asarray(case.seq_lens)
      best_jax, err = None, None
      for k_splits in ((1,) if args.smoke else (16, 8)):  # 16 x 8 is JAX's default
        for pages_per_block in ((1,) if args.smoke else (8,)):
          if pages_per_seq % k_splits or (pages_per_seq // k_splits) % pages_per_block:
            continue
          fn = jax.jit(functools.partial(jax_paged, k_splits=k_splits,
                                         pages_per_compute_block=pages_per_block,
                                         interpret=interpret))
          label = f"k_splits={k_splits},pages_per_block={pages_per_block}"
          timing, err = common.guarded(f"jax paged {label}", common.time_fn, fn, case.q,
                                       case.k_pages, case.v_pages, page_table, seq_lens,
                                       **time_kw)
          if timing is not None and (best_jax is None or timing.us < best_jax[1].us):
            best_jax = (label, timing, fn)
      row = dict(shape=name, impl="jax_pallas_paged_attention")
      if best_jax is None:
        row["error"] = err or "no valid k_splits"
      else:
        label, timing, fn = best_jax
        dense_bytes = (2 * int(case.seq_lens.sum()) * shape.kv_heads * shape.head_dim
                       * itemsize + q_out_bytes)
        row.update(config=label, us=timing.us, timing=timing.as_dict(),
                   **common.bandwidth(dense_bytes, timing.us, ceiling))
        same_tokens = bool(np.all(np.asarray(case.kv_lens) == case.seq_lens[:, None]))
        if ref_out is not None and same_tokens:  # ragged smoke shapes list fewer tokens
          row["max_err"] = common.max_abs_error(
              fn(case.q, case.k_pages, case.v_pages, page_table, seq_lens), ref_out)
      shape_rows.append(row)

    if cudnn_sel_us:
      for row in shape_rows:
        if row.get("us"):
          row["speedup_vs_cudnn_sel"] = round(cudnn_sel_us / row["us"], 2)
    for row in shape_rows:
      add(row)
    common.print_table(shape_rows, COLUMNS, title=name)
    del case, args_ours, ref_out

  return common.finish("paged_decode", "paged decode", rows, COLUMNS, ceiling, payload, args.out or None, budget)


if __name__ == "__main__":
  sys.exit(main())
