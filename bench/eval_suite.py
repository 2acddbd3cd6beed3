"""The accuracy suite behind EVAL.md, in one process: each engine configuration (dense, then each
sparse algorithm at each token budget) is built once and runs every task and context, so
compilation is paid once per configuration rather than once per point.

  python bench/eval_suite.py --model=sparse_jax/assets/default_model --out=$OUT/eval.json

Points run in priority order and the JSON is rewritten after each one; `--time_budget_s` stops
the suite cleanly (skipped points are listed) so a time limit never loses finished work.
The per-point logic (samples, scoring, budget rules, the attended fraction that counts dense
layers at full context) is `sparse_jax.eval`'s.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint (default: the embedded default model)")
flags.DEFINE_list("dense_tasks", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                  "variable_tracking", "common_words"], "tasks for the dense table")
flags.DEFINE_list("dense_contexts", ["4096", "8192", "16384", "32768"], "contexts for the dense table")
flags.DEFINE_integer("dense_samples", 100, "samples per dense point")
flags.DEFINE_list("sweep_tasks", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"],
                  "tasks for the budget sweep")
flags.DEFINE_list("sweep_contexts", ["8192", "16384", "32768"], "contexts of the budget sweep")
flags.DEFINE_list("budgets", ["128", "256", "512", "1024", "2048"], "token budgets")
flags.DEFINE_list("algorithms", ["configs/rocket.yaml", "configs/quest.yaml", "configs/snapkv.yaml",
                                  "configs/streaming.yaml", "configs/oracle.yaml"],
                  "option YAMLs of the swept algorithms (run budget-major: each budget for every algorithm)")
flags.DEFINE_bool("dense", True, "run the dense table and reference (off: another process runs it)")
flags.DEFINE_integer("sweep_samples", 25, "samples per sweep point")
flags.DEFINE_integer("max_batch_size", 16, "engine batch slots")
flags.DEFINE_string("backend", None, "pallas or reference (default: auto)")
flags.DEFINE_integer("seed", 0, "eval-split seed")
flags.DEFINE_float("time_budget_s", 1e9, "stop starting new points after this many seconds")
flags.DEFINE_string("out", "eval_suite.json", "JSON output")


def main(_):
  import warnings
  warnings.filterwarnings("ignore", message=".*Pallas.*deprecated.*")
  import jax
  from sparse_jax import LLM, SamplingParams, tasks
  from sparse_jax.config import KvCacheConfig, load_llm_api_options
  from sparse_jax.defaults import default_model_path
  from sparse_jax.eval import (budget_figures, default_max_tokens, eval_tokenizer, load_samples, score_sample,
                               with_budget)

  t_start = time.monotonic()
  model = FLAGS.model or default_model_path()
  counter = tasks.TokenCounter(eval_tokenizer(model).backend)
  dense_ctx = [int(c) for c in FLAGS.dense_contexts]
  sweep_ctx = [int(c) for c in FLAGS.sweep_contexts]
  longest = max((dense_ctx if FLAGS.dense else []) + sweep_ctx)
  configs = [("dense", None, None, KvCacheConfig(), False)] if FLAGS.dense else []
  # Budget-major: a time limit then still leaves every algorithm measured at the first budgets.
  options = [load_llm_api_options(path) for path in FLAGS.algorithms]
  for b in FLAGS.budgets:
    for opts in options:
      cfg = with_budget(opts.sparse_attention_config, int(b))
      name = (cfg.algorithm + ("+chunked_prefill" if opts.enable_chunked_prefill else "")
              + (f"+dense_layers={cfg.dense_layers}" if cfg.dense_layers else ""))
      configs.append((name, int(b), cfg, opts.kv_cache_config, opts.enable_chunked_prefill))
  result = dict(device=jax.devices()[0].device_kind, model=model, seed=FLAGS.seed, points=[], skipped=[],
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), argv=" ".join(sys.argv))
  samples_cache = {}

  def samples_for(task, ctx, n):
    key = (task, ctx)
    if key not in samples_cache or len(samples_cache[key][0]) < n:
      s = load_samples(task, ctx, n, FLAGS.seed, counter, None)
      samples_cache[key] = (s, default_max_tokens(task, s, counter))
    s, mt = samples_cache[key]
    return s[:n], mt

  def save():
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)

  for algo, budget, cfg, kv, chunked in configs:
    work = ([(t, c, FLAGS.dense_samples) for c in dense_ctx for t in FLAGS.dense_tasks] if cfg is None else
            [(t, c, FLAGS.sweep_samples) for c in sweep_ctx for t in FLAGS.sweep_tasks])
    if cfg is None:  # dense also runs every sweep point's (task, context) as the reference
      work += [(t, c, FLAGS.sweep_samples) for c in sweep_ctx for t in FLAGS.sweep_tasks
               if (t, c) not in {(a, b) for a, b, _ in work}]
    if time.monotonic() - t_start > FLAGS.time_budget_s:
      result["skipped"] += [dict(algorithm=algo, budget=budget, task=t, context_length=c) for t, c, _ in work]
      save()
      continue
    t0 = time.monotonic()
    llm = LLM(model=model, kv_cache_config=kv, sparse_attention_config=cfg, backend=FLAGS.backend,
              enable_chunked_prefill=chunked,
              max_batch_size=FLAGS.max_batch_size, max_seq_len=longest + 256, allow_long_max_seq_len=True)
    print(f"# {algo} budget={budget}: engine built in {time.monotonic() - t0:.1f}s", flush=True)
    for task, ctx, n in work:
      if time.monotonic() - t_start > FLAGS.time_budget_s:
        result["skipped"].append(dict(algorithm=algo, budget=budget, task=task, context_length=ctx))
        continue
      samples, max_tokens = samples_for(task, ctx, n)
      t0 = time.monotonic()
      outs = llm.generate([s.prompt for s in samples], SamplingParams(max_tokens=max_tokens))
      scores = [score_sample(s, o.outputs[0].text) for s, o in zip(samples, outs)]
      kept = [o.metrics.get("kept_prompt_tokens") for o in outs]
      prompt_lengths = [len(o.prompt_token_ids) for o in outs]
      point = dict(algorithm=algo, budget=budget, task=task, context_length=ctx, num_samples=len(samples),
                   accuracy=sum(scores) / len(scores), seconds=round(time.monotonic() - t0, 2),
                   mean_prompt_tokens=sum(prompt_lengths) / len(prompt_lengths),
                   mean_kept_prompt_tokens=sum(kept) / len(kept),
                   **budget_figures(budget, cfg, llm.engine.layout.num_layers, prompt_lengths),
                   failures=[dict(prediction=o.outputs[0].text, answers=s.answers)
                             for s, o, sc in zip(samples, outs, scores) if sc < 1][:3])
      result["points"].append(point)
      print(json.dumps({k: v for k, v in point.items() if k != "failures"}), flush=True)
      save()
    del llm
  save()
  print(f"# done in {time.monotonic() - t_start:.0f}s; {len(result['points'])} points, "
        f"{len(result['skipped'])} skipped", flush=True)


if __name__ == "__main__":
  app.run(main)
