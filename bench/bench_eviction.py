"""Peak KV pages over a long generation, with and without eviction (decode_budget).

Pages are a property of the scheduler, not of the device, so this runs anywhere:
  python bench/bench_eviction.py --generate=8192 --out=eviction.json
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny-llama", "model shape (configs/models name); random weights")
flags.DEFINE_integer("prompt", 4096, "prompt tokens")
flags.DEFINE_integer("generate", 8192, "generated tokens")
flags.DEFINE_integer("prompt_budget", 1024, "RocketKV prompt budget")
flags.DEFINE_integer("decode_budget", 2048, "tokens a sequence may hold before pages are evicted")
flags.DEFINE_integer("page_size", 32, "KV page size")
flags.DEFINE_string("out", "", "JSON output path")


def main(_):
  import jax
  import numpy as np
  import models
  from bench import model_config
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig

  cfg = model_config(FLAGS.config)
  cfg["max_position_embeddings"] = FLAGS.prompt + FLAGS.generate + 64
  rows = []
  prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg["vocab_size"], size=FLAGS.prompt)]
  for budget in (None, FLAGS.decode_budget):
    sparse = RocketSparseAttentionConfig(prompt_budget=FLAGS.prompt_budget, topr=1.0, topk=64, page_size=4,
                                         decode_budget=budget)
    model = models.build_model(cfg)
    llm = LLM(model, sparse_attention_config=sparse, kv_cache_config=KvCacheConfig(tokens_per_block=FLAGS.page_size),
              max_batch_size=1, max_seq_len=FLAGS.prompt + FLAGS.generate + 64, decode_chunk_size=64)
    eng = llm.engine
    req = eng.add_request(prompt, SamplingParams(max_tokens=FLAGS.generate, ignore_eos=True))
    peak_held, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
      eng.step()
      if not req.finished:
        peak_held = max(peak_held, len(eng.allocator.pages(req.slot)))
    rows.append(dict(decode_budget=budget, generated=len(req.output_ids), peak_pool_pages=eng.peak_pages,
                     peak_pages_held_after_prefill=peak_held, evicted_pages=eng.stats["evicted_pages"],
                     page_size=FLAGS.page_size, seconds=time.perf_counter() - t0))
    print(json.dumps(rows[-1]), flush=True)
  print("\n| decode_budget | generated | peak pages (pool, incl. prefill) | peak pages held while decoding | evicted |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['decode_budget'] or 'off'} | {r['generated']} | {r['peak_pool_pages']} | "
          f"{r['peak_pages_held_after_prefill']} | {r['evicted_pages']} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, rows=rows, flags=FLAGS.flag_values_dict()), f, indent=1,
                default=str)


if __name__ == "__main__":
  app.run(main)
