"""quest, snapkv, streaming, oracle, indexer: full budget equals dense (model and LLM), YAML,
validation, independent references for the scores, recall against the oracle."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.algorithms import indexer as indexer_lib
from sparse_jax.algorithms import quest, snapkv, streaming
from sparse_jax.algorithms.indexer import IndexerSparseAttentionConfig
from sparse_jax.algorithms.oracle import (OracleSparseAttentionConfig, oracle_block_scores, oracle_blocks,
                                          selection_recall)
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.algorithms.snapkv import SnapKVSparseAttentionConfig
from sparse_jax.algorithms.streaming import StreamingSparseAttentionConfig
from sparse_jax.attention import AttentionSpec, Runtime
from sparse_jax.cache import LayerCache, PageAllocator, create_cache_for, token_slots, write_tokens
from sparse_jax.config import (ConfigError, config_to_dict, get_algorithm, load_llm_api_options,
                               sparse_config_from_dict)
from sparse_jax.engine import length_bucket
from sparse_jax.selection import AttnSelection
from tests.model_fixtures import tiny_llama
from tests.model_loops import prefill_then_decode

NAMES = ("quest", "snapkv", "streaming", "oracle", "indexer")
PAGE = 8
LENS, STEPS, T_PAD = (37, 90, 61), 5, 96


def full_budget(name, weights_path=None):
  """A config of `name` whose budget covers every prompt and step of the tests below (prompts
  <= 90 tokens + 5 steps): compacting algorithms still run their compaction (identity)."""
  return {
      "quest": QuestSparseAttentionConfig(topk=64, page_size=4, minmax_dtype="float32", dense_layers=0),
      "snapkv": SnapKVSparseAttentionConfig(max_capacity_prompt=91, window_size=8, kernel_size=5),
      "streaming": StreamingSparseAttentionConfig(sink_tokens=4, window=86, block_size=8),
      "oracle": OracleSparseAttentionConfig(topk=64, block_size=6),
      "indexer": IndexerSparseAttentionConfig(weights_path=weights_path or "unused", topk=64, block_size=8,
                                              index_heads=2, index_head_dim=8, rope_dim=4, index_k_dtype="float32"),
  }[name]


@pytest.fixture(scope="module")
def indexer_weights(tmp_path_factory):
  """Random indexers for tiny_llama (hidden 64, 2 KV heads, 2 layers)."""
  path = str(tmp_path_factory.mktemp("indexer") / "indexer.safetensors")
  indexer_lib.save_indexers(path, indexer_lib.init_indexers(full_budget("indexer"), hidden_size=64, kv_heads=2,
                                                            num_layers=2, seed=3))
  return path


def _config(name, indexer_weights):
  return full_budget(name, indexer_weights if name == "indexer" else None)


def attach_predictors(model, cfg, page_size):
  """What Engine._attach_predictors does, for driving model.prefill/decode directly."""
  algo = get_algorithm(cfg)
  for i, attn in enumerate(model.attention_layers()):
    attn.predictor = None if algo.build_predictor is None else algo.build_predictor(
        cfg, attn.spec(page_size, Runtime(sparse=cfg)), i)


def run_model(model, runtime, seqs):
  """Prefill LENS prompts (permuted pages) then STEPS decode steps; logits [1 + STEPS, 3, vocab]."""
  alloc = PageAllocator(96, PAGE, 3, 24)
  alloc._free = [int(p) for p in np.random.default_rng(0).permutation(96)]  # non-contiguous pages
  cache = create_cache_for(model.cache_layout(runtime.sparse, PAGE), num_pages=96, page_size=PAGE, batch_slots=3,
                           max_pages_per_seq=24, dtype=jnp.float32)
  return prefill_then_decode(model, runtime, alloc, cache, seqs, LENS, STEPS, T_PAD)


@pytest.fixture(scope="module")
def dense_run():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 97, size=length + STEPS).tolist() for length in LENS]
  logits, _ = run_model(tiny_llama(2), Runtime(), seqs)
  return seqs, logits


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_equals_dense_for_several_steps(name, dense_run, indexer_weights):
  seqs, dense = dense_run
  cfg = _config(name, indexer_weights)
  model = tiny_llama(2)
  attach_predictors(model, cfg, PAGE)
  sparse, cache = run_model(model, Runtime(sparse=cfg), seqs)
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(LENS) + STEPS)


@pytest.fixture(scope="module")
def dense_generation():
  rng = np.random.default_rng(7)
  prompts = [rng.integers(0, 97, size=n).tolist() for n in (41, 47)]  # one prefill bucket: one compilation
  llm = LLM(tiny_llama(4), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=2,
            max_seq_len=128, decode_chunk_size=4)
  return prompts, [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=10,
                                                                                        ignore_eos=True))]


@pytest.mark.parametrize("name", NAMES)
def test_llm_end_to_end_at_full_budget_matches_dense(name, dense_generation, indexer_weights):
  """Budgets that cover every sequence, with every prediction running: decode predicts in every
  chunk (Quest's dense_below switched off) and selects everything; SnapKV's budget (47) covers
  the 41- and 47-token prompts but not their padded 48-token prefill, so predict_kv runs and
  keeps every token (identity compaction); its generation is dense (predict_attn is None)."""
  prompts, expected = dense_generation
  cfg = (SnapKVSparseAttentionConfig(max_capacity_prompt=47, window_size=8, kernel_size=5) if name == "snapkv" else
         _config(name, indexer_weights))
  if name == "snapkv":  # the budget covers the prompts, not the padded prefill that predict_kv sees
    assert max(map(len, prompts)) <= cfg.max_capacity_prompt < length_bucket(max(map(len, prompts)))
  llm = LLM(tiny_llama(4), dtype="float32", sparse_attention_config=cfg,
            kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=2, max_seq_len=128,
            decode_chunk_size=4)
  llm.engine._dense_below = None
  outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
  assert [o.outputs[0].token_ids for o in outs] == expected
  assert llm.engine.allocator.free_pages == llm.engine.allocator.num_pages, "pages leaked"
  stats = llm.engine.stats
  assert stats["sparse_decode_calls"] == stats["decode_calls"] > 0
  assert [o.metrics["kept_prompt_tokens"] for o in outs] == [len(p) for p in prompts]


def test_quest_chunked_prefill_at_full_budget_matches_dense(dense_generation):
  """Quest declares chunked prefill: chunks of 16 tokens attend to the stored context's top
  Quest pages (prefill_budget covers everything here), then every decode step runs Quest's
  prediction (dense_below switched off), which selects every page."""
  prompts, expected = dense_generation
  cfg = QuestSparseAttentionConfig(topk=64, page_size=4, minmax_dtype="float32", prefill_budget=256, dense_layers=0)
  llm = LLM(tiny_llama(4), dtype="float32", sparse_attention_config=cfg, enable_chunked_prefill=True,
            max_num_tokens=16, kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=2,
            max_seq_len=128, decode_chunk_size=4)
  llm.engine._dense_below = None
  outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
  assert [o.outputs[0].token_ids for o in outs] == expected
  stats = llm.engine.stats
  assert stats["prefill_chunks"] == 6 and stats["sparse_prefill_chunks"] == 0
  assert stats["sparse_decode_calls"] == stats["decode_calls"] > 0


@pytest.mark.parametrize("name, budget", [("snapkv", 40), ("streaming", 40)])
def test_llm_compacts_long_prompts_to_the_budget(name, budget):
  cfg = (SnapKVSparseAttentionConfig(max_capacity_prompt=budget, window_size=8) if name == "snapkv" else
         StreamingSparseAttentionConfig(sink_tokens=4, window=budget - 4, block_size=8))
  llm = LLM(tiny_llama(5), dtype="float32", sparse_attention_config=cfg,
            kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), max_batch_size=1, max_seq_len=256,
            decode_chunk_size=4)
  prompt = np.random.default_rng(3).integers(0, 97, size=100).tolist()
  out = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))[0]
  assert out.metrics["kept_prompt_tokens"] == budget
  assert out.metrics["pages_after_prefill"] == math.ceil((budget + 24) / PAGE)
  assert len(out.outputs[0].token_ids) == 24


# -- YAML and validation ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_yaml_round_trip(name, tmp_path):
  opts = load_llm_api_options(configs.path(name))
  cfg = opts.sparse_attention_config
  assert cfg.algorithm == name
  assert sparse_config_from_dict(config_to_dict(cfg)) == cfg
  assert opts.kv_cache_config.enable_block_reuse is (not cfg.compacts_prompt)
  import yaml
  path = tmp_path / "again.yaml"
  path.write_text(yaml.safe_dump({"sparse_attention_config": config_to_dict(cfg),
                                  "kv_cache_config": dataclasses.asdict(opts.kv_cache_config)}))
  assert load_llm_api_options(str(path)).sparse_attention_config == cfg
  path.write_text(f"sparse_attention_config:\n  algorithm: {name}\n  topkk: 3\n")
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['topkk'\]"):
    load_llm_api_options(str(path))


@pytest.mark.parametrize("cls, kwargs, match", [
    (QuestSparseAttentionConfig, dict(page_size=6), "page_size=6: must be a power of two"),
    (QuestSparseAttentionConfig, dict(topk=0), "topk=0: must be a positive integer"),
    (QuestSparseAttentionConfig, dict(minmax_dtype="fp8"), "minmax_dtype='fp8'"),
    (SnapKVSparseAttentionConfig, dict(window_size=2048), "window_size=2048: must be < max_capacity_prompt=2048"),
    (SnapKVSparseAttentionConfig, dict(kernel_size=4), "kernel_size=4: must be odd"),
    (SnapKVSparseAttentionConfig, dict(pooling="sum"), "pooling='sum'"),
    (SnapKVSparseAttentionConfig, dict(max_capacity_prompt=-3), "max_capacity_prompt=-3"),
    (StreamingSparseAttentionConfig, dict(sink_tokens=-1), "sink_tokens=-1: must be an integer >= 0"),
    (StreamingSparseAttentionConfig, dict(window=0), "window=0: must be a positive integer"),
    (StreamingSparseAttentionConfig, dict(block_size=2.5), "block_size=2.5"),
    (OracleSparseAttentionConfig, dict(topk=0), "topk=0"),
    (OracleSparseAttentionConfig, dict(block_size=-2), "block_size=-2"),
    (IndexerSparseAttentionConfig, dict(), "weights_path=None: must name the safetensors file"),
    (IndexerSparseAttentionConfig, dict(weights_path="w", rope_dim=3), "rope_dim=3: must be an even integer"),
    (IndexerSparseAttentionConfig, dict(weights_path="w", rope_dim=128), "rope_dim=128"),
    (IndexerSparseAttentionConfig, dict(weights_path="w", index_k_dtype="int8"), "index_k_dtype='int8'"),
    (IndexerSparseAttentionConfig, dict(weights_path="w", index_heads=0), "index_heads=0"),
])
def test_config_validation_names_field_and_value(cls, kwargs, match):
  with pytest.raises(ConfigError, match=match):
    cls(**kwargs)


def test_geometry_and_compatibility_errors():
  with pytest.raises(ConfigError, match=r"QuestSparseAttentionConfig.page_size=64 must divide the KV cache page size "
                                        r"\(kv_cache_config.tokens_per_block=32\)"):
    LLM(tiny_llama(0), sparse_attention_config=QuestSparseAttentionConfig(page_size=64))
  for cfg in (SnapKVSparseAttentionConfig(), StreamingSparseAttentionConfig(), QuestSparseAttentionConfig(),
              OracleSparseAttentionConfig(), IndexerSparseAttentionConfig(weights_path="w")):
    cfg.validate_with(KvCacheConfig(enable_block_reuse=True), False)  # compaction writes into own pages
  QuestSparseAttentionConfig().validate_with(KvCacheConfig(), True)
  with pytest.raises(ConfigError, match="does not support enable_chunked_prefill"):
    SnapKVSparseAttentionConfig().validate_with(KvCacheConfig(), True)


def test_indexer_weights_errors(tmp_path, indexer_weights):
  spec = AttentionSpec(q_heads=4, kv_heads=2, head_dim=16, page_size=PAGE, scale=0.25)
  build = get_algorithm("indexer").build_predictor
  cfg = full_budget("indexer", indexer_weights)
  ix = build(cfg, spec, 1)
  assert ix.hidden_size == 64 and ix.wq[...].shape == (64, 2, 2, 8)
  with pytest.raises(ConfigError, match="file not found; train the indexers with `python -m sparse_jax.distill"):
    build(dataclasses.replace(cfg, weights_path=str(tmp_path / "nope.safetensors")), spec, 0)
  with pytest.raises(ConfigError, match="no indexer for attention layer 2"):
    build(cfg, spec, 2)
  with pytest.raises(ConfigError, match=r"layer 0 is mis-shaped for this model and config: got \{'wq': \(64, 2, 2, 8\)"):
    build(dataclasses.replace(cfg, index_heads=4), spec, 0)
  with pytest.raises(ConfigError, match=r"mis-shaped"):
    build(cfg, dataclasses.replace(spec, kv_heads=1), 0)
  with pytest.raises(ConfigError, match="rope_dim=2 but .* was trained with rope_dim=4"):
    build(dataclasses.replace(cfg, rope_dim=2), spec, 0)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(ConfigError, match="not a readable safetensors file"):
    build(dataclasses.replace(cfg, weights_path=str(bad)), spec, 0)
  with pytest.raises(ValueError, match="expects hidden states of width 64, got 32"):
    ix.keys(jnp.zeros((1, 3, 32)))


# -- scores against independent references ---------------------------------------------------

KV_HEADS, Q_HEADS, D = 2, 8, 16


def random_layer(key, lengths, page_size, max_pages, num_pages, aux=None):
  """Random keys/values for the first `lengths` tokens on a permuted page table."""
  n = lengths.shape[0]
  table = jnp.asarray(np.random.default_rng(1).permutation(num_pages)[:n * max_pages].reshape(n, max_pages)
                      .astype(np.int32))
  t = max_pages * page_size
  pos = jnp.broadcast_to(jnp.arange(t), (n, t))
  slots = token_slots(table, pos, pos < lengths[:, None], page_size, num_pages).reshape(-1)
  kk, kv = jax.random.split(key)
  keys = jax.random.normal(kk, (n, t, KV_HEADS, D))
  zeros = jnp.zeros((KV_HEADS, num_pages, page_size, D))
  layer = LayerCache(k=write_tokens(zeros, slots, keys.reshape(n * t, KV_HEADS, D)),
                     v=write_tokens(zeros, slots, jax.random.normal(kv, (n * t, KV_HEADS, D))), aux=aux or {})
  return layer, table, np.asarray(keys)


def test_oracle_scores_match_bruteforce_and_recall_of_itself_is_one():
  lengths = jnp.asarray([70, 13, 96], jnp.int32)
  layer, table, keys = random_layer(jax.random.PRNGKey(0), lengths, PAGE, 12, 40)
  q = jax.random.normal(jax.random.PRNGKey(1), (3, Q_HEADS, D))
  scale = D ** -0.5
  scores = np.asarray(oracle_block_scores(q, layer, table, lengths, 6, scale))
  g, q_np = Q_HEADS // KV_HEADS, np.asarray(q)
  for b, length in enumerate(np.asarray(lengths)):
    for h in range(KV_HEADS):
      logits = q_np[b, h * g:(h + 1) * g] @ keys[b, :length, h].T * scale  # [G, length]
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p = (p / p.sum(-1, keepdims=True)).mean(0)
      expected = np.array([p[i:i + 6].sum() for i in range(0, length, 6)])
      np.testing.assert_allclose(scores[b, h, :len(expected)], expected, atol=1e-6)
      assert np.all(scores[b, h, len(expected):] == 0)
  sel = oracle_blocks(q, layer, table, lengths, 6, 5, scale)
  np.testing.assert_array_equal(np.asarray(selection_recall(sel, sel)), 1.0)
  for b, length in enumerate(np.asarray(lengths)):  # the top blocks (besides the newest) are the heaviest
    n_blocks = -(-int(length) // 6)
    for h in range(KV_HEADS):
      chosen = set(np.asarray(sel.indices[b, h]).tolist()) - {-1, n_blocks - 1}
      rest = sorted(set(range(n_blocks - 1)) - chosen)
      if rest and chosen:
        assert min(scores[b, h, list(chosen)]) >= max(scores[b, h, rest]) - 1e-7


def test_selection_recall_counts_shared_blocks():
  a = AttnSelection(indices=jnp.asarray([[[0, 3, 5, -1], [1, 2, -1, -1]]], jnp.int32), block_size=4)
  b = AttnSelection(indices=jnp.asarray([[[3, 4, 5, 7], [-1, -1, -1, -1]]], jnp.int32), block_size=4)
  np.testing.assert_allclose(np.asarray(selection_recall(a, b)), [[0.5, 1.0]])
  np.testing.assert_allclose(np.asarray(selection_recall(b, a)), [[2 / 3, 0.0]])
  with pytest.raises(ValueError, match="block sizes must match: selected.block_size=4, oracle.block_size=8"):
    selection_recall(a, AttnSelection(indices=b.indices, block_size=8))


def test_quest_bound_is_an_upper_bound_per_head():
  lengths = jnp.asarray([77, 96], jnp.int32)
  cfg = QuestSparseAttentionConfig(page_size=4, minmax_dtype="float32")
  spec = AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=D, page_size=PAGE, scale=D ** -0.5)
  aux = {"kt": jnp.zeros((KV_HEADS, 40, PAGE // 4, 2, D))}
  layer, table, keys = random_layer(jax.random.PRNGKey(2), lengths, PAGE, 12, 40, aux)
  layer = quest.update_aux(cfg, spec, layer, table, jnp.zeros(2, jnp.int32), lengths, 96)
  q = jax.random.normal(jax.random.PRNGKey(3), (2, Q_HEADS, D))
  bound = np.asarray(quest.upper_bounds(q, layer.aux["kt"], table))  # [B, Hkv, G, blocks]
  g, q_np = Q_HEADS // KV_HEADS, np.asarray(q)
  for b, length in enumerate(np.asarray(lengths)):
    for h in range(KV_HEADS):
      qh = q_np[b, h * g:(h + 1) * g]
      dots = qh @ keys[b, :length, h].T  # [G, length]
      for n in range(-(-int(length) // 4)):
        assert np.all(bound[b, h, :, n] >= dots[:, 4 * n:4 * n + 4].max(-1) - 1e-4)
        # The bound is sum_c max(q_c * max_c, q_c * min_c) over the page's (valid) keys.
        page_keys = keys[b, 4 * n:min(4 * n + 4, length), h]
        kmin, kmax = page_keys.min(0), page_keys.max(0)
        np.testing.assert_allclose(bound[b, h, :, n], np.maximum(qh * kmax, qh * kmin).sum(-1), atol=1e-4)


def test_snapkv_scores_match_the_reference_algorithm():
  """SnapKV's reference: softmax over the whole prompt for the window queries, avg_pool1d
  (count_include_pad) over the prefix part, top-k + window; here in numpy."""
  cfg = SnapKVSparseAttentionConfig(max_capacity_prompt=24, window_size=6, kernel_size=5)
  n, t = 2, 48
  lengths = np.array([48, 33], np.int32)
  q = jax.random.normal(jax.random.PRNGKey(4), (n, t, Q_HEADS, D))
  k = jax.random.normal(jax.random.PRNGKey(5), (n, t, KV_HEADS, D))
  spec = AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=D, page_size=PAGE, scale=D ** -0.5)
  sel = snapkv.predict_kv(cfg, spec, q, k, jnp.asarray(lengths))
  g, w = Q_HEADS // KV_HEADS, cfg.window_size
  q_np, k_np = np.asarray(q), np.asarray(k)
  for b, length in enumerate(lengths):
    for h in range(KV_HEADS):
      qw = q_np[b, length - w:length, h * g:(h + 1) * g]  # [W, G, D]
      logits = np.einsum("wgd,td->gwt", qw, k_np[b, :length, h]) * spec.scale
      causal = np.arange(length)[None, :] <= np.arange(length - w, length)[:, None]
      logits = np.where(causal[None], logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      prefix = p[..., :length - w].sum((0, 1))
      padded = np.pad(prefix, 2)
      pooled = np.array([padded[i:i + 5].sum() / 5 for i in range(length - w)])
      top = np.sort(np.argsort(-pooled, kind="stable")[:cfg.max_capacity_prompt - w])
      expected = np.concatenate([top, np.arange(length - w, length)])
      np.testing.assert_array_equal(np.asarray(sel.indices[b, h]), expected)
  assert np.asarray(sel.counts).tolist() == [24, 24]


def test_streaming_keeps_sinks_and_window_and_attends_bounded_blocks():
  cfg = StreamingSparseAttentionConfig(sink_tokens=4, window=20, block_size=8)
  spec = AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=D, page_size=16, scale=0.25)
  lengths = jnp.asarray([60, 24, 10], jnp.int32)
  q = jnp.zeros((3, 64, Q_HEADS, D))
  sel = streaming.predict_kv(cfg, spec, q, jnp.zeros((3, 64, KV_HEADS, D)), lengths)
  idx = np.asarray(sel.indices)
  np.testing.assert_array_equal(idx[0, 0], [0, 1, 2, 3] + list(range(40, 60)))
  np.testing.assert_array_equal(idx[1, 1], list(range(24)))
  np.testing.assert_array_equal(idx[2, 0], list(range(10)) + [-1] * 14)
  assert np.asarray(sel.counts).tolist() == [24, 24, 10]
  # Generation: 1 sink block + ceil(19 / 8) + 1 = 4 recent blocks, whatever the length.
  table = jnp.arange(3 * 64, dtype=jnp.int32).reshape(3, 64)
  att = streaming.predict_attn(cfg, spec, q[:, 0], None, table, jnp.asarray([1000, 40, 37], jnp.int32))
  np.testing.assert_array_equal(np.asarray(att.indices)[:, 0], [[0, 121, 122, 123, 124], [0, 1, 2, 3, 4],
                                                                [0, 1, 2, 3, 4]])
  assert att.indices.shape == (3, KV_HEADS, 5)
  length = 1000  # the attended blocks cover the sinks and the newest `window` tokens
  covered = {t for b in np.asarray(att.indices)[0, 0] for t in range(8 * b, 8 * b + 8)}
  assert set(range(4)) | set(range(length - 20, length)) <= covered
  scores = np.asarray(streaming.page_scores(cfg, spec, q[:, 0], None, table, jnp.asarray([1000, 40, 37])))
  np.testing.assert_array_equal(np.nonzero(scores[0])[0], [0, 61, 62])
  np.testing.assert_array_equal(np.nonzero(scores[1])[0], [0, 1, 2])


# -- recall against the oracle on planted data -----------------------------------------------------

@pytest.mark.parametrize("name", ["quest", "rocket"])
def test_recall_against_oracle_on_planted_keys(name):
  """A few keys per KV head aligned with its query group dominate the attention; the oracle's
  top blocks are theirs (+ the newest), and quest / rocket find them."""
  d, page, length, planted_n = 32, 16, 2048, 4
  cfg = (QuestSparseAttentionConfig(topk=planted_n + 1, page_size=4, minmax_dtype="bfloat16") if name == "quest" else
         RocketSparseAttentionConfig(prompt_budget=4096, topr=16, topk=planted_n + 1, page_size=4,
                                     kt_cache_dtype="float8_e5m2"))
  algo = get_algorithm(cfg)
  spec = AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=d, page_size=page, scale=d ** -0.5,
                       runtime=Runtime(sparse=cfg))
  num_pages = length // page
  table = jnp.asarray(np.random.default_rng(0).permutation(num_pages)[None].astype(np.int32))
  aux_specs = algo.aux_spec(cfg, spec)

  @jax.jit
  def trial(key):
    kq, kk, kp = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, Q_HEADS, d))
    keys = jax.random.normal(kk, (KV_HEADS, length, d))
    planted = jax.random.choice(kp, length - 64, (KV_HEADS, planted_n), replace=False)
    group_q = q[0].reshape(KV_HEADS, -1, d).mean(1)
    unit = group_q / jnp.linalg.norm(group_q, axis=-1, keepdims=True)
    keys = keys.at[jnp.arange(KV_HEADS)[:, None], planted].set(3.0 * math.sqrt(d) * unit[:, None, :])
    pool = jnp.zeros((KV_HEADS, num_pages, page, d)).at[:, table[0]].set(keys.reshape(KV_HEADS, num_pages, page, d))
    aux = {n: jnp.zeros((s.heads, num_pages, *s.entry_shape), s.dtype) for n, s in aux_specs.items()}
    layer = LayerCache(k=pool, v=pool, aux=aux)
    lengths = jnp.asarray([length])
    layer = algo.update_aux(cfg, spec, layer, table, jnp.zeros(1, jnp.int32), lengths, length)
    oracle = oracle_blocks(q, layer, table, lengths, 4, planted_n + 1, spec.scale)
    return selection_recall(algo.predict_attn(cfg, spec, q, layer, table, lengths), oracle).mean()

  recall = np.mean([float(trial(jax.random.PRNGKey(s))) for s in range(20)])
  assert recall >= 0.95, recall


@pytest.mark.parametrize("name", ["quest", "snapkv", "streaming", "oracle"])
def test_page_scores_for_eviction(name):
  """float32[batch, max_pages], >= 0, nothing on pages past the stored tokens; the attention
  mass of snapkv / oracle pages is the true one (max over KV heads)."""
  cfg = dict(quest=QuestSparseAttentionConfig(page_size=4, minmax_dtype="float32"),
             snapkv=SnapKVSparseAttentionConfig(), streaming=StreamingSparseAttentionConfig(sink_tokens=4, window=20),
             oracle=OracleSparseAttentionConfig())[name]
  algo = get_algorithm(cfg)
  spec = AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=D, page_size=PAGE, scale=D ** -0.5)
  lengths = jnp.asarray([70, 13], jnp.int32)
  aux = {n: jnp.zeros((s.heads, 40, *s.entry_shape), s.dtype) for n, s in algo.aux_spec(cfg, spec).items()}
  layer, table, keys = random_layer(jax.random.PRNGKey(6), lengths, PAGE, 12, 40, aux)
  layer = algo.update_aux(cfg, spec, layer, table, jnp.zeros(2, jnp.int32), lengths, 96)
  q = jax.random.normal(jax.random.PRNGKey(7), (2, Q_HEADS, D))
  scores = np.asarray(algo.page_scores(cfg, spec, q, layer, table, lengths))
  assert scores.shape == (2, 12) and scores.dtype == np.float32
  assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
  for b, length in enumerate(np.asarray(lengths)):
    stored = -(-int(length) // PAGE)
    assert np.all(scores[b, stored:] == 0) and scores[b, :stored].max() > 0
    if name in ("snapkv", "oracle"):
      g = Q_HEADS // KV_HEADS
      mass = []
      for h in range(KV_HEADS):
        logits = np.asarray(q)[b, h * g:(h + 1) * g] @ keys[b, :length, h].T * spec.scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        mass.append([p[i:i + PAGE].sum() for i in range(0, length, PAGE)])
      np.testing.assert_allclose(scores[b, :stored], np.max(mass, axis=0), atol=1e-6)
