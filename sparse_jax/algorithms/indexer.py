"""Learned lightning indexer for GQA models (DeepSeek-V3.2's DSA indexer, grafted onto a model
that has none, and trained by distillation: `python -m sparse_jax.distill`).

Per attention layer and per KV head g, a small indexer scores every cached token s for the
current query token t (DeepSeek-V3.2's formula, computed per KV head):

    I_g[t, s] = sum_h w_g[t, h] * ReLU(q_g[t, h] . k_g[s])

    q_g[t, h] = RoPE_t(x_t @ wq[:, g, h])                  [index_head_dim]   h < index_heads
    w_g[t, h] = (x_t @ weights_proj[:, g, h]) * index_heads^-0.5 * index_head_dim^-0.5
    k_g[s]    = RoPE_s(LayerNorm_g(x_s @ wk[:, g]))         [index_head_dim]

where x is the layer's input hidden states (after its input norm: what the attention layer
receives) and RoPE rotates the first `rope_dim` channels (theta `rope_theta`) at the token's
slot in the cache. The index keys LayerNorm_g(x_s @ wk[:, g]) live, not yet rotated, in an
auxiliary pool `index_k` on the KV pages' ids (`[kv_heads, num_pages, kv_page_size,
index_head_dim]`, `index_k_dtype`), written by `update_aux` as tokens are stored. A decode token scores each block of `block_size` tokens
by the log of the mass softmax_s(I_g[t, :]) puts on it (logsumexp of the block's I), and
each KV head attends to its top-`topk` blocks, the newest block always among them.

The indexer is trained to make softmax_s(I_g[t, s]) match the layer's dense attention of
the group (see sparse_jax/distill.py), so its block mass ranks blocks as the oracle does.
Per decode step it reads index_head_dim values per cached token and KV head (64 by
default, against 2 x head_dim for K and V): a quarter of dense attention's traffic at
head_dim 128 in bf16, plus the selected blocks.

Positions: the indexer's RoPE uses cache slots (the query at lengths - 1, key s at s),
applied when scoring. Without eviction a slot is the token's position (the indexer never
compacts: `compacts_prompt = False`, so block reuse is fine); after pages are evicted
(`decode_budget`) distances count cached tokens, as StreamingLLM's in-cache positions do,
and stay consistent because nothing was rotated at write time. `update_aux` relies on the
attention layer's calls: hidden[:, j] is the token stored at slot start + j. Under tensor-parallel KV sharding the predictor would need sharding
too; `build_predictor` builds all KV heads, and a call that sees fewer raises.

Weights: one safetensors file (`weights_path`) holding `layers.{i}.{wq, wk, k_norm_scale,
k_norm_bias, weights_proj}` for every layer i, with the geometry in its metadata;
`build_predictor(cfg, spec, i)` returns layer i's `LightningIndexer` and raises a
ConfigError naming the problem when the file is missing, unreadable or mis-shaped.

Defaults: topk=128 blocks of block_size=16 tokens (a 2048-token budget), index_heads=4,
index_head_dim=64, rope_dim=32 (half, as DeepSeek-V3.2's indexer: 64 of 128),
rope_theta=10000, index_k_dtype="bfloat16", dense_layers=0 (DeepSeek-V3.2 runs its indexer and
token selection in every layer; the distilled indexers cover every layer too).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, ClassVar, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import rope as rope_lib
from sparse_jax.algorithms.oracle import select_topk_blocks
from sparse_jax.cache import AuxPoolSpec, LayerCache, gather_tokens, token_slots, write_tokens
from sparse_jax.config import (Algorithm, BaseSparseAttentionConfig, ConfigError, fail_field, check_positive_int,
                               register_algorithm)
from sparse_jax.selection import AttnSelection, KeepSelection

INDEX_K = "index_k"
INDEX_K_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
PARAM_NAMES = ("wq", "wk", "k_norm_scale", "k_norm_bias", "weights_proj")
FILE_FORMAT = "sparse_jax.lightning_indexer.v1"
_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class IndexerSparseAttentionConfig(BaseSparseAttentionConfig):
  """Learned-indexer settings (YAML `algorithm: indexer`).

  weights_path: safetensors file of the trained indexers (required; see sparse_jax.distill).
  topk: blocks each KV head attends to per decode step (the newest block included).
  block_size: tokens per block.
  index_heads / index_head_dim: index query heads per KV head, and their width.
  rope_dim: leading index channels rotated by RoPE (even, <= index_head_dim; 0 = none).
  rope_theta: RoPE base of the indexer.
  index_k_dtype: dtype of the index key pool: "bfloat16" or "float32".
  """
  algorithm: ClassVar[str] = "indexer"
  compacts_prompt: ClassVar[bool] = False

  weights_path: str | None = None
  topk: int = 128
  block_size: int = 16
  index_heads: int = 4
  index_head_dim: int = 64
  rope_dim: int = 32
  rope_theta: float = 10000.0
  index_k_dtype: str = "bfloat16"

  def __post_init__(self):
    name = type(self).__name__
    if not isinstance(self.weights_path, (str, os.PathLike)) or not os.fspath(self.weights_path):
      fail_field(name, "weights_path", self.weights_path, "must name the safetensors file of the trained indexers "
                 "(python -m sparse_jax.distill --model=... --output=PATH writes one)")
    check_positive_int(self, "topk", "block_size", "index_heads", "index_head_dim")
    if (not isinstance(self.rope_dim, int) or isinstance(self.rope_dim, bool) or self.rope_dim < 0
        or self.rope_dim % 2 or self.rope_dim > self.index_head_dim):
      fail_field(name, "rope_dim", self.rope_dim, f"must be an even integer in [0, index_head_dim={self.index_head_dim}]")
    if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
      fail_field(name, "rope_theta", self.rope_theta, "must be a positive number")
    if self.index_k_dtype not in INDEX_K_DTYPES:
      fail_field(name, "index_k_dtype", self.index_k_dtype, f"must be one of {sorted(INDEX_K_DTYPES)}")


# -- the predictor ------------------------------------------------------------------------

class LightningIndexer(nnx.Module):
  """The indexers of one attention layer, one per KV head (parameters batched over heads).

  wq: [hidden, kv_heads, index_heads, index_head_dim]; wk: [hidden, kv_heads, index_head_dim];
  k_norm_scale, k_norm_bias: [kv_heads, index_head_dim]; weights_proj: [hidden, kv_heads,
  index_heads].
  """

  def __init__(self, hidden_size: int, kv_heads: int, index_heads: int, index_head_dim: int, rope_dim: int,
               rope_theta: float = 10000.0, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    init = nnx.initializers.normal(hidden_size ** -0.5)
    self.hidden_size, self.kv_heads, self.index_heads, self.index_head_dim = (hidden_size, kv_heads, index_heads,
                                                                              index_head_dim)
    self.rope_dim, self.rope_theta = rope_dim, float(rope_theta)
    self.wq = nnx.Param(init(rngs.params(), (hidden_size, kv_heads, index_heads, index_head_dim), param_dtype))
    self.wk = nnx.Param(init(rngs.params(), (hidden_size, kv_heads, index_head_dim), param_dtype))
    self.k_norm_scale = nnx.Param(jnp.ones((kv_heads, index_head_dim), param_dtype))
    self.k_norm_bias = nnx.Param(jnp.zeros((kv_heads, index_head_dim), param_dtype))
    self.weights_proj = nnx.Param(init(rngs.params(), (hidden_size, kv_heads, index_heads), param_dtype))

  def _check(self, hidden: jax.Array) -> None:
    if hidden.shape[-1] != self.hidden_size:
      raise ValueError(f"the lightning indexer expects hidden states of width {self.hidden_size}, got "
                       f"{hidden.shape[-1]}: its weights were trained for another model")

  def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [n, T, heads, index_head_dim]; positions: int32[n, T]. Rotates the first rope_dim channels."""
    if self.rope_dim == 0:
      return x
    cos, sin = rope_lib.cos_sin(rope_lib.RopeSpec(self.rope_dim, theta=self.rope_theta), positions, jnp.float32)
    r = self.rope_dim
    return jnp.concatenate([rope_lib.apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)

  def queries(self, hidden: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """hidden: [n, T, hidden]; positions: int32[n, T] ->
    (q float32[n, T, kv_heads, index_heads, index_head_dim], w float32[n, T, kv_heads, index_heads])."""
    self._check(hidden)
    n, t, _ = hidden.shape
    x = hidden.astype(jnp.float32)
    q = jnp.einsum("ntc,cghd->ntghd", x, self.wq[...].astype(jnp.float32))
    q = self._rope(q.reshape(n, t, -1, self.index_head_dim), positions).reshape(q.shape)
    w = jnp.einsum("ntc,cgh->ntgh", x, self.weights_proj[...].astype(jnp.float32))
    return q, w * (self.index_heads ** -0.5 * self.index_head_dim ** -0.5)

  def keys(self, hidden: jax.Array) -> jax.Array:
    """hidden: [n, T, hidden] -> float32[n, T, kv_heads, index_head_dim], not yet rotated (cached form)."""
    self._check(hidden)
    k = jnp.einsum("ntc,cgd->ntgd", hidden.astype(jnp.float32), self.wk[...].astype(jnp.float32))
    mean = k.mean(-1, keepdims=True)
    var = jnp.square(k - mean).mean(-1, keepdims=True)
    return (k - mean) * jax.lax.rsqrt(var + _LN_EPS) * self.k_norm_scale[...] + self.k_norm_bias[...]

  def rope_keys(self, keys: jax.Array) -> jax.Array:
    """keys: [n, kv_heads, T, index_head_dim] of slots 0..T-1 -> rotated at their slots (float32)."""
    n, _, t, _ = keys.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    return jnp.swapaxes(self._rope(jnp.swapaxes(keys.astype(jnp.float32), 1, 2), pos), 1, 2)


def index_scores(q: jax.Array, w: jax.Array, k: jax.Array) -> jax.Array:
  """I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]) per KV head.

  q: [n, Tq, kv_heads, index_heads, d]; w: [n, Tq, kv_heads, index_heads]; k: [n, kv_heads, Tk, d].
  Returns float32[n, kv_heads, Tq, Tk] (unmasked).
  """
  dots = jnp.einsum("nqghd,ngkd->nghqk", q, k.astype(jnp.float32))
  return jnp.einsum("nqgh,nghqk->ngqk", w, jax.nn.relu(dots))


def block_logsumexp(token_scores: jax.Array, block_size: int) -> jax.Array:
  """[..., T] (-inf = masked) -> [..., ceil(T / block_size)]: log of each block's softmax mass (+ const)."""
  t = token_scores.shape[-1]
  nb = -(-t // block_size)
  pad = [(0, 0)] * (token_scores.ndim - 1) + [(0, nb * block_size - t)]
  blocks = jnp.pad(token_scores, pad, constant_values=-jnp.inf).reshape(*token_scores.shape[:-1], nb, block_size)
  top = jax.lax.stop_gradient(jnp.max(blocks, axis=-1, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  mass = jnp.sum(jnp.exp(blocks - top), axis=-1)
  return jnp.where(mass > 0, jnp.log(jnp.maximum(mass, 1e-38)) + top[..., 0], -jnp.inf)


# -- the Algorithm contract ---------------------------------------------------------------

def aux_spec(cfg: IndexerSparseAttentionConfig, spec) -> dict[str, AuxPoolSpec]:
  """The index key pool: per token and KV head, index_head_dim values on the KV pages' ids."""
  return {INDEX_K: AuxPoolSpec(heads=spec.kv_heads, entry_shape=(spec.page_size, cfg.index_head_dim),
                               dtype=INDEX_K_DTYPES[cfg.index_k_dtype])}


def _check_predictor(predictor: Any, spec, what: str) -> None:
  if not isinstance(predictor, LightningIndexer):
    raise ConfigError(f"algorithm 'indexer': {what} needs the layer's LightningIndexer (predictor=...), got "
                      f"{type(predictor).__name__}; the engine attaches it through build_predictor")
  if predictor.kv_heads != spec.kv_heads:
    raise ConfigError(f"algorithm 'indexer': the predictor holds {predictor.kv_heads} KV heads but this attention "
                      f"call sees {spec.kv_heads} (tensor-parallel KV sharding is not supported by the indexer)")


def predict_kv(cfg: IndexerSparseAttentionConfig, spec, q: jax.Array, k: jax.Array, lengths: jax.Array,
               q_start: jax.Array | None = None, *, predictor=None, hidden=None) -> KeepSelection | None:
  """No prompt compression."""
  return None


def update_aux(cfg: IndexerSparseAttentionConfig, spec, layer: LayerCache, page_table: jax.Array, start: jax.Array,
               end: jax.Array, max_tokens: int, *, predictor=None, hidden=None) -> LayerCache:
  """Writes the (unrotated) index keys of tokens [start, end) of each row.

  page_table: int32[n, max_pages]; start, end: int32[n]; hidden: [n, max_tokens, hidden]
  where hidden[:, j] is the token at position start + j (prefill: the prompt, start 0;
  decode: the new token).
  """
  _check_predictor(predictor, spec, "update_aux")
  n = page_table.shape[0]
  chex.assert_shape(hidden, (n, max_tokens, None))
  pool = layer.aux[INDEX_K]
  kv_heads, num_pages, page_size, dim = pool.shape
  pos = start[:, None] + jnp.arange(max_tokens, dtype=jnp.int32)[None, :]
  keys = predictor.keys(hidden)  # [n, T, kv_heads, dim]
  slots = token_slots(page_table, pos, pos < end[:, None], page_size, num_pages).reshape(-1)
  pool = write_tokens(pool, slots, keys.reshape(n * max_tokens, kv_heads, dim))
  return layer.replace(aux={**layer.aux, INDEX_K: pool})


def token_index_scores(q: jax.Array, layer: LayerCache, page_table: jax.Array, lengths: jax.Array, *,
                       predictor: LightningIndexer, hidden: jax.Array) -> jax.Array:
  """Index scores of one decode token per row over every cached token.

  hidden: [batch, 1, hidden] (the decode token's); lengths: int32[batch] (it included).
  Returns float32[batch, kv_heads, max_pages * page_size], -inf past lengths.
  """
  pool = layer.aux[INDEX_K]
  max_tokens = page_table.shape[1] * pool.shape[2]
  qi, w = predictor.queries(hidden[:, -1:], jnp.maximum(lengths - 1, 0)[:, None])
  keys = predictor.rope_keys(gather_tokens(pool, page_table, max_tokens))  # [B, Hkv, T, dim]
  scores = index_scores(qi, w, keys)[:, :, 0]
  valid = jnp.arange(max_tokens)[None, None, :] < lengths[:, None, None]
  return jnp.where(valid, scores, -jnp.inf)


def predict_attn(cfg: IndexerSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array, *, predictor=None, hidden=None) -> AttnSelection:
  """Top-`topk` blocks per KV head by index mass, for one decode token per row (lengths include it).

  Returns AttnSelection(int32[batch, kv_heads, min(topk, num_blocks)], cfg.block_size).
  """
  _check_predictor(predictor, spec, "predict_attn")
  scores = token_index_scores(q, layer, page_table, lengths, predictor=predictor, hidden=hidden)
  return select_topk_blocks(block_logsumexp(scores, cfg.block_size), lengths, cfg.block_size, cfg.topk)


def page_scores(cfg: IndexerSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                lengths: jax.Array, *, predictor=None, hidden=None) -> jax.Array:
  """Per KV page predicted attention mass (max over KV heads): float32[batch, max_pages].

  Needs predictor= and hidden= like predict_attn."""
  _check_predictor(predictor, spec, "page_scores")
  scores = token_index_scores(q, layer, page_table, lengths, predictor=predictor, hidden=hidden)
  probs = jax.nn.softmax(jnp.where(jnp.isneginf(scores), -1e30, scores), axis=-1)
  probs = jnp.where(jnp.isneginf(scores), 0.0, probs)
  b, h, t = probs.shape
  return probs.reshape(b, h, t // spec.page_size, spec.page_size).sum(-1).max(axis=1)


# -- weights ----------------------------------------------------------------------------

def init_indexers(cfg: IndexerSparseAttentionConfig, *, hidden_size: int, kv_heads: int, num_layers: int,
                  seed: int = 0) -> list[LightningIndexer]:
  """Freshly initialised indexers, one per layer (the starting point of distillation)."""
  rngs = nnx.Rngs(seed)
  return [LightningIndexer(hidden_size, kv_heads, cfg.index_heads, cfg.index_head_dim, cfg.rope_dim, cfg.rope_theta,
                           rngs=rngs) for _ in range(num_layers)]


def save_indexers(path: str | os.PathLike, indexers: Sequence[LightningIndexer]) -> None:
  """Writes every layer's indexer to one safetensors file (float32), geometry in the metadata."""
  from safetensors.numpy import save_file
  if not indexers:
    raise ValueError("save_indexers: no indexers to save")
  first = indexers[0]
  tensors = {f"layers.{i}.{name}": np.asarray(getattr(ix, name)[...], np.float32)
             for i, ix in enumerate(indexers) for name in PARAM_NAMES}
  meta = dict(format=FILE_FORMAT, num_layers=len(indexers), hidden_size=first.hidden_size, kv_heads=first.kv_heads,
              index_heads=first.index_heads, index_head_dim=first.index_head_dim, rope_dim=first.rope_dim,
              rope_theta=first.rope_theta)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
  os.replace(tmp, path)


@functools.lru_cache(maxsize=4)
def _read_file(path: str, mtime_ns: int, size: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises several types for a corrupt file
    raise ConfigError(f"IndexerSparseAttentionConfig.weights_path={path!r}: not a readable safetensors file ({e})") \
        from None
  return tensors, meta


def load_indexer_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, metadata) of an indexer weights file; ConfigError if missing or unreadable."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise ConfigError(f"IndexerSparseAttentionConfig.weights_path={path!r}: file not found; train the indexers "
                      f"with `python -m sparse_jax.distill --model=CHECKPOINT --output={path}`")
  st = os.stat(path)
  return _read_file(path, st.st_mtime_ns, st.st_size)


def build_predictor(cfg: IndexerSparseAttentionConfig, spec, layer_index: int) -> LightningIndexer:
  """Layer `layer_index`'s indexer loaded from cfg.weights_path, checked against cfg and the layer."""
  tensors, meta = load_indexer_file(cfg.weights_path)
  where = f"IndexerSparseAttentionConfig.weights_path={os.fspath(cfg.weights_path)!r}"
  if meta.get("format") != FILE_FORMAT:
    raise ConfigError(f"{where}: not a lightning-indexer weights file (metadata format={meta.get('format')!r}, "
                      f"expected {FILE_FORMAT!r})")
  for field in ("rope_dim", "rope_theta"):
    if float(meta.get(field, -1)) != float(getattr(cfg, field)):
      raise ConfigError(f"IndexerSparseAttentionConfig.{field}={getattr(cfg, field)!r} but {where} was trained with "
                        f"{field}={meta.get(field)!r}")
  missing = [name for name in PARAM_NAMES if f"layers.{layer_index}.{name}" not in tensors]
  if missing:
    raise ConfigError(f"{where}: no indexer for attention layer {layer_index} (missing {missing}); the file holds "
                      f"{meta.get('num_layers')} layer(s): was it trained for this model?")
  got = {name: tensors[f"layers.{layer_index}.{name}"] for name in PARAM_NAMES}
  hidden = got["wq"].shape[0] if got["wq"].ndim == 4 else -1
  g, h, d = spec.kv_heads, cfg.index_heads, cfg.index_head_dim
  expected = dict(wq=(hidden, g, h, d), wk=(hidden, g, d), k_norm_scale=(g, d), k_norm_bias=(g, d),
                  weights_proj=(hidden, g, h))
  bad = {name: tuple(got[name].shape) for name in PARAM_NAMES if tuple(got[name].shape) != expected[name]}
  if bad or hidden <= 0:
    raise ConfigError(f"{where}: layer {layer_index} is mis-shaped for this model and config: got {bad or got['wq'].shape}, "
                      f"expected {expected} (kv_heads={g} from the model; index_heads={h}, index_head_dim={d} from "
                      f"the config; hidden from wq)")
  ix = LightningIndexer(hidden, g, h, d, cfg.rope_dim, cfg.rope_theta, rngs=nnx.Rngs(0))
  for name in PARAM_NAMES:
    getattr(ix, name)[...] = jnp.asarray(got[name], jnp.float32)
  return ix


register_algorithm(Algorithm(name="indexer", config_cls=IndexerSparseAttentionConfig, aux_spec=aux_spec,
                             predict_kv=predict_kv, update_aux=update_aux, predict_attn=predict_attn,
                             page_scores=page_scores, build_predictor=build_predictor,
                             with_budget=lambda cfg, b: dataclasses.replace(cfg, topk=max(1, b // cfg.block_size))))
