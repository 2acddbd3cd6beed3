"""The package's layers (pyproject.toml [tool.importlinter]) hold: `lint-imports` keeps every contract."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
  exe = shutil.which("lint-imports")
  if exe is None:
    pytest.fail("lint-imports (the import-linter package, in the test extra) is not installed")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([exe, os.path.join(ROOT, "pyproject.toml"), "--no-cache", "--no-logo"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert "0 broken" in out.stdout


def test_a_forbidden_import_breaks_a_contract(tmp_path):
  """The check can fail: a copy of pallas_kernels importing sparse_jax is reported."""
  exe = shutil.which("lint-imports")
  if exe is None:
    pytest.fail("lint-imports is not installed")
  for pkg in ("pallas_kernels", "sparse_jax", "models", "bench"):
    shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
  with open(tmp_path / "pallas_kernels" / "named_shapes.py", "a") as f:
    f.write("\nimport sparse_jax.engine  # noqa: E402,F401\n")
  out = subprocess.run([exe, str(tmp_path / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert "pallas_kernels imports nothing of the project BROKEN" in out.stdout
