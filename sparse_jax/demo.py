"""`python -m sparse_jax.demo`: the embedded default model answers a long needle-in-a-haystack
prompt twice, with dense attention and with RocketKV at a small budget, and reports both
answers, whether they are right, the KV pages kept and the time. Runs on the CPU (about a
minute) or on a GPU (Pallas kernels).
"""
from __future__ import annotations

import json
import time

from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("model", None, "checkpoint directory (default: the embedded default model)")
  flags.DEFINE_enum("task", "niah_single", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"],
                    "needle task")
  flags.DEFINE_integer("context_length", 4096, "prompt length in tokens")
  flags.DEFINE_integer("budget", 512, "RocketKV token budget (prompt_budget; topk = budget / page_size)")
  flags.DEFINE_integer("seed", 7, "eval-split sample seed")
  flags.DEFINE_enum("backend", None, ["pallas", "reference"], "attention kernels (default: pallas on GPUs, "
                    "reference on the CPU)")


def main(_):
  import warnings
  warnings.filterwarnings("ignore", message=".*Pallas.*deprecated.*")
  import jax
  from sparse_jax import LLM, KvCacheConfig, SamplingParams, tasks
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
  from sparse_jax.defaults import default_model_path

  model = FLAGS.model or default_model_path()
  t0 = time.perf_counter()
  dense = LLM(model, backend=FLAGS.backend, max_batch_size=1, max_seq_len=FLAGS.context_length + 64)
  sample = tasks.generate_samples(FLAGS.task, FLAGS.context_length, 1, FLAGS.seed, dense.tokenizer.backend,
                                  split="eval")[0]
  prompt_ids = dense.tokenizer.encode(sample["prompt"])
  page = dense.kv_cache_config.tokens_per_block
  question = sample["prompt"].rsplit("\n", 2)[-2] if "\n" in sample["prompt"] else ""
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), backend {dense.backend}")
  print(f"model: {model} (loaded in {time.perf_counter() - t0:.1f}s)")
  print(f"prompt: {len(prompt_ids)} tokens of haystack with a hidden {FLAGS.task} needle; {question.strip()}")
  print(f"expected answer: {tasks.answer_text(sample['answers']).strip()}\n")
  rocket = RocketSparseAttentionConfig(prompt_budget=FLAGS.budget, window_size=32, kernel_size=63, topr=1.0,
                                       topk=max(1, FLAGS.budget // 4), page_size=4)
  sparse = LLM(model, backend=FLAGS.backend, max_batch_size=1, max_seq_len=FLAGS.context_length + 64,
               sparse_attention_config=rocket, kv_cache_config=KvCacheConfig(enable_block_reuse=False))
  params = SamplingParams(max_tokens=16)
  rows = []
  for name, llm in (("dense", dense), (f"RocketKV @ {FLAGS.budget} tokens", sparse)):
    t = time.perf_counter()
    out = llm.generate(prompt_ids, params)[0]
    seconds = time.perf_counter() - t
    text = out.outputs[0].text.strip()
    right = tasks.score(text, sample["answers"]) == 1.0
    kept = out.metrics["kept_prompt_tokens"]
    rows.append(dict(attention=name, answer=text, correct=right, kv_tokens_kept=kept,
                     kv_pages_kept=-(-kept // page), seconds=round(seconds, 2)))
    print(f"{name:>26}: {text!r:40} {'RIGHT' if right else 'WRONG'} | KV kept: {kept} tokens "
          f"({-(-kept // page)} pages of {page}) | {seconds:.1f}s (compile included)")
  print(json.dumps(dict(task=FLAGS.task, context_length=len(prompt_ids), expected=sample["answers"], runs=rows)))


if __name__ == "__main__":
  from sparse_jax.cli import run_tool
  run_tool("demo")
