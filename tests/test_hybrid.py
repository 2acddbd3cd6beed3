"""Hybrid selection (`algorithm: hybrid`): sinks and the recent window are always attended, the rest
by Quest's content bound; YAML, validation, eviction order and the full budget equal to dense.
(The selection against its formula and the decode output are in tests/test_sparse_reference.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from sparse_jax.algorithms import hybrid, quest
from sparse_jax.algorithms.hybrid import HybridSparseAttentionConfig
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.attention import AttentionSpec, Runtime
from sparse_jax.cache import LayerCache
from sparse_jax.config import ConfigError, load_llm_api_options
from sparse_jax import LLM, KvCacheConfig, SamplingParams
from tests.test_algorithms_beyond import (attach_predictors, dense_generation, dense_run,  # noqa: F401 (fixtures)
                                         run_model)
from tests.test_algorithms_contract import filled_layer, permuted_table
from tests.model_fixtures import tiny_llama

Q_HEADS, KV_HEADS, D, PAGE = 4, 2, 16, 8
SPEC = AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=D, page_size=PAGE, scale=D ** -0.5,
                     runtime=Runtime())


def test_sinks_and_recent_blocks_are_attended_even_when_content_ranks_them_last():
  """Keys of the sink and recent blocks anti-aligned with the query: Quest drops them, hybrid keeps them."""
  protected_cfg = HybridSparseAttentionConfig(topk=5, page_size=4, sink_blocks=2, recent_blocks=2,
                                              minmax_dtype="float32")
  quest_cfg = QuestSparseAttentionConfig(topk=5, page_size=4, minmax_dtype="float32")
  length, block = 96, 4
  n_blocks = length // block
  q = jnp.ones((1, Q_HEADS, D))
  table = permuted_table(np.random.default_rng(0), 1)
  lengths = jnp.asarray([length], jnp.int32)
  layer = filled_layer(quest_cfg, jax.random.PRNGKey(1), lengths, table)
  # Make the first two and the last two blocks' keys strongly negative along q, the rest mildly positive.
  token = np.arange(table.shape[1] * PAGE)
  sign = np.where((token < 2 * block) | (token >= length - 2 * block), -5.0, 0.5)
  pages = np.asarray(table[0])
  k = np.asarray(layer.k).copy()
  for t in range(length):
    k[:, pages[t // PAGE], t % PAGE, :] = sign[t]
  layer = LayerCache(k=jnp.asarray(k), v=layer.v, aux={"kt": jnp.zeros_like(layer.aux["kt"])})
  layer = hybrid.update_aux(protected_cfg, SPEC, layer, table, jnp.zeros_like(lengths), lengths, length)
  picked = {name: set(np.asarray(fn(cfg, SPEC, q, layer, table, lengths).indices)[0, 0].tolist()) - {-1}
            for name, fn, cfg in (("quest", quest.predict_attn, quest_cfg),
                                  ("hybrid", hybrid.predict_attn, protected_cfg))}
  protected = {0, 1, n_blocks - 2, n_blocks - 1}
  assert not ({0, 1, n_blocks - 2} & picked["quest"])  # content alone drops them
  assert protected <= picked["hybrid"] and len(picked["hybrid"]) == 5
  # Chunked prefill ranks the stored context by the same scores.
  chunk, block_size = hybrid.chunk_scores(protected_cfg, SPEC, q[:, None], layer, table, lengths)
  assert block_size == 4
  np.testing.assert_allclose(np.asarray(chunk), np.asarray(hybrid.block_scores(protected_cfg, SPEC, q, layer, table,
                                                                               lengths)))
  # Eviction: protected pages score above every other page.
  scores = np.asarray(hybrid.page_scores(protected_cfg, SPEC, q, layer, table, lengths))[0]
  sink_page, recent_page = int(pages[0]), int(pages[(length - 1) // PAGE])
  assert sink_page != recent_page
  others = [i for i in range(len(pages)) if i not in (0, (length - 1) // PAGE) and i * PAGE < length]
  assert min(scores[0], scores[(length - 1) // PAGE]) > max(scores[others])


def test_full_budget_equals_dense(dense_run):  # noqa: F811
  seqs, dense = dense_run
  cfg = HybridSparseAttentionConfig(topk=64, page_size=4, sink_blocks=1, recent_blocks=2, minmax_dtype="float32")
  model = tiny_llama(2)
  attach_predictors(model, cfg, 8)
  logits, _ = run_model(model, Runtime(sparse=cfg), seqs)
  np.testing.assert_allclose(logits, dense, atol=1e-5, rtol=0)


def test_yaml_and_validation():
  cfg = load_llm_api_options(configs.path("hybrid")).sparse_attention_config
  assert isinstance(cfg, HybridSparseAttentionConfig)
  assert (cfg.topk, cfg.page_size, cfg.sink_blocks, cfg.recent_blocks) == (128, 16, 1, 2)
  for kwargs, match in (({"sink_blocks": -1}, "sink_blocks=-1"), ({"recent_blocks": 0}, "recent_blocks=0"),
                        ({"topk": 2, "sink_blocks": 1, "recent_blocks": 2}, "must be at most topk=2"),
                        ({"page_size": 12}, "page_size=12"), ({"minmax_dtype": "int8"}, "minmax_dtype")):
    with pytest.raises(ConfigError, match=match):
      HybridSparseAttentionConfig(**kwargs)
  with pytest.raises(ConfigError, match="HybridSparseAttentionConfig.page_size=64 must divide"):
    hybrid.aux_spec(HybridSparseAttentionConfig(page_size=64), SPEC)


def test_chunked_prefill_at_full_budget_matches_dense(dense_generation):  # noqa: F811
  prompts, expected = dense_generation
  cfg = HybridSparseAttentionConfig(topk=64, page_size=4, minmax_dtype="float32", prefill_budget=256)
  llm = LLM(tiny_llama(4), dtype="float32", sparse_attention_config=cfg, enable_chunked_prefill=True,
            max_num_tokens=16, kv_cache_config=KvCacheConfig(tokens_per_block=8), max_batch_size=2,
            max_seq_len=128, decode_chunk_size=4)
  llm.engine._dense_below = None  # decode runs the prediction, which selects every page
  outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
  assert [o.outputs[0].token_ids for o in outs] == expected
  stats = llm.engine.stats
  assert stats["prefill_chunks"] == 6 and stats["sparse_decode_calls"] == stats["decode_calls"] > 0
