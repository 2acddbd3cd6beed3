"""Rotary position embeddings as `transformers` defines them (rotate-half layout).

`RopeSpec` is a frozen, hashable description of one model's RoPE (so it can sit in a
static jit argument); `inv_freq(spec)` computes the inverse frequencies in float32 with the
same formulas as `transformers.modeling_rope_utils` for the types we support, and
`apply_rope` rotates q or k at arbitrary integer positions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """RoPE of one attention layer.

  rotary_dim: channels rotated (head_dim, or the rope part of an MLA head).
  theta: base wavelength (`rope_theta`).
  rope_type: one of SUPPORTED_ROPE_TYPES.
  params: the remaining rope parameters as sorted (key, value) pairs (hashable).
  max_position_embeddings: the model's `max_position_embeddings` (yarn uses it).
  """
  rotary_dim: int
  theta: float = 10000.0
  rope_type: str = "default"
  params: tuple[tuple[str, Any], ...] = ()
  max_position_embeddings: int = 2048

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if self.rotary_dim <= 0 or self.rotary_dim % 2:
      raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")

  @classmethod
  def from_hf(cls, rotary_dim: int, rope_parameters: Mapping[str, Any] | None, *,
              rope_theta: float | None = None, max_position_embeddings: int = 2048) -> "RopeSpec":
    """Builds a spec from a transformers-4 (`rope_theta` + `rope_scaling`) or -5 (`rope_parameters`) layout."""
    params = dict(rope_parameters or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
      theta = rope_theta if rope_theta is not None else 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
      params = {}
    return cls(rotary_dim=rotary_dim, theta=float(theta), rope_type=rope_type,
               params=tuple(sorted(params.items())), max_position_embeddings=max_position_embeddings)

  def param(self, name: str, default: Any = None) -> Any:
    for key, value in self.params:
      if key == name:
        return value
    return default


def _require(spec: RopeSpec, name: str) -> Any:
  value = spec.param(name)
  if value is None:
    raise ValueError(f"rope_type {spec.rope_type!r} needs rope parameter {name!r}, which the config lacks")
  return value


def inv_freq(spec: RopeSpec) -> tuple[np.ndarray, float]:
  """Returns (inverse frequencies float32[rotary_dim // 2], attention scaling of cos/sin)."""
  dim = spec.rotary_dim
  base = spec.theta
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  freqs = freqs.astype(np.float32)
  if spec.rope_type == "default":
    return freqs, 1.0
  if spec.rope_type == "linear":
    return (freqs / np.float32(_require(spec, "factor"))).astype(np.float32), 1.0
  if spec.rope_type == "llama3":
    factor = float(_require(spec, "factor"))
    low_freq_factor = float(_require(spec, "low_freq_factor"))
    high_freq_factor = float(_require(spec, "high_freq_factor"))
    old_context_len = float(_require(spec, "original_max_position_embeddings"))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  # yarn
  factor = spec.param("factor")
  original = _require(spec, "original_max_position_embeddings")
  if factor is None:
    factor = spec.max_position_embeddings / original
  factor = float(factor)
  attention_factor = spec.param("attention_factor")
  mscale, mscale_all_dim = spec.param("mscale"), spec.param("mscale_all_dim")

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    else:
      attention_factor = get_mscale(factor)
  beta_fast = spec.param("beta_fast") or 32
  beta_slow = spec.param("beta_slow") or 1

  def correction_dim(num_rotations):
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if spec.param("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_factor = 1 - ramp
  pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
  interp, extrap = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
  freqs = interp * (1 - extrapolation_factor) + extrap * extrapolation_factor
  return freqs.astype(np.float32), float(attention_factor)


def cos_sin(spec: RopeSpec, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """positions: int32[...] -> (cos, sin) each [..., rotary_dim] in `dtype`."""
  freqs, scaling = inv_freq(spec)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
  emb = jnp.concatenate([angles, angles], axis=-1)
  return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [..., heads, rotary_dim]; cos/sin: [..., rotary_dim] (broadcast over heads)."""
  cos, sin = cos[..., None, :], sin[..., None, :]
  return x * cos + rotate_half(x) * sin
