"""bench/'s GPU scripts take stage (or topic) names: an unknown one is refused with the valid
names before anything runs."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script, valid", [
    ("run_decode_gpu.sh", ["step", "model", "all"]),
    ("run_prefill_gpu.sh", ["check", "layer", "ttft", "memory", "all"]),
    ("run_serving_gpu.sh", ["short", "long", "128k", "http"]),
    ("run_eval_gpu.sh", ["grid", "indexer", "chunked"]),
])
def test_unknown_stage_is_refused_with_the_valid_ones(tmp_path, script, valid):
  env = dict(os.environ, OUT=str(tmp_path))
  proc = subprocess.run(["bash", f"bench/{script}", "no_such_stage"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert "no_such_stage" in proc.stderr and all(v in proc.stderr for v in valid), proc.stderr


def test_run_all_needs_a_results_dir_and_known_topics(tmp_path):
  proc = subprocess.run(["bash", "bench/run_gpu_all.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "RESULTS_DIR" in proc.stderr
  proc = subprocess.run(["bash", "bench/run_gpu_all.sh", str(tmp_path), "kernels", "no_such_topic"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "no_such_topic" in proc.stderr, proc.stderr
  assert not os.path.exists(tmp_path / "kernels"), "a topic ran before the names were checked"
