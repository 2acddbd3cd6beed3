"""Oracle block selection: the exact top-k blocks by the true attention of the decode query.

Not a predictor one would serve: every decode step reads every cached key (as dense attention
does), so it saves no memory traffic. It measures what a block predictor could reach at a
given budget (the ceiling of quest / rocket / indexer at the same `block_size` and `topk`),
and it is the reference that `selection_recall` compares other predictors against.

Per batch row b and KV head g with its group of G query heads:

    p[h, s] = softmax_s(scale * q[h] . k[s])      over the s < lengths[b] cached tokens
    mass[n] = sum_{s in block n} mean_h p[h, s]    block n = tokens [n * block_size, (n + 1) * block_size)

and the head attends to its `topk` blocks of largest mass, the block holding the newest token
always among them (as every block predictor here does). Prompts are never compressed
(`compacts_prompt = False`, so block reuse is fine).

Defaults: topk=128 blocks of block_size=16 tokens (a 2048-token budget, Quest's default
geometry), and dense_layers=0: the oracle is this project's measuring tool, and every layer
sparse is the setting whose ceiling it measures (the eval grid runs every algorithm that way).
To bound a predictor run with dense first layers (Quest's default of 2), give the oracle the
same `dense_layers`. `select_topk_blocks` is the top-k rule every block predictor in this package
shares (quest, indexer).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE
from sparse_jax.cache import AuxPoolSpec, LayerCache, gather_tokens
from sparse_jax.config import Algorithm, BaseSparseAttentionConfig, check_positive_int, register_algorithm
from sparse_jax.selection import AttnSelection, KeepSelection, topk_selection

@dataclasses.dataclass(frozen=True)
class OracleSparseAttentionConfig(BaseSparseAttentionConfig):
  """Oracle settings (YAML `algorithm: oracle`).

  topk: blocks each KV head attends to per decode step (the newest block included).
  block_size: tokens per block (any positive size; the decode kernel gathers units of
    gcd(block_size, KV page size) tokens).
  """
  algorithm: ClassVar[str] = "oracle"
  compacts_prompt: ClassVar[bool] = False

  topk: int = 128
  block_size: int = 16

  def __post_init__(self):
    check_positive_int(self, "topk", "block_size")


def select_topk_blocks(scores: jax.Array, lengths: jax.Array, block_size: int, topk: int) -> AttnSelection:
  """The top-`topk` valid blocks per KV head, the block of the newest token always kept.

  scores: float32[batch, kv_heads, num_blocks] (higher = more important; -inf = not a
  block); lengths: int32[batch] tokens stored (the newest included). Blocks at or past
  ceil(lengths / block_size) are never selected. Returns AttnSelection(int32[batch, kv_heads,
  min(topk, num_blocks)], block_size) ascending, -1 padded.
  """
  num_blocks = scores.shape[-1]
  chex.assert_shape(lengths, (scores.shape[0],))
  n_valid = (lengths + block_size - 1) // block_size
  block = jnp.arange(num_blocks, dtype=jnp.int32)[None, None, :]
  scores = jnp.where(block < n_valid[:, None, None], scores.astype(jnp.float32), -jnp.inf)
  newest = (block == (n_valid - 1)[:, None, None]) & (lengths > 0)[:, None, None]
  return topk_selection(jnp.where(newest, jnp.inf, scores), topk, block_size)


def max_over_queries(score_fn, cfg, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                     lengths: jax.Array) -> jax.Array:
  """score_fn(cfg, spec, q_one [batch, q_heads, D], layer, page_table, lengths) -> [batch, kv_heads,
  blocks] for each query of q [batch, samples, q_heads, D]: the elementwise max over the queries."""
  return jnp.max(jax.vmap(lambda qr: score_fn(cfg, spec, qr, layer, page_table, lengths), in_axes=1)(q), axis=0)


def block_sum(token_scores: jax.Array, block_size: int) -> jax.Array:
  """[..., T] -> [..., ceil(T / block_size)]: sum over each block's tokens (zero padded)."""
  t = token_scores.shape[-1]
  nb = -(-t // block_size)
  pad = [(0, 0)] * (token_scores.ndim - 1) + [(0, nb * block_size - t)]
  return jnp.pad(token_scores, pad).reshape(*token_scores.shape[:-1], nb, block_size).sum(-1)


def token_probs(q: jax.Array, layer: LayerCache, page_table: jax.Array, lengths: jax.Array,
                scale: float) -> jax.Array:
  """Group-averaged attention probabilities of one decode query per row over every cached token.

  q: [batch, q_heads, D] (roped); layer.k: [kv_heads, num_pages, page_size, D]; page_table:
  int32[batch, max_pages]; lengths: int32[batch] tokens stored (the query's own included).
  Returns float32[batch, kv_heads, max_pages * page_size], 0 past lengths.
  """
  batch, q_heads, d = q.shape
  kv_heads, _, page_size, _ = layer.k.shape
  max_tokens = page_table.shape[1] * page_size
  keys = gather_tokens(layer.k, page_table, max_tokens)  # [B, Hkv, T, D]
  qg = q.reshape(batch, kv_heads, q_heads // kv_heads, d)
  logits = jnp.einsum("bhgd,bhtd->bhgt", qg, keys, preferred_element_type=jnp.float32) * scale
  valid = (jnp.arange(max_tokens)[None, :] < lengths[:, None])[:, None, None, :]
  probs = jax.nn.softmax(jnp.where(valid, logits, MASK_VALUE), axis=-1)
  return jnp.where(valid, probs, 0.0).mean(axis=2)


def oracle_block_scores(q: jax.Array, layer: LayerCache, page_table: jax.Array, lengths: jax.Array,
                        block_size: int, scale: float) -> jax.Array:
  """True attention mass per block: float32[batch, kv_heads, ceil(max_pages * page_size / block_size)]."""
  return block_sum(token_probs(q, layer, page_table, lengths, scale), block_size)


def oracle_blocks(q: jax.Array, layer: LayerCache, page_table: jax.Array, lengths: jax.Array, block_size: int,
                  topk: int, scale: float) -> AttnSelection:
  """The exact top-`topk` blocks of `block_size` tokens per KV head (newest block kept).

  q: [batch, q_heads, D]; page_table: int32[batch, max_pages]; lengths: int32[batch] (the
  decode token included). Returns AttnSelection(int32[batch, kv_heads, min(topk, num_blocks)]).
  """
  scores = oracle_block_scores(q, layer, page_table, lengths, block_size, scale)
  return select_topk_blocks(scores, lengths, block_size, topk)


def selection_recall(selected: AttnSelection, oracle: AttnSelection) -> jax.Array:
  """Fraction of the oracle's blocks that `selected` also holds: float32[batch, kv_heads].

  Both selections must use the same block_size (block ids are compared); -1 padding is
  ignored; a row whose oracle selects nothing has recall 1.
  """
  if selected.block_size != oracle.block_size:
    raise ValueError(f"selection_recall compares block ids, so the block sizes must match: selected.block_size="
                     f"{selected.block_size}, oracle.block_size={oracle.block_size}")
  chex.assert_equal_shape_prefix((selected.indices, oracle.indices), 2)
  ora, sel = oracle.indices, selected.indices
  hit = jnp.any((ora[..., :, None] == sel[..., None, :]) & (sel[..., None, :] >= 0), axis=-1) & (ora >= 0)
  total = jnp.sum(ora >= 0, axis=-1)
  return jnp.where(total > 0, hit.sum(-1) / jnp.maximum(total, 1), 1.0).astype(jnp.float32)


# -- the Algorithm contract ---------------------------------------------------------------

def aux_spec(cfg: OracleSparseAttentionConfig, spec) -> dict[str, AuxPoolSpec]:
  """No auxiliary pool: the oracle reads the keys themselves."""
  return {}


def predict_kv(cfg: OracleSparseAttentionConfig, spec, q: jax.Array, k: jax.Array,
               lengths: jax.Array, q_start: jax.Array | None = None) -> KeepSelection | None:
  """No prompt compression."""
  return None


def update_aux(cfg: OracleSparseAttentionConfig, spec, layer: LayerCache, page_table: jax.Array, start: jax.Array,
               end: jax.Array, max_tokens: int) -> LayerCache:
  return layer


def predict_attn(cfg: OracleSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> AttnSelection:
  """q: [batch, q_heads, D] one decode token per row; lengths include it."""
  return oracle_blocks(q, layer, page_table, lengths, cfg.block_size, cfg.topk, spec.scale)


def page_scores(cfg: OracleSparseAttentionConfig | None, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                lengths: jax.Array) -> jax.Array:
  """True attention mass per KV page (max over KV heads): float32[batch, max_pages] (cfg unused)."""
  return block_sum(token_probs(q, layer, page_table, lengths, spec.scale), spec.page_size).max(axis=1)


register_algorithm(Algorithm(name="oracle", config_cls=OracleSparseAttentionConfig, aux_spec=aux_spec,
                             predict_kv=predict_kv, update_aux=update_aux, predict_attn=predict_attn,
                             page_scores=page_scores,
                             with_budget=lambda cfg, b: dataclasses.replace(cfg, topk=max(1, b // cfg.block_size))))
