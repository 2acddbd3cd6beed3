"""The OpenAI-compatible server: concurrency, equality with offline generation, streaming, the
openai client, request validation, pool exhaustion, queue-full rejection and disconnects.

One tiny random Llama with a word-level tokenizer built here, one server under uvicorn on a free
127.0.0.1 port for the whole module. Tests that need the engine to hold still wrap
`engine.step` in a `StepGate` (the engine thread then runs exactly the steps a test allows).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from models import Tokenizer
from sparse_jax import KvCacheConfig, LLM, SamplingParams
from sparse_jax.serve import (_byte_level_alphabet, create_app, describe_validation_errors, stream_safe_prefix,
                               token_bytes)
from tests.model_fixtures import tiny_llama

WORDS = [f"w{i}" for i in range(56)]
SPECIAL = ["<unk>", "<s>", "</s>"]
VOCAB = SPECIAL + WORDS + ["user", "system", "assistant", ":", "."]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }} : {{ m.content }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
PAGE, POOL_TOKENS, MAX_SEQ, MAX_TOKENS, QUEUE = 16, 128, 128, 12, 32
CHAT_CONTENT = " ".join(WORDS[:13])
CHAT_RENDERED = f"user : {CHAT_CONTENT} . assistant :"  # what CHAT_TEMPLATE makes of one user message


def make_tokenizer() -> Tokenizer:
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
  tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIAL)
  return Tokenizer(tok, eos_token_ids=(2,), bos_token_id=1, chat_template=CHAT_TEMPLATE)


def prompt_texts(n: int, seed: int = 0) -> list[str]:
  """Prompts of 17-20 words: one prefill length bucket and one decode page bucket (few compiles)."""
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(17, 21)))) for _ in range(n)]


class StepGate:
  """Wraps `engine.step`: open, the engine runs freely; closed, it runs only the steps allowed."""

  def __init__(self, engine):
    self.engine = engine
    self.real_step = engine.step
    self.cond = threading.Condition()
    self.unlimited = True
    self.permits = 0
    self.steps = 0
    engine.step = self.step

  def step(self):
    with self.cond:
      self.cond.wait_for(lambda: self.unlimited or self.permits > 0)
      if not self.unlimited:
        self.permits -= 1
    self.real_step()
    with self.cond:
      self.steps += 1
      self.cond.notify_all()

  def close(self):
    with self.cond:
      self.unlimited, self.permits = False, 0

  def allow(self, n: int, timeout: float = 60.0):
    """Lets the engine run `n` more steps and waits until it has."""
    with self.cond:
      target = self.steps + n
      self.permits += n
      self.cond.notify_all()
      assert self.cond.wait_for(lambda: self.steps >= target, timeout), "engine did not step"

  def open(self):
    with self.cond:
      self.unlimited = True
      self.cond.notify_all()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


@contextlib.contextmanager
def serving(app):
  """Runs `app` with uvicorn in a daemon thread on a free 127.0.0.1 port; yields its URL; on exit
  stops uvicorn and shuts the app's server down."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  wait_until(lambda: server.started, 30, "uvicorn to start")
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(10)
    app.state.server.shutdown()


@pytest.fixture(scope="module")
def served():
  tok = make_tokenizer()
  model = tiny_llama(7, vocab=len(VOCAB), max_pos=256)
  llm = LLM(model, tokenizer=tok, dtype="float32", backend="reference", max_batch_size=8, max_seq_len=MAX_SEQ,
            kv_cache_config=KvCacheConfig(tokens_per_block=PAGE, max_tokens=POOL_TOKENS), max_queue_size=QUEUE)
  prompts = prompt_texts(32)
  greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
  # Offline references, computed before the server's thread owns the engine.
  offline = {p: o.outputs[0] for p, o in zip(prompts + [CHAT_RENDERED], llm.generate(prompts + [CHAT_RENDERED], greedy))}
  gate = StepGate(llm.engine)
  created = []
  real_add = llm.engine.add_request

  def recording_add(*args, **kwargs):
    req = real_add(*args, **kwargs)
    created.append(req)
    return req

  llm.engine.add_request = recording_add
  app = create_app(llm, "tiny")
  app.state.server.loop.idle_timeout_s = 60.0  # an idle loop must be woken by add_request, not by polling
  with serving(app) as url:
    yield dict(llm=llm, url=url, prompts=prompts, offline=offline, gate=gate, app=app, created=created, tok=tok)
    gate.open()


def post(url: str, path: str, body, timeout: float = 120.0) -> httpx.Response:
  if isinstance(body, (bytes, str)):
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=timeout)
  return httpx.post(url + path, json=body, timeout=timeout)


def wait_idle(llm):
  wait_until(lambda: not llm.engine.has_unfinished(), 60, "the engine to go idle")
  alloc = llm.engine.allocator
  wait_until(lambda: alloc.free_pages == alloc.num_pages, 10, "every KV page to be free")


def test_models_and_health(served):
  r = httpx.get(served["url"] + "/v1/models")
  assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"]
  assert r.json()["data"][0]["max_model_len"] == MAX_SEQ
  h = httpx.get(served["url"] + "/health")
  assert h.status_code == 200 and h.json()["status"] == "ok"


def streamed_completion(url: str, body: dict) -> dict:
  """A streamed completion put back together: text, finish_reason and usage (include_usage)."""
  body = {**body, "stream": True, "stream_options": {"include_usage": True}}
  with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
    assert r.status_code == 200, r.read()
    events = sse_events(r)
  assert events[-1] == "[DONE]"
  chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
  return {"choices": [{"text": "".join(c["text"] for c in chunks), "finish_reason": chunks[-1]["finish_reason"]}],
          "usage": events[-2]["usage"]}


def test_32_concurrent_requests_match_offline_generate(served):
  """32 concurrent greedy requests, every other one streamed, answer what offline generation
  (one request at a time) answers; no KV page is held afterwards."""
  llm, prompts, offline, gate = served["llm"], served["prompts"], served["offline"], served["gate"]
  wait_idle(llm)
  llm.engine.peak_pages = 0
  body = lambda p: {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}

  def ask(i: int) -> dict:
    if i % 2:
      return streamed_completion(served["url"], body(prompts[i]))
    r = post(served["url"], "/v1/completions", body(prompts[i]))
    assert r.status_code == 200, r.text
    return r.json()

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(ask, range(len(prompts))))
  assert len(answers) == 32
  for p, data in zip(prompts, answers):
    choice = data["choices"][0]
    assert choice["text"] == offline[p].text, p
    assert choice["finish_reason"] == offline[p].finish_reason
    assert data["usage"] == {"prompt_tokens": len(p.split()), "completion_tokens": len(offline[p].token_ids),
                             "total_tokens": len(p.split()) + len(offline[p].token_ids)}
  wait_idle(llm)
  # The pool holds 4 such requests (2 pages each) but there are 8 batch slots: admission never
  # overcommits it (the deterministic version of this is the pool-exhaustion test below).
  assert 0 < llm.engine.peak_pages <= llm.engine.allocator.num_pages


def sse_events(response: httpx.Response) -> list:
  events = []
  for line in response.iter_lines():
    if line.startswith("data: "):
      payload = line[len("data: "):]
      events.append(payload if payload == "[DONE]" else json.loads(payload))
  return events


def test_streaming_yields_the_same_text_as_non_streaming(served):
  url = served["url"]
  p = next(q for q in served["prompts"] if len(served["offline"][q].text.split()) >= 2)
  ref = served["offline"][p]
  for stop in (None, " ".join(ref.text.split()[:2])):
    body = {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": stop,
            "stream_options": None}
    whole = post(url, "/v1/completions", body).json()["choices"][0]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}},
                      timeout=60) as r:
      assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
      events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert events[-2]["usage"]["prompt_tokens"] == len(p.split())
    if stop is None:
      assert whole["text"] == ref.text
    else:  # the text stops before the first generated words: nothing may leak into the stream
      assert whole["text"] == "" and whole["finish_reason"] == "stop"


def test_openai_client_completions_and_chat(served):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="x", max_retries=0)
  llm, p = served["llm"], served["prompts"][5]
  done = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0)
  assert done.choices[0].text == served["offline"][p].text
  assert done.usage.completion_tokens == len(served["offline"][p].token_ids)
  streamed = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text

  messages = [{"role": "user", "content": CHAT_CONTENT}]
  expected = served["offline"][CHAT_RENDERED].text  # the tokenizer's chat template was applied
  chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
  assert chat.choices[0].message.role == "assistant"
  assert chat.choices[0].message.content == expected
  assert chat.usage.prompt_tokens == 13 + 5
  stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                          stream=True)
  pieces, reasons = [], []
  for chunk in stream:
    for choice in chunk.choices:
      pieces.append(choice.delta.content or "")
      reasons.append(choice.finish_reason)
  assert "".join(pieces) == expected
  assert reasons[-1] == chat.choices[0].finish_reason
  wait_idle(llm)


@pytest.mark.parametrize("path, body, status, needles", [
    ("/v1/completions", b'{"prompt": "w1", "max_tokens": ', 400, ["malformed JSON"]),
    ("/v1/completions", {"prompt": "w1", "logprobs": 21}, 400, ["logprobs", "less than or equal to 20"]),
    ("/v1/completions", {"prompt": "w1", "logprobs": 2, "echo": True}, 400, ["echo", "logprobs"]),
    ("/v1/completions", {"prompt": "w1", "presence_penalty": 3.0}, 400, ["presence_penalty"]),
    ("/v1/completions", {"prompt": "w1", "max_tokens": 2, "min_tokens": 3}, 400, ["min_tokens=3", "max_tokens=2"]),
    ("/v1/completions", {"prompt": "w1", "max_tokens": -3}, 400, ["max_tokens", "greater than 0"]),
    ("/v1/completions", {"prompt": "w1", "max_tokens": 0}, 400, ["max_tokens"]),
    ("/v1/completions", {"prompt": "w1", "max_tokens": "ten"}, 400, ["max_tokens", "integer"]),
    ("/v1/completions", {"prompt": "w1", "temperature": "hot"}, 400, ["temperature"]),
    ("/v1/completions", {"prompt": 7}, 400, ["prompt"]),
    ("/v1/completions", {"max_tokens": 4}, 400, ["missing required field", "prompt"]),
    ("/v1/completions", {"prompt": " ".join(["w1"] * 120), "max_tokens": MAX_TOKENS}, 400,
     ["prompt has 120 tokens", f"{MAX_SEQ - MAX_TOKENS} allowed", f"max_seq_len={MAX_SEQ}"]),
    ("/v1/completions", {"prompt": [1, 999]}, 400, ["999", "vocabulary"]),
    ("/v1/completions", {"prompt": "w1", "n": 0}, 400, ["n", "greater than or equal to 1"]),
    ("/v1/completions", {"prompt": "w1", "logit_bias": {"5": 10}}, 400, ["logit_bias is not supported"]),
    ("/v1/completions", {"prompt": ["w1"] * 17, "n": 2}, 400, ["34 completions", f"max_queue_size={QUEUE}"]),
    ("/v1/completions", {"prompt": "w1", "best_of": 3}, 400, ["best_of=3", "use n"]),
    ("/v1/completions", {"prompt": "w1", "suffix": "w2"}, 400, ["suffix is not supported"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}],
                              "response_format": {"type": "json_object"}}, 400, ["response_format", "json_object"]),
    ("/v1/completions", {"prompt": "w1", "model": "gpt-9"}, 404, ["gpt-9", "tiny"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2}, 400,
     ["top_logprobs needs logprobs=true"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "w1"}]}, 400, ["messages.0.role"]),
    ("/v1/chat/completions", {"messages": []}, 400, ["messages"]),
])
def test_bad_requests_are_rejected_naming_the_problem(served, path, body, status, needles):
  r = post(served["url"], path, body)
  assert r.status_code == status, r.text
  message = r.json()["error"]["message"]
  for needle in needles:
    assert needle in message, message


def test_pool_exhaustion_queue_full_and_disconnect_free_pages(served):
  """A streaming request takes the whole KV pool; 32 more queue (pool exhausted, slots free); one
  beyond max_queue_size gets 429; the stream's client disconnects, which aborts it and frees its
  pages; then every queued request completes."""
  llm, url, gate, created = served["llm"], served["url"], served["gate"], served["created"]
  engine, alloc = llm.engine, llm.engine.allocator
  wait_idle(llm)
  hog_tokens = MAX_SEQ - 5
  gate.close()
  try:
    with httpx.Client(timeout=60) as client:
      with client.stream("POST", url + "/v1/completions", json={
          "prompt": "w1 w2 w3 w4 w5", "max_tokens": hog_tokens, "temperature": 0, "ignore_eos": True,
          "stream": True}) as hog_response:
        wait_until(lambda: engine.num_waiting == 1, 30, "the long request to queue")
        hog = created[-1]
        gate.allow(1)  # admit + prefill + one decode chunk
        lines = hog_response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
        assert alloc.free_pages == 0 and len(alloc.pages(hog.slot)) == alloc.num_pages

        pool = concurrent.futures.ThreadPoolExecutor(QUEUE)
        prompts = served["prompts"][:QUEUE]
        futures = [pool.submit(post, url, "/v1/completions", {"prompt": p, "max_tokens": MAX_TOKENS,
                                                               "temperature": 0}) for p in prompts]
        wait_until(lambda: engine.num_waiting == QUEUE, 30, "the queue to fill")
        full = post(url, "/v1/completions", {"prompt": prompts[0], "max_tokens": MAX_TOKENS})
        assert full.status_code == 429, full.text
        assert "queue is full" in full.json()["error"]["message"]

        gate.allow(2)  # slots are free but the pool is not: nothing is admitted, the long request goes on
        assert engine.num_waiting == QUEUE and engine.num_running == 1 and not hog.finished
    # Leaving the `with` closed the connection mid-stream: the server aborts the request.
    wait_until(lambda: hog._cancelled, 30, "the server to abort the disconnected stream")
  finally:
    gate.open()
  results = [f.result(timeout=120) for f in futures]
  pool.shutdown()
  assert [r.status_code for r in results] == [200] * QUEUE
  assert [r.json()["choices"][0]["text"] for r in results] == [served["offline"][p].text for p in prompts]
  wait_idle(llm)
  assert hog.finish_reason == "abort" and len(hog.output_ids) < hog_tokens
  assert alloc.free_pages == alloc.num_pages
  assert served["app"].state.server.stats["aborted_by_client"] >= 1


def test_non_streaming_disconnect_aborts_the_request(served):
  llm, url, gate, created = served["llm"], served["url"], served["gate"], served["created"]
  wait_idle(llm)
  gate.close()
  try:
    with pytest.raises(httpx.ReadTimeout):
      post(url, "/v1/completions", {"prompt": "w1 w2", "max_tokens": 8}, timeout=1.0)
    req = created[-1]
    wait_until(lambda: req.finished, 30, "the server to abort the abandoned request")
    assert req.finish_reason == "abort" and llm.engine.num_waiting == 0
  finally:
    gate.open()
  wait_idle(llm)


def test_idle_engine_wakes_on_request(served):
  wait_idle(served["llm"])
  time.sleep(0.3)  # the engine thread is now asleep in wait_for_work (60 s timeout)
  t0 = time.monotonic()
  r = post(served["url"], "/v1/completions", {"prompt": served["prompts"][0], "max_tokens": 2, "temperature": 0})
  assert r.status_code == 200
  assert time.monotonic() - t0 < 15, "the engine thread slept through a new request"


def test_validation_messages_and_stream_holdback_units():
  msg, param = describe_validation_errors([{"type": "missing", "loc": ("body", "prompt"), "msg": "x"}])
  assert msg == "invalid request: prompt: missing required field" and param == "prompt"
  assert stream_safe_prefix("abc de", ["de f"]) == "abc "
  assert stream_safe_prefix("abc d\ufffd", []) == "abc d"
  assert stream_safe_prefix("abc", ["xyz"]) == "abc"


def test_chat_logprob_bytes_of_partial_characters():
  """A token that is part of a character decodes alone to U+FFFD; its `bytes` are the real ones
  (byte-level BPE and SentencePiece byte fallback), so a client can join them into the text."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

  alphabet = _byte_level_alphabet()
  byte_level = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  byte_level.decoder = decoders.ByteLevel()
  fallback = HFTokenizer(models.WordLevel({"<0xE2>": 0, "<0x98>": 1, "<0x83>": 2, "<unk>": 3}, unk_token="<unk>"))
  fallback.decoder = decoders.ByteFallback()
  for backend, ids in ((byte_level, byte_level.encode("\u00e9 \u2603").ids), (fallback, [0, 1, 2])):
    tok = Tokenizer(backend)
    texts = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert "\ufffd" in texts
    assert b"".join(token_bytes(tok, i, t) for i, t in zip(ids, texts)).decode() == tok.decode(ids)
  assert token_bytes(Tokenizer(fallback), 3, "w1") == b"w1"  # a whole token: its text's bytes
