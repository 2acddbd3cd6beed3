"""Error paths: the server's (a model without a tokenizer, a request the engine fails as a 500 or as
an SSE error event, an unexpected exception as a 500, a stopped engine thread as a 503) and the
engine's KV pool sizing errors (a request larger than the pool, a pool of zero pages).

One tiny random Llama without a tokenizer, served in-process (fastapi's TestClient).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from fastapi.testclient import TestClient

from sparse_jax import KvCacheConfig, LLM, SamplingParams
from sparse_jax.cache import CacheExhaustedError
from sparse_jax.serve import create_app
from tests.model_fixtures import tiny_llama

PAGE, POOL_TOKENS, MAX_SEQ = 8, 32, 64
IDS = [5, 6, 7]
BODY = {"prompt": IDS, "max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def llm():
  return LLM(tiny_llama(3), dtype="float32", backend="reference", max_batch_size=2, max_seq_len=MAX_SEQ,
             decode_chunk_size=4, kv_cache_config=KvCacheConfig(tokens_per_block=PAGE, max_tokens=POOL_TOKENS))


@pytest.fixture()
def app(llm):
  app = create_app(llm, "tiny", stats_log_interval_s=None)
  yield app
  app.state.server.shutdown()


@pytest.fixture()
def client(app):
  with TestClient(app, raise_server_exceptions=False) as c:
    yield c


def error_of(r, status):
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert err["code"] == status and set(err) == {"message", "type", "param", "code"}
  return err


def sse_events(text):
  return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_without_a_tokenizer_text_and_chat_are_400s_and_token_ids_work(client, llm):
  assert llm.tokenizer is None
  err = error_of(client.post("/v1/completions", json={**BODY, "prompt": "hello"}), 400)
  assert "prompt is text but the model has no tokenizer; send a list of token ids" in err["message"]
  assert err["param"] == "prompt"
  err = error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400)
  assert "the model has no tokenizer, so chat is unavailable" in err["message"]
  r = client.post("/v1/completions", json=BODY)
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_a_request_larger_than_the_pool_is_a_400_naming_the_pool(client):
  """max_seq_len (64) allows it; the 4-page pool (32 tokens) cannot hold 30 + 10 tokens."""
  err = error_of(client.post("/v1/completions", json={**BODY, "prompt": [5] * 30, "max_tokens": 10}), 400)
  assert "needs 5 KV pages (40 tokens) but the pool holds only 4; raise kv_cache_config.max_tokens" in err["message"]


def test_engine_failures_are_500s_and_sse_error_events(client, app, monkeypatch):
  engine = app.state.server.engine

  def failing(*args, **kwargs):
    raise RuntimeError("injected decode failure")

  monkeypatch.setattr(engine, "decode_fn", failing)
  err = error_of(client.post("/v1/completions", json=BODY), 500)
  assert err["message"] == "decode failed: RuntimeError: injected decode failure" and err["type"] == "server_error"

  r = client.post("/v1/completions", json={**BODY, "stream": True})
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
  events = sse_events(r.text)
  assert events[-1] == "[DONE]"
  errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
  assert errors == [{"message": "decode failed: RuntimeError: injected decode failure", "type": "server_error",
                     "param": None, "code": 500}]
  assert not any(c["finish_reason"] for e in events[:-1] for c in json.loads(e).get("choices", ()))
  monkeypatch.undo()
  r = client.post("/v1/completions", json=BODY)  # the engine goes on
  assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
  assert engine.allocator.free_pages == engine.allocator.num_pages


def test_an_unexpected_exception_is_a_500_in_the_openai_layout(client, app, monkeypatch):
  def broken(model):
    raise KeyError("lost state")

  monkeypatch.setattr(app.state.server, "check_model", broken)
  err = error_of(client.post("/v1/completions", json=BODY), 500)
  assert err["message"] == "internal error: KeyError: 'lost state'" and err["type"] == "server_error"


def test_a_stopped_engine_thread_is_a_503(client, app):
  app.state.server.loop.stop()
  assert not app.state.server.loop.alive
  err = error_of(client.get("/health"), 503)
  assert err["message"] == "the engine thread has stopped"
  err = error_of(client.post("/v1/completions", json=BODY), 503)
  assert err["message"] == "the engine thread has stopped; the server is shutting down"


def test_the_engine_rejects_a_request_larger_than_the_pool(llm):
  with pytest.raises(ValueError, match=r"prompt 0 needs 5 KV pages \(40 tokens\) but the pool holds only 4"):
    llm.generate([[5] * 30], SamplingParams(max_tokens=10))


def test_a_pool_of_zero_pages_is_an_error(llm, monkeypatch):
  """On an accelerator the pool is sized from its free memory; none free means no page."""
  engine = llm.engine
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [type("Full", (), {"memory_stats": lambda self: {
      "bytes_limit": 1 << 30, "bytes_in_use": 1 << 30}})()])
  with pytest.raises(CacheExhaustedError, match=f"the KV pool would hold no page of {PAGE} tokens"):
    engine._pool_pages(KvCacheConfig(tokens_per_block=PAGE), jnp.float32)
