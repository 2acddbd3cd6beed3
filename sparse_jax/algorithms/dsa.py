"""DeepSeek Sparse Attention (DSA): the lightning indexer and token-level top-k selection.

DSA (DeepSeek-V3.2) makes MLA attention token-sparse. A small learned *lightning indexer*
scores every cached token for each query,

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])          (s <= t, causal)

with `index_n_heads` query heads q[t, h] (dim `index_head_dim`, RoPE on the first
`qk_rope_head_dim` channels), one shared key k[s] per token (LayerNorm'ed, RoPE'd) and
per-head weights w[t, h] = weights_proj(x_t)[h] * index_n_heads^-0.5 * index_head_dim^-0.5.
Each query then attends, in MLA's absorbed form, to its `index_topk` best tokens only. A
sequence holding at most `index_topk` tokens is attended densely (the top-k is everything).

The indexer keys live in the paged cache as an auxiliary pool on the same page ids as the
MLA latent (`aux["indexer_k"]`, `[1, num_pages, page_size, index_head_dim]`). With the FP8
cache (the default, as TensorRT-LLM and DeepSeek store it) each token holds its key in
float8_e4m3fn plus one float32 scale per 128 channels (`aux["indexer_k_scale"]`): 132 bytes
per token at index_head_dim 128.

No Hadamard rotation. DeepSeek's reference code rotates q and k by a Hadamard matrix before
quantizing (dot products are unchanged) to spread outlier channels. For e4m3 -- a floating-
point format with 3 mantissa bits over ~2^15 of range below the block's maximum -- a small
channel keeps its relative precision unless it is 2^15 times below the largest one, which
LayerNorm'ed keys never are; rotating mixes the few dominant channels into all 128, and the
scores come out *less* accurate. tests/test_dsa.py measures it (Gaussian, outlier-channel
and log-normal keys, and the model's own indexer keys): skipping the rotation costs nothing.
Queries are not quantized (they stay in the model's dtype).

DSA evicts nothing (`compacts_prompt = False`), so it works with block reuse
(`kv_cache_config.enable_block_reuse=True`): shared prompt pages hold the same latent and
indexer keys whichever request computed them.

DSA serves MLA models only: the model's `cache_layout` calls `aux_spec` with its MLA spec,
and its attention layer (sparse_jax/mla.py, which owns the `LightningIndexer` module) calls
the `Algorithm.mla` hooks: `write_aux`, `select_prefill`, `select_decode`. It registers no
GQA hooks; `aux_spec` with a GQA layer's spec raises, naming the problem (e.g. a Llama
checkpoint run with `algorithm: dsa`).

dense_layers=0, the only value accepted: DeepSeek-V3.2 runs the indexer and top-k selection in
every layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp

from pallas_kernels.common import pow2_at_most
from sparse_jax.cache import AuxPoolSpec, LayerCache, gather_tokens, write_tokens
from sparse_jax.config import Algorithm, BaseSparseAttentionConfig, ConfigError, MlaOps, fail_field, register_algorithm
from sparse_jax.selection import dense_token_ids

INDEXER_K_DTYPES = {"float8_e4m3fn": jnp.float8_e4m3fn, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
FP8_BLOCK = 128       # channels per FP8 scale (DeepSeek / TensorRT-LLM layout)
FP8_MAX = 448.0       # largest finite float8_e4m3fn
INDEXER_K = "indexer_k"
INDEXER_K_SCALE = "indexer_k_scale"


@dataclasses.dataclass(frozen=True)
class DSASparseAttentionConfig(BaseSparseAttentionConfig):
  """DeepSeek Sparse Attention (YAML `algorithm: dsa`).

  index_topk: tokens each query attends to; None = the checkpoint's `index_topk`.
  indexer_k_dtype: the indexer key cache: "float8_e4m3fn" (one float32 scale per 128
    channels), "bfloat16", or "float32" (exact; tests).
  skip_indexer_for_short_seqs: when no active sequence holds more than index_topk tokens,
    skip the indexer's scoring and top-k (the selection would be every token anyway).

  DSA evicts nothing, so `kv_cache_config.enable_block_reuse=True` is accepted, and
  supports chunked prefill.
  """
  algorithm: ClassVar[str] = "dsa"
  compacts_prompt: ClassVar[bool] = False
  #: a chunk's queries score every stored indexer key (earlier chunks' read back from the cache).
  supports_chunked_prefill: ClassVar[bool] = True
  #: served by MLA attention layers (models/deepseek.py), not by the GQA `SparseAttention`.
  supports_mla: ClassVar[bool] = True

  index_topk: int | None = None
  indexer_k_dtype: str = "float8_e4m3fn"
  skip_indexer_for_short_seqs: bool = True

  def __post_init__(self):
    name = type(self).__name__
    if self.index_topk is not None and (not isinstance(self.index_topk, int) or isinstance(self.index_topk, bool)
                                        or self.index_topk <= 0):
      fail_field(name, "index_topk", self.index_topk, "must be a positive integer or None (= the checkpoint's)")
    if self.indexer_k_dtype not in INDEXER_K_DTYPES:
      fail_field(name, "indexer_k_dtype", self.indexer_k_dtype, f"must be one of {sorted(INDEXER_K_DTYPES)}")
    if not isinstance(self.skip_indexer_for_short_seqs, bool):
      fail_field(name, "skip_indexer_for_short_seqs", self.skip_indexer_for_short_seqs, "must be true or false")
    if self.dense_layers != 0:
      fail_field(name, "dense_layers", self.dense_layers,
                 "must be 0: DeepSeek-V3.2 runs its indexer in every MLA layer, and MLA layers have no dense-layer path")

  def validate_with(self, kv_cache_config, enable_chunked_prefill: bool) -> None:
    # Chunked prefill is native to the MLA layer (a chunk's queries score every stored indexer
    # key), so the GQA chunk contract (Algorithm.chunk_scores) does not apply.
    super().validate_with(kv_cache_config, False)

  def topk(self, checkpoint_topk: int) -> int:
    return checkpoint_topk if self.index_topk is None else self.index_topk

  @property
  def fp8(self) -> bool:
    return self.indexer_k_dtype == "float8_e4m3fn"


def scale_blocks(head_dim: int) -> int:
  """Float32 scales per token in the FP8 cache: one per 128 channels (one if head_dim < 128)."""
  return max(1, head_dim // FP8_BLOCK)


# -- the Algorithm contract --------------------------------------------------------------

def _mla_indexer(spec: Any, what: str) -> Any:
  """The lightning indexer description of an MLA layer's spec (sparse_jax.mla.IndexerSpec)."""
  indexer = getattr(spec, "indexer", None)
  if indexer is None:
    heads = getattr(spec, "q_heads", "?"), getattr(spec, "kv_heads", "?")
    raise ConfigError(
        f"sparse_attention_config.algorithm='dsa' needs an MLA model with a lightning indexer "
        f"(DeepSeek-V3.2, model_type deepseek_v32); {what} was called for a GQA attention layer "
        f"(q_heads={heads[0]}, kv_heads={heads[1]}). Use algorithm 'rocket' (or none) for this model.")
  return indexer


def aux_spec(cfg: DSASparseAttentionConfig, spec: Any) -> dict[str, AuxPoolSpec]:
  """The indexer key cache (+ FP8 scales): per token, on the same page ids as the latent."""
  ix = _mla_indexer(spec, "aux_spec")
  pools = {INDEXER_K: AuxPoolSpec(1, (ix.page_size, ix.head_dim), INDEXER_K_DTYPES[cfg.indexer_k_dtype])}
  if cfg.fp8:
    pools[INDEXER_K_SCALE] = AuxPoolSpec(1, (ix.page_size, scale_blocks(ix.head_dim)), jnp.float32)
  return pools


# -- FP8 keys --------------------------------------------------------------------------

def quantize_fp8(k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token block quantization: k [..., D] -> (float8_e4m3fn [..., D], float32 scales [..., D // 128]).

  scale = amax(|k| over a block of 128 channels) / 448, k_q = k / scale (round to nearest).
  """
  d = k.shape[-1]
  nb = scale_blocks(d)
  blocks = k.astype(jnp.float32).reshape(*k.shape[:-1], nb, d // nb)
  amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  scale = jnp.maximum(amax, 1e-12) / FP8_MAX
  q = jnp.clip(blocks / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  return q.reshape(k.shape), scale[..., 0]


def dequantize_fp8(q: jax.Array, scale: jax.Array) -> jax.Array:
  """Inverse of quantize_fp8: float32 [..., D]."""
  d = q.shape[-1]
  nb = scale.shape[-1]
  return (q.astype(jnp.float32).reshape(*q.shape[:-1], nb, d // nb) * scale[..., None]).reshape(q.shape)


def encode_keys(cfg: DSASparseAttentionConfig, k: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Indexer keys [..., D] as the cache stores them: (keys, FP8 scales or None)."""
  if cfg.fp8:
    return quantize_fp8(k)
  return k.astype(INDEXER_K_DTYPES[cfg.indexer_k_dtype]), None


def decode_keys(keys: jax.Array, scales: jax.Array | None) -> jax.Array:
  """What `encode_keys` stored, as float32."""
  return keys.astype(jnp.float32) if scales is None else dequantize_fp8(keys, scales)


def write_indexer_keys(cfg: DSASparseAttentionConfig, layer: LayerCache, flat_slots: jax.Array,
                       k: jax.Array) -> LayerCache:
  """Stores indexer keys k [N, D] at pool slots flat_slots int32[N] (out of range = dropped)."""
  if INDEXER_K not in layer.aux:
    raise ValueError("the cache has no 'indexer_k' pool: create it from model.cache_layout(sparse=<dsa config>)")
  keys, scales = encode_keys(cfg, k)
  aux = dict(layer.aux)
  aux[INDEXER_K] = write_tokens(aux[INDEXER_K], flat_slots, keys[:, None])
  if scales is not None:
    aux[INDEXER_K_SCALE] = write_tokens(aux[INDEXER_K_SCALE], flat_slots, scales[:, None])
  return layer.replace(aux=aux)


# -- scoring and selection ----------------------------------------------------------------

def stored_keys(cfg: DSASparseAttentionConfig, layer: LayerCache, rows: jax.Array, width: int) -> jax.Array:
  """float32[n, width, D]: the indexer keys the cache holds for the first `width` logical
  tokens of each row (rows: int32[n, max_pages]; tokens of missing pages are garbage: mask them)."""
  keys = gather_tokens(layer.aux[INDEXER_K], rows, width)[:, 0]
  scales = gather_tokens(layer.aux[INDEXER_K_SCALE], rows, width)[:, 0] if cfg.fp8 else None
  return decode_keys(keys, scales)


def select_prefill(cfg: DSASparseAttentionConfig, ix, q: jax.Array, w: jax.Array, keys: jax.Array,
                   key_lengths: jax.Array, q_pos: jax.Array, runtime) -> jax.Array:
  """Each prompt query's top-k tokens.

  q: [n, T, H, D] indexer queries; w: float32[n, T, H]; keys: float32[n, S, D] the indexer
  keys as the cache stores them (decoded); key_lengths: int32[n] keys stored per row; q_pos:
  int32[n, T] the queries' positions. Key s is a candidate of query (b, t) iff
  s <= q_pos[b, t] and s < key_lengths[b]. Returns int32[n, T, min(topk, S)] ascending token
  positions, -1 padded. Queries go in chunks so the [chunk, H, S] dot products stay within a
  fixed memory budget.
  """
  from pallas_kernels.dsa_topk import dsa_topk
  n, t, h, d = q.shape
  s_len = keys.shape[1]
  chex.assert_shape(w, (n, t, h))
  chex.assert_shape(keys, (n, s_len, d))
  chex.assert_shape(q_pos, (n, t))
  topk = min(cfg.topk(ix.index_topk), s_len)
  key_pos = jnp.arange(s_len, dtype=jnp.int32)

  def candidates(pos):                                   # pos [n, c] -> bool[n, c, S]
    return (key_pos[None, None, :] <= pos[:, :, None]) & (key_pos[None, None, :] < key_lengths[:, None, None])

  def dense(_):
    return jnp.where(candidates(q_pos)[..., :topk], key_pos[:topk], -1)

  def sparse(_):
    chunk = max(1, min(t, (1 << 27) // max(1, n * h * s_len)))
    chunk = pow2_at_most(chunk)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    qc = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(n, n_chunks, chunk, h, d)
    wc = jnp.pad(w, ((0, 0), (0, pad), (0, 0))).reshape(n, n_chunks, chunk, h)
    pc = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1).reshape(n, n_chunks, chunk)

    def one_chunk(args):
      qi, wi, pi = args                                 # [n, chunk, H, D], [n, chunk, H], [n, chunk]
      dots = jnp.einsum("bqhd,bsd->bqhs", qi, keys, precision=jax.lax.Precision.HIGHEST)
      scores = jnp.einsum("bqh,bqhs->bqs", wi, jax.nn.relu(dots), precision=jax.lax.Precision.HIGHEST)
      scores = jnp.where(candidates(pi), scores, -jnp.inf).reshape(n * chunk, s_len)
      return dsa_topk(scores, topk, **runtime.kernel_kwargs()).reshape(n, chunk, topk)

    ids = jax.lax.map(one_chunk, (jnp.moveaxis(qc, 1, 0), jnp.moveaxis(wc, 1, 0), jnp.moveaxis(pc, 1, 0)))
    return jnp.moveaxis(ids, 0, 1).reshape(n, n_chunks * chunk, topk)[:, :t]

  if topk >= s_len:
    return dense(None)
  if not cfg.skip_indexer_for_short_seqs:
    return sparse(None)
  return jax.lax.cond(jnp.max(key_lengths) <= topk, dense, sparse, None)


def select_decode(cfg: DSASparseAttentionConfig, ix, q: jax.Array, w: jax.Array, layer: LayerCache,
                  page_table: jax.Array, lengths: jax.Array, runtime) -> jax.Array:
  """Top-k cached tokens for one decode query per slot.

  q: [S, H, D] indexer queries; w: float32[S, H]; layer: pools incl. aux indexer keys (the new
  token already written); page_table: int32[S, max_pages]; lengths: int32[S] tokens stored
  (0 for inactive slots). Returns int32[S, min(topk, max_pages * page_size)] ascending
  token ids, -1 padded.
  """
  from pallas_kernels.dsa_indexer import dsa_indexer_scores
  from pallas_kernels.dsa_topk import dsa_topk
  s = q.shape[0]
  chex.assert_shape(w, (s, ix.n_heads))
  chex.assert_shape((page_table,), (s, None))
  n_tokens = page_table.shape[1] * ix.page_size
  topk = min(cfg.topk(ix.index_topk), n_tokens)
  keys = layer.aux[INDEXER_K][0]
  scales = layer.aux[INDEXER_K_SCALE][0] if cfg.fp8 else None

  def sparse(_):
    if runtime.backend == "pallas":   # the indexer kernel also does the top-k's first radix pass
      scores, hist = dsa_indexer_scores(q, w, keys, scales, page_table, lengths, topk_histograms=True,
                                        **runtime.kernel_kwargs())
      return dsa_topk(scores, topk, histograms=hist, **runtime.kernel_kwargs())
    scores = dsa_indexer_scores(q, w, keys, scales, page_table, lengths, **runtime.kernel_kwargs())
    return dsa_topk(scores, topk, **runtime.kernel_kwargs())

  def dense(_):
    return dense_token_ids(lengths, topk)

  if topk >= n_tokens:
    return dense(None)              # no sequence can outgrow the budget
  if not cfg.skip_indexer_for_short_seqs:
    return sparse(None)
  return jax.lax.cond(jnp.max(lengths) <= topk, dense, sparse, None)


# -- the MLA hooks (Algorithm.mla) ---------------------------------------------------------

def write_aux(cfg: DSASparseAttentionConfig, spec: Any, layer: LayerCache, flat_slots: jax.Array,
              k: jax.Array) -> LayerCache:
  """MlaOps.write_aux: the indexer keys k [N, index_head_dim] of N tokens into the cache."""
  _mla_indexer(spec, "write_aux")
  return write_indexer_keys(cfg, layer, flat_slots, k)


def mla_select_prefill(cfg: DSASparseAttentionConfig, spec: Any, q: jax.Array, w: jax.Array, layer: LayerCache,
                       rows: jax.Array, fresh_keys: jax.Array | None, key_lengths: jax.Array,
                       q_pos: jax.Array) -> jax.Array | None:
  """MlaOps.select_prefill: `select_prefill` over the keys as decode will read them back (fresh
  prompts: their own keys through the cache's encoding; chunks: every key stored in `rows`), or
  None where the top-k covers every candidate key (dense attention)."""
  ix = _mla_indexer(spec, "select_prefill")
  topk = cfg.topk(ix.index_topk)
  if fresh_keys is not None:
    if topk >= q.shape[1]:
      return None
    keys = decode_keys(*encode_keys(cfg, fresh_keys))
  else:
    width = rows.shape[1] * ix.page_size
    if topk >= width:
      return None
    keys = stored_keys(cfg, layer, rows, width)
  return select_prefill(cfg, ix, q, w, keys, key_lengths, q_pos, spec.runtime)


def mla_select_decode(cfg: DSASparseAttentionConfig, spec: Any, q: jax.Array, w: jax.Array, layer: LayerCache,
                      page_table: jax.Array, lengths: jax.Array) -> jax.Array:
  """MlaOps.select_decode: `select_decode` for the layer described by `spec`."""
  return select_decode(cfg, _mla_indexer(spec, "select_decode"), q, w, layer, page_table, lengths, spec.runtime)


ALGORITHM = register_algorithm(Algorithm(
    name="dsa", config_cls=DSASparseAttentionConfig, aux_spec=aux_spec,
    mla=MlaOps(write_aux=write_aux, select_prefill=mla_select_prefill, select_decode=mla_select_decode),
    with_budget=lambda cfg, b: dataclasses.replace(cfg, index_topk=b)))
