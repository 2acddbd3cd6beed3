"""Tensor parallelism on 4 simulated CPU devices: greedy outputs equal tp=1; the compiled step
all-reduces per block and never gathers the KV cache."""
import json
import os
import subprocess
import sys

import pytest

from sparse_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(kv_heads, mode, sizes, backend=None, devices=4):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  extra = [backend] if backend else []
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tp_worker.py"), str(kv_heads), mode, sizes,
                         *extra], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_greedy_equal_across_parallel_sizes(mode):
  res = _run(4, mode, "1,2,4")
  assert res["devices"] == 4
  outs, hlo = res["outs"], res["hlo"]
  assert outs["2"] == outs["1"] and outs["4"] == outs["1"]
  for tp in ("2", "4"):
    assert hlo[tp]["pool_shards"] == int(tp)
    assert hlo[tp]["pool_local_shape"][0] == 4 // int(tp), "KV cache must be split by KV head"
    # One all-reduce after attention and one after the MLP of every layer (a scanned decode
    # loop holds one copy of the step); nothing gathers the cache.
    assert hlo[tp]["all_reduce"] == 2 * hlo[tp]["layers"], hlo[tp]
    assert not hlo[tp]["all_gather_lines"], hlo[tp]["all_gather_lines"]


def test_mqa_replicates_the_cache():
  res = _run(1, "dense", "1,2")
  assert res["outs"]["2"] == res["outs"]["1"]
  assert res["hlo"]["2"]["pool_local_shape"][0] == 1


def test_heads_must_divide():
  from sparse_jax import LLM
  from tests.model_fixtures import tiny_llama
  with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
    LLM(tiny_llama(0), tensor_parallel_size=3)


def test_dsa_on_mla_replicates_the_latent_cache_and_splits_the_experts():
  res = _run("mla", "sparse", "1,2,4")
  outs, hlo = res["outs"], res["hlo"]
  assert outs["2"] == outs["1"] and outs["4"] == outs["1"]
  for tp in ("2", "4"):
    assert hlo[tp]["pool_local_shape"][0] == 1, "the latent cache has one head and is replicated"
    # Attention (and the indexer) run replicated: one all-reduce per MLP / MoE block only.
    assert hlo[tp]["all_reduce"] == hlo[tp]["layers"], hlo[tp]
    assert not hlo[tp]["all_gather_lines"], hlo[tp]["all_gather_lines"]


def test_dsa_pallas_kernels_under_tensor_parallelism():
  """DSA with backend="pallas" (kernels in interpret mode), float32 indexer cache, tp=2 vs tp=1.

  With a non-FP8 indexer cache the indexer kernel has no scale operand: any operand index the
  kernel names (an output alias, say) must follow the operand list, or the pallas_call is
  rejected ("input_output_aliases contains the mapping '6:1' with input index 6 outside the
  range [0, 6)")."""
  res = _run("mla", "sparse", "1,2", backend="pallas", devices=2)
  outs = res["outs"]
  assert res["devices"] == 2
  assert outs["2"] == outs["1"] and all(len(o) == 8 for o in outs["1"])
  assert res["hlo"]["2"]["pool_shards"] == 2 and res["hlo"]["2"]["pool_local_shape"][0] == 1


_PAGE_BYTES = r"""
import json, sys
sys.path.insert(0, ".")
import jax
from sparse_jax.engine import Engine
from sparse_jax.config import KvCacheConfig
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from tests.model_fixtures import tiny_llama
from tests.test_dsa import tiny_deepseek
rows = {}
rocket = RocketSparseAttentionConfig(prompt_budget=48, topk=6, topr=1.0, page_size=4)
for name, model, sparse in (("rocket", tiny_llama(7, heads=8, kv_heads=4, head_dim=8), rocket),
                            ("mla", tiny_deepseek(7, num_attention_heads=8), None)):
  eng = Engine(model, kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=8 * 16), max_batch_size=2,
               max_seq_len=64, sparse_attention_config=sparse, tensor_parallel_size=2)
  dev = jax.devices()[0]
  held = sum(s.data.nbytes for x in jax.tree_util.tree_leaves((eng.cache.k, eng.cache.v, eng.cache.aux))
             for s in x.addressable_shards if s.device == dev)
  rows[name] = dict(total=eng.page_bytes(eng.kv_dtype), per_device=eng.page_bytes(eng.kv_dtype, per_device=True),
                    held_per_page=held / eng.allocator.num_pages)
print(json.dumps(rows))
"""


def test_page_bytes_per_device_match_the_shards():
  """Pool sizing under tensor parallelism uses what one device holds of a page (the bench's 'max'
  batch and the engine's GPU default divide one device's free memory by it)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _PAGE_BYTES], capture_output=True, text=True, env=env, timeout=600,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  rocket, mla = rows["rocket"], rows["mla"]
  assert rocket["per_device"] == rocket["held_per_page"] == rocket["total"] // 2  # K, V and KT split by KV head
  assert mla["per_device"] == mla["held_per_page"] == mla["total"]  # the latent cache is replicated
