"""What the kernels and the layers calling them share: the mask value, the backend names, the
GPU check and power-of-two sizes (imports nothing of the project)."""
from __future__ import annotations

import math

import jax
import numpy as np

# Large negative finite logit for masked positions: exp(MASK_VALUE - m) == 0 and
# MASK_VALUE - MASK_VALUE == 0, so no inf - inf NaN can appear, inside a kernel or out.
MASK_VALUE = -1e30

# Every kernel's implementations: the Pallas kernel and its pure-jnp reference.
BACKENDS = ("pallas", "reference")


def check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU."""
  return jax.default_backend() == "gpu"


def is_power_of_two(x) -> bool:
  """An integer (not a bool) that is a power of two."""
  return (isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x > 0
          and (int(x) & (int(x) - 1)) == 0)


def pow2_at_least(n: int, lo: int = 1) -> int:
  """The smallest power of two >= n (and >= lo)."""
  return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def pow2_at_most(n: int) -> int:
  """The largest power of two <= n (n >= 1)."""
  return 1 << (n.bit_length() - 1)
