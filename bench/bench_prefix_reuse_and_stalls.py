"""Time to first token with and without prefix reuse, and the decode stalls a long prompt
causes with and without chunked prefill.

1. TTFT of a second request that shares a long prefix (a document) with the first one, with
   block reuse off and on, for dense attention and RocketKV; the prefix-cache hit rate.
2. Time per output token (median and p99) of running requests while a long prompt arrives and
   is prefilled, with the prefill in chunks of --max_num_tokens or in one piece; and the TTFT of
   a short prompt that arrives right behind the long one.

Runs anywhere; on the CPU with the embedded default model:
  python bench/bench_prefix_reuse_and_stalls.py --out=prefix_stalls.json
SMOKE=1 shrinks every size (a tiny random model) so a test can run it.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

SMOKE = os.environ.get("SMOKE") == "1"
FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "checkpoint directory; empty: the embedded default model (SMOKE: random tiny-llama)")
flags.DEFINE_integer("prefix", 128 if SMOKE else 4096, "tokens of the shared prefix (the document)")
flags.DEFINE_integer("question", 32 if SMOKE else 64, "tokens after the prefix, different per request")
flags.DEFINE_integer("prompt_budget", 64 if SMOKE else 1024, "RocketKV prompt_budget")
flags.DEFINE_integer("long_prompt", 128 if SMOKE else 4096, "tokens of the prompt that arrives while others decode")
flags.DEFINE_integer("running", 2 if SMOKE else 4, "requests decoding when the long prompt arrives")
flags.DEFINE_integer("max_num_tokens", 32 if SMOKE else 512, "prefill tokens per engine step when chunked")
flags.DEFINE_integer("decode_chunk_size", 4, "decode steps per engine step")
flags.DEFINE_integer("page_size", 16 if SMOKE else 32, "KV page size")
flags.DEFINE_integer("repeats", 1 if SMOKE else 3, "second requests timed per configuration (median reported)")
flags.DEFINE_list("measure", ["ttft", "stalls"], "what to measure: ttft (prefix reuse), stalls (chunked prefill)")
flags.DEFINE_string("out", "", "JSON output path")


def _model_and_tokenizer(max_len: int):
  import models
  if FLAGS.model:
    return models.from_pretrained(FLAGS.model, dtype="float32"), None
  if SMOKE:
    from bench import model_config
    cfg = model_config("tiny-llama")
    cfg["max_position_embeddings"] = max_len
    return models.build_model(cfg), None
  from sparse_jax.defaults import default_model_path
  return models.from_pretrained(default_model_path(), dtype="float32"), None


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def measure_ttft(model, sparse, reuse: bool, rng, vocab: int) -> dict:
  """TTFT of the second of two requests sharing a `prefix`-token document."""
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  total = FLAGS.prefix + FLAGS.question
  # Two slots' worth of pool: room for a compressing request's dense prompt beside its compacted copy.
  llm = LLM(model, dtype="float32", sparse_attention_config=sparse, max_batch_size=2,
            kv_cache_config=KvCacheConfig(tokens_per_block=FLAGS.page_size, enable_block_reuse=reuse),
            max_seq_len=_round_up(total + 8, FLAGS.page_size), max_num_tokens=_round_up(total, FLAGS.page_size))
  one = SamplingParams(max_tokens=1, ignore_eos=True)
  draw = lambda n: [int(t) for t in rng.integers(3, vocab, size=n)]
  firsts, seconds = [], []
  for i in range(FLAGS.repeats + 1):  # the first round compiles every program the timed ones run
    doc = draw(FLAGS.prefix)
    a = llm.generate([doc + draw(FLAGS.question)], one)[0]
    b = llm.generate([doc + draw(FLAGS.question)], one)[0]
    if i:
      firsts.append(a.metrics["time_to_first_token_s"])
      seconds.append(b.metrics["time_to_first_token_s"])
    llm.engine.allocator.clear_cache()
  stats = llm.engine.stats
  hits = stats["prefix_cache_hits"] / stats["prefix_cache_queries"] if stats["prefix_cache_queries"] else 0.0
  return dict(config=sparse.algorithm if sparse else "dense", block_reuse=reuse, prefix=FLAGS.prefix,
              question=FLAGS.question, ttft_first_s=statistics.median(firsts),
              ttft_second_s=statistics.median(seconds), prefix_cache_hit_rate=hits,
              cached_tokens_second=b.metrics["cached_prompt_tokens"])


def measure_stalls(model, chunked: bool, rng, vocab: int) -> dict:
  """TPOT of `running` decoding requests from the long prompt's arrival to its first token, and
  the TTFT of a short prompt submitted right after the long one."""
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  long_len = FLAGS.long_prompt
  budget = FLAGS.max_num_tokens if chunked else _round_up(long_len, FLAGS.page_size)
  max_seq_len = _round_up(long_len + 64, FLAGS.page_size)
  llm = LLM(model, dtype="float32", max_batch_size=FLAGS.running + 2, max_seq_len=max_seq_len,
            kv_cache_config=KvCacheConfig(tokens_per_block=FLAGS.page_size), max_num_tokens=budget,
            decode_chunk_size=FLAGS.decode_chunk_size)
  eng = llm.engine
  result = None
  for _ in range(2):  # the first round compiles
    events = []  # (time, tokens so far) per running request
    runs = []
    for i in range(FLAGS.running):
      log = []
      events.append(log)
      runs.append(eng.add_request([int(t) for t in rng.integers(3, vocab, size=16)],
                                  SamplingParams(max_tokens=max_seq_len - 16, ignore_eos=True),
                                  on_update=lambda r, log=log: log.append((time.perf_counter(), len(r.output_ids)))))
    while any(len(r.output_ids) < 2 * FLAGS.decode_chunk_size for r in runs):
      eng.step()
    arrival = time.perf_counter()
    long = eng.add_request([int(t) for t in rng.integers(3, vocab, size=long_len)],
                           SamplingParams(max_tokens=1, ignore_eos=True))
    short = eng.add_request([int(t) for t in rng.integers(3, vocab, size=16)],
                            SamplingParams(max_tokens=1, ignore_eos=True))
    while not (long.finished and short.finished):
      eng.step()
    done = time.perf_counter()
    for r in runs:
      eng.abort(r)
    eng.run_until_done()
    gaps = []
    for log in events:
      window = [e for e in log if e[0] >= arrival]
      before = [e for e in log if e[0] < arrival][-1:]
      seq = before + [e for e in window if e[0] <= done]
      gaps += [(t1 - t0) / (n1 - n0) for (t0, n0), (t1, n1) in zip(seq, seq[1:]) if n1 > n0]
    gaps.sort()
    result = dict(chunked=chunked, max_num_tokens=budget, long_prompt=long_len, running=FLAGS.running,
                  long_ttft_s=long.first_token_time - long.arrival_time,
                  short_ttft_s=short.first_token_time - short.arrival_time, tpot_samples=len(gaps),
                  tpot_p50_ms=1e3 * gaps[len(gaps) // 2] if gaps else None,
                  tpot_p99_ms=1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None,
                  tpot_max_ms=1e3 * gaps[-1] if gaps else None)
  return result


def main(_):
  import jax
  import numpy as np
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig

  model, _ = _model_and_tokenizer(max(FLAGS.prefix + FLAGS.question, FLAGS.long_prompt) + 128)
  vocab = model.config.vocab_size
  rng = np.random.default_rng(0)
  rocket = RocketSparseAttentionConfig(prompt_budget=FLAGS.prompt_budget, page_size=4, topk=16, topr=1.0)
  rows = {"ttft": [], "stalls": []}
  for sparse in (None, rocket) if "ttft" in FLAGS.measure else ():
    for reuse in (False, True):
      rows["ttft"].append(measure_ttft(model, sparse, reuse, rng, vocab))
      print(json.dumps(rows["ttft"][-1]), flush=True)
  for chunked in (False, True) if "stalls" in FLAGS.measure else ():
    rows["stalls"].append(measure_stalls(model, chunked, rng, vocab))
    print(json.dumps(rows["stalls"][-1]), flush=True)
  rows["device"] = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  rows["jax"] = jax.__version__
  print(f"\nTTFT of a request sharing a {FLAGS.prefix}-token prefix ({rows['device']})")
  print("| attention | block reuse | TTFT first (s) | TTFT second (s) | second: cached tokens | hit rate |")
  print("|---|---|---|---|---|---|")
  for r in rows["ttft"]:
    print(f"| {r['config']} | {'on' if r['block_reuse'] else 'off'} | {r['ttft_first_s']:.3f} | "
          f"{r['ttft_second_s']:.3f} | {r['cached_tokens_second']} | {r['prefix_cache_hit_rate']:.2f} |")
  print(f"\nTPOT of {FLAGS.running} running requests while a {FLAGS.long_prompt}-token prompt prefills")
  print("| prefill | max_num_tokens | TPOT p50 (ms) | TPOT p99 (ms) | max (ms) | long prompt TTFT (s) | "
        "short prompt behind it: TTFT (s) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows["stalls"]:
    print(f"| {'chunked' if r['chunked'] else 'one piece'} | {r['max_num_tokens']} | {r['tpot_p50_ms']:.1f} | "
          f"{r['tpot_p99_ms']:.1f} | {r['tpot_max_ms']:.1f} | {r['long_ttft_s']:.2f} | {r['short_ttft_s']:.2f} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
