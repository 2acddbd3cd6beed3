"""Loops that drive a model directly, without the LLM engine (no torch needed): a cached prefill
and decode over permuted pages (greedy, or teacher-forced), the no-cache forward, and the
Jaccard similarity of id sets."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.attention import Runtime
from sparse_jax.cache import create_cache_for


def cached_generate(model, prompts, steps, sparse, *, page_size=4, seed=0, backend="reference", interpret=None,
                    pad_to=None):
  """Greedy generation with our paged cache: all prompts prefilled at once (right-padded to
  `pad_to` or the longest, ragged), then `steps - 1` batched decode steps. Every slot's pages
  are a random permutation of the pool. Returns (generated ids [n, steps], logits
  [n, steps, vocab]: prefill's last logits, then each decode step's)."""
  runtime = Runtime(backend=backend, sparse=sparse, interpret=interpret)
  n = len(prompts)
  t = pad_to or max(len(p) for p in prompts)
  pages_per_seq = math.ceil((t + steps) / page_size)
  num_pages = n * pages_per_seq + 5
  rng = np.random.default_rng(seed)
  table = rng.permutation(num_pages)[:n * pages_per_seq].reshape(n, pages_per_seq).astype(np.int32)
  cache = create_cache_for(model.cache_layout(sparse, page_size), num_pages=num_pages, page_size=page_size,
                           batch_slots=n, max_pages_per_seq=pages_per_seq, dtype=jnp.float32)
  cache = cache.replace(page_table=jnp.asarray(table))
  tokens = np.zeros((n, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  graphdef, params = nnx.split(model)

  @jax.jit
  def prefill(params, tokens, cache):
    return nnx.merge(graphdef, params).prefill(tokens, lengths, jnp.arange(n, dtype=jnp.int32), cache, runtime)

  @jax.jit
  def decode(params, tok, cache):
    return nnx.merge(graphdef, params).decode(tok, cache, jnp.ones((n,), bool), runtime)

  logits, cache = prefill(params, jnp.asarray(tokens), cache)
  out, all_logits = [], [logits]
  for _ in range(steps - 1):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(tok)
    logits, cache = decode(params, tok, cache)
    all_logits.append(logits)
  out.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
  return np.stack([np.asarray(o) for o in out], axis=1), np.stack([np.asarray(l) for l in all_logits], axis=1)


def prefill_then_decode(model, runtime, alloc, cache, seqs, lens, steps, t_pad):
  """Teacher-forced: prefills seqs[i][:lens[i]] into slot i (right-padded to t_pad, pages from
  the PageAllocator `alloc`), then `steps` decode steps feeding each sequence's next token.
  Returns (logits [1 + steps, n, vocab]: prefill's last, then each step's; the cache)."""
  n = len(lens)
  for s, length in enumerate(lens):
    alloc.ensure(s, length + steps)
  cache = cache.replace(page_table=jnp.asarray(alloc.table()))
  tokens = np.zeros((n, t_pad), np.int32)
  for i, length in enumerate(lens):
    tokens[i, :length] = seqs[i][:length]
  logits, cache = jax.jit(model.prefill, static_argnames="runtime")(jnp.asarray(tokens), jnp.asarray(lens),
                                                                     jnp.arange(n), cache, runtime=runtime)
  out = [np.asarray(logits)]
  decode = jax.jit(model.decode, static_argnames="runtime")
  for step in range(steps):
    tok = jnp.asarray([seqs[i][lens[i] + step] for i in range(n)], jnp.int32)
    logits, cache = decode(tok, cache, jnp.ones(n, bool), runtime=runtime)
    out.append(np.asarray(logits))
  return np.stack(out), cache


def forward(model, ids, **kwargs):
  """The no-cache forward, jitted: float32 logits [B, T, vocab]."""
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids, **kwargs))
  return np.asarray(fn(params, jnp.asarray(ids, jnp.int32)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """Mean Jaccard similarity of the rows' id sets (-1 ignored)."""
  scores = []
  for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
    x, y = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
    scores.append(len(x & y) / max(1, len(x | y)))
  return float(np.mean(scores))
