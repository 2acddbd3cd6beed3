"""Benchmarks run under SMOKE=1 on the CPU (tiny shapes, interpret mode); timings are reported,
never asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(script, out):
  env = dict(os.environ, SMOKE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, script, f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_rocket_step_measures_every_variant_and_they_agree(tmp_path):
  """The fused two-launch step, the unfused Pallas path and the lean XLA step: same outputs."""
  out = tmp_path / "rocket_step.json"
  proc = _smoke("bench/bench_rocket_step.py", out)
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["fused", "pallas", "xla_lean"]
  for row in rows:
    assert "error" not in row, row
    assert row["us_per_layer"] > 0
    assert row["max_abs_diff_vs_fused"] <= 2e-2  # bf16 outputs of the same selection
    assert row["ops_per_layer"] > 0
  assert "fused vs pallas" in proc.stdout  # the table


def test_decode_measures_the_bench_and_serving_layouts(tmp_path):
  """The engine's decode step as the decode bench compiles it and as the serving engine does."""
  out = tmp_path / "decode.json"
  _smoke("bench/bench_decode.py", out)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["backend"], r["layout"]) for r in rows] == [("pallas", "bench"), ("pallas", "serving")]
  assert [r["steps_per_call"] for r in rows] == [4, 2]
  assert all(r["step_ms"] > 0 for r in rows)
  assert all(r["attention_ms_per_step"] > 0 and r["attention_pct_of_step"] > 0 for r in rows)


def test_dsa_checks_every_kernel_and_times_each_op_with_its_peers(tmp_path):
  """Row top-k vs the six-launch kernel vs lax.top_k; dense MLA vs XLA; the whole DSA step."""
  proc = _smoke("bench/bench_dsa.py", tmp_path)
  assert "CHECK SUMMARY dsa: OK" in proc.stdout
  result = json.loads((tmp_path / "bench_dsa.json").read_text())
  assert result["check_ok"]
  rows = {(r["op"], r["impl"], r.get("config", "")): r for r in result["rows"]}
  for key in [("topk", "pallas", "default"), ("topk", "pallas", "kernel=chunked"), ("topk", "lax.top_k", ""),
              ("mla_dense", "pallas", "mla_decode"), ("mla_dense", "xla", ""), ("dsa_step", "xla", "")]:
    assert key in rows, (key, sorted(rows))
  for row in rows.values():
    assert row["error"] is None and row["us"] > 0, row


def test_mla_decode_reports_tflops_against_lean_xla(tmp_path):
  """mla_decode, the token-list kernel and the lean XLA composition agree with the reference."""
  _smoke("bench/bench_mla_decode.py", tmp_path)
  rows = json.loads((tmp_path / "bench_mla_decode.json").read_text())["rows"]
  assert [r["impl"] for r in rows] == ["mla_decode", "sparse_mla_decode", "xla_lean", "xla"]
  for row in rows:
    assert row["error"] is None and row["tflop_s"] > 0, row
    assert row["max_err"] <= 1e-4, row   # float32 smoke shapes


def test_http_load_drives_the_real_server(tmp_path):
  """Concurrent streaming clients against `python -m sparse_jax.serve` (the embedded model) on
  loopback: every request completes with its output length, and the latency summary is filled."""
  out = tmp_path / "http_load.json"
  proc = _smoke("bench/bench_http_load.py", out)
  record = json.loads(out.read_text())
  s, cfg = record["summary"], record["config"]
  assert s["completed"] == cfg["num_prompts"] == 8 and s["failed"] == 0
  assert s["output_tokens"] == cfg["num_prompts"] * cfg["output_len"]
  assert s["prompt_tokens"] == cfg["num_prompts"] * cfg["input_len"]
  for name in ("ttft", "tpot", "e2e"):
    assert 0 < s[f"{name}_p50_ms"] <= s[f"{name}_p99_ms"]
  assert s["ttft_p99_ms"] <= s["e2e_p99_ms"]
  assert "| TTFT |" in proc.stdout


def test_check_kernels_passes_every_part_on_the_cpu(tmp_path):
  """The GPU correctness check under SMOKE (interpret mode, small NaN-poisoned shapes; the DSA
  kernels' part is bench_dsa's check, run by the DSA bench's smoke test above)."""
  parts = "paged_decode,compaction,rocket_score,rocket_decode,mla_decode,chunk_merge,engine"
  env = dict(os.environ, SMOKE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "bench.check_kernels_gpu", f"--parts={parts}", "--algorithms=rocket",
                         f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "check_kernels.json").read_text())
  assert result["ok"] and result["parts"] == {p: True for p in parts.split(",")}
  names = [c["check"] for c in result["checks"]]
  assert any(n.startswith("rocket_decode test_") for n in names)
  assert "engine rocket (float32, pallas vs reference)" in names
  assert "CHECK paged_decode" in proc.stdout and "CHECK compaction" in proc.stdout


def test_check_chunk_merge_fails_a_merge_that_drops_the_context(monkeypatch):
  """The chunk-merge check compares with one softmax over context and chunk: a merge that
  keeps only the chunk's own attention fails it."""
  from bench import check_kernels_gpu
  from sparse_jax import attention

  results = []
  assert check_kernels_gpu.check_chunk_merge(True, results)
  merge = attention.merge_by_lse
  monkeypatch.setattr(attention, "merge_by_lse", lambda parts: merge(parts[:1]))
  assert not check_kernels_gpu.check_chunk_merge(True, results)
  assert [r["ok"] for r in results] == [True, False]


def test_check_kernels_needs_no_pytest():
  """The GPU check's engine part imports its cases and tiny models without pytest (a GPU
  machine may have only the CUDA extra installed)."""
  code = ("import sys; sys.modules['pytest'] = None\n"
          "from bench import check_kernels_gpu\n"
          "from tests import engine_cases\n"
          "from tests.model_fixtures import tiny_deepseek, tiny_llama\n"
          "assert engine_cases.CASES and engine_cases.MLA_CASES\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
