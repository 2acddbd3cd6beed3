"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference"): query-aware page selection from per-page min/max keys.

Metadata: per KV head and per page of `page_size` tokens, the elementwise minimum m and
maximum M of the page's keys (post-RoPE, as cached). It lives in an auxiliary pool `kt` on
the KV pages' ids, with RocketKV's KT-cache layout `[kv_heads, num_pages, kv_page_size //
page_size, 2, head_dim]`, and is maintained by the same function (`rocket.update_aux`), so
a partially filled page stays exact. Unlike RocketKV, every channel is used (no top-r
channel selection) and each query head takes its own per-channel max/min.

Score of page n for query head h (Quest's upper bound on q . k over the page):

    U[h, n] = sum_c max(q[h, c] * M[n, c], q[h, c] * m[n, c])
            = relu(q[h]) . M[n] + min(q[h], 0) . m[n]          (two matmuls, no [.., D] temporary)

GQA (Quest is defined for MHA, one query per KV head): the G query heads of a KV head share
its selection, so per head the bounds become a distribution over the valid pages,
softmax_n(scale * U[h, n]), and the group's page score is the sum (equivalently the mean) of
these G distributions. This is the group-averaged attention mass the oracle ranks by, with
each head's mass estimated from its bound; a page one head needs strongly still keeps up to
1/G of the group's mass. Each KV head then attends to its top-`topk` pages, the newest page
always among them. The token budget per decode step is `topk * page_size`.

Quest compresses no prompt (`predict_kv` returns None; `compacts_prompt = False`, so block
reuse is fine). `supports_chunked_prefill = True`: its metadata is per page and updated from
the stored keys, so chunks may arrive in any number (sparse chunked prefill scores through
the same page bounds).

Defaults: page_size=16 (the paper's page size), topk=128 (a 2048-token budget, the middle
of the paper's 256-4096 range), minmax_dtype="bfloat16" ("float32" for exact tests),
dense_layers=2: the paper applies Quest to every layer but the first two, whose attention is
not sparse (its reference code, evaluation/quest_attention.py, runs dense attention where
`layer_id < 2`). A model needs at least 3 layers for this default; `dense_layers: 0` makes
every layer sparse.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE
from sparse_jax.algorithms import rocket
from sparse_jax.algorithms.oracle import max_over_queries, select_topk_blocks
from sparse_jax.cache import AuxPoolSpec, LayerCache
from sparse_jax.config import (Algorithm, BaseSparseAttentionConfig, ConfigError, fail_field, check_positive_int,
                               is_power_of_two, register_algorithm)
from sparse_jax.selection import AttnSelection, KeepSelection, page_importance

MINMAX_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
@dataclasses.dataclass(frozen=True)
class QuestSparseAttentionConfig(BaseSparseAttentionConfig):
  """Quest settings (YAML `algorithm: quest`).

  topk: pages each KV head attends to per decode step (the newest page included).
  page_size: tokens per Quest page (a power of two dividing the KV cache page size).
  minmax_dtype: dtype of the min/max key metadata: "bfloat16" or "float32".
  """
  algorithm: ClassVar[str] = "quest"
  compacts_prompt: ClassVar[bool] = False
  supports_chunked_prefill: ClassVar[bool] = True

  topk: int = 128
  page_size: int = 16
  minmax_dtype: str = "bfloat16"
  dense_layers: int = dataclasses.field(default=2, kw_only=True)  # the paper's: its first two layers dense

  def __post_init__(self):
    name = type(self).__name__
    check_positive_int(self, "topk", "page_size")
    if not is_power_of_two(self.page_size):
      fail_field(name, "page_size", self.page_size, "must be a power of two")
    if self.minmax_dtype not in MINMAX_DTYPES:
      fail_field(name, "minmax_dtype", self.minmax_dtype, f"must be one of {sorted(MINMAX_DTYPES)}")


def aux_spec(cfg: QuestSparseAttentionConfig, spec) -> dict[str, AuxPoolSpec]:
  if spec.page_size % cfg.page_size:
    raise ConfigError(f"{type(cfg).__name__}.page_size={cfg.page_size} must divide the KV cache page size "
                      f"(kv_cache_config.tokens_per_block={spec.page_size})")
  return {"kt": AuxPoolSpec(heads=spec.kv_heads, entry_shape=(spec.page_size // cfg.page_size, 2, spec.head_dim),
                            dtype=MINMAX_DTYPES[cfg.minmax_dtype])}


def predict_kv(cfg: QuestSparseAttentionConfig, spec, q: jax.Array, k: jax.Array, lengths: jax.Array,
               q_start: jax.Array | None = None) -> KeepSelection | None:
  """No prompt compression (whole prompt or, with q_start, its last chunk)."""
  return None


def update_aux(cfg: QuestSparseAttentionConfig, spec, layer: LayerCache, page_table: jax.Array, start: jax.Array,
               end: jax.Array, max_tokens: int) -> LayerCache:
  """Recomputes the min/max entries of every Quest page touched by tokens [start, end)."""
  return rocket.update_aux(cfg, spec, layer, page_table, start, end, max_tokens)


def upper_bounds(q: jax.Array, kt: jax.Array, page_table: jax.Array) -> jax.Array:
  """Quest's per-head upper bound of q . k over each page (unscaled).

  q: [batch, q_heads, D]; kt: [kv_heads, num_pages, per_page, 2, D] (min, max);
  page_table: int32[batch, max_pages]. Returns float32[batch, kv_heads, G, max_pages * per_page]
  (entries of missing pages read page 0; the caller masks them).
  """
  batch, q_heads, d = q.shape
  kv_heads, _, per_page = kt.shape[:3]
  entries = kt[:, jnp.clip(page_table, 0)]  # [Hkv, B, max_pages, per_page, 2, D]
  entries = jnp.moveaxis(entries, 1, 0).reshape(batch, kv_heads, -1, 2, d).astype(jnp.float32)
  qg = q.reshape(batch, kv_heads, q_heads // kv_heads, d).astype(jnp.float32)
  hi = jnp.einsum("bhgd,bhnd->bhgn", jax.nn.relu(qg), entries[..., 1, :])
  lo = jnp.einsum("bhgd,bhnd->bhgn", jnp.minimum(qg, 0.0), entries[..., 0, :])
  return hi + lo


def page_probs(cfg: QuestSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
               lengths: jax.Array) -> jax.Array:
  """Group-summed per-head softmax of the bounds: float32[batch, kv_heads, num_quest_pages], -inf invalid."""
  kt = layer.aux["kt"]
  per_page = kt.shape[2]
  raw = upper_bounds(q, kt, page_table) * spec.scale
  n = jnp.arange(raw.shape[-1], dtype=jnp.int32)
  stored = jnp.take_along_axis(page_table, n[None, :] // per_page, axis=1) >= 0
  valid = (n[None, :] < ((lengths + cfg.page_size - 1) // cfg.page_size)[:, None]) & stored  # [B, N]
  probs = jax.nn.softmax(jnp.where(valid[:, None, None, :], raw, MASK_VALUE), axis=-1).sum(axis=2)
  return jnp.where(valid[:, None, :], probs, -jnp.inf)


def predict_attn(cfg: QuestSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> AttnSelection:
  """Top-`topk` Quest pages per KV head for one decode token per row (lengths include it).

  q: [batch, q_heads, D]; page_table: int32[batch, max_pages]. Returns AttnSelection of
  int32[batch, kv_heads, min(topk, max_pages * per_page)] with block_size = cfg.page_size.
  """
  return select_topk_blocks(page_probs(cfg, spec, q, layer, page_table, lengths), lengths, cfg.page_size, cfg.topk)


def chunk_scores(cfg: QuestSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> tuple[jax.Array, int]:
  """Scores of the stored context's Quest pages for several queries per row (q: [batch, samples, q_heads, D];
  chunked sparse prefill): (float32[batch, kv_heads, num_quest_pages], the max over the queries, -inf = not a
  page; page_size)."""
  return max_over_queries(page_probs, cfg, spec, q, layer, page_table, lengths), cfg.page_size


def page_scores(cfg: QuestSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                lengths: jax.Array) -> jax.Array:
  """Per KV page importance (its Quest pages' estimated mass, max over KV heads): float32[batch, max_pages]."""
  return page_importance(page_probs(cfg, spec, q, layer, page_table, lengths), spec.page_size // cfg.page_size)


register_algorithm(Algorithm(name="quest", config_cls=QuestSparseAttentionConfig, aux_spec=aux_spec,
                             predict_kv=predict_kv, update_aux=update_aux, predict_attn=predict_attn,
                             page_scores=page_scores, chunk_scores=chunk_scores,
                             dense_below=lambda cfg: cfg.topk * cfg.page_size,
                             with_budget=lambda cfg, b: dataclasses.replace(cfg, topk=max(1, b // cfg.page_size))))
