"""Everything that differs between jax 0.10 (CPU, interpret mode) and 0.11 (GPU, Triton).

Kernels import Pallas/Triton helpers from here only, so a version difference is fixed in
one place. What is known to differ:

* ``plgpu.CompilerParams`` (0.7+) was ``plgpu.TritonCompilerParams`` before; both handled.
* ``pl.dot`` is deprecated (June 2026) in favour of ``plgpu.dot``.
* jax 0.11 warns ``DeprecationWarning: The Pallas Triton backend is deprecated ...`` at every
  lowering, and ``jax.experimental.pallas.ops.gpu.paged_attention`` warns on import:
  :func:`silence_triton_deprecations` filters both (benchmarks call it).
* The Triton custom-call target: jaxlib <= 0.10.2 emits ``__gpu$xla.gpu.triton``; 0.11
  exports ``plgpu.CUSTOM_CALL_TARGET_NAME`` (same value today, ``triton_kernel_call_ffi``
  once jax flips ``USE_NEW_CUSTOM_CALL``). :data:`TRITON_CUSTOM_CALL_TARGETS` lists all.
* ``jax.nn.dot_product_attention(return_residual=True)`` casts cuDNN's float32 softmax
  statistics to the output dtype (bf16: about 0.05 of absolute error in a log-sum-exp);
  :func:`attention_with_lse` reads them from jax's cuDNN wrapper in float32.
* Interpret mode (the HLO interpreter used on CPU) has no rule for ``debug_barrier`` and
  none for masked loads/stores whose index mixes an index vector with slices (a gather);
  :func:`cta_barrier` and :func:`gather_load` emulate them there. The GPU path is the plain
  Triton primitive; ``tests/test_kernel_lowering.py`` lowers it for ``cuda``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(
    plgpu, "TritonCompilerParams"
)

dot = getattr(plgpu, "dot", None) or pl.dot

TRITON_CUSTOM_CALL_TARGETS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton"),
            "__gpu$xla.gpu.triton",
            "triton_kernel_call_ffi",
        )
    )
)


def compiler_params(*, num_warps: int, num_stages: int):
  """Triton compiler params under whichever name this jax has."""
  return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def resolve_interpret(interpret: bool | None) -> bool:
  """``None`` means: interpret when the default backend is the CPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def cta_barrier(interpret: bool) -> None:
  """``__syncthreads()`` on the GPU; a no-op in interpret mode, which runs sequentially."""
  if not interpret:
    plgpu.debug_barrier()


def gather_load(ref, idx, *, mask, other, interpret: bool):
  """``ref[idx]`` with ``other`` where ``mask`` is False (mask broadcastable to the result).

  On the GPU masked lanes issue no memory request. ``idx`` must be in bounds for every
  lane anyway (clamp it), because interpret mode reads all lanes and selects afterwards.
  """
  if interpret:
    value = ref[idx]
    return jnp.where(mask, value, jnp.asarray(other, value.dtype))
  shape = ref.at[idx].shape
  return plgpu.load(
      ref.at[idx], mask=jnp.broadcast_to(mask, shape), other=other
  )


def scatter_store(ref, idx, value, *, mask, interpret: bool) -> None:
  """``ref[idx] = value`` where ``mask`` (idx: an index vector on the leading axis, value
  ``[len(idx), *ref.shape[1:]]``, mask broadcastable to value).

  On the GPU masked lanes issue no memory request. Interpret mode has no rule for masked
  stores through an index vector: it rewrites the whole block with a dropping scatter
  (masked lanes aimed past the end), so masked lanes never touch memory there either.
  """
  if interpret:
    mask = jnp.broadcast_to(mask, value.shape)
    lead = mask.reshape(mask.shape[0], -1).all(axis=1)  # a lane is stored whole or not at all
    target = jnp.where(lead, idx, ref.shape[0])
    ref[...] = ref[...].at[target].set(value.astype(ref.dtype), mode="drop")
    return
  shape = ref.at[idx].shape
  plgpu.store(ref.at[idx], value, mask=jnp.broadcast_to(mask, shape))


def reload(ref, idx, *, interpret: bool):
  """``ref[idx]`` of values this program stored earlier in the same launch (after a
  :func:`cta_barrier`): a volatile load on the GPU, so that no non-coherent cache line
  written before the store can answer it."""
  if interpret:
    return ref[idx]
  return plgpu.load(ref.at[idx], volatile=True)


def slice_load(ref, idx, *, mask, other, interpret: bool):
  """``ref[idx]`` with ``other`` where ``mask`` is False (idx: slices / scalars only).
  Masked lanes may lie past the end of the array."""
  del interpret  # masked loads through slices have an interpret-mode rule
  return plgpu.load(ref.at[idx], mask=mask, other=other)


def store_slice(ref, idx, value, *, mask, interpret: bool) -> None:
  """``ref[idx] = value`` where ``mask`` (idx: slices / scalars only, no index vector).
  Masked lanes may lie past the end of the array."""
  del interpret  # masked stores through slices have an interpret-mode rule
  plgpu.store(ref.at[idx], value, mask=mask)


_DEPRECATION_MESSAGES = (
    r".*Pallas Triton backend is deprecated.*",
    r".*jax\.experimental\.pallas\.ops\.gpu\..* is deprecated.*",
    r".*Pallas Triton ops in .* are deprecated.*",
    r".*jax\.experimental\.pallas\.dot.*deprecated.*",
)


def silence_triton_deprecations() -> None:
  """Filters jax 0.11's Triton-backend deprecation warnings (benchmarks, scripts)."""
  for message in _DEPRECATION_MESSAGES:
    warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)


def import_jax_paged_attention():
  """JAX's own Pallas paged-attention op (deprecated in 0.11, still shipped)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

  return jax_paged.paged_attention


def attention_with_lse(q, k, v, *, scale: float, is_causal: bool, q_lens, kv_lens,
                       implementation: str | None):
  """Attention and its float32 log-sum-exps: q ``[B, T, N, H]``, k, v ``[B, S, K, H]``
  (GQA), q_lens / kv_lens ``int32[B]`` -> (out ``[B, T, N, H]``, lse ``float32[B, T, N]``).

  Rows without a valid key (padding query rows, a length of 0) have unspecified statistics and
  output: a huge negative number on XLA; on cuDNN (H100) finite values beside NaN. Callers mask
  such rows by their lengths.
  """
  if implementation == "cudnn":
    try:
      from jax._src.cudnn.fused_attention_stablehlo import MaskType
      from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    except ImportError:  # pragma: no cover (a jax without the wrapper): bf16-rounded statistics
      cudnn_attention = None
    if cudnn_attention is not None:
      out, lse = cudnn_attention(
          q, k, v, None, None, q_lens, kv_lens, scale=scale, return_residual=True,
          mask_type=MaskType.PADDING_CAUSAL if is_causal else MaskType.PADDING)
      return out, jnp.swapaxes(lse.astype(jnp.float32), 1, 2)  # cuDNN: [B, N, T]
  out, lse = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=is_causal, query_seq_lengths=q_lens,
      key_value_seq_lengths=kv_lens, implementation=implementation, return_residual=True)
  return out, lse.astype(jnp.float32)


def lower_as_text(fn, *args, platform: str = "cuda", **kwargs) -> str:
  """StableHLO text of ``jax.jit(fn)`` lowered for ``platform`` (works on a CPU-only jax:
  the Pallas Triton lowering runs in Python and needs no GPU)."""
  traced = jax.jit(fn).trace(*args, **kwargs)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def device_core_count(default: int = 132) -> int:
  """Number of SMs of the default device (132 on an H100 SXM); ``default`` on CPU."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return default
  if device.platform != "gpu":
    return default
  return int(getattr(device, "core_count", default) or default)


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` (jax >= 0.7) or the older experimental one, replication checks off.

  Our per-KV-head attention code mixes split and replicated values (e.g. kept-token counts
  that every shard computes identically), which the checker cannot always prove.
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as _shard_map  # pragma: no cover (old jax)
  return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
