"""Greedy outputs of every registered algorithm are pinned: the embedded default model (and, for
DSA, a seeded tiny DeepSeek-V3.2) generates a few tokens from fixed prompts, and the token ids must
equal the recorded ones. A refactor that changes what any algorithm keeps or attends to fails here.

Re-record (only for an intended behaviour change): GOLDEN_RECORD=1 python -m pytest tests/test_golden_outputs.py
"""
import json
import os

import pytest

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.config import registered_algorithms
from sparse_jax.defaults import DEFAULT_MODEL_DIR
from tests.engine_cases import CASES, DEFAULTS, MLA_CASES, NEW_TOKENS, PAGE, PROMPT_LEN, prompts

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "greedy_outputs.json")
RECORD = os.environ.get("GOLDEN_RECORD") == "1"


def test_every_algorithm_has_a_golden_case():
  covered = {(cfg.algorithm if cfg is not None else "dense") for cfg, _ in CASES.values()} | {
      cfg.algorithm for cfg in MLA_CASES.values()}
  missing = set(registered_algorithms()) - covered
  assert not missing, f"add a golden case for {sorted(missing)}"


def _generate(llm, vocab):
  outs = llm.generate(prompts(vocab), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
  _check_sparse_paths_ran(llm, outs)
  return [o.outputs[0].token_ids for o in outs]


def _check_sparse_paths_ran(llm, outs):
  """The budgets are below the context: every decode chunk predicts, compacting algorithms keep
  fewer tokens than the prompt, chunked prefill attends to a selection, eviction evicts."""
  cfg, stats = llm.sparse_attention_config, llm.engine.stats
  if cfg is None:
    return
  assert stats["sparse_decode_calls"] == stats["decode_calls"] > 0, dict(stats)
  if cfg.compacts_prompt:
    assert all(o.metrics["kept_prompt_tokens"] < n for o, n in zip(outs, PROMPT_LEN)), [o.metrics for o in outs]
  if stats["prefill_chunks"] > 0:
    assert stats["sparse_prefill_chunks"] > 0, dict(stats)
  if getattr(cfg, "decode_budget", None) is not None:
    assert stats["evicted_pages"] > 0, dict(stats)


def _check(name, got):
  with open(GOLDEN) as f:
    golden = json.load(f)
  if RECORD:
    golden[name] = got
    with open(GOLDEN, "w") as f:
      f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(golden.items())) + "\n}\n")
    return
  assert name in golden, f"no golden output recorded for {name}"
  assert got == golden[name], f"{name}: greedy outputs changed\n got {got}\nwant {golden[name]}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_outputs_unchanged(name):
  cfg, kwargs = CASES[name]
  llm = LLM(DEFAULT_MODEL_DIR, dtype="float32", backend="reference", max_batch_size=2, max_seq_len=512,
            sparse_attention_config=cfg, kv_cache_config=KvCacheConfig(tokens_per_block=PAGE),
            **{**DEFAULTS, **kwargs})
  _check(name, _generate(llm, llm.model.config.vocab_size))


@pytest.mark.parametrize("name", sorted(MLA_CASES))
def test_mla_greedy_outputs_unchanged(name):
  from tests.model_fixtures import tiny_deepseek
  model = tiny_deepseek(5)
  llm = LLM(model, dtype="float32", backend="reference", max_batch_size=2, max_seq_len=512,
            sparse_attention_config=MLA_CASES[name], kv_cache_config=KvCacheConfig(tokens_per_block=PAGE),
            **DEFAULTS)
  _check(name, _generate(llm, model.config.vocab_size))
