"""The whole RocketKV generation-phase attention step per layer, after a long prompt.

Per layer: KT-cache scoring (top-r channels, sign-dependent min/max product, softmax, group
mean) + top-k blocks + attention over the selected tokens of the compacted cache. Measured
inside one jitted step over `--layers` layers, each with its own cache (so L2 cannot hold
them), three ways in the same run:

* `fused`:    two launches per layer (pallas_kernels/rocket_decode.py: scoring, then
              selection + sorted unit ids + attention in one kernel);
* `pallas`:   the unfused Pallas path (scoring kernels, lax.top_k, sort, to_units, the
              paged decode kernel and its XLA split combine);
* `xla_lean`: plain XLA written for speed, not as a reference: KT scoring as two einsums,
              lax.top_k, sorted token ids, a take_along_axis gather, einsum attention.

Bytes: the valid KT entries + the selected tokens' K and V + q and output, per layer.
Ops per layer: the compiled step's entry operations other than parameters, constants, tuples
and bitcasts, divided by the layers (on a GPU each is a kernel launch: what the fusion saves).

  python bench/bench_rocket_step.py --out=$OUT/rocket_step.json
  python bench/bench_rocket_step.py --smoke     # CPU, tiny shapes, interpret mode (or SMOKE=1)
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
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
flags.DEFINE_integer("prompt_budget", 2048, "prompt budget of the main point")
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


VARIANTS = ("fused", "pallas", "xla_lean")


def lean_xla_attention(q, k_pages, v_pages, kt, table, lengths, *, topr, topk, block_size, scale):
  """RocketKV decode attention in plain XLA, written for speed (a baseline, not a reference).

  q: [B, Hq, D]; k_pages, v_pages: [Hkv, num_pages, page_size, D]; kt: [Hkv, num_pages,
  page_size // block_size, 2, D]; table: int32[B, W]; lengths: int32[B] (decode token
  included). Returns [B, Hq, D] in q.dtype.
  """
  import jax
  import jax.numpy as jnp
  from jax import lax

  batch, q_heads, dim = q.shape
  kv_heads, num_pages, bpp = kt.shape[:3]
  page_size = k_pages.shape[2]
  group = q_heads // kv_heads
  qg = q.reshape(batch, kv_heads, group, dim)
  q32 = qg.astype(jnp.float32)
  if topr < dim:
    _, channels = lax.top_k(jnp.abs(q32).mean(axis=2), topr)
    keep = (channels[..., :, None] == jnp.arange(dim)).any(axis=-2)
    q32 = jnp.where(keep[:, :, None, :], q32, 0.0)
  use_max = (q32.sum(axis=2) > 0)[:, :, None, :]
  q_max = (jnp.where(use_max, q32, 0.0) * scale).astype(jnp.bfloat16)
  q_min = (jnp.where(use_max, 0.0, q32) * scale).astype(jnp.bfloat16)
  blocks = kt[:, jnp.maximum(table, 0)].astype(jnp.bfloat16)  # [Hkv, B, W, bpp, 2, D]
  blocks = blocks.reshape(kv_heads, batch, -1, 2, dim)
  raw = (jnp.einsum("bhgd,hbtd->bhgt", q_max, blocks[..., 1, :], preferred_element_type=jnp.float32)
         + jnp.einsum("bhgd,hbtd->bhgt", q_min, blocks[..., 0, :], preferred_element_type=jnp.float32))
  total = raw.shape[-1]
  n_valid = (lengths + block_size - 1) // block_size
  t = jnp.arange(total)
  valid = t[None, :] < n_valid[:, None]
  probs = jax.nn.softmax(jnp.where(valid[:, None, None, :], raw, -jnp.inf), axis=-1).mean(axis=2)
  probs = jnp.where(valid[:, None, :], probs, -jnp.inf)
  probs = jnp.where(t[None, None, :] == (n_valid - 1)[:, None, None], jnp.inf, probs)
  values, picked = lax.top_k(probs, min(topk, total))
  picked = jnp.sort(jnp.where(jnp.isneginf(values), total, picked), axis=-1)  # [B, Hkv, k]
  tokens = (picked[..., None] * block_size + jnp.arange(block_size)).reshape(batch, kv_heads, -1)
  ok = tokens < lengths[:, None, None]
  pages = jnp.take_along_axis(table[:, None, :], jnp.minimum(tokens // page_size, table.shape[1] - 1), axis=-1)
  slots = jnp.where(ok, pages * page_size + tokens % page_size, 0)  # [B, Hkv, S]
  slots = jnp.swapaxes(slots, 0, 1).reshape(kv_heads, -1, 1)
  k_sel = jnp.take_along_axis(k_pages.reshape(kv_heads, -1, dim), slots, axis=1)
  v_sel = jnp.take_along_axis(v_pages.reshape(kv_heads, -1, dim), slots, axis=1)
  k_sel = jnp.swapaxes(k_sel.reshape(kv_heads, batch, -1, dim), 0, 1)  # [B, Hkv, S, D]
  v_sel = jnp.swapaxes(v_sel.reshape(kv_heads, batch, -1, dim), 0, 1)
  logits = jnp.einsum("bhgd,bhsd->bhgs", qg, k_sel, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(jnp.where(ok[:, :, None, :], logits, -jnp.inf), axis=-1)
  out = jnp.einsum("bhgs,bhsd->bhgd", weights.astype(v_sel.dtype), v_sel)
  return out.reshape(batch, q_heads, dim).astype(q.dtype)


def step_fn(cfg, spec, variant):
  import dataclasses
  import jax
  import jax.numpy as jnp
  from pallas_kernels.rocket_decode import rocket_decode_attention
  from sparse_jax.algorithms.rocket import predict_attn
  from sparse_jax.attention import Runtime, paged_decode
  from sparse_jax.selection import to_units, unit_size_for

  rt = Runtime(backend="pallas", sparse=cfg)
  spec = dataclasses.replace(spec, runtime=rt)
  kwargs = dict(topr=cfg.channels(spec.head_dim), topk=cfg.topk, block_size=cfg.page_size, scale=spec.scale)

  def attend(q, layer, table, lengths):
    if variant == "fused":
      return rocket_decode_attention(q, layer.k, layer.v, layer.aux["kt"], table, lengths, **kwargs).out
    if variant == "xla_lean":
      return lean_xla_attention(q, layer.k, layer.v, layer.aux["kt"], table, lengths, **kwargs)
    sel = predict_attn(cfg, spec, q, layer, table, lengths)
    u = unit_size_for(sel.block_size, spec.page_size)
    ids, kv_lens = to_units(sel, table, lengths, spec.page_size, u)
    return paged_decode(q, layer, ids, kv_lens, u, spec.scale, rt)

  def step(layers, table, lengths, q):
    acc = jnp.zeros(q.shape[1:], jnp.float32)
    for i, layer in enumerate(layers):
      acc = acc + attend(q[i], layer, table, lengths).astype(jnp.float32)
    return acc

  return jax.jit(step)


_NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def entry_ops(fn, *args) -> int:
  """Operations of the compiled step's entry computation other than parameters, constants,
  tuples and bitcasts: on a GPU each is one kernel launch (a fusion, a Triton or library call,
  a copy, a sort)."""
  text = fn.lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  body = entry[:entry.index("\n}")].splitlines()[1:]
  ops = [re.search(r"=.*?\s([a-z][a-z0-9-]*)\(", line) for line in body]
  return sum(1 for m in ops if m and m.group(1) not in _NOT_LAUNCHED)


def main(_):
  import jax
  import jax.numpy as jnp
  from bench.common import bandwidth, measure_copy_ceiling, setup, time_fn

  info = setup()
  if FLAGS.smoke or os.environ.get("SMOKE") == "1":
    FLAGS.batch, FLAGS.q_heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.kv_page = 2, 4, 2, 16, 16
    FLAGS.layers, FLAGS.prompt_budget, FLAGS.sweep, FLAGS.generated = 1, 64, "", 8
  ceiling = measure_copy_ceiling()
  points = [(4, FLAGS.prompt_budget, FLAGS.layers)]
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
    outs = {}
    for variant in VARIANTS:
      point = dict(variant=variant, rocket_page_size=rk_page, prompt_budget=budget, layers=layers)
      try:
        fn = step_fn(cfg, spec, variant)
        outs[variant] = fn(layer_caches, table, lengths, q)
        t = time_fn(fn, layer_caches, table, lengths, q, loop=False, iters=20)
        us = t.us / layers
        row = dict(point, us_per_layer=round(us, 2), **bandwidth(per_layer, us, ceiling), timing=t.as_dict(),
                   ops_per_layer=round(entry_ops(fn, layer_caches, table, lengths, q) / layers, 2))
      except Exception as e:  # a failing variant is a row, not a lost run
        row = dict(point, error=f"{type(e).__name__}: {e}"[:500])
      if variant in outs and "fused" in outs:
        row["max_abs_diff_vs_fused"] = float(jnp.abs(outs[variant] - outs["fused"]).max())
      rows.append(row)
      print(json.dumps(row), flush=True)
    del layer_caches
  print(f"\ncopy ceiling {ceiling / 1e12:.2f} TB/s")
  print("| rocket page | prompt budget | layers | fused us/layer | pallas us/layer | xla_lean us/layer "
        "| fused vs pallas | fused vs xla_lean | fused % ceiling | ops per layer (fused / pallas / xla_lean) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for i in range(0, len(rows), len(VARIANTS)):
    f, p, x = rows[i:i + len(VARIANTS)]
    us = [r.get("us_per_layer", r.get("error", "")[:40]) for r in (f, p, x)]
    ratio = lambda r: f"{r['us_per_layer'] / f['us_per_layer']:.2f}x" if "us_per_layer" in r and "us_per_layer" in f else ""
    print(f"| {f['rocket_page_size']} | {f['prompt_budget']} | {f['layers']} | {us[0]} | {us[1]} | {us[2]} "
          f"| {ratio(p)} | {ratio(x)} | {f.get('pct_ceiling', '')}% "
          f"| {' / '.join(str(r.get('ops_per_layer', '-')) for r in (f, p, x))} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(info, copy_ceiling_tb_s=ceiling / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
