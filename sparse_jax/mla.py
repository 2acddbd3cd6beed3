"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3) with DSA token-sparse attention.

Per token, MLA caches one compressed latent c = RMSNorm(W_DKV x) [kv_lora_rank] and one
rope key k_r [qk_rope_head_dim] shared by all heads (the paged cache's `k` and `v` pools,
kv_heads 1). Head h's key and value are k_h = [W_UK_h c, k_r] and v_h = W_UV_h c, so

    score_h(t, s) = (q_nope_h . W_UK_h c_s + q_rope_h . k_r_s) * scale
                  = ((W_UK_h^T q_nope_h) . c_s + q_rope_h . k_r_s) * scale     (absorbed)
    out_h(t)      = W_UV_h (sum_s p_h(t, s) c_s)

The absorbed form turns decode into MQA with 576-dim keys and 512-dim values over the latent
pool: every head reads the same cached bytes once. Decode and sparse prefill use it (kernels
in pallas_kernels/mla_decode.py, sparse_mla_*); dense prefill expands K/V from the latent (fewer FLOPs for
fresh prompts) and runs plain causal attention.

The layer owns DeepSeek-V3.2's lightning indexer (`LightningIndexer`: checkpoint weights);
the sparse algorithm (DSA, sparse_jax/algorithms/dsa.py) is reached only through its
`Algorithm.mla` hooks: it stores the indexer keys and picks each query's top-k tokens; the
kernels receive the chosen logical token ids (block_size 1) and find them through the page
table.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.common import MASK_VALUE, pow2_at_most
from sparse_jax import rope as rope_lib
from sparse_jax.attention import RMSNorm, Runtime, causal_attention
from sparse_jax.cache import LayerCache, gather_tokens, token_slots, write_tokens
from sparse_jax.config import ConfigError, MlaOps, get_algorithm

@dataclasses.dataclass(frozen=True)
class IndexerSpec:
  """The lightning indexer of one MLA layer (static).

  n_heads / head_dim: `index_n_heads` / `index_head_dim`; rope_dim: RoPE'd leading channels;
  index_topk: the checkpoint's top-k; page_size: tokens per KV page.
  """
  n_heads: int
  head_dim: int
  rope_dim: int
  index_topk: int
  page_size: int


class LayerNorm(nnx.Module):
  """LayerNorm with weight and bias (torch.nn.LayerNorm), computed in float32."""

  def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array, rope_dim: int) -> jax.Array:
  """Non-interleaved (rotate-half) RoPE on the first rope_dim channels. x: [..., heads, D]."""
  from sparse_jax.rope import apply_rope
  return jnp.concatenate([apply_rope(x[..., :rope_dim], cos, sin), x[..., rope_dim:]], axis=-1)


class LightningIndexer(nnx.Module):
  """DSA's lightning indexer (transformers' DeepseekV32Indexer, without its top-k).

  wq_b: q_resid [.., q_dim] -> [.., n_heads * head_dim]; wk: x [.., hidden] -> [.., head_dim];
  k_norm: LayerNorm; weights_proj: x -> [.., n_heads] (computed in float32, as transformers
  keeps it). q_dim is q_lora_rank, or hidden_size for models without a q LoRA.
  """

  def __init__(self, hidden_size: int, q_dim: int, n_heads: int, head_dim: int, rope_dim: int, index_topk: int,
               *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if rope_dim > head_dim:
      raise ValueError(f"qk_rope_head_dim={rope_dim} exceeds index_head_dim={head_dim}")
    self.n_heads, self.head_dim, self.rope_dim, self.index_topk = n_heads, head_dim, rope_dim, index_topk
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.02))
    self.wq_b = linear(q_dim, n_heads * head_dim)
    self.wk = linear(hidden_size, head_dim)
    self.k_norm = LayerNorm(head_dim, 1e-6, param_dtype=param_dtype)
    self.weights_proj = linear(hidden_size, n_heads)

  def spec(self, page_size: int) -> IndexerSpec:
    return IndexerSpec(n_heads=self.n_heads, head_dim=self.head_dim, rope_dim=self.rope_dim,
                       index_topk=self.index_topk, page_size=page_size)

  def queries(self, x: jax.Array, q_resid: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [.., hidden], q_resid: [.., q_dim], cos/sin: [.., rope_dim] ->
    (q [.., n_heads, head_dim] RoPE'd, w float32[.., n_heads] with both scalings folded in:
    w = weights_proj(x) * n_heads^-0.5 * head_dim^-0.5, so I = sum_h w_h ReLU(q_h . k))."""
    q = self.wq_b(q_resid).reshape(*q_resid.shape[:-1], self.n_heads, self.head_dim)
    q = _rope_half(q, cos, sin, self.rope_dim)
    kernel = self.weights_proj.kernel[...].astype(jnp.float32)
    w = jnp.einsum("...h,hn->...n", x.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)
    w = w * (self.n_heads ** -0.5) * (self.head_dim ** -0.5)
    return q, w

  def keys(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [.., hidden] -> k [.., head_dim] (LayerNorm'ed, RoPE'd)."""
    k = self.k_norm(self.wk(x))
    return _rope_half(k[..., None, :], cos, sin, self.rope_dim)[..., 0, :]


def prompt_scores(q: jax.Array, w: jax.Array, k: jax.Array, lengths: jax.Array | None) -> jax.Array:
  """Causal indexer scores of fresh prompts (no cache).

  q: [B, T, H, D]; w: float32[B, T, H]; k: [B, T, D]; lengths: int32[B] or None.
  I[b, t, s] = sum_h w[b, t, h] * ReLU(q[b, t, h] . k[b, s]) for s <= t (and s < length), else -inf.
  Returns float32[B, T, T].
  """
  b, t = q.shape[:2]
  dots = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), k.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  scores = jnp.einsum("bth,bths->bts", w, jax.nn.relu(dots), precision=jax.lax.Precision.HIGHEST)
  pos = jnp.arange(t)
  ok = pos[None, :] <= pos[:, None]
  if lengths is not None:
    ok = ok[None] & (pos[None, None, :] < lengths[:, None, None])
  return jnp.where(ok, scores, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class MLASpec:
  """What an algorithm needs to know about an MLA layer (static). kv_heads is always 1."""
  num_heads: int
  kv_lora_rank: int
  rope_dim: int
  nope_dim: int
  v_head_dim: int
  page_size: int
  scale: float
  indexer: IndexerSpec | None
  runtime: Runtime = Runtime()


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """DeepSeek's interleaved RoPE as transformers computes it: pairs (x0, x1), (x2, x3), ...
  each rotated by one frequency, output de-interleaved as [even parts, odd parts] (q and k
  get the same permutation, so dot products are those of the interleaved layout).

  x: [..., heads, rope_dim]; cos/sin: [..., rope_dim] (= concat(freqs, freqs)).
  """
  half = cos.shape[-1] // 2
  cos, sin = cos[..., None, :half], sin[..., None, :half]
  x1, x2 = x[..., 0::2], x[..., 1::2]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Projection(NamedTuple):
  """MLA inputs of some tokens: q_nope [.., H, dn], q_rope [.., H, dr] (RoPE'd), latent
  [.., R] (normalised), k_rope [.., dr] (RoPE'd), q_resid [.., q_dim] (the indexer's input),
  cos/sin [.., dr]."""
  q_nope: jax.Array
  q_rope: jax.Array
  latent: jax.Array
  k_rope: jax.Array
  q_resid: jax.Array
  cos: jax.Array
  sin: jax.Array


class MLAttention(nnx.Module):
  """MLA with an optional DSA lightning indexer (parameter names as transformers' DeepseekV32Attention).

  Calls (same contract as `SparseAttention`):
    `attn(x, positions, lengths)`: no cache; the indexer's top-k mask applied as transformers does.
    `attn.prefill(x, lengths, layer, page_table_rows, runtime)`: fresh right-padded prompts.
    `attn.decode(x, positions, layer, page_table, lengths, active, runtime)`: one token per slot.
  """

  def __init__(self, hidden_size: int, num_heads: int, *, q_lora_rank: int | None, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rope: rope_lib.RopeSpec, scale: float,
               attention_bias: bool = False, indexer: tuple[int, int, int] | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if rope.rotary_dim != qk_rope_head_dim:
      raise ValueError(f"rope.rotary_dim={rope.rotary_dim} must equal qk_rope_head_dim={qk_rope_head_dim}")
    self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
    self.nope_dim, self.rope_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    self.rope, self.scale, self.dtype = rope, scale, dtype
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.02))
    qk_dim = qk_nope_head_dim + qk_rope_head_dim
    if q_lora_rank is None:
      self.q_proj = linear(hidden_size, num_heads * qk_dim, use_bias=False)
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
    else:
      self.q_proj = None
      self.q_a_proj = linear(hidden_size, q_lora_rank, use_bias=attention_bias)
      self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6, param_dtype=param_dtype)
      self.q_b_proj = linear(q_lora_rank, num_heads * qk_dim, use_bias=False)
    self.kv_a_proj_with_mqa = linear(hidden_size, kv_lora_rank + qk_rope_head_dim, use_bias=attention_bias)
    self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6, param_dtype=param_dtype)
    self.kv_b_proj = linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), use_bias=False)
    self.o_proj = linear(num_heads * v_head_dim, hidden_size, use_bias=attention_bias)
    if indexer is None:
      self.indexer = None
    else:
      n_heads, head_dim, topk = indexer
      self.indexer = LightningIndexer(hidden_size, q_lora_rank or hidden_size, n_heads, head_dim,
                                      qk_rope_head_dim, topk, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # -- static description ------------------------------------------------------------
  def spec(self, page_size: int, runtime: Runtime) -> MLASpec:
    return MLASpec(num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank, rope_dim=self.rope_dim,
                   nope_dim=self.nope_dim, v_head_dim=self.v_head_dim, page_size=page_size, scale=self.scale,
                   indexer=None if self.indexer is None else self.indexer.spec(page_size), runtime=runtime)

  def sparse_ops(self, runtime: Runtime) -> MlaOps | None:
    """The MLA hooks of the runtime's algorithm (None: dense); raises naming the problem when
    this layer cannot serve it."""
    if runtime.sparse is None:
      return None
    algo = get_algorithm(runtime.sparse)
    if algo.mla is None:
      raise ConfigError(f"sparse_attention_config.algorithm={algo.name!r} does not support MLA models "
                        "(DeepSeek); use algorithm 'dsa' or none")
    if self.indexer is None:
      raise ConfigError(f"sparse_attention_config.algorithm={algo.name!r} needs a lightning indexer, and this MLA "
                        "model has none (index_topk / index_n_heads missing from its config)")
    return algo.mla

  # -- projections ---------------------------------------------------------------------
  def project(self, x: jax.Array, positions: jax.Array) -> Projection:
    """x: [..., hidden]; positions: int32[...] -> Projection."""
    cos, sin = rope_lib.cos_sin(self.rope, positions, x.dtype)
    if self.q_proj is None:
      q_resid = self.q_a_layernorm(self.q_a_proj(x))
      q = self.q_b_proj(q_resid)
    else:
      q_resid = x
      q = self.q_proj(x)
    q = q.reshape(*x.shape[:-1], self.num_heads, self.nope_dim + self.rope_dim)
    q_nope, q_rope = q[..., :self.nope_dim], apply_rope_interleaved(q[..., self.nope_dim:], cos, sin)
    ckv = self.kv_a_proj_with_mqa(x)
    latent = self.kv_a_layernorm(ckv[..., :self.kv_lora_rank])
    k_rope = apply_rope_interleaved(ckv[..., None, self.kv_lora_rank:], cos, sin)[..., 0, :]
    return Projection(q_nope, q_rope, latent, k_rope, q_resid, cos, sin)

  def _w_kv(self) -> tuple[jax.Array, jax.Array]:
    """(W_UK [R, H, dn], W_UV [R, H, dv]) from kv_b_proj."""
    w = self.kv_b_proj.kernel[...].reshape(self.kv_lora_rank, self.num_heads, self.nope_dim + self.v_head_dim)
    return w[..., :self.nope_dim], w[..., self.nope_dim:]

  def expand(self, p: Projection) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Non-absorbed q [.., H, dn+dr], k [.., H, dn+dr], v [.., H, dv] of fresh tokens."""
    kv = self.kv_b_proj(p.latent).reshape(*p.latent.shape[:-1], self.num_heads, self.nope_dim + self.v_head_dim)
    k_rope = jnp.broadcast_to(p.k_rope[..., None, :], (*p.k_rope.shape[:-1], self.num_heads, self.rope_dim))
    q = jnp.concatenate([p.q_nope, p.q_rope], axis=-1)
    k = jnp.concatenate([kv[..., :self.nope_dim], k_rope.astype(kv.dtype)], axis=-1)
    return q, k, kv[..., self.nope_dim:]

  def absorbed_query(self, p: Projection) -> jax.Array:
    """[.., H, R + dr]: (W_UK_h^T q_nope_h, q_rope_h), the query of the latent-space attention."""
    w_uk, _ = self._w_kv()
    q_lat = jnp.einsum("...hd,rhd->...hr", p.q_nope, w_uk.astype(p.q_nope.dtype))
    return jnp.concatenate([q_lat, p.q_rope.astype(q_lat.dtype)], axis=-1)

  def output(self, latent_out: jax.Array) -> jax.Array:
    """latent_out [.., H, R] (attention-weighted latents) -> [.., hidden] via W_UV and o_proj."""
    _, w_uv = self._w_kv()
    out = jnp.einsum("...hr,rhv->...hv", latent_out.astype(self.dtype), w_uv.astype(self.dtype))
    return self.o_proj(out.reshape(*out.shape[:-2], self.num_heads * self.v_head_dim))

  def _output_expanded(self, out: jax.Array) -> jax.Array:
    return self.o_proj(out.reshape(*out.shape[:-2], self.num_heads * self.v_head_dim))

  # -- no cache --------------------------------------------------------------------------
  def __call__(self, x: jax.Array, positions: jax.Array, lengths: jax.Array | None = None,
               backend: str = "reference", index_topk: int | None = None) -> jax.Array:
    """x: [B, T, hidden] -> [B, T, hidden]: causal attention where, as in transformers, each
    query attends only to the indexer's top `index_topk` (default: the checkpoint's) tokens."""
    b, t, _ = x.shape
    p = self.project(x, positions)
    q, k, v = self.expand(p)
    topk = None if self.indexer is None else (index_topk or self.indexer.index_topk)
    if topk is None or topk >= t:
      return self._output_expanded(causal_attention(q, k, v, lengths, self.scale, backend=backend))
    ids = self.indexer_topk(x, p, lengths, topk)                              # [B, T, topk]
    picked = jnp.zeros((b, t, t + 1), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], jnp.where(ids < 0, t, ids)].set(True)[..., :t]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
    pos = jnp.arange(t)
    ok = picked[:, None] & (pos[None, None, None, :] <= pos[None, None, :, None])
    probs = jax.nn.softmax(jnp.where(ok, logits, MASK_VALUE), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return self._output_expanded(out)

  def indexer_topk(self, x: jax.Array, p: Projection, lengths: jax.Array | None, topk: int) -> jax.Array:
    """The no-cache (float32, unquantized) selection: int32[B, T, min(topk, T)] ascending, -1 padded."""
    from pallas_kernels.dsa_topk import dsa_topk_reference
    b, t = x.shape[:2]
    q, w = self.indexer.queries(x, p.q_resid, p.cos, p.sin)
    k = self.indexer.keys(x, p.cos, p.sin)
    scores = prompt_scores(q, w, k, lengths)
    return dsa_topk_reference(scores.reshape(b * t, t), min(topk, t)).reshape(b, t, -1)

  # -- cached ----------------------------------------------------------------------------
  def prefill(self, x: jax.Array, lengths: jax.Array, layer: LayerCache, page_table_rows: jax.Array,
              runtime: Runtime, starts: jax.Array | None = None, final: bool = True,
              compact_rows: jax.Array | None = None) -> tuple[jax.Array, LayerCache, jax.Array]:
    """x: [n, T, hidden] right-padded prompts (lengths: int32[n]); page_table_rows: int32[n,
    max_pages] with pages allocated. With `starts` (int32[n] tokens already stored: chunked
    prefill) x holds positions starts.. and attends to everything stored before it too.
    Writes latent, rope key (and indexer keys); returns (out [n, T, hidden], layer, tokens
    stored int32[n]: DSA evicts nothing). `final` and `compact_rows` change nothing here (no
    prompt compression)."""
    del final, compact_rows
    n, t, _ = x.shape
    chex.assert_shape(lengths, (n,))
    chex.assert_shape(page_table_rows, (n, None))
    cfg, ops = runtime.sparse, self.sparse_ops(runtime)
    offset = jnp.zeros((n,), jnp.int32) if starts is None else starts.astype(jnp.int32)
    pos = offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    p = self.project(x, pos)
    page_size, num_pages = layer.k.shape[2], layer.k.shape[1]
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    slots = token_slots(page_table_rows, pos, valid, page_size, num_pages).reshape(-1)
    layer = layer.replace(k=write_tokens(layer.k, slots, p.latent.reshape(n * t, 1, -1)),
                          v=write_tokens(layer.v, slots, p.k_rope.reshape(n * t, 1, -1)))
    stored = (offset + lengths).astype(jnp.int32)
    ids = None
    if ops is not None:
      spec = self.spec(page_size, runtime)
      iq, w = self.indexer.queries(x, p.q_resid, p.cos, p.sin)
      ik = self.indexer.keys(x, p.cos, p.sin)
      layer = ops.write_aux(cfg, spec, layer, slots, ik.reshape(n * t, -1))
      if starts is None:
        ids = ops.select_prefill(cfg, spec, iq, w, layer, page_table_rows, ik, lengths, pos)
      else:
        ids = ops.select_prefill(cfg, spec, iq, w, layer, page_table_rows, None, stored, pos)
    if ids is not None:
      from pallas_kernels.sparse_mla_prefill import sparse_mla_prefill
      out = sparse_mla_prefill(self.absorbed_query(p), layer.k[0], layer.v[0], page_table_rows, ids, self.scale,
                               **runtime.kernel_kwargs())
      return self.output(out), layer, stored
    if starts is None:                                    # fresh prompts: expand K/V, causal attention
      q, k, v = self.expand(p)
      out = causal_attention(q, k, v, lengths, self.scale, backend=runtime.backend)
      return self._output_expanded(out), layer, stored
    return self.output(self.attend_stored(p, layer, page_table_rows, pos, stored)), layer, stored

  def attend_stored(self, p: Projection, layer: LayerCache, rows: jax.Array, q_pos: jax.Array,
                    stored: jax.Array) -> jax.Array:
    """Dense absorbed attention of a chunk's queries over every stored token (plain XLA).

    q_pos: int32[n, T] positions; stored: int32[n] tokens stored. Key s is seen by the query
    at position p iff s <= p and s < stored. Returns the weighted latents [n, T, H, R].
    Queries go in chunks so the [chunk, H, S] logits stay within a fixed memory budget.
    """
    n, t = q_pos.shape
    width = rows.shape[1] * layer.k.shape[2]
    lat = gather_tokens(layer.k, rows, width)[:, 0].astype(jnp.float32)          # [n, S, R]
    kr = gather_tokens(layer.v, rows, width)[:, 0].astype(jnp.float32)           # [n, S, r]
    q = self.absorbed_query(p).astype(jnp.float32)                               # [n, T, H, R + r]
    chunk = max(1, min(t, (1 << 27) // max(1, n * self.num_heads * width)))
    chunk = pow2_at_most(chunk)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    qc = jnp.moveaxis(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(n, n_chunks, chunk, *q.shape[2:]), 1, 0)
    pc = jnp.moveaxis(jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1).reshape(n, n_chunks, chunk), 1, 0)
    key_pos = jnp.arange(width)
    hp = jax.lax.Precision.HIGHEST

    def one(args):
      qi, pi = args
      logits = (jnp.einsum("bqhr,bsr->bqhs", qi[..., :self.kv_lora_rank], lat, precision=hp)
                + jnp.einsum("bqhr,bsr->bqhs", qi[..., self.kv_lora_rank:], kr, precision=hp)) * self.scale
      ok = (key_pos[None, None, :] <= pi[:, :, None]) & (key_pos[None, None, :] < stored[:, None, None])
      probs = jax.nn.softmax(jnp.where(ok[:, :, None, :], logits, MASK_VALUE), axis=-1)
      return jnp.einsum("bqhs,bsr->bqhr", probs, lat, precision=hp)

    out = jnp.moveaxis(jax.lax.map(one, (qc, pc)), 0, 1).reshape(n, n_chunks * chunk, self.num_heads, -1)
    return out[:, :t].astype(p.q_nope.dtype)

  def decode(self, x: jax.Array, positions: jax.Array, layer: LayerCache, page_table: jax.Array,
             lengths: jax.Array, active: jax.Array, runtime: Runtime) -> tuple[jax.Array, LayerCache]:
    """x: [S, hidden] one token per slot; positions: int32[S] RoPE positions; lengths: int32[S]
    tokens stored before this one; active: bool[S]. Absorbed MLA over the DSA-selected tokens
    (or all tokens without a sparse config). Returns (out [S, hidden], layer)."""
    from pallas_kernels.mla_decode import mla_decode
    from pallas_kernels.sparse_mla_decode import sparse_mla_decode
    s = x.shape[0]
    chex.assert_shape((positions, lengths, active), (s,))
    chex.assert_shape(page_table, (s, None))
    cfg, ops = runtime.sparse, self.sparse_ops(runtime)
    p = self.project(x, positions)
    page_size, num_pages = layer.k.shape[2], layer.k.shape[1]
    slot = token_slots(page_table, lengths[:, None], active[:, None], page_size, num_pages)[:, 0]
    layer = layer.replace(k=write_tokens(layer.k, slot, p.latent[:, None]),
                          v=write_tokens(layer.v, slot, p.k_rope[:, None]))
    visible = jnp.where(active, lengths + 1, 0).astype(jnp.int32)
    if ops is None:                       # dense: every stored token, no id list
      out = mla_decode(self.absorbed_query(p), layer.k[0], layer.v[0], page_table, visible, self.scale,
                       **runtime.kernel_kwargs())
      return self.output(out), layer
    spec = self.spec(page_size, runtime)
    iq, w = self.indexer.queries(x, p.q_resid, p.cos, p.sin)
    layer = ops.write_aux(cfg, spec, layer, slot, self.indexer.keys(x, p.cos, p.sin))
    ids = ops.select_decode(cfg, spec, iq, w, layer, page_table, visible)
    out = sparse_mla_decode(self.absorbed_query(p), layer.k[0], layer.v[0], page_table, ids, self.scale,
                            **runtime.kernel_kwargs())
    return self.output(out), layer
