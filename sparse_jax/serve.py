"""An OpenAI-compatible HTTP server over the engine (the `trtllm-serve` equivalent).

    python -m sparse_jax.serve --model=path/to/hf_checkpoint --extra_llm_api_options=configs/rocket.yaml

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream with server-sent
events when `stream` is true), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
`GET /metrics` (Prometheus), `GET /version`. With `--api_key` (or the SPARSE_JAX_API_KEY
environment variable) every `/v1` route wants `Authorization: Bearer <key>`;
`--allowed_origins` turns on CORS for those origins.

One background thread drives the engine (`EngineLoop`): it calls `engine.step()` while there is
work and otherwise sleeps in `engine.wait_for_work()`, which `add_request` and `abort` end. The
engine reports progress through each request's `on_update` callback (on the engine thread,
under its lock); the callback only copies the request's text and hands it to the request's
asyncio queue. A client that disconnects (streaming or not) aborts its request, which frees
the request's batch slot and KV pages at the next engine step.

Both endpoints take OpenAI's sampling fields (`n`, `seed`, `stop`, `logprobs` / `top_logprobs` in
each endpoint's layout, `presence_penalty`, `frequency_penalty`, `stream_options.include_usage`,
`echo` for completions) and vLLM's extensions (`top_k`, `min_tokens`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`); each choice carries vLLM's `stop_reason`. A field no model
declares is logged as a warning and ignored, as vLLM does.

Errors follow the OpenAI layout `{"error": {"message", "type", "param", "code"}}` everywhere: a
malformed or non-UTF-8 body, a wrong type or value, text that is not valid
Unicode, or a prompt longer than `max_seq_len - max_tokens` is a 400 naming the field; a missing
or wrong API key a 401; an unknown model or route a 404; a body over `--max_body_bytes` a 413;
a full waiting queue a 429; a request the engine failed a 500 (the server goes on).

Prompts are tokenized on a worker thread, so a long one never holds up other requests or
`/health`; a text whose first `(allowed tokens + 1) * 8` characters already make too many tokens
is refused without tokenizing the rest.
"""
from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from typing import Annotated, Any, Literal, Sequence

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from models.tokenizer import ChatTemplateError
from sparse_jax.engine import INT32_MAX, MAX_N, Engine, QueueFullError, Request, SamplingParams
from sparse_jax.llm import completions_of
from sparse_jax.sampling import MAX_TOP_LOGPROBS
from sparse_jax.server_metrics import ServerMetrics, StatsLogger

log = logging.getLogger("sparse_jax.serve")

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
#: The length pre-check tokenizes only the first (allowed tokens + 1) * this many characters:
#: real text averages 3-5 characters per token, so a too-long prompt shows itself there.
PRECHECK_CHARS_PER_TOKEN = 8
API_KEY_ENV = "SPARSE_JAX_API_KEY"

# -- request bodies ----------------------------------------------------------------------------

PositiveInt = Annotated[StrictInt, Field(gt=0)]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]

# Unknown fields are accepted, logged and ignored (as vLLM does): clients send fields of newer
# API versions or of other servers, and refusing them would break those clients.
_LENIENT = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
  model_config = _LENIENT
  include_usage: StrictBool = False


class _SamplingFields(BaseModel):
  """Fields common to both endpoints (OpenAI names; `top_k`, `ignore_eos`, `repetition_penalty`,
  `min_tokens`, `stop_token_ids` are vLLM extensions)."""
  model_config = _LENIENT
  model: StrictStr | None = None
  temperature: Annotated[StrictFloat, Field(ge=0, le=2)] = 1.0
  top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0
  top_k: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] = 0
  seed: Annotated[StrictInt, Field(ge=-2**63, lt=2**63)] | None = None
  stop: StrictStr | list[StrictStr] | None = None
  stop_token_ids: list[Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]] | None = None
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
  ignore_eos: StrictBool = False
  presence_penalty: Penalty = 0.0
  frequency_penalty: Penalty = 0.0
  repetition_penalty: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)] = 1.0
  min_tokens: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] = 0
  user: StrictStr | None = None
  # OpenAI fields that would change the answer but are not implemented: refused when they ask
  # for something, rather than ignored like unknown fields.
  logit_bias: dict[str, Any] | None = None
  best_of: Any = None
  response_format: Any = None

  def refuse_unsupported(self) -> None:
    if self.logit_bias:
      raise ApiError(400, "logit_bias is not supported (send null or {})", "logit_bias")
    if self.best_of is not None and self.best_of != self.n:
      raise ApiError(400, f"best_of={self.best_of!r} is not supported; use n (best_of may only be null or equal "
                     "to n)", "best_of")
    kind = self.response_format.get("type") if isinstance(self.response_format, dict) else self.response_format
    if kind not in (None, "text"):
      raise ApiError(400, f"response_format {self.response_format!r} is not supported (only type 'text')",
                     "response_format")


class CompletionRequest(_SamplingFields):
  #: every OpenAI form: a string, a list of strings, a token list, a list of token lists (one
  #: choice per prompt and `n`, `index` = prompt * n + completion, as vLLM numbers them).
  prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
  max_tokens: PositiveInt = 16
  echo: StrictBool = False
  logprobs: TopLogprobs | None = None
  suffix: Any = None

  def refuse_unsupported(self) -> None:
    super().refuse_unsupported()
    if self.suffix:
      raise ApiError(400, "suffix is not supported (send null or \"\")", "suffix")

  def top_logprobs_wanted(self) -> int | None:
    return self.logprobs


class ChatMessage(BaseModel):
  model_config = _LENIENT
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: StrictStr | list[dict[str, Any]] | None = None
  name: StrictStr | None = None
  tool_calls: list[dict[str, Any]] | None = None
  tool_call_id: StrictStr | None = None


class ChatCompletionRequest(_SamplingFields):
  messages: Annotated[list[ChatMessage], Field(min_length=1)]
  max_tokens: PositiveInt | None = None
  max_completion_tokens: PositiveInt | None = None
  tools: list[dict[str, Any]] | None = None           # passed to the chat template, as transformers does
  add_generation_prompt: StrictBool = True            # vLLM extension
  chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension: extra template variables
  logprobs: StrictBool = False
  top_logprobs: TopLogprobs | None = None

  def top_logprobs_wanted(self) -> int | None:
    if self.top_logprobs is not None and not self.logprobs:
      raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    return (self.top_logprobs or 0) if self.logprobs else None


def ignored_fields(body: BaseModel, prefix: str = "") -> list[str]:
  """The dotted names of the fields of `body` (and of its nested models) that no model declares."""
  names = [prefix + k for k in (body.model_extra or {})]
  for name in type(body).model_fields:
    value = getattr(body, name)
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
      if isinstance(item, BaseModel):
        names += ignored_fields(item, f"{prefix}{name}.{i}." if isinstance(value, list) else f"{prefix}{name}.")
  return names


def warn_ignored_fields(body: BaseModel) -> None:
  names = ignored_fields(body)
  if names:
    log.warning("ignoring unknown request field(s): %s", ", ".join(names))


class ApiError(Exception):
  """An error answered as an OpenAI-style error body."""

  def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
  return JSONResponse(status_code=status, headers=headers,
                      content={"error": {"message": message, "type": kind, "param": param, "code": status}})


class BodyLimit:
  """ASGI middleware: a body over `max_bytes` (declared or streamed) is a 413 in the OpenAI
  layout before anything parses it."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = dict(scope.get("headers") or ()).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
      return await self.too_large(int(declared))(scope, receive, send)
    received = 0

    async def counting_receive():
      nonlocal received
      message = await receive()
      if message["type"] == "http.request":
        received += len(message.get("body", b""))
        if received > self.max_bytes:  # FastAPI re-raises an HTTPException from the body read
          raise HTTPException(413, self.message(received, "at least "))
      return message

    await self.app(scope, counting_receive, send)

  def message(self, size: int, qualifier: str = "") -> str:
    return (f"request body is {qualifier}{size} bytes, more than the server's limit of {self.max_bytes} bytes "
            "(--max_body_bytes)")

  def too_large(self, size: int) -> JSONResponse:
    return error_response(413, self.message(size), None)


class ApiKeyCheck:
  """ASGI middleware: every `/v1` route wants `Authorization: Bearer <api_key>` (compared in
  constant time); anything else is a 401 in the OpenAI layout."""

  def __init__(self, app, api_key: str):
    self.app, self.expected = app, f"Bearer {api_key}".encode()

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1") and scope.get("method") != "OPTIONS":
      given = dict(scope.get("headers") or ()).get(b"authorization", b"")
      if not hmac.compare_digest(given, self.expected):
        response = error_response(401, "missing or incorrect API key: send the header 'Authorization: Bearer "
                                  "<key>' with the server's --api_key", None,
                                  headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)
    return await self.app(scope, receive, send)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
  """A one-line message naming every bad field of a request body, and the first such field."""
  problems: dict[str, list[str]] = {}  # field -> what is wrong (a union reports once per alternative)
  got: dict[str, str] = {}
  for err in errors:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc[:1] + [p for p in loc[1:] if not _is_type_tag(p)]) or "body"
    kind = err.get("type")
    if kind == "json_invalid":
      detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
      return f"malformed JSON body: {detail}", None
    if kind == "missing":
      text = "missing required field"
    else:
      text = err.get("msg", "invalid")
      value = repr(err.get("input"))
      got.setdefault(field, value if len(value) <= 80 else value[:77] + "...")
    if text not in problems.setdefault(field, []):
      problems[field].append(text)
  parts = [f"{field}: {' or '.join(texts)}" + (f" (got {got[field]})" if field in got else "")
           for field, texts in problems.items()]
  return "invalid request: " + "; ".join(parts), next(iter(problems), None)


def _is_type_tag(part: str) -> bool:
  # pydantic names union alternatives in error locations ("str", "list[int]", "function-after[...]")
  return part in ("str", "int", "float", "bool") or "[" in part


# -- the engine thread ----------------------------------------------------------------------------

_DRIVERS: dict[int, "EngineLoop"] = {}  # id(engine) -> the loop stepping it
_DRIVERS_LOCK = threading.Lock()


class EngineLoop:
  """Drives `engine.step()` on one daemon thread; sleeps in `engine.wait_for_work` when idle.

  The loop outlives every request: the engine fails a request whose work raises and goes on
  (see `Engine.step`); should `step` itself raise, the loop fails the requests in flight
  (`engine.fail_all`), counts the failure in `failures` and keeps serving.
  """

  def __init__(self, engine: Engine, idle_timeout_s: float = 1.0):
    self.engine = engine
    self.idle_timeout_s = idle_timeout_s
    self.failures = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="sparse_jax-engine", daemon=True)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def start(self) -> "EngineLoop":
    # One driver per engine: two threads stepping one engine would race on its donated cache.
    with _DRIVERS_LOCK:
      other = _DRIVERS.get(id(self.engine))
      if other is not None and other is not self and other.alive:
        raise RuntimeError("this LLM's engine is already served by another server; shut that one down first "
                           "(app.state.server.shutdown()) or serve a second LLM")
      _DRIVERS[id(self.engine)] = self
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    self._stop.set()
    self.engine.wake()
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout)
    with _DRIVERS_LOCK:
      if _DRIVERS.get(id(self.engine)) is self and not self._thread.is_alive():
        del _DRIVERS[id(self.engine)]

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        if self.engine.has_unfinished():
          self.engine.step()
        else:
          self.engine.wait_for_work(self.idle_timeout_s)
      except Exception as e:
        self.failures += 1
        log.exception("engine step failed; failing the requests in flight and continuing")
        try:
          self.engine.fail_all(e)
        except Exception:
          log.exception("could not fail the requests in flight")


# -- per-request plumbing ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Update:
  """What the engine thread hands the event loop: a copy of the request's progress."""
  text: str
  num_tokens: int
  finish_reason: str | None
  error: str | None = None
  #: with logprobs requested: per generated token (token id, logprob, rank, [(id, logprob)] best first)
  logprobs: Sequence[tuple] = ()


class GrowingPrefix(collections.abc.Sequence):
  """The first `n` items of a list that is only appended to: an update's log-probabilities,
  read on the event loop while the engine thread appends the next ones (no copy per update)."""
  __slots__ = ("items", "n")

  def __init__(self, items: list, n: int):
    self.items, self.n = items, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.items[slice(*i.indices(self.n))]
    if not -self.n <= i < self.n:
      raise IndexError(i)
    return self.items[i % self.n]


class Stream:
  """Connects one engine request to the asyncio task answering it."""

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop = loop
    self.queue: asyncio.Queue[Update] = asyncio.Queue()
    self.request: Request | None = None
    self.logprobs: list[tuple] = []  # (token id, *Request.logprobs entry) per generated token so far

  def on_update(self, req: Request) -> None:  # engine thread, engine lock held: copy and hand off
    logprobs: Sequence[tuple] = ()
    if req.params.logprobs is not None:
      # Only the tokens of the engine step that sent this update are new (a stop string only
      # ever cuts those), so earlier entries are final and are not copied again.
      done = len(self.logprobs)
      if len(req.logprobs) < done:  # tokens already sent were cut: start a fresh list
        self.logprobs, done = [], 0
      self.logprobs += [(t, *lp) for t, lp in zip(req.output_ids[done:], req.logprobs[done:])]
      logprobs = GrowingPrefix(self.logprobs, len(self.logprobs))
    self._put(Update(req.text, len(req.output_ids), req.finish_reason, req.error, logprobs))

  def _put(self, update: Update) -> None:
    with contextlib.suppress(RuntimeError):  # the event loop has shut down
      self.loop.call_soon_threadsafe(self.queue.put_nowait, update)

  async def next(self) -> Update:
    """The latest update (updates are cumulative, so older queued ones are skipped)."""
    update = await self.queue.get()
    while not self.queue.empty() and update.finish_reason is None:
      update = self.queue.get_nowait()
    return update


def stream_safe_prefix(text: str, stop: list[str]) -> str:
  """The part of an unfinished request's text that can be sent now: holds back an incomplete
  UTF-8 character and a tail that may still become a stop string (the engine then cuts it)."""
  end = len(text)
  while end > 0 and text[end - 1] == "\ufffd":
    end -= 1
  hold = 0
  for s in stop:
    for k in range(min(len(s) - 1, end), hold, -1):
      if text[end - k:end] == s[:k]:
        hold = k
        break
  return text[:end - hold]


class Server:
  """The state behind the app: the LLM, its engine thread and the requests being answered."""

  def __init__(self, llm, served_model_name: str, stats_log_interval_s: float | None = 10.0,
               chat_template: str | None = None):
    self.llm = llm
    self.engine: Engine = llm.engine
    self.tokenizer = llm.tokenizer
    if chat_template is not None:
      if self.tokenizer is None:
        raise ValueError("a chat template was given but the model has no tokenizer.json")
      self.tokenizer = self.tokenizer.with_chat_template(chat_template)
    # Sampling fields a request leaves unset take generation_config.json's values (vLLM's
    # --generation-config auto); the request's own values always win.
    self.sampling_defaults = llm.generation_config.sampling_defaults()
    self.served_model_name = served_model_name
    self.created = int(time.time())
    self.active: set[Stream] = set()
    self.stats = {"requests": 0, "finished": 0, "aborted_by_client": 0, "rejected_queue_full": 0, "rejected_invalid": 0}
    self._active_lock = threading.Lock()
    algorithm = getattr(getattr(llm, "sparse_attention_config", None), "algorithm", None) or "dense"
    self.metrics = ServerMetrics(self.engine, algorithm)
    self.stats_logger = StatsLogger(self.metrics, stats_log_interval_s).start() if stats_log_interval_s else None
    self.loop = EngineLoop(self.engine).start()

  def check_model(self, model: str | None) -> None:
    if model is not None and model != self.served_model_name:
      raise ApiError(404, f"model '{model}' does not exist; this server serves '{self.served_model_name}'",
                     "model", "model_not_found")

  # -- prompts ---------------------------------------------------------------------------------
  async def encode(self, prompt: str | list[int], field: str, max_tokens: int) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ApiError(400, f"{field} is text but the model has no tokenizer; send a list of token ids", field)
      if not prompt:
        raise ApiError(400, f"{field} is empty", field)
      return await self.encode_text(prompt, field, max_tokens)
    if not prompt:
      raise ApiError(400, f"{field} is an empty list of token ids", field)
    return list(prompt)

  async def encode_text(self, text: str, field: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`, tokenized on a worker thread; refuses text that is not valid Unicode
    and, from its start alone, text far longer than `max_seq_len - max_tokens` tokens."""
    bad = _lone_surrogate(text)
    if bad is not None:
      raise ApiError(400, f"{field} is not valid Unicode: lone surrogate {text[bad]!r} at character {bad}", field)
    encode = functools.partial(self.tokenizer.encode, add_special_tokens=add_special_tokens)
    limit = self.engine.max_seq_len - max_tokens
    window = (max(limit, 0) + 1) * PRECHECK_CHARS_PER_TOKEN
    if len(text) > window:
      head = await asyncio.to_thread(encode, text[:window])
      if len(head) > limit + PRECHECK_CHARS_PER_TOKEN:  # slack: the cut may split a word into more tokens
        raise ApiError(400, f"{field} is too long: its first {window} characters alone are {len(head)} tokens, more "
                       f"than the {max(limit, 0)} allowed (max_seq_len={self.engine.max_seq_len} minus "
                       f"max_tokens={max_tokens})", field)
    return await asyncio.to_thread(encode, text)

  async def encode_chat(self, body: "ChatCompletionRequest", max_tokens: int) -> list[int]:
    """Token ids of the conversation rendered with the tokenizer's chat template (or --chat_template);
    the template writes every special token, so none is added."""
    if self.tokenizer is None:
      raise ApiError(400, "messages: the model has no tokenizer, so chat is unavailable; use /v1/completions "
                     "with token ids", "messages")
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    render = functools.partial(self.tokenizer.apply_chat_template, messages, tools=body.tools,
                               add_generation_prompt=body.add_generation_prompt, **(body.chat_template_kwargs or {}))
    try:
      text = await asyncio.to_thread(render)
    except ChatTemplateError as e:
      raise ApiError(400, f"messages: {e}", "messages") from None
    except TypeError as e:  # chat_template_kwargs repeats a name the server sets
      raise ApiError(400, f"chat_template_kwargs: {e}", "chat_template_kwargs") from None
    return await self.encode_text(text, "messages", max_tokens, add_special_tokens=False)

  # -- submission -------------------------------------------------------------------------------
  def sampling_params(self, body: _SamplingFields, max_tokens: int | None) -> list[SamplingParams]:
    """One SamplingParams per completion (`n` of them, split as `LLM.generate` splits them:
    completion i of a seeded request samples with seed + i)."""
    given = body.model_fields_set
    unset = {k: v for k, v in self.sampling_defaults.items() if k in ("temperature", "top_p", "top_k") and k not in given}
    fields = {"temperature": float(body.temperature), "top_p": float(body.top_p), "top_k": body.top_k, **unset}
    if max_tokens is not None and body.min_tokens > max_tokens:
      raise ApiError(400, f"min_tokens={body.min_tokens} is more than max_tokens={max_tokens}", "min_tokens")
    try:
      params = SamplingParams(max_tokens=max_tokens, n=body.n, seed=body.seed, stop=body.stop,
                              stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                              presence_penalty=float(body.presence_penalty),
                              frequency_penalty=float(body.frequency_penalty),
                              repetition_penalty=float(body.repetition_penalty), min_tokens=body.min_tokens,
                              logprobs=body.top_logprobs_wanted(), **fields)
    except ValueError as e:  # the body's own checks should have caught it: still the request's fault
      raise ApiError(400, str(e)) from None
    return completions_of(params)

  def token_text(self, token_id: int) -> str:
    """A token as the logprobs layouts name it (vLLM's "token_id:N" when there is no tokenizer)."""
    if self.tokenizer is None:
      return f"token_id:{token_id}"
    return self.tokenizer.decode([token_id], skip_special_tokens=False)

  def completion_logprobs(self, entries, offset: int) -> dict[str, Any]:
    """The completions layout of `entries` (Update.logprobs items); `offset`: the text offset of
    the first token."""
    tokens, offsets = [], []
    for token_id, *_ in entries:
      tokens.append(self.token_text(token_id))
      offsets.append(offset)
      offset += len(tokens[-1])
    top = [{self.token_text(t): lp for t, lp in [*alts, (token_id, logprob)]}
           for token_id, logprob, _, alts in entries]
    return {"tokens": tokens, "token_logprobs": [e[1] for e in entries], "top_logprobs": top, "text_offset": offsets}

  def chat_logprobs(self, entries) -> dict[str, Any]:
    """The chat completions layout of `entries` (Update.logprobs items)."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
      text = self.token_text(token_id)
      return {"token": text, "logprob": logprob, "bytes": list(token_bytes(self.tokenizer, token_id, text))}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]}
                        for t, lp, _, alts in entries]}

  def check_length(self, ids: list[int], max_tokens: int, field: str) -> None:
    limit = self.engine.max_seq_len - max_tokens
    if len(ids) > limit:
      raise ApiError(400, f"{field} has {len(ids)} tokens, more than the {max(limit, 0)} allowed "
                     f"(max_seq_len={self.engine.max_seq_len} minus max_tokens={max_tokens})", field)

  def submit(self, ids: list[int], params: SamplingParams, prompt: str | None, request_id: str,
             field: str) -> Stream:
    if not self.loop.alive:
      raise ApiError(503, "the engine thread has stopped; the server is shutting down", None, "server_error")
    stream = Stream(asyncio.get_running_loop())

    def on_update(req: Request) -> None:
      stream.on_update(req)
      if req.finished:
        self.metrics.observe(req)

    try:
      stream.request = self.engine.add_request(ids, params, prompt=prompt, request_id=request_id,
                                               on_update=on_update)
    except QueueFullError as e:
      self.stats["rejected_queue_full"] += 1
      raise ApiError(429, f"{e} (max_queue_size={self.engine.max_queue_size})", None, "rate_limit_error") from None
    except ValueError as e:
      raise ApiError(400, f"{field}: {e}", field) from None
    self.stats["requests"] += 1
    with self._active_lock:
      self.active.add(stream)
    return stream

  def release(self, stream: Stream, disconnected: bool) -> None:
    """Called once the answer is over; aborts the engine request if it is still going."""
    with self._active_lock:
      self.active.discard(stream)
    req = stream.request
    if req is not None and not req.finished:
      if disconnected:
        self.stats["aborted_by_client"] += 1
      self.engine.abort(req)
    else:
      self.stats["finished"] += 1

  def shutdown(self) -> None:
    if self.stats_logger is not None:
      self.stats_logger.stop()
    self.loop.stop()
    with self._active_lock:
      streams = list(self.active)
    for s in streams:
      if s.request is not None:
        self.engine.abort(s.request)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
  """Byte-level BPE's (GPT-2's) printable character for each byte, inverted: character -> byte."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_bytes(tokenizer, token_id: int, text: str) -> bytes:
  """The UTF-8 bytes a token stands for (the chat logprobs' `bytes`). `text`: the token decoded
  alone; when it is only part of a character (decoded as U+FFFD), the bytes come from the
  vocabulary's spelling of the token: a byte-fallback piece `<0xE2>` or byte-level BPE characters."""
  if "\ufffd" not in text or tokenizer is None:
    return text.encode("utf-8", "replace")
  piece = tokenizer.backend.id_to_token(token_id)
  if piece is not None:
    if m := _BYTE_PIECE.fullmatch(piece):
      return bytes([int(m.group(1), 16)])
    alphabet = _byte_level_alphabet()
    if all(ch in alphabet for ch in piece):
      return bytes(alphabet[ch] for ch in piece)
  return text.encode("utf-8", "replace")


def _lone_surrogate(text: str) -> int | None:
  """The index of the first lone UTF-16 surrogate in `text` (JSON's "\\ud800"), or None."""
  try:
    text.encode("utf-8")
    return None
  except UnicodeEncodeError as e:
    return e.start


def _message_dict(m: ChatMessage, i: int) -> dict[str, Any]:
  """A message as the chat template sees it (text parts joined; unset fields left out)."""
  out = m.model_dump(exclude_none=True, exclude=set(m.model_extra or ()))
  if m.content is not None:
    out["content"] = _message_text(m, i)
  return out


def _message_text(m: ChatMessage, i: int) -> str:
  if isinstance(m.content, str):
    return m.content
  texts = []
  for j, part in enumerate(m.content):
    if part.get("type") != "text" or not isinstance(part.get("text"), str):
      raise ApiError(400, f"messages.{i}.content.{j}: only parts of type 'text' with a string 'text' are "
                     f"supported, got {part!r}", "messages")
    texts.append(part["text"])
  return "".join(texts)


def _usage(*reqs: Request) -> dict[str, int]:
  prompt = sum(len(r.prompt_ids) for r in reqs)
  completion = sum(len(r.output_ids) for r in reqs)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompt_list(prompt: Any) -> list[str | list[int]]:
  """The prompts of a completions body: a string or a token list is one prompt; a list of strings
  or of token lists is several."""
  if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
    return [prompt]
  return list(prompt)


def _submit_all(server: Server, items: list[tuple[list[int], SamplingParams, str | None, str]],
                rid: str) -> list[Stream]:
  """Submits one engine request per (token ids, params, prompt text, field); all or none."""
  if len(items) > server.engine.max_queue_size:  # could never be queued at once: not a retry-later 429
    raise ApiError(400, f"the request asks for {len(items)} completions (prompts x n), more than the server's queue "
                   f"holds (max_queue_size={server.engine.max_queue_size})", "n")
  streams: list[Stream] = []
  try:
    for i, (ids, params, prompt, field) in enumerate(items):
      streams.append(server.submit(ids, params, prompt, rid if len(items) == 1 else f"{rid}-{i}", field))
  except ApiError:
    for s in streams:
      server.release(s, disconnected=True)
    raise
  return streams


def _echo_text(server: Server, prompt: str | list[int], ids: list[int]) -> str:
  """What echo=true puts before the completion: the prompt's text (decoded when it came as ids)."""
  if isinstance(prompt, str):
    return prompt
  if server.tokenizer is None:
    raise ApiError(400, "echo=true with a token-id prompt needs a tokenizer to decode it", "echo")
  return server.tokenizer.decode(ids, skip_special_tokens=False)


def _sse(obj: Any) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _wait_for_disconnect(http: HttpRequest) -> None:
  while True:
    message = await http.receive()
    if message["type"] == "http.disconnect":
      return


async def _final_updates(server: Server, streams: list[Stream], http: HttpRequest) -> list[Update] | None:
  """Waits for every request to finish; None if the client went away first (all are aborted)."""
  async def finished(stream: Stream) -> Update:
    while True:
      update = await stream.next()
      if update.finish_reason is not None:
        return update

  done_task = asyncio.ensure_future(asyncio.gather(*(finished(s) for s in streams)))
  gone_task = asyncio.ensure_future(_wait_for_disconnect(http))
  disconnected = False
  try:
    await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    if done_task.done():
      return done_task.result()
    disconnected = True
    return None
  finally:
    for t in (done_task, gone_task):
      t.cancel()
    for s in streams:
      server.release(s, disconnected=disconnected)


async def _merged_stream_updates(server: Server, streams: list[Stream], params: list[SamplingParams]):
  """Yields (choice index, delta, finish_reason, error, logprob entries) from several requests as
  they progress; closing it aborts every request still running."""
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(index: int, stream: Stream) -> None:
    async with contextlib.aclosing(_stream_updates(server, stream, params[index])) as updates:
      async for item in updates:
        await queue.put((index, *item))

  tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
  try:
    for _ in range(sum(1 for _ in streams)):
      while True:
        index, delta, reason, error, logprobs = await queue.get()
        yield index, delta, reason, error, logprobs
        if reason is not None:
          break
  finally:
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stream_updates(server: Server, stream: Stream, params: SamplingParams):
  """Yields (text delta, finish_reason or None, error, logprob entries of the tokens since the
  previous yield) until the request finishes; aborts it if the consumer stops early (the client
  disconnected)."""
  sent = ""
  sent_tokens = 0
  finished = False
  try:
    while True:
      update = await stream.next()
      if update.error is not None:
        finished = True
        yield "", "error", update.error, ()
        return
      if update.finish_reason is None:
        text = stream_safe_prefix(update.text, params.stop)
      else:
        text = update.text
      if text.startswith(sent) and len(text) > len(sent):
        delta, sent = text[len(sent):], text
        logprobs, sent_tokens = update.logprobs[sent_tokens:], max(sent_tokens, len(update.logprobs))
        yield delta, None, None, logprobs
      if update.finish_reason is not None:
        finished = True
        yield "", update.finish_reason, None, update.logprobs[sent_tokens:]
        return
  finally:
    server.release(stream, disconnected=not finished)


# -- the app ------------------------------------------------------------------------------------

def create_app(llm, served_model_name: str | None = None, *, api_key: str | None = None,
               allowed_origins: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               stats_log_interval_s: float | None = 10.0, chat_template: str | None = None) -> FastAPI:
  """The OpenAI-compatible app over `llm` (an `LLM`); starts the engine thread now.

  api_key: every `/v1` route wants `Authorization: Bearer <api_key>` (None: open).
  allowed_origins: origins allowed by CORS ("*" for any; None: no CORS headers).
  max_body_bytes: larger request bodies are a 413.
  stats_log_interval_s: seconds between one-line stats logs while busy (None: off).
  chat_template: a template (or a file holding one) used instead of the checkpoint's.

  Stop it with `app.state.server.shutdown()` (uvicorn's shutdown does this). Tests may run the
  app in-process (httpx.ASGITransport) or under uvicorn.
  """
  served_model_name = served_model_name or (os.path.basename(os.path.normpath(llm.model_path))
                                            if getattr(llm, "model_path", None) else "sparse_jax")
  if chat_template is not None:
    from models.tokenizer import read_chat_template_arg
    chat_template = read_chat_template_arg(chat_template)
  server = Server(llm, served_model_name, stats_log_interval_s, chat_template)

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    yield
    server.shutdown()

  app = FastAPI(title="sparse_jax OpenAI-compatible server", lifespan=lifespan)
  app.state.server = server
  # Starlette runs the middleware added last first: CORS answers preflights before the key check.
  app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
  if api_key:
    app.add_middleware(ApiKeyCheck, api_key=api_key)
  if allowed_origins:
    from starlette.middleware.cors import CORSMiddleware
    app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                       allow_headers=["*"], allow_credentials="*" not in allowed_origins)

  @app.exception_handler(HTTPException)
  async def _http_error(_, exc: HTTPException):
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
      detail = f"no route {_.method} {_.url.path}; see /docs for the routes"
    elif exc.status_code == 400 and detail == "There was an error parsing the body":
      detail = "malformed body: it is not JSON text in UTF-8"
    return error_response(exc.status_code, detail, None, "not_found_error" if exc.status_code == 404
                          else "invalid_request_error", headers=getattr(exc, "headers", None))

  @app.exception_handler(Exception)
  async def _unexpected(_, exc: Exception):
    log.exception("unexpected error answering %s %s", _.method, _.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, exc: RequestValidationError):
    server.stats["rejected_invalid"] += 1
    message, param = describe_validation_errors(exc.errors())
    return error_response(400, message, param)

  @app.exception_handler(ApiError)
  async def _api_error(_, exc: ApiError):
    if exc.status == 400:
      server.stats["rejected_invalid"] += 1
    return error_response(exc.status, exc.message, exc.param, exc.kind)

  @app.get("/health")
  async def health():
    if not server.loop.alive:
      return error_response(503, "the engine thread has stopped", None, "server_error")
    return {"status": "ok", "waiting": server.engine.num_waiting, "running": server.engine.num_running,
            "free_kv_pages": server.engine.allocator.free_pages, "kv_pages": server.engine.allocator.num_pages}

  def model_card() -> dict[str, Any]:
    return {"id": served_model_name, "object": "model", "created": server.created, "owned_by": "sparse_jax",
            "max_model_len": server.engine.max_seq_len}

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def retrieve_model(model_id: str):
    server.check_model(model_id)
    return model_card()

  @app.get("/version")
  async def version():
    import jax
    from sparse_jax import __version__
    return {"version": __version__, "jax": jax.__version__}

  @app.get("/metrics")
  async def metrics():
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, http: HttpRequest):
    server.check_model(body.model)
    body.refuse_unsupported()
    warn_ignored_fields(body)
    if body.echo and body.logprobs is not None:
      raise ApiError(400, "echo=true with logprobs (the prompt's log-probabilities) is not supported", "echo")
    prompts = _prompt_list(body.prompt)
    fields = ["prompt"] if len(prompts) == 1 else [f"prompt.{i}" for i in range(len(prompts))]
    encoded = [await server.encode(p, f, body.max_tokens) for p, f in zip(prompts, fields)]
    for ids, field in zip(encoded, fields):  # every prompt is checked before any is submitted
      server.check_length(ids, body.max_tokens, field)
    params = server.sampling_params(body, body.max_tokens)
    n = len(params)
    echoes = [_echo_text(server, p, ids) if body.echo else "" for p, ids in zip(prompts, encoded)]
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = _submit_all(server, [(ids, sp, p if isinstance(p, str) else None, field)
                                   for p, ids, field in zip(prompts, encoded, fields) for sp in params], rid)
    all_params = params * len(prompts)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": served_model_name}
    if not body.stream:
      updates = await _final_updates(server, streams, http)
      if updates is None:
        return JSONResponse(status_code=499, content={})  # nobody is listening
      failed = next((u.error for u in updates if u.error is not None), None)
      if failed is not None:
        return error_response(500, failed, None, "server_error")
      choices = [{"index": i, "text": echoes[i // n] + u.text,
                  "logprobs": server.completion_logprobs(u.logprobs, len(echoes[i // n]))
                  if body.logprobs is not None else None,
                  "finish_reason": u.finish_reason, "stop_reason": s.request.stop_reason}
                 for i, (u, s) in enumerate(zip(updates, streams))]
      return {**head, "choices": choices, "usage": _usage(*(s.request for s in streams))}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
      # Per choice, the text_offset of its next token: the echo, then the text of the tokens whose
      # logprobs were sent (a token's logprobs may go out before its text, held back while it may
      # still start a stop string, so this counts tokens rather than text sent).
      offsets = [0] * len(streams)
      for i in range(len(streams)) if body.echo else ():
        offsets[i] = len(echoes[i // n])
        yield _sse({**head, "choices": [{"index": i, "text": echoes[i // n], "logprobs": None,
                                         "finish_reason": None}]})
      async with contextlib.aclosing(_merged_stream_updates(server, streams, all_params)) as updates:
        async for index, delta, reason, error, logprobs in updates:
          if error is not None:
            yield _sse({"error": {"message": error, "type": "server_error", "param": None, "code": 500}})
            break
          choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
          if body.logprobs is not None:
            lp = choice["logprobs"] = server.completion_logprobs(logprobs, offsets[index])
            if lp["tokens"]:
              offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
          if reason is not None:
            choice["stop_reason"] = streams[index].request.stop_reason
          yield _sse({**head, "choices": [choice]})
        else:
          if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(*(s.request for s in streams))})
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
    server.check_model(body.model)
    body.refuse_unsupported()
    warn_ignored_fields(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    ids = await server.encode_chat(body, max_tokens or 1)
    # Without max_tokens the answer may run to the context's end; its pages are reserved as it grows.
    server.check_length(ids, max_tokens or 1, "messages")
    params = server.sampling_params(body, max_tokens)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    streams = _submit_all(server, [(ids, sp, None, "messages") for sp in params], rid)
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": served_model_name}
    if not body.stream:
      updates = await _final_updates(server, streams, http)
      if updates is None:
        return JSONResponse(status_code=499, content={})
      failed = next((u.error for u in updates if u.error is not None), None)
      if failed is not None:
        return error_response(500, failed, None, "server_error")
      choices = [{"index": i, "message": {"role": "assistant", "content": u.text},
                  "logprobs": server.chat_logprobs(u.logprobs) if body.logprobs else None,
                  "finish_reason": u.finish_reason, "stop_reason": s.request.stop_reason}
                 for i, (u, s) in enumerate(zip(updates, streams))]
      return {**head, "choices": choices, "usage": _usage(*(s.request for s in streams))}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_head = {**head, "object": "chat.completion.chunk"}

    async def events():
      for i in range(len(streams)):
        yield _sse({**chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
      async with contextlib.aclosing(_merged_stream_updates(server, streams, params)) as updates:
        async for index, delta, reason, error, logprobs in updates:
          if error is not None:
            yield _sse({"error": {"message": error, "type": "server_error", "param": None, "code": 500}})
            break
          choice = {"index": index, "delta": {"content": delta} if delta else {},
                    "logprobs": server.chat_logprobs(logprobs) if body.logprobs else None, "finish_reason": reason}
          if reason is not None:
            choice["stop_reason"] = streams[index].request.stop_reason
          yield _sse({**chunk_head, "choices": [choice]})
        else:
          if include_usage:
            yield _sse({**chunk_head, "choices": [], "usage": _usage(*(s.request for s in streams))})
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

  return app


# -- command line -------------------------------------------------------------------------------

def api_key_from(flag: str) -> str | None:
  """The API key: the flag's value, else the SPARSE_JAX_API_KEY environment variable, else none."""
  return flag or os.environ.get(API_KEY_ENV) or None


def main(argv):
  del argv
  from absl import flags
  FLAGS = flags.FLAGS
  logging.basicConfig(level=FLAGS.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  import uvicorn

  from sparse_jax.llm import LLM
  model = FLAGS.model or None
  if model is None:
    import importlib.util
    if importlib.util.find_spec("sparse_jax.defaults") is None:
      raise SystemExit("error: no --model given and this build has no embedded default model "
                       "(sparse_jax/defaults.py); pass --model=<Hugging Face checkpoint directory>")
  try:
    llm = LLM(model, dtype=FLAGS.dtype, backend=FLAGS.backend, max_batch_size=FLAGS.max_batch_size,
              max_seq_len=FLAGS.max_seq_len, extra_llm_api_options=FLAGS.extra_llm_api_options or None,
              max_queue_size=FLAGS.max_queue_size, tensor_parallel_size=FLAGS.tensor_parallel_size)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: cannot load the model: {e}") from None
  origins = [o.strip() for o in FLAGS.allowed_origins.split(",") if o.strip()]
  try:
    app = create_app(llm, FLAGS.served_model_name or None, api_key=api_key_from(FLAGS.api_key),
                     allowed_origins=origins or None, max_body_bytes=FLAGS.max_body_bytes,
                     stats_log_interval_s=FLAGS.stats_log_interval_s or None, chat_template=FLAGS.chat_template or None)
  except ValueError as e:
    raise SystemExit(f"error: --chat_template: {e}") from None
  name = app.state.server.served_model_name
  print(f"serving '{name}' (max_seq_len={llm.engine.max_seq_len}, max_batch_size={llm.engine.max_batch_size}, "
        f"backend={llm.backend}) on http://{FLAGS.host}:{FLAGS.port}/v1", flush=True)
  uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level.lower())


def define_flags():
  from absl import flags
  flags.DEFINE_string("model", "", "Hugging Face checkpoint directory (default: the embedded default model)")
  flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
  flags.DEFINE_integer("port", 8000, "port to listen on", lower_bound=0, upper_bound=65535)
  flags.DEFINE_string("extra_llm_api_options", "", "YAML in TensorRT-LLM's layout (e.g. configs/rocket.yaml)")
  flags.DEFINE_integer("max_batch_size", None, "batch slots (default: the YAML's, else 8)", lower_bound=1)
  flags.DEFINE_integer("max_seq_len", None, "prompt + generated tokens per request (default: the model's)",
                       lower_bound=1)
  flags.DEFINE_enum("backend", None, ["auto", "pallas", "reference"], "attention kernels (default: the YAML's, "
                    "else auto: pallas on GPUs, reference on the CPU)")
  flags.DEFINE_integer("max_queue_size", 1024, "requests that may wait for a slot; beyond it: HTTP 429",
                       lower_bound=1)
  flags.DEFINE_integer("tensor_parallel_size", None, "devices the model is split over (default: the YAML's, "
                       "else 1)", lower_bound=1)
  flags.DEFINE_string("chat_template", "", "chat template (a .jinja file, a chat_template.json, or the template "
                      "text) used instead of the checkpoint's")
  flags.DEFINE_string("served_model_name", "", "model id in the API (default: the checkpoint directory's name)")
  flags.DEFINE_string("api_key", "", f"clients must send 'Authorization: Bearer <key>' on /v1 routes (default: the "
                      f"{API_KEY_ENV} environment variable; empty: no key)")
  flags.DEFINE_string("allowed_origins", "", "comma-separated origins allowed by CORS, '*' for any (default: no CORS)")
  flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, "larger request bodies get HTTP 413", lower_bound=1)
  flags.DEFINE_float("stats_log_interval_s", 10.0, "seconds between one-line stats logs while busy (0: off)",
                     lower_bound=0)
  flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"], "weights and KV cache dtype")
  flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "log level")


if __name__ == "__main__":
  from sparse_jax.cli import run_tool
  run_tool("serve")
