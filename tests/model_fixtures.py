"""Tiny models built in-process for engine and algorithm tests (no checkpoint needed)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.deepseek import DeepseekV32Config, DeepseekV32ForCausalLM
from models.llama import LlamaConfig, LlamaForCausalLM
from sparse_jax.rope import RopeSpec


def tiny_llama(seed: int = 0, *, vocab=97, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
               max_pos=1024, dtype=jnp.float32, eos=()) -> LlamaForCausalLM:
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                    rope=RopeSpec(head_dim, theta=10000.0, max_position_embeddings=max_pos),
                    max_position_embeddings=max_pos, eos_token_ids=tuple(eos))
  return LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def tiny_deepseek(seed: int = 0, **overrides) -> DeepseekV32ForCausalLM:
  """A random 2-layer DeepSeek-V3.2 (dense MLP, then MoE) built in-process, float32."""
  fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=24, rope=RopeSpec(16, theta=10000.0, rope_type="yarn", params=(
                    ("beta_fast", 32), ("beta_slow", 1), ("factor", 4.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                    ("original_max_position_embeddings", 128)), max_position_embeddings=512),
                mlp_layer_types=("dense", "sparse"), n_routed_experts=8, n_group=4, topk_group=2,
                num_experts_per_tok=2, index_topk=8, index_n_heads=16, index_head_dim=32, max_position_embeddings=512)
  fields.update(overrides)
  model = DeepseekV32ForCausalLM(DeepseekV32Config(**fields), rngs=nnx.Rngs(seed))
  # Spread the router's scores (default init leaves them all near sigmoid(0)): no near-ties in routing.
  for layer in model.layers:
    if hasattr(layer.mlp, "gate"):
      gate = layer.mlp.gate
      gate.weight[...] = jax.random.normal(jax.random.key(seed + 1), gate.weight.shape) * 0.3
  return model
