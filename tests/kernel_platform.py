"""How kernel tests run the Pallas kernels: compiled on a GPU and in interpret mode elsewhere, so
that a GPU run of the suite compares the compiled kernels with their references; and lowering
for CUDA, skipped only where this jax has no CUDA platform to lower for."""
from __future__ import annotations

import re

import jax
import pytest

from pallas_kernels import _compat

INTERPRET = jax.default_backend() != "gpu"

PLATFORM_MISSING = re.compile(r"(unknown|unsupported|no) (backend|platform)|unable to initialize backend", re.I)


def lower_for_cuda(fn, *args) -> str:
  """StableHLO text of `fn` lowered for CUDA; skips only when the CUDA platform is missing (a
  Triton lowering error fails)."""
  try:
    return _compat.lower_as_text(fn, *args)
  except Exception as e:
    if PLATFORM_MISSING.search(str(e)):
      pytest.skip(f"cannot lower for cuda on this jax: {e}")
    raise
