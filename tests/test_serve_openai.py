"""The server's OpenAI surface through the `openai` client: n, logprobs / top_logprobs in both
layouts, penalties, min_tokens, seed, echo, stop_reason, stream_options.include_usage; unknown
fields warned about and ignored; a hypothesis fuzz of random request bodies after which the
server still answers a greedy request identically.

The app runs in-process (Starlette's TestClient, which the `openai` client accepts as its HTTP
client) over the tiny word-level model of test_serve. Expected outputs come from `LLM.generate`
with the same SamplingParams, computed before the server's engine thread starts.
"""
from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from sparse_jax import KvCacheConfig, LLM, SamplingParams
from sparse_jax.serve import create_app
from tests.model_fixtures import tiny_llama
from tests.test_serve import CHAT_CONTENT, VOCAB, WORDS, make_tokenizer, prompt_texts

MAX_TOKENS = 5
SEEDED = dict(temperature=1.0, seed=9, n=3)
PENALISED = dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3, min_tokens=3)


@pytest.fixture(scope="module")
def setup():
  tok = make_tokenizer()
  llm = LLM(tiny_llama(7, vocab=len(VOCAB), max_pos=256), tokenizer=tok, dtype="float32", backend="reference",
            max_batch_size=4, max_seq_len=64, decode_chunk_size=4,
            kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256))
  prompt = prompt_texts(1, seed=3)[0]
  chat_ids = tok.encode_chat([{"role": "user", "content": CHAT_CONTENT}], add_generation_prompt=True)
  run = lambda p, **kw: llm.generate(p, SamplingParams(max_tokens=MAX_TOKENS, **kw))[0]
  offline = dict(greedy=run(prompt, temperature=0.0), logprobs=run(prompt, temperature=0.0, logprobs=2),
                 seeded=run(prompt, **SEEDED), penalised=run(prompt, **PENALISED),
                 chat=run(chat_ids, temperature=0.0, logprobs=2), chat_seeded=run(chat_ids, temperature=1.0, seed=4, n=2))
  app = create_app(llm, "tiny", stats_log_interval_s=None)
  with TestClient(app) as client:
    yield dict(llm=llm, client=client, prompt=prompt, offline=offline, tok=tok)
  app.state.server.shutdown()


@pytest.fixture(scope="module")
def openai_client(setup):
  openai = pytest.importorskip("openai")
  return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=setup["client"], max_retries=0)


def test_completions_n_seed_logprobs_penalties_echo(setup, openai_client):
  c, p, offline = openai_client, setup["prompt"], setup["offline"]
  out = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
  ref = offline["logprobs"].outputs[0]
  lp = out.choices[0].logprobs
  assert out.choices[0].text == ref.text
  assert len(lp.tokens) == len(ref.token_ids) == out.usage.completion_tokens
  assert lp.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(ref.token_ids, ref.logprobs)], abs=1e-5)
  assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)  # the 2 best, and the sampled token
  assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

  seeded = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, **SEEDED)
  assert [ch.index for ch in seeded.choices] == [0, 1, 2]
  assert [ch.text for ch in seeded.choices] == [o.text for o in offline["seeded"].outputs]
  assert seeded.usage.completion_tokens == sum(len(o.token_ids) for o in offline["seeded"].outputs)

  penalised = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0.0,
                                   presence_penalty=1.5, frequency_penalty=0.5,
                                   extra_body={"repetition_penalty": 1.3, "min_tokens": 3})  # vLLM's extensions
  assert penalised.choices[0].text == offline["penalised"].outputs[0].text
  assert offline["penalised"].outputs[0].token_ids != offline["greedy"].outputs[0].token_ids

  echoed = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, echo=True)
  assert echoed.choices[0].text == p + offline["greedy"].outputs[0].text
  ids = setup["tok"].encode(p)  # as the server tokenizes a text prompt
  by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=MAX_TOKENS, temperature=0, echo=True, n=2)
  assert [ch.text for ch in by_ids.choices] == [setup["tok"].decode(ids, skip_special_tokens=False)
                                                + offline["greedy"].outputs[0].text] * 2
  streamed = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, echo=True, stream=True)
  assert "".join(ch.text for chunk in streamed for ch in chunk.choices) == echoed.choices[0].text

  greedy = offline["greedy"].outputs[0]
  stop = greedy.text.split()[1]
  stopped = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
  assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].stop_reason == stop
  by_id = c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                               extra_body={"stop_token_ids": [greedy.token_ids[1]]})
  assert by_id.choices[0].stop_reason == greedy.token_ids[1] and by_id.usage.completion_tokens == 2


def test_completions_streaming_n_logprobs_and_usage(setup, openai_client):
  c, p, offline = openai_client, setup["prompt"], setup["offline"]
  chunks = list(c.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, stream=True, logprobs=1,
                                     stream_options={"include_usage": True}, **SEEDED))
  texts, tokens = ["", "", ""], [[], [], []]
  for chunk in chunks[:-1]:
    for ch in chunk.choices:
      texts[ch.index] += ch.text
      tokens[ch.index] += ch.logprobs.tokens
  assert texts == [o.text for o in offline["seeded"].outputs]
  assert [len(t) for t in tokens] == [len(o.token_ids) for o in offline["seeded"].outputs]
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(len(t) for t in tokens)

  # With a stop string the streamed log-probabilities are those of the whole answer's tokens.
  stop = offline["greedy"].outputs[0].text.split()[2]
  kw = dict(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, logprobs=2, stop=[stop])
  whole = c.completions.create(**kw).choices[0].logprobs
  streamed = [ch.logprobs for chunk in c.completions.create(**kw, stream=True) for ch in chunk.choices]
  assert [t for lp in streamed for t in lp.tokens] == whole.tokens
  assert [x for lp in streamed for x in lp.token_logprobs] == pytest.approx(whole.token_logprobs)
  assert [x for lp in streamed for x in lp.text_offset] == whole.text_offset

  # Three engine updates (the prefill's token, then two decode chunks): each chunk's offsets
  # continue from the tokens sent before it.
  kw = dict(model="tiny", prompt=p, max_tokens=2 * 4 + 1, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
  whole = c.completions.create(**kw).choices[0].logprobs
  streamed = [ch.logprobs for chunk in c.completions.create(**kw, stream=True) for ch in chunk.choices]
  assert len(whole.tokens) == 9 and len([lp for lp in streamed if lp.tokens]) >= 3
  assert [x for lp in streamed for x in lp.text_offset] == whole.text_offset


def test_chat_logprobs_n_and_streaming(setup, openai_client):
  c, offline = openai_client, setup["offline"]
  messages = [{"role": "user", "content": CHAT_CONTENT}]
  out = c.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                  logprobs=True, top_logprobs=2)
  ref = offline["chat"].outputs[0]
  content = out.choices[0].logprobs.content
  assert out.choices[0].message.content == ref.text and len(content) == len(ref.token_ids)
  for item, tok, entry in zip(content, ref.token_ids, ref.logprobs):
    assert item.logprob == pytest.approx(entry[tok].logprob, abs=1e-5)
    assert len(item.top_logprobs) == 2 and item.bytes == list(item.token.encode())
  assert out.choices[0].stop_reason is None
  streamed = [ch.logprobs for chunk in c.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                                  temperature=0, logprobs=True, top_logprobs=2,
                                                                  stream=True)
              for ch in chunk.choices if ch.logprobs is not None]
  assert [(i.token, i.logprob) for lp in streamed for i in lp.content] == [(i.token, i.logprob) for i in content]
  plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
  assert plain.choices[0].logprobs is None

  two = dict(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=1.0, seed=4, n=2)
  whole = c.chat.completions.create(**two)
  assert [ch.message.content for ch in whole.choices] == [o.text for o in offline["chat_seeded"].outputs]
  pieces = ["", ""]
  reasons = [None, None]
  for chunk in c.chat.completions.create(**two, stream=True, stream_options={"include_usage": True}):
    for ch in chunk.choices:
      pieces[ch.index] += ch.delta.content or ""
      reasons[ch.index] = ch.finish_reason or reasons[ch.index]
  assert pieces == [ch.message.content for ch in whole.choices]
  assert reasons == [ch.finish_reason for ch in whole.choices]


def test_unknown_fields_are_logged_and_ignored(setup, caplog):
  client, p = setup["client"], setup["prompt"]
  with caplog.at_level(logging.WARNING, logger="sparse_jax.serve"):
    r = client.post("/v1/completions", json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
                                             "best_of_the_future": 3, "stream_options": None,
                                             "logit_bias": {}, "best_of": 1, "suffix": None})
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w1", "mood": "x"}],
                                                      "max_tokens": 2, "logit_bias_v9": {}})
  assert r.status_code == 200 and r.json()["choices"][0]["text"] == setup["offline"]["greedy"].outputs[0].text
  assert chat.status_code == 200, chat.text
  warned = " ".join(rec.getMessage() for rec in caplog.records)
  assert "best_of_the_future" in warned and "messages.0.mood" in warned and "logit_bias_v9" in warned


# -- fuzz ------------------------------------------------------------------------------------------

_junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                  st.text(max_size=6), st.lists(st.integers(-5, 200), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# "\ud800": a lone surrogate, which JSON can carry but is not Unicode text
_words = st.lists(st.sampled_from(WORDS + ["zz", "\u00e9", "\u2603", "\ud800"]), min_size=1, max_size=12).map(" ".join)
# Values a well-behaved client may send (some combinations are still refused: min_tokens above
# max_tokens, echo with logprobs, top_logprobs without logprobs).
_VALID = {
    "max_tokens": st.integers(1, 3), "temperature": st.sampled_from([0, 0.0, 0.7, 1.0, 2]),
    "top_p": st.floats(0.05, 1), "top_k": st.integers(0, 5000), "seed": st.integers(-2**63, 2**63 - 1),
    "n": st.integers(1, 2), "stop": st.one_of(st.none(), _words, st.lists(st.sampled_from(WORDS[:8]), max_size=2)),
    "stop_token_ids": st.lists(st.integers(0, len(VOCAB) - 1), max_size=2), "logprobs": st.integers(0, 20),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 3), "ignore_eos": st.booleans(),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "model": st.just("tiny"), "user": st.text(max_size=4), "zz_unknown": _junk,
}
_COMPLETION_ONLY = {"echo": st.booleans()}
_CHAT_ONLY = {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "max_completion_tokens": st.integers(1, 3)}
_prompt = st.one_of(_words, st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=6),
                    st.lists(_words, min_size=1, max_size=2))
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": _words})


def _hostile(body: st.SearchStrategy, keys: list[str]) -> st.SearchStrategy:
  """`body` with up to two of its fields (or of `keys`) replaced by junk of any JSON type."""
  return st.tuples(body, st.lists(st.tuples(st.sampled_from(keys), _junk), max_size=2)).map(
      lambda t: {**t[0], **dict(t[1])})


_completion_body = st.fixed_dictionaries({"prompt": _prompt}, optional={**_VALID, **_COMPLETION_ONLY})
_chat_body = st.fixed_dictionaries({"messages": st.lists(_message, min_size=1, max_size=2)},
                                   optional={**_VALID, **_CHAT_ONLY})
_raw = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode),
                 st.integers(1, 400).map(lambda d: ("[" * d + "]" * d).encode()),  # deep nesting
                 _junk.map(lambda v: json.dumps(v, allow_nan=True).encode()))
_path = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
_case = st.one_of(
    st.tuples(st.just("/v1/completions"), _hostile(_completion_body, ["prompt", *_VALID, *_COMPLETION_ONLY])),
    st.tuples(st.just("/v1/chat/completions"), _hostile(_chat_body, ["messages", *_VALID, *_CHAT_ONLY])),
    st.tuples(_path, _raw))


def test_fuzzed_bodies_never_break_the_server(setup):
  """200 random bodies, valid and hostile: each is answered with a completion or a 4xx in the
  OpenAI error layout; afterwards /health is 200, the greedy answer is unchanged and no KV page
  is held."""
  client, p = setup["client"], setup["prompt"]
  greedy = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
  before = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
  statuses = []

  @settings(max_examples=200, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
  @given(_case, st.sampled_from(["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded"]))
  def send(case, content_type):
    path, body = case
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    r = client.post(path, content=raw, headers={"content-type": content_type})
    statuses.append(r.status_code)
    assert r.status_code in (200, 400, 404), (r.status_code, r.text, raw)
    if r.status_code != 200:
      error = r.json()["error"]
      assert isinstance(error["message"], str) and error["code"] == r.status_code and "type" in error, r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
      assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
    else:
      assert r.json()["choices"], r.text

  send()
  assert len(statuses) >= 200 and statuses.count(200) >= 40 and statuses.count(400) >= 40, statuses
  assert client.get("/health").status_code == 200
  assert client.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == before
  llm = setup["llm"]
  assert llm.engine.allocator.free_pages == llm.engine.allocator.num_pages
