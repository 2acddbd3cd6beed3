"""Mutation check: named bugs in the sparse path, each of which some fast test must catch.

Each mutation replaces one anchor text (which must occur exactly once, so that a refactor
elsewhere fails this check loudly instead of letting it pass silently) in a temporary copy
of the repository, then runs the few tests chosen to catch it there; the check fails unless
every one of them fails. Run: `python tests/mutation_check.py [name ...]` (all by default); the test suite
runs it through tests/test_mutation_check.py.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("sparse_jax", "pallas_kernels", "models", "configs", "tests", "pyproject.toml")
SELECTION_TESTS = "tests/test_selection.py"
REFERENCE_TESTS = "tests/test_sparse_reference.py"
BEYOND_TESTS = "tests/test_algorithms_beyond.py"
RAISE = '  raise RuntimeError("mutated: the prediction must not run")\n'


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  path: str      # file, relative to the repository root
  anchor: str    # text that must occur exactly once
  replacement: str
  tests: tuple[str, ...]  # pytest node ids, each of which must fail


MUTATIONS = (
    Mutation(
        "attend_to_the_first_k_blocks", "sparse_jax/selection.py",
        "  blocks = selection.indices[..., None]  # [B, H, M, 1]\n",
        "  blocks = jnp.where(selection.indices >= 0, jnp.arange(selection.indices.shape[-1], dtype=jnp.int32),\n"
        "                     -1)[..., None]\n",
        (f"{REFERENCE_TESTS}::test_sparse_decode_equals_attention_over_the_predicted_blocks[quest-reference]",)),
    Mutation(
        "reverse_the_selection_order", "sparse_jax/selection.py",
        "  return AttnSelection(indices=sort_padded(idx), block_size=block_size)\n",
        "  return AttnSelection(indices=sort_padded(idx)[..., ::-1], block_size=block_size)\n",
        (f"{SELECTION_TESTS}::test_topk_selection_is_the_sorted_top_k_of_the_finite_scores",)),
    Mutation(
        "drop_the_last_selected_block", "sparse_jax/selection.py",
        "  blocks = selection.indices[..., None]  # [B, H, M, 1]\n",
        "  last = jnp.sum(selection.indices >= 0, axis=-1)[..., None] - 1\n"
        "  blocks = jnp.where(jnp.arange(max_blocks) == last, -1, selection.indices)[..., None]\n",
        (f"{REFERENCE_TESTS}::test_sparse_decode_equals_attention_over_the_predicted_blocks[oracle-reference]",)),
    Mutation(
        "predict_attn_returns_every_block", "sparse_jax/algorithms/rocket.py",
        "  return topk_selection(scores, cfg.topk, cfg.page_size)\n",
        "  return topk_selection(scores, scores.shape[-1], cfg.page_size)\n",
        (f"{REFERENCE_TESTS}::test_sparse_decode_equals_attention_over_the_predicted_blocks[rocket-reference]",)),
    Mutation(
        "page_id_off_by_one", "sparse_jax/selection.py",
        "page * units_per_page + safe % units_per_page",
        "(page + 1) * units_per_page + safe % units_per_page",
        (f"{SELECTION_TESTS}::test_to_units_examples",)),
    Mutation(
        "skip_compaction", "sparse_jax/attention.py",
        "      layer = compact(layer, rows, keep.indices, keep.counts, runtime)\n",
        "      pass\n",
        (f"{REFERENCE_TESTS}::test_compressed_prompt_holds_exactly_the_predicted_tokens[snapkv-reference]",)),
    # Full-budget tests must run the prediction they claim to match dense with.
    Mutation(
        "quest_predict_attn_raises", "sparse_jax/algorithms/quest.py",
        "  return select_topk_blocks(page_probs(cfg, spec, q, layer, page_table, lengths), lengths, cfg.page_size, "
        "cfg.topk)\n",
        RAISE,
        (f"{BEYOND_TESTS}::test_llm_end_to_end_at_full_budget_matches_dense[quest]",
         f"{BEYOND_TESTS}::test_quest_chunked_prefill_at_full_budget_matches_dense")),
    Mutation(
        "snapkv_predict_kv_raises", "sparse_jax/algorithms/snapkv.py",
        "  scores = snapkv_scores(cfg, q, k, lengths, spec.scale, q_start)\n",
        RAISE,
        (f"{BEYOND_TESTS}::test_llm_end_to_end_at_full_budget_matches_dense[snapkv]",)),
    Mutation(
        "rocket_predict_attn_raises", "sparse_jax/algorithms/rocket.py",
        "  scores = block_scores(cfg, spec, q, layer, page_table, lengths)\n",
        RAISE,
        ("tests/test_chunked_prefill.py::test_sparse_chunked_with_full_selection_equals_dense",)),
    Mutation(
        "quest_predict_attn_returns_none", "sparse_jax/algorithms/quest.py",
        "  return select_topk_blocks(page_probs(cfg, spec, q, layer, page_table, lengths), lengths, cfg.page_size, "
        "cfg.topk)\n",
        "  return None\n",
        ("tests/test_algorithms_contract.py::test_predict_attn_contract[quest]",)),
    Mutation(
        "eos_not_stopped_on_the_device", "sparse_jax/engine.py",
        "      done = active & (hit_eos | (remaining <= 0))\n",
        "      done = active & (remaining <= 0)\n",
        ("tests/test_eos.py::test_eos_stops_the_slot_on_the_device_mid_chunk",)),
)


def copy_repository(dest: str) -> None:
  ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "*.pyc")
  for name in COPIED:
    src = os.path.join(ROOT, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dest, name),
                                                             **({"ignore": ignore} if os.path.isdir(src) else {}))


def apply(mutation: Mutation, dest: str) -> None:
  path = os.path.join(dest, mutation.path)
  with open(path) as f:
    text = f.read()
  found = text.count(mutation.anchor)
  if found != 1:
    raise AssertionError(f"mutation {mutation.name!r}: its anchor occurs {found} times in {mutation.path} "
                         f"(expected once); update the mutation to the code as it is now:\n{mutation.anchor}")
  with open(path, "w") as f:
    f.write(text.replace(mutation.anchor, mutation.replacement))


def run_tests(dest: str, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": dest, "PYTHONDONTWRITEBYTECODE": "1"}
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                         *tests], cwd=dest, env=env, capture_output=True, text=True, timeout=600)


def caught_by(summary: str, returncode: int, expected: int) -> bool:
  """Whether pytest's summary line says that all `expected` tests failed (none passed, was
  skipped or errored out)."""
  return returncode == 1 and summary.strip("= ").split(" in ")[0].split(", ") == [f"{expected} failed"]


def check(mutation: Mutation) -> tuple[bool, str]:
  """(caught, summary): caught when every chosen test fails (and does not merely error out)."""
  with tempfile.TemporaryDirectory(prefix=f"mutation_{mutation.name}_") as dest:
    copy_repository(dest)
    apply(mutation, dest)
    proc = run_tests(dest, mutation.tests)
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  summary = lines[-1] if lines else ""
  return caught_by(summary, proc.returncode, len(mutation.tests)), summary


def check_copy_is_importable() -> None:
  """The copy, not an installed package, is what the tests import (else no mutation could show)."""
  with tempfile.TemporaryDirectory(prefix="mutation_baseline_") as dest:
    copy_repository(dest)
    env = {**os.environ, "PYTHONPATH": dest}
    out = subprocess.run([sys.executable, "-c", "import sparse_jax, pallas_kernels; print(sparse_jax.__file__)"],
                         cwd=dest, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(os.path.realpath(dest)) and not out.startswith(dest):
      raise AssertionError(f"the copy imports sparse_jax from {out}, not from {dest}")


def check_all(mutations=MUTATIONS, workers: int = 2) -> list[tuple[Mutation, bool, str, float]]:
  """Checks every mutation, `workers` at a time (each runs its own pytest process):
  [(mutation, caught, pytest's summary line, seconds)] in the order given."""
  check_copy_is_importable()

  def timed(mutation):
    start = time.perf_counter()
    caught, summary = check(mutation)
    return mutation, caught, summary, time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(timed, mutations))


def main(names: list[str]) -> int:
  unknown = set(names) - {m.name for m in MUTATIONS}
  if unknown:
    print(f"unknown mutation(s) {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    return 2
  results = check_all([m for m in MUTATIONS if not names or m.name in names])
  for mutation, caught, summary, seconds in results:
    print(f"{'caught' if caught else 'MISSED'}  {mutation.name:<34} {seconds:5.1f} s  {summary}")
  missed = [m.name for m, caught, _, _ in results if not caught]
  if missed:
    print(f"mutations no test caught: {missed}")
  return 1 if missed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
