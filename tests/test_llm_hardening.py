"""The LLM API under bad input and failing requests: every bad value raises naming it, a request
that fails inside the engine fails alone, and the next valid call gives the same greedy answer."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from sparse_jax import LLM, KvCacheConfig, RequestError, SamplingParams
from tests.model_fixtures import tiny_llama
from tests.test_serve import VOCAB, make_tokenizer

MARKER = VOCAB.index("w55")  # a prompt starting with this token is the one a test makes fail
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
PROMPTS = ["w1 w2 w3 w4", "w7 w8 w9 w10 w11", "w20 w21 w22"]


@pytest.fixture(scope="module")
def llm():
  llm = LLM(tiny_llama(11, vocab=len(VOCAB), max_pos=128), tokenizer=make_tokenizer(), dtype="float32",
            max_batch_size=4, max_seq_len=64, kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=256),
            decode_chunk_size=4)
  llm.reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
  return llm


def assert_healthy(llm):
  """The engine is idle, no page is held, and greedy answers are unchanged."""
  engine = llm.engine
  assert not engine.has_unfinished()
  assert engine.allocator.free_pages == engine.allocator.num_pages, "pages leaked"
  assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == llm.reference


@pytest.mark.parametrize("kwargs, needle", [
    (dict(seed="abc"), "seed='abc'"), (dict(seed=2**70), f"seed={2**70}"),
    (dict(seed=1180591620717411303424), "seed=1180591620717411303424"),
    (dict(top_k=3e9), "top_k=3000000000.0"), (dict(top_k=3_000_000_000), "top_k=3000000000"),
    (dict(top_k=True), "top_k=True"), (dict(stop=[1, 2]), "stop=[1, 2]"), (dict(stop=5), "stop=5"),
    (dict(stop_token_ids="abc"), "stop_token_ids='abc'"), (dict(stop_token_ids=[-1]), "stop_token_ids=[-1]"),
    (dict(ignore_eos="no"), "ignore_eos='no'"), (dict(ignore_eos=1), "ignore_eos=1"),
    (dict(temperature=math.nan), "temperature=nan"), (dict(temperature=math.inf), "temperature=inf"),
    (dict(temperature="0.5"), "temperature='0.5'"), (dict(top_p=math.nan), "top_p=nan"),
    (dict(max_tokens=True), "max_tokens=True"), (dict(max_tokens=2**40), f"max_tokens={2**40}"),
    (dict(max_tokens=4.0), "max_tokens=4.0"), (dict(temperature=10**400), "temperature=1000"),
    (dict(repetition_penalty=math.nan), "repetition_penalty=nan"), (dict(n=0), "n=0"),
])
def test_every_sampling_field_is_validated(kwargs, needle):
  with pytest.raises(ValueError) as info:
    SamplingParams(**kwargs)
  assert f"SamplingParams.{needle}" in str(info.value)


def test_seeds_of_n_completions_wrap_within_int64():
  from sparse_jax.llm import completions_of
  seeds = [p.seed for p in completions_of(SamplingParams(n=3, seed=2**63 - 2, temperature=1.0))]
  assert seeds == [2**63 - 2, 2**63 - 1, -2**63]


def test_sampling_params_normalises_accepted_forms():
  p = SamplingParams(max_tokens=np.int64(4), temperature=1, top_k=np.int32(5), seed=-3, stop="x",
                     stop_token_ids=(7,), ignore_eos=np.bool_(True))
  assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == \
      (4, 1.0, 5, -3, ["x"], [7], True)
  assert type(p.max_tokens) is int and type(p.ignore_eos) is bool


def test_bad_arguments_to_generate_leave_the_llm_usable(llm):
  with pytest.raises(TypeError, match="prompts must be a string, a list of token ids or a list of those, got NoneType"):
    llm.generate(None)
  with pytest.raises(TypeError, match="prompt 0 must be a string or a list of token ids, got NoneType"):
    llm.generate([None])
  with pytest.raises(TypeError, match="sampling_params must be a SamplingParams .* got dict"):
    llm.generate("w1", {"max_tokens": 3})
  with pytest.raises(ValueError, match=r"SamplingParams.stop=\[1\]"):
    llm.generate("w1", SamplingParams(stop=[1]))
  assert_healthy(llm)


def record_finishes(engine, monkeypatch) -> dict:
  """prompt ids -> (finish_reason, output ids) of every request the engine finishes."""
  finished, real_finish = {}, engine._finish

  def recording_finish(req, reason):
    real_finish(req, reason)
    finished[tuple(req.prompt_ids)] = (reason, list(req.output_ids))

  monkeypatch.setattr(engine, "_finish", recording_finish)
  return finished


def test_a_request_failing_in_prefill_fails_alone(llm, monkeypatch):
  real = llm.engine._prefill_group
  finished = record_finishes(llm.engine, monkeypatch)

  def faulty(group):
    if any(r.prompt_ids[0] == MARKER for r in group):
      raise RuntimeError("injected prefill failure")
    return real(group)

  monkeypatch.setattr(llm.engine, "_prefill_group", faulty)
  with pytest.raises(RequestError, match="prompt 1: prefill failed: RuntimeError: injected prefill failure"):
    llm.generate([PROMPTS[0], "w55 w2 w3 w4", PROMPTS[1]], GREEDY)
  monkeypatch.undo()
  # The engine retried the failed group one request at a time: the others finished correctly.
  tok = llm.tokenizer
  assert finished[tuple(tok.encode(PROMPTS[0]))] == ("length", llm.reference[0])
  assert finished[tuple(tok.encode(PROMPTS[1]))] == ("length", llm.reference[1])
  assert_healthy(llm)


def test_a_request_failing_in_decode_fails_alone_and_the_others_finish(llm, monkeypatch):
  engine = llm.engine
  real = engine.decode_fn
  finished = record_finishes(engine, monkeypatch)

  def faulty(*args, **kwargs):
    active = np.asarray(args[4])
    if any(active[slot] and r.prompt_ids[0] == MARKER for slot, r in engine._running.items()):
      raise RuntimeError("injected decode failure")
    return real(*args, **kwargs)

  monkeypatch.setattr(engine, "decode_fn", faulty)
  with pytest.raises(RequestError, match="prompt 1: decode failed: RuntimeError: injected decode failure"):
    llm.generate([PROMPTS[0], "w55 w9", PROMPTS[2]], GREEDY)
  monkeypatch.undo()
  tok = llm.tokenizer
  assert finished[tuple(tok.encode(PROMPTS[0]))] == ("length", llm.reference[0])
  assert finished[tuple(tok.encode(PROMPTS[2]))] == ("length", llm.reference[2])
  assert_healthy(llm)


def test_a_step_that_loses_the_kv_cache_fails_the_running_requests_and_rebuilds_it(llm, monkeypatch):
  engine = llm.engine
  real = engine.decode_fn
  calls = []

  def consuming(params, cache, *args, **kwargs):
    calls.append(1)
    if len(calls) == 1:  # what a device failure after donation leaves: a deleted pool
      for leaf in jax.tree.leaves(cache):
        leaf.delete()
      raise RuntimeError("injected device failure")
    return real(params, cache, *args, **kwargs)

  monkeypatch.setattr(engine, "decode_fn", consuming)
  with pytest.raises(RequestError, match="lost the KV cache failed: RuntimeError: injected device failure"):
    llm.generate(PROMPTS[:2], GREEDY)
  monkeypatch.undo()
  assert_healthy(llm)


def test_an_on_update_callback_that_raises_cancels_only_its_request(llm):
  engine = llm.engine

  def boom(req):
    raise ValueError("callback bug")

  bad = engine.add_request(llm.tokenizer.encode(PROMPTS[0]), GREEDY, on_update=boom)
  good = engine.add_request(llm.tokenizer.encode(PROMPTS[1]), GREEDY)
  engine.run_until_done()
  assert bad.finish_reason == "abort"
  assert good.finish_reason == "length" and good.output_ids == llm.reference[1]
  assert_healthy(llm)


def test_usage_stops_at_the_stop_string(llm):
  ids, decode = llm.reference[1], llm.tokenizer.decode
  stop = decode(ids[3:4])
  k = next(k for k in range(1, len(ids) + 1) if stop in decode(ids[:k]))  # the token completing the stop
  assert k < len(ids) - 2, "the test needs tokens generated after the stop string"
  out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=10, ignore_eos=True, stop=[stop]))[0].outputs[0]
  assert out.finish_reason == "stop"
  assert out.token_ids == ids[:k], "tokens generated past the stop string were counted"
  assert out.text == decode(ids[:k])[:decode(ids[:k]).index(stop)]
