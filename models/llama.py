"""Llama-family decoder (Llama incl. llama3 RoPE, Mistral, Qwen2, Qwen3) in Flax NNX.

Computes what `transformers`' *ForCausalLM computes for these model types. Two entry points:
  model(input_ids)                                -> logits [B, T, vocab]   (no cache)
  model.prefill(tokens, lengths, slots, cache, rt) -> (last logits [n, vocab], cache)
  model.decode(tokens, cache, active, rt)          -> (logits [S, vocab], cache)
The cached calls run against the explicit `PagedKVCache` pytree; attention is
`sparse_jax.SparseAttention`, so any registered sparse algorithm plugs in through `rt`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.attention import RMSNorm, Runtime, SparseAttention
from sparse_jax.cache import CacheLayout
from sparse_jax.decoder import CachedDecoder
from sparse_jax.rope import RopeSpec

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rope: RopeSpec
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False   # bias on q/k/v (Llama: and on o_proj)
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False          # Qwen3
  max_position_embeddings: int = 2048
  sliding_window: int | None = None
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  hidden_act: str = "silu"

  def __post_init__(self):
    if self.model_type not in LLAMA_FAMILY:
      raise ValueError(f"model_type {self.model_type!r} is not in the Llama family {LLAMA_FAMILY}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} unsupported; expected one of {sorted(_ACTIVATIONS)}")

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
    """From a transformers config.json dict (transformers 4 or 5 rope layout)."""
    model_type = cfg.get("model_type")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope_params = cfg.get("rope_parameters")
    if rope_params is None:
      rope_params = dict(cfg.get("rope_scaling") or {})
    rope = RopeSpec.from_hf(head_dim, rope_params, rope_theta=cfg.get("rope_theta"),
                            max_position_embeddings=cfg.get("max_position_embeddings", 2048))
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    bias = bool(cfg.get("attention_bias", False))
    sliding = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
      sliding = None
    return cls(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim, rope=rope,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bias or model_type == "qwen2", o_bias=bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
        max_position_embeddings=cfg.get("max_position_embeddings", 2048), sliding_window=sliding,
        model_type=model_type, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
        hidden_act=cfg.get("hidden_act", "silu"))

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True), "relu": jax.nn.relu}


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.02))
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)
    self.act = cfg.hidden_act

  def __call__(self, x):
    return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = SparseAttention(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rope=cfg.rope,
        qkv_bias=cfg.attention_bias, o_bias=cfg.o_bias, qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h, attend):
    h = h + attend(self.self_attn, self.input_layernorm(h))
    return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(CachedDecoder, nnx.Module):
  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    param_dtype = param_dtype or dtype
    self.init_backbone(config, lambda i: DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # -- geometry the engine needs to build a cache ---------------------------------
  @property
  def kv_heads(self) -> int:
    return self.config.num_key_value_heads

  @property
  def head_dim(self) -> int:
    return self.config.head_dim

  @property
  def v_head_dim(self) -> int:
    return self.config.head_dim

  def cache_layout(self, sparse=None, page_size: int = 32) -> CacheLayout:
    """K/V pools per layer plus the aux pools the sparse algorithm asks for."""
    aux = {}
    if sparse is not None:
      from sparse_jax.config import get_algorithm
      attn = self.layers[0].self_attn
      aux = get_algorithm(sparse).aux_spec(sparse, attn.spec(page_size, Runtime(sparse=sparse)))
    return CacheLayout(num_layers=self.num_layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                       v_head_dim=self.head_dim, aux_specs=aux)

  def tensor_parallel_spec(self, path: tuple[str, ...], shard_kv: bool):
    """PartitionSpec of one parameter (see sparse_jax/parallel.py for the scheme)."""
    from jax.sharding import PartitionSpec as P
    from sparse_jax.attention import TP_AXIS
    if "mlp" in path:
      split_out = path[-2] in ("gate_proj", "up_proj")
      if path[-1] == "kernel":
        return P(None, TP_AXIS) if split_out else P(TP_AXIS, None)
      return P(TP_AXIS) if split_out else P()
    if "self_attn" in path and shard_kv:
      proj = path[-2]
      if proj in ("q_proj", "k_proj", "v_proj"):
        return P(None, TP_AXIS) if path[-1] == "kernel" else P(TP_AXIS)
      if proj == "o_proj":
        return P(TP_AXIS, None) if path[-1] == "kernel" else P()
    return P()

  def attention_layers(self) -> list[SparseAttention]:
    return [layer.self_attn for layer in self.layers]

  # -- no cache -------------------------------------------------------------------
  def __call__(self, input_ids: jax.Array, lengths: jax.Array | None = None, backend: str = "reference",
               return_hidden: bool = False) -> jax.Array:
    """input_ids: int32[B, T] -> float32 logits [B, T, vocab] (causal)."""
    b, t = input_ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h = self.embed_tokens(input_ids)
    for layer in self.layers:
      h = layer(h, lambda attn, x: attn(x, pos, lengths, backend))
    return h if return_hidden else self.logits(h)

