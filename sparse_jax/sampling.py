"""Token sampling on device, per batch slot: penalties, min_tokens, greedy / temperature / top-k /
top-p, and the log-probabilities of what was sampled, all inside the jitted step with static shapes.

Order (vLLM's): repetition penalty over prompt and generated tokens, frequency and presence
penalties over generated tokens, stop tokens suppressed until `min_tokens`, then temperature,
top-k and top-p. Log-probabilities are those of the model's raw distribution (before penalties
and temperature), as vLLM reports by default.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MAX_TOP_LOGPROBS = 20  # OpenAI's upper bound for `top_logprobs`; the fixed K of the device top-k


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingState:
  """Per-slot sampling parameters (arrays of length batch_slots).

  temperature: float32 (0 = greedy); top_k: int32 (0 = off); top_p: float32 (1 = off);
  keys: uint32[S, 2] PRNG keys; counters: int32 tokens sampled so far (folded into the key);
  presence_penalty, frequency_penalty: float32 (0 = off); repetition_penalty: float32 (1 = off);
  min_tokens: int32 tokens generated before a stop token may be sampled.
  """
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  keys: jax.Array
  counters: jax.Array
  presence_penalty: jax.Array
  frequency_penalty: jax.Array
  repetition_penalty: jax.Array
  min_tokens: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenHistory:
  """Per-slot token sets over the vocabulary, kept on device between steps.

  prompt_mask: bool[S, vocab] tokens in the prompt (repetition penalty);
  output_counts: int32[S, vocab] times each token was generated (all three penalties);
  stop_mask: bool[S, vocab] the slot's stop tokens (EOS unless ignored, stop_token_ids),
    suppressed while fewer than min_tokens were generated.
  """
  prompt_mask: jax.Array
  output_counts: jax.Array
  stop_mask: jax.Array

  @classmethod
  def zeros(cls, slots: int, vocab: int) -> "TokenHistory":
    return cls(jnp.zeros((slots, vocab), bool), jnp.zeros((slots, vocab), jnp.int32), jnp.zeros((slots, vocab), bool))

  def record(self, tokens: jax.Array, active: jax.Array) -> "TokenHistory":
    """Counts `tokens` (int32[S]) as generated in the `active` (bool[S]) slots."""
    rows = jnp.arange(tokens.shape[0])
    return dataclasses.replace(self, output_counts=self.output_counts.at[rows, tokens].add(active.astype(jnp.int32)))

  def rows(self, slots: jax.Array) -> "TokenHistory":
    """The histories of `slots` (int32[R]; out-of-range slots give empty rows)."""
    take = lambda a: jnp.take(a, slots, axis=0, mode="fill", fill_value=0)
    return TokenHistory(take(self.prompt_mask), take(self.output_counts), take(self.stop_mask))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampledLogprobs:
  """logprob: float32[S] of the sampled token; rank: int32[S] its rank (1 = most likely);
  top_ids: int32[S, MAX_TOP_LOGPROBS] and top_logprobs: float32[S, MAX_TOP_LOGPROBS], best first."""
  logprob: jax.Array
  rank: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array


def apply_penalties(logits: jax.Array, st: SamplingState, history: TokenHistory) -> jax.Array:
  """logits: float32[S, vocab] -> the penalised logits, stop tokens at -inf before min_tokens."""
  seen = history.prompt_mask | (history.output_counts > 0)
  rep = st.repetition_penalty[:, None]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  counts = history.output_counts.astype(logits.dtype)
  logits = logits - st.frequency_penalty[:, None] * counts - st.presence_penalty[:, None] * (counts > 0)
  too_early = (st.counters < st.min_tokens)[:, None] & history.stop_mask
  return jnp.where(too_early, -jnp.inf, logits)


def _penalised(logits: jax.Array, st: SamplingState, history: TokenHistory) -> jax.Array:
  any_penalty = jnp.any((st.repetition_penalty != 1) | (st.frequency_penalty != 0) | (st.presence_penalty != 0)
                        | (st.counters < st.min_tokens))
  return jax.lax.cond(any_penalty, apply_penalties, lambda lg, s, h: lg, logits, st, history)


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


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> SampledLogprobs:
  """logits: float32[S, vocab] (raw), tokens: int32[S] -> their log-probabilities and the top ones."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  rank = 1 + jnp.sum(logp > chosen[:, None], axis=-1).astype(jnp.int32)
  k = min(MAX_TOP_LOGPROBS, logits.shape[-1])
  top, ids = jax.lax.top_k(logp, k)
  if k < MAX_TOP_LOGPROBS:  # a vocabulary smaller than K: pad, so that shapes never depend on it
    pad = ((0, 0), (0, MAX_TOP_LOGPROBS - k))
    top, ids = jnp.pad(top, pad, constant_values=-jnp.inf), jnp.pad(ids, pad, constant_values=-1)
  return SampledLogprobs(chosen, rank, ids.astype(jnp.int32), top)


def sample(logits: jax.Array, st: SamplingState, history: TokenHistory | None = None,
           with_logprobs: bool = False) -> tuple[jax.Array, SampledLogprobs | None]:
  """logits: float32[S, vocab] -> (int32[S] tokens, their log-probabilities if `with_logprobs`).

  Greedy rows (temperature 0) take the argmax of the penalised logits."""
  processed = logits if history is None else _penalised(logits, st, history)
  greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)
  stochastic = jax.lax.cond(jnp.any(st.temperature > 0), _sample_stochastic,
                            lambda lg, s: greedy, processed, st)
  tokens = jnp.where(st.temperature > 0, stochastic, greedy)
  return tokens, (token_logprobs(logits, tokens) if with_logprobs else None)
