"""End-to-end serving benchmark through the engine (the `trtllm-bench` equivalent).

    # a checkpoint, synthetic prompts of 1K and 8K tokens, dense vs RocketKV side by side
    python -m sparse_jax.bench --model=CKPT --input_len=1024,8192 --output_len=128 \
        --extra_llm_api_options=dense,configs/rocket.yaml --output=bench.json --plot=bench.png
    # no checkpoint: random weights of a named architecture, synthetic token ids
    python -m sparse_jax.bench --weights=random --config=llama-3.1-8b --input_len=32768 \
        --max_batch_size=2,max --extra_llm_api_options=dense,configs/rocket.yaml

Modes: `throughput` submits every request at once; `latency` keeps `--concurrency` requests in
flight (a closed loop of clients). Each point of the sweep (input length x batch size x options
file) gets its own engine, so its batch slots and KV pool are sized for it; `--max_batch_size=max`
is the largest batch whose steady-state KV fits the pool (see `plan_batch`).

Warm-up requests (same lengths) run first on every engine, so compilation is excluded from the
timings; `compilations_timed` counts any compilation that still happened during the timed run.

Reported per point: output tokens/s, requests/s, time to first token and time per output token
(mean/p50/p99), tokens/s per user, decode throughput over the steps that ran no prefill
(`decode_tokens_per_s`, `per_user_decode_tokens_per_s`), peak KV memory (peak pages x bytes per
page, K+V+aux of every layer; the peak is at admission, which reserves prompt + max_tokens),
KV memory while decoding (after prompt compaction), compilations, and the device.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from sparse_jax.config import get_algorithm

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class BenchArgs:
  """Everything the benchmark needs (the command line maps onto it one to one)."""
  mode: str = "throughput"
  model: str = ""
  weights: str = "checkpoint"
  config: str = ""
  input_len: Sequence[int] = (128,)
  output_len: int = 128
  num_requests: int = 0
  dataset: str = ""
  extra_llm_api_options: Sequence[str] = ("dense",)
  backend: str = "auto"
  tensor_parallel_size: int | None = None
  max_batch_size: Sequence[str] = ("8",)
  points: Sequence[str] = ()
  max_batch_cap: int = 256
  max_seq_len: int = 0
  kv_max_tokens: int = 0
  kv_memory_fraction: float = 0.6
  dtype: str = "auto"
  concurrency: int = 1
  decode_chunk_size: int = 16
  warmup_requests: int = -1
  seed: int = 0
  time_budget_s: float = 0.0
  output: str = ""
  plot: str = ""
  progress: bool = True

  def __post_init__(self):
    if self.mode not in ("throughput", "latency"):
      raise ValueError(f"--mode={self.mode!r}: must be throughput or latency")
    if self.weights not in ("checkpoint", "random"):
      raise ValueError(f"--weights={self.weights!r}: must be checkpoint or random")
    if self.weights == "random" and not self.config:
      raise ValueError("--weights=random needs --config=<config.json path or a name in configs/models>")
    if self.weights == "checkpoint" and not self.model:
      raise ValueError("--model=<checkpoint directory> is required (or --weights=random --config=...)")
    for name in ("output_len", "concurrency", "decode_chunk_size", "max_batch_cap"):
      if getattr(self, name) <= 0:
        raise ValueError(f"--{name}={getattr(self, name)} must be positive")
    for name in ("num_requests", "max_seq_len", "kv_max_tokens", "time_budget_s"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
    if not self.dataset and (not self.input_len or any(int(n) <= 0 for n in self.input_len)):
      raise ValueError(f"--input_len={list(self.input_len)}: every length must be positive")
    if not 0 < self.kv_memory_fraction <= 1:
      raise ValueError(f"--kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")
    for b in self.max_batch_size:
      if b != "max" and not (str(b).isdigit() and int(b) > 0):
        raise ValueError(f"--max_batch_size has {b!r}: each entry must be a positive integer or 'max'")
    if not self.max_batch_size:
      raise ValueError("--max_batch_size is empty")
    for point in self.points:
      n, _, b = str(point).partition(":")
      if not (n.isdigit() and int(n) > 0 and (b == "max" or (b.isdigit() and int(b) > 0))):
        raise ValueError(f"--points has {point!r}: each entry must be INPUT_LEN:BATCH, e.g. 32768:2 or 8192:max")
    if self.points and self.dataset:
      raise ValueError("--points sets synthetic input lengths; it cannot be combined with --dataset")
    if not self.extra_llm_api_options:
      raise ValueError("--extra_llm_api_options is empty (use 'dense' for no sparse attention)")


# -- workloads --------------------------------------------------------------------------------

@dataclasses.dataclass
class Workload:
  label: str            # "1024" for synthetic prompts of 1024 tokens, or the dataset's file name
  input_len: float      # mean prompt tokens
  prompts: list[list[int]]
  max_tokens: list[int]


def synthetic_workload(input_len: int, output_len: int, num: int, vocab: int, seed: int) -> Workload:
  rng = np.random.default_rng(seed + input_len)
  prompts = [rng.integers(0, vocab, size=input_len).tolist() for _ in range(num)]
  return Workload(str(input_len), float(input_len), prompts, [output_len] * num)


def dataset_workload(path: str, tokenizer, output_len: int, vocab: int, num: int) -> Workload:
  """JSONL: one object per line with "prompt" (text) or "input_ids" (token ids), and optionally
  "max_tokens". `num` > 0 keeps the first `num` lines."""
  prompts, max_tokens = [], []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"--dataset={path} line {lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' or 'input_ids'")
      unknown = sorted(set(row) - {"prompt", "input_ids", "max_tokens"})
      if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: prompt, input_ids, max_tokens")
      if ("prompt" in row) == ("input_ids" in row):
        raise ValueError(f"{where}: needs exactly one of 'prompt' and 'input_ids'")
      if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
          raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        if tokenizer is None:
          raise ValueError(f"{where}: has 'prompt' text but the model has no tokenizer "
                           "(--weights=random); give 'input_ids' instead")
        ids = tokenizer.encode(row["prompt"])
      else:
        ids = row["input_ids"]
        if (not isinstance(ids, list) or not ids or
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)):
          raise ValueError(f"{where}: 'input_ids' must be a non-empty list of token ids in [0, {vocab})")
      mt = row.get("max_tokens", output_len)
      if not isinstance(mt, int) or isinstance(mt, bool) or mt <= 0:
        raise ValueError(f"{where}: 'max_tokens'={mt!r} must be a positive integer")
      prompts.append(list(ids))
      max_tokens.append(mt)
      if num and len(prompts) == num:
        break
  if not prompts:
    raise ValueError(f"--dataset={path}: no requests in the file")
  return Workload(os.path.basename(path), float(np.mean([len(p) for p in prompts])), prompts, max_tokens)


# -- sizing ------------------------------------------------------------------------------------

def kept_prompt_tokens(sparse, prompt_len: int) -> int:
  """Prompt tokens a request still holds after prefill (its algorithm's kept_prompt_tokens)."""
  return prompt_len if sparse is None else get_algorithm(sparse).kept_prompt_tokens(sparse, prompt_len)


def plan_batch(pool_pages: int, page_size: int, request_tokens: int, steady_tokens: int) -> int:
  """The largest batch whose requests fit the pool at once in steady state: one request
  reserved at full size (prompt + max_tokens, being admitted and prefilled) and the others
  at their size after prefill (kept prompt + max_tokens)."""
  full = math.ceil(request_tokens / page_size)
  steady = math.ceil(steady_tokens / page_size)
  if pool_pages < full:
    return 0
  return 1 + (pool_pages - full) // steady


def plan_pool(batch: int, page_size: int, request_tokens: int, steady_tokens: int) -> int:
  """Pages a batch needs (the inverse of `plan_batch`): one request at full size, being admitted
  and prefilled, the others at their size after prefill. Without prompt compression every
  request is at full size. Prompts are prefilled one admission at a time once the pool is this
  tight (the engine admits a request only when its full size is free)."""
  full = math.ceil(request_tokens / page_size)
  steady = math.ceil(steady_tokens / page_size)
  return full + (batch - 1) * min(steady, full)


def device_free_bytes() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


# -- running -------------------------------------------------------------------------------------

class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring), with their total seconds."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    try:
      import jax.monitoring
      jax.monitoring.register_event_duration_secs_listener(self._on_event)
      self.available = True
    except (ImportError, AttributeError):
      self.available = False

  def _on_event(self, event: str, duration: float, **_):
    if event == COMPILE_EVENT:
      self.count += 1
      self.seconds += duration

  def snapshot(self) -> tuple[int, float]:
    return self.count, self.seconds


_COMPILES: CompileCounter | None = None


def compile_counter() -> CompileCounter:
  """The process's one counter (jax.monitoring listeners cannot be removed selectively)."""
  global _COMPILES
  if _COMPILES is None:
    _COMPILES = CompileCounter()
  return _COMPILES


@dataclasses.dataclass
class StepRecord:
  seconds: float
  prefilled: bool
  decode_tokens: int
  running: int
  used_pages: int  # KV pages held when the step began


def drive(engine, prompts: list[list[int]], max_tokens: list[int], in_flight: int, bar=None):
  """Runs the requests through `engine` (this thread steps it), keeping at most `in_flight`
  submitted and unfinished. Returns (requests, step records, wall seconds)."""
  from sparse_jax.engine import SamplingParams
  pending = collections.deque(range(len(prompts)))
  requests = []
  steps: list[StepRecord] = []
  finished = 0
  t0 = time.perf_counter()
  while pending or engine.has_unfinished():
    while pending and len(requests) - finished < in_flight and engine.num_waiting < engine.max_queue_size:
      i = pending.popleft()
      requests.append(engine.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=True)))
    running, used = engine.num_running, engine.allocator.used_pages
    prefills, decoded = engine.stats["prefill_calls"], engine.stats["decode_tokens"]
    s0 = time.perf_counter()
    engine.step()
    steps.append(StepRecord(time.perf_counter() - s0, engine.stats["prefill_calls"] > prefills,
                            engine.stats["decode_tokens"] - decoded, running, used))
    done = sum(r.finished for r in requests)
    if bar is not None and done > finished:
      bar.update(done - finished)
    finished = done
  return requests, steps, time.perf_counter() - t0


def _stats(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
  if not values:
    return {"mean": None, "p50": None, "p99": None}
  a = np.asarray(values, np.float64) * scale
  return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(requests, steps: list[StepRecord], wall: float) -> dict[str, Any]:
  out_tokens = sum(len(r.output_ids) for r in requests)
  ttft = [r.first_token_time - r.arrival_time for r in requests]
  tpot = [(r.finish_time - r.first_token_time) / (len(r.output_ids) - 1) for r in requests if len(r.output_ids) > 1]
  decode = [s for s in steps if not s.prefilled and s.decode_tokens > 0 and s.running > 0]
  decode_s = sum(s.seconds for s in decode)
  decode_tokens = sum(s.decode_tokens for s in decode)
  per_user_tokens = sum(s.decode_tokens / s.running for s in decode)
  row = {
      "total_time_s": wall,
      "output_tokens": out_tokens,
      "input_tokens": sum(len(r.prompt_ids) for r in requests),
      "output_tokens_per_s": out_tokens / wall,
      "requests_per_s": len(requests) / wall,
      "per_user_tokens_per_s": float(np.mean([1.0 / t for t in tpot])) if tpot else None,
      "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
      "per_user_decode_tokens_per_s": per_user_tokens / decode_s if decode_s else None,
      "decode_time_s": decode_s,
      "prefill_time_s": sum(s.seconds for s in steps if s.prefilled),
      "mean_kept_prompt_tokens": float(np.mean([r.kept_prompt_tokens for r in requests])),
      "decode_kv_pages": max((s.used_pages for s in decode), default=None),
  }
  for name, values in (("ttft", ttft), ("tpot", tpot)):
    for k, v in _stats(values, 1e3).items():
      row[f"{name}_{k}_ms"] = v
  return row


def build_model(args: BenchArgs):
  """(model module, tokenizer or None, description) — built once for every point."""
  import jax
  import models
  from models.loading import resolve_dtype
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  if args.weights == "random":
    cfg = load_model_config(args.config)
    model = models.build_model(cfg, dtype=resolve_dtype(dtype))
    jax.block_until_ready(jax.tree_util.tree_leaves(model))
    return model, None, f"random {args.config} ({dtype})", dtype
  model = models.from_pretrained(args.model, dtype=dtype)
  return model, models.load_tokenizer(args.model), f"{args.model} ({dtype})", dtype


def load_model_config(name: str) -> dict:
  """A config.json dict: a path, or the name of a shape shipped in configs/models."""
  import configs
  return configs.model_config(name)


def load_options(entry: str):
  """('dense', None) or (path, LlmApiOptions) for one --extra_llm_api_options entry."""
  from sparse_jax.config import load_llm_api_options
  if entry in ("dense", "none", ""):
    return "dense", None
  return entry, load_llm_api_options(entry)


def size_point(args: BenchArgs, batch_spec: str, page: int, request_tokens: int, steady_tokens: int,
               device_page_bytes: int) -> tuple[int, int, int | None]:
  """(batch, KV pool pages, largest batch that fits or None) of one point: batch_spec "max"
  fits the pool (--kv_max_tokens, else the device's free memory) and caps the batch at
  --max_batch_cap; a number is the batch, its pool planned for it (or --kv_max_tokens)."""
  if batch_spec != "max":
    batch = int(batch_spec)
    return batch, (math.ceil(args.kv_max_tokens / page) if args.kv_max_tokens else
                   plan_pool(batch, page, request_tokens, steady_tokens)), None
  if args.kv_max_tokens:
    pool_pages = math.ceil(args.kv_max_tokens / page)
  else:
    free = device_free_bytes()
    if free is None:
      import jax
      raise ValueError("--max_batch_size=max needs --kv_max_tokens on a device that reports no free memory "
                       f"({jax.devices()[0].platform})")
    pool_pages = int(free * args.kv_memory_fraction) // device_page_bytes
  batch_fit = plan_batch(pool_pages, page, request_tokens, steady_tokens)
  if batch_fit == 0:
    raise ValueError(f"one request of {request_tokens} tokens ({math.ceil(request_tokens / page)} pages) does not "
                     f"fit the KV pool of {pool_pages} pages")
  batch = min(batch_fit, args.max_batch_cap)
  return batch, min(pool_pages, plan_pool(batch, page, request_tokens, steady_tokens)), batch_fit


def run_point(args: BenchArgs, model, tokenizer, dtype: str, source: Workload | int, batch_spec: str,
              options_name: str, options, compiles: CompileCounter) -> dict[str, Any]:
  """One engine sized for this point, warm-up, then the timed run. `source` is a dataset's
  workload or a synthetic prompt length (then `--num_requests`, or one request per batch slot)."""
  from sparse_jax.config import KvCacheConfig
  from sparse_jax.llm import LLM
  sparse = options.sparse_attention_config if options is not None else None
  kv = options.kv_cache_config if options is not None else KvCacheConfig()
  backend = args.backend if args.backend != "auto" else ((options.backend if options else None) or "auto")
  page = kv.tokens_per_block
  vocab = model.config.vocab_size
  workload = source if isinstance(source, Workload) else synthetic_workload(source, args.output_len, 1, vocab, args.seed)
  request_tokens = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
  max_seq_len = args.max_seq_len or math.ceil(request_tokens / page) * page
  if max_seq_len < request_tokens:
    raise ValueError(f"--max_seq_len={max_seq_len} is shorter than the longest request "
                     f"({request_tokens} tokens = prompt + max_tokens)")
  # The whole options file applies (e.g. enable_chunked_prefill); the sizing arguments here win over it.
  # Chunked sparse prefill runs in chunks of the default 4096 tokens; otherwise every prompt of the
  # workload is prefilled in one piece, and up to 16384 tokens of short prompts together.
  chunked = options is not None and options.enable_chunked_prefill
  longest = max(len(p) for p in workload.prompts)
  max_num_tokens = 4096 if chunked else max(16384, math.ceil(longest / page) * page)
  common = dict(tokenizer=tokenizer, dtype=dtype, sparse_attention_config=sparse, backend=backend,
                max_num_tokens=max_num_tokens,
                max_seq_len=max_seq_len, decode_chunk_size=args.decode_chunk_size, seed=args.seed,
                extra_llm_api_options=options_name if options is not None else None,
                tensor_parallel_size=args.tensor_parallel_size)
  probe = LLM(model, kv_cache_config=dataclasses.replace(kv, max_tokens=page), max_batch_size=1, **common)
  page_bytes = probe.engine.page_bytes(probe.engine.kv_dtype)
  # Under tensor parallelism each device holds its KV heads' share of a page; free memory is per device.
  device_page_bytes = probe.engine.page_bytes(probe.engine.kv_dtype, per_device=True)
  del probe
  steady_tokens = max(kept_prompt_tokens(sparse, len(p)) + m for p, m in zip(workload.prompts, workload.max_tokens))
  batch, pool_pages, batch_fit = size_point(args, batch_spec, page, request_tokens, steady_tokens,
                                            device_page_bytes)
  if not isinstance(source, Workload):
    workload = synthetic_workload(source, args.output_len, args.num_requests or batch, vocab, args.seed)
  num = len(workload.prompts)
  in_flight = num if args.mode == "throughput" else args.concurrency
  llm = LLM(model, kv_cache_config=dataclasses.replace(kv, max_tokens=pool_pages * page), max_batch_size=batch,
            max_queue_size=max(1024, num), **common)
  engine = llm.engine
  waves = [args.warmup_requests] if args.warmup_requests >= 0 else warmup_waves(engine, workload, batch, in_flight)
  n_warm = sum(waves)
  label = f"{options_name} in={workload.label} batch={batch}"
  c0 = compiles.snapshot()
  t0 = time.perf_counter()
  for wave in waves:
    if wave:
      drive(engine, workload.prompts[:wave], workload.max_tokens[:wave], wave)
  engine.allocator.clear_cache()  # the timed run prefills its prompts: no hits on the warm-up's pages
  warm_s = time.perf_counter() - t0
  c1 = compiles.snapshot()
  engine.peak_pages = 0
  bar = None
  if args.progress:
    from tqdm import tqdm
    bar = tqdm(total=num, desc=label, unit="req", file=sys.stderr, leave=False)
  requests, steps, wall = drive(engine, workload.prompts, workload.max_tokens, in_flight, bar)
  if bar is not None:
    bar.close()
  c2 = compiles.snapshot()
  row = {
      "config": options_name, "algorithm": sparse.algorithm if sparse is not None else "dense",
      "backend": llm.backend, "mode": args.mode, "input_len": workload.label, "mean_input_len": workload.input_len,
      "output_len": float(np.mean(workload.max_tokens)), "num_requests": num, "batch_spec": batch_spec,
      "max_batch_size": batch, "batch_fit": batch_fit, "concurrency": in_flight, "max_seq_len": max_seq_len,
      "kv_pool_pages": pool_pages, "page_size": page, "page_bytes": page_bytes,
      **summarize(requests, steps, wall),
      "peak_kv_pages": engine.peak_pages, "peak_kv_memory_gb": engine.peak_pages * page_bytes / 1e9,
      "kv_pool_memory_gb": pool_pages * page_bytes / 1e9,
      "warmup_requests": n_warm, "warmup_s": warm_s,
      "compilations_warmup": c1[0] - c0[0] if compiles.available else None,
      "compile_s_warmup": c1[1] - c0[1] if compiles.available else None,
      "compilations_timed": c2[0] - c1[0] if compiles.available else None,
      "compile_s_timed": c2[1] - c1[1] if compiles.available else None,
  }
  if row["decode_kv_pages"] is not None:  # KV held while decoding (after any prompt compaction)
    row["decode_kv_memory_gb"] = row["decode_kv_pages"] * page_bytes / 1e9
  else:
    row["decode_kv_memory_gb"] = None
  del requests, engine, llm
  gc.collect()
  return row


def warmup_waves(engine, workload: Workload, batch: int, in_flight: int) -> list[int]:
  """Sizes of the warm-up waves (each submitted at once and run to the end): 1, 2, 4, ... up to
  the most requests the engine prefills together (at most a batch, or what is in flight). The
  engine pads a prefill group to a power-of-two row count, so these compile every prefill the
  timed run can do for this prompt length, plus its decode steps at the same context. Long
  prompts are prefilled one at a time: then a single request warms up."""
  from sparse_jax.engine import length_bucket
  padded = length_bucket(max(len(p) for p in workload.prompts))
  group = max(1, min(len(workload.prompts), batch, in_flight, engine.max_num_tokens // padded))
  waves = [1]
  while waves[-1] < group:
    waves.append(min(2 * waves[-1], group))
  return waves


COMPARED = ("per_user_decode_tokens_per_s", "decode_tokens_per_s", "per_user_tokens_per_s", "output_tokens_per_s",
            "tpot_p50_ms", "peak_kv_memory_gb", "decode_kv_memory_gb")


def comparisons(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each non-dense point against the dense point of the same input length and batch spec."""
  dense = {(p["input_len"], p["batch_spec"]): p for p in points if p["config"] == "dense" and "skipped" not in p}
  out = []
  for p in points:
    ref = dense.get((p["input_len"], p["batch_spec"]))
    if p["config"] == "dense" or ref is None or "skipped" in p:
      continue
    row = {"config": p["config"], "input_len": p["input_len"], "batch_spec": p["batch_spec"],
           "batch": p["max_batch_size"], "dense_batch": ref["max_batch_size"]}
    for k in COMPARED:
      row[f"{k}_ratio"] = p[k] / ref[k] if p.get(k) and ref.get(k) else None
    out.append(row)
  return out


def print_table(points: list[dict[str, Any]], comps: list[dict[str, Any]]) -> None:
  cols = [("config", "config", "{}"), ("input", "input_len", "{}"), ("batch", "max_batch_size", "{}"),
          ("req/s", "requests_per_s", "{:.2f}"), ("out tok/s", "output_tokens_per_s", "{:.1f}"),
          ("decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("per-user tok/s", "per_user_decode_tokens_per_s", "{:.1f}"),
          ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"), ("TPOT p50 ms", "tpot_p50_ms", "{:.2f}"),
          ("peak KV GB", "peak_kv_memory_gb", "{:.3f}"), ("decode KV GB", "decode_kv_memory_gb", "{:.3f}"),
          ("compiles (timed)", "compilations_timed", "{}")]
  print("| " + " | ".join(c[0] for c in cols) + " |")
  print("|" + "---|" * len(cols))
  for p in points:
    if "skipped" in p:
      print(f"| {p['config']} | {p['input_len']} | {p['batch_spec']} | skipped: {p['skipped']} |")
      continue
    print("| " + " | ".join("-" if p.get(k) is None else f.format(p[k]) for _, k, f in cols) + " |")
  if comps:
    print("\nvs dense (same input length and batch spec; 'max' batches differ per engine):")
    for c in comps:
      r = lambda k: "-" if c[k] is None else f"{c[k]:.2f}x"
      print(f"  {c['config']} in={c['input_len']} batch={c['batch']} (dense {c['dense_batch']}): per-user decode "
            f"{r('per_user_decode_tokens_per_s_ratio')}, decode throughput {r('decode_tokens_per_s_ratio')}, "
            f"output throughput {r('output_tokens_per_s_ratio')}, peak KV {r('peak_kv_memory_gb_ratio')}, "
            f"KV while decoding {r('decode_kv_memory_gb_ratio')}")


def plot(points: list[dict[str, Any]], path: str) -> None:
  """Latency against context: TPOT p50 and TTFT p50 per (config, batch spec)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  series = collections.defaultdict(list)
  for p in points:
    if "skipped" not in p:
      series[(p["config"], p["batch_spec"])].append(p)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for (config, spec), rows in sorted(series.items()):
    rows.sort(key=lambda p: p["mean_input_len"])
    x = [p["mean_input_len"] for p in rows]
    for ax, key in zip(axes, ("tpot_p50_ms", "ttft_p50_ms")):
      ax.plot(x, [p[key] for p in rows], marker="o", label=f"{config} (batch {spec})")
  for ax, title in zip(axes, ("time per output token, p50 (ms)", "time to first token, p50 (ms)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input tokens")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_benchmark(args: BenchArgs) -> dict[str, Any]:
  import jax
  compiles = compile_counter()
  t_begin = time.perf_counter()
  model, tokenizer, model_desc, dtype = build_model(args)
  build_s = time.perf_counter() - t_begin
  options = [load_options(e) for e in args.extra_llm_api_options]
  if args.points:
    sweep = [(int(p.partition(":")[0]), p.partition(":")[2]) for p in args.points]
  else:
    if args.dataset:
      sources = [dataset_workload(args.dataset, tokenizer, args.output_len, model.config.vocab_size,
                                  args.num_requests)]
    else:
      sources = [int(n) for n in args.input_len]
    sweep = [(source, spec) for source in sources for spec in args.max_batch_size]
  device = jax.devices()[0]
  result = {
      "device": f"{getattr(device, 'device_kind', device)} ({device.platform})", "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": " ".join(sys.argv), "model": model_desc,
      "model_build_s": build_s, "args": {k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in dataclasses.asdict(args).items()},
      "note": ("warm-up requests of the same shapes ran first on every engine, so compilation is excluded from "
               "timings; compilations_timed counts any that still happened during the timed run. Decode metrics "
               "(decode_tokens_per_s, per_user_decode_tokens_per_s) use only engine steps that ran no prefill."),
      "points": [], "comparisons": [],
  }
  print(f"# {result['device']}, jax {jax.__version__}, model {model_desc} built in {build_s:.1f}s", flush=True)
  durations = []
  for source, spec in sweep:
    for name, opts in options:
      expected = float(np.mean(durations)) if durations else 0.0
      if args.time_budget_s and time.perf_counter() - t_begin + expected > args.time_budget_s:
        label = source.label if isinstance(source, Workload) else str(source)
        result["points"].append({"config": name, "input_len": label, "batch_spec": spec,
                                 "skipped": f"time budget: it would end after --time_budget_s={args.time_budget_s:.0f}"})
        continue
      t0 = time.perf_counter()
      try:
        row = run_point(args, model, tokenizer, dtype, source, spec, name, opts, compiles)
      except RuntimeError as e:  # e.g. device out of memory: record it, go on with the next point
        label = source.label if isinstance(source, Workload) else str(source)
        print(f"# {name} in={label} batch={spec}: FAILED: {type(e).__name__}: {e}", flush=True)
        result["points"].append({"config": name, "input_len": label, "batch_spec": spec,
                                 "skipped": f"failed: {type(e).__name__}: {str(e)[:500]}"})
        gc.collect()
        if args.output:
          write_json(args.output, result)
        continue
      row["point_s"] = time.perf_counter() - t0
      durations.append(row["point_s"])
      result["points"].append(row)
      print(f"# {name} in={row['input_len']} batch={row['max_batch_size']}: "
            f"{row['output_tokens_per_s']:.1f} out tok/s, per-user decode "
            f"{_fmt(row['per_user_decode_tokens_per_s'])} tok/s, TPOT p50 {_fmt(row['tpot_p50_ms'])} ms, "
            f"peak KV {row['peak_kv_memory_gb']:.3f} GB ({row['point_s']:.0f}s)", flush=True)
      result["comparisons"] = comparisons(result["points"])
      if args.output:
        write_json(args.output, result)
  result["total_s"] = time.perf_counter() - t_begin
  print_table(result["points"], result["comparisons"])
  if args.output:
    write_json(args.output, result)
  if args.plot and len({p["input_len"] for p in result["points"] if "skipped" not in p}) > 1:
    plot(result["points"], args.plot)
  elif args.plot:
    print(f"# --plot={args.plot}: needs several input lengths (e.g. --input_len=1024,8192); not written")
  return result


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.1f}"


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


# -- command line -------------------------------------------------------------------------------

def define_flags():
  from absl import flags
  flags.DEFINE_enum("mode", "throughput", ["throughput", "latency"],
                    "throughput: every request at once; latency: --concurrency requests in flight")
  flags.DEFINE_string("model", "", "Hugging Face checkpoint directory (with --weights=checkpoint)")
  flags.DEFINE_enum("weights", "checkpoint", ["checkpoint", "random"], "random: --config's architecture, "
                    "random weights, no tokenizer (synthetic token ids)")
  flags.DEFINE_string("config", "", "config.json path or a name in configs/models (with --weights=random)")
  flags.DEFINE_list("input_len", ["128"], "prompt tokens of the synthetic dataset; a comma list sweeps")
  flags.DEFINE_integer("output_len", 128, "tokens generated per request (synthetic; dataset default)")
  flags.DEFINE_integer("num_requests", 0, "requests per point (0: one per batch slot; dataset: all lines)")
  flags.DEFINE_string("dataset", "", 'JSONL with {"prompt": ...} or {"input_ids": [...]} and optional "max_tokens"')
  flags.DEFINE_list("extra_llm_api_options", ["dense"], "options YAML(s) (TensorRT-LLM layout); 'dense' = none; "
                    "a comma list runs side by side")
  flags.DEFINE_enum("backend", "auto", ["auto", "pallas", "reference"], "attention kernels")
  flags.DEFINE_integer("tensor_parallel_size", None, "devices the model is split over (default: the YAML's, else 1)",
                       lower_bound=1)
  flags.DEFINE_list("max_batch_size", ["8"], "batch slots; a comma list sweeps; 'max' = the largest batch whose "
                    "KV fits (device memory x --kv_memory_fraction, or --kv_max_tokens)")
  flags.DEFINE_list("points", [], "explicit INPUT_LEN:BATCH pairs run in this order (e.g. 32768:2,1024:2,32768:max),"
                    " instead of every --input_len x --max_batch_size")
  flags.DEFINE_integer("max_batch_cap", 256, "upper bound on a 'max' batch")
  flags.DEFINE_integer("max_seq_len", 0, "per-request token limit (0: the longest request)")
  flags.DEFINE_integer("kv_max_tokens", 0, "KV pool size in tokens (0: every slot's longest request, or device "
                       "memory for 'max')")
  flags.DEFINE_float("kv_memory_fraction", 0.6, "share of free device memory for the KV pool of a 'max' batch; "
                     "the rest holds prefill activations (at 0.85 a 32K prefill of an 8B model ran out of "
                     "memory on an H100)")
  flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"], "weights and KV dtype")
  flags.DEFINE_integer("concurrency", 1, "latency mode: requests in flight")
  flags.DEFINE_integer("decode_chunk_size", 16, "decode steps per host round trip")
  flags.DEFINE_integer("warmup_requests", -1, "warm-up requests per engine (-1: waves of 1, 2, 4, ... up to "
                       "one prefill group; 0: none, compilation then counts in the timings)")
  flags.DEFINE_integer("seed", 0, "seed of the synthetic prompts")
  flags.DEFINE_float("time_budget_s", 0.0, "skip a point when the time spent plus the mean time of a point so far "
                     "would pass this many seconds (0: no limit)")
  flags.DEFINE_string("output", "", "JSON results (rewritten after every point)")
  flags.DEFINE_string("plot", "", "PNG of latency against context (needs several --input_len values)")


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  fields = {f.name for f in dataclasses.fields(BenchArgs)} - {"progress"}
  try:
    args = BenchArgs(**{name: getattr(FLAGS, name) for name in fields})
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    run_benchmark(args)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  from sparse_jax.cli import run_tool
  run_tool("bench")
