"""Every Pallas kernel, and the engine's Pallas path, against its reference on this device.

Kernels, each at small shapes with NaN in every pool slot it must not read (ragged lengths,
empty rows, permuted pages, -1 padded tables), then at the benchmarks' sizes:

  paged_decode   block-sparse / dense paged decode attention   (bench_paged_decode.check)
  compaction     in-place and two-pass page compaction, exact  (bench_compaction.check)
  rocket_score   RocketKV KT scoring, both epilogues           (bench_rocket_score.check)
  rocket_decode  the fused RocketKV step (scoring, then radix top-k + sorted unit ids +
                 attention in one kernel): ids exactly the top-k of its own block scores,
                 scores and outputs vs the plain-XLA reference
  dsa            indexer, row and chunked radix top-k (exact ids), indexer + top-k with the
                 fused first pass, sparse MLA decode / prefill, the DSA step (bench_dsa.check)
  mla_decode     dense absorbed MLA decode vs its jnp reference
  chunk_merge    sparse chunked prefill's two attention calls merged by log-sum-exps
                 (cuDNN on a GPU) vs one float32 softmax: padding query rows exactly 0,
                 empty contexts (-inf statistics), huge finite values in every unread slot

Engine: greedy tokens of every registered algorithm (the golden-output cases of
tests/engine_cases.py: the embedded default model, a tiny DeepSeek-V3.2 for DSA) with
backend="pallas" equal those of backend="reference", in float32.

Prints "CHECK <what>: ... OK|FAIL" lines and "CHECK SUMMARY"; writes check_kernels.json to
--out / $OUT; exits 1 when anything fails.

  python -m bench.check_kernels_gpu                  # GPU: small shapes, bench sizes, engine
  python -m bench.check_kernels_gpu --smoke          # CPU: small shapes only, interpret mode,
                                                     # the engine on a 1-layer model (or SMOKE=1)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import named_shapes as ns  # noqa: E402

KERNELS = ("paged_decode", "compaction", "rocket_score", "rocket_decode", "dsa", "mla_decode", "chunk_merge")
PARTS = KERNELS + ("engine",)
OUT_TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def _report(results, name, passed, detail):
  results.append(dict(check=name, ok=bool(passed), detail=detail))
  print(f"CHECK {name}: {detail} {'OK' if passed else 'FAIL'}", flush=True)
  return bool(passed)


def _nan(x) -> bool:
  return bool(np.isnan(np.asarray(x, np.float32)).any())


# -- the fused RocketKV step -------------------------------------------------------------------

def rocket_pools(case, shape: ns.RocketShape, seed: int, poison: bool):
  """K/V pools [kv_heads, num_pages, page_size, D] in q's dtype; NaN in every slot holding
  none of a row's stored tokens when `poison`."""
  kv_heads, num_pages = case.kt.shape[:2]
  owned = np.zeros((num_pages, shape.page_size), bool)
  table, lengths = np.asarray(case.page_table), np.asarray(case.lengths)
  for b, length in enumerate(lengths):
    pages = table[b, :-(-int(length) // shape.page_size)]
    owned[pages] = True
    if length % shape.page_size:
      owned[pages[-1], length % shape.page_size:] = False
  mask = None if not poison else ~owned[None, :, :, None]
  keys = jax.random.split(jax.random.key(seed), 2)
  return [ns._values(k, (kv_heads, num_pages, shape.page_size, shape.head_dim), case.q.dtype, mask) for k in keys]


def topk_unit_ids(scores, page_table, k: int, blocks_per_page: int) -> np.ndarray:
  """The k largest finite scores per (row, kv head), ties to the lower block, as unit ids in
  ascending block order, -1 padded (numpy)."""
  scores, table = np.asarray(scores), np.asarray(page_table)
  order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]                  # ties: lower index first
  taken = np.take_along_axis(scores, order, axis=-1) > -np.inf
  blocks = np.sort(np.where(taken, order, np.iinfo(np.int32).max), axis=-1)
  taken = blocks < np.iinfo(np.int32).max
  safe = np.where(taken, blocks, 0)
  pages = np.take_along_axis(table[:, None, :], safe // blocks_per_page, axis=-1)
  return np.where(taken, pages * blocks_per_page + safe % blocks_per_page, -1).astype(np.int32)


def check_rocket_decode(names, interpret, results, topk=64) -> bool:
  from pallas_kernels.paged_decode import paged_decode_attention_reference
  from pallas_kernels.rocket_decode import rocket_decode_attention, rocket_decode_attention_reference
  ok = True
  for name in names:
    shape = ns.ROCKET_SHAPES[name]
    poison = name.startswith("test_")
    case = ns.rocket_case(shape, seed=0, poison=poison)
    k_pages, v_pages = rocket_pools(case, shape, seed=1, poison=poison)
    args = (case.q, k_pages, v_pages, case.kt, case.page_table, case.lengths)
    kw = dict(topr=shape.topr, topk=min(topk, shape.max_pages * shape.page_size // shape.block_size),
              block_size=shape.block_size)

    def run():
      got = jax.jit(lambda *a: rocket_decode_attention(*a, interpret=interpret, **kw))(*args)
      ref = rocket_decode_attention_reference(*args, **kw)
      bpp = shape.page_size // shape.block_size
      own_ids = topk_unit_ids(got.block_scores, case.page_table, got.unit_ids.shape[-1], bpp)
      ids_exact = int(np.sum(np.asarray(got.unit_ids) != own_ids))
      ids_vs_ref = int(np.sum(np.asarray(got.unit_ids) != np.asarray(ref.unit_ids)))
      got_s, ref_s = np.asarray(got.block_scores), np.asarray(ref.block_scores)
      same_inf = bool(np.array_equal(np.isinf(got_s), np.isinf(ref_s)))
      fin = np.isfinite(ref_s) & np.isfinite(got_s)
      score_err = float(np.max(np.abs(got_s[fin] - ref_s[fin]), initial=0.0))
      units = lambda x: x.reshape(shape.kv_heads, -1, shape.block_size, shape.head_dim)
      own = paged_decode_attention_reference(case.q, units(k_pages), units(v_pages), got.unit_ids, got.kv_lens)
      return dict(nan=_nan(got.out), ids_not_topk=ids_exact, ids_vs_ref=ids_vs_ref, same_inf=same_inf,
                  score_err=score_err, err_own_units=common.max_abs_error(got.out, own),
                  err_vs_ref=common.max_abs_error(got.out, ref.out) if ids_vs_ref == 0 else None,
                  empty_rows_zero=bool((np.asarray(got.out, np.float32)[np.asarray(case.lengths) == 0] == 0).all()))

    r, err = common.guarded(f"rocket_decode {name}", run)
    tol = OUT_TOL[jnp.dtype(case.q.dtype).name]
    if r is None:
      ok &= _report(results, f"rocket_decode {name}", False, err)
      continue
    passed = (not r["nan"] and r["ids_not_topk"] == 0 and r["same_inf"] and r["score_err"] <= 1e-5
              and r["err_own_units"] <= tol and (r["err_vs_ref"] is None or r["err_vs_ref"] <= tol)
              and r["empty_rows_zero"])
    # Ids that differ from the reference's come from near-tied scores rounded differently
    # (score_err bounds them); the output is then checked over the kernel's own units.
    ok &= _report(results, f"rocket_decode {name}", passed, " ".join(f"{k}={v}" for k, v in r.items()) + f" tol={tol}")
  return ok


# -- dense MLA decode ----------------------------------------------------------------------------

def check_mla_decode(smoke, interpret, results) -> bool:
  from bench import bench_mla_decode as mb
  from pallas_kernels.mla_decode import mla_decode, mla_decode_reference
  ok = True
  points = [(mb.SMOKE, 40, True)] + ([] if smoke else [(mb.Shape(), 2048, True), (mb.Shape(), 32768, False)])
  for s, ctx, poison in points:
    x = mb.make_inputs(s, ctx + s.page if poison else ctx, seed=3)     # poisoned: a spare page per row
    lengths = x["lengths"]
    if poison:   # ragged, one row empty, NaN in every slot beyond a row's length
      lengths = jnp.asarray([0] + [ctx - 5 * b for b in range(1, s.batch)], jnp.int32)[:s.batch]
      pos = np.arange(x["table"].shape[1] * s.page)
      owned = np.zeros(x["latent"].shape[:2], bool)
      table = np.asarray(x["table"])
      for b, n in enumerate(np.asarray(lengths)):
        p = pos[:n]
        owned[table[b, p // s.page], p % s.page] = True
      bad = jnp.asarray(~owned)[..., None]
      x["latent"] = jnp.where(bad, jnp.nan, x["latent"]).astype(s.dtype)
      x["rope"] = jnp.where(bad, jnp.nan, x["rope"]).astype(s.dtype)
    args = (x["q"], x["latent"], x["rope"], x["table"], lengths)
    name = f"mla_decode B={s.batch} H={s.heads} R={s.rank}+{s.rope} ctx={ctx} {jnp.dtype(s.dtype).name}" + (
        " poisoned" if poison else "")

    def run():
      out = jax.jit(lambda *a: mla_decode(*a, mb.SOFTMAX_SCALE, interpret=interpret))(*args)
      clean = [jnp.nan_to_num(a) if a.dtype != jnp.int32 else a for a in args]
      ref = jax.jit(lambda *a: mla_decode_reference(*a, mb.SOFTMAX_SCALE))(*clean)
      empty = np.asarray(lengths) == 0
      return common.max_abs_error(out, ref), _nan(out), bool((np.asarray(out, np.float32)[empty] == 0).all())

    r, err = common.guarded(name, run)
    tol = OUT_TOL[jnp.dtype(s.dtype).name]
    ok &= _report(results, name, r is not None and r[0] <= tol and not r[1] and r[2],
                  err if r is None else f"max_err={r[0]:.3g} nan={r[1]} empty_rows_zero={r[2]} tol={tol}")
  return ok


# -- sparse chunked prefill: the log-sum-exp merge -----------------------------------------------

def check_chunk_merge(smoke, results) -> bool:
  from sparse_jax.attention import chunk_attention, chunk_attention_split
  gpu = common.on_gpu()
  impl, dtype = ("cudnn", jnp.bfloat16) if gpu else ("xla", jnp.float32)
  tol = OUT_TOL[jnp.dtype(dtype).name]
  # (rows, chunk, q heads, kv heads, head dim, context slots, chunk lengths, context lengths per row)
  cases = [(3, 64, 8, 2, 64, 96, [64, 40, 0], "ragged, some empty")]
  if not smoke:
    cases += [(1, 4096, 32, 8, 128, 4096, [4096], "full"), (2, 2048, 32, 8, 128, 8192, [2048, 1500], "ragged")]
  ok = True
  rng = np.random.default_rng(0)
  for n, c, hq, hk, d, u, chunk_lens, ctx_kind in cases:
    if ctx_kind == "full":
      ctx = np.full((n, hk), u)
    else:
      ctx = rng.integers(0, u + 1, size=(n, hk))
      ctx[0, 0], ctx[-1, -1] = 0, u
    own_ok = np.arange(c)[None, :] < np.asarray(chunk_lens)[:, None]          # [n, C]
    ctx_ok = np.arange(u)[None, None, :] < ctx[:, :, None]                     # [n, H, U]
    keys = jax.random.split(jax.random.key(len(results)), 5)
    q = ns._values(keys[0], (n, c, hq, d), dtype)
    # Unread keys and values hold 1e4, not NaN: flash kernels may load a masked slot (a
    # weight of 0 still enters P @ V, and 0 * NaN is NaN), which the engine allows (its
    # pools hold finite values); a masking error shows as a huge error instead.
    own_bad, ctx_bad = ~own_ok[:, :, None, None], ~ctx_ok[..., None]
    poison = lambda key, shape, bad: jnp.where(bad, 1e4, ns._values(key, shape, dtype)).astype(dtype)
    kv = [poison(key, (n, c, hk, d), own_bad) for key in keys[1:3]]
    kv_ctx = [poison(key, (n, hk, u, d), ctx_bad) for key in keys[3:5]]
    lens, ctx_lens = jnp.asarray(chunk_lens, jnp.int32), jnp.asarray(ctx, jnp.int32)
    scale = d ** -0.5
    name = f"chunk_merge n={n} C={c} {hq}/{hk} heads d={d} U={u} {ctx_kind} ({impl}, {jnp.dtype(dtype).name})"

    def run():
      out = jax.jit(lambda *a: chunk_attention_split(*a, scale, implementation=impl))(q, *kv, lens, *kv_ctx, ctx_lens)
      clean = [jnp.where(a == 1e4, 0, a).astype(jnp.float32) for a in (q, *kv, *kv_ctx)]
      ref = jax.jit(lambda q_, k_, v_, kc, vc: chunk_attention(q_, k_, v_, lens, kc, vc, ctx_lens, scale))(*clean)
      out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
      pad_zero = bool((out32[~own_ok] == 0).all())
      err = float(np.max(np.abs(out32 - ref32)[own_ok], initial=0.0))
      return err, _nan(out), pad_zero

    r, err = common.guarded(name, run)
    ok &= _report(results, name, r is not None and r[0] <= tol and not r[1] and r[2],
                  err if r is None else f"max_err={r[0]:.3g} nan={r[1]} padding_rows_zero={r[2]} tol={tol}")
  return ok


# -- the engine ----------------------------------------------------------------------------------

def check_engine(smoke, interpret, algorithms, results) -> bool:
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  from sparse_jax.defaults import DEFAULT_MODEL_DIR
  from tests import engine_cases as golden
  from tests.model_fixtures import tiny_deepseek, tiny_llama
  cases = {name: (cfg, kw, False) for name, (cfg, kw) in golden.CASES.items()}
  cases.update({name: (cfg, {}, True) for name, cfg in golden.MLA_CASES.items()})
  unknown = set(algorithms or ()) - set(cases)
  if unknown:
    raise ValueError(f"no engine case named {sorted(unknown)}; known: {sorted(cases)}")
  ok = True
  for name in algorithms or sorted(cases):
    cfg, kwargs, mla = cases[name]
    if mla:
      model = tiny_deepseek(5, num_hidden_layers=1, mlp_layer_types=("dense",)) if smoke else tiny_deepseek(5)
      vocab = model.config.vocab_size
    else:
      model = tiny_llama(3, layers=1, vocab=512) if smoke else DEFAULT_MODEL_DIR
      vocab = 512 if smoke else None
    tokens = {}

    def run():
      for backend in ("reference", "pallas"):
        llm = LLM(model, dtype="float32", backend=backend, interpret=interpret if backend == "pallas" else None,
                  max_batch_size=2, max_seq_len=512, sparse_attention_config=cfg,
                  kv_cache_config=KvCacheConfig(tokens_per_block=golden.PAGE), **{**golden.DEFAULTS, **kwargs})
        prompts = golden.prompts(vocab or llm.model.config.vocab_size)
        outs = llm.generate(prompts, SamplingParams(max_tokens=golden.NEW_TOKENS, ignore_eos=True))
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
      return tokens["pallas"] == tokens["reference"]

    t0 = time.perf_counter()
    same, err = common.guarded(f"engine {name}", run)
    detail = err if same is None else (f"greedy tokens equal ({time.perf_counter() - t0:.0f} s)" if same else
                                       f"pallas {tokens['pallas']} != reference {tokens['reference']}")
    ok &= _report(results, f"engine {name} (float32, pallas vs reference)", bool(same), detail)
  return ok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                      help="small shapes only, interpret mode, the engine on a 1-layer model (also SMOKE=1)")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
  parser.add_argument("--algorithms", default="",
                      help="engine cases (default: every registered algorithm's golden case; "
                           "under --smoke: dense,rocket,dsa)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  if set(parts) - set(PARTS):
    parser.error(f"--parts {args.parts!r}: unknown {sorted(set(parts) - set(PARTS))}; expected a subset of {PARTS}")
  algorithms = [a for a in args.algorithms.split(",") if a] or (["dense", "rocket", "dsa"] if args.smoke else None)

  info = common.setup()
  interpret = args.smoke or not common.on_gpu()
  smoke = args.smoke
  results, status = [], {}
  t0 = time.perf_counter()

  def part(name, fn, *fargs):
    if name not in parts:
      return
    t = time.perf_counter()
    ok, err = common.guarded(name, fn, *fargs)
    if ok is None:
      _report(results, name, False, err)
    status[name] = bool(ok)
    print(f"# {name}: {'OK' if ok else 'FAIL'} ({time.perf_counter() - t:.0f} s)", flush=True)

  from bench import bench_compaction, bench_dsa, bench_paged_decode, bench_rocket_score
  part("paged_decode", bench_paged_decode.check,
       bench_paged_decode.SMOKE_ORDER if smoke else bench_paged_decode.CHECK_SHAPES, interpret)
  part("compaction", bench_compaction.check, ["test_p8_d64_bf16"] if smoke else bench_compaction.CHECK_SHAPES,
       interpret)
  part("rocket_score", bench_rocket_score.check, bench_rocket_score.SMOKE if smoke else bench_rocket_score.CHECK_SHAPES,
       interpret)
  rocket_names = [n for n in ns.ROCKET_SHAPES if n.startswith("test_")]
  part("rocket_decode", check_rocket_decode, rocket_names[:2] if smoke else list(ns.ROCKET_SHAPES), interpret, results)
  part("dsa", bench_dsa.check, bench_dsa.SMOKE if smoke else bench_dsa.Shape(), [128] if smoke else [2048, 32768],
       interpret)
  part("mla_decode", check_mla_decode, smoke, interpret, results)
  part("chunk_merge", check_chunk_merge, smoke, results)
  part("engine", check_engine, smoke, interpret, algorithms, results)

  ok = all(status.values())
  summary = " ".join(f"{k}={'OK' if v else 'FAIL'}" for k, v in status.items())
  print(f"CHECK SUMMARY {summary} "
        f"({time.perf_counter() - t0:.0f} s)", flush=True)
  path = common.dump_json("check_kernels", dict(info=info, ok=ok, parts=status, checks=results), args.out or None)
  if path:
    print(f"# wrote {path}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
