"""SamplingParams' OpenAI surface through the LLM API: penalties and min_tokens (computed on device,
checked against a host loop over the model's full forward), log-probabilities, n, per-request
seeds, stop_reason, TensorRT-LLM-shaped outputs and generate_async.

One tiny random Llama (vocab 97) shared by the module; float32 throughout, so the tolerances are
float32's (1e-4 absolute on log-probabilities).
"""
from __future__ import annotations

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import LLM, SamplingParams
from sparse_jax.llm import Logprob
from sparse_jax.sampling import MAX_TOP_LOGPROBS, SamplingState, TokenHistory, apply_penalties
from tests.model_fixtures import tiny_llama

EOS = 3
PROMPTS = [[5, 6, 7, 5, 9], [11, 12, 13], [20, 21, 20, 21, 20, 22]]
REF_LEN = 32  # the reference forward's padded length (every prompt + generated sequence fits)


@pytest.fixture(scope="module")
def llm():
  return LLM(tiny_llama(11, eos=(EOS,)), dtype="float32", max_batch_size=4, max_seq_len=64, decode_chunk_size=4)


def reference_greedy(model, prompt, params: SamplingParams, eos=(EOS,)):
  """Greedy decoding with vLLM's penalties on the host, one full forward per token: (tokens, raw
  log-softmax rows of the generated positions)."""
  out, rows = [], []
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
  for _ in range(params.max_tokens):
    seq = prompt + out
    padded = np.zeros((1, REF_LEN), np.int32)  # causal: the padding after the sequence changes nothing
    padded[0, :len(seq)] = seq
    logits = np.asarray(forward(state, jnp.asarray(padded)))[0, len(seq) - 1].astype(np.float64)
    rows.append(logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    seen = np.zeros_like(logits, bool)
    seen[prompt + out] = True
    rp = params.repetition_penalty
    logits = np.where(seen, np.where(logits > 0, logits / rp, logits * rp), logits)
    counts = np.bincount(out, minlength=len(logits)) if out else np.zeros(len(logits))
    logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if len(out) < params.min_tokens:
      logits[list(eos) + list(params.stop_token_ids)] = -np.inf
    tok = int(np.argmax(logits))
    out.append(tok)
    if tok in eos or tok in params.stop_token_ids:
      break
  return out, rows


def test_penalties_and_min_tokens_match_a_host_reference(llm):
  """Three requests batched together, each with other penalties (one with none): every token
  equals the host loop's."""
  params = [SamplingParams(max_tokens=10, repetition_penalty=1.8, frequency_penalty=0.7, min_tokens=6),
            SamplingParams(max_tokens=10, presence_penalty=1.5, frequency_penalty=-0.4),
            SamplingParams(max_tokens=10)]
  outs = llm.generate(PROMPTS, params)
  for prompt, p, o in zip(PROMPTS, params, outs):
    expected, _ = reference_greedy(llm.model, prompt, p)
    assert o.outputs[0].token_ids == expected, p
  plain = reference_greedy(llm.model, PROMPTS[0], SamplingParams(max_tokens=10))[0]
  assert outs[0].outputs[0].token_ids != plain, "the penalties changed nothing: the test would not see them"


def test_min_tokens_holds_back_eos():
  """EOS is made a token that greedy decoding emits early: without min_tokens generation ends
  there; with min_tokens it is suppressed (on device) for the first min_tokens tokens."""
  free = LLM(tiny_llama(2), dtype="float32", max_batch_size=2, max_seq_len=64).generate(
      [[5, 6]], SamplingParams(max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
  at = next(i for i in range(1, len(free)) if free[i] not in free[:i])
  eos = free[at]
  llm = LLM(tiny_llama(2, eos=(eos,)), dtype="float32", max_batch_size=2, max_seq_len=64, decode_chunk_size=4)
  early = llm.generate([[5, 6]], SamplingParams(max_tokens=12))[0].outputs[0]
  assert early.token_ids == free[:at + 1] and early.finish_reason == "stop" and early.stop_reason is None
  held = llm.generate([[5, 6]], SamplingParams(max_tokens=12, min_tokens=at + 3))[0].outputs[0]
  assert eos not in held.token_ids[:at + 3] and len(held.token_ids) > at + 3
  expected, _ = reference_greedy(llm.model, [5, 6], SamplingParams(max_tokens=12, min_tokens=at + 3), eos=(eos,))
  assert held.token_ids == expected


def test_logprobs_are_the_models_and_shaped_like_tensorrt_llm(llm):
  k = 4
  out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, logprobs=k, ignore_eos=True))[0].outputs[0]
  tokens, rows = reference_greedy(llm.model, PROMPTS[1], SamplingParams(max_tokens=6, ignore_eos=True), eos=())
  assert out.token_ids == tokens and len(out.logprobs) == 6
  total = 0.0
  for tok, entry, row in zip(out.token_ids, out.logprobs, rows):
    best = np.argsort(-row)[:k]
    assert set(entry) == set(best.tolist()) | {tok}
    assert entry[tok].rank == 1 + int(np.sum(row > row[tok]))
    for t, lp in entry.items():
      assert isinstance(lp, Logprob) and lp.logprob == pytest.approx(row[t], abs=1e-4)
    assert [entry[t].rank for t in best] == list(range(1, k + 1))
    total += row[tok]
  assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)
  none = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0]
  assert none.logprobs is None and none.cumulative_logprob is None and none.token_ids == tokens
  only = llm.generate(PROMPTS[1], SamplingParams(max_tokens=2, logprobs=0, ignore_eos=True))[0].outputs[0]
  assert [list(e) for e in only.logprobs] == [[t] for t in only.token_ids]


def test_seeded_sampling_and_n_are_reproducible_in_any_batch(llm):
  sp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
  alone = llm.generate(PROMPTS[0], sp)[0].outputs[0].token_ids
  crowd = llm.generate(PROMPTS + [PROMPTS[0]], [SamplingParams(max_tokens=5, temperature=0.8)] * 3 + [sp])
  assert crowd[3].outputs[0].token_ids == alone
  many = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True))[0]
  assert [o.index for o in many.outputs] == [0, 1, 2]
  assert many.outputs[0].token_ids == alone
  seed6 = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.0, seed=6, ignore_eos=True))
  assert many.outputs[1].token_ids == seed6[0].outputs[0].token_ids
  assert len({tuple(o.token_ids) for o in many.outputs}) > 1


def test_stop_token_id_is_the_stop_reason(llm):
  free = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
  stop_at = free[3]
  out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, stop_token_ids=[stop_at]))[0]
  o = out.outputs[0]
  assert o.finish_reason == "stop" and o.stop_reason == stop_at and o.token_ids[-1] == stop_at
  assert out.finished and out.prompt_token_ids == PROMPTS[2] and o.length == len(o.token_ids)
  assert llm.generate(PROMPTS[2], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].stop_reason is None


def test_generate_async_final_and_streaming(llm):
  sp = SamplingParams(max_tokens=13, ignore_eos=True)
  expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]

  async def run():
    finals = await asyncio.gather(*(llm.generate_async(p, sp) for p in PROMPTS[:2]))
    pieces, snapshots = [], 0
    async for out in llm.generate_async(PROMPTS[2], sp, streaming=True):
      pieces += out.outputs[0].token_ids_diff
      snapshots += 1
    return finals, pieces, snapshots, out

  finals, pieces, snapshots, last = asyncio.run(run())
  assert [f.outputs[0].token_ids for f in finals] == expected[:2]
  assert pieces == expected[2] and last.finished and snapshots == 3  # prefill + 4, then 4 and 4 (decode_chunk_size)
  assert not llm.engine.has_unfinished() and llm.engine.allocator.free_pages == llm.engine.allocator.num_pages


def test_generate_async_early_close_aborts(llm):
  async def run():
    stream = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True), streaming=True)
    first = await stream.__anext__()
    await stream.aclose()
    return first

  first = asyncio.run(run())
  assert not first.finished
  llm.engine.run_until_done()
  assert llm.engine.allocator.free_pages == llm.engine.allocator.num_pages


def test_apply_penalties_matches_numpy():
  rng = np.random.default_rng(0)
  s, v = 3, 11
  logits = rng.normal(size=(s, v)).astype(np.float32)
  counts = rng.integers(0, 3, size=(s, v)).astype(np.int32)
  prompt = rng.random((s, v)) < 0.3
  stop = np.zeros((s, v), bool)
  stop[:, 2] = True
  st = SamplingState(temperature=jnp.zeros(s), top_k=jnp.zeros(s, jnp.int32), top_p=jnp.ones(s),
                     keys=jnp.zeros((s, 2), jnp.uint32), counters=jnp.asarray([0, 3, 5], jnp.int32),
                     presence_penalty=jnp.asarray([0.5, 0.0, -1.0]), frequency_penalty=jnp.asarray([0.2, 1.0, 0.0]),
                     repetition_penalty=jnp.asarray([1.5, 1.0, 0.8]), min_tokens=jnp.asarray([1, 3, 9], jnp.int32))
  got = np.asarray(apply_penalties(jnp.asarray(logits), st, TokenHistory(jnp.asarray(prompt), jnp.asarray(counts),
                                                                          jnp.asarray(stop))))
  rp = np.asarray(st.repetition_penalty)[:, None]
  seen = prompt | (counts > 0)
  want = np.where(seen, np.where(logits > 0, logits / rp, logits * rp), logits)
  want = want - np.asarray(st.frequency_penalty)[:, None] * counts - np.asarray(st.presence_penalty)[:, None] * (counts > 0)
  want[[0, 2], 2] = -np.inf  # rows 0 and 2 have generated fewer than min_tokens
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # float32 arithmetic in both


@pytest.mark.parametrize("kwargs, match", [
    (dict(presence_penalty=2.5), "presence_penalty=2.5"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"), (dict(min_tokens=40), "min_tokens=40"),
    (dict(logprobs=MAX_TOP_LOGPROBS + 1), f"logprobs={MAX_TOP_LOGPROBS + 1}"), (dict(logprobs=True), "logprobs=True"),
    (dict(n=0), "n=0")])
def test_bad_sampling_params_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(max_tokens=32, **kwargs)
