"""`dense_layers`: layers below it attend densely (no selection), the others run the algorithm's
selection, for every GQA algorithm; YAML and validation."""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from sparse_jax import LLM, KvCacheConfig
from sparse_jax.algorithms import indexer as indexer_lib
from sparse_jax.algorithms.dsa import DSASparseAttentionConfig
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.attention import Runtime
from sparse_jax.cache import PageAllocator, create_cache_for
from sparse_jax.config import ConfigError, _REGISTRY, get_algorithm, load_llm_api_options, registered_algorithms
from tests.model_fixtures import tiny_llama
from tests.test_algorithms_beyond import attach_predictors
from tests.test_algorithms_contract import CONTRACT_CONFIGS, PREDICTOR_SETUP

LAYERS, PAGE, PROMPT = 3, 8, 60


def _tiny_indexer_config(cfg, tmp_path):
  """The contract's indexer config with weights for tiny_llama (hidden 64, 2 KV heads, 3 layers)."""
  path = str(tmp_path / "indexer.safetensors")
  indexer_lib.save_indexers(path, indexer_lib.init_indexers(cfg, hidden_size=64, kv_heads=2, num_layers=LAYERS))
  return dataclasses.replace(cfg, weights_path=path)


def _record_selecting_layers(monkeypatch, name):
  """Wraps the algorithm's selection hooks (decode and chunked prefill) so that each call records
  the K pool it selected from; returns that list."""
  algo = get_algorithm(name)
  seen = []

  def recording(fn):
    if fn is None:
      return None

    def wrapped(cfg, spec, q, layer, *args, **kwargs):
      seen.append(layer.k)
      return fn(cfg, spec, q, layer, *args, **kwargs)
    return wrapped

  monkeypatch.setitem(_REGISTRY, name, dataclasses.replace(
      algo, predict_attn=recording(algo.predict_attn), decode_attention=recording(algo.decode_attention),
      chunk_scores=recording(algo.chunk_scores)))
  return seen


def _new_cache(model, cfg, tokens):
  alloc = PageAllocator(32, PAGE, 1, 16)
  alloc.ensure(0, tokens + 1)
  cache = create_cache_for(model.cache_layout(cfg, PAGE), num_pages=32, page_size=PAGE, batch_slots=1,
                           max_pages_per_seq=16, dtype=jnp.float32)
  return cache.replace(page_table=jnp.asarray(alloc.table()))


def _selecting_layers(cfg, seen, run):
  """Traces `run(model, runtime, cache) -> cache` on a 3-layer tiny Llama (jax.eval_shape: nothing
  is computed) and returns the indices of the layers whose K pool, as given or as returned, a
  selection hook received (chunk scores read the pool before the chunk is written)."""
  model = tiny_llama(1, layers=LAYERS)
  attach_predictors(model, cfg, PAGE)
  layers = set()

  def traced(cache):
    out = run(model, Runtime(sparse=cfg), cache)
    layers.update(i for i in range(LAYERS) if any(k is cache.k[i] or k is out.k[i] for k in seen))
    return out.lengths

  jax.eval_shape(traced, _new_cache(model, cfg, 64))
  return layers


def _prefill_and_decode(model, runtime, cache):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (1, PROMPT)), jnp.int32)
  _, cache = model.prefill(tokens, jnp.asarray([PROMPT]), jnp.arange(1), cache, runtime)
  _, cache = model.decode(jnp.asarray([5], jnp.int32), cache, jnp.ones(1, bool), runtime)
  return cache


def _two_chunks(model, runtime, cache):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (1, 64)), jnp.int32)
  _, cache = model.prefill(tokens[:, :32], jnp.asarray([32]), jnp.arange(1), cache, runtime, jnp.asarray([0]),
                           final=False)
  _, cache = model.prefill(tokens[:, 32:], jnp.asarray([32]), jnp.arange(1), cache, runtime, jnp.asarray([32]))
  return cache


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
@pytest.mark.parametrize("dense_layers", [0, 2])
def test_layers_below_dense_layers_do_not_select(monkeypatch, tmp_path, name, dense_layers):
  cfg = CONTRACT_CONFIGS[name]
  if name in PREDICTOR_SETUP:
    cfg = _tiny_indexer_config(cfg, tmp_path)
  cfg = dataclasses.replace(cfg, dense_layers=dense_layers)
  seen = _record_selecting_layers(monkeypatch, name)
  assert _selecting_layers(cfg, seen, _prefill_and_decode) == set(range(dense_layers, LAYERS))


def test_dense_layers_dense_in_chunked_prefill(monkeypatch):
  """A chunk of a dense layer attends to its whole stored context: no chunk scores there."""
  cfg = QuestSparseAttentionConfig(topk=2, page_size=4, minmax_dtype="float32", prefill_budget=16, dense_layers=1)
  seen = _record_selecting_layers(monkeypatch, "quest")
  assert _selecting_layers(cfg, seen, _two_chunks) == set(range(1, LAYERS))
  assert len(seen) == 2 * (LAYERS - 1)  # both chunks of each sparse layer scored their context


def test_dense_layers_from_yaml_and_validation():
  opts = load_llm_api_options({"sparse_attention_config": {"algorithm": "quest", "topk": 8, "dense_layers": 2}})
  assert opts.sparse_attention_config.dense_layers == 2
  assert Runtime(sparse=opts.sparse_attention_config).for_layer(1).predict is False
  assert Runtime(sparse=opts.sparse_attention_config).for_layer(2).predict is True
  for bad in (-1, True, "2", 1.5):
    with pytest.raises(ConfigError, match="dense_layers"):
      load_llm_api_options({"sparse_attention_config": {"algorithm": "quest", "dense_layers": bad}})
  with pytest.raises(ConfigError, match="dense_layers"):
    DSASparseAttentionConfig(dense_layers=1)


def _llm(model, cfg):
  return LLM(model, dtype="float32", max_batch_size=1, max_seq_len=64,
             kv_cache_config=KvCacheConfig(tokens_per_block=PAGE), sparse_attention_config=cfg)


@pytest.mark.parametrize("dense_layers", [2, 3])
def test_dense_layers_covering_the_model_is_refused(dense_layers):
  """dense_layers >= num_layers would run every layer densely under a sparse algorithm's name and
  budget: the engine refuses it, naming the field, the value and num_layers; one layer fewer runs."""
  with pytest.raises(ConfigError, match=rf"QuestSparseAttentionConfig.dense_layers={dense_layers}: the model has "
                                        r"num_layers=2, so no layer would be sparse .* at most 1"):
    _llm(tiny_llama(0), QuestSparseAttentionConfig(topk=2, page_size=4, dense_layers=dense_layers))
  _llm(tiny_llama(0), QuestSparseAttentionConfig(topk=2, page_size=4, dense_layers=1))


def test_quest_default_needs_three_layers():
  """Quest's paper default (2 dense layers) on a 2-layer model is refused, not run densely; on
  3 layers the last one selects."""
  with pytest.raises(ConfigError, match=r"dense_layers=2: the model has num_layers=2.*the quest default is 2"):
    _llm(tiny_llama(0), QuestSparseAttentionConfig(topk=2, page_size=4))
  llm = _llm(tiny_llama(0, layers=3), QuestSparseAttentionConfig(topk=2, page_size=4))
  assert llm.engine.layout.num_layers == 3


# The paper's (or, for this project's own algorithms, the chosen) number of dense first layers,
# as each algorithm's module docstring and shipped YAML state it.
DOCUMENTED_DENSE_LAYERS = {"quest": 2, "rocket": 0, "snapkv": 0, "streaming": 0, "oracle": 0, "indexer": 0,
                           "hybrid": 0, "dsa": 0}


def test_each_algorithm_default_is_its_documented_value():
  assert set(DOCUMENTED_DENSE_LAYERS) == set(registered_algorithms())
  for name, algo in registered_algorithms().items():
    n = DOCUMENTED_DENSE_LAYERS[name]
    assert algo.config_cls.__dataclass_fields__["dense_layers"].default == n, name
    doc = " ".join(sys.modules[algo.config_cls.__module__].__doc__.split())
    assert f"dense_layers={n}" in doc, name
  for f in sorted(os.listdir(configs.CONFIG_DIR)):
    if f.endswith(".yaml"):
      sparse = load_llm_api_options(os.path.join(configs.CONFIG_DIR, f)).sparse_attention_config
      with open(os.path.join(configs.CONFIG_DIR, f)) as fh:
        assert f"dense_layers: {sparse.dense_layers} " in fh.read(), f  # stated, with its source, not implied
      assert sparse.dense_layers == DOCUMENTED_DENSE_LAYERS[sparse.algorithm], f
