"""The serving benchmark runs end to end on the CPU with a tiny random model, in both modes,
and writes JSON with the reported fields (and a plot when several input lengths are swept)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparse_jax.bench import BenchArgs, plan_batch, plan_pool, run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTED = ["output_tokens_per_s", "requests_per_s", "ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms",
            "tpot_p50_ms", "tpot_p99_ms", "per_user_tokens_per_s", "decode_tokens_per_s",
            "per_user_decode_tokens_per_s", "peak_kv_memory_gb", "peak_kv_pages", "decode_kv_memory_gb", "page_bytes",
            "compilations_warmup", "compilations_timed", "max_batch_size", "num_requests"]
# RocketKV with a budget small enough to compact the tiny model's prompts.
SMALL_ROCKET = """sparse_attention_config:
  algorithm: rocket
  prompt_budget: 32
  window_size: 8
  kernel_size: 7
  topr: 1.0
  topk: 4
  page_size: 4
  kt_cache_dtype: float32
kv_cache_config:
  enable_block_reuse: false
  tokens_per_block: 16
"""


def run_cli(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "sparse_jax.bench", *flags], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def check_point(p: dict, num_requests: int, output_len: int) -> None:
  for key in REPORTED:
    assert key in p, key
  assert p["num_requests"] == num_requests
  assert p["output_tokens"] == num_requests * output_len  # ignore_eos: every request runs to max_tokens
  assert p["output_tokens_per_s"] > 0 and p["requests_per_s"] > 0
  assert 0 < p["ttft_p50_ms"] <= p["ttft_p99_ms"] and 0 < p["tpot_p50_ms"] <= p["tpot_p99_ms"]
  assert p["decode_tokens_per_s"] > 0 and p["per_user_decode_tokens_per_s"] > 0
  assert p["peak_kv_memory_gb"] == pytest.approx(p["peak_kv_pages"] * p["page_bytes"] / 1e9)
  assert 0 < p["peak_kv_pages"] <= p["kv_pool_pages"]
  assert p["compilations_warmup"] > 0, "the warm-up compiled nothing: it cannot have run first"
  assert p["compilations_timed"] == 0, "compilation leaked into the timed run"


def test_throughput_cli_sweeps_input_lengths_and_writes_json_and_plot(tmp_path):
  out, png = tmp_path / "bench.json", tmp_path / "bench.png"
  r = run_cli("--mode=throughput", "--weights=random", "--config=tiny-llama", "--input_len=24,40", "--output_len=12",
              "--decode_chunk_size=4", "--max_batch_size=2", "--num_requests=4", f"--output={out}", f"--plot={png}")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["device"].endswith("(cpu)") and "compilation is excluded" in result["note"]
  assert [p["input_len"] for p in result["points"]] == ["24", "40"]
  for p, pages_per_request in zip(result["points"], (2, 2)):  # 24 + 12 and 40 + 12 tokens, pages of 32
    check_point(p, num_requests=4, output_len=12)
    assert p["mode"] == "throughput" and p["concurrency"] == 4 and p["max_batch_size"] == 2
    assert p["peak_kv_pages"] == p["kv_pool_pages"] == 2 * pages_per_request  # the pool fits one full batch
  assert png.stat().st_size > 0
  assert "| config | input | batch |" in r.stdout


def test_latency_mode_max_batch_and_sparse_comparison(tmp_path):
  yaml = tmp_path / "rocket_small.yaml"
  yaml.write_text(SMALL_ROCKET)
  out = tmp_path / "latency.json"
  result = run_benchmark(BenchArgs(
      mode="latency", weights="random", config="tiny-llama", input_len=(100,), output_len=12, num_requests=5,
      concurrency=2, decode_chunk_size=4, max_batch_size=("max",), kv_max_tokens=1024, extra_llm_api_options=("dense", str(yaml)),
      output=str(out), progress=False))
  assert json.loads(out.read_text())["points"] == json.loads(json.dumps(result["points"]))
  dense, rocket = result["points"]
  for p in (dense, rocket):
    check_point(p, num_requests=5, output_len=12)
    assert p["mode"] == "latency" and p["concurrency"] == 2
  # Dense: 100 + 12 tokens = 4 pages of 32 per request; a 1024-token pool (32 pages) holds 8.
  assert dense["batch_fit"] == plan_batch(32, 32, 112, 112) == 8 and dense["max_batch_size"] == 8
  # RocketKV (pages of 16): 7 pages to admit, then it keeps 32 prompt tokens: 44 tokens = 3 pages.
  assert rocket["batch_fit"] == plan_batch(64, 16, 112, 44) == 20 and rocket["max_batch_size"] == 20
  assert rocket["mean_kept_prompt_tokens"] == 32 and dense["mean_kept_prompt_tokens"] == 100
  # While decoding, each RocketKV request holds 3 pages of 16 (compacted), each dense one 4 of 32.
  assert rocket["decode_kv_pages"] == 2 * 3 and dense["decode_kv_pages"] == 2 * 4  # 2 in flight
  [comp] = result["comparisons"]
  assert comp["config"] == str(yaml) and comp["batch"] == 20 and comp["dense_batch"] == 8
  assert comp["per_user_decode_tokens_per_s_ratio"] == pytest.approx(
      rocket["per_user_decode_tokens_per_s"] / dense["per_user_decode_tokens_per_s"])


def test_plan_pool_is_the_inverse_of_plan_batch():
  # Dense: every request at full size. RocketKV: one at full size, the others compacted.
  assert plan_pool(8, 32, 112, 112) == 32 and plan_batch(32, 32, 112, 112) == 8
  assert plan_pool(20, 16, 112, 44) == 7 + 19 * 3 and plan_batch(plan_pool(20, 16, 112, 44), 16, 112, 44) == 20
  # A 128K prompt with 512 output tokens, batch 2: RocketKV's pool is about half of dense's.
  full, kept = 130560 + 512, 2048 + 512
  assert plan_pool(2, 32, full, kept) == 4096 + 80 and plan_pool(2, 32, full, full) == 2 * 4096


def test_dataset_jsonl(tmp_path):
  data = tmp_path / "data.jsonl"
  rows = [{"input_ids": list(range(1, 20))}, {"input_ids": [5] * 30, "max_tokens": 3}, {"input_ids": [7, 8, 9]}]
  data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  result = run_benchmark(BenchArgs(weights="random", config="tiny-llama", dataset=str(data), output_len=5,
                                   max_batch_size=("2",), decode_chunk_size=2, progress=False))
  [p] = result["points"]
  assert p["input_len"] == "data.jsonl" and p["num_requests"] == 3
  assert p["output_tokens"] == 5 + 3 + 5 and p["input_tokens"] == 19 + 30 + 3


def test_points_run_in_order_and_the_time_budget_skips(tmp_path):
  result = run_benchmark(BenchArgs(weights="random", config="tiny-llama", points=("64:2", "16:max"),
                                   kv_max_tokens=512, time_budget_s=1e-3, progress=False))
  assert [(p["input_len"], p["batch_spec"], p["config"]) for p in result["points"]] == [
      ("64", "2", "dense"), ("16", "max", "dense")]
  assert all("time_budget_s" in p["skipped"] for p in result["points"]) and result["comparisons"] == []


@pytest.mark.parametrize("flags, needle", [
    (["--weights=random", "--config=tiny-llama", "--points=64"], "--points has '64'"),
    (["--weights=random", "--config=tiny-llama", "--max_batch_size=0"], "--max_batch_size has '0'"),
    (["--weights=random"], "--weights=random needs --config"),
    (["--weights=random", "--config=no-such-model"], "no-such-model"),
    (["--weights=random", "--config=tiny-llama", "--max_batch_size=max", "--input_len=16"], "--kv_max_tokens"),
])
def test_bad_flags_exit_with_a_message(flags, needle):
  r = run_cli(*flags)
  assert r.returncode != 0
  assert needle in r.stderr + r.stdout, r.stderr[-2000:]


def test_bad_dataset_line_is_named(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"input_ids": [1, 2]}\n{"prompt": "hello"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl line 2: has 'prompt' text but the model has no tokenizer"):
    run_benchmark(BenchArgs(weights="random", config="tiny-llama", dataset=str(data), progress=False))


def test_bench_cache_fill_reuses_the_pool_buffers():
  """bench.common.random_fill_cache must donate each pool to its fill: an argument the jitted
  fill does not read is pruned with its donation, and the 8B decode bench then held two pools
  (79 GB peak on the H100). Donated inputs are deleted and the compiled fill aliases them."""
  import jax
  import jax.numpy as jnp
  from bench.common import random_fill_cache
  from sparse_jax.cache import PagedKVCache
  pools = tuple(jnp.zeros((2, 8, 4, 16), jnp.bfloat16) for _ in range(2))
  cache = PagedKVCache(k=pools, v=tuple(jnp.zeros_like(p) for p in pools),
                       page_table=jnp.zeros((1, 8), jnp.int32), lengths=jnp.zeros((1,), jnp.int32),
                       positions=jnp.zeros((1,), jnp.int32), aux={})
  old = cache.k + cache.v
  filled = random_fill_cache(cache, aux=False)
  assert all(x.is_deleted() for x in old)
  assert all(float(jnp.std(x.astype(jnp.float32))) > 0.5 for x in filled.k + filled.v)
  assert jax.tree_util.tree_structure(filled) == jax.tree_util.tree_structure(cache)
