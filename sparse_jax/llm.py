"""The user-facing API, shaped like TensorRT-LLM's LLM API.

    from sparse_jax import LLM, SamplingParams, KvCacheConfig, RocketSparseAttentionConfig
    llm = LLM(model="path/to/hf_checkpoint",
              sparse_attention_config=RocketSparseAttentionConfig(prompt_budget=2048),
              kv_cache_config=KvCacheConfig(enable_block_reuse=False))
    out = llm.generate(["a long document ..."], SamplingParams(max_tokens=64))
    print(out[0].outputs[0].text)
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from typing import Any, AsyncIterator, Awaitable, Sequence

import jax

from sparse_jax.config import (BACKEND_CHOICES, BaseSparseAttentionConfig, ConfigError, KvCacheConfig, LlmApiOptions,
                               check_int, load_llm_api_options)
from sparse_jax.engine import (Engine, QueueFullError, Request, RequestError,  # noqa: F401 (errors re-exported)
                               SamplingParams)

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "KvCacheConfig", "QueueFullError",
           "RequestError"]


@dataclasses.dataclass(frozen=True)
class Logprob:
  """A token's log-probability under the model and its rank (1 = the most likely token)."""
  logprob: float
  rank: int | None = None


@dataclasses.dataclass
class CompletionOutput:
  """One generated sequence (TensorRT-LLM's fields).

  logprobs: with SamplingParams.logprobs=k, one dict per generated token mapping the sampled
    token and the k most likely ones to their Logprob. stop_reason: the stop token id or stop
    string that ended the sequence (None when it ended on EOS or length). The `*_diff`
    properties are what is new since the previous streamed RequestOutput.
  """
  index: int
  text: str
  token_ids: list[int]
  finish_reason: str | None = None
  cumulative_logprob: float | None = None
  logprobs: list[dict[int, Logprob]] | None = None
  stop_reason: int | str | None = None
  _prev_text_len: int = dataclasses.field(default=0, repr=False, compare=False)
  _prev_token_len: int = dataclasses.field(default=0, repr=False, compare=False)

  @property
  def length(self) -> int:
    return len(self.token_ids)

  @property
  def text_diff(self) -> str:
    return self.text[self._prev_text_len:]

  @property
  def token_ids_diff(self) -> list[int]:
    return self.token_ids[self._prev_token_len:]

  @property
  def logprobs_diff(self) -> list[dict[int, Logprob]] | None:
    return None if self.logprobs is None else self.logprobs[self._prev_token_len:]

  @classmethod
  def from_request(cls, index: int, req: Request, previous: "CompletionOutput | None" = None) -> "CompletionOutput":
    logprobs = None
    if req.params.logprobs is not None:
      logprobs = []
      for tok, (lp, rank, top) in zip(req.output_ids, req.logprobs):
        entry = {t: Logprob(v, r + 1) for r, (t, v) in enumerate(top)}
        entry[tok] = Logprob(lp, rank)
        logprobs.append(entry)
    return cls(index, req.text, list(req.output_ids), req.finish_reason, req.cumulative_logprob, logprobs,
               req.stop_reason, len(previous.text) if previous else 0, len(previous.token_ids) if previous else 0)


@dataclasses.dataclass
class RequestOutput:
  """The outputs of one prompt (TensorRT-LLM's fields): `outputs` holds SamplingParams.n sequences."""
  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_request(cls, req: Request | Sequence[Request], previous: "RequestOutput | None" = None) -> "RequestOutput":
    """From the engine request(s) of one prompt (several when n > 1); `previous`: the last
    streamed snapshot, which the `*_diff` properties are relative to."""
    reqs = [req] if isinstance(req, Request) else list(req)
    first = reqs[0]
    metrics = dict(kept_prompt_tokens=first.kept_prompt_tokens, pages_after_prefill=first.pages_after_prefill,
                   cached_prompt_tokens=first.cached_prompt_tokens, preemptions=sum(r.preemptions for r in reqs))
    if all(r.first_token_time is not None for r in reqs):
      metrics["time_to_first_token_s"] = max(r.first_token_time for r in reqs) - first.arrival_time
    if all(r.finish_time is not None for r in reqs):
      metrics["latency_s"] = max(r.finish_time for r in reqs) - first.arrival_time
    outputs = [CompletionOutput.from_request(i, r, previous.outputs[i] if previous else None)
               for i, r in enumerate(reqs)]
    return cls(request_id=first.request_id, prompt=first.prompt, prompt_token_ids=list(first.prompt_ids),
               outputs=outputs, finished=all(r.finished for r in reqs), metrics=metrics)


def _check_arguments(*, kv_cache_config, enable_chunked_prefill, backend, max_batch_size, max_seq_len,
                     tensor_parallel_size, decode_chunk_size, max_queue_size, seed, max_num_tokens) -> None:
  """Rejects a wrongly typed or out-of-range `LLM` argument, naming it (None = the default)."""
  if kv_cache_config is not None and not isinstance(kv_cache_config, KvCacheConfig):
    raise ConfigError(f"kv_cache_config must be a KvCacheConfig, got {type(kv_cache_config).__name__}")
  if enable_chunked_prefill is not None and not isinstance(enable_chunked_prefill, bool):
    raise ConfigError(f"enable_chunked_prefill={enable_chunked_prefill!r}: must be True, False or None")
  if backend is not None and backend not in BACKEND_CHOICES:
    raise ConfigError(f"backend={backend!r}: must be one of {list(BACKEND_CHOICES)} or None")
  for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                      ("tensor_parallel_size", tensor_parallel_size)):
    check_int(name, value, optional=True)
  for name, value in (("decode_chunk_size", decode_chunk_size), ("max_queue_size", max_queue_size),
                      ("max_num_tokens", max_num_tokens)):
    check_int(name, value)
  check_int("seed", seed, minimum=0, maximum=2**63 - 1)


def default_backend() -> str:
  return "pallas" if jax.default_backend() == "gpu" else "reference"


def _default_model_path() -> str:
  from sparse_jax.defaults import default_model_path
  return default_model_path()


class LLM:
  """Loads a checkpoint and serves `generate` calls through a continuous-batching engine.

  model: an HF checkpoint directory (config.json + safetensors + tokenizer.json), an already
    built model module (then pass `tokenizer`), or None for the embedded default model.
  dtype: "auto" (bfloat16 on GPUs, float32 on the CPU), "bfloat16", "float16" or "float32".
  backend: "auto" (Pallas kernels on GPUs, pure-jnp references on the CPU), "pallas",
    "reference".
  extra_llm_api_options: a YAML path or dict in TensorRT-LLM's layout; explicit arguments win.
  chat_template: a template (or a file holding one) used by `chat` instead of the checkpoint's.
  allow_long_max_seq_len: let max_seq_len exceed the model's max_position_embeddings (RoPE runs
    past them; what the model does there is its own), with a warning; else that is an error.
  max_num_tokens: prompt tokens prefilled per engine step (vLLM's max_num_batched_tokens): a
    longer prompt is prefilled in chunks of that many tokens, with decode steps of the running
    requests between them. enable_chunked_prefill: with an algorithm that supports it (RocketKV,
    Quest) each chunk attends only to the `prefill_budget` most relevant tokens of the earlier
    chunks (sparse prefill) instead of all of them.
  """

  def __init__(self, model: Any = None, *, tokenizer: Any = None, dtype: str = "auto",
               kv_cache_config: KvCacheConfig | None = None,
               sparse_attention_config: BaseSparseAttentionConfig | None = None,
               enable_chunked_prefill: bool | None = None, backend: str | None = None,
               max_batch_size: int | None = None, max_seq_len: int | None = None,
               tensor_parallel_size: int | None = None, extra_llm_api_options: Any = None,
               decode_chunk_size: int = 16, max_queue_size: int = 1024, seed: int = 0,
               interpret: bool | None = None, max_num_tokens: int = 4096, chat_template: str | None = None,
               allow_long_max_seq_len: bool = False):
    import models
    _check_arguments(kv_cache_config=kv_cache_config, enable_chunked_prefill=enable_chunked_prefill, backend=backend,
                     max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                     tensor_parallel_size=tensor_parallel_size, decode_chunk_size=decode_chunk_size,
                     max_queue_size=max_queue_size, seed=seed, max_num_tokens=max_num_tokens)
    opts = load_llm_api_options(extra_llm_api_options) if extra_llm_api_options is not None else LlmApiOptions()
    kv_cache_config = kv_cache_config or opts.kv_cache_config
    if sparse_attention_config is None:
      sparse_attention_config = opts.sparse_attention_config
    if enable_chunked_prefill is None:
      enable_chunked_prefill = opts.enable_chunked_prefill
    if sparse_attention_config is not None:
      if not isinstance(sparse_attention_config, BaseSparseAttentionConfig):
        raise ConfigError(f"sparse_attention_config must be a sparse attention config, got "
                          f"{type(sparse_attention_config).__name__}")
      sparse_attention_config.validate_with(kv_cache_config, enable_chunked_prefill)
    backend = backend or opts.backend or "auto"
    backend = default_backend() if backend == "auto" else backend
    tensor_parallel_size = tensor_parallel_size or opts.tensor_parallel_size or 1
    max_batch_size = max_batch_size or opts.max_batch_size or 8
    max_seq_len = max_seq_len or opts.max_seq_len
    if dtype == "auto":
      dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    if isinstance(model, (str, os.PathLike)) or model is None:
      path = os.fspath(model) if model is not None else _default_model_path()
      self.model_path = path
      self.model = models.from_pretrained(path, dtype=dtype)
      self.tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(path)
      self.generation_config = models.load_generation_config(path)
    elif hasattr(model, "config") and hasattr(model, "cache_layout"):
      self.model_path = None
      self.model = model
      self.tokenizer = tokenizer
      self.generation_config = models.GenerationConfig()
    else:
      raise TypeError(f"model must be a checkpoint directory, a model module or None, got {type(model).__name__}")
    positions = self.model.config.max_position_embeddings
    if max_seq_len is not None and max_seq_len > positions:
      if not allow_long_max_seq_len:
        raise ConfigError(f"max_seq_len={max_seq_len} is more than the model's max_position_embeddings={positions} "
                          "(allow_long_max_seq_len=True runs past them)")
      logging.getLogger(__name__).warning(
          "max_seq_len=%d is more than the model's max_position_embeddings=%d: positions past them are "
          "extrapolated", max_seq_len, positions)
    if chat_template is not None:
      if self.tokenizer is None:
        raise ValueError("chat_template was given but the model has no tokenizer.json")
      self.tokenizer = self.tokenizer.with_chat_template(models.tokenizer.read_chat_template_arg(chat_template))
    from models.loading import resolve_dtype
    self.dtype = resolve_dtype(dtype)
    self.sparse_attention_config = sparse_attention_config
    self.kv_cache_config = kv_cache_config
    self.backend = backend
    self.engine = Engine(self.model, self.tokenizer, kv_cache_config=kv_cache_config,
                         sparse_attention_config=sparse_attention_config, backend=backend,
                         max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv_dtype=self.dtype,
                         decode_chunk_size=decode_chunk_size, max_queue_size=max_queue_size, seed=seed,
                         interpret=interpret, tensor_parallel_size=tensor_parallel_size,
                         enable_chunked_prefill=enable_chunked_prefill, max_num_tokens=max_num_tokens)
    self._step_lock = threading.Lock()  # one engine step at a time across generate / generate_async callers

  @property
  def max_seq_len(self) -> int:
    return self.engine.max_seq_len

  def encode(self, prompt: str | Sequence[int], name: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError(f"{name} is a string but this model has no tokenizer.json; pass token ids")
      if not prompt:
        raise ValueError(f"{name} is empty")
      return self.tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      return list(prompt)
    raise TypeError(f"{name} must be a string or a list of token ids, got {type(prompt).__name__}")

  def get_default_sampling_params(self) -> SamplingParams:
    """SamplingParams() with the checkpoint's generation_config.json values (temperature, top_p,
    top_k; greedy when it sets do_sample=false; max_new_tokens as max_tokens): what `generate`
    and `chat` use when called without sampling_params."""
    return SamplingParams(**self.generation_config.sampling_defaults())

  def chat(self, messages: Any, sampling_params: SamplingParams | None = None, *, tools: Any = None,
           add_generation_prompt: bool = True, use_tqdm: bool = False, **template_kwargs: Any) -> list[RequestOutput]:
    """Generates a reply to a conversation (a list of {"role", "content"} dicts) or to each of a
    list of conversations, rendered with the checkpoint's chat template (or `chat_template`).
    Raises models.ChatTemplateError when there is no template or it fails."""
    if self.tokenizer is None:
      raise ValueError("chat needs a tokenizer; this model has no tokenizer.json")
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    ids = [self.tokenizer.encode_chat(c, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs)
           for c in conversations]
    return self.generate(ids, sampling_params, use_tqdm=use_tqdm)

  def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               use_tqdm: bool = False) -> list[RequestOutput]:
    """prompts: a string, a list of token ids, or a list of either. Returns one output per prompt,
    with SamplingParams.n completions each; `use_tqdm` shows a progress bar over the prompts.

    Raises `RequestError` naming the prompt if the engine failed one (the others still ran, and
    the engine is ready for the next call).
    """
    if not isinstance(prompts, (str, list, tuple)):
      raise TypeError(f"prompts must be a string, a list of token ids or a list of those, got "
                      f"{type(prompts).__name__}")
    single = isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts))
    batch = [prompts] if single else list(prompts)
    if not batch:
      raise ValueError("prompts is empty")
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
      params = [sampling_params or self.get_default_sampling_params()] * len(batch)
    elif isinstance(sampling_params, (list, tuple)):
      params = list(sampling_params)
      if len(params) != len(batch):
        raise ValueError(f"got {len(params)} SamplingParams for {len(batch)} prompts")
    else:
      params = [sampling_params]
    bad = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
    if bad:
      raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {bad[0]}")
    encoded = [self.encode(p, f"prompt {i}") for i, p in enumerate(batch)]
    for i, (ids, sp) in enumerate(zip(encoded, params)):
      self.engine.validate(ids, sp, f"prompt {i}")
    bar = None
    if use_tqdm:
      from tqdm import tqdm
      bar = tqdm(total=len(batch), desc="generate", unit="prompt")
    groups: list[list[Request]] = [[] for _ in batch]
    pending = [(g, prompt, ids, child) for g, (prompt, ids, sp) in enumerate(zip(batch, encoded, params))
               for child in completions_of(sp)]
    done = 0
    try:
      while pending or self.engine.has_unfinished():
        while pending and self.engine.num_waiting < self.engine.max_queue_size:
          g, prompt, ids, sp = pending.pop(0)
          groups[g].append(self.engine.add_request(ids, sp, prompt=prompt if isinstance(prompt, str) else None))
        self._step()
        if bar is not None:
          now = sum(len(reqs) == sp.n and all(r.finished for r in reqs) for reqs, sp in zip(groups, params))
          bar.update(now - done)
          done = now
    finally:
      # An interrupted call (an exception, Ctrl-C) leaves nothing behind for the next one: its
      # requests' slots and pages are freed at the next step.
      for req in (r for reqs in groups for r in reqs):
        if not req.finished:
          self.engine.abort(req)
      if bar is not None:
        bar.close()
    failed = [(i, r) for i, reqs in enumerate(groups) for r in reqs if r.error is not None]
    if failed:
      raise RequestError("; ".join(f"prompt {i}: {r.error}" for i, r in failed))
    return [RequestOutput.from_request(reqs) for reqs in groups]

  def generate_async(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None,
                     streaming: bool = False) -> Awaitable[RequestOutput] | AsyncIterator[RequestOutput]:
    """Submits one prompt now. streaming=False: returns an awaitable of the final RequestOutput;
    streaming=True: an async iterator of RequestOutput snapshots, one per engine step that added
    tokens (their `*_diff` properties hold the new part). Concurrent calls share the engine's
    batch: whichever caller is waiting runs the next engine step (in a worker thread, so the
    event loop stays free). Cancelling the await, or closing the iterator early, aborts the request."""
    sp = sampling_params or self.get_default_sampling_params()
    if not isinstance(sp, SamplingParams):
      raise TypeError(f"sampling_params must be a SamplingParams, got {type(sp).__name__}")
    ids = self.encode(prompt)
    self.engine.validate(ids, sp)
    reqs: list[Request] = []
    try:
      for child in completions_of(sp):
        reqs.append(self.engine.add_request(ids, child, prompt=prompt if isinstance(prompt, str) else None))
    except BaseException:
      for r in reqs:
        self.engine.abort(r)
      raise
    return self._stream_outputs(reqs) if streaming else self._final_output(reqs)

  def _step(self) -> None:
    with self._step_lock:
      if self.engine.has_unfinished():
        self.engine.step()

  async def _final_output(self, reqs: list[Request]) -> RequestOutput:
    try:
      while not all(r.finished for r in reqs):
        await asyncio.to_thread(self._step)
    finally:
      for r in reqs:
        if not r.finished:
          self.engine.abort(r)
    _raise_failed(reqs)
    return RequestOutput.from_request(reqs)

  async def _stream_outputs(self, reqs: list[Request]) -> AsyncIterator[RequestOutput]:
    previous, seen = None, None
    try:
      while True:
        await asyncio.to_thread(self._step)
        state = [(len(r.output_ids), r.finished) for r in reqs]
        if all(r.finished for r in reqs):
          _raise_failed(reqs)
        if state != seen:
          seen = state
          previous = RequestOutput.from_request(reqs, previous)
          yield previous
        if previous is not None and previous.finished:
          return
    finally:
      for r in reqs:
        if not r.finished:
          self.engine.abort(r)


def _raise_failed(reqs: list[Request]) -> None:
  errors = [r.error for r in reqs if r.error is not None]
  if errors:
    raise RequestError("; ".join(errors))


def completions_of(sp: SamplingParams) -> list[SamplingParams]:
  """One engine request per completion; completion i of a seeded request samples with seed + i
  (wrapping around within the int64 seeds SamplingParams accepts)."""
  if sp.n == 1:
    return [sp]
  seed = lambda i: None if sp.seed is None else (sp.seed + i + 2**63) % 2**64 - 2**63
  return [dataclasses.replace(sp, n=1, seed=seed(i)) for i in range(sp.n)]
