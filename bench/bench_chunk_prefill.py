"""Sparse chunked prefill's attention, per layer: one prompt chunk of C queries attending to U
selected context tokens per KV head (gathered) and causally to itself.

Four ways, same run, Llama-3.1-8B head shape (32 query heads, 8 KV heads, 128 dims, bf16):
  split:     `chunk_attention_split` on cuDNN (the chunk over itself and over its context, two
             flash-attention calls merged by their log-sum-exps; the engine's GPU path),
  packed:    `chunk_attention_packed` on cuDNN (one square causal flash attention per row and
             KV head),
  reference: `chunk_attention` under XLA (scores materialised per 512-query block),
  peer:      cuDNN causal attention of a dense prefill over the same U + C tokens (what a dense
             engine pays for the last C queries of a (U + C)-token prompt is about U*C + C^2/2
             pairs; the peer computes (U + C)^2 / 2 of them).
Reports microseconds per layer and useful TFLOP/s (4 * Hq * D * (U*C + C^2/2) flops).

Then the whole per-layer prefill core of one chunk after `--ctx_tokens` stored tokens (the
engine's `prefill_core`: context selection, gather, attention, cache write, aux update; the
layer's pools donated): RocketKV (configs/rocket_chunked.yaml's settings) for a middle chunk and
for the final chunk (plus SnapKV++ over the whole prompt and compaction), dense chunked, and
the parts of a RocketKV chunk each timed alone, so the table shows where a chunk's time goes.

  python bench/bench_chunk_prefill.py --out=$OUT/chunk_prefill.json
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("chunk", 4096, "queries per chunk (C)")
flags.DEFINE_string("contexts", "2048,4096,8192", "selected context tokens per KV head (U), comma separated")
flags.DEFINE_integer("q_heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("ctx_tokens", 61440, "stored tokens before the chunk, for the prefill-core rows")
flags.DEFINE_integer("prefill_budget", 4096, "RocketKV prefill_budget of the prefill-core rows")
flags.DEFINE_bool("smoke", False, "tiny shapes on the CPU (XLA instead of cuDNN)")
flags.DEFINE_string("out", "", "JSON output path")


def main(_):
  import jax
  import jax.numpy as jnp
  from bench import common
  from sparse_jax.attention import causal_attention, chunk_attention, chunk_attention_packed, chunk_attention_split

  info = common.setup()
  gpu = common.on_gpu()
  c, hq, hk, d = FLAGS.chunk, FLAGS.q_heads, FLAGS.kv_heads, FLAGS.head_dim
  impl = "cudnn" if gpu else "xla"
  dtype = jnp.bfloat16 if gpu else jnp.float32
  if FLAGS.smoke:
    c, hq, hk, d = 64, 4, 2, 16
  contexts = [int(x) for x in FLAGS.contexts.split(",")] if not FLAGS.smoke else [32, 64]
  scale = d ** -0.5
  rows = []
  for u in contexts:
    keys = jax.random.split(jax.random.key(u), 5)
    q = jax.random.normal(keys[0], (1, c, hq, d), dtype)
    k = jax.random.normal(keys[1], (1, c, hk, d), dtype)
    v = jax.random.normal(keys[2], (1, c, hk, d), dtype)
    kc = jax.random.normal(keys[3], (1, hk, u, d), dtype)
    vc = jax.random.normal(keys[4], (1, hk, u, d), dtype)
    cl = jnp.array([c], jnp.int32)
    ctx = jnp.full((1, hk), u, jnp.int32)
    packed = jax.jit(lambda *a: chunk_attention_packed(*a, scale, implementation=impl))
    ref = jax.jit(lambda *a: chunk_attention(*a, scale))
    args = (q, k, v, cl, kc, vc, ctx)
    expect = ref(*args)
    err = common.max_abs_error(packed(*args), expect)
    t_packed = common.time_fn(packed, *args, loop=False).us
    split = jax.jit(lambda *a: chunk_attention_split(*a, scale, implementation=impl))
    split_err = common.max_abs_error(split(*args), expect)
    t_split = common.time_fn(split, *args, loop=False).us
    t_ref, ref_err = common.guarded("reference", lambda: common.time_fn(ref, *args, loop=False).us)
    # Peer: dense causal prefill attention over U + C tokens.
    full_q = jax.random.normal(keys[0], (1, u + c, hq, d), dtype)
    full_k = jax.random.normal(keys[1], (1, u + c, hk, d), dtype)
    lens = jnp.array([u + c], jnp.int32)
    backend = "pallas" if gpu else "reference"
    peer = jax.jit(lambda a, b, cc, l: causal_attention(a, b, cc, l, scale, backend=backend))
    t_peer = common.time_fn(peer, full_q, full_k, full_k, lens, loop=False).us
    useful = 4 * hq * d * (u * c + c * c / 2)
    peer_flops = 4 * hq * d * (u + c) ** 2 / 2
    row = dict(U=u, C=c, split_us=round(t_split, 1), split_tflops=round(useful / t_split / 1e6, 1),
               split_max_abs_err=split_err, packed_us=round(t_packed, 1), reference_us=None if t_ref is None else round(t_ref, 1),
               peer_dense_us=round(t_peer, 1), packed_tflops=round(useful / t_packed / 1e6, 1),
               peer_tflops=round(peer_flops / t_peer / 1e6, 1),
               speedup_vs_reference=None if t_ref is None else round(t_ref / t_packed, 2),
               max_abs_err=err, reference_error=ref_err)
    rows.append(row)
    print(row, flush=True)
  common.print_table(rows, list(rows[0]), title=f"chunk attention per layer ({impl})")
  core_rows = core_breakdown(c, hq, hk, d, dtype, gpu)
  common.print_table(core_rows, list(core_rows[0]), title=f"prefill core per layer, chunk after {core_rows[0]['ctx_tokens']} tokens")
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(dict(info=info, rows=rows, core_rows=core_rows), f, indent=1)


def components(runtime, layer, q, k, v, lengths, rows, starts, ctx, c, budget):
  """The parts of a RocketKV chunk's prefill core, each jitted and timed alone."""
  import jax
  from bench import common
  from sparse_jax import attention as A

  scale = q.shape[-1] ** -0.5
  spec = A._spec_for(q, layer, scale, runtime)
  algo = runtime.algorithm
  page = layer.k.shape[2]
  block = runtime.sparse.page_size

  scores = lambda q, layer, rows, starts, lengths: A.chunk_block_scores(q, layer, rows, starts, lengths, spec,
                                                                        runtime)[0]
  select = lambda sc, rows, starts: A.chunk_context_units(sc, block, rows, starts, page, budget)[:2]
  unit = A.unit_size_for(block, page)
  gather = lambda layer, ids: (A.gather_units(layer.k, ids, unit), A.gather_units(layer.v, ids, unit))

  def write(layer, k, v, rows, starts, lengths):
    layer = A.write_chunk(layer, k, v, rows, starts, lengths)
    return algo.update_aux(runtime.sparse, spec, layer, rows, starts, starts + lengths, k.shape[1])

  sc = jax.jit(scores)(q, layer, rows, starts, lengths)
  ids, ctx_lens = jax.jit(select)(sc, rows, starts)
  kc, vc = jax.jit(gather)(layer, ids)
  attend = jax.jit(lambda *a: A.sparse_chunk_attention(*a, scale, backend=runtime.backend))
  parts = [("scores (8 sampled queries)", jax.jit(scores), (q, layer, rows, starts, lengths)),
           ("top-k + to_units", jax.jit(select), (sc, rows, starts)),
           ("gather K/V units", jax.jit(gather), (layer, ids)),
           ("attention", attend, (q, k, v, lengths, kc, vc, ctx_lens)),
           ("write K/V + KT update", jax.jit(write), (layer, k, v, rows, starts, lengths))]
  out = []
  for label, fn, args in parts:
    t = common.time_fn(fn, *args, loop=False).us
    out.append(dict(core=f"  {label}", ctx_tokens=ctx, chunk=c, prefill_budget=budget, us_per_layer=round(t, 1)))
    print(out[-1], flush=True)
  return out


def core_breakdown(c, hq, hk, d, dtype, gpu):
  """Per-layer `prefill_core` of one chunk, dense chunked vs RocketKV, donated pools."""
  import functools
  import math
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench import common
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
  from sparse_jax.attention import Runtime, prefill_core
  from sparse_jax.cache import LayerCache

  page = 32 if not FLAGS.smoke else 8
  ctx = FLAGS.ctx_tokens if not FLAGS.smoke else 96
  budget = FLAGS.prefill_budget if not FLAGS.smoke else 32
  total = ctx + c
  pages = math.ceil(total / page)
  width = 1 << math.ceil(math.log2(pages))
  rows_tbl = np.full((1, width), -1, np.int32)
  rows_tbl[0, :pages] = np.random.default_rng(0).permutation(pages)
  rows_tbl = jnp.asarray(rows_tbl)
  rk = RocketSparseAttentionConfig(prompt_budget=2048 if not FLAGS.smoke else 16, window_size=32 if not FLAGS.smoke else 8,
                                   kernel_size=63 if not FLAGS.smoke else 5, topk=64 if not FLAGS.smoke else 4, page_size=4,
                                   kt_cache_dtype="float8_e5m2", prefill_budget=budget, topr=1.0)
  backend = "pallas" if gpu else "reference"
  keys = jax.random.split(jax.random.key(7), 5)
  q = jax.random.normal(keys[0], (1, c, hq, d), dtype)
  k = jax.random.normal(keys[1], (1, c, hk, d), dtype)
  v = jax.random.normal(keys[2], (1, c, hk, d), dtype)
  lengths = jnp.array([c], jnp.int32)
  starts = jnp.array([ctx], jnp.int32)
  out_rows = []
  for name, sparse, final in (("dense chunked", None, False), ("rocket chunk", rk, False), ("rocket final chunk", rk, True)):
    runtime = Runtime(backend=backend, sparse=sparse)
    aux = {}
    if sparse is not None:
      aux = {"kt": jnp.zeros((hk, width, page // rk.page_size, 2, d), jnp.float8_e5m2)}
    layer = LayerCache(k=jax.random.normal(keys[3], (hk, width, page, d), dtype),
                       v=jax.random.normal(keys[4], (hk, width, page, d), dtype), aux=aux)
    if sparse is not None:  # a KT cache that summarises the stored context
      from sparse_jax.algorithms.rocket import update_aux
      from sparse_jax.attention import AttentionSpec
      spec = AttentionSpec(q_heads=hq, kv_heads=hk, head_dim=d, page_size=page, scale=d ** -0.5, runtime=runtime)
      layer = jax.jit(functools.partial(update_aux, rk, spec), static_argnums=4)(
          layer, rows_tbl, jnp.zeros((1,), jnp.int32), starts, ctx)
    core = functools.partial(prefill_core, scale=d ** -0.5, runtime=runtime, extra={}, chunked=True, final=final)

    def step(state, q, k, v, lengths, rows, starts, core=core):
      layer, acc = state
      out, layer, _ = core(q, k, v, lengths, layer, rows, starts)
      return layer, acc + out[0, -1, 0, 0].astype(jnp.float32)

    fn = jax.jit(step, donate_argnums=0)
    timing, (layer, _) = common.time_stateful(fn, (layer, jnp.float32(0)), q, k, v, lengths, rows_tbl, starts, iters=20)
    row = dict(core=name, ctx_tokens=ctx, chunk=c, prefill_budget=budget if sparse is not None else None,
               us_per_layer=round(timing.us, 1))
    out_rows.append(row)
    print(row, flush=True)
    if sparse is not None and not final:
      out_rows += components(runtime, layer, q, k, v, lengths, rows_tbl, starts, ctx, c, budget)
    del layer
  return out_rows


if __name__ == "__main__":
  app.run(main)
