"""DeepSeek-V3.2 (`deepseek_v32`): MLA attention with the DSA lightning indexer, DeepSeek-V3 MoE.

Computes what `transformers`' DeepseekV32ForCausalLM computes. Same entry points as
models/llama.py:
  model(input_ids)                                 -> logits [B, T, vocab]   (no cache; every
                                                      query attends to its indexer top-k, as
                                                      transformers applies it)
  model.cache_layout(sparse, page_size)            -> CacheLayout (k pool = latent, v pool =
                                                      rope key, kv_heads 1; DSA's aux pools)
  model.prefill(tokens, lengths, slots, cache, rt) -> (last logits [n, vocab], cache)
  model.decode(tokens, cache, active, rt)          -> (logits [S, vocab], cache)
With `rt.sparse` a DSA config the cached calls are token-sparse; with None they are dense MLA.

Layers: RMSNorm -> MLA (sparse_jax/mla.py) -> RMSNorm -> MLP, where layers listed as
"sparse" in `mlp_layer_types` (all but the first `first_k_dense_replace`) use the MoE:
sigmoid router scores + e_score_correction_bias choose `topk_group` of `n_group` expert
groups (by the sum of each group's two best biased scores), then `num_experts_per_tok`
experts inside them; their weights are the unbiased scores, normalised if `norm_topk_prob`,
times `routed_scaling_factor`; plus the shared experts. Routed experts run as grouped
matmuls (`lax.ragged_dot`) over the tokens sorted by expert.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.loading import CheckpointError, ModelType, llama_hf_name, register_model_type
from sparse_jax.attention import RMSNorm, Runtime
from sparse_jax.cache import CacheLayout
from sparse_jax.decoder import CachedDecoder
from sparse_jax.mla import MLAttention
from sparse_jax.rope import RopeSpec

MODEL_TYPE = "deepseek_v32"


@dataclasses.dataclass(frozen=True)
class DeepseekV32Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  moe_intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  rope: RopeSpec
  mlp_layer_types: tuple[str, ...]
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  n_group: int = 8
  topk_group: int = 4
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  index_topk: int | None = 2048
  index_n_heads: int = 64
  index_head_dim: int = 128
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 163840
  hidden_act: str = "silu"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if len(self.mlp_layer_types) != self.num_hidden_layers:
      raise ValueError(f"mlp_layer_types has {len(self.mlp_layer_types)} entries for "
                       f"num_hidden_layers={self.num_hidden_layers}")
    bad = sorted(set(self.mlp_layer_types) - {"dense", "sparse"})
    if bad:
      raise ValueError(f"mlp_layer_types may hold 'dense' or 'sparse', got {bad}")
    if "sparse" in self.mlp_layer_types:
      if self.n_routed_experts % self.n_group:
        raise ValueError(f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}")
      if not 1 <= self.topk_group <= self.n_group:
        raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
      if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
        raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of topk_group="
                         f"{self.topk_group} groups")
    if self.hidden_act != "silu":
      raise ValueError(f"hidden_act {self.hidden_act!r} unsupported (DeepSeek uses silu)")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)^2 (transformers' yarn_apply_mscale)."""
    scale = self.qk_head_dim ** -0.5
    if self.rope.rope_type != "default":
      mscale_all_dim = self.rope.param("mscale_all_dim", 0)
      factor = self.rope.param("factor")
      if mscale_all_dim and factor is not None and factor > 1:
        m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale = scale * m * m
    return scale

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "DeepseekV32Config":
    """From a config.json dict (transformers 5 `rope_parameters` or DeepSeek's `rope_scaling` layout)."""
    layers = cfg["num_hidden_layers"]
    types = cfg.get("mlp_layer_types")
    if types is None:
      n_dense = min(cfg.get("first_k_dense_replace", 3), layers)
      freq = cfg.get("moe_layer_freq", 1)
      types = ["dense" if i < n_dense or (i - n_dense) % freq else "sparse" for i in range(layers)]
    rope_params = cfg.get("rope_parameters")
    if rope_params is None:
      rope_params = dict(cfg.get("rope_scaling") or {})
    rope = RopeSpec.from_hf(cfg["qk_rope_head_dim"], rope_params, rope_theta=cfg.get("rope_theta"),
                            max_position_embeddings=cfg.get("max_position_embeddings", 163840))
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return cls(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg.get("moe_intermediate_size", cfg["intermediate_size"]), num_hidden_layers=layers,
        num_attention_heads=cfg["num_attention_heads"], q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"], rope=rope,
        mlp_layer_types=tuple(types), n_routed_experts=cfg.get("n_routed_experts") or 0,
        n_shared_experts=cfg.get("n_shared_experts") or 0, num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
        n_group=cfg.get("n_group") or 1, topk_group=cfg.get("topk_group") or 1,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)), index_topk=cfg.get("index_topk"),
        index_n_heads=cfg.get("index_n_heads", 64), index_head_dim=cfg.get("index_head_dim", 128),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), attention_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 163840), hidden_act=cfg.get("hidden_act", "silu"),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos)


def _linear(rngs, dtype, param_dtype, din, dout, bias=False):
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, hidden: int, inner: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.gate_proj = _linear(rngs, dtype, param_dtype, hidden, inner)
    self.up_proj = _linear(rngs, dtype, param_dtype, hidden, inner)
    self.down_proj = _linear(rngs, dtype, param_dtype, inner, hidden)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nnx.Module):
  """DeepSeek-V3 group-limited top-k routing (transformers' DeepseekV32TopkRouter); float32."""

  def __init__(self, cfg: DeepseekV32Config, *, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.n_routed_experts, cfg.hidden_size),
                                                          param_dtype))
    self.e_score_correction_bias = nnx.Param(jnp.zeros((cfg.n_routed_experts,), param_dtype))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [N, hidden] -> (expert ids int32[N, k], weights float32[N, k])."""
    cfg = self.cfg
    n = x.shape[0]
    e, g = cfg.n_routed_experts, cfg.n_group
    logits = jnp.einsum("nh,eh->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    biased = scores + self.e_score_correction_bias[...].astype(jnp.float32)
    group_scores = jnp.sum(jax.lax.top_k(biased.reshape(n, g, e // g), 2)[0], axis=-1)      # [N, G]
    _, groups = jax.lax.top_k(group_scores, cfg.topk_group)
    group_ok = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], groups].set(True)
    expert_ok = jnp.repeat(group_ok, e // g, axis=1)
    _, ids = jax.lax.top_k(jnp.where(expert_ok, biased, -jnp.inf), cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if cfg.norm_topk_prob:
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * cfg.routed_scaling_factor


class Experts(nnx.Module):
  """Routed experts as stacked weights: gate/up [E, hidden, inner], down [E, inner, hidden]."""

  def __init__(self, cfg: DeepseekV32Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    init = nnx.initializers.normal(0.02)
    self.gate_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype))
    self.up_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype))
    self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """x: [N, hidden]; ids int32[N, k]; weights float32[N, k] -> sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
    n, k = ids.shape
    num_experts = self.gate_proj.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token].astype(self.dtype)
    dot = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    h = jax.nn.silu(dot(xs, self.gate_proj[...].astype(self.dtype))) * dot(xs, self.up_proj[...].astype(self.dtype))
    y = dot(h.astype(self.dtype), self.down_proj[...].astype(self.dtype))                # [N*k, hidden]
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(y).astype(x.dtype)


class MoE(nnx.Module):
  def __init__(self, cfg: DeepseekV32Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.gate = Router(cfg, param_dtype=param_dtype, rngs=rngs)
    self.experts = Experts(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs) if cfg.n_shared_experts else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    flat = x.reshape(-1, x.shape[-1])
    ids, weights = self.gate(flat)
    out = self.experts(flat, ids, weights).reshape(x.shape)
    return out if self.shared_experts is None else out + self.shared_experts(x)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: DeepseekV32Config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    indexer = None if cfg.index_topk is None else (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk)
    self.self_attn = MLAttention(
        cfg.hidden_size, cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope=cfg.rope, scale=cfg.softmax_scale, attention_bias=cfg.attention_bias, indexer=indexer, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    if cfg.mlp_layer_types[layer_idx] == "sparse":
      self.mlp = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h, attend):
    h = h + attend(self.self_attn, self.input_layernorm(h))
    return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV32ForCausalLM(CachedDecoder, nnx.Module):
  def __init__(self, config: DeepseekV32Config, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    param_dtype = param_dtype or dtype
    self.init_backbone(config, lambda i: DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # -- geometry the engine needs to build a cache ---------------------------------
  @property
  def kv_heads(self) -> int:
    return 1

  @property
  def head_dim(self) -> int:
    return self.config.kv_lora_rank

  @property
  def v_head_dim(self) -> int:
    return self.config.qk_rope_head_dim

  def cache_layout(self, sparse=None, page_size: int = 64) -> CacheLayout:
    """`k` pool: the latent [kv_lora_rank]; `v` pool: the rope key [qk_rope_head_dim]; kv_heads 1;
    with a DSA config, its indexer-key aux pools on the same page ids."""
    aux = {}
    if sparse is not None:
      attn = self.layers[0].self_attn
      runtime = Runtime(sparse=sparse)
      attn.sparse_ops(runtime)                        # rejects algorithms that cannot serve MLA
      aux = runtime.algorithm.aux_spec(sparse, attn.spec(page_size, runtime))
    return CacheLayout(num_layers=self.num_layers, kv_heads=1, head_dim=self.config.kv_lora_rank,
                       v_head_dim=self.config.qk_rope_head_dim, aux_specs=aux)

  def tensor_parallel_spec(self, path: tuple[str, ...], shard_kv: bool):
    """PartitionSpec of one parameter: MLP and expert columns/rows split over the mesh; attention,
    indexer, router, norms and embeddings replicated (the latent cache has one head; see
    sparse_jax/parallel.py)."""
    from jax.sharding import PartitionSpec as P
    from sparse_jax.attention import TP_AXIS
    if "mlp" not in path or "gate" == path[-2] or path[-1] in ("weight", "e_score_correction_bias"):
      return P()
    if "experts" in path and "shared_experts" not in path:  # stacked [E, hidden, inner] / [E, inner, hidden]
      return P(None, None, TP_AXIS) if path[-1] in ("gate_proj", "up_proj") else P(None, TP_AXIS, None)
    proj = path[-2]
    if path[-1] == "kernel":
      return P(None, TP_AXIS) if proj in ("gate_proj", "up_proj") else P(TP_AXIS, None)
    return P(TP_AXIS) if proj in ("gate_proj", "up_proj") else P()

  def attention_layers(self) -> list[MLAttention]:
    return [layer.self_attn for layer in self.layers]

  # -- no cache -------------------------------------------------------------------
  def __call__(self, input_ids: jax.Array, lengths: jax.Array | None = None, backend: str = "reference",
               return_hidden: bool = False, index_topk: int | None = None) -> jax.Array:
    """input_ids: int32[B, T] -> float32 logits [B, T, vocab] (causal, DSA top-k as transformers applies it;
    index_topk overrides the checkpoint's)."""
    b, t = input_ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h = self.embed_tokens(input_ids)
    for layer in self.layers:
      h = layer(h, lambda attn, x: attn(x, pos, lengths, backend, index_topk))
    return h if return_hidden else self.logits(h)



# -- checkpoint names ------------------------------------------------------------------------

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _hf_name(path: tuple) -> tuple[str, bool] | None:
  """Our parameter path -> (HF tensor name, transpose?).

  Stacked routed experts map to expert 0's tensor; `_prepare_tensor` stacks all experts
  from there (the loader maps one parameter to one name), and `_ignored` skips the others.
  """
  parts = [str(p) for p in path]
  leaf = parts[-1]
  if len(parts) >= 4 and parts[-2] == "experts" and leaf in ("gate_proj", "up_proj", "down_proj"):
    return f"model.{'.'.join(parts[:-2])}.experts.0.{leaf}.weight", False
  if leaf == "e_score_correction_bias":
    return "model." + ".".join(parts), False
  return llama_hf_name(path)


def _ignored(name: str) -> bool:
  m = _EXPERT.match(name)
  if m and m.group(2) != "0":
    return True                      # stacked with expert 0
  if name.endswith("rotary_emb.inv_freq"):
    return True
  # A tied checkpoint may still carry lm_head.weight; layer 61 is DeepSeek-V3's multi-token
  # prediction module, which greedy decoding does not use (transformers skips it too).
  return name == "lm_head.weight" or name.startswith("model.layers.61.")


def _prepare_tensor(name: str, array: np.ndarray, store) -> np.ndarray:
  """Routed experts: expert 0's name stands for the stack of every expert ([E, in, out])."""
  m = _EXPERT.match(name)
  if not m:
    return array
  layer, _, proj = m.groups()
  present = {int(e.group(2)) for e in map(_EXPERT.match, store.names())
             if e and e.group(1) == layer and e.group(3) == proj}
  missing = sorted(set(range(max(present) + 1)) - present)
  if missing:
    raise CheckpointError(f"checkpoint is missing tensor 'model.layers.{layer}.mlp.experts.{missing[0]}.{proj}.weight'")
  return np.stack([store.get(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight").T for e in sorted(present)])


def _build(config, dtype, param_dtype, rngs):
  return DeepseekV32ForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


register_model_type(MODEL_TYPE, ModelType(config_from_hf=DeepseekV32Config.from_hf, build=_build, hf_name=_hf_name,
                                          ignored=_ignored, prepare_tensor=_prepare_tensor))
