"""Session fixtures shared by the test files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> str:
  """Path of the converted SmolLM2-135M-Instruct checkpoint (tests/real_checkpoint.py), built once
  per machine under ~/.cache/sparse_jax."""
  from tests.real_checkpoint import smollm2_checkpoint as build
  return build()
