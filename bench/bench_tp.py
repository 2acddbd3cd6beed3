"""Tensor parallelism on real devices: greedy equality (tp 1 vs 2) and decode throughput.

  # 1. greedy tokens with tensor_parallel_size 1 and 2 (dense, RocketKV, DSA on a tiny MLA model), plus
  #    the compiled decode step's collectives (all-reduces per layer, no all-gather of the KV cache)
  python bench/bench_tp.py check --out=/tmp/sj_tp/check.json
  # 2. whole-model decode step at long context, one process per parallel size
  python bench/bench_tp.py decode --tp=1 --config=llama-3.1-70b-16l --out=/tmp/sj_tp/decode_tp1.json
  python bench/bench_tp.py decode --tp=2 --config=llama-3.1-70b-16l --out=/tmp/sj_tp/decode_tp2.json
  # 3. the tables (speed-up, scaling efficiency)
  python bench/bench_tp.py summary --dir=/tmp/sj_tp

`--smoke` shrinks every size (CPU with XLA_FLAGS=--xla_force_host_platform_device_count=2).

The decode benchmark, like bench/bench_decode.py, runs the engine's own jitted multi-step decode
(`Engine.decode_fn`, cache donated) on a cache filled with random K/V (and random aux pools)
whose lengths are set directly: no prefill of 64K-128K tokens. Points:
  * dense @ ctx: every sequence holds ctx tokens;
  * rocket @ ctx: configs/rocket.yaml after its prompt compression: each sequence holds
    prompt_budget (2048) kept tokens with RoPE positions at ctx, i.e. what the engine decodes
    after a ctx-token prompt (the step cost is the same for any ctx >= prompt_budget, so it is
    measured once and reported for every ctx);
  * rocket-nocompact @ ctx: the same RocketKV decode-phase prediction over the whole ctx tokens
    (prompt_budget >= ctx, i.e. no prompt compression).
Every timed call runs --steps decode steps (one host round trip); ms/step is the median call
over --steps; tokens/s = batch / (s/step). The context is the cache length at the end of the
timed calls (they start that many tokens earlier).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quiet():
  import warnings
  warnings.filterwarnings("ignore", message=".*Pallas.*deprecated.*")
  warnings.filterwarnings("ignore", message=".*pallas.*deprecated.*")
  from pallas_kernels._compat import silence_triton_deprecations
  silence_triton_deprecations()


def _write(path: str, obj) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def _collectives(text: str, pool_shape=None) -> dict:
  """Counts the collectives of a compiled module's text (one copy of the decode step: the
  multi-step loop is a while loop). `pool_shape` (global [kv_heads, pages, page, dim]) flags an
  all-gather whose result has that shape, i.e. a gathered KV pool."""
  gathers = [l.strip() for l in text.splitlines() if "all-gather" in l and "=" in l]
  gathered_pool = False
  if pool_shape is not None:
    dims = ",".join(str(d) for d in pool_shape)
    gathered_pool = any(f"[{dims}]" in l.split("=")[1].split("all-gather")[0] for l in gathers)
  return dict(all_reduce=len(re.findall(r"= [^=]*all-reduce(-start)?\(", text)),
              all_gather=len(re.findall(r"= [^=]*all-gather(-start)?\(", text)),
              reduce_scatter=len(re.findall(r"= [^=]*reduce-scatter(-start)?\(", text)),
              all_to_all=len(re.findall(r"= [^=]*all-to-all(-start)?\(", text)),
              all_gather_lines=[l[:300] for l in gathers[:5]], all_gather_of_kv_pool=gathered_pool)


# -- 1. greedy equality ---------------------------------------------------------------------------

def _tiny_llama(smoke: bool, dtype):
  import jax.numpy as jnp
  from flax import nnx
  from models.llama import LlamaConfig, LlamaForCausalLM
  from sparse_jax.rope import RopeSpec
  hidden, head_dim = (64, 16) if smoke else (512, 64)
  cfg = LlamaConfig(vocab_size=97 if smoke else 1024, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=head_dim,
                    rope=RopeSpec(head_dim, theta=10000.0, max_position_embeddings=1024),
                    max_position_embeddings=1024, eos_token_ids=())
  return LlamaForCausalLM(cfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(7))


def _tiny_deepseek(smoke: bool):
  """A random 2-layer DeepSeek-V3.2 (dense MLP, then MoE), float32 (as tests/test_dsa.py's)."""
  import jax
  from flax import nnx
  from models.deepseek import DeepseekV32Config, DeepseekV32ForCausalLM
  from sparse_jax.rope import RopeSpec
  rope = 16 if smoke else 32
  fields = dict(vocab_size=97 if smoke else 1024, hidden_size=64 if smoke else 256,
                intermediate_size=96 if smoke else 512, moe_intermediate_size=32 if smoke else 128,
                num_hidden_layers=2, num_attention_heads=8, q_lora_rank=48 if smoke else 128,
                kv_lora_rank=32 if smoke else 128, qk_nope_head_dim=32 if smoke else 64, qk_rope_head_dim=rope,
                v_head_dim=24 if smoke else 64,
                rope=RopeSpec(rope, theta=10000.0, rope_type="yarn", params=(
                    ("beta_fast", 32), ("beta_slow", 1), ("factor", 4.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                    ("original_max_position_embeddings", 128)), max_position_embeddings=512),
                mlp_layer_types=("dense", "sparse"), n_routed_experts=8, n_group=4, topk_group=2,
                num_experts_per_tok=2, index_topk=8, index_n_heads=16, index_head_dim=32 if smoke else 64,
                max_position_embeddings=512)
  model = DeepseekV32ForCausalLM(DeepseekV32Config(**fields), rngs=nnx.Rngs(7))
  for layer in model.layers:  # spread the router's scores: no near-ties in routing
    if hasattr(layer.mlp, "gate"):
      gate = layer.mlp.gate
      gate.weight[...] = jax.random.normal(jax.random.key(8), gate.weight.shape) * 0.3
  return model


def check_case(name: str, smoke: bool, backend: str, sizes=(1, 2)) -> dict:
  """Greedy generation of a few prompts at each parallel size; tokens and decode-step collectives."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  from sparse_jax.algorithms.dsa import DSASparseAttentionConfig
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
  dtype = "bfloat16" if name.endswith("bf16") else "float32"
  if name.startswith("dsa"):
    sparse = DSASparseAttentionConfig(index_topk=16, indexer_k_dtype="float32")
    page = 16 if smoke else 64
  elif name.startswith("rocket"):
    sparse = RocketSparseAttentionConfig(prompt_budget=48, window_size=8, kernel_size=5, topr=1.0, topk=6, page_size=4,
                                         kt_cache_dtype="float32" if dtype == "float32" else "bfloat16")
    page = 8 if smoke else 32
  else:
    sparse = None
    page = 8 if smoke else 32
  vocab = 97 if smoke else 1024
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, vocab, size=n).tolist() for n in (90, 30, 61)]
  max_tokens = 12 if smoke else 24
  res = dict(name=name, backend=backend, dtype=dtype, page=page, outs={}, hlo={}, seconds={})
  for tp in sizes:
    t0 = time.perf_counter()
    model = _tiny_deepseek(smoke) if name.startswith("dsa") else _tiny_llama(smoke, getattr(jnp, dtype))
    llm = LLM(model, dtype=dtype, sparse_attention_config=sparse, kv_cache_config=KvCacheConfig(tokens_per_block=page),
              max_batch_size=4, max_seq_len=256, tensor_parallel_size=tp, decode_chunk_size=4, backend=backend)
    out = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    res["outs"][str(tp)] = [r.outputs[0].token_ids for r in out]
    eng = llm.engine
    pool = eng.cache.k[0]
    info = dict(pool_shards=len(pool.addressable_shards), pool_global_shape=list(pool.shape),
                pool_local_shape=list(pool.addressable_shards[0].data.shape), layers=model.config.num_hidden_layers)
    if tp > 1:
      n_pages = min(eng.max_pages_per_seq, 8)
      text = eng.decode_fn.lower(eng.params, eng.cache, jnp.asarray(eng.allocator.table()),
                                 jnp.zeros(4, jnp.int32), jnp.ones(4, bool), jnp.ones(4, jnp.int32),
                                 jnp.ones(4, bool), eng.sampling_state(), eng.history, n_pages=n_pages,
                                 num_steps=4).compile().as_text()
      info.update(_collectives(text, pool.shape))
    res["hlo"][str(tp)] = info
    res["seconds"][str(tp)] = time.perf_counter() - t0
    del llm, eng, pool, model
  ref = res["outs"][str(sizes[0])]
  res["equal"] = all(res["outs"][str(tp)] == ref for tp in sizes)
  flat = lambda o: [t for row in o for t in row]
  res["token_agreement"] = {str(tp): float(np.mean([a == b for a, b in zip(flat(res["outs"][str(tp)]), flat(ref))]))
                            for tp in sizes}
  res["devices"] = [str(d) for d in jax.devices()[:max(sizes)]]
  return res


def cmd_check(args) -> int:
  import jax
  from sparse_jax.llm import default_backend
  cases = args.cases.split(",")
  result = dict(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                device_kind=str(jax.devices()[0].device_kind), smoke=args.smoke, cases=[])
  if jax.device_count() < 2:
    print(f"CHECK need 2 devices, have {jax.device_count()}", flush=True)
    result["error"] = "fewer than 2 devices"
    _write(args.out, result)
    return 1
  t_begin = time.perf_counter()
  ok = True
  for name in cases:
    backends = [default_backend()] + (["reference"] if default_backend() != "reference" else [])
    for backend in backends:
      if args.budget_s and time.perf_counter() - t_begin > args.budget_s:
        result["cases"].append(dict(name=name, backend=backend, skipped="time budget"))
        print(f"CHECK {name} [{backend}] SKIPPED (time budget)", flush=True)
        break
      try:
        r = check_case(name, args.smoke, backend)
      except Exception as e:  # noqa: BLE001 - record and fall back to the next backend
        err = f"{type(e).__name__}: {str(e)[:1500]}"
        traceback.print_exc()
        result["cases"].append(dict(name=name, backend=backend, error=err))
        print(f"CHECK {name} [{backend}] ERROR {err[:300]}", flush=True)
        _write(args.out, result)
        ok = False
        continue
      result["cases"].append(r)
      h = r["hlo"].get("2", {})
      strict = not name.endswith("bf16")
      verdict = "OK" if r["equal"] else ("DIFF" if strict else "DIFF (bf16, informational)")
      if strict and not r["equal"]:
        ok = False
      print(f"CHECK {name} [{backend}, {r['dtype']}] greedy tp1 == tp2: {verdict} "
            f"(token agreement {r['token_agreement']['2']:.3f}); tp2 step: {h.get('all_reduce')} all-reduce "
            f"for {h.get('layers')} layers, {h.get('all_gather')} all-gather, KV pool gathered: "
            f"{h.get('all_gather_of_kv_pool')}, pool local/global {h.get('pool_local_shape')}/"
            f"{h.get('pool_global_shape')} ({sum(r['seconds'].values()):.0f}s)", flush=True)
      _write(args.out, result)
      break  # the first backend that ran is the answer
  result["ok"] = ok
  result["seconds"] = time.perf_counter() - t_begin
  _write(args.out, result)
  return 0 if ok else 1


# -- 2. decode throughput -------------------------------------------------------------------------

def cmd_decode(args) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import models
  from bench import common, model_config
  from sparse_jax.config import KvCacheConfig, load_llm_api_options
  from sparse_jax.engine import Engine
  from sparse_jax.llm import default_backend

  t_begin = time.perf_counter()
  backend = args.backend if args.backend != "auto" else default_backend()
  dtype = jnp.dtype(args.dtype)
  cfg = model_config(args.config)
  model = models.build_model(cfg, dtype=dtype.type)
  jax.block_until_ready(jax.tree_util.tree_leaves(model))
  build_s = time.perf_counter() - t_begin
  params = nnx.state(model, nnx.Param)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  embed_bytes = model.embed_tokens.embedding[...].size * dtype.itemsize
  print(f"# tp={args.tp} {args.config}: {weight_bytes / 1e9:.2f} GB of random {dtype.name} weights built in "
        f"{build_s:.1f}s on {jax.devices()[0].device_kind}; backend {backend}", flush=True)
  rocket_opts = load_llm_api_options(args.rocket_yaml)
  rocket = rocket_opts.sparse_attention_config
  if args.prompt_budget:
    rocket = dataclasses.replace(rocket, prompt_budget=args.prompt_budget)
  if args.topk:
    rocket = dataclasses.replace(rocket, topk=args.topk)
  page = args.page_size or rocket_opts.kv_cache_config.tokens_per_block
  contexts = sorted(int(c) for c in args.contexts.split(","))
  b, steps, iters = args.batch, args.steps, args.iters
  calls = iters + 1  # one untimed warm call after compilation
  decoded = steps * calls
  top = max(contexts)
  result = dict(kind="decode", tp=args.tp, config=args.config, device=str(jax.devices()[0].device_kind),
                num_devices=jax.device_count(), jax=jax.__version__, backend=backend, dtype=dtype.name, batch=b,
                steps_per_call=steps, timed_calls=iters, page_size=page, contexts=contexts,
                rocket=dataclasses.asdict(rocket), weight_bytes=weight_bytes, model_build_s=build_s,
                argv=" ".join(sys.argv), points=[])
  # (algorithm, context label, starting length, starting RoPE position); priority order: the
  # points after a budget cut are skipped.
  plan = []
  for algo in args.algorithms.split(","):
    if algo == "dense":
      plan += [("dense", c, c - decoded, c - decoded) for c in sorted(contexts, reverse=True)]
    elif algo == "rocket":
      if rocket.prompt_budget + decoded > top:
        raise ValueError(f"prompt_budget {rocket.prompt_budget} + {decoded} decoded tokens > context {top}")
      plan.append(("rocket", ",".join(map(str, contexts)), rocket.prompt_budget, top - decoded))
    elif algo == "rocket-nocompact":
      plan += [("rocket-nocompact", c, c - decoded, c - decoded) for c in sorted(contexts, reverse=True)]
    else:
      raise ValueError(f"unknown algorithm {algo!r}")
  for _, _, start, _ in plan:
    if start <= 0:
      raise ValueError(f"context too short for {decoded} decoded tokens")

  eng = cache = None
  current = None
  compile_est = 0.0
  for algo, label, start, pos in plan:
    engine_kind = "dense" if algo == "dense" else "rocket"
    elapsed = time.perf_counter() - t_begin
    if args.budget_s and elapsed + max(compile_est, 10.0) * (1 if engine_kind == current else 1.5) > args.budget_s:
      result["points"].append(dict(algorithm=algo, context=label, skipped=f"time budget ({elapsed:.0f}s spent)"))
      print(f"# {algo} ctx={label}: skipped (time budget, {elapsed:.0f}s spent)", flush=True)
      _write(args.out, result)
      continue
    try:
      if engine_kind != current:
        del eng, cache
        eng = cache = None
        t0 = time.perf_counter()
        sparse = rocket if engine_kind == "rocket" else None
        max_pages = math.ceil(top / page)
        eng = Engine(model, None, kv_cache_config=KvCacheConfig(tokens_per_block=page, max_tokens=b * max_pages * page),
                     sparse_attention_config=sparse, backend=backend, max_batch_size=b, max_seq_len=max_pages * page,
                     kv_dtype=dtype.type, decode_chunk_size=steps, tensor_parallel_size=args.tp)
        for s in range(b):
          eng.allocator.ensure(s, max_pages * page)
        cache, eng.cache = eng.cache, None
        cache = common.random_fill_cache(cache)
        jax.block_until_ready(cache.k[-1])
        current = engine_kind
        print(f"# {engine_kind} engine: pool {b} x {max_pages} pages of {page} tokens, "
              f"{eng.page_bytes(dtype.type) * b * max_pages / 1e9:.1f} GB, filled in {time.perf_counter() - t0:.1f}s",
              flush=True)
      table = jnp.asarray(eng.allocator.table())
      end = start + decoded
      if algo == "dense" and backend == "pallas":
        n_pages = eng.max_pages_per_seq  # the kernel skips pages past each length: one compile for all
      else:
        n_pages = eng.page_table_width(end)
      rep = cache.lengths.sharding
      cache = cache.replace(lengths=jax.device_put(np.full(b, start, np.int32), rep),
                            positions=jax.device_put(np.full(b, pos, np.int32), cache.positions.sharding))
      tokens = jnp.ones((b,), jnp.int32)
      active = jnp.ones((b,), bool)
      remaining = jnp.full((b,), 1 << 30, jnp.int32)
      ignore = jnp.ones((b,), bool)
      samp = eng.sampling_state()
      t0 = time.perf_counter()
      history = eng.history
      compiled = eng.decode_fn.lower(eng.params, cache, table, tokens, active, remaining, ignore, samp, history,
                                     n_pages=n_pages, num_steps=steps).compile()
      compile_s = time.perf_counter() - t0
      compile_est = max(compile_est, compile_s + 5)
      coll = _collectives(compiled.as_text(), cache.k[0].shape) if args.tp > 1 else {}
      times = []
      for i in range(calls):
        t0 = time.perf_counter()
        cache, history, out, *_ = compiled(eng.params, cache, table, tokens, active, remaining, ignore, samp, history)
        jax.block_until_ready(out)
        if i:
          times.append(time.perf_counter() - t0)
      final_len = int(np.asarray(cache.lengths)[0])
      step_s = float(np.median(times)) / steps
      # bytes each device reads per step: its weight shards (not the embedding table, of which
      # only b rows are read) and its KV (+ aux) pages of the mean length over the timed calls.
      dev0 = jax.devices()[0]
      local = lambda x: sum(s.data.size * s.data.dtype.itemsize for s in x.addressable_shards if s.device == dev0)
      w_local = sum(local(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
      e_local = local(model.embed_tokens.embedding[...])
      mean_len = start + steps + decoded / 2
      per_token = sum(local(x) for x in jax.tree_util.tree_leaves((cache.k, cache.v, cache.aux))) / (
          cache.k[0].shape[1] * page)
      kv_read = b * mean_len * per_token
      bytes_dev = w_local - e_local + kv_read
      mem = {}
      for d in jax.devices()[:args.tp]:
        st = d.memory_stats() or {}
        if "peak_bytes_in_use" in st:
          mem[str(d.id)] = round(st["peak_bytes_in_use"] / 1e9, 2)
      row = dict(algorithm=algo, context=label, start_len=start, final_len=final_len, rope_position_start=pos,
                 n_pages=n_pages, step_ms=step_s * 1e3, tokens_per_s=b / step_s, compile_s=compile_s,
                 call_ms=[t * 1e3 for t in times], weight_gb_per_device=w_local / 1e9,
                 kv_gb_read_per_device=kv_read / 1e9, bytes_per_step_per_device_gb=bytes_dev / 1e9,
                 tb_per_s_per_device=bytes_dev / step_s / 1e12, peak_memory_gb=mem, **coll)
      result["points"].append(row)
      print(f"# tp={args.tp} {algo} ctx={label} (len {start}->{final_len}, n_pages {n_pages}): "
            f"{row['step_ms']:.3f} ms/step, {row['tokens_per_s']:.1f} tok/s, {row['tb_per_s_per_device']:.2f} TB/s "
            f"per device, compile {compile_s:.1f}s"
            + (f", {coll['all_reduce']} all-reduce / {coll['all_gather']} all-gather, KV pool gathered: "
               f"{coll['all_gather_of_kv_pool']}" if coll else "") + f", peak mem GB {mem}", flush=True)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
      err = f"{type(e).__name__}: {str(e)[:1000]}"
      traceback.print_exc()
      print(f"# tp={args.tp} {algo} ctx={label}: FAILED {err[:300]}", flush=True)
      result["points"].append(dict(algorithm=algo, context=label, error=err))
      eng = cache = None
      current = None
      import gc
      gc.collect()
    _write(args.out, result)
  result["total_s"] = time.perf_counter() - t_begin
  _write(args.out, result)
  return 0 if all("error" not in p for p in result["points"]) else 1


# -- 3. summary ------------------------------------------------------------------------------------

def cmd_summary(args) -> int:
  lines = []
  check_path = os.path.join(args.dir, "check.json")
  if os.path.exists(check_path):
    with open(check_path) as f:
      check = json.load(f)
    lines.append(f"== greedy equality, tensor_parallel_size 1 vs 2 ({check.get('device_kind')}, jax {check.get('jax')})")
    for c in check.get("cases", []):
      if "skipped" in c or "error" in c:
        lines.append(f"  {c['name']} [{c['backend']}]: {c.get('skipped') or 'ERROR ' + c['error'][:200]}")
        continue
      h = c["hlo"].get("2", {})
      lines.append(f"  {c['name']:<10} [{c['backend']}, {c['dtype']}]: {'EQUAL' if c['equal'] else 'DIFFERENT'} "
                   f"(token agreement {c['token_agreement']['2']:.3f}); tp2 decode step: {h.get('all_reduce')} "
                   f"all-reduce / {h.get('layers')} layers, {h.get('all_gather')} all-gather (KV pool gathered: "
                   f"{h.get('all_gather_of_kv_pool')}); cache per device {h.get('pool_local_shape')} of "
                   f"{h.get('pool_global_shape')}")
  else:
    lines.append("== greedy equality: no check.json")
  runs = {}
  for path in sorted(glob.glob(os.path.join(args.dir, "decode_tp*.json"))):
    with open(path) as f:
      r = json.load(f)
    runs[r["tp"]] = r
  if runs:
    any_run = next(iter(runs.values()))
    lines.append(f"== decode ({any_run['config']}, {any_run['dtype']}, batch {any_run['batch']}, "
                 f"{any_run['steps_per_call']} steps per call, median of {any_run['timed_calls']} calls, "
                 f"backend {any_run['backend']}, {any_run['device']})")
    lines.append("| algorithm | context | tp1 ms/step | tp1 tok/s | tp2 ms/step | tp2 tok/s | speed-up tp2/tp1 "
                 "| scaling efficiency | bytes-bound speed-up | tp1 / tp2 TB/s per device |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    keys = []
    for r in runs.values():
      for p in r["points"]:
        if (p["algorithm"], str(p["context"])) not in keys:
          keys.append((p["algorithm"], str(p["context"])))
    for algo, ctx in keys:
      cell = {}
      for tp, r in runs.items():
        for p in r["points"]:
          if p["algorithm"] == algo and str(p["context"]) == ctx:
            cell[tp] = p
      p1, p2 = cell.get(1, {}), cell.get(2, {})
      fmt = lambda p, k, f: f.format(p[k]) if k in p else (p.get("skipped") or ("FAILED" if "error" in p else "-"))
      speed = eff = ideal = "-"
      if "step_ms" in p1 and "step_ms" in p2:
        s = p1["step_ms"] / p2["step_ms"]
        speed, eff = f"{s:.2f}x", f"{100 * s / 2:.0f}%"
        ideal = f"{p1['bytes_per_step_per_device_gb'] / p2['bytes_per_step_per_device_gb']:.2f}x"
      lines.append(f"| {algo} | {ctx} | {fmt(p1, 'step_ms', '{:.2f}')} | {fmt(p1, 'tokens_per_s', '{:.1f}')} | "
                   f"{fmt(p2, 'step_ms', '{:.2f}')} | {fmt(p2, 'tokens_per_s', '{:.1f}')} | {speed} | {eff} | {ideal} | "
                   f"{fmt(p1, 'tb_per_s_per_device', '{:.2f}')} / {fmt(p2, 'tb_per_s_per_device', '{:.2f}')} |")
    lines.append("scaling efficiency = tp2 tokens/s / (2 x tp1 tokens/s). bytes-bound speed-up = bytes one device "
                 "reads per step at tp1 / at tp2 (weights less the embedding table, + KV and aux pages): the speed-up "
                 "of a purely memory-bound step (below 2x: lm_head and norms are replicated). rocket = "
                 "configs/rocket.yaml after prompt compression (prompt_budget kept tokens: one measurement for every "
                 "context); rocket-nocompact = the same decode prediction over the whole context.")
    for tp, r in sorted(runs.items()):
      colls = {(p["algorithm"], str(p["context"])): (p.get("all_reduce"), p.get("all_gather"),
                                                     p.get("all_gather_of_kv_pool"))
               for p in r["points"] if "all_reduce" in p}
      if colls:
        lines.append(f"tp{tp} compiled decode step collectives (all-reduce, all-gather, KV pool gathered): {colls}")
      mem = ", ".join(f"{p['algorithm']}@{p['context']}: {p['peak_memory_gb']}" for p in r["points"]
                      if p.get("peak_memory_gb"))
      lines.append(f"tp{tp}: weights {r['weight_bytes'] / 1e9:.1f} GB in all; per device "
                   f"{next((p['weight_gb_per_device'] for p in r['points'] if 'step_ms' in p), 0):.1f} GB; "
                   f"peak GB by device id (cumulative over the run): {mem or '-'}; run {r.get('total_s', 0):.0f}s")
      for p in r["points"]:
        if "error" in p:
          lines.append(f"tp{tp} {p['algorithm']} ctx={p['context']} FAILED: {p['error'][:300]}")
  else:
    lines.append("== decode: no decode_tp*.json")
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(args.dir, "summary.md"), "w") as f:
    f.write(text + "\n")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("check", help="greedy equality tp 1 vs 2 and the decode step's collectives")
  c.add_argument("--cases", default="dense,rocket,dsa,dense-bf16")
  c.add_argument("--smoke", action="store_true")
  c.add_argument("--budget_s", type=float, default=0.0, help="skip the cases left after this many seconds")
  c.add_argument("--out", default="")
  d = sub.add_parser("decode", help="decode throughput at one tensor-parallel size")
  d.add_argument("--tp", type=int, default=1)
  d.add_argument("--config", default="llama-3.1-70b-16l")
  d.add_argument("--contexts", default="65536,131072")
  d.add_argument("--algorithms", default="dense,rocket,rocket-nocompact")
  d.add_argument("--rocket_yaml", default="configs/rocket.yaml")
  d.add_argument("--prompt_budget", type=int, default=0, help="override the YAML's (0: keep)")
  d.add_argument("--topk", type=int, default=0, help="override the YAML's (0: keep)")
  d.add_argument("--page_size", type=int, default=0, help="KV page size (0: the YAML's tokens_per_block)")
  d.add_argument("--batch", type=int, default=2)
  d.add_argument("--steps", type=int, default=16)
  d.add_argument("--iters", type=int, default=6)
  d.add_argument("--dtype", default="bfloat16")
  d.add_argument("--backend", default="auto", choices=["auto", "pallas", "reference"])
  d.add_argument("--budget_s", type=float, default=0.0, help="skip points that would end after this many seconds")
  d.add_argument("--out", default="")
  s = sub.add_parser("summary", help="tables from check.json and decode_tp*.json")
  s.add_argument("--dir", default="/tmp/sj_tp")
  args = parser.parse_args(argv)
  _quiet()
  return {"check": cmd_check, "decode": cmd_decode, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
