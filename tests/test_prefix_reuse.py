"""Prefix reuse and stall-free scheduling in the engine: the same greedy tokens with and without
a cached prefix (dense and every algorithm), prompts prefilled in chunks between decode steps,
cancellation mid-prefill, and requests without max_tokens that grow and get preempted."""
import os
import tempfile

import numpy as np
import pytest

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.algorithms import dsa, indexer as indexer_lib
from sparse_jax.algorithms.hybrid import HybridSparseAttentionConfig
from sparse_jax.algorithms.oracle import OracleSparseAttentionConfig
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.algorithms.snapkv import SnapKVSparseAttentionConfig
from sparse_jax.algorithms.streaming import StreamingSparseAttentionConfig
from sparse_jax.config import registered_algorithms
from tests.model_fixtures import tiny_llama

PAGE = 8
INDEXER_WEIGHTS = os.path.join(tempfile.mkdtemp(prefix="reuse_indexer_"), "indexer.safetensors")

# Budgets below the 90-token prompts, so that the compressing algorithms compress.
CONFIGS = {
    "dense": None,
    "rocket": RocketSparseAttentionConfig(prompt_budget=48, window_size=8, kernel_size=5, topr=8, topk=6, page_size=4,
                                          kt_cache_dtype="float32"),
    "snapkv": SnapKVSparseAttentionConfig(max_capacity_prompt=48, window_size=8, kernel_size=5),
    "streaming": StreamingSparseAttentionConfig(sink_tokens=4, window=36, block_size=8),
    "quest": QuestSparseAttentionConfig(topk=6, page_size=4, minmax_dtype="float32", dense_layers=0),
    "hybrid": HybridSparseAttentionConfig(topk=6, page_size=4, sink_blocks=1, recent_blocks=1, minmax_dtype="float32"),
    "oracle": OracleSparseAttentionConfig(topk=5, block_size=6),
    "indexer": indexer_lib.IndexerSparseAttentionConfig(weights_path=INDEXER_WEIGHTS, topk=6, block_size=8,
                                                        index_heads=2, index_head_dim=8, rope_dim=4,
                                                        index_k_dtype="float32"),
    "dsa": dsa.DSASparseAttentionConfig(indexer_k_dtype="float32"),
}


def test_every_algorithm_is_covered():
  assert set(registered_algorithms()) <= set(CONFIGS)


def _model(name):
  if name == "dsa":
    from tests.test_dsa import tiny_deepseek
    return tiny_deepseek(1, num_hidden_layers=1, mlp_layer_types=("sparse",))
  if name == "indexer" and not os.path.exists(INDEXER_WEIGHTS):
    indexer_lib.save_indexers(INDEXER_WEIGHTS, indexer_lib.init_indexers(
        CONFIGS["indexer"], hidden_size=64, kv_heads=2, num_layers=2))
  return tiny_llama(4)


def _llm(name, **kw):
  kw.setdefault("kv_cache_config", KvCacheConfig(tokens_per_block=PAGE, enable_block_reuse=True))
  return LLM(_model(name), dtype="float32", sparse_attention_config=CONFIGS[name], max_batch_size=2,
             max_seq_len=160, decode_chunk_size=8, **kw)


def _ids(outs):
  return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reused_prefix_gives_the_same_tokens(name):
  """B shares a 72-token prefix (9 pages) with A. B alone on an empty cache, then B after A
  (its prefix read from A's pages, only the rest computed, at positions 72..): same tokens."""
  rng = np.random.default_rng(0)
  prefix = rng.integers(0, 97, size=72).tolist()
  a, b = (prefix + rng.integers(0, 97, size=18).tolist() for _ in range(2))
  params = SamplingParams(max_tokens=10, ignore_eos=True)
  llm = _llm(name)
  eng = llm.engine
  cold = _ids(llm.generate([b], params))
  assert eng.allocator.clear_cache() > 0 and eng.stats["prefix_cache_hits"] == 0
  llm.generate([a], params)
  computed = eng.stats["prefill_tokens"]
  outs = llm.generate([b], params)
  assert _ids(outs) == cold
  assert eng.stats["prefill_tokens"] - computed == 90 - 72, "only the tokens after the cached prefix are computed"
  hit = outs[0].metrics["cached_prompt_tokens"]
  assert hit == 72, "the shared full pages are reused"
  assert eng.stats["prefix_cache_hits"] == 72
  again = llm.generate([b], params)  # every page of B is cached now: all but its last page is reused
  assert _ids(again) == cold and again[0].metrics["cached_prompt_tokens"] == 88 - (8 if name in ("rocket", "snapkv") else 0)
  assert eng.allocator.used_pages == 0 and eng.allocator.cached_pages > 0
  assert int(eng.allocator._refs.sum()) == 0


def test_cancelled_prefill_stops_at_the_next_chunk_and_frees_its_pages():
  llm = LLM(tiny_llama(1), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=2,
            max_seq_len=320, max_num_tokens=32)
  eng = llm.engine
  req = eng.add_request(list(range(1, 97)) * 3, SamplingParams(max_tokens=4))
  eng.step()
  assert req._in_prefill and req._prefilled == 32 and eng.allocator.used_pages > 0
  eng.abort(req)
  eng.step()
  assert req.finish_reason == "abort" and not req.output_ids
  assert eng.stats["prefill_chunks"] == 1 and eng.stats["prefills_cancelled"] == 1
  assert eng.allocator.free_pages == eng.allocator.num_pages and not eng.has_unfinished()


def test_running_requests_decode_between_the_chunks_of_a_long_prompt():
  llm = LLM(tiny_llama(1), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=2,
            max_seq_len=320, max_num_tokens=32, decode_chunk_size=2)
  eng = llm.engine
  short = eng.add_request([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
  eng.step()
  assert len(short.output_ids) == 3  # the prefill's token and one decode chunk
  long = eng.add_request(list(range(1, 97)) * 2, SamplingParams(max_tokens=4, ignore_eos=True))
  produced = []
  while long._in_prefill or long.state.value == "waiting":
    before = len(short.output_ids)
    eng.step()
    produced.append(len(short.output_ids) - before)
  assert len(produced) == 6 and all(n == 2 for n in produced), produced
  eng.run_until_done()
  alone = llm.generate([list(range(1, 97)) * 2], SamplingParams(max_tokens=4, ignore_eos=True))
  assert long.output_ids == _ids(alone)[0]


def test_a_short_prompt_behind_a_long_one_gets_its_first_token_before_the_long_prefill_ends():
  llm = LLM(tiny_llama(1), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=2,
            max_seq_len=320, max_num_tokens=32, decode_chunk_size=2)
  eng = llm.engine
  long_prompt = list(range(1, 97)) * 2
  params = SamplingParams(max_tokens=4, ignore_eos=True)
  long = eng.add_request(long_prompt, params)
  short = eng.add_request([5, 6, 7], params)
  eng.step()
  assert short.output_ids and long._in_prefill, "the short prompt went whole in the first step"
  assert long._prefilled == 32 - 3, "the long prompt's chunk took what the short one left of the budget"
  eng.run_until_done()
  assert eng.stats["prefill_chunks"] == 7  # 29 tokens, then 32 per step: 192 tokens
  assert long.output_ids == _ids(llm.generate([long_prompt], params))[0]
  assert short.output_ids == _ids(llm.generate([[5, 6, 7]], params))[0]


def test_whole_prompts_always_leave_the_long_prefill_a_page():
  llm = LLM(tiny_llama(1), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=4,
            max_seq_len=320, max_num_tokens=32)
  eng = llm.engine
  params = SamplingParams(max_tokens=2, ignore_eos=True)
  long = eng.add_request(list(range(1, 97)), params)
  shorts = [eng.add_request(list(range(10, 22)), params) for _ in range(3)]  # 3 x 12 tokens: more than the budget
  eng.step()
  assert long._prefilled == PAGE, "two short prompts took all of the budget but one page"
  assert [bool(r.output_ids) for r in shorts] == [True, True, False]
  eng.run_until_done()
  assert all(len(r.output_ids) == 2 for r in [long] + shorts)


def test_requests_without_max_tokens_grow_and_are_preempted_when_the_pool_runs_out():
  """Two requests that generate until max_seq_len (64 tokens: 8 pages each) on a 12-page pool:
  the later one is preempted, resumes with its prompt plus what it generated, and both give the
  tokens they give alone."""
  kv = KvCacheConfig(tokens_per_block=PAGE, max_tokens=12 * PAGE, enable_block_reuse=True)
  llm = LLM(tiny_llama(2), dtype="float32", kv_cache_config=kv, max_batch_size=2, max_seq_len=64,
            decode_chunk_size=4)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 97, size=20).tolist() for _ in range(2)]
  params = SamplingParams(max_tokens=None, ignore_eos=True)
  eng = llm.engine
  req = eng.add_request(prompts[0], params)
  eng.step()
  assert len(eng.allocator.pages(req.slot)) == 4, "prompt + one decode chunk, not the whole 64-token context"
  eng.abort(req)
  eng.run_until_done()
  alone = [_ids(llm.generate([p], params))[0] for p in prompts]
  assert all(len(o) == 44 for o in alone)
  outs = llm.generate(prompts, params)
  assert _ids(outs) == alone
  assert llm.engine.stats["preemptions"] >= 1
  assert llm.engine.allocator.used_pages == 0


def test_the_benchmark_runs_under_smoke(tmp_path):
  import json
  import subprocess
  import sys
  out = tmp_path / "prefix_stalls.json"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "bench/bench_prefix_reuse_and_stalls.py", f"--out={out}"], cwd=root,
                        env={**os.environ, "SMOKE": "1", "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  reuse = {(r["config"], r["block_reuse"]): r for r in rows["ttft"]}
  assert set(reuse) == {("dense", False), ("dense", True), ("rocket", False), ("rocket", True)}
  for config in ("dense", "rocket"):
    assert reuse[(config, False)]["cached_tokens_second"] == 0
    assert reuse[(config, True)]["cached_tokens_second"] == 128  # the whole 8-page prefix
    assert reuse[(config, True)]["prefix_cache_hit_rate"] > 0
  assert [r["chunked"] for r in rows["stalls"]] == [False, True]
  assert all(r["tpot_samples"] > 0 for r in rows["stalls"])
  assert "TPOT p99 (ms)" in proc.stdout


@pytest.mark.parametrize("name", ["rocket", "snapkv"])
def test_a_pool_too_small_for_the_compacted_copy_compacts_in_place(name):
  """With block reuse a compressing prefill writes its kept tokens to pages of its own beside the
  dense (cacheable) prompt. A 90-token prompt holds 12 pages and its compacted copy 8 more; in a
  16-page pool it is compacted in place instead: it is admitted, finishes within a bounded number
  of steps and gives the tokens of a large pool without reuse."""
  prompt = np.random.default_rng(1).integers(0, 97, size=90).tolist()
  params = SamplingParams(max_tokens=10, ignore_eos=True)
  expected = _ids(_llm(name, kv_cache_config=KvCacheConfig(tokens_per_block=PAGE)).generate([prompt], params))
  llm = _llm(name, kv_cache_config=KvCacheConfig(tokens_per_block=PAGE, enable_block_reuse=True, max_tokens=16 * PAGE))
  eng = llm.engine
  assert eng.allocator.num_pages == 16
  req = eng.add_request(prompt, params)
  for _ in range(40):
    if req.finished:
      break
    eng.step()
  assert req.finished and req.finish_reason == "length", "the request waited for pages the pool cannot give"
  assert [req.output_ids] == expected
  assert eng.allocator.used_pages == 0
