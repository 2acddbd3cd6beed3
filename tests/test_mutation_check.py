"""Every named mutation of the sparse path (tests/mutation_check.py) makes its chosen tests fail."""
import pytest

from tests import mutation_check


def test_every_mutation_is_caught():
  results = mutation_check.check_all()
  report = "\n".join(f"{'caught' if caught else 'MISSED'} {m.name}: {summary} ({seconds:.0f} s)"
                     for m, caught, summary, seconds in results)
  print(report)
  assert all(caught for _, caught, _, _ in results), f"a mutation went unnoticed:\n{report}"


def test_a_missing_anchor_fails_loudly(tmp_path):
  (tmp_path / "sparse_jax").mkdir()
  (tmp_path / "sparse_jax" / "selection.py").write_text("refactored\n")
  with pytest.raises(AssertionError, match="anchor occurs 0 times in sparse_jax/selection.py"):
    mutation_check.apply(mutation_check.MUTATIONS[0], str(tmp_path))


@pytest.mark.parametrize("summary, returncode, caught", [
    ("2 failed in 9.81s", 1, True),
    ("========== 2 failed in 9.81s ==========", 1, True),
    ("1 failed, 1 passed in 9.81s", 1, False),  # one chosen test did not notice
    ("1 failed in 9.81s", 1, False),            # a node id that selects nothing
    ("2 passed in 9.81s", 0, False),
    ("1 failed, 1 error in 9.81s", 1, False),   # an error is not a caught mutation
    ("1 failed, 1 skipped in 9.81s", 1, False),
    ("no tests ran in 0.01s", 4, False),
])
def test_a_mutation_counts_as_caught_only_when_every_chosen_test_fails(summary, returncode, caught):
  assert mutation_check.caught_by(summary, returncode, expected=2) is caught
