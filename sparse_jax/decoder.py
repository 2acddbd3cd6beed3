"""The cached forward shared by our decoder models (the engine's `prefill` / `decode` contract).

A model mixes in `CachedDecoder` and builds its backbone with `init_backbone`: `embed_tokens`,
`layers` (each called as `layer(h, attend)`, where `attend(attn, x)` runs its attention layer
against the cache), `norm` and `lm_head` (None when tied to the embedding), under the Hugging
Face parameter names; its attention layers provide `prefill(x, lengths, layer_cache, rows, runtime,
starts, final) -> (out, layer_cache, counts)` and `decode(x, positions, layer_cache, page_table,
lengths, active, runtime) -> (out, layer_cache)`.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.attention import RMSNorm, Runtime
from sparse_jax.cache import PagedKVCache


class CachedDecoder:
  def init_backbone(self, config: Any, make_layer: Callable[[int], nnx.Module], *, dtype, param_dtype,
                    rngs: nnx.Rngs) -> None:
    """The embedding, config.num_hidden_layers decoder layers (make_layer(i)), the final norm
    and, unless tie_word_embeddings, the LM head (initialised in that order)."""
    self.config = config
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([make_layer(i) for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  @property
  def num_layers(self) -> int:
    return self.config.num_hidden_layers

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 logits of hidden states h [..., hidden] (final norm, then the LM head or the tied embedding)."""
    h = self.norm(h)
    if self.lm_head is None:
      return self.embed_tokens.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, slots: jax.Array, cache: PagedKVCache,
              runtime: Runtime = Runtime(), starts: jax.Array | None = None, final: bool = True,
              compact_table: jax.Array | None = None) -> tuple[jax.Array, PagedKVCache]:
    """tokens: int32[n, T] right-padded fresh prompts for batch slots `slots` (int32[n]) whose
    pages are already in cache.page_table; or, with `starts` (int32[n] tokens already stored),
    the next chunk of each prompt (chunked prefill; `final` marks the last chunk).
    compact_table: int32[slots, max_pages] or None: per slot, the pages prompt compression
    writes the kept tokens to (the prompt's own pages stay dense, for the prefix cache).
    Returns (logits of each row's last token of this call float32[n, vocab], cache with
    lengths/positions of those slots set)."""
    n, t = tokens.shape
    chex.assert_shape((lengths, slots), (n,))
    # Padding rows carry an out-of-range slot: they see no pages, so they write nothing.
    rows = jnp.take(cache.page_table, slots, axis=0, mode="fill", fill_value=-1)
    compact_rows = (None if compact_table is None else
                    jnp.take(compact_table, slots, axis=0, mode="fill", fill_value=-1))
    h = self.embed_tokens(tokens)
    counts = lengths
    for i, layer in enumerate(self.layers):
      def attend(attn, x, i=i):
        nonlocal cache, counts
        out, new_layer, counts = attn.prefill(x, lengths, cache.layer(i), rows, runtime.for_layer(i), starts,
                                              final, compact_rows)
        cache = cache.with_layer(i, new_layer)
        return out
      h = layer(h, attend)
    last = jnp.take_along_axis(h, jnp.clip(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    cache = cache.replace(lengths=cache.lengths.at[slots].set(counts.astype(jnp.int32), mode="drop"),
                          positions=cache.positions.at[slots].set(
                              (lengths if starts is None else starts + lengths).astype(jnp.int32), mode="drop"))
    return self.logits(last), cache

  def decode(self, tokens: jax.Array, cache: PagedKVCache, active: jax.Array,
             runtime: Runtime = Runtime()) -> tuple[jax.Array, PagedKVCache]:
    """tokens: int32[S] one per batch slot; active: bool[S]. Appends each active slot's token
    at its `lengths` (RoPE position `positions`) and returns (float32 logits [S, vocab], cache)."""
    s = tokens.shape[0]
    chex.assert_shape(active, (s,))
    h = self.embed_tokens(tokens)
    for i, layer in enumerate(self.layers):
      def attend(attn, x, i=i):
        nonlocal cache
        out, new_layer = attn.decode(x, cache.positions, cache.layer(i), cache.page_table, cache.lengths, active,
                                     runtime.for_layer(i))
        cache = cache.with_layer(i, new_layer)
        return out
      h = layer(h, attend)
    step = active.astype(jnp.int32)
    cache = cache.replace(lengths=cache.lengths + step, positions=cache.positions + step)
    return self.logits(h), cache
