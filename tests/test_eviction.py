"""Block-level eviction during generation: memory stays bounded; the first and newest pages and
other sequences' pages are never touched; with a budget that is never reached nothing changes."""
import math

import numpy as np
import pytest

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.config import ConfigError
from tests.model_fixtures import tiny_llama

PAGE = 16


def _rocket(**kw):
  return RocketSparseAttentionConfig(prompt_budget=64, window_size=8, kernel_size=5, topr=1.0, topk=8, page_size=4,
                                     kt_cache_dtype="float32", **kw)


def _llm(sparse, slots=2):
  return LLM(tiny_llama(11, max_pos=4096), dtype="float32", sparse_attention_config=sparse,
             kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=slots, max_seq_len=2048,
             decode_chunk_size=8)


def test_unreached_budget_changes_nothing():
  prompt = list(np.random.default_rng(0).integers(0, 97, size=100))
  prompt = [int(t) for t in prompt]
  p = SamplingParams(max_tokens=40, ignore_eos=True)
  plain = _llm(_rocket()).generate([prompt], p)[0].outputs[0].token_ids
  with_budget = _llm(_rocket(decode_budget=1024))
  assert with_budget.generate([prompt], p)[0].outputs[0].token_ids == plain
  assert with_budget.engine.stats["evicted_pages"] == 0


def test_long_generation_stays_bounded_and_spares_protected_pages():
  budget = 96
  llm = _llm(_rocket(decode_budget=budget))
  eng = llm.engine
  chosen = []
  original = eng.allocator.recycle_pages

  def spy(slot, pages):
    length = int(eng._slot_len[slot])
    chosen.append((slot, length, sorted(pages), eng.allocator.pages(slot)))
    return original(slot, pages)

  eng.allocator.recycle_pages = spy
  rng = np.random.default_rng(1)
  long_prompt = [int(t) for t in rng.integers(0, 97, size=150)]
  short_prompt = [int(t) for t in rng.integers(0, 97, size=20)]
  max_tokens = 400
  held = []
  r_long = eng.add_request(long_prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
  r_short = eng.add_request(short_prompt, SamplingParams(max_tokens=30, ignore_eos=True))
  while eng.has_unfinished():
    eng.step()
    if not r_long.finished:
      held.append(len(eng.allocator.pages(r_long.slot)))
      assert eng._slot_len[r_long.slot] <= budget + eng.decode_chunk_size
  assert len(r_long.output_ids) == max_tokens
  assert eng.stats["evicted_pages"] > 0
  reserve = math.ceil((max(64, budget) + eng.decode_chunk_size + PAGE) / PAGE)
  assert max(held) <= reserve, (max(held), reserve)
  assert eng.peak_pages < math.ceil((150 + max_tokens) / PAGE) + math.ceil((20 + 30) / PAGE)
  for slot, length, pages, row in chosen:
    newest = (length - 1) // PAGE
    assert 0 not in pages and newest not in pages and all(p < newest for p in pages)
    assert slot == r_long.slot, "only the sequence over budget may lose pages"
  # The short sequence never exceeded the budget: its tokens equal a run on its own.
  alone = _llm(_rocket(decode_budget=budget)).generate([short_prompt], SamplingParams(max_tokens=30, ignore_eos=True))
  assert r_short.output_ids == alone[0].outputs[0].token_ids
  assert eng.allocator.free_pages == eng.allocator.num_pages


def test_budget_needs_page_scores_and_room():
  with pytest.raises(ConfigError, match="decode_budget=20: must hold at least 3 KV pages"):
    _llm(_rocket(decode_budget=20))
