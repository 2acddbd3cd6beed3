"""Runs greedy generation at several tensor-parallel sizes in a process with 4 CPU devices.

Started by tests/test_tensor_parallel.py with XLA_FLAGS=--xla_force_host_platform_device_count=4
(the device count must be fixed before jax starts). Prints one JSON line.

  python tests/tp_worker.py KV_HEADS|mla dense|sparse SIZES [BACKEND]

BACKEND (optional): the engine's backend, e.g. "pallas" (Pallas kernels in interpret mode;
a smaller run: greedy tokens only, no compiled-step collectives); default: the platform's (the reference
path on the CPU).
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from tests.model_fixtures import tiny_llama


def build(kv_heads):
  if kv_heads == "mla":
    from tests.test_dsa import tiny_deepseek
    return tiny_deepseek(7, num_attention_heads=8)
  return tiny_llama(7, heads=8, kv_heads=kv_heads, head_dim=8, max_pos=512)


def run(kv_heads, sparse, sizes, backend=None):
  if kv_heads == "mla":
    from sparse_jax.algorithms.dsa import DSASparseAttentionConfig
    rk = DSASparseAttentionConfig(index_topk=16, indexer_k_dtype="float32") if sparse else None
  else:
    rk = RocketSparseAttentionConfig(prompt_budget=48, window_size=8, kernel_size=5, topr=1.0, topk=6, page_size=4,
                                     kt_cache_dtype="float32") if sparse else None
  rng = np.random.default_rng(0)
  # Interpret-mode kernels are slow to trace: a smaller run (still past DSA's index_topk=16).
  prompts = [rng.integers(0, 97, size=n).tolist() for n in ((37, 21) if backend else (90, 30, 61))]
  max_tokens = 8 if backend else 12
  outs, hlo = {}, {}
  for tp in sizes:
    model = build(kv_heads)
    llm = LLM(model, dtype="float32", sparse_attention_config=rk, kv_cache_config=KvCacheConfig(tokens_per_block=8),
              max_batch_size=4, max_seq_len=256, tensor_parallel_size=tp, decode_chunk_size=4,
              **(dict(backend=backend, interpret=True) if backend else {}))
    res = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    outs[tp] = [r.outputs[0].token_ids for r in res]
    eng = llm.engine
    pool = eng.cache.k[0]
    hlo[tp] = dict(pool_shards=len(pool.addressable_shards), pool_local_shape=list(pool.addressable_shards[0].data.shape))
    if tp > 1 and not backend:   # the collectives are the same whatever the backend
      text = eng.decode_fn.lower(eng.params, eng.cache, jnp.asarray(eng.allocator.table()),
                                  jnp.zeros(4, jnp.int32), jnp.ones(4, bool), jnp.ones(4, jnp.int32),
                                  jnp.ones(4, bool), eng.sampling_state(), eng.history, n_pages=8, num_steps=4).compile().as_text()
      gathers = [l for l in text.splitlines() if "all-gather" in l and "=" in l]
      hlo[tp].update(all_reduce=len(re.findall(r"= [^=]*all-reduce(-start)?\(", text)),
                     all_gather_lines=gathers[:5], layers=model.config.num_hidden_layers)
  return dict(outs=outs, hlo=hlo)


if __name__ == "__main__":
  kv_heads = sys.argv[1] if sys.argv[1] == "mla" else int(sys.argv[1])
  sparse = sys.argv[2] == "sparse"
  sizes = [int(s) for s in sys.argv[3].split(",")]
  backend = sys.argv[4] if len(sys.argv) > 4 else None   # e.g. "pallas" (kernels in interpret mode)
  print(json.dumps(dict(devices=jax.device_count(), **run(kv_heads, sparse, sizes, backend))))
