"""RocketKV (Behnam et al., 2025, "RocketKV: Accelerating Long-Context LLM Inference via
Two-Stage KV Cache Compression"), as TensorRT-LLM implements it for MQA/GQA models.

Stage 1, context phase (SnapKV++): when a prompt is longer than `prompt_budget`, the last
`window_size` queries score every earlier (non-window) key with softmax(q.k / sqrt(d)); the
scores are summed over the GQA group and the window, max-pooled with width `kernel_size`,
and each KV head keeps its top `prompt_budget - window_size` tokens (sorted) plus the
window. The cache is compacted to those tokens.

Stage 2, generation phase (hybrid sparse attention): a "KT" cache holds, per KV head and per
block of `page_size` tokens, the elementwise min and max of the keys (`kt_cache_dtype`). For
each decode query the group's top-`topr` channels by mean |q| are kept; a block's score is
q against max or min per channel by the sign of the group's summed q, scaled by 1/sqrt(d);
softmax over blocks, averaged over the group; each KV head attends to its top-`topk` blocks
(the block holding the newest token always among them).

Defaults: TensorRT-LLM's (the config class below), and dense_layers=0: both stages run in every
layer, as in the paper's reference implementation (`rocket_forward`'s `skip_layers` defaults to
0) and in TensorRT-LLM, whose RocketKV config has no dense layers.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp

from sparse_jax.cache import AuxPoolSpec, LayerCache
from sparse_jax.config import (Algorithm, BaseSparseAttentionConfig, ConfigError, fail_field, check_positive_int,
                               is_power_of_two, register_algorithm)
from sparse_jax.selection import AttnSelection, KeepSelection, keep_all, page_importance, topk_selection

KT_DTYPES = {"float8_e5m2": jnp.float8_e5m2, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class RocketSparseAttentionConfig(BaseSparseAttentionConfig):
  """RocketKV settings (TensorRT-LLM's defaults).

  prompt_budget: tokens each KV head keeps of a longer prompt (window included).
  window_size: last prompt queries that score the prompt; always kept.
  kernel_size: width of the max-pool smoothing the scores (odd).
  topr: channels used for block scoring: a float in (0, 1] as a fraction of head_dim, or an
    int <= head_dim. The default 1.0 (all channels) is what TensorRT-LLM's default of 128 means
    on its 128-wide heads, and it holds on every head size (32 to 256).
  topk: blocks each KV head attends to per decode step.
  page_size: tokens per KT block (a power of two dividing the KV page size).
  kt_cache_dtype: "float8_e5m2" or "bfloat16" ("float32" for exact tests).
  """
  algorithm: ClassVar[str] = "rocket"
  compacts_prompt: ClassVar[bool] = True
  supports_chunked_prefill: ClassVar[bool] = True

  prompt_budget: int = 2048
  window_size: int = 32
  kernel_size: int = 63
  topr: int | float = 1.0
  topk: int = 64
  page_size: int = 4
  kt_cache_dtype: str = "float8_e5m2"

  def __post_init__(self):
    name = type(self).__name__
    check_positive_int(self, "prompt_budget", "window_size", "kernel_size", "topk", "page_size")
    if not is_power_of_two(self.page_size):
      fail_field(name, "page_size", self.page_size, "must be a power of two")
    if self.window_size >= self.prompt_budget:
      fail_field(name, "window_size", self.window_size, f"must be < prompt_budget={self.prompt_budget}")
    if self.kernel_size % 2 == 0:
      fail_field(name, "kernel_size", self.kernel_size, "must be odd")
    if isinstance(self.topr, bool) or not isinstance(self.topr, (int, float)):
      fail_field(name, "topr", self.topr, "must be an int or a float fraction")
    if isinstance(self.topr, float) and not 0.0 < self.topr <= 1.0:
      fail_field(name, "topr", self.topr, "as a float it is a fraction of head_dim and must be in (0, 1]")
    if isinstance(self.topr, int) and self.topr <= 0:
      fail_field(name, "topr", self.topr, "must be positive")
    if self.kt_cache_dtype not in KT_DTYPES:
      fail_field(name, "kt_cache_dtype", self.kt_cache_dtype, f"must be one of {sorted(KT_DTYPES)}")

  def channels(self, head_dim: int) -> int:
    """topr resolved against the model's head_dim."""
    if isinstance(self.topr, float):
      return max(1, round(self.topr * head_dim))
    if self.topr > head_dim:
      raise ConfigError(f"RocketSparseAttentionConfig.topr={self.topr} exceeds the model's head_dim={head_dim}; "
                        f"use topr <= {head_dim} or a fraction such as 1.0")
    return self.topr


def aux_spec(cfg: RocketSparseAttentionConfig, spec) -> dict[str, AuxPoolSpec]:
  cfg.channels(spec.head_dim)
  if spec.page_size % cfg.page_size:
    raise ConfigError(f"RocketSparseAttentionConfig.page_size={cfg.page_size} must divide the KV cache page size "
                      f"(kv_cache_config.tokens_per_block={spec.page_size})")
  return {"kt": AuxPoolSpec(heads=spec.kv_heads, entry_shape=(spec.page_size // cfg.page_size, 2, spec.head_dim),
                            dtype=KT_DTYPES[cfg.kt_cache_dtype])}


def snapkv_scores(cfg: RocketSparseAttentionConfig, q: jax.Array, k: jax.Array, lengths: jax.Array,
                  scale: float, q_start: jax.Array | None = None) -> jax.Array:
  """SnapKV++ importance of every prefix token, per KV head.

  q: [n, Tq, q_heads, D] holding positions q_start.. (0 by default; a chunked prefill passes
  only its last chunk), k: [n, T, kv_heads, D] (roped, positions 0..), lengths: int32[n].
  Returns float32[n, kv_heads, T]: max-pooled, group- and window-summed attention of the last
  `window_size` queries over the prefix [0, length - window); -inf elsewhere.
  """
  n, tq, q_heads, d = q.shape
  t, kv_heads = k.shape[1], k.shape[2]
  w = cfg.window_size
  offset = lengths if q_start is None else lengths - q_start
  win_pos = jnp.clip(offset[:, None] - w + jnp.arange(w)[None, :], 0, tq - 1)  # [n, W]
  q_win = jnp.take_along_axis(q, win_pos[:, :, None, None], axis=1)  # [n, W, Hq, D]
  q_win = q_win.reshape(n, w, kv_heads, q_heads // kv_heads, d)
  logits = jnp.einsum("nwhgd,nthd->nhgwt", q_win, k, preferred_element_type=jnp.float32) * scale
  prefix = jnp.arange(t)[None, :] < (lengths - w)[:, None]  # [n, T]
  logits = jnp.where(prefix[:, None, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(prefix[:, None, None, None, :], probs, 0.0)
  scores = probs.sum(axis=(2, 3))  # [n, kv_heads, T]
  pad = cfg.kernel_size // 2
  pooled = jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, (1, 1, cfg.kernel_size), (1, 1, 1),
                                 ((0, 0), (0, 0), (pad, pad)))
  return jnp.where(prefix[:, None, :], pooled, -jnp.inf)


def predict_kv(cfg: RocketSparseAttentionConfig, spec, q: jax.Array, k: jax.Array,
               lengths: jax.Array, q_start: jax.Array | None = None) -> KeepSelection | None:
  """Tokens each KV head keeps after prefill (rows no longer than prompt_budget keep all).

  q: [n, T, q_heads, D], k: [n, T, kv_heads, D]; lengths: int32[n].
  Returns KeepSelection(indices int32[n, kv_heads, prompt_budget], counts int32[n]) or None
  when no row can exceed the budget (T <= prompt_budget).
  """
  n, t = k.shape[:2]
  budget, w = cfg.prompt_budget, cfg.window_size
  if t <= budget:
    return None
  kv_heads = k.shape[2]
  scores = snapkv_scores(cfg, q, k, lengths, spec.scale, q_start)
  _, top = jax.lax.top_k(scores, budget - w)  # every row has >= budget - w prefix tokens when compressed
  prefix_idx = jnp.sort(top.astype(jnp.int32), axis=-1)
  window_idx = (lengths[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :])[:, None, :]
  compressed = jnp.concatenate([prefix_idx, jnp.broadcast_to(window_idx, (n, kv_heads, w))], axis=-1)
  full = keep_all(lengths, kv_heads, budget)
  long = (lengths > budget)[:, None, None]
  indices = jnp.where(long, compressed, full.indices)
  counts = jnp.where(lengths > budget, budget, full.counts).astype(jnp.int32)
  chex.assert_shape(indices, (n, kv_heads, budget))
  return KeepSelection(indices=indices, counts=counts)


def update_aux(cfg: RocketSparseAttentionConfig, spec, layer: LayerCache, page_table: jax.Array, start: jax.Array,
               end: jax.Array, max_tokens: int) -> LayerCache:
  """Recomputes the KT entries (min/max of keys) of every block touched by tokens [start, end).

  page_table: int32[n, max_pages]; start, end: int32[n]; max_tokens: static bound on
  end - start. Blocks are recomputed from the stored keys, so a partial block stays exact.
  """
  bs = cfg.page_size
  kt = layer.aux["kt"]
  kv_heads, num_pages, per_page = kt.shape[:3]
  page_size = spec.page_size
  n, max_pages = page_table.shape
  n_blocks = min(-(-max_tokens // bs) + 1, max_pages * per_page)
  first = start // bs
  blocks = first[:, None] + jnp.arange(n_blocks, dtype=jnp.int32)[None, :]  # [n, nb]
  touched = (blocks * bs < end[:, None]) & (blocks < max_pages * per_page)
  tok = blocks[:, :, None] * bs + jnp.arange(bs, dtype=jnp.int32)  # [n, nb, bs]
  page = jnp.take_along_axis(page_table, jnp.clip(tok // page_size, 0, max_pages - 1).reshape(n, -1), axis=1)
  slot = page.reshape(n, n_blocks, bs) * page_size + tok % page_size
  valid = (tok < end[:, None, None]) & (page.reshape(n, n_blocks, bs) >= 0)
  keys = layer.k.reshape(kv_heads, num_pages * page_size, -1)[:, jnp.clip(slot, 0)]  # [H, n, nb, bs, D]
  keys = keys.astype(jnp.float32)
  vmask = valid[None, :, :, :, None]
  kmin = jnp.min(jnp.where(vmask, keys, jnp.inf), axis=3)
  kmax = jnp.max(jnp.where(vmask, keys, -jnp.inf), axis=3)
  entry = jnp.stack([kmin, kmax], axis=3).astype(kt.dtype)  # [H, n, nb, 2, D]
  block_page = jnp.take_along_axis(page_table, jnp.clip(blocks * bs // page_size, 0, max_pages - 1), axis=1)
  flat = jnp.where(touched & (block_page >= 0), block_page * per_page + blocks % per_page, num_pages * per_page)
  kt_flat = kt.reshape(kv_heads, num_pages * per_page, 2, -1)
  kt_flat = kt_flat.at[:, flat.reshape(-1)].set(entry.reshape(kv_heads, n * n_blocks, 2, -1), mode="drop")
  return layer.replace(aux={**layer.aux, "kt": kt_flat.reshape(kt.shape)})


def block_scores(cfg: RocketSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> jax.Array:
  """Group-averaged block probabilities float32[batch, kv_heads, max_pages * blocks_per_page]."""
  from pallas_kernels.rocket_score import rocket_block_scores
  return rocket_block_scores(q, layer.aux["kt"], page_table, lengths, topr=cfg.channels(spec.head_dim),
                             block_size=cfg.page_size, scale=spec.scale, **spec.runtime.kernel_kwargs())


def chunk_scores(cfg: RocketSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> tuple[jax.Array, int]:
  """Block scores of the stored context for several queries per row (q: [n, samples, q_heads, D]; the max over
  them), from one pass over the KT cache (chunked sparse prefill)."""
  return block_scores(cfg, spec, q, layer, page_table, lengths), cfg.page_size


def predict_attn(cfg: RocketSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> AttnSelection:
  """Top-`topk` blocks per KV head for one decode token per row (lengths include it)."""
  scores = block_scores(cfg, spec, q, layer, page_table, lengths)
  newest = (lengths + cfg.page_size - 1) // cfg.page_size - 1  # block of the newest token
  is_newest = jnp.arange(scores.shape[-1])[None, None, :] == newest[:, None, None]
  scores = jnp.where(is_newest & (lengths > 0)[:, None, None], jnp.inf, scores)
  return topk_selection(scores, cfg.topk, cfg.page_size)


def decode_attention(cfg: RocketSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                     lengths: jax.Array) -> jax.Array | None:
  """predict_attn, to_units and the sparse decode kernel as two Pallas launches (scoring, then
  selection + attention in one kernel); None on the reference backend, which composes them."""
  if spec.runtime.backend != "pallas":
    return None
  from pallas_kernels.rocket_decode import rocket_decode_attention
  return rocket_decode_attention(q, layer.k, layer.v, layer.aux["kt"], page_table, lengths,
                                 topr=cfg.channels(spec.head_dim), topk=cfg.topk, block_size=cfg.page_size,
                                 scale=spec.scale, **spec.runtime.kernel_kwargs()).out


def page_scores(cfg: RocketSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                lengths: jax.Array) -> jax.Array:
  """Per KV page importance (sum of its blocks' probabilities, max over heads): float32[batch, max_pages]."""
  return page_importance(block_scores(cfg, spec, q, layer, page_table, lengths), spec.page_size // cfg.page_size)


register_algorithm(Algorithm(name="rocket", config_cls=RocketSparseAttentionConfig, aux_spec=aux_spec,
                             predict_kv=predict_kv, update_aux=update_aux, predict_attn=predict_attn,
                             page_scores=page_scores, chunk_scores=chunk_scores,
                             decode_attention=decode_attention,
                             # Sparse paths stay off up to prompt_budget (nothing to compress, and a
                             # top-k over so few blocks costs more than it saves; measured: 0.89x of
                             # dense at 1K on the H100 with them on), and wherever every block is selected.
                             dense_below=lambda cfg: max(cfg.prompt_budget, cfg.topk * cfg.page_size),
                             kept_prompt_tokens=lambda cfg, n: min(n, cfg.prompt_budget),
                             with_budget=lambda cfg, b: dataclasses.replace(cfg, prompt_budget=b,
                                                                            topk=max(1, b // cfg.page_size)),
                             min_final_chunk=lambda cfg: cfg.window_size))
