"""Tensor parallelism on 4 simulated CPU devices: greedy outputs equal tp=1; the compiled step
all-reduces per block and never gathers the KV cache."""
import json
import os
import subprocess
import sys

import pytest

from sparse_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(kv_heads, mode, sizes):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tp_worker.py"), str(kv_heads), mode, sizes],
                        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
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
