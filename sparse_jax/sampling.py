"""Token sampling on device: greedy, temperature, top-k, top-p, per batch slot."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingState:
  """Per-slot sampling parameters (arrays of length batch_slots).

  temperature: float32 (0 = greedy); top_k: int32 (0 = off); top_p: float32 (1 = off);
  keys: uint32[S, 2] PRNG keys; counters: int32 tokens sampled so far (folded into the key).
  """
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  keys: jax.Array
  counters: jax.Array


def _sample_stochastic(logits: jax.Array, st: SamplingState) -> jax.Array:
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(st.temperature, 1e-6)[:, None]
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  # top-k: keep values >= the k-th largest.
  k = jnp.where(st.top_k > 0, jnp.minimum(st.top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  # top-p over the top-k survivors: keep the smallest prefix whose mass reaches p.
  sorted_masked = jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_masked, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < st.top_p[:, None]
  n_keep = jnp.maximum(jnp.sum(keep_sorted & (sorted_desc >= kth), axis=-1), 1)
  cutoff = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
  masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
  keys = jax.vmap(jax.random.fold_in)(st.keys, st.counters)
  return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked).astype(jnp.int32)


def sample(logits: jax.Array, st: SamplingState) -> jax.Array:
  """logits: float32[S, vocab] -> int32[S]; greedy rows (temperature 0) take the argmax."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  stochastic = jax.lax.cond(jnp.any(st.temperature > 0), _sample_stochastic,
                            lambda lg, s: greedy, logits, st)
  return jnp.where(st.temperature > 0, stochastic, greedy)
