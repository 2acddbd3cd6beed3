"""The repository describes the project as it is: no work history, no names of the machines that
measured it, no tracker numbers, and bench/ scripts named by what they measure. Text checks over
the source, docs, configs and results; no jax."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_DIRS = ("sparse_jax", "pallas_kernels", "models", "bench", "tests", "docs", "configs", "results", ".ci")
TEXT_SUFFIXES = (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", "")
SKIP_DIRS = {"__pycache__", "assets", ".git"}  # assets: model weights and tokenizer vocabularies
THIS_FILE = os.path.abspath(__file__)

# Each rule: (what it finds, pattern, allowed lines). Patterns are case-insensitive.
RULES = [
    ("a machine kind instead of the hardware's name", r"\bnvidia-h[12]00\b|\bh[12]00-x\d\b", None),
    ("a work session", r"\bsessions?\b",
     # pytest's session-scoped fixtures and HTTP client sessions are not work history
     r"scope=.session.|session fixtures?\b|\b(requests|aiohttp|client)\.?session\b"),
    ("an issue number", r"\bissues?\s*#?\d+|\(#\d+\)", None),
    ("the tool that lent the hardware", r"\bdevice tool\b|\bthe lease\b", None),
    ("run history", r"\bsuperseded\b|\bfound after\b|\bafter the run\b|\bnot re-?measured\b", None),
]


def _files():
  for name in sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, name)
    if os.path.isfile(path) and name.endswith((".md", ".toml", ".cfg")):
      yield path
  for top in SCANNED_DIRS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
      for name in filenames:
        path = os.path.join(dirpath, name)
        if os.path.splitext(name)[1] in TEXT_SUFFIXES and os.path.abspath(path) != THIS_FILE:
          yield path


def _findings(paths, rules):
  found = []
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except UnicodeDecodeError:
      continue
    for what, pattern, allowed in rules:
      for i, line in enumerate(lines, 1):
        if re.search(pattern, line, re.I) and not (allowed and re.search(allowed, line, re.I)):
          found.append(f"{os.path.relpath(path, ROOT)}:{i}: {what}: {line.strip()[:160]}")
  return found


def test_no_history_machine_kinds_or_issue_numbers():
  found = _findings(list(_files()), RULES)
  assert not found, "\n".join(found)


@pytest.mark.parametrize("line, flagged", [
    ("Device: NVIDIA H100 80GB HBM3 (nvidia-h100-x1)", True),
    ("ran on nvidia-h200", True),
    ("Measured in the third device session.", True),
    ("## Kernels (issue 5)", True),
    ("see issue #12", True),
    ("Superseded by the rerun below", True),
    ("1x NVIDIA H100 80GB HBM3, jax 0.11.2", False),
    ('@pytest.fixture(scope="session")', False),
    ("Session fixtures shared by the test files.", False),
])
def test_rules_flag_what_they_should(tmp_path, line, flagged):
  path = tmp_path / "doc.md"
  path.write_text(line + "\n")
  assert bool(_findings([str(path)], RULES)) == flagged


def test_bench_scripts_are_named_by_what_they_measure():
  names = os.listdir(os.path.join(ROOT, "bench"))
  dated = [n for n in names if re.search(r"session|final\d|_x\d_|train\d|s\d_gpu", n, re.I)]
  assert not dated, f"bench/ scripts named after when they ran: {dated}"


def test_docs_link_only_existing_bench_scripts():
  missing = []
  for doc in ("README.md", "BENCHMARKS.md", "EVAL.md"):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      text = f.read()
    for ref in sorted(set(re.findall(r"bench/[\w./-]+\.(?:sh|py)", text))):
      if not os.path.exists(os.path.join(ROOT, ref)):
        missing.append(f"{doc}: {ref}")
    for mod in sorted(set(re.findall(r"python -m bench\.(\w+)", text))):
      if not os.path.exists(os.path.join(ROOT, "bench", mod + ".py")):
        missing.append(f"{doc}: bench.{mod}")
  assert not missing, missing


def test_results_are_cited_by_the_docs():
  docs = ""
  for doc in ("README.md", "BENCHMARKS.md", "EVAL.md"):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      docs += f.read()
  uncited = [n for n in sorted(os.listdir(os.path.join(ROOT, "results"))) if f"results/{n}" not in docs]
  assert not uncited, f"results/ files no doc cites (keep only the current JSON per topic): {uncited}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bench_shell_scripts_parse():
  scripts = sorted(n for n in os.listdir(os.path.join(ROOT, "bench")) if n.endswith(".sh"))
  assert scripts
  for name in scripts:
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", name)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{name}: {proc.stderr}"


def test_every_benchmark_topic_names_hardware_jax_date_and_command():
  with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
    sections = re.split(r"^## ", f.read(), flags=re.M)[1:]
  assert sections
  needs = {"hardware": r"NVIDIA [AHB]\d+|\bCPU\b", "jax version": r"\bjax \d+\.\d+", "date": r"\b20\d\d-\d\d-\d\d\b",
           "command": r"`(bash bench/|python -m )"}
  missing = [f"{s.splitlines()[0]}: no {what}" for s in sections for what, p in needs.items() if not re.search(p, s)]
  assert not missing, missing
  dated = [s.splitlines()[0] for s in sections if re.search(r"\b20\d\d-\d\d-\d\d\b|\brun\b|\(issue", s.splitlines()[0])]
  assert not dated, f"topic headings, not run headings: {dated}"
