"""How kernel tests run the Pallas kernels: compiled on a GPU and in interpret mode elsewhere, so
that a GPU run of the suite compares the compiled kernels with their references; lowering for
CUDA, skipped only where this jax has no CUDA platform to lower for; and the permuted page
tables of the paged kernels' cases."""
from __future__ import annotations

import re

import jax
import numpy as np
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


def permuted_pages(rng, lengths, *, page_size: int, max_pages: int, spare_pages: int, readable):
  """(page_table int32[batch, max_pages], readable bool[num_pages, page_size]) over a pool of
  batch * max_pages + spare_pages pages: row b gets ceil(lengths[b] / page_size) pages of one
  random permutation of the pool (-1 past them); `readable[b]` lists row b's token positions
  whose slots are marked (a case poisons the others, which a kernel must never read)."""
  batch = len(lengths)
  num_pages = batch * max_pages + spare_pages
  perm = rng.permutation(num_pages)
  table = np.full((batch, max_pages), -1, np.int32)
  marked = np.zeros((num_pages, page_size), bool)
  for b, n in enumerate(lengths):
    used = -(-n // page_size)
    table[b, :used] = perm[b * max_pages:b * max_pages + used]
    for t in readable[b]:
      marked[table[b, t // page_size], t % page_size] = True
  return table, marked
