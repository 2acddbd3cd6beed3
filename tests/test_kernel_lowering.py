"""No silent fallback: the public ``backend="pallas"`` functions lower to a Triton kernel.

Lowering for ``cuda`` needs no GPU: the Pallas -> Triton-IR lowering runs in Python (only
the Triton -> PTX compile happens later, on the GPU), so this also catches primitives the
Triton backend cannot lower, on a CPU-only jax. Shapes are the benchmark shapes, as
abstract ``ShapeDtypeStruct``s (nothing is allocated).
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _compat
from pallas_kernels import named_shapes as ns
from pallas_kernels.compaction import compact_pages
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.rocket_decode import rocket_decode_attention
from pallas_kernels.rocket_score import rocket_block_scores
from tests.kernel_platform import lower_for_cuda

_sds = jax.ShapeDtypeStruct


def _decode_args(name):
  s = ns.DECODE_SHAPES[name]
  dtype = jnp.dtype(s.dtype)
  num_units = (s.batch * s.context + 4 * s.page_size) // s.unit_size
  max_units = -(-s.context // s.unit_size) if s.selected is None else s.selected // s.unit_size
  pool = _sds((s.kv_heads, num_units, s.unit_size, s.head_dim), dtype)
  return (_sds((s.batch, s.q_heads, s.head_dim), dtype), pool, pool,
          _sds((s.batch, s.kv_heads, max_units), jnp.int32),
          _sds((s.batch, s.kv_heads), jnp.int32)), {}


def _compaction_args(name, method):
  s = ns.COMPACTION_SHAPES[name]
  pages_per_row = -(-s.prompt // s.page_size)
  num_pages = s.batch_slots * pages_per_row
  base = (s.kv_heads, num_pages, s.page_size)
  pools = (_sds(base + (s.head_dim,), jnp.dtype(s.dtype)),
           _sds(base + (s.head_dim,), jnp.dtype(s.dtype)),
           _sds(base + (2,), jnp.float32))  # a per-token aux pool: its own kernel group
  return (pools, _sds((s.batch_slots, pages_per_row), jnp.int32),
          _sds((s.compacted,), jnp.int32),
          _sds((s.compacted, s.kv_heads, s.budget), jnp.int32),
          _sds((s.compacted,), jnp.int32)), dict(method=method)


def _rocket_args(name):
  s = ns.ROCKET_SHAPES[name]
  bpp = s.page_size // s.block_size
  num_pages = s.batch * (-(-s.tokens // s.page_size))
  return (_sds((s.batch, s.q_heads, s.head_dim), jnp.bfloat16),
          _sds((s.kv_heads, num_pages, bpp, 2, s.head_dim), jnp.dtype(s.kt_dtype)),
          _sds((s.batch, s.max_pages), jnp.int32),
          _sds((s.batch,), jnp.int32)), dict(topr=s.topr, block_size=s.block_size)


def _rocket_decode_args(name):
  (q, kt, page_table, lengths), kwargs = _rocket_args(name)
  s = ns.ROCKET_SHAPES[name]
  pool = _sds(kt.shape[:2] + (s.page_size, s.head_dim), q.dtype)
  return (q, pool, pool, kt, page_table, lengths), dict(kwargs, topk=64)


CASES = {
    "decode_sel2k": (paged_decode_attention,
                     _decode_args("bench_b8_h32_kv8_d128_ctx32k_sel2k"),
                     ["paged_decode_attention"]),
    "decode_dense": (paged_decode_attention,
                     _decode_args("bench_b8_h32_kv8_d128_ctx32k_dense"),
                     ["paged_decode_attention"]),
    "decode_f32_g1": (paged_decode_attention, _decode_args("test_g1_d64_u4_f32"),
                      ["paged_decode_attention"]),
    "compaction_inplace": (compact_pages,
                           _compaction_args("bench_b8_kv8_d128_p32k_keep2k", "inplace"),
                           ["compact_pages_inplace"]),
    "compaction_two_pass": (compact_pages,
                            _compaction_args("bench_b8_kv8_d128_p32k_keep2k", "two_pass"),
                            ["compact_pages_gather", "compact_pages_scatter"]),
    "rocket_fp8": (rocket_block_scores,
                   _rocket_args("bench_b8_h32_kv8_d128_keep2k_fp8"),
                   ["rocket_block_scores", "rocket_softmax_mean"]),
    "rocket_decode_fp8": (rocket_decode_attention,
                          _rocket_decode_args("bench_b8_h32_kv8_d128_keep2k_fp8"),
                          ["rocket_block_scores", "rocket_select_attend"]),
    "rocket_bf16": (rocket_block_scores,
                    _rocket_args("bench_b8_h32_kv8_d128_keep2k_bf16"),
                    ["rocket_block_scores", "rocket_softmax_mean"]),
}


def _lower_for_cuda(fn, args, kwargs):
  return lower_for_cuda(functools.partial(fn, **kwargs), *args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jaxpr_contains_pallas_call(case):
  fn, (args, kwargs), _ = CASES[case]
  jaxpr = jax.make_jaxpr(functools.partial(fn, interpret=False, **kwargs))(*args)
  assert "pallas_call" in str(jaxpr)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowers_to_triton_kernel_for_cuda(case):
  fn, (args, kwargs), kernel_names = CASES[case]
  text = _lower_for_cuda(fn, args, dict(kwargs, interpret=False))
  targets = [t for t in _compat.TRITON_CUSTOM_CALL_TARGETS if t in text]
  assert targets, "no Triton custom call in the lowered module"
  for name in kernel_names:
    assert f'name = "{name}"' in text, f"kernel {name} missing from the lowered module"


def test_compaction_kernel_aliases_the_pools():
  fn, (args, kwargs), _ = CASES["compaction_inplace"]
  text = _lower_for_cuda(fn, args, dict(kwargs, interpret=False))
  calls = [line for line in text.splitlines()
           if any(t in line for t in _compat.TRITON_CUSTOM_CALL_TARGETS)]
  assert len(calls) == 2  # K+V group, aux group
  assert all("output_operand_alias" in line for line in calls)


@pytest.mark.parametrize("case", ["decode_sel2k", "compaction_inplace", "rocket_fp8"])
def test_reference_backend_has_no_kernel(case):
  fn, (args, kwargs), _ = CASES[case]
  jaxpr = jax.make_jaxpr(functools.partial(fn, backend="reference", **kwargs))(*args)
  assert "pallas_call" not in str(jaxpr)


def test_rocket_decode_step_is_two_kernels_with_nothing_between():
  """The fused RocketKV step: the scoring launch (which also picks the top-r channels), then
  one launch that selects, sorts and attends. Before the first launch only the block count
  ceil(lengths / block_size) and reshapes; between them only reshapes; no top-k, sort,
  reduction, gather or scatter anywhere (no lax.top_k, selection sort, to_units or split
  combine as XLA ops)."""
  fn, (args, kwargs), _ = CASES["rocket_decode_fp8"]
  text = _lower_for_cuda(fn, args, dict(kwargs, interpret=False))
  ops = [line.split("=", 1)[-1].split()[0].split("(")[0] for line in text.splitlines()
         if "stablehlo." in line or "chlo." in line]
  calls = [i for i, op in enumerate(ops) if op == "stablehlo.custom_call"]
  assert len(calls) == 2, ops
  assert set(ops[:calls[0]]) <= {"stablehlo.constant", "stablehlo.broadcast_in_dim", "stablehlo.add",
                                 "stablehlo.divide", "stablehlo.reshape"}, ops[:calls[0] + 1]
  assert set(ops[calls[0] + 1:calls[1]]) <= {"stablehlo.reshape"}, ops[calls[0]:calls[1] + 1]
  for op in ("chlo.top_k", "stablehlo.sort", "stablehlo.reduce", "stablehlo.gather", "stablehlo.scatter"):
    assert op not in ops, f"{op} in the fused step"
