"""RocketKV end to end: equality at full budget, compaction, planted recall, memory, compilations."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig, predict_kv
from sparse_jax.attention import Runtime, SparseAttention
from sparse_jax.cache import LayerCache, PageAllocator, create_cache_for
from sparse_jax.config import ConfigError, load_llm_api_options, load_sparse_attention_config
from sparse_jax.rope import RopeSpec
from tests.kernel_platform import INTERPRET
from tests.model_fixtures import tiny_llama
from tests.model_loops import prefill_then_decode

EXACT = dict(window_size=8, kernel_size=5, topr=1.0, page_size=4, kt_cache_dtype="float32")


def _cache(model, page_size, sparse, num_pages=96, slots=3, max_pages=24, seed=0):
  alloc = PageAllocator(num_pages, page_size, slots, max_pages)
  alloc._free = list(np.random.default_rng(seed).permutation(num_pages))  # non-contiguous pages
  cache = create_cache_for(model.cache_layout(sparse, page_size), num_pages=num_pages, page_size=page_size,
                           batch_slots=slots, max_pages_per_seq=max_pages, dtype=jnp.float32)
  return alloc, cache


def test_full_budget_equals_dense_for_several_steps():
  model = tiny_llama(2)
  page = 8
  rk = RocketSparseAttentionConfig(prompt_budget=128, topk=48, **EXACT)
  lens, steps = [37, 90, 61], 5
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 97, size=l + steps).tolist() for l in lens]
  results = {}
  for name, rt in (("dense", Runtime()), ("rocket", Runtime(sparse=rk))):
    alloc, cache = _cache(model, page, rt.sparse)
    results[name], _ = prefill_then_decode(model, rt, alloc, cache, seqs, lens, steps, 96)
  np.testing.assert_allclose(results["rocket"], results["dense"], atol=1e-5, rtol=0)


def test_decode_on_compacted_cache_equals_attention_over_kept_tokens():
  """Independent check: attention of a new token over exactly the kept tokens (+ itself)."""
  hidden, heads, kv_heads, d, page = 32, 4, 2, 16, 8
  attn = SparseAttention(hidden, heads, kv_heads, d, rope=RopeSpec(d), rngs=nnx.Rngs(0))
  rk = RocketSparseAttentionConfig(prompt_budget=24, topk=64, **EXACT)
  rt = Runtime(sparse=rk)
  lens = np.array([70, 20, 50], np.int32)
  t = 80
  x = jax.random.normal(jax.random.PRNGKey(1), (3, t, hidden))
  alloc, _ = _cache(tiny_llama(0), page, None, num_pages=64, slots=3, max_pages=16, seed=4)
  for s, l in enumerate(lens):
    alloc.ensure(s, int(l) + 1)
  table = jnp.asarray(alloc.table())
  layer = LayerCache(k=jnp.zeros((kv_heads, 64, page, d)), v=jnp.zeros((kv_heads, 64, page, d)),
                     aux={"kt": jnp.zeros((kv_heads, 64, page // 4, 2, d))})
  _, layer, counts = attn.prefill(x, jnp.asarray(lens), layer, table, rt)
  np.testing.assert_array_equal(np.asarray(counts), np.minimum(lens, 24))
  # Independent reference: project, select, attend.
  pos = jnp.broadcast_to(jnp.arange(t), (3, t))
  q, k, v = attn.project(x, pos)
  keep = predict_kv(rk, attn.spec(page, rt), q, k, jnp.asarray(lens))
  x1 = jax.random.normal(jax.random.PRNGKey(2), (3, hidden))
  q1, k1, v1 = attn.project(x1[:, None], jnp.asarray(lens)[:, None])
  out, _ = attn.decode(x1, jnp.asarray(lens), layer, table, counts, jnp.ones(3, bool), rt)
  group = heads // kv_heads
  for i in range(3):
    c = int(counts[i])
    heads_out = []
    for h in range(heads):
      kh = h // group
      idx = np.asarray(keep.indices[i, kh, :c])
      keys = jnp.concatenate([k[i, idx, kh], k1[i, 0, kh][None]])
      vals = jnp.concatenate([v[i, idx, kh], v1[i, 0, kh][None]])
      p = jax.nn.softmax(keys @ q1[i, 0, h] / math.sqrt(d))
      heads_out.append(p @ vals)
    expected = attn.output(jnp.stack(heads_out)[None])[0]
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(expected), atol=1e-5)


def test_planted_tokens_are_selected():
  """Keys built so that a few tokens dominate a query's attention: their blocks are selected."""
  from sparse_jax.algorithms.rocket import predict_attn, update_aux
  kv_heads, q_heads, d, page, length = 2, 8, 32, 16, 2048
  rk = RocketSparseAttentionConfig(prompt_budget=4096, window_size=32, kernel_size=63, topr=16, topk=16, page_size=4,
                                   kt_cache_dtype="float8_e5m2")
  attn = SparseAttention(64, q_heads, kv_heads, d, rope=RopeSpec(d), rngs=nnx.Rngs(0))
  spec = attn.spec(page, Runtime(sparse=rk))
  num_pages = length // page
  table = jnp.asarray(np.random.default_rng(0).permutation(num_pages)[None].astype(np.int32))

  @jax.jit
  def trial(key):
    kq, kk, kp = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, q_heads, d))
    keys = jax.random.normal(kk, (kv_heads, length, d))
    planted = jax.random.choice(kp, length - 64, (kv_heads, 4), replace=False)  # not in the newest block
    group_q = q[0].reshape(kv_heads, q_heads // kv_heads, d).mean(1)  # [kv_heads, d]
    keys = keys.at[jnp.arange(kv_heads)[:, None], planted].set(3.0 * group_q[:, None, :] / jnp.linalg.norm(
        group_q, axis=-1, keepdims=True)[:, :, None] * math.sqrt(d))
    pool = jnp.zeros((kv_heads, num_pages, page, d)).at[:, table[0]].set(keys.reshape(kv_heads, num_pages, page, d))
    layer = LayerCache(k=pool, v=pool, aux={"kt": jnp.zeros((kv_heads, num_pages, page // 4, 2, d), jnp.float8_e5m2)})
    lengths = jnp.asarray([length])
    layer = update_aux(rk, spec, layer, table, jnp.zeros(1, jnp.int32), lengths, length)
    sel = predict_attn(rk, spec, q, layer, table, lengths)
    hit = jnp.any(sel.indices[0][:, None, :] == (planted // 4)[:, :, None], axis=-1)
    return hit.mean()

  recall = np.mean([float(trial(jax.random.PRNGKey(s))) for s in range(40)])
  assert recall >= 0.95, recall


def test_memory_after_compaction_is_the_budget():
  model = tiny_llama(5, max_pos=2048)
  rk = RocketSparseAttentionConfig(prompt_budget=64, topk=8, **EXACT)
  page = 16
  llm = LLM(model, dtype="float32", sparse_attention_config=rk, kv_cache_config=KvCacheConfig(tokens_per_block=page),
            max_batch_size=2, max_seq_len=1024, decode_chunk_size=4)
  eng = llm.engine
  rng = np.random.default_rng(1)
  prompt, max_tokens = rng.integers(0, 97, size=500).tolist(), 12
  req = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
  eng.step()  # admit + prefill (+ one decode chunk)
  assert req.kept_prompt_tokens == 64
  expected = math.ceil((64 + max_tokens) / page)
  assert req.pages_after_prefill == expected
  assert len(eng.allocator.pages(req.slot)) == expected
  assert eng.allocator.used_pages == expected
  eng.run_until_done()
  assert len(req.output_ids) == max_tokens
  assert eng.allocator.free_pages == eng.allocator.num_pages


def test_no_recompilation_between_decode_steps():
  model = tiny_llama(6, max_pos=2048)
  rk = RocketSparseAttentionConfig(prompt_budget=64, topk=8, **EXACT)
  llm = LLM(model, dtype="float32", sparse_attention_config=rk, kv_cache_config=KvCacheConfig(tokens_per_block=16),
            max_batch_size=2, max_seq_len=1024, decode_chunk_size=4)
  llm.generate([list(range(1, 90))], SamplingParams(max_tokens=3, ignore_eos=True))
  compiled = llm.engine.decode_fn._cache_size()
  out = llm.generate([list(range(2, 91))], SamplingParams(max_tokens=40, ignore_eos=True))
  assert len(out[0].outputs[0].token_ids) == 40
  assert llm.engine.stats["decode_calls"] >= 10
  assert llm.engine.decode_fn._cache_size() == compiled, "decode recompiled between steps"


def test_block_reuse_is_accepted():
  """Compaction writes into each request's own pages, so prompt pages can be shared
  (tests/test_prefix_reuse.py checks the tokens)."""
  llm = LLM(tiny_llama(0), sparse_attention_config=RocketSparseAttentionConfig(topr=1.0),
            kv_cache_config=KvCacheConfig(enable_block_reuse=True))
  assert llm.engine.allocator.enable_reuse


@pytest.mark.parametrize("kwargs, match", [
    (dict(page_size=6), "page_size=6: must be a power of two"),
    (dict(window_size=2048), "window_size=2048: must be < prompt_budget=2048"),
    (dict(kernel_size=64), "kernel_size=64: must be odd"),
    (dict(kt_cache_dtype="int8"), "kt_cache_dtype='int8'"),
    (dict(topr=1.5), "topr=1.5"), (dict(topk=0), "topk=0"), (dict(prompt_budget=-1), "prompt_budget=-1")])
def test_config_validation_names_field_and_value(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    RocketSparseAttentionConfig(**kwargs)


def test_topr_above_head_dim_is_rejected_with_the_model():
  with pytest.raises(ConfigError, match="topr=128 exceeds the model's head_dim=16"):
    LLM(tiny_llama(0), sparse_attention_config=RocketSparseAttentionConfig(topr=128))


def test_yaml_layout_and_unknown_keys(tmp_path):
  import configs
  opts = load_llm_api_options(configs.path("rocket"))
  assert isinstance(opts.sparse_attention_config, RocketSparseAttentionConfig)
  assert opts.kv_cache_config.enable_block_reuse is False
  bad = tmp_path / "bad.yaml"
  bad.write_text("sparse_attention_config:\n  algorithm: rocket\n  prompt_budgt: 10\n")
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['prompt_budgt'\]"):
    load_sparse_attention_config(str(bad))
  bad.write_text("sparse_attention_config:\n  algorithm: rocket\nkv_cache_config:\n  enable_block_reuse: 'yes'\n")
  with pytest.raises(ConfigError, match="enable_block_reuse='yes': must be a bool"):
    load_llm_api_options(str(bad))
  with pytest.raises(ConfigError, match="unknown sparse attention algorithm 'nope'"):
    load_sparse_attention_config({"algorithm": "nope"})
  bad.write_text("sparse_attention_config:\n  algorithm: rocket\nspeculative: 1\n")
  with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['speculative'\]"):
    load_llm_api_options(str(bad))


def test_short_sequences_decode_densely_and_switch_to_sparse_when_long():
  """Below topk * page_size every block would be selected: the engine skips the prediction
  (same tokens as the sparse path) and switches to the sparse step once sequences grow."""
  rk = RocketSparseAttentionConfig(prompt_budget=32, topk=8, **EXACT)  # selects everything up to 32 tokens
  prompt = list(range(3, 23))  # 20 tokens
  outs, stats = {}, {}
  for name, dense_below in (("auto", True), ("always_predict", False)):
    llm = LLM(tiny_llama(8, max_pos=2048), dtype="float32", sparse_attention_config=rk,
              kv_cache_config=KvCacheConfig(tokens_per_block=16), max_batch_size=1, max_seq_len=256, decode_chunk_size=4)
    if not dense_below:
      llm.engine._dense_below = None
    outs[name] = llm.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0].outputs[0].token_ids
    stats[name] = dict(llm.engine.stats)
  assert outs["auto"] == outs["always_predict"]
  auto = stats["auto"]
  assert 0 < auto["sparse_decode_calls"] < auto["decode_calls"], f"both dense and sparse decode chunks must run: {auto}"
  assert stats["always_predict"]["sparse_decode_calls"] == stats["always_predict"]["decode_calls"]


def test_rocket_sparse_paths_stay_off_up_to_prompt_budget():
  """RocketKV decodes densely while sequences are at most prompt_budget long (nothing to
  compress; the prediction would cost more than it saves), and sparsely beyond."""
  from sparse_jax.config import get_algorithm
  rk = RocketSparseAttentionConfig(prompt_budget=2048, topk=64, page_size=4)
  assert get_algorithm(rk).dense_below(rk) == 2048
  rk = RocketSparseAttentionConfig(prompt_budget=128, topk=64, page_size=4)
  assert get_algorithm(rk).dense_below(rk) == 256


def test_pallas_backend_generates_the_reference_tokens(monkeypatch):
  """Engine level: the fused decode kernels (backend "pallas": scoring, then selection and
  attention in one kernel; interpret mode off the GPU) give the reference backend's greedy tokens, with
  prompts past prompt_budget (compacted) and topk below the blocks held, so the selection matters."""
  import pallas_kernels.rocket_decode as rocket_decode
  traced = []
  fused = rocket_decode.rocket_decode_attention
  monkeypatch.setattr(rocket_decode, "rocket_decode_attention", lambda *a, **k: traced.append(1) or fused(*a, **k))
  rk = RocketSparseAttentionConfig(prompt_budget=24, topk=3, **EXACT)
  prompts = [list(range(3, 50)), list(range(60, 90))]
  outs = {}
  for backend in ("reference", "pallas"):
    llm = LLM(tiny_llama(8, layers=1, max_pos=256), dtype="float32", sparse_attention_config=rk, backend=backend,
              interpret=INTERPRET, kv_cache_config=KvCacheConfig(tokens_per_block=8), max_batch_size=2, max_seq_len=96,
              decode_chunk_size=4)
    llm.engine._dense_below = None  # one decode step variant to compile: the sparse one
    outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))]
  assert traced, "the pallas backend did not take the fused decode path"
  assert outs["pallas"] == outs["reference"]
