"""HTTP load on the OpenAI-compatible server (the `vllm bench serve` equivalent).

Concurrent streaming clients drive `/v1/completions` of a running server over loopback, at a
fixed concurrency and/or a Poisson request rate, with prompts of `--input_len` random token ids
and `--output_len` generated tokens each (`ignore_eos`, greedy). Reports request and token
throughput and the percentiles of TTFT (time to the first streamed text), TPOT (time per output
token after the first), ITL (time between streamed chunks) and end-to-end latency.

Without `--url` it starts `python -m sparse_jax.serve` on a free loopback port (the embedded
model unless `--model`), waits for `/health`, and stops it at the end. Warm-up requests (one
round at the benchmark's concurrency) run first, so compilation is not timed.

  python bench/bench_http_load.py --input_len=1024 --output_len=128 --concurrency=8 --num_prompts=64
  python bench/bench_http_load.py --url=http://127.0.0.1:8000 --request_rate=4 --concurrency=0
  SMOKE=1 python bench/bench_http_load.py --out=/tmp/http_load.json   # tiny CPU run
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("url", "", "base URL of a running server (empty: start one on a free loopback port)")
flags.DEFINE_string("model", "", "checkpoint for the started server (default: the embedded model)")
flags.DEFINE_string("extra_llm_api_options", "", "YAML for the started server (e.g. configs/rocket.yaml)")
flags.DEFINE_integer("max_batch_size", 8, "batch slots of the started server")
flags.DEFINE_integer("max_seq_len", None, "max_seq_len of the started server (default: input + output + 64)")
flags.DEFINE_string("backend", "", "attention backend of the started server (default: the server's)")
flags.DEFINE_string("api_key", "", "Bearer key to send (a --url server started with --api_key)")
flags.DEFINE_integer("num_prompts", 64, "timed requests", lower_bound=1)
flags.DEFINE_integer("input_len", 1024, "prompt tokens per request", lower_bound=1)
flags.DEFINE_integer("output_len", 128, "generated tokens per request", lower_bound=1)
flags.DEFINE_integer("concurrency", 8, "requests in flight at most (0: unlimited)", lower_bound=0)
flags.DEFINE_float("request_rate", math.inf, "requests per second, Poisson arrivals (inf: all at once)")
flags.DEFINE_integer("token_id_low", 10, "prompts draw token ids from [low, high)")
flags.DEFINE_integer("token_id_high", 1000, "prompts draw token ids from [low, high)")
flags.DEFINE_integer("seed", 0, "prompt and arrival-time seed")
flags.DEFINE_float("startup_timeout_s", 900, "seconds to wait for a started server's /health")
flags.DEFINE_string("out", "", "JSON output path")

SMOKE = dict(num_prompts=8, input_len=48, output_len=8, concurrency=4, max_batch_size=4, max_seq_len=128)
PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
  """Linear-interpolated percentile (numpy's default) of a non-empty list."""
  xs = sorted(values)
  k = (len(xs) - 1) * q / 100
  lo, hi = math.floor(k), math.ceil(k)
  return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(name: str, values_s: list[float]) -> dict[str, float]:
  if not values_s:
    return {}
  ms = [v * 1e3 for v in values_s]
  out = {f"{name}_mean_ms": statistics.fmean(ms)}
  out.update({f"{name}_p{q}_ms": percentile(ms, q) for q in PERCENTILES})
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def started_server(cfg: dict):
  """`python -m sparse_jax.serve` on a free loopback port; yields its base URL."""
  port = free_port()
  cmd = [sys.executable, "-m", "sparse_jax.serve", "--host=127.0.0.1", f"--port={port}",
         f"--max_batch_size={cfg['max_batch_size']}", f"--max_seq_len={cfg['max_seq_len']}",
         "--stats_log_interval_s=0", "--log_level=warning", f"--max_queue_size={max(1024, cfg['num_prompts'])}"]
  for flag in ("model", "extra_llm_api_options", "backend"):
    if cfg[flag]:
      cmd.append(f"--{flag}={cfg[flag]}")
  proc = subprocess.Popen(cmd)
  url = f"http://127.0.0.1:{port}"
  try:
    import httpx
    deadline = time.monotonic() + cfg["startup_timeout_s"]
    while True:
      if proc.poll() is not None:
        raise SystemExit(f"error: the server exited with status {proc.returncode} before answering /health")
      with contextlib.suppress(httpx.HTTPError):
        if httpx.get(url + "/health", timeout=5).status_code == 200:
          break
      if time.monotonic() > deadline:
        raise SystemExit(f"error: the server did not answer /health within {cfg['startup_timeout_s']} s")
      time.sleep(0.5)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


async def one_request(client, url: str, headers: dict, prompt: list[int], output_len: int) -> dict:
  """One streamed completion; times measured from sending it."""
  body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  chunk_times, usage, error = [], None, None
  try:
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
      if r.status_code != 200:
        error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
      else:
        async for line in r.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          event = json.loads(line[6:])
          if "error" in event:
            error = event["error"].get("message", "error")
            break
          if event.get("usage"):
            usage = event["usage"]
          if any(c.get("text") for c in event.get("choices", ())):
            chunk_times.append(time.perf_counter())
  except Exception as e:  # a failed request is counted, not fatal
    error = f"{type(e).__name__}: {e}"
  end = time.perf_counter()
  if error is None and (not chunk_times or usage is None):
    error = "the stream ended without text or usage"
  if error is not None:
    return {"ok": False, "error": error}
  tokens = usage["completion_tokens"]
  ttft = chunk_times[0] - start
  return {"ok": True, "prompt_tokens": usage["prompt_tokens"], "output_tokens": tokens, "ttft_s": ttft,
          "e2e_s": end - start, "tpot_s": (end - start - ttft) / (tokens - 1) if tokens > 1 else None,
          "itl_s": [b - a for a, b in zip(chunk_times, chunk_times[1:])]}


async def run_load(url: str, prompts: list[list[int]], cfg: dict, headers: dict) -> tuple[list[dict], float]:
  """Sends every prompt (arrivals at cfg's rate, at most cfg's concurrency in flight); returns
  the per-request results and the wall time from the first send to the last answer."""
  import httpx
  rng = random.Random(cfg["seed"])
  limit = cfg["concurrency"] or len(prompts)
  gate = asyncio.Semaphore(limit)
  timeout = httpx.Timeout(None, connect=30)
  async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=limit + 4)) as client:
    async def limited(prompt):
      async with gate:
        return await one_request(client, url, headers, prompt, cfg["output_len"])

    t0 = time.perf_counter()
    tasks = []
    for i, prompt in enumerate(prompts):
      if i and math.isfinite(cfg["request_rate"]):
        await asyncio.sleep(rng.expovariate(cfg["request_rate"]))
      tasks.append(asyncio.ensure_future(limited(prompt)))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def report(results: list[dict], duration_s: float) -> dict:
  ok = [r for r in results if r["ok"]]
  out_tokens = sum(r["output_tokens"] for r in ok)
  in_tokens = sum(r["prompt_tokens"] for r in ok)
  summary = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
             "request_throughput_per_s": len(ok) / duration_s, "output_tokens_per_s": out_tokens / duration_s,
             "total_tokens_per_s": (in_tokens + out_tokens) / duration_s, "prompt_tokens": in_tokens,
             "output_tokens": out_tokens}
  summary.update(summarize("ttft", [r["ttft_s"] for r in ok]))
  summary.update(summarize("tpot", [r["tpot_s"] for r in ok if r["tpot_s"] is not None]))
  summary.update(summarize("itl", [x for r in ok for x in r["itl_s"]]))
  summary.update(summarize("e2e", [r["e2e_s"] for r in ok]))
  errors = sorted({r["error"] for r in results if not r["ok"]})
  if errors:
    summary["errors"] = errors[:5]
  return summary


def main(_):
  import logging
  logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
  cfg = {name: getattr(FLAGS, name) for name in ("url", "model", "extra_llm_api_options", "max_batch_size",
                                                   "max_seq_len", "backend", "num_prompts", "input_len", "output_len",
                                                   "concurrency", "request_rate", "token_id_low", "token_id_high",
                                                   "seed", "startup_timeout_s")}
  if os.environ.get("SMOKE") == "1":
    cfg.update(SMOKE)
  if cfg["max_seq_len"] is None:
    cfg["max_seq_len"] = cfg["input_len"] + cfg["output_len"] + 64
  if not 0 <= cfg["token_id_low"] < cfg["token_id_high"]:
    raise SystemExit("error: --token_id_low must be >= 0 and below --token_id_high")
  rng = random.Random(cfg["seed"])
  draw = lambda: [rng.randrange(cfg["token_id_low"], cfg["token_id_high"]) for _ in range(cfg["input_len"])]
  prompts = [draw() for _ in range(cfg["num_prompts"])]
  warmup = [draw() for _ in range(min(cfg["concurrency"] or cfg["num_prompts"], cfg["num_prompts"]))]
  headers = {"Authorization": f"Bearer {FLAGS.api_key}"} if FLAGS.api_key else {}

  with (contextlib.nullcontext(cfg["url"].rstrip("/")) if cfg["url"] else started_server(cfg)) as url:
    import httpx
    info = httpx.get(url + "/version", headers=headers, timeout=30).json()
    model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
    warm, _ = asyncio.run(run_load(url, warmup, {**cfg, "request_rate": math.inf}, headers))
    if not all(r["ok"] for r in warm):
      raise SystemExit(f"error: a warm-up request failed: {next(r['error'] for r in warm if not r['ok'])}")
    results, duration = asyncio.run(run_load(url, prompts, cfg, headers))

  summary = report(results, duration)
  record = {"bench": "http_load", "config": {**cfg, "request_rate": str(cfg["request_rate"])}, "server": info,
            "model": model["id"], "max_model_len": model.get("max_model_len"), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "summary": summary}
  print(json.dumps(record), flush=True)
  print(f"\n{summary['completed']} requests ({summary['failed']} failed) in {duration:.2f} s: "
        f"{summary['request_throughput_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s, "
        f"{summary['total_tokens_per_s']:.1f} total tok/s")
  print("| metric | mean | p50 | p90 | p99 |\n|---|---|---|---|---|")
  for name in ("ttft", "tpot", "itl", "e2e"):
    if f"{name}_mean_ms" in summary:
      cells = " | ".join(f"{summary[f'{name}_{k}_ms']:.1f} ms" for k in ("mean", *(f"p{q}" for q in PERCENTILES)))
      print(f"| {name.upper()} | {cells} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)
  if summary["failed"]:
    raise SystemExit(f"error: {summary['failed']} requests failed: {summary.get('errors')}")


if __name__ == "__main__":
  app.run(main)
