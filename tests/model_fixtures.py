"""Tiny models built in-process for engine and algorithm tests (no checkpoint needed)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.llama import LlamaConfig, LlamaForCausalLM
from sparse_jax.rope import RopeSpec


def tiny_llama(seed: int = 0, *, vocab=97, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
               max_pos=1024, dtype=jnp.float32, eos=()) -> LlamaForCausalLM:
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                    rope=RopeSpec(head_dim, theta=10000.0, max_position_embeddings=max_pos),
                    max_position_embeddings=max_pos, eos_token_ids=tuple(eos))
  return LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
