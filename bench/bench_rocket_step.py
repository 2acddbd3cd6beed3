"""The whole RocketKV generation-phase attention step per layer, after a long prompt.

Per layer: KT-cache scoring (top-r channels, sign-dependent min/max product, softmax, group
mean) + top-k + to_units + block-sparse paged decode attention over the compacted cache.
Measured inside one jitted step over `--layers` layers, each with its own cache (so L2
cannot hold them), once with the Pallas kernels and once composed from the pure-jnp
references under XLA, in the same run. Bytes: the valid KT entries + the selected tokens'
K and V + q and output, per layer.

  python bench/bench_rocket_step.py --out=$OUT/rocket_step.json
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "sequences")
flags.DEFINE_integer("q_heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("kv_page", 32, "KV cache page size")
flags.DEFINE_integer("layers", 32, "layers of the main point (default config)")
flags.DEFINE_integer("sweep_layers", 8, "layers of each sweep point")
flags.DEFINE_string("sweep", "4:1024,4:4096,8:2048,16:2048", "extra (rocket page_size:prompt_budget) points")
flags.DEFINE_integer("generated", 64, "tokens generated after the prompt (cache holds budget + this)")
flags.DEFINE_bool("smoke", False, "tiny shapes on the CPU (interpret mode)")
flags.DEFINE_string("out", "", "JSON output path")


def build(rk_page, budget, layers, key):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig, update_aux
  from sparse_jax.attention import AttentionSpec, Runtime
  from sparse_jax.cache import LayerCache

  b, hq, hk, d, ps = FLAGS.batch, FLAGS.q_heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.kv_page
  cfg = RocketSparseAttentionConfig(prompt_budget=budget, page_size=rk_page, topr=1.0)
  length = budget + FLAGS.generated
  pages_per_seq = math.ceil(length / ps)
  width = 1 << math.ceil(math.log2(pages_per_seq))  # the engine's page-table bucket
  num_pages = b * pages_per_seq
  table = np.full((b, width), -1, np.int32)
  table[:, :pages_per_seq] = np.random.default_rng(0).permutation(num_pages).reshape(b, pages_per_seq)
  table = jnp.asarray(table)
  lengths = jnp.full((b,), length, jnp.int32)
  spec = AttentionSpec(q_heads=hq, kv_heads=hk, head_dim=d, page_size=ps, scale=d ** -0.5, runtime=Runtime())
  layer_list = []
  for i in range(layers):
    kk, kv, key = jax.random.split(key, 3)
    k = jax.random.normal(kk, (hk, num_pages, ps, d), jnp.bfloat16)
    v = jax.random.normal(kv, (hk, num_pages, ps, d), jnp.bfloat16)
    kt = jnp.zeros((hk, num_pages, ps // rk_page, 2, d), jnp.float8_e5m2)
    layer = LayerCache(k=k, v=v, aux={"kt": kt})
    layer = jax.jit(functools.partial(update_aux, cfg, spec), static_argnums=4)(
        layer, table, jnp.zeros_like(lengths), lengths, length)
    layer_list.append(layer)
  q = jax.random.normal(key, (layers, b, hq, d), jnp.bfloat16)
  return cfg, spec, tuple(layer_list), table, lengths, q, length


def step_fn(cfg, spec, backend):
  import jax
  import jax.numpy as jnp
  import dataclasses
  from sparse_jax.algorithms.rocket import predict_attn
  from sparse_jax.attention import Runtime, paged_decode
  from sparse_jax.selection import to_units, unit_size_for

  rt = Runtime(backend=backend, sparse=cfg)
  spec = dataclasses.replace(spec, runtime=rt)

  def step(layers, table, lengths, q):
    acc = jnp.zeros(q.shape[1:], jnp.float32)
    for i, layer in enumerate(layers):
      sel = predict_attn(cfg, spec, q[i], layer, table, lengths)
      u = unit_size_for(sel.block_size, spec.page_size)
      ids, kv_lens = to_units(sel, table, lengths, spec.page_size, u)
      acc = acc + paged_decode(q[i], layer, ids, kv_lens, u, spec.scale, rt).astype(jnp.float32)
    return acc

  return jax.jit(step)


def main(_):
  import jax
  import jax.numpy as jnp
  from bench.common import bandwidth, measure_copy_ceiling, setup, time_fn

  info = setup()
  if FLAGS.smoke:
    FLAGS.batch, FLAGS.q_heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.kv_page = 2, 4, 2, 16, 16
    FLAGS.layers, FLAGS.sweep_layers, FLAGS.sweep, FLAGS.generated = 2, 1, "8:128", 8
  ceiling = measure_copy_ceiling()
  points = [(4, 2048 if not FLAGS.smoke else 64, FLAGS.layers)]
  points += [(int(a), int(bud), FLAGS.sweep_layers) for a, bud in (p.split(":") for p in FLAGS.sweep.split(",") if p)]
  rows = []
  for rk_page, budget, layers in points:
    cfg, spec, layer_caches, table, lengths, q, length = build(rk_page, budget, layers, jax.random.PRNGKey(budget))
    b, hk, d = FLAGS.batch, FLAGS.kv_heads, FLAGS.head_dim
    blocks = math.ceil(length / rk_page)
    kt_bytes = b * hk * blocks * 2 * d * 1
    sel_tokens = min(cfg.topk * rk_page, length)
    kv_bytes = b * hk * sel_tokens * d * 2 * 2
    per_layer = kt_bytes + kv_bytes + 2 * b * FLAGS.q_heads * d * 2
    for backend in ("pallas", "reference"):
      try:
        t = time_fn(step_fn(cfg, spec, backend), layer_caches, table, lengths, q, loop=False, iters=20)
        us = t.us / layers
        row = dict(backend=backend, rocket_page_size=rk_page, prompt_budget=budget, layers=layers,
                   us_per_layer=round(us, 2), **bandwidth(per_layer, us, ceiling), timing=t.as_dict())
      except Exception as e:  # a failing backend is a row, not a lost run
        row = dict(backend=backend, rocket_page_size=rk_page, prompt_budget=budget, layers=layers,
                   error=f"{type(e).__name__}: {e}"[:500])
      rows.append(row)
      print(json.dumps(row), flush=True)
    del layer_caches
  print(f"\ncopy ceiling {ceiling / 1e12:.2f} TB/s")
  print("| rocket page | prompt budget | layers | pallas us/layer | reference us/layer | speed-up | pallas TB/s | % ceiling |")
  print("|---|---|---|---|---|---|---|---|")
  for i in range(0, len(rows), 2):
    p, r = rows[i], rows[i + 1]
    if "error" in p or "error" in r:
      print(f"| {p['rocket_page_size']} | {p['prompt_budget']} | {p['layers']} | {p.get('us_per_layer', p.get('error'))} "
            f"| {r.get('us_per_layer', r.get('error'))} | | | |")
      continue
    print(f"| {p['rocket_page_size']} | {p['prompt_budget']} | {p['layers']} | {p['us_per_layer']} | "
          f"{r['us_per_layer']} | {r['us_per_layer'] / p['us_per_layer']:.2f}x | {p['tb_s']} | {p['pct_ceiling']}% |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(info, copy_ceiling_tb_s=ceiling / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
