"""The OpenAI server under hostile input and failing requests, and what it offers operators.

Every bad request gets a 4xx in the OpenAI error layout and the next valid request gets the
same greedy answer; a request the engine fails is a 500 while the others finish; a long prompt
is tokenized off the event loop; API key, CORS, /metrics, /version and /v1/models/{id}.
One server (with an API key and CORS) under uvicorn for the whole module.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import threading

import httpx
import numpy as np
import pytest

from sparse_jax import KvCacheConfig, LLM, SamplingParams
from sparse_jax.serve import API_KEY_ENV, api_key_from, create_app
from tests.model_fixtures import tiny_llama
from tests.test_serve import VOCAB, make_tokenizer, serving, wait_until

KEY = "sk-test-1234"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 256 * 1024
MAX_SEQ = 128
PROMPT = "w1 w2 w3 w4 w5 w6 w7"
MARKER_PROMPT = "w55 w54 w53"  # the prompt a test makes the engine fail
GREEDY = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def served():
  llm = LLM(tiny_llama(13, vocab=len(VOCAB), max_pos=256), tokenizer=make_tokenizer(), dtype="float32",
            backend="reference", max_batch_size=4, max_seq_len=MAX_SEQ, decode_chunk_size=4,
            kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512))
  reference = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0]
  app = create_app(llm, "tiny", api_key=KEY, allowed_origins=["https://ui.example"], max_body_bytes=MAX_BODY,
                   stats_log_interval_s=0.2)
  with serving(app) as url:
    yield dict(llm=llm, url=url, app=app, reference=reference)


def post(served, path, body=None, content=None):
  """POSTs `body` as ASCII JSON (so lone surrogates travel as \\ud800 escapes) or raw `content`."""
  content = json.dumps(body) if content is None else content
  return httpx.post(served["url"] + path, content=content, headers={**AUTH, "content-type": "application/json"},
                    timeout=60)


def assert_openai_error(r: httpx.Response, status: int, *needles: str):
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
  for needle in needles:
    assert needle in err["message"], err["message"]
  return err


def assert_still_serving(served):
  """/health answers and the greedy answer is the one from before."""
  assert httpx.get(served["url"] + "/health").status_code == 200
  r = post(served, "/v1/completions", GREEDY)
  assert r.status_code == 200, r.text
  assert r.json()["choices"][0]["text"] == served["reference"].text
  assert r.json()["usage"]["completion_tokens"] == len(served["reference"].token_ids)


@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/completions", {**GREEDY, "seed": 1180591620717411303424}, "seed", "1180591620717411303424"),
    ("/v1/completions", {**GREEDY, "top_k": 3000000000}, "top_k", "3000000000"),
    ("/v1/completions", {**GREEDY, "seed": -2**64}, "seed", str(-2**64)),
    ("/v1/completions", {**GREEDY, "stop": [1]}, "stop", "got [1]"),
    ("/v1/completions", {**GREEDY, "prompt": "w1 \ud800 w2"}, "prompt", "lone surrogate '\\ud800' at character 3"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1 \udfff"}], "max_tokens": 2}, "messages",
     "lone surrogate"),
    ("/v1/completions", {**GREEDY, "max_tokens": 2**40}, "prompt", "max_tokens=1099511627776"),
])
def test_bad_values_are_400s_naming_them_and_the_server_goes_on(served, path, body, param, needle):
  err = assert_openai_error(post(served, path, body), 400, needle)
  assert err["param"] == param
  assert_still_serving(served)


@pytest.mark.parametrize("raw, needle", [
    (b'{"prompt": "w1", "temperature": NaN}', "temperature"),
    (b'{"prompt": "w1 \xff\xfe w2"}', "malformed"),
    (b'\xff\xfe\x00{', "malformed"),
    (b'{"prompt": "w1"', "malformed JSON body"),
])
def test_malformed_bodies_are_400s_in_the_openai_layout(served, raw, needle):
  assert_openai_error(post(served, "/v1/completions", content=raw), 400, needle)
  assert_still_serving(served)


def test_unknown_routes_and_methods_answer_in_the_openai_layout(served):
  assert assert_openai_error(httpx.get(served["url"] + "/v1/nope", headers=AUTH), 404, "no route GET /v1/nope")
  assert_openai_error(httpx.get(served["url"] + "/v1/completions", headers=AUTH), 405, "Method Not Allowed")
  assert_openai_error(httpx.get(served["url"] + "/v1/models/other", headers=AUTH), 404, "model 'other' does not exist")


def test_bodies_over_the_limit_are_413s_declared_or_streamed(served):
  big = {**GREEDY, "prompt": "w1 " * (MAX_BODY // 3 + 10)}
  assert_openai_error(post(served, "/v1/completions", big), 413, f"limit of {MAX_BODY} bytes")

  def chunks():  # no content-length: the limit applies to what arrives
    for _ in range(64):
      yield b" " * 8192

  r = httpx.post(served["url"] + "/v1/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"})
  assert_openai_error(r, 413, "at least")
  assert_still_serving(served)


def test_long_prompts_are_tokenized_off_the_event_loop_and_prechecked(served, monkeypatch):
  tok = served["llm"].tokenizer
  real_encode = tok.encode
  calls, started, release = [], threading.Event(), threading.Event()

  def spying_encode(text, *args, **kwargs):
    calls.append((len(text), threading.current_thread().name))
    started.set()
    assert release.wait(30)
    return real_encode(text, *args, **kwargs)

  monkeypatch.setattr(tok, "encode", spying_encode)
  long_prompt = "w1 " * 60_000  # 180,000 characters, 60,000 tokens; under the body limit
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(post, served, "/v1/completions", {**GREEDY, "prompt": long_prompt})
    assert started.wait(30)
    # The tokenizer is busy with this prompt: the event loop still answers.
    assert httpx.get(served["url"] + "/health", timeout=10).status_code == 200
    release.set()
    r = pending.result()
  assert_openai_error(r, 400, "prompt is too long", f"more than the {MAX_SEQ - 8} allowed")
  window = (MAX_SEQ - 8 + 1) * 8
  assert calls == [(window, calls[0][1])], "only the pre-check window may be tokenized"
  assert not calls[0][1].startswith("MainThread") and "uvicorn" not in calls[0][1].lower()
  monkeypatch.undo()
  assert_still_serving(served)


def test_a_request_failing_in_the_engine_is_a_500_and_the_others_finish(served, monkeypatch):
  engine = served["llm"].engine
  marker = tuple(served["llm"].tokenizer.encode(MARKER_PROMPT))
  real = engine.decode_fn

  def faulty(*args, **kwargs):
    active = np.asarray(args[4])
    if any(active[s] and tuple(r.prompt_ids) == marker for s, r in list(engine._running.items())):
      raise RuntimeError("injected decode failure")
    return real(*args, **kwargs)

  monkeypatch.setattr(engine, "decode_fn", faulty)
  bodies = [{**GREEDY, "prompt": MARKER_PROMPT}, GREEDY, GREEDY]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    bad, *good = pool.map(lambda b: post(served, "/v1/completions", b), bodies)
  assert_openai_error(bad, 500, "decode failed: RuntimeError: injected decode failure")
  for r in good:
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == served["reference"].text
  monkeypatch.undo()

  # A step that raises outside any request's work: the loop fails what is in flight and goes on.
  real_admit, raised = engine._admit, []

  def admit_once():
    if not raised:
      raised.append(1)
      raise RuntimeError("injected scheduler failure")
    return real_admit()

  monkeypatch.setattr(engine, "_admit", admit_once)
  failures = served["app"].state.server.loop.failures
  assert_openai_error(post(served, "/v1/completions", GREEDY), 500, "injected scheduler failure")
  assert served["app"].state.server.loop.failures == failures + 1
  monkeypatch.undo()
  assert_still_serving(served)
  alloc = engine.allocator
  wait_until(lambda: alloc.free_pages == alloc.num_pages, 10, "every page to be free")


def test_api_key(served, monkeypatch):
  url = served["url"]
  assert_openai_error(httpx.get(url + "/v1/models"), 401, "API key")
  assert_openai_error(httpx.get(url + "/v1/models", headers={"authorization": "Bearer wrong"}), 401, "API key")
  assert_openai_error(httpx.get(url + "/v1/models", headers={"authorization": KEY}), 401, "API key")
  assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
  assert httpx.get(url + "/health").status_code == 200  # probes need no key
  monkeypatch.setenv(API_KEY_ENV, "from-env")
  assert api_key_from("") == "from-env" and api_key_from("flag") == "flag"
  monkeypatch.delenv(API_KEY_ENV)
  assert api_key_from("") is None


def test_cors(served):
  preflight = httpx.options(served["url"] + "/v1/completions", headers={
      "origin": "https://ui.example", "access-control-request-method": "POST",
      "access-control-request-headers": "authorization, content-type"})
  assert preflight.status_code == 200
  assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
  r = httpx.get(served["url"] + "/v1/models", headers={**AUTH, "origin": "https://ui.example"})
  assert r.headers["access-control-allow-origin"] == "https://ui.example"
  r = httpx.get(served["url"] + "/v1/models", headers={**AUTH, "origin": "https://evil.example"})
  assert "access-control-allow-origin" not in r.headers


def test_openai_client_retrieves_the_model_and_version(served):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY)
  model = client.models.retrieve("tiny")
  assert model.id == "tiny" and model.owned_by == "sparse_jax"
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("gpt-4")
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong").models.retrieve("tiny")
  v = httpx.get(served["url"] + "/version").json()
  import jax
  import sparse_jax
  assert v == {"version": sparse_jax.__version__, "jax": jax.__version__}


def test_metrics_are_scraped_in_prometheus_format(served, caplog):
  from prometheus_client.parser import text_string_to_metric_families

  def scrape():
    r = httpx.get(served["url"] + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}

  before = scrape()
  caplog.set_level(logging.INFO, logger="sparse_jax.serve")
  n_prompt = len(served["llm"].tokenizer.encode(PROMPT))
  for _ in range(2):
    assert post(served, "/v1/completions", GREEDY).status_code == 200
  after = scrape()
  delta = lambda name: after.get(name, 0) - before.get(name, 0)
  assert delta("sparse_jax_prompt_tokens_total[]") == 2 * n_prompt
  assert delta("sparse_jax_generation_tokens_total[]") == 2 * len(served["reference"].token_ids)
  assert delta("sparse_jax_requests_total[('finish_reason', 'length')]") == 2
  for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
    assert delta(f"sparse_jax_{hist}_count[]") == 2, hist
  assert delta("sparse_jax_kept_prompt_token_ratio_count[('algorithm', 'dense')]") == 2
  assert after["sparse_jax_kept_prompt_token_ratio_sum[('algorithm', 'dense')]"] == \
      after["sparse_jax_kept_prompt_token_ratio_count[('algorithm', 'dense')]"]  # dense keeps every token
  alloc = served["llm"].engine.allocator
  assert after["sparse_jax_kv_pages_total[]"] == alloc.num_pages
  assert after["sparse_jax_kv_pages_used[]"] + after["sparse_jax_kv_pages_free[]"] <= alloc.num_pages
  assert after["sparse_jax_num_requests_running[]"] == 0 and after["sparse_jax_num_requests_waiting[]"] == 0
  stats = served["llm"].engine.stats
  assert after["sparse_jax_prefix_cache_queries_total[]"] == stats["prefix_cache_queries"]
  assert after["sparse_jax_prefix_cache_hits_total[]"] == stats["prefix_cache_hits"]
  assert after["sparse_jax_kv_pages_cached[]"] == alloc.cached_pages
  wait_until(lambda: any("generation throughput" in r.getMessage() for r in caplog.records), 10, "a stats line")
  line = next(r.getMessage() for r in caplog.records if "generation throughput" in r.getMessage())
  assert line.startswith("running: ") and "KV pages used: " in line and "\n" not in line


def test_usage_counts_no_token_past_the_stop_string(served):
  ids, decode = served["reference"].token_ids, served["llm"].tokenizer.decode
  stop = decode(ids[2:3])
  k = next(k for k in range(1, len(ids) + 1) if stop in decode(ids[:k]))
  r = post(served, "/v1/completions", {**GREEDY, "stop": stop})
  assert r.status_code == 200, r.text
  assert r.json()["choices"][0]["finish_reason"] == "stop"
  assert r.json()["usage"]["completion_tokens"] == k < len(ids)


def test_a_second_server_over_a_served_llm_is_refused_until_the_first_shuts_down(served):
  llm = served["llm"]
  with pytest.raises(RuntimeError, match="already served by another server"):
    create_app(llm, "tiny")
  r = post(served, "/v1/completions", GREEDY)  # the first server is untouched
  assert r.status_code == 200 and r.json()["choices"][0]["text"] == served["reference"].text
  other = LLM(tiny_llama(13, vocab=len(VOCAB), max_pos=256), tokenizer=make_tokenizer(), dtype="float32",
              backend="reference", max_batch_size=1, max_seq_len=MAX_SEQ,
              kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256))
  first = create_app(other, "other", stats_log_interval_s=None)  # a second LLM is served on its own
  first.state.server.shutdown()
  second = create_app(other, "other", stats_log_interval_s=None)  # once shut down, it can be served again
  assert second.state.server.loop.alive
  second.state.server.shutdown()
