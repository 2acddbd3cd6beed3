"""The `sparse-jax` command: every tool's --help exits 0, a user's mistake is one `error:` line
(no traceback, no log of JAX probing absent accelerators), and the packaging metadata (console
script, CUDA extras, licence) is consistent."""
from __future__ import annotations

import concurrent.futures
import importlib
import os
import subprocess
import sys
import tomllib

import pytest

from sparse_jax.cli import TOOLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": ""})


@pytest.fixture(scope="module")
def results():
  """Every command of this module, run once in parallel (each is a fresh interpreter)."""
  commands = {f"help {tool}": ("-m", "sparse_jax.cli", tool, "--help") for tool in TOOLS}
  commands.update({
      "missing checkpoint": ("-m", "sparse_jax.cli", "serve", "--model=/nonexistent/checkpoint"),
      "module missing checkpoint": ("-m", "sparse_jax.eval", "--model=/nonexistent/checkpoint"),
      "bad flag value": ("-m", "sparse_jax.cli", "serve", "--max_batch_size=eight"),
      "usage error": ("-m", "sparse_jax.cli", "bench"),
  })
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(zip(commands, pool.map(lambda c: run(*c), commands.values())))


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_has_a_help_that_exits_0(results, tool):
  r = results[f"help {tool}"]
  assert r.returncode == 0, r.stderr
  assert f"sparse_jax.{tool}:" in r.stdout and "--" in r.stdout
  if tool == "serve":
    assert "--api_key" in r.stdout and "--allowed_origins" in r.stdout


@pytest.mark.parametrize("name, needle", [
    ("missing checkpoint", "error: cannot load the model: checkpoint directory not found: /nonexistent/checkpoint"),
    ("module missing checkpoint", "error: /nonexistent/checkpoint has no tokenizer.json"),
    ("bad flag value", "error: flag --max_batch_size=eight"),
    ("usage error", "error: --model=<checkpoint directory> is required"),
])
def test_user_errors_are_one_line(results, name, needle):
  r = results[name]
  assert r.returncode == 1
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: ") and needle in lines[-1], r.stderr
  assert "Traceback" not in r.stderr and "tpu" not in (r.stderr + r.stdout).lower(), r.stderr


def test_command_usage(capsys):
  from sparse_jax.cli import main
  for argv, code, stream, needle in ((["sparse-jax"], 2, "out", "tools:"), (["sparse-jax", "--help"], 0, "out", "serve"),
                                     (["sparse-jax", "frobnicate"], 2, "err", "unknown tool 'frobnicate'")):
    with pytest.raises(SystemExit) as info:
      main(argv)
    assert info.value.code == code and needle in getattr(capsys.readouterr(), stream)


def test_packaging_metadata():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  module, func = project["scripts"]["sparse-jax"].split(":")
  assert callable(getattr(importlib.import_module(module), func))
  extras = project["optional-dependencies"]
  assert any(d.startswith("jax[cuda12]") for d in extras["cuda12"])
  assert any(d.startswith("jax[cuda13]") for d in extras["cuda13"])
  assert project["license"] == {"text": "Apache-2.0"}
  text = open(os.path.join(ROOT, "LICENSE")).read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
  assert "prometheus_client" in " ".join(project["dependencies"])
