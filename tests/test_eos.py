"""EOS ends generation: the model's EOS ids, the tokenizer's, and on the device inside a decode
chunk (the slot stops generating at its EOS token, the chunk's later steps produce nothing for it
while the other slots go on).

The EOS token is chosen as a token greedy decoding of one tiny random Llama emits early and for
the first time, in the middle of the first decode chunk, so that every stop is observable.
"""
from __future__ import annotations

import pytest

from models import Tokenizer
from sparse_jax import LLM, SamplingParams
from tests.model_fixtures import tiny_llama

SEED, PROMPT, OTHER, MAX_TOKENS, CHUNK = 2, [5, 6], [40, 41, 42], 12, 8
VOCAB = 97


def _llm(eos=(), tokenizer=None):
  return LLM(tiny_llama(SEED, eos=eos), tokenizer=tokenizer, dtype="float32", max_batch_size=2, max_seq_len=64,
             decode_chunk_size=CHUNK)


@pytest.fixture(scope="module")
def free():
  """Greedy tokens without EOS, the EOS token and its index `at` (its first occurrence)."""
  tokens = _llm().generate([PROMPT, OTHER], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
  free, other = (o.outputs[0].token_ids for o in tokens)
  # Token 0 comes from the prefill, tokens 1..CHUNK from the first decode chunk: an EOS at
  # 1 <= at < CHUNK stops the slot before the chunk's last step.
  at = next(i for i in range(1, CHUNK - 1) if free[i] not in free[:i])
  return free, other, free[at], at


def word_tokenizer(eos: int) -> Tokenizer:
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
  tok = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return Tokenizer(tok, eos_token_ids=(eos,))


def test_the_models_eos_ends_generation(free):
  tokens, _, eos, at = free
  llm = _llm(eos=(eos,))
  assert llm.engine.eos_token_ids == (eos,)
  out = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS))[0].outputs[0]
  assert out.token_ids == tokens[:at + 1] and out.finish_reason == "stop" and out.stop_reason is None
  ignored = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].outputs[0]
  assert ignored.token_ids == tokens and ignored.finish_reason == "length"


def test_the_tokenizers_eos_ends_generation(free):
  """A model config without EOS ids: the tokenizer's (generation_config / eos_token) end it."""
  tokens, _, eos, at = free
  llm = _llm(tokenizer=word_tokenizer(eos))
  assert llm.model.config.eos_token_ids == () and llm.engine.eos_token_ids == (eos,)
  out = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS))[0].outputs[0]
  assert out.token_ids == tokens[:at + 1] and out.finish_reason == "stop"
  assert out.text == " ".join(f"t{t}" for t in tokens[:at + 1])


def test_eos_stops_the_slot_on_the_device_mid_chunk(free):
  """The slot that samples EOS at step `at` of an 8-step decode chunk generates nothing in the
  chunk's remaining steps (the engine counts only tokens the device produced), while a request
  batched with it that ignores EOS runs the whole chunk and is unaffected."""
  tokens, other, eos, at = free
  llm = _llm(eos=(eos,))
  outs = llm.generate([PROMPT, OTHER], [SamplingParams(max_tokens=MAX_TOKENS),
                                        SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)])
  assert outs[0].outputs[0].token_ids == tokens[:at + 1]
  assert outs[1].outputs[0].token_ids == other
  # Decode produced tokens 1..at of the first request and 1..MAX_TOKENS-1 of the second; without
  # the on-device stop the first request's slot would also fill the rest of its chunk.
  assert llm.engine.stats["decode_tokens"] == at + (MAX_TOKENS - 1)
  alloc = llm.engine.allocator
  assert alloc.free_pages == alloc.num_pages
