"""`sparse_jax.SparseAttention` as a drop-in: a small Flax NNX decoder written here swaps its attention."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparse_jax
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.cache import PageAllocator, create_cache
from sparse_jax.rope import RopeSpec


class PlainAttention(nnx.Module):
  """The test model's own attention (MHA, no cache)."""

  def __init__(self, dim, heads, rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x, positions):
    b, t, dim = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, dim // self.heads), 3, axis=2)
    mask = jnp.tril(jnp.ones((t, t), bool))
    o = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=mask[None, None])
    return self.out(o.reshape(b, t, dim))


class TinyDecoder(nnx.Module):
  def __init__(self, vocab=50, dim=32, heads=4, layers=2, *, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(layers)])
    self.attns = nnx.List([PlainAttention(dim, heads, rngs) for _ in range(layers)])
    self.mlps = nnx.List([nnx.Linear(dim, dim, rngs=rngs) for _ in range(layers)])
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, ids):
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    h = self.embed(ids)
    for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
      h = h + attn(norm(h), pos)
      h = h + jax.nn.gelu(mlp(h))
    return self.head(h)


def test_swap_in_sparse_attention_and_run_the_paged_cache():
  model = TinyDecoder(rngs=nnx.Rngs(0))
  dim, heads, kv_heads, head_dim = 32, 4, 2, 8
  # The swap: every layer's attention becomes sparse_jax.SparseAttention (GQA + RoPE + paged cache).
  model.attns = nnx.List([sparse_jax.SparseAttention(dim, heads, kv_heads, head_dim, rope=RopeSpec(head_dim),
                                                     rngs=nnx.Rngs(i)) for i in range(2)])
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(1, 40)))
  full = model(ids)  # no-cache path of the swapped-in layers
  assert full.shape == (1, 40, 50)

  rk = RocketSparseAttentionConfig(prompt_budget=64, window_size=8, kernel_size=5, topr=1.0, topk=16, page_size=4,
                                   kt_cache_dtype="float32")
  runtime = sparse_jax.Runtime(sparse=rk)
  page = 8
  alloc = PageAllocator(16, page, 1, 8)
  alloc._free = list(np.random.default_rng(1).permutation(16))
  alloc.ensure(0, 41)
  spec = model.attns[0].spec(page, runtime)
  aux = sparse_jax.get_algorithm(rk).aux_spec(rk, spec)
  cache = create_cache(num_layers=2, kv_heads=kv_heads, head_dim=head_dim, num_pages=16, page_size=page, batch_slots=1,
                       max_pages_per_seq=8, dtype=jnp.float32, aux_specs=aux)
  table = jnp.asarray(alloc.table())
  lengths = jnp.asarray([39])

  # Prefill 39 tokens through each layer's cache, then decode token 40.
  h = model.embed(ids[:, :39])
  for i, (norm, attn, mlp) in enumerate(zip(model.norms, model.attns, model.mlps)):
    out, layer, counts = attn.prefill(norm(h), lengths, cache.layer(i), table, runtime)
    cache = cache.with_layer(i, layer)
    h = h + out
    h = h + jax.nn.gelu(mlp(h))
  h = model.embed(ids[:, 39])
  for i, (norm, attn, mlp) in enumerate(zip(model.norms, model.attns, model.mlps)):
    out, layer = attn.decode(norm(h), jnp.asarray([39]), cache.layer(i), table, counts, jnp.ones(1, bool), runtime)
    cache = cache.with_layer(i, layer)
    h = h + out
    h = h + jax.nn.gelu(mlp(h))
  np.testing.assert_allclose(np.asarray(model.head(h)[0]), np.asarray(full[0, 39]), atol=1e-5)
