"""Sparse decode checked against an explicit plain-numpy reference, at budgets well below the context.

For every registered GQA algorithm, through the attention layer (`SparseAttention.prefill` /
`.decode`) with the "reference" and the "pallas" backend (interpret mode off-GPU):

1. the selection the algorithm's own `predict_attn` makes is checked against the algorithm's
   defining formula recomputed here in numpy (RocketKV's KT scores, Quest's min/max bounds,
   the oracle's attention mass, StreamingLLM's sinks + window, the indexer's index mass),
   and it is really sparse: it covers fewer tokens than the context;
2. the layer's decode output equals plain attention over exactly the selected tokens of each
   KV head (the GQA group shares them), computed in numpy from the keys and values the
   layer's projection produced, not from the cache;
3. for algorithms that compress the prompt (`predict_kv`), the kept tokens are checked
   against the formula (SnapKV++ / SnapKV / sinks + window), the pools hold exactly those
   tokens in order after prefill, and a decode step attends to exactly the selected ones.

float32 throughout: outputs agree to 2e-5 (summation order), scores to 1e-5.
"""
from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.algorithms.hybrid import HybridSparseAttentionConfig
from sparse_jax.algorithms.indexer import IndexerSparseAttentionConfig, init_indexers, save_indexers
from sparse_jax.algorithms.oracle import OracleSparseAttentionConfig
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.algorithms.snapkv import SnapKVSparseAttentionConfig
from sparse_jax.algorithms.streaming import StreamingSparseAttentionConfig
from sparse_jax.attention import Runtime, SparseAttention
from sparse_jax.cache import LayerCache
from sparse_jax.config import get_algorithm, registered_algorithms
from sparse_jax.rope import RopeSpec

HIDDEN, Q_HEADS, KV_HEADS, D, PAGE = 32, 4, 2, 16, 8
GROUP = Q_HEADS // KV_HEADS
T, LENGTHS = 128, (128, 101)  # padded prompt, prompt lengths per row
MAX_PAGES, NUM_PAGES = 20, 48
OUT_ATOL, SCORE_ATOL = 2e-5, 1e-5
INDEXER_WEIGHTS = os.path.join(tempfile.mkdtemp(prefix="sparse_reference_"), "indexer.safetensors")
MLA_ONLY = {"dsa"}  # checked by tests/test_dsa.py against its own token-level reference

# Generation-phase budgets, each well below the ~130-token context (prompts are not compressed).
DECODE_CONFIGS = {
    "rocket": RocketSparseAttentionConfig(prompt_budget=256, window_size=8, kernel_size=5, topr=8, topk=6, page_size=4,
                                          kt_cache_dtype="float32"),
    "quest": QuestSparseAttentionConfig(topk=6, page_size=4, minmax_dtype="float32", dense_layers=0),
    "hybrid": HybridSparseAttentionConfig(topk=6, page_size=4, sink_blocks=2, recent_blocks=2, minmax_dtype="float32"),
    "oracle": OracleSparseAttentionConfig(topk=5, block_size=6),
    "streaming": StreamingSparseAttentionConfig(sink_tokens=4, window=20, block_size=8),
    "indexer": IndexerSparseAttentionConfig(weights_path=INDEXER_WEIGHTS, topk=4, block_size=8, index_heads=2,
                                            index_head_dim=8, rope_dim=4, index_k_dtype="float32"),
    "snapkv": SnapKVSparseAttentionConfig(max_capacity_prompt=256, window_size=8),  # dense generation
}
# Context-phase budgets: prompts of 128 and 101 tokens compressed to 48.
COMPRESS_CONFIGS = {
    "rocket": RocketSparseAttentionConfig(prompt_budget=48, window_size=8, kernel_size=5, topr=8, topk=6, page_size=4,
                                          kt_cache_dtype="float32"),
    "snapkv": SnapKVSparseAttentionConfig(max_capacity_prompt=48, window_size=8, kernel_size=5),
    "streaming": StreamingSparseAttentionConfig(sink_tokens=4, window=44, block_size=8),
}
BACKENDS = ("reference", "pallas")


def test_every_algorithm_is_covered():
  missing = set(registered_algorithms()) - set(DECODE_CONFIGS) - MLA_ONLY
  assert not missing, f"add a budget-below-context config for {sorted(missing)}"
  compacting = {n for n, a in registered_algorithms().items() if a.config_cls.compacts_prompt} - MLA_ONLY
  assert compacting <= set(COMPRESS_CONFIGS), f"add a compression config for {sorted(compacting - set(COMPRESS_CONFIGS))}"


# -- plain numpy references --------------------------------------------------------------------

def softmax(x, axis=-1):
  e = np.exp(x - np.max(x, axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def sparse_attention(q, keys, values, token_sets, scale):
  """q: [Hq, D]; keys, values: [Hkv, L, D] one sequence's cache; token_sets[g]: the tokens KV
  head g attends to (shared by its GQA group). Returns [Hq, D] in float64."""
  out = np.zeros(q.shape, np.float64)
  for h in range(q.shape[0]):
    g = h // GROUP
    idx = np.asarray(sorted(token_sets[g]), np.int64)
    p = softmax(keys[g, idx].astype(np.float64) @ q[h].astype(np.float64) * scale)
    out[h] = p @ values[g, idx].astype(np.float64)
  return out


def block_tokens(blocks, block_size, length):
  return {t for b in blocks if b >= 0 for t in range(b * block_size, min((b + 1) * block_size, length))}


def check_top_blocks(chosen, scores, n_valid, topk, what):
  """`chosen` (one head's selection, -1 padded) is a top-`topk` of `scores` over the valid
  blocks, the newest block included; tie-tolerant (scores within SCORE_ATOL are exchangeable)."""
  valid = [int(c) for c in chosen if c >= 0]
  assert valid == sorted(set(valid)), f"{what}: not ascending and unique: {chosen}"
  assert list(chosen[len(valid):]) == [-1] * (len(chosen) - len(valid)), f"{what}: -1 padding must come last"
  assert len(valid) == min(topk, n_valid), f"{what}: {len(valid)} blocks, expected {min(topk, n_valid)}"
  assert all(0 <= c < n_valid for c in valid), f"{what}: block out of range [0, {n_valid}): {valid}"
  assert n_valid - 1 in valid, f"{what}: the newest block {n_valid - 1} must be attended"
  picked = [c for c in valid if c != n_valid - 1]
  rest = [c for c in range(n_valid - 1) if c not in valid]
  if picked and rest:
    assert min(scores[picked]) >= max(scores[rest]) - SCORE_ATOL, (
        f"{what}: selected {picked} (min score {min(scores[picked]):.6g}) but block "
        f"{rest[int(np.argmax(scores[rest]))]} scores {max(scores[rest]):.6g}")


def rocket_block_scores(cfg, q, keys, length, scale):
  """RocketKV's KT score per block (TensorRT-LLM): min/max keys per block, the group's top-r
  channels by mean |q|, max or min per channel by the sign of the group's summed q, softmax
  over valid blocks per head, group mean. q: [G, D], keys: [L, D] -> [n_blocks]."""
  bs, r = cfg.page_size, cfg.channels(D)
  n = -(-length // bs)
  kmin = np.stack([keys[i * bs:min((i + 1) * bs, length)].min(0) for i in range(n)])
  kmax = np.stack([keys[i * bs:min((i + 1) * bs, length)].max(0) for i in range(n)])
  channels = np.argsort(-np.abs(q).mean(0), kind="stable")[:r]
  qm = np.zeros_like(q)
  qm[:, channels] = q[:, channels]
  use_max = qm.sum(0) > 0
  raw = scale * qm @ np.where(use_max[None, :], kmax, kmin).T  # [G, n]
  return softmax(raw).mean(0)


def quest_block_scores(cfg, q, keys, length, scale):
  """Quest's bound U[h, n] = sum_c max(q_c M_c, q_c m_c) per page; softmax per head; group sum."""
  bs = cfg.page_size
  n = -(-length // bs)
  bounds = np.stack([np.maximum(q * keys[i * bs:min((i + 1) * bs, length)].max(0),
                                q * keys[i * bs:min((i + 1) * bs, length)].min(0)).sum(-1) for i in range(n)], -1)
  return softmax(scale * bounds).sum(0)


def hybrid_block_scores(cfg, q, keys, length, scale):
  """Quest's scores, raised by 2 * group on the first sink_blocks and the last recent_blocks blocks."""
  scores = quest_block_scores(cfg, q, keys, length, scale)
  n = np.arange(len(scores))
  protected = (n < cfg.sink_blocks) | (n >= len(scores) - cfg.recent_blocks)
  return scores + np.where(protected, 2.0 * q.shape[0], 0.0)


def oracle_block_scores(cfg, q, keys, length, scale):
  """True attention mass per block, averaged over the group."""
  p = softmax(q @ keys[:length].T * scale).mean(0)
  bs = cfg.block_size
  return np.array([p[i:i + bs].sum() for i in range(0, length, bs)])


def indexer_block_scores(cfg, predictor, hidden_new, hidden_all, length):
  """Index scores I[s] = sum_h w_h relu(q_h . k_s) (the predictor's projections), log of each
  block's softmax mass. hidden_new: [1, 1, hidden]; hidden_all: [1, length, hidden] -> [Hkv, n]."""
  qi, w = predictor.queries(jnp.asarray(hidden_new), jnp.asarray([[length - 1]], jnp.int32))
  k = predictor.rope_keys(jnp.swapaxes(predictor.keys(jnp.asarray(hidden_all)), 1, 2))  # [1, Hkv, L, d]
  qi, w, k = np.asarray(qi)[0, 0], np.asarray(w)[0, 0], np.asarray(k)[0]  # [Hkv, H, d], [Hkv, H], [Hkv, L, d]
  scores = np.einsum("gh,ghs->gs", w, np.maximum(np.einsum("ghd,gsd->ghs", qi, k), 0.0))
  bs = cfg.block_size
  out = []
  for g in range(KV_HEADS):
    s = scores[g]
    out.append([np.log(np.exp(s[i:i + bs] - s.max()).sum()) + s.max() for i in range(0, length, bs)])
  return np.array(out)


def streaming_blocks(cfg, length):
  n = -(-length // cfg.block_size)
  if n <= cfg.sink_blocks + cfg.recent_blocks:
    return list(range(n))
  return list(range(cfg.sink_blocks)) + list(range(n - cfg.recent_blocks, n))


def rocket_keep(cfg, q, k, length, scale):
  """SnapKV++ (RocketKV's context phase) for one row and KV head g: q [L, G, D], k [L, D].
  Returns (pooled prefix scores, window tokens)."""
  w = cfg.window_size
  p = softmax(np.einsum("wgd,td->gwt", q[length - w:length], k[:length - w]) * scale)  # prefix-only softmax
  scores = p.sum((0, 1))
  pad = cfg.kernel_size // 2
  padded = np.pad(scores, pad, constant_values=-np.inf)
  return np.array([padded[i:i + cfg.kernel_size].max() for i in range(length - w)]), list(range(length - w, length))


def snapkv_keep(cfg, q, k, length, scale):
  """SnapKV's reference: window softmax over the whole prompt (causal), avg_pool1d of the prefix part."""
  w = cfg.window_size
  logits = np.einsum("wgd,td->gwt", q[length - w:length], k[:length]) * scale
  causal = np.arange(length)[None, :] <= np.arange(length - w, length)[:, None]
  p = softmax(np.where(causal[None], logits, -np.inf))
  scores = p[..., :length - w].sum((0, 1))
  pad = cfg.kernel_size // 2
  padded = np.pad(scores, pad)
  return np.array([padded[i:i + cfg.kernel_size].sum() / cfg.kernel_size for i in range(length - w)]), \
      list(range(length - w, length))


def streaming_keep(cfg, q, k, length, scale):
  prefix = length - cfg.window
  return -np.arange(prefix, dtype=np.float64), list(range(prefix, length))  # earliest first: the sinks


KEEP_FORMULAS = {"rocket": rocket_keep, "snapkv": snapkv_keep, "streaming": streaming_keep}


def check_keep(name, cfg, kept, q, k, length, scale, what):
  """One head's kept tokens: the window, plus a top-(budget - window) of the formula's prefix scores."""
  scores, window = KEEP_FORMULAS[name](cfg, q, k, length, scale)
  budget = cfg.prompt_budget
  assert len(kept) == budget < length, f"{what}: kept {len(kept)} of {length}, expected {budget}"
  assert kept == sorted(set(kept)) and set(window) <= set(kept), f"{what}: window missing or not sorted: {kept}"
  prefix = [t for t in kept if t < length - len(window)]
  rest = [t for t in range(length - len(window)) if t not in set(prefix)]
  assert len(prefix) == budget - len(window)
  if rest:
    assert min(scores[prefix]) >= max(scores[rest]) - SCORE_ATOL, (
        f"{what}: kept token scores down to {min(scores[prefix]):.6g}, dropped one at {max(scores[rest]):.6g}")


# -- driving the attention layer ------------------------------------------------------------------

def _layer_and_inputs(cfg):
  """The attention layer (with the algorithm's learned predictor, if any), random prompts and a
  decode token, and a permuted page table."""
  if isinstance(cfg, IndexerSparseAttentionConfig) and not os.path.exists(INDEXER_WEIGHTS):
    save_indexers(INDEXER_WEIGHTS, init_indexers(cfg, hidden_size=HIDDEN, kv_heads=KV_HEADS, num_layers=1, seed=5))
  attn = SparseAttention(HIDDEN, Q_HEADS, KV_HEADS, D, rope=RopeSpec(D), rngs=nnx.Rngs(0))
  algo = get_algorithm(cfg)
  if algo.build_predictor is not None:
    attn.predictor = algo.build_predictor(cfg, attn.spec(PAGE, Runtime(sparse=cfg)), 0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, T, HIDDEN))
  x1 = jax.random.normal(jax.random.PRNGKey(2), (2, HIDDEN))
  table = np.random.default_rng(3).permutation(NUM_PAGES)[:2 * MAX_PAGES].reshape(2, MAX_PAGES).astype(np.int32)
  return attn, x, x1, jnp.asarray(table)


def _empty_layer(cfg, attn):
  aux = {n: jnp.zeros((s.heads, NUM_PAGES, *s.entry_shape), s.dtype)
         for n, s in get_algorithm(cfg).aux_spec(cfg, attn.spec(PAGE, Runtime(sparse=cfg))).items()}
  zeros = jnp.zeros((KV_HEADS, NUM_PAGES, PAGE, D))
  return LayerCache(k=zeros, v=zeros, aux=aux)


def _layer_call(attn, method, *args, runtime):
  """attn.<method>(*args, runtime) compiled as one program (eager dispatch compiles every op)."""
  graphdef, state = nnx.split(attn)
  fn = _compiled_method(graphdef, method, runtime)
  return fn(state, *args)


@functools.lru_cache(maxsize=None)
def _compiled_method(graphdef, method, runtime):
  return jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args, runtime=runtime))


def _hook(cfg, attn, hook, runtime, *args, **extra):
  """An algorithm hook (predict_kv, predict_attn, update_aux) compiled once per config."""
  spec = attn.spec(PAGE, runtime)
  return jax.jit(functools.partial(getattr(get_algorithm(cfg), hook), cfg, spec), static_argnums=_STATIC.get(hook, ()))(
      *args, **extra)


_STATIC = {"update_aux": (4,)}  # max_tokens


def _extra(attn, hidden):
  return {} if attn.predictor is None else dict(predictor=attn.predictor, hidden=hidden)


def pool_tokens(pool, table_row, count):
  """[Hkv, count, D] tokens 0..count-1 of one sequence, read from a pool through its page table row."""
  pool, table_row = np.asarray(pool), np.asarray(table_row)
  return np.stack([pool[:, table_row[t // PAGE], t % PAGE] for t in range(count)], axis=1)


def decode_and_check(name, cfg, attn, layer, table, x1, cache_k, cache_v, counts, positions, runtime, hidden_all,
                     sparse=True):
  """One decode step over a cache holding cache_k/v[b] ([Hkv, counts[b], D]); checks the
  selection against the formula (and, with `sparse`, that it covers fewer tokens than the
  context) and the output against numpy attention over the selected tokens."""
  counts = np.asarray(counts)
  out, layer = _layer_call(attn, "decode", x1, jnp.asarray(positions), layer, table, jnp.asarray(counts),
                           jnp.ones(2, bool), runtime=runtime)
  q1, k1, v1 = (np.asarray(a)[:, 0] for a in attn.project(x1[:, None], jnp.asarray(positions)[:, None]))
  new_len = counts + 1
  sel = _hook(cfg, attn, "predict_attn", runtime, jnp.asarray(q1), layer, table, jnp.asarray(new_len),
              **_extra(attn, x1[:, None]))
  expected = []
  for b in range(2):
    keys = np.concatenate([cache_k[b], k1[b][:, None]], axis=1)  # [Hkv, L, D]
    values = np.concatenate([cache_v[b], v1[b][:, None]], axis=1)
    length = int(new_len[b])
    np.testing.assert_allclose(pool_tokens(layer.k, table[b], length), keys, atol=1e-6,
                               err_msg=f"{name}: the pool does not hold the expected keys (row {b})")
    if sel is None:
      assert name == "snapkv", f"{name}: predict_attn returned None (dense) at a budget below the context"
      token_sets = [set(range(length))] * KV_HEADS
    else:
      idx = np.asarray(sel.indices)[b]
      bs = sel.block_size
      n_valid = -(-length // bs)
      if name == "streaming":
        for g in range(KV_HEADS):
          assert [int(c) for c in idx[g] if c >= 0] == streaming_blocks(cfg, length), f"streaming row {b} head {g}"
      else:
        scores = formula_scores(name, cfg, attn, q1[b], keys, x1[b], hidden_all[b], length)
        for g in range(KV_HEADS):
          check_top_blocks(idx[g], scores[g], n_valid, cfg.topk, f"{name} row {b} head {g}")
      token_sets = [block_tokens(idx[g], bs, length) for g in range(KV_HEADS)]
      attended = max(len(s) for s in token_sets)
      assert attended < length or not sparse, f"{name}: attends to {attended} of {length} tokens: not sparse"
    expected.append(sparse_attention(q1[b], keys, values, token_sets, attn.scale))
  want = np.asarray(attn.output(jnp.asarray(np.stack(expected), jnp.float32)))
  np.testing.assert_allclose(np.asarray(out), want, atol=OUT_ATOL, rtol=0,
                             err_msg=f"{name}: decode output differs from attention over the selected tokens")
  return sel


def formula_scores(name, cfg, attn, q, keys, x_new, hidden_row, length):
  """[Hkv, n_blocks] scores of the algorithm's defining formula for one row."""
  if name == "indexer":
    hidden = np.concatenate([hidden_row, x_new[None]], axis=0)[None, :length]
    return indexer_block_scores(cfg, attn.predictor, x_new[None, None], hidden, length)
  fn = dict(rocket=rocket_block_scores, quest=quest_block_scores, hybrid=hybrid_block_scores,
            oracle=oracle_block_scores)[name]
  return np.stack([fn(cfg, q[g * GROUP:(g + 1) * GROUP].astype(np.float64), keys[g].astype(np.float64), length,
                      attn.scale) for g in range(KV_HEADS)])


def _prompt_kv(attn, x):
  q, k, v = jax.jit(lambda x: attn.project(x, jnp.broadcast_to(jnp.arange(T), (2, T))))(x)
  return np.asarray(q), np.asarray(k), np.asarray(v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(DECODE_CONFIGS))
def test_sparse_decode_equals_attention_over_the_predicted_blocks(name, backend):
  """Budget well below the context: prompt stored whole (dense prefill + the algorithm's aux
  update), then one sparse decode step checked against the numpy reference."""
  cfg = DECODE_CONFIGS[name]
  attn, x, x1, table = _layer_and_inputs(cfg)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  layer = _empty_layer(cfg, attn)
  _, layer, counts = _layer_call(attn, "prefill", x, lengths, layer, table, runtime=Runtime(backend=backend))
  layer = _hook(cfg, attn, "update_aux", Runtime(sparse=cfg), layer, table, jnp.zeros(2, jnp.int32), lengths, T,
                **_extra(attn, x))
  _, k, v = _prompt_kv(attn, x)
  cache_k = [np.swapaxes(k[b, :n], 0, 1) for b, n in enumerate(LENGTHS)]
  cache_v = [np.swapaxes(v[b, :n], 0, 1) for b, n in enumerate(LENGTHS)]
  decode_and_check(name, cfg, attn, layer, table, x1, cache_k, cache_v, np.asarray(LENGTHS), np.asarray(LENGTHS),
                   Runtime(backend=backend, sparse=cfg), np.asarray(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(COMPRESS_CONFIGS))
def test_compressed_prompt_holds_exactly_the_predicted_tokens(name, backend):
  """Prompts longer than the budget: the algorithm's KeepSelection matches its formula, the
  pools hold exactly those tokens after prefill (compaction), and a decode step over the
  compacted cache equals the numpy reference over the selected tokens."""
  cfg = COMPRESS_CONFIGS[name]
  attn, x, x1, table = _layer_and_inputs(cfg)
  runtime = Runtime(backend=backend, sparse=cfg)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  _, layer, counts = _layer_call(attn, "prefill", x, lengths, _empty_layer(cfg, attn), table, runtime=runtime)
  q, k, v = _prompt_kv(attn, x)
  keep = _hook(cfg, attn, "predict_kv", runtime, jnp.asarray(q), jnp.asarray(k), lengths, **_extra(attn, x))
  assert keep is not None, f"{name}: predict_kv returned None for prompts longer than its budget"
  counts = np.asarray(counts)
  assert counts.tolist() == [cfg.prompt_budget] * 2 and np.asarray(keep.counts).tolist() == counts.tolist()
  cache_k, cache_v = [], []
  for b, length in enumerate(LENGTHS):
    kept = np.asarray(keep.indices)[b, :, :counts[b]]  # [Hkv, count]
    for g in range(KV_HEADS):
      check_keep(name, cfg, kept[g].tolist(), q[b, :, g * GROUP:(g + 1) * GROUP].astype(np.float64),
                 k[b, :, g].astype(np.float64), length, attn.scale, f"{name} row {b} head {g}")
    cache_k.append(np.stack([k[b, kept[g], g] for g in range(KV_HEADS)]))
    cache_v.append(np.stack([v[b, kept[g], g] for g in range(KV_HEADS)]))
    np.testing.assert_allclose(pool_tokens(layer.k, table[b], counts[b]), cache_k[b], atol=1e-6,
                               err_msg=f"{name}: after compaction the K pool does not hold the kept tokens (row {b})")
    np.testing.assert_allclose(pool_tokens(layer.v, table[b], counts[b]), cache_v[b], atol=1e-6,
                               err_msg=f"{name}: after compaction the V pool does not hold the kept tokens (row {b})")
  # StreamingLLM's generation window covers the whole compressed prompt here: only its
  # compression is sparse (its sparse decode is checked above).
  decode_and_check(name, cfg, attn, layer, table, x1, cache_k, cache_v, counts, np.asarray(LENGTHS), runtime,
                   np.asarray(x), sparse=name != "streaming")
