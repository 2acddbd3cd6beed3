"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention
Sinks"): attention sinks plus a recent window.

The first `sink_tokens` tokens of a sequence (the attention sinks) and the most recent
`window` tokens are what every query attends to.

Context phase: a prompt longer than `sink_tokens + window` is compacted to its sinks and its
last `window` tokens (a KeepSelection; `compacts_prompt = True`). The prompt's own prefill
attention is still dense (whole prompt), as in the paper's evaluation of one long input.

Generation phase: each decode token attends to the sink block(s) and the most recent blocks
of `block_size` tokens (an AttnSelection): blocks [0, ceil(sink_tokens / block_size)) and
the last ceil((window - 1) / block_size) + 1 blocks, which cover the newest `window`
tokens wherever the block boundaries fall. So the attended span is bounded (at most
`sink_blocks + recent_blocks` blocks, a little more than sink_tokens + window at block
granularity) whatever the sequence length. `page_scores` marks only the pages holding sink
or window tokens as worth keeping (1) and every other page as evictable (0), so an engine
that evicts by page score keeps memory bounded as well.

RoPE positions: StreamingLLM's paper re-assigns positions inside the rolling cache (keys
are re-rotated by their cache slot). This engine stores keys post-RoPE at their original
positions and `positions` keeps counting original positions after compaction (what the
engine does for every compacting algorithm), so relative distances between a query and the
recent window are the true ones, while the distance to the sinks keeps growing. Models run
here stay within their trained context, so the paper's re-rotation (needed to stream past
the pre-training length) is not applied.

Defaults (the reference `run_streaming_llama.py`): sink_tokens=4 (its start_size),
window=2000 (its recent_size); block_size=32 (the default KV page size, so decode gathers
whole pages); dense_layers=0 (the reference keeps sinks + window in the cache of every layer).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sparse_jax.algorithms.snapkv import keep_top_prefix_and_window
from sparse_jax.cache import AuxPoolSpec, LayerCache
from sparse_jax.config import Algorithm, BaseSparseAttentionConfig, fail_field, check_positive_int, register_algorithm
from sparse_jax.selection import AttnSelection, KeepSelection


@dataclasses.dataclass(frozen=True)
class StreamingSparseAttentionConfig(BaseSparseAttentionConfig):
  """StreamingLLM settings (YAML `algorithm: streaming`).

  sink_tokens: first tokens always kept and attended (0 = a plain sliding window).
  window: most recent tokens kept and attended.
  block_size: tokens per block of the generation-phase selection.
  """
  algorithm: ClassVar[str] = "streaming"
  compacts_prompt: ClassVar[bool] = True

  sink_tokens: int = 4
  window: int = 2000
  block_size: int = 32

  def __post_init__(self):
    check_positive_int(self, "window", "block_size")
    if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or self.sink_tokens < 0:
      fail_field(type(self).__name__, "sink_tokens", self.sink_tokens, "must be an integer >= 0")

  @property
  def prompt_budget(self) -> int:
    """Tokens a longer prompt is compacted to."""
    return self.sink_tokens + self.window

  @property
  def sink_blocks(self) -> int:
    return -(-self.sink_tokens // self.block_size)

  @property
  def recent_blocks(self) -> int:
    """Blocks that always cover the newest `window` tokens: ceil((window - 1) / block_size) + 1."""
    return -(-(self.window - 1) // self.block_size) + 1


def aux_spec(cfg: StreamingSparseAttentionConfig, spec) -> dict[str, AuxPoolSpec]:
  """No auxiliary pool: the selection depends on lengths only."""
  return {}


def predict_kv(cfg: StreamingSparseAttentionConfig, spec, q: jax.Array, k: jax.Array,
               lengths: jax.Array, q_start: jax.Array | None = None) -> KeepSelection | None:
  """Sinks + last `window` tokens of each prompt longer than sink_tokens + window.

  q: [n, Tq, q_heads, D] (unused: the choice depends on positions only; a chunked prefill
  passes its last chunk, starting at q_start), k: [n, T, kv_heads, D]; lengths: int32[n].
  Returns KeepSelection(int32[n, kv_heads, prompt_budget], int32[n]) or None when T <= prompt_budget.
  """
  del q_start
  n, t = k.shape[:2]
  if t <= cfg.prompt_budget:
    return None
  pos = jnp.arange(t, dtype=jnp.int32)[None, :]
  prefix = pos < (lengths - cfg.window)[:, None]
  # Earlier tokens score higher, so the prefix's top `sink_tokens` are exactly the sinks.
  scores = jnp.where(prefix, -pos.astype(jnp.float32), -jnp.inf)
  scores = jnp.broadcast_to(scores[:, None, :], (n, k.shape[2], t))
  return keep_top_prefix_and_window(scores, lengths, cfg.prompt_budget, cfg.window)


def update_aux(cfg: StreamingSparseAttentionConfig, spec, layer: LayerCache, page_table: jax.Array, start: jax.Array,
               end: jax.Array, max_tokens: int) -> LayerCache:
  return layer


def predict_attn(cfg: StreamingSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                 lengths: jax.Array) -> AttnSelection:
  """Sink blocks + recent blocks per row (the same for every KV head).

  q: [batch, q_heads, D]; page_table: int32[batch, max_pages]; lengths: int32[batch] (the
  decode token included). Returns AttnSelection(int32[batch, kv_heads, max_blocks],
  cfg.block_size) with max_blocks = min(sink_blocks + recent_blocks, blocks in the table).
  """
  batch = q.shape[0]
  bs = cfg.block_size
  table_blocks = -(-page_table.shape[1] * spec.page_size // bs)
  max_blocks = min(cfg.sink_blocks + cfg.recent_blocks, table_blocks)
  n_valid = ((lengths + bs - 1) // bs)[:, None]  # [B, 1]
  j = jnp.arange(max_blocks, dtype=jnp.int32)[None, :]
  short = n_valid <= max_blocks  # every block fits: attend to all of them
  recent = n_valid - max_blocks + j  # the last max_blocks - sink_blocks blocks, for j >= sink_blocks
  blocks = jnp.where(short, jnp.where(j < n_valid, j, -1), jnp.where(j < cfg.sink_blocks, j, recent))
  return AttnSelection(indices=jnp.broadcast_to(blocks[:, None, :], (batch, spec.kv_heads, max_blocks)).astype(jnp.int32),
                       block_size=bs)


def page_scores(cfg: StreamingSparseAttentionConfig, spec, q: jax.Array, layer: LayerCache, page_table: jax.Array,
                lengths: jax.Array) -> jax.Array:
  """1 for KV pages holding a sink or one of the newest `window` tokens, else 0: float32[batch, max_pages]."""
  first = jnp.arange(page_table.shape[1], dtype=jnp.int32)[None, :] * spec.page_size  # [1, P]
  last = first + spec.page_size - 1
  stored = (first < lengths[:, None]) & (page_table >= 0)
  sink = first < cfg.sink_tokens
  recent = last >= (lengths - cfg.window)[:, None]
  return (stored & (sink | recent)).astype(jnp.float32)


register_algorithm(Algorithm(name="streaming", config_cls=StreamingSparseAttentionConfig, aux_spec=aux_spec,
                             predict_kv=predict_kv, update_aux=update_aux, predict_attn=predict_attn,
                             page_scores=page_scores, kept_prompt_tokens=lambda cfg, n: min(n, cfg.prompt_budget),
                             with_budget=lambda cfg, b: dataclasses.replace(cfg, window=max(1, b - cfg.sink_tokens))))
