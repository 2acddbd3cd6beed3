"""Whole-model decode benchmark: a Llama-3.1-8B-shaped model with random bf16 weights.

Measures the engine's jitted decode step (many steps per host round trip, cache donated) at
several contexts, and reports tokens/s and achieved HBM bandwidth:
(weight bytes + KV bytes read per step) / step time, against a copy ceiling measured in the
same run. The peer is the same engine with the pure-XLA reference attention.

Two layouts of the same engine step, in the same run (`--layouts`): `bench` (`--steps` steps
per call, the page table at its full width) and `serving` (what the serving engine compiles:
`--serving_steps` steps per call, the table at `Engine.page_table_width`, a power of two).
For dense Pallas rows, the attention kernel alone at the layout's table width (one layer's
pools, times the layers): its share of the step and its % of the copy ceiling, so a gap between
the kernel's bandwidth and the whole step's is attributed to the attention or to the rest.

  python bench/bench_decode.py --contexts=4096,16384,32768 --batch=8 --out=$OUT/decode.json
  python bench/bench_decode.py --smoke     # CPU, tiny model, interpret mode (or SMOKE=1)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "llama-3.1-8b", "model shape: a name in configs/models or a config.json path")
flags.DEFINE_list("contexts", ["4096", "16384", "32768"], "tokens already in the cache per sequence")
flags.DEFINE_integer("batch", 8, "sequences decoded together")
flags.DEFINE_integer("steps", 32, "decode steps per jitted call (per host round trip)")
flags.DEFINE_integer("serving_steps", 16, "steps per call of the `serving` layout (the engine's default chunk)")
flags.DEFINE_list("layouts", ["bench", "serving"], "bench: --steps per call, full-width page table; serving: "
                  "--serving_steps per call, the engine's bucketed table width")
flags.DEFINE_bool("smoke", False, "tiny model on the CPU (interpret mode)")
flags.DEFINE_integer("iters", 20, "timed calls per point (median)")
flags.DEFINE_list("backends", ["pallas", "reference"], "attention backends to compare")
flags.DEFINE_string("reference_contexts", "32768", "contexts at which the reference backend also runs")
flags.DEFINE_integer("page_size", 32, "KV page size")
flags.DEFINE_string("sparse", "", "optional options YAML (e.g. configs/rocket.yaml) for a sparse run")
flags.DEFINE_string("out", "", "JSON output path")
flags.DEFINE_string("hlo_dir", "", "if set: write each compiled decode step's optimized HLO there (memory debugging)")


def _mem(tag: str) -> None:
  """Device memory in use / peak so far (GPU only): where a run's memory goes, stage by stage."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if stats:
    print(f"  [mem] {tag}: in use {stats.get('bytes_in_use', 0) / 1e9:.2f} GB, peak "
          f"{stats.get('peak_bytes_in_use', 0) / 1e9:.2f} GB, limit {stats.get('bytes_limit', 0) / 1e9:.2f} GB",
          flush=True)


def _compile(fn, args, kwargs, tag: str):
  """The compiled step the timed calls run (one compilation per backend and steps per call) and
  its memory_analysis (arguments, outputs, aliased bytes, temporaries); with --hlo_dir, its
  optimized HLO: a pool-sized temporary means the step copies the pool."""
  compiled = fn.lower(*args, **kwargs).compile()
  m = compiled.memory_analysis()
  if m is not None:
    print(f"  [compiled {tag}] args {m.argument_size_in_bytes / 1e9:.2f} GB, out {m.output_size_in_bytes / 1e9:.2f} GB, "
          f"alias {m.alias_size_in_bytes / 1e9:.2f} GB, temp {m.temp_size_in_bytes / 1e9:.2f} GB", flush=True)
  if FLAGS.hlo_dir:
    os.makedirs(FLAGS.hlo_dir, exist_ok=True)
    with open(os.path.join(FLAGS.hlo_dir, f"decode_{tag}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
  return compiled


def main(_):
  import warnings
  warnings.filterwarnings("ignore", message=".*Pallas.*deprecated.*")
  import jax
  import jax.numpy as jnp
  import numpy as np

  import models
  from bench import model_config
  from bench.common import measure_copy_ceiling, random_fill_cache
  from sparse_jax.config import KvCacheConfig, load_llm_api_options
  from sparse_jax.engine import Engine

  smoke = FLAGS.smoke or os.environ.get("SMOKE") == "1"
  if smoke:
    FLAGS.config, FLAGS.contexts, FLAGS.batch, FLAGS.iters, FLAGS.page_size = "tiny-llama", ["48"], 2, 2, 16
    FLAGS.steps, FLAGS.serving_steps, FLAGS.backends = 4, 2, ["pallas"]
  cfg = model_config(FLAGS.config)
  t0 = time.perf_counter()
  model = models.build_model(cfg, dtype=jnp.bfloat16)
  jax.block_until_ready(jax.tree_util.tree_leaves(model))
  print(f"built {FLAGS.config} with random bf16 weights in {time.perf_counter() - t0:.1f}s", flush=True)
  _mem("weights built")
  from flax import nnx
  params = nnx.state(model, nnx.Param)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  embed_bytes = model.embed_tokens.embedding[...].size * 2
  read_weight_bytes = weight_bytes - (embed_bytes if not model.config.tie_word_embeddings else 0)
  ceiling = measure_copy_ceiling()
  print(f"weights {weight_bytes / 1e9:.2f} GB (read per step {read_weight_bytes / 1e9:.2f} GB); "
        f"copy ceiling {ceiling / 1e12:.2f} TB/s", flush=True)
  sparse = load_llm_api_options(FLAGS.sparse).sparse_attention_config if FLAGS.sparse else None
  contexts = [int(c) for c in FLAGS.contexts]
  ref_contexts = {int(c) for c in FLAGS.reference_contexts.split(",") if c}
  b, steps = FLAGS.batch, FLAGS.steps
  max_ctx = max(contexts)
  extra = (steps + FLAGS.serving_steps + 1) * (2 * FLAGS.iters + 2) + 8  # tokens the timed calls append
  rows = []
  for backend in FLAGS.backends:
    ctxs = [c for c in contexts if backend != "reference" or c in ref_contexts]
    if not ctxs:
      continue
    top = max(ctxs)
    # One engine per backend (one compilation); every context reuses its pool.
    eng = Engine(model, None, kv_cache_config=KvCacheConfig(
        tokens_per_block=FLAGS.page_size, max_tokens=b * FLAGS.page_size * math.ceil((top + extra) / FLAGS.page_size)),
                 sparse_attention_config=sparse, backend=backend, max_batch_size=b, max_seq_len=top + extra,
                 kv_dtype=jnp.bfloat16, decode_chunk_size=steps)
    for s in range(b):
      eng.allocator.ensure(s, top + extra)
    table = jnp.asarray(eng.allocator.table())
    # pallas: the kernel skips pages past each sequence's length, so the full-width table costs
    # nothing; the XLA reference reads every listed page, so give it the tightest table.
    n_pages = eng.max_pages_per_seq
    cache, eng.cache = eng.cache, None
    _mem(f"{backend} engine + pool")

    def attention_alone(cache, table, lengths):
      """Device time (us) of one layer's dense decode attention as the step runs it (the dense
      units of `table`, the paged decode kernel on layer 0's pools)."""
      from bench.common import time_fn
      from pallas_kernels.paged_decode import paged_decode_attention
      from sparse_jax.attention import Runtime, pool_as_units
      from sparse_jax.selection import dense_units
      kv_heads, _, page, head_dim = cache.k[0].shape
      q = jnp.full((b, model.config.num_attention_heads, head_dim), 0.01, jnp.bfloat16)
      kwargs = Runtime(backend=backend).kernel_kwargs()
      fn = jax.jit(lambda q, k, v, pt, ln: paged_decode_attention(
          q, pool_as_units(k, page), pool_as_units(v, page), *dense_units(pt, ln, kv_heads), scale=head_dim ** -0.5,
          **kwargs))
      return time_fn(fn, q, cache.k[0], cache.v[0], table, lengths, iters=FLAGS.iters, loop=not smoke).us

    def fill(cache, ctx):
      cache = random_fill_cache(cache, aux=False)
      return cache.replace(lengths=jnp.full_like(cache.lengths, ctx), positions=jnp.full_like(cache.positions, ctx))

    tokens = jnp.ones((b,), jnp.int32)
    active = jnp.ones((b,), bool)
    remaining = jnp.full((b,), 1 << 30, jnp.int32)
    ignore = jnp.ones((b,), bool)
    samp = eng.sampling_state()
    history = eng.history
    compiled = {}  # (steps per call, table width) -> compiled step (every context has the same shapes)
    for ctx in ctxs:
      cache = fill(cache, ctx)
      _mem(f"{backend} ctx={ctx} filled")
      per_step = {}
      widths = {"bench": (steps, n_pages),
                "serving": (FLAGS.serving_steps, eng.page_table_width(ctx + extra))}
      for key in sorted({widths[name] for name in FLAGS.layouts} | {(1, n_pages)}, reverse=True):
        n, width = key
        if key not in compiled:
          compiled[key] = _compile(eng.decode_fn, (eng.params, cache, table, tokens, active, remaining, ignore, samp,
                                                    history), dict(n_pages=width, num_steps=n),
                                   f"{backend}_steps{n}_pages{width}")
        run = lambda c, h, step_fn=compiled[key]: step_fn(eng.params, c, table, tokens, active, remaining, ignore,
                                                          samp, h)
        t0 = time.perf_counter()
        cache, history, out, *_ = run(cache, history)
        jax.block_until_ready(out)
        compile_s = time.perf_counter() - t0
        _mem(f"{backend} ctx={ctx} steps={n} pages={width} first call")
        times = []
        for _ in range(FLAGS.iters if n > 1 else 2 * FLAGS.iters):
          t0 = time.perf_counter()
          cache, history, out, *_ = run(cache, history)
          jax.block_until_ready(out)
          times.append(time.perf_counter() - t0)
        per_step[key] = float(np.median(times)) / n
        print(f"  {backend} ctx={ctx} steps/call={n} table width={width}: {per_step[key] * 1e3:.3f} ms/step "
              f"(first call {compile_s:.1f}s; calls {[round(t * 1e3, 2) for t in times[:6]]} ms)", flush=True)
      for layout in FLAGS.layouts:
        n, width = widths[layout]
        kv_bytes = b * (ctx + extra // 2) * eng.layout.bytes_per_token(jnp.bfloat16)
        step, single = per_step[(n, width)], per_step[(1, n_pages)]
        bytes_step = read_weight_bytes + kv_bytes
        row = dict(backend=backend, layout=layout, context=ctx, batch=b, steps_per_call=n, table_width=width,
                   step_ms=step * 1e3, step_ms_single_call=single * 1e3,
                   host_overhead_pct=100 * max(0.0, single - step) / single,
                   tokens_per_s=b / step, bytes_per_step_gb=bytes_step / 1e9, tb_per_s=bytes_step / step / 1e12,
                   pct_of_ceiling=100 * bytes_step / step / ceiling, sparse=sparse.algorithm if sparse else "dense")
        if backend == "pallas" and sparse is None:   # where the step's time goes: the attention kernel alone
          us = attention_alone(cache, table[:, :width], jnp.full((b,), ctx + extra // 2, jnp.int32))
          layers = len(cache.k)
          row.update(attention_ms_per_step=us * layers / 1e3, attention_pct_of_step=100 * us * layers / 1e3 / row["step_ms"],
                     attention_tb_per_s=kv_bytes / layers / us / 1e6,
                     attention_pct_of_ceiling=100 * kv_bytes / layers / (us * 1e-6) / ceiling)
          print(f"  {backend} ctx={ctx} {layout}: attention kernel alone {us:.1f} us per layer x {layers} = "
                f"{row['attention_ms_per_step']:.2f} ms/step ({row['attention_pct_of_step']:.0f}% of the step, "
                f"{row['attention_pct_of_ceiling']:.0f}% of the ceiling)", flush=True)
        rows.append(row)
    del cache, eng
  print("\n| backend | layout | steps/call | table width | context | batch | ms/step | tokens/s | GB read/step "
        "| TB/s | % ceiling | host overhead | attention alone (ms/step, % of step, % ceiling) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['backend']} | {r['layout']} | {r['steps_per_call']} | {r['table_width']} | {r['context']} | "
          f"{r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
          f"{r['bytes_per_step_gb']:.1f} | {r['tb_per_s']:.2f} | {r['pct_of_ceiling']:.0f}% | "
          f"{r['host_overhead_pct']:.1f}% | " + (
              f"{r['attention_ms_per_step']:.2f}, {r['attention_pct_of_step']:.0f}%, {r['attention_pct_of_ceiling']:.0f}% |"
              if "attention_ms_per_step" in r else "- |"))
  result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, config=FLAGS.config,
                copy_ceiling_tb_s=ceiling / 1e12, weight_bytes=weight_bytes, rows=rows)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
