"""Fixtures shared by the test files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> str:
  """Path of the converted SmolLM2-135M-Instruct checkpoint (tests/real_checkpoint.py), built once
  per machine under ~/.cache/sparse_jax."""
  from tests.real_checkpoint import smollm2_checkpoint as build
  return build()


@pytest.fixture(scope="module")
def one_torch_thread():
  """torch's CPU thread pool fights XLA's for the cores (one thread is 50x faster here): a module
  comparing against transformers uses it with `pytestmark = pytest.mark.usefixtures(...)`."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
