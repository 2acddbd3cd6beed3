"""bench/bench_rocket_step.py runs under SMOKE=1 on the CPU (interpret mode) and its three
variants agree; timings are reported, never asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_measures_every_variant_and_they_agree(tmp_path):
  out = tmp_path / "rocket_step.json"
  env = dict(os.environ, SMOKE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "bench/bench_rocket_step.py", f"--out={out}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["fused", "pallas", "xla_lean"]
  for row in rows:
    assert "error" not in row, row
    assert row["us_per_layer"] > 0
    assert row["max_abs_diff_vs_fused"] <= 2e-2  # bf16 outputs of the same selection
  assert "fused vs pallas" in proc.stdout  # the table
