"""The server's prompt side: every OpenAI `prompt` form (as lm-evaluation-harness's local-completions
sends them), chat templates (the checkpoint's, --chat_template, none), generation_config defaults."""
import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from models import GenerationConfig
from sparse_jax import KvCacheConfig, LLM, SamplingParams
from sparse_jax.serve import ChatCompletionRequest, CompletionRequest, create_app
from tests.model_fixtures import tiny_llama
from tests.test_serve import CHAT_TEMPLATE, VOCAB, make_tokenizer, prompt_texts

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def setup():
  tok = make_tokenizer()
  tok.chat_template = None  # the checkpoint has no template: chat must say how to give one
  model = tiny_llama(7, vocab=len(VOCAB), max_pos=256)
  llm = LLM(model, tokenizer=tok, dtype="float32", backend="reference", max_batch_size=4, max_seq_len=64,
            kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256))
  prompts = prompt_texts(3)
  ids = [tok.encode(p) for p in prompts]
  offline = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))]
  return llm, prompts, ids, offline


@pytest.fixture
def client(setup):  # one server at a time drives the shared LLM's engine
  llm = setup[0]
  app = create_app(llm, "tiny")
  with TestClient(app) as c:
    yield c
  app.state.server.shutdown()


def texts_by_index(body):
  return [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]


def test_every_prompt_form(setup, client):
  _, prompts, ids, offline = setup
  base = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0.0}
  for prompt, expected in ((prompts[0], offline[:1]), (prompts, offline), (ids[1], offline[1:2]), (ids, offline)):
    r = client.post("/v1/completions", json={**base, "prompt": prompt})
    assert r.status_code == 200, r.text
    assert texts_by_index(r.json()) == expected
  usage = r.json()["usage"]
  assert usage["prompt_tokens"] == sum(len(i) for i in ids)


@pytest.mark.parametrize("tokenized_requests", [True, False])
def test_lm_eval_local_completions_generate_payload(setup, client, tokenized_requests):
  """The body of lm-evaluation-harness's LocalCompletionsAPI._create_payload(generate=True) for a
  batch: token lists by default (tokenized_requests=True), strings otherwise; `stop` from `until`."""
  _, prompts, ids, offline = setup
  payload = {"prompt": ids if tokenized_requests else prompts, "model": "tiny", "max_tokens": MAX_TOKENS,
             "temperature": 0, "stop": ["<|endoftext|>"], "seed": 1234}
  r = client.post("/v1/completions", content=json.dumps(payload), headers={"content-type": "application/json"})
  assert r.status_code == 200, r.text
  assert texts_by_index(r.json()) == offline  # parse_generations places choices by their index


def test_streaming_several_prompts(setup, client):
  _, prompts, _, offline = setup
  body = {"model": "tiny", "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True}
  texts, reasons = ["", "", ""], [None] * 3
  with client.stream("POST", "/v1/completions", json=body) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("data: ") and line != "data: [DONE]":
        for choice in json.loads(line[6:])["choices"]:
          texts[choice["index"]] += choice["text"]
          reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
  assert texts == offline and all(reasons)


def test_bad_prompts_are_400_naming_the_prompt(client):
  r = client.post("/v1/completions", json={"prompt": ["w1 w2", ""], "max_tokens": 2})
  assert r.status_code == 400 and "prompt.1" in r.json()["error"]["message"]
  r = client.post("/v1/completions", json={"prompt": [[1, 2], []], "max_tokens": 2})
  assert r.status_code == 400 and "prompt.1" in r.json()["error"]["message"]
  r = client.post("/v1/completions", json={"prompt": [[1, 2], "w1"], "max_tokens": 2})
  assert r.status_code == 400
  r = client.post("/v1/completions", json={"prompt": "w1 w2", "max_tokens": 2})
  assert r.status_code == 200  # nothing left broken


def test_chat_without_template_is_400_naming_the_fix(client):
  r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 2})
  assert r.status_code == 400
  message = r.json()["error"]["message"]
  assert "no chat template" in message and "--chat_template" in message


def test_chat_template_override_tools_and_kwargs(setup, tmp_path):
  llm = setup[0]
  path = tmp_path / "template.jinja"
  path.write_text(CHAT_TEMPLATE)
  app = create_app(llm, "tiny", chat_template=str(path))
  server = app.state.server
  try:
    user = [{"role": "user", "content": "w1 w2"}]
    with TestClient(app) as c:
      r = c.post("/v1/chat/completions", json={"messages": user, "max_tokens": 2, "temperature": 0.0})
      assert r.status_code == 200, r.text
      assert r.json()["usage"]["prompt_tokens"] == len("user : w1 w2 . assistant :".split())
    templated = "{{ greeting }}{% for t in tools %}{{ t['function']['name'] }} {% endfor %}{{ messages[0]['content'] }}"
    server.tokenizer = server.tokenizer.with_chat_template(templated)
    body = ChatCompletionRequest(messages=user, tools=[{"type": "function", "function": {"name": "w3"}}],
                                 chat_template_kwargs={"greeting": "w4 "})
    assert asyncio.run(server.encode_chat(body, 2)) == llm.tokenizer.encode("w4 w3 w1 w2", add_special_tokens=False)
    server.tokenizer = server.tokenizer.with_chat_template("{{ settings.mode }}")
    with TestClient(app) as c:
      r = c.post("/v1/chat/completions", json={"messages": user, "max_tokens": 2})
    assert r.status_code == 400 and "undefined" in r.json()["error"]["message"]
  finally:
    server.shutdown()


def test_generation_config_fills_unset_sampling_fields(setup):
  llm = setup[0]
  saved = llm.generation_config
  llm.generation_config = GenerationConfig(temperature=0.6, top_p=0.9, top_k=20)
  app = create_app(llm, "tiny")
  server = app.state.server
  try:
    unset, = server.sampling_params(CompletionRequest(prompt="w1", max_tokens=2), 2)
    assert (unset.temperature, unset.top_p, unset.top_k) == (0.6, 0.9, 20)
    given, = server.sampling_params(CompletionRequest(prompt="w1", max_tokens=2, temperature=0.0, top_k=0), 2)
    assert (given.temperature, given.top_p, given.top_k) == (0.0, 0.9, 0)
    assert llm.get_default_sampling_params().temperature == 0.6
  finally:
    server.shutdown()
    llm.generation_config = saved
