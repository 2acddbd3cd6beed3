"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
one-shot prompt compression from an observation window; generation is dense.

Context phase, for a prompt longer than `max_capacity_prompt` tokens: the last `window_size`
prompt queries (the observation window) attend, causally, to the whole prompt; their
attention weights on the prefix (every token before the window) are summed over the window
and over the KV head's group of query heads, smoothed by a 1-D pooling of width
`kernel_size` (stride 1, zero padding of kernel_size // 2), and each KV head keeps its top
`max_capacity_prompt - window_size` prefix tokens (ascending) plus the whole window. The
cache is compacted to those tokens (`compacts_prompt = True`), and generation attends to
all of them densely (`predict_attn` returns None). Shorter prompts are kept whole.

Faithful to the reference implementation: the softmax of each window query runs over the
whole prompt (prefix and, causally, the window) before the prefix part is taken, and the
pooling is an average (`avgpool`, PyTorch's `avg_pool1d` with count_include_pad) -- RocketKV's
SnapKV++ (rocket.py) instead max-pools scores normalised over the prefix only. `pooling:
maxpool` is the reference code's alternative. The paper selects per query head of an MHA
model; for GQA the group shares one selection (summed scores), so the memory saving is real.

Defaults (the reference `init_snapkv`): max_capacity_prompt=2048, window_size=32,
kernel_size=5, pooling="avgpool"; dense_layers=0 (the reference code compresses the cache of every
layer). `prompt_budget` is an alias of max_capacity_prompt (the
name every compacting algorithm here answers to).

Eviction during long generations (`decode_budget`): `page_scores` is the decode query's true
attention mass per KV page (the oracle's, max over KV heads), accumulated by the engine over
layers and steps: SnapKV's own criterion, attention received, continued into generation (as
H2O does). It reads the keys once more per step, so it is only computed when eviction is on.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE
from sparse_jax.algorithms import oracle
from sparse_jax.cache import AuxPoolSpec, LayerCache
from sparse_jax.config import Algorithm, BaseSparseAttentionConfig, fail_field, check_positive_int, register_algorithm
from sparse_jax.selection import AttnSelection, KeepSelection, keep_all

POOLINGS = ("avgpool", "maxpool")
@dataclasses.dataclass(frozen=True)
class SnapKVSparseAttentionConfig(BaseSparseAttentionConfig):
  """SnapKV settings (YAML `algorithm: snapkv`).

  max_capacity_prompt: tokens each KV head keeps of a longer prompt (window included).
  window_size: last prompt queries that score the prefix; always kept.
  kernel_size: pooling width (odd).
  pooling: "avgpool" (the paper) or "maxpool".
  """
  algorithm: ClassVar[str] = "snapkv"
  compacts_prompt: ClassVar[bool] = True

  max_capacity_prompt: int = 2048
  window_size: int = 32
  kernel_size: int = 5
  pooling: str = "avgpool"

  def __post_init__(self):
    name = type(self).__name__
    check_positive_int(self, "max_capacity_prompt", "window_size", "kernel_size")
    if self.window_size >= self.max_capacity_prompt:
      fail_field(name, "window_size", self.window_size, f"must be < max_capacity_prompt={self.max_capacity_prompt}")
    if self.kernel_size % 2 == 0:
      fail_field(name, "kernel_size", self.kernel_size, "must be odd")
    if self.pooling not in POOLINGS:
      fail_field(name, "pooling", self.pooling, f"must be one of {list(POOLINGS)}")

  @property
  def prompt_budget(self) -> int:
    return self.max_capacity_prompt


def keep_top_prefix_and_window(scores: jax.Array, lengths: jax.Array, budget: int, window: int) -> KeepSelection:
  """Per KV head: the `budget - window` best-scored prefix tokens plus the last `window` tokens.

  scores: float32[n, kv_heads, T], -inf outside each row's prefix [0, length - window);
  lengths: int32[n]. Rows no longer than `budget` keep every token. Returns
  KeepSelection(indices int32[n, kv_heads, budget] ascending, -1 padded; counts int32[n]).
  """
  n, kv_heads, _ = scores.shape
  if budget > window:
    _, top = jax.lax.top_k(scores, budget - window)  # a compressed row has > budget - window prefix tokens
    prefix_idx = jnp.sort(top.astype(jnp.int32), axis=-1)
  else:
    prefix_idx = jnp.zeros((n, kv_heads, 0), jnp.int32)
  window_idx = (lengths[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :])[:, None, :]
  compressed = jnp.concatenate([prefix_idx, jnp.broadcast_to(window_idx, (n, kv_heads, window))], axis=-1)
  full = keep_all(lengths, kv_heads, budget)
  long = lengths > budget
  indices = jnp.where(long[:, None, None], compressed, full.indices)
  counts = jnp.where(long, budget, full.counts).astype(jnp.int32)
  chex.assert_shape(indices, (n, kv_heads, budget))
  return KeepSelection(indices=indices, counts=counts)


def snapkv_scores(cfg: SnapKVSparseAttentionConfig, q: jax.Array, k: jax.Array, lengths: jax.Array,
                  scale: float, q_start: jax.Array | None = None) -> jax.Array:
  """SnapKV importance of every prefix token per KV head.

  q: [n, Tq, q_heads, D] holding positions q_start.. (0 by default; a chunked prefill passes
  only its last chunk), k: [n, T, kv_heads, D] (roped, positions 0..); lengths: int32[n].
  Returns float32[n, kv_heads, T]: pooled window- and group-summed attention on the prefix
  [0, length - window_size); -inf elsewhere.
  """
  n, tq, q_heads, d = q.shape
  t, kv_heads = k.shape[1], k.shape[2]
  w = cfg.window_size
  win_pos = lengths[:, None] - w + jnp.arange(w)[None, :]  # [n, W] (negative for short rows)
  q_idx = win_pos if q_start is None else win_pos - q_start[:, None]
  q_win = jnp.take_along_axis(q, jnp.clip(q_idx, 0, tq - 1)[:, :, None, None], axis=1)
  q_win = q_win.reshape(n, w, kv_heads, q_heads // kv_heads, d)
  logits = jnp.einsum("nwhgd,nthd->nhgwt", q_win, k, preferred_element_type=jnp.float32) * scale
  key_pos = jnp.arange(t)
  causal = (key_pos[None, None, :] <= win_pos[:, :, None]) & (key_pos[None, None, :] < lengths[:, None, None])
  causal = causal[:, None, None]  # [n, 1, 1, W, T]
  probs = jnp.where(causal, jax.nn.softmax(jnp.where(causal, logits, MASK_VALUE), axis=-1), 0.0)
  prefix = key_pos[None, :] < (lengths - w)[:, None]  # [n, T]
  scores = jnp.where(prefix[:, None, :], probs.sum(axis=(2, 3)), 0.0)  # [n, kv_heads, T]
  pad = cfg.kernel_size // 2
  if cfg.pooling == "avgpool":
    pooled = jax.lax.reduce_window(scores, 0.0, jax.lax.add, (1, 1, cfg.kernel_size), (1, 1, 1),
                                   ((0, 0), (0, 0), (pad, pad))) / cfg.kernel_size
  else:  # scores are >= 0, so zero padding equals PyTorch's -inf padding
    pooled = jax.lax.reduce_window(scores, 0.0, jax.lax.max, (1, 1, cfg.kernel_size), (1, 1, 1),
                                   ((0, 0), (0, 0), (pad, pad)))
  return jnp.where(prefix[:, None, :], pooled, -jnp.inf)


# -- the Algorithm contract ---------------------------------------------------------------

def aux_spec(cfg: SnapKVSparseAttentionConfig, spec) -> dict[str, AuxPoolSpec]:
  """No auxiliary pool (generation is dense)."""
  return {}


def predict_kv(cfg: SnapKVSparseAttentionConfig, spec, q: jax.Array, k: jax.Array,
               lengths: jax.Array, q_start: jax.Array | None = None) -> KeepSelection | None:
  """Tokens each KV head keeps after prefill.

  q: [n, Tq, q_heads, D] holding positions q_start.. (a chunked prefill passes its last chunk,
  which holds the window), k: [n, T, kv_heads, D]; lengths: int32[n]. Returns
  KeepSelection(int32[n, kv_heads, max_capacity_prompt], int32[n]), or None when no row can
  exceed the budget (T <= max_capacity_prompt).
  """
  if k.shape[1] <= cfg.max_capacity_prompt:
    return None
  scores = snapkv_scores(cfg, q, k, lengths, spec.scale, q_start)
  return keep_top_prefix_and_window(scores, lengths, cfg.max_capacity_prompt, cfg.window_size)


def update_aux(cfg: SnapKVSparseAttentionConfig, spec, layer: LayerCache, page_table: jax.Array, start: jax.Array,
               end: jax.Array, max_tokens: int) -> LayerCache:
  return layer


def predict_attn(cfg: SnapKVSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> AttnSelection | None:
  """Generation is dense over the kept tokens."""
  return None


def page_scores(cfg: SnapKVSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                lengths: jax.Array) -> jax.Array:
  """Attention mass of the decode query per KV page (max over KV heads): float32[batch, max_pages]."""
  return oracle.page_scores(None, spec, q, layer, page_table, lengths)


register_algorithm(Algorithm(name="snapkv", config_cls=SnapKVSparseAttentionConfig, aux_spec=aux_spec,
                             predict_kv=predict_kv, update_aux=update_aux, predict_attn=predict_attn,
                             page_scores=page_scores, kept_prompt_tokens=lambda cfg, n: min(n, cfg.max_capacity_prompt),
                             with_budget=lambda cfg, b: dataclasses.replace(cfg, max_capacity_prompt=b),
                             min_final_chunk=lambda cfg: cfg.window_size))
