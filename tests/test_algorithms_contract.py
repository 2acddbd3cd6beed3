"""Contract of every registered GQA algorithm: selections sorted, unique, in range, -1 padded,
counts right, shapes fixed by configuration, for prompts shorter, equal and longer than the budget."""
import dataclasses
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_jax.attention import AttentionSpec, Runtime
from sparse_jax.cache import LayerCache, write_tokens, token_slots
from sparse_jax.algorithms.dsa import DSASparseAttentionConfig
from sparse_jax.config import KvCacheConfig, registered_algorithms
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.algorithms import indexer as indexer_lib
from sparse_jax.algorithms.hybrid import HybridSparseAttentionConfig
from sparse_jax.algorithms.oracle import OracleSparseAttentionConfig
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.algorithms.snapkv import SnapKVSparseAttentionConfig
from sparse_jax.algorithms.streaming import StreamingSparseAttentionConfig

Q_HEADS, KV_HEADS, D, PAGE, MAX_PAGES, T = 4, 2, 16, 8, 12, 96
HIDDEN = 24  # width of the hidden states given to learned predictors
INDEXER_WEIGHTS = os.path.join(tempfile.mkdtemp(prefix="contract_indexer_"), "indexer.safetensors")

# One small config per registered GQA algorithm; an algorithm without one fails test_every_algorithm_is_covered.
CONTRACT_CONFIGS = {
    "rocket": RocketSparseAttentionConfig(prompt_budget=40, window_size=8, kernel_size=5, topr=8, topk=6, page_size=4,
                                          kt_cache_dtype="float32"),
    "quest": QuestSparseAttentionConfig(topk=6, page_size=4, minmax_dtype="float32", dense_layers=0),
    "hybrid": HybridSparseAttentionConfig(topk=6, page_size=4, sink_blocks=1, recent_blocks=2, minmax_dtype="float32"),
    "snapkv": SnapKVSparseAttentionConfig(max_capacity_prompt=40, window_size=8, kernel_size=5),
    "streaming": StreamingSparseAttentionConfig(sink_tokens=4, window=36, block_size=8),
    "oracle": OracleSparseAttentionConfig(topk=5, block_size=6),
    "indexer": indexer_lib.IndexerSparseAttentionConfig(weights_path=INDEXER_WEIGHTS, topk=6, block_size=8,
                                                        index_heads=2, index_head_dim=8, rope_dim=4,
                                                        index_k_dtype="float32"),
}


def _write_indexer_weights():
  if not os.path.exists(INDEXER_WEIGHTS):
    indexer_lib.save_indexers(INDEXER_WEIGHTS, indexer_lib.init_indexers(
        CONTRACT_CONFIGS["indexer"], hidden_size=HIDDEN, kv_heads=KV_HEADS, num_layers=1))


# Algorithms with a learned predictor (Algorithm.build_predictor): writes the weights it loads.
PREDICTOR_SETUP = {"indexer": _write_indexer_weights}
MLA_ONLY = {"dsa"}
# Algorithms whose generation phase is dense (predict_attn returns None); every other one selects.
DENSE_GENERATION = {"snapkv"}


def test_every_algorithm_is_covered():
  missing = set(registered_algorithms()) - set(CONTRACT_CONFIGS) - MLA_ONLY
  assert not missing, f"add a contract config for {sorted(missing)}"
  assert DENSE_GENERATION <= set(CONTRACT_CONFIGS)


def _spec():
  return AttentionSpec(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=D, page_size=PAGE, scale=D ** -0.5,
                       runtime=Runtime())


@functools.lru_cache(maxsize=None)
def _predictor(name):
  """The learned predictor of an algorithm that has one (built as the engine does), else None."""
  algo = registered_algorithms()[name]
  if algo.build_predictor is None:
    return None
  PREDICTOR_SETUP[name]()
  return algo.build_predictor(CONTRACT_CONFIGS[name], _spec(), 0)


def predictor_kwargs(name, key, n, t):
  """predictor= and hidden= ([n, t, HIDDEN] random) for a learned predictor, else {}."""
  predictor = _predictor(name)
  return {} if predictor is None else dict(predictor=predictor, hidden=jax.random.normal(key, (n, t, HIDDEN)))


def filled_layer(cfg, key, lengths, page_table, num_pages=MAX_PAGES * 4):
  """A layer whose first `lengths` tokens hold random K/V (permuted pages) with aux computed."""
  algo = registered_algorithms()[cfg.algorithm]
  n = lengths.shape[0]
  aux = {name: jnp.zeros((s.heads, num_pages, *s.entry_shape), s.dtype)
         for name, s in algo.aux_spec(cfg, _spec()).items()}
  layer = LayerCache(k=jnp.zeros((KV_HEADS, num_pages, PAGE, D)), v=jnp.zeros((KV_HEADS, num_pages, PAGE, D)), aux=aux)
  kk, kv = jax.random.split(key)
  t = MAX_PAGES * PAGE
  pos = jnp.broadcast_to(jnp.arange(t), (n, t))
  slots = token_slots(page_table, pos, pos < lengths[:, None], PAGE, num_pages).reshape(-1)
  layer = layer.replace(k=write_tokens(layer.k, slots, jax.random.normal(kk, (n * t, KV_HEADS, D))),
                        v=write_tokens(layer.v, slots, jax.random.normal(kv, (n * t, KV_HEADS, D))))
  extra = predictor_kwargs(cfg.algorithm, jax.random.fold_in(key, 2), n, t)
  return algo.update_aux(cfg, _spec(), layer, page_table, jnp.zeros_like(lengths), lengths, t, **extra)


def permuted_table(rng, n, num_pages=MAX_PAGES * 4):
  return jnp.asarray(rng.permutation(num_pages)[: n * MAX_PAGES].reshape(n, MAX_PAGES).astype(np.int32))


def check_sorted_unique_padded(idx, count, upper, what):
  valid = idx[idx >= 0]
  assert np.all(idx[len(valid):] == -1), f"{what}: -1 padding must come last: {idx}"
  assert len(valid) == count, f"{what}: {len(valid)} entries, expected {count}"
  assert np.all(np.diff(valid) > 0), f"{what}: not strictly ascending: {valid}"
  assert np.all((valid >= 0) & (valid < upper)), f"{what}: out of range [0, {upper}): {valid}"


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_predict_kv_contract(name, data):
  cfg = CONTRACT_CONFIGS[name]
  algo = registered_algorithms()[name]
  budget = algo.kept_prompt_tokens(cfg, T)
  lengths = np.array(data.draw(st.lists(st.sampled_from(
      [1, 5, budget - 1, budget, budget + 1, T - 1, T] if budget < T else [1, T]) | st.integers(1, T),
      min_size=3, max_size=3)), np.int32)
  seed = data.draw(st.integers(0, 2 ** 16))
  q = jax.random.normal(jax.random.PRNGKey(seed), (3, T, Q_HEADS, D))
  k = jax.random.normal(jax.random.PRNGKey(seed + 1), (3, T, KV_HEADS, D))
  sel = _predict_kv(name, q, k, jnp.asarray(lengths), **predictor_kwargs(name, jax.random.PRNGKey(seed + 2), 3, T))
  if not cfg.compacts_prompt:
    assert sel is None, f"{name} compresses no prompt, but predict_kv returned a selection"
    assert all(algo.kept_prompt_tokens(cfg, int(n)) == n for n in lengths), "nothing compacted: every token kept"
    return
  # Prompts of T > budget tokens are compressible: a compacting algorithm must select.
  assert budget < T and sel is not None, f"{name}: no KeepSelection for {T}-token prompts"
  idx, counts = np.asarray(sel.indices), np.asarray(sel.counts)
  assert idx.shape == (3, KV_HEADS, budget) and counts.shape == (3,)
  for i, length in enumerate(lengths):
    assert counts[i] == min(length, budget) == algo.kept_prompt_tokens(cfg, int(length)), "kept_prompt_tokens"
    for h in range(KV_HEADS):
      check_sorted_unique_padded(idx[i, h], counts[i], length, f"{name} row {i} head {h}")
      window = algo.min_final_chunk(cfg)
      if length > budget and window:
        assert set(range(length - window, length)) <= set(idx[i, h].tolist()), "the query window must be kept"


@functools.lru_cache(maxsize=None)
def _jitted(name, fn):
  cfg = CONTRACT_CONFIGS[name]
  algo = registered_algorithms()[name]
  return jax.jit(functools.partial(getattr(algo, fn), cfg, _spec()))


def _predict_kv(name, q, k, lengths, **extra):
  return _jitted(name, "predict_kv")(q, k, lengths, **extra)


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_predict_attn_contract(name, data):
  cfg = CONTRACT_CONFIGS[name]
  rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
  lengths = jnp.asarray(data.draw(st.lists(st.integers(1, MAX_PAGES * PAGE), min_size=2, max_size=2)), jnp.int32)
  table = permuted_table(rng, 2)
  layer = _filled(name, jax.random.PRNGKey(int(rng.integers(1 << 30))), lengths, table)
  q = jax.random.normal(jax.random.PRNGKey(int(rng.integers(1 << 30))), (2, Q_HEADS, D))
  extra = predictor_kwargs(name, jax.random.PRNGKey(int(rng.integers(1 << 30))), 2, 1)
  sel = _jitted(name, "predict_attn")(q, layer, table, lengths, **extra)
  if name in DENSE_GENERATION:
    assert sel is None, f"{name} declares dense generation, but predict_attn returned a selection"
    return
  assert sel is not None, f"{name}: predict_attn returned None"
  idx = np.asarray(sel.indices)
  bs = sel.block_size
  assert idx.shape[:2] == (2, KV_HEADS)
  for i, length in enumerate(np.asarray(lengths)):
    n_blocks = -(-int(length) // bs)
    for h in range(KV_HEADS):
      check_sorted_unique_padded(idx[i, h], min(idx.shape[-1], n_blocks), n_blocks, f"{name} row {i} head {h}")
      assert n_blocks - 1 in idx[i, h], "the newest block must always be attended"


@functools.lru_cache(maxsize=None)
def _fill_fn(name):
  return jax.jit(functools.partial(filled_layer, CONTRACT_CONFIGS[name]))


def _filled(name, key, lengths, table):
  _predictor(name)  # built outside the trace: a predictor first built inside jit would cache tracers
  return _fill_fn(name)(key, lengths, table)


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
def test_shapes_do_not_depend_on_data(name):
  """Compiled once, run on prompts shorter than, equal to and longer than the budget: one
  compilation, and the same output shapes every time (a shape that followed the values would
  need a new program or fail to trace)."""
  cfg = CONTRACT_CONFIGS[name]
  algo = registered_algorithms()[name]
  predict_kv = jax.jit(functools.partial(algo.predict_kv, cfg, _spec()))
  predict_attn = jax.jit(functools.partial(algo.predict_attn, cfg, _spec()))
  budget = getattr(cfg, "prompt_budget", T // 2)
  rng = np.random.default_rng(0)
  table = permuted_table(rng, 2)
  shapes = set()
  for i, lengths in enumerate(([1, 1, 1], [T, T, T], [budget, budget + 1, 3])):
    key = jax.random.PRNGKey(i)
    q, k = jax.random.normal(key, (3, T, Q_HEADS, D)), jax.random.normal(key, (3, T, KV_HEADS, D))
    keep = predict_kv(q, k, jnp.asarray(lengths, jnp.int32), **predictor_kwargs(name, key, 3, T))
    attn_lengths = jnp.asarray(lengths[:2], jnp.int32)
    layer = _filled(name, key, attn_lengths, table)
    sel = predict_attn(q[:2, 0], layer, table, attn_lengths, **predictor_kwargs(name, key, 2, 1))
    shapes.add(tuple(None if s is None else tuple(a.shape for a in jax.tree_util.tree_leaves(s)) for s in (keep, sel)))
  assert len(shapes) == 1, shapes
  assert predict_kv._cache_size() == 1 and predict_attn._cache_size() == 1, "recompiled for new values"


BUDGET_CONFIGS = {**CONTRACT_CONFIGS, "dsa": DSASparseAttentionConfig(index_topk=64)}


def test_every_algorithm_has_a_budget_case():
  assert set(registered_algorithms()) <= set(BUDGET_CONFIGS)


@pytest.mark.parametrize("name", sorted(BUDGET_CONFIGS))
@pytest.mark.parametrize("budget", [16, 40, 100, 4096])
def test_budget_scaling_keeps_a_valid_config(name, budget):
  cfg = BUDGET_CONFIGS[name]
  algo = registered_algorithms()[name]
  if algo.with_budget is None:
    return
  scaled = algo.with_budget(cfg, budget)
  assert type(scaled) is type(cfg)
  scaled.validate_with(KvCacheConfig(tokens_per_block=PAGE), False)
  assert dataclasses.replace(scaled) == scaled, "the scaled config must pass its own validation"
  kept = algo.kept_prompt_tokens(scaled, 10 * budget)
  assert kept == 10 * budget or kept <= budget, f"{name} keeps {kept} prompt tokens at budget {budget}"
  assert algo.with_budget(scaled, budget) == scaled, "scaling twice to the same budget changes nothing more"


def test_min_final_chunk_fits_the_kept_prompt():
  for name, cfg in CONTRACT_CONFIGS.items():
    algo = registered_algorithms()[name]
    assert 0 <= algo.min_final_chunk(cfg) <= algo.kept_prompt_tokens(cfg, T), name
