"""The inference engine: a continuous-batching scheduler over jitted prefill and decode steps.

A fixed number of batch slots (static shapes). Requests wait in a bounded FIFO queue; one is
admitted when a slot is free and the page pool can hold its prompt plus `max_tokens`
(admission reserves the worst case, so such a request can never run out of pages). A request
without `max_tokens` reserves its prompt plus one decode chunk and grows as it generates;
when the pool runs out, the most recently admitted growing request is preempted: its pages
return to the pool and it waits again at the head of the queue, to be prefilled anew
(prompt plus what it generated) when pages free up.

Stall-free scheduling (Sarathi-Serve, vLLM's `max_num_batched_tokens`): each step prefills
at most `max_num_tokens` prompt tokens (the whole short prompts, wherever they are in the
queue, then one chunk of a long prompt in what is left), then runs one decode chunk over every
request past its prefill, so running requests keep decoding while a long prompt is prefilled
and a short prompt behind a long one does not wait for it. A request cancelled mid-prefill stops
at the next chunk boundary and frees its pages. Chunks attend to all earlier tokens (dense
attention: the same tokens as a one-shot prefill), or, with `enable_chunked_prefill`, to the
algorithm's selection of them within its `prefill_budget` (sparse prefill).

Prefix caching (`KvCacheConfig.enable_block_reuse`): the full prompt pages of a prefilled
request are registered under a hash chain of their token ids; a later prompt with the same
prefix takes those pages by reference (with their aux entries, which share the page ids) and
prefills only the rest, at the right RoPE positions. With a prompt-compressing algorithm the
compaction writes the kept tokens into pages of the request's own, so the dense prompt pages
stay intact and reusable; they become evictable cache once the prefill is over. Unheld cached
pages count as free: the allocator evicts the least recently used ones when it needs pages.

Decode runs `decode_chunk_size` steps per host round trip in a `lax.while_loop`, sampling on
device; finished requests free their pages.

Compiled shapes: prefill per (rows, padded prompt length, page-table width) bucket, decode
per (page-table width) bucket; widths are powers of two, so a handful of compilations serve
every request.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import itertools
import logging
import math
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.common import pow2_at_least
from sparse_jax.attention import Runtime, clear_importance, sequence_importance, with_importance_pool
from sparse_jax.cache import CacheExhaustedError, PageAllocator, PagedKVCache, create_cache_for
from sparse_jax.config import BaseSparseAttentionConfig, ConfigError, KvCacheConfig, get_algorithm, is_int, is_real
from sparse_jax.sampling import MAX_TOP_LOGPROBS, SampledLogprobs, SamplingState, TokenHistory, sample

log = logging.getLogger("sparse_jax.engine")


class QueueFullError(RuntimeError):
  """The waiting queue is at `max_queue_size`; the request was rejected."""


class RequestError(RuntimeError):
  """The engine failed a request (its `error` says why); the other requests were unaffected."""


@dataclasses.dataclass
class SamplingParams:
  """How to generate (TensorRT-LLM / vLLM names).

  max_tokens: new tokens to generate (> 0); None = until a stop condition or max_seq_len (the
    request then reserves pages as it grows). temperature: 0 = greedy. top_k: 0 = off.
  top_p: nucleus mass in (0, 1]. seed: per-request sampling seed (None: engine seed + request
  number). stop: strings that end generation (not included in the text). stop_token_ids:
  extra token ids that end generation. ignore_eos: keep going past EOS. n: completions per
  prompt (`LLM.generate`; completion i samples with seed + i).
  presence_penalty / frequency_penalty: in [-2, 2], subtracted from the logits of generated
  tokens (once / per occurrence). repetition_penalty: > 0, divides positive and multiplies
  negative logits of tokens in the prompt or generated (1 = off). min_tokens: tokens generated
  before EOS, stop_token_ids or stop strings may end the request. logprobs: None, or how many
  top alternatives (0..MAX_TOP_LOGPROBS) to report with each generated token's log-probability.
  """
  max_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: str | Sequence[str] | None = None
  stop_token_ids: Sequence[int] | None = None
  ignore_eos: bool = False
  n: int = 1
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  min_tokens: int = 0
  logprobs: int | None = None

  def __post_init__(self):
    def bad(field: str, why: str):
      raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: {why}")

    if self.max_tokens is not None and (not is_int(self.max_tokens) or not 0 < self.max_tokens <= INT32_MAX):
      bad("max_tokens", f"must be None or an integer in [1, {INT32_MAX}]")
    if not is_real(self.temperature) or self.temperature < 0:
      bad("temperature", "must be a finite number >= 0 (0 = greedy)")
    if not is_int(self.top_k) or not 0 <= self.top_k <= INT32_MAX:
      bad("top_k", f"must be an integer in [0, {INT32_MAX}] (0 = off)")
    if not is_real(self.top_p) or not 0 < self.top_p <= 1:
      bad("top_p", "must be a number in (0, 1]")
    if self.seed is not None and (not is_int(self.seed) or not -2**63 <= self.seed < 2**63):
      bad("seed", "must be None or an integer in [-2**63, 2**63)")
    if not isinstance(self.ignore_eos, (bool, np.bool_)):
      bad("ignore_eos", "must be True or False")
    if not is_int(self.n) or not 1 <= self.n <= MAX_N:
      bad("n", f"must be an integer in [1, {MAX_N}]")
    for name in ("presence_penalty", "frequency_penalty"):
      value = getattr(self, name)
      if not is_real(value) or not -2 <= value <= 2:
        bad(name, "must be a number in [-2, 2] (0 = off)")
    if not is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
      bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
    if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= (self.max_tokens or INT32_MAX):
      bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens or INT32_MAX}]")
    if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
      bad("logprobs", f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")
    stop = [self.stop] if isinstance(self.stop, str) else self.stop
    if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
      bad("stop", "must be None, a string or a list of strings")
    ids = self.stop_token_ids
    if ids is not None and (not isinstance(ids, (list, tuple, np.ndarray)) or
                            not all(is_int(t) and 0 <= t <= INT32_MAX for t in ids)):
      bad("stop_token_ids", "must be None or a list of non-negative token ids")
    self.max_tokens = None if self.max_tokens is None else int(self.max_tokens)
    self.top_k, self.ignore_eos = int(self.top_k), bool(self.ignore_eos)
    self.temperature, self.top_p = float(self.temperature), float(self.top_p)
    self.seed = None if self.seed is None else int(self.seed)
    self.stop = [s for s in (stop or []) if s]
    self.stop_token_ids = [int(t) for t in (ids if ids is not None else [])]
    self.n, self.min_tokens = int(self.n), int(self.min_tokens)
    self.presence_penalty, self.frequency_penalty = float(self.presence_penalty), float(self.frequency_penalty)
    self.repetition_penalty = float(self.repetition_penalty)
    self.logprobs = None if self.logprobs is None else int(self.logprobs)

  @property
  def penalised(self) -> bool:
    return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
            or self.min_tokens > 0)


INT32_MAX = 2**31 - 1
MAX_N = 128  # completions per prompt (each is an engine request)



class RequestState(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass
class Request:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  prompt: str | None = None
  state: RequestState = RequestState.WAITING
  slot: int | None = None
  output_ids: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str | None = None
  stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None: EOS, length)
  # Per generated token, when params.logprobs is set: (logprob, rank, [(token id, logprob)] best first).
  logprobs: list[tuple[float, int, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)
  cumulative_logprob: float | None = None
  arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
  first_token_time: float | None = None
  finish_time: float | None = None
  kept_prompt_tokens: int | None = None
  cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)
  pages_after_prefill: int | None = None
  error: str | None = None  # why the engine failed the request (finish_reason "error")
  preemptions: int = 0
  on_update: Callable[["Request"], None] | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  _cancelled: bool = False
  _prefilled: int = 0  # tokens of `_context` stored in the slot's pages (cached prefix included)
  _in_prefill: bool = False
  _admitted: int = 0  # admission order (the latest growing request is preempted first)
  _compact_pages: list[int] = dataclasses.field(default_factory=list)  # own pages for compaction

  @property
  def finished(self) -> bool:
    return self.state is RequestState.FINISHED

  @property
  def _context(self) -> list[int]:
    """What a prefill of this request stores: the prompt, plus, after a preemption, every token
    generated so far (the last one's logits give the next token)."""
    return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids


def _free_memory_bytes() -> int | None:
  """Free memory of one accelerator (or the host's available memory on the CPU); None if unknown."""
  if jax.default_backend() == "cpu":
    try:
      with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
      return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
      return None
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def length_bucket(n: int, lo: int = 16) -> int:
  """Padded prompt length: the next of 2^k * {1, 1.25, 1.5, 1.75} (at most 25% padding)."""
  if n <= lo:
    return lo
  base = 1 << (math.floor(math.log2(n)))
  for mult in (1.0, 1.25, 1.5, 1.75, 2.0):
    if base * mult >= n and float(base * mult).is_integer():
      return int(base * mult)
  return 2 * base


def _shard_model(model: nnx.Module, tensor_parallel_size: int):
  """(mesh, whether the KV heads are split) after sharding `model` over tensor_parallel_size
  devices; (None, False) for one device."""
  if tensor_parallel_size == 1:
    return None, False
  from sparse_jax import parallel
  if tensor_parallel_size < 1:
    raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1")
  shard_kv = parallel.check_divisible(model, tensor_parallel_size)
  mesh = parallel.make_mesh(tensor_parallel_size)
  parallel.shard_model(model, mesh, shard_kv)
  return mesh, shard_kv


def check_dense_layers(sparse: BaseSparseAttentionConfig | None, num_layers: int) -> None:
  """Raises ConfigError unless `sparse.dense_layers` leaves at least one of the model's layers
  sparse: a config whose dense first layers cover the whole model would run dense attention
  while reporting a sparse algorithm and budget."""
  if sparse is None or sparse.dense_layers < num_layers:
    return
  default = type(sparse).__dataclass_fields__["dense_layers"].default
  raise ConfigError(
      f"{type(sparse).__name__}.dense_layers={sparse.dense_layers}: the model has num_layers={num_layers}, so no "
      f"layer would be sparse (layers 0..dense_layers-1 attend densely; the {sparse.algorithm} default is "
      f"{default}); set dense_layers to at most {num_layers - 1} (0 = every layer sparse)")


class Engine:
  """Owns the model, the paged cache, the allocator and the request queue.

  Thread-safety: `add_request` and `abort` may be called from any thread; `step` must be
  called from one thread (the engine loop).
  """

  def __init__(self, model: nnx.Module, tokenizer=None, *, kv_cache_config: KvCacheConfig | None = None,
               sparse_attention_config: BaseSparseAttentionConfig | None = None, backend: str = "reference",
               max_batch_size: int = 8, max_seq_len: int | None = None, kv_dtype=jnp.float32,
               decode_chunk_size: int = 16, max_queue_size: int = 1024, max_num_tokens: int = 4096,
               seed: int = 0, interpret: bool | None = None, tensor_parallel_size: int = 1,
               enable_chunked_prefill: bool = False):
    kv_cache_config = kv_cache_config or KvCacheConfig()
    if max_batch_size <= 0:
      raise ValueError(f"max_batch_size={max_batch_size} must be positive")
    if decode_chunk_size <= 0:
      raise ValueError(f"decode_chunk_size={decode_chunk_size} must be positive")
    self.model_config = model.config
    self.tokenizer = tokenizer
    mesh, shard_kv = _shard_model(model, tensor_parallel_size)
    self.tensor_parallel_size = tensor_parallel_size
    self._kv_shards = tensor_parallel_size if shard_kv else 1  # devices each KV-head pool is split over
    self.decode_budget = None if sparse_attention_config is None else sparse_attention_config.decode_budget
    if self.decode_budget is not None and mesh is not None:
      raise ValueError("decode_budget (eviction) is not supported with tensor_parallel_size > 1 yet")
    self.runtime = Runtime(backend=backend, sparse=sparse_attention_config, interpret=interpret, mesh=mesh,
                           shard_kv=shard_kv, evict=self.decode_budget is not None,
                           sparse_prefill=enable_chunked_prefill)
    # Up to this many tokens decode densely, skipping the prediction (the algorithm's dense_below:
    # where it would select everything, or where it keeps its sparse paths off), so short
    # contexts never pay for sparsity.
    algo = self.runtime.algorithm
    self._dense_below = (algo.dense_below(sparse_attention_config)
                         if algo is not None and algo.dense_below is not None and not self.runtime.evict else None)
    self.kv_cache_config = kv_cache_config
    self.max_batch_size = max_batch_size
    self.max_seq_len = int(max_seq_len or model.config.max_position_embeddings)
    self.decode_chunk_size = decode_chunk_size
    self.max_queue_size = max_queue_size
    if (not isinstance(max_num_tokens, int) or isinstance(max_num_tokens, bool) or max_num_tokens <= 0
        or max_num_tokens % kv_cache_config.tokens_per_block):
      raise ValueError(f"max_num_tokens={max_num_tokens!r} must be a positive multiple of "
                       f"tokens_per_block={kv_cache_config.tokens_per_block}")
    self.max_num_tokens = max_num_tokens  # prompt tokens prefilled per step
    sparse = sparse_attention_config
    # A compressing algorithm scores the prompt with its last queries (its min_final_chunk): the
    # last chunk of a prefill (and so the part of a prompt not taken from the prefix cache) holds them.
    algorithm = None if sparse is None else get_algorithm(sparse)
    self._window = 0 if algorithm is None else algorithm.min_final_chunk(sparse)
    self._compacts = sparse is not None and type(sparse).compacts_prompt
    if self._window > max_num_tokens:
      raise ValueError(f"max_num_tokens={max_num_tokens} must hold the algorithm's query window of {self._window} "
                       "tokens (the last chunk of a prefill)")
    self.seed = seed
    self.page_size = kv_cache_config.tokens_per_block
    self.layout = model.cache_layout(sparse_attention_config, self.page_size)
    check_dense_layers(sparse_attention_config, self.layout.num_layers)
    if self.decode_budget is not None:
      self.layout = with_importance_pool(self.layout)
    self.max_pages_per_seq = math.ceil(self.max_seq_len / self.page_size)
    kv_dtype = kv_dtype if kv_cache_config.dtype == "auto" else jnp.dtype(kv_cache_config.dtype).type
    self.kv_dtype = kv_dtype
    num_pages = self._pool_pages(kv_cache_config, kv_dtype)
    self.allocator = PageAllocator(num_pages, self.page_size, max_batch_size, self.max_pages_per_seq,
                                   enable_reuse=kv_cache_config.enable_block_reuse)
    self._make_cache = self._cache_factory(num_pages, mesh, shard_kv)  # also rebuilds a pool a failed step consumed
    self.cache = self._make_cache()
    if sparse_attention_config is not None:
      self._attach_predictors(model, sparse_attention_config)
    self.graphdef, self.params = nnx.split(model)
    eos = set(getattr(model.config, "eos_token_ids", ()) or ())
    if tokenizer is not None:
      eos |= set(tokenizer.eos_token_ids)
    self.eos_token_ids = tuple(sorted(eos))
    self._eos = np.array(self.eos_token_ids or (-1,), np.int32)
    self._lock = threading.Lock()
    self._work = threading.Event()  # set by add_request/abort/wake: lets an idle loop sleep
    self._waiting: collections.deque[Request] = collections.deque()
    self._running: dict[int, Request] = {}  # every request holding a slot, in prefill or decoding
    self._prefilling: list[Request] = []    # the ones still in prefill, in admission order
    self._ids = itertools.count()
    self._admissions = itertools.count()
    self._slot_len = np.zeros(max_batch_size, np.int64)  # host mirror of cache.lengths
    self._last_token = np.zeros(max_batch_size, np.int32)
    self._samp = self._empty_sampling()
    self.history = TokenHistory.zeros(max_batch_size, model.config.vocab_size)
    self.stats = collections.Counter()
    self.peak_pages = 0
    self.prefill_fn = jax.jit(self._prefill_impl, static_argnames=("n_pages", "chunked", "final", "with_logprobs"),
                              donate_argnames=("cache", "history"))
    self._evict_fn = jax.jit(self._evict_impl, donate_argnames=("cache",))
    self.decode_fn = jax.jit(self._decode_impl, static_argnames=("n_pages", "num_steps", "dense", "with_logprobs"),
                             donate_argnames=("cache", "history"))
    self._set_history_fn = jax.jit(_set_history_row, donate_argnames=("history",))

  def _cache_factory(self, num_pages: int, mesh, shard_kv: bool) -> Callable[[], PagedKVCache]:
    """A function building the empty page pool (under tensor parallelism born sharded: no full
    copy on one device)."""
    make_cache = functools.partial(create_cache_for, self.layout, num_pages=num_pages, page_size=self.page_size,
                                   batch_slots=self.max_batch_size, max_pages_per_seq=self.max_pages_per_seq,
                                   dtype=self.kv_dtype)
    if mesh is None:
      return make_cache
    from sparse_jax import parallel
    return jax.jit(make_cache, out_shardings=parallel.cache_shardings(jax.eval_shape(make_cache), mesh, shard_kv))

  def _attach_predictors(self, model, sparse) -> None:
    algo = get_algorithm(sparse)
    if algo.build_predictor is None or not hasattr(model, "attention_layers"):
      return
    for i, attn in enumerate(model.attention_layers()):
      attn.predictor = algo.build_predictor(sparse, attn.spec(self.page_size, self.runtime), i)

  # -- sizing -------------------------------------------------------------------------
  def page_table_width(self, tokens: int) -> int:
    """Page-table columns a compiled step over sequences of up to `tokens` tokens gets: a power
    of two (so a handful of compilations serve every length), at most max_pages_per_seq."""
    return min(self.max_pages_per_seq, pow2_at_least(math.ceil(tokens / self.page_size)))

  def page_bytes(self, kv_dtype, per_device: bool = False) -> int:
    """Bytes of one page (K, V and aux pools of every layer); `per_device`: what one device holds
    under tensor parallelism (pools with one entry per KV head are split, the others replicated)."""
    shards = self._kv_shards if per_device else 1
    per_page = self.layout.bytes_per_token(kv_dtype) * self.page_size // shards
    for spec in self.layout.aux_specs.values():
      split = shards if spec.heads == self.layout.kv_heads else 1
      per_page += (self.layout.num_layers * spec.heads * math.prod(spec.entry_shape) * jnp.dtype(spec.dtype).itemsize
                   // split)
    return per_page

  def _pool_pages(self, cfg: KvCacheConfig, kv_dtype) -> int:
    full = self.max_batch_size * self.max_pages_per_seq
    if cfg.max_tokens is not None:
      pages = math.ceil(cfg.max_tokens / self.page_size)
    elif jax.default_backend() == "gpu":
      stats = jax.devices()[0].memory_stats() or {}
      free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
      # `free` is one device's: size by the share of a page each device holds.
      pages = min(full, int(free * cfg.free_gpu_memory_fraction) // self.page_bytes(kv_dtype, per_device=True))
    else:
      pages = min(full, max(self.max_pages_per_seq, math.ceil(131072 / self.page_size)))
    if pages <= 0:
      raise CacheExhaustedError(f"the KV pool would hold no page of {self.page_size} tokens "
                                f"(kv_cache_config={cfg})")
    need = pages * self.page_bytes(kv_dtype, per_device=True)
    free = _free_memory_bytes()
    if free is not None and need > free:
      why = (f"kv_cache_config.max_tokens={cfg.max_tokens}" if cfg.max_tokens is not None else
             f"max_batch_size={self.max_batch_size} x max_seq_len={self.max_seq_len}")
      raise ConfigError(f"{why} needs a KV pool of {pages} pages x {self.page_bytes(kv_dtype, per_device=True)} "
                        f"bytes = {need / 2**30:.1f} GiB per device, more than the {free / 2**30:.1f} GiB free; "
                        "lower it")
    if pages >= 2**31:
      raise ConfigError(f"a KV pool of {pages} pages does not fit int32 page ids; lower kv_cache_config.max_tokens")
    return pages

  # -- requests -----------------------------------------------------------------------
  def validate(self, prompt_ids: Sequence[int], params: SamplingParams, name: str = "prompt") -> None:
    if len(prompt_ids) == 0:
      raise ValueError(f"{name} is empty")
    vocab = self.model_config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
      raise ValueError(f"{name} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    total = len(prompt_ids) + (params.max_tokens or 1)
    if total > self.max_seq_len:
      raise ValueError(f"{name} has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} that is {total} "
                       f"> max_seq_len={self.max_seq_len}")
    need = self.allocator.pages_for(self._reserved_tokens(len(prompt_ids), params))
    if need > self.allocator.num_pages:
      raise ValueError(f"{name} needs {need} KV pages ({total} tokens) but the pool holds only "
                       f"{self.allocator.num_pages}; raise kv_cache_config.max_tokens")

  def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, *, prompt: str | None = None,
                  request_id: str | None = None, on_update=None) -> Request:
    self.validate(prompt_ids, params)
    with self._lock:
      if len(self._waiting) >= self.max_queue_size:
        raise QueueFullError(f"request queue is full ({self.max_queue_size} waiting); retry later")
      n = next(self._ids)
      req = Request(request_id=request_id or f"req-{n}", prompt_ids=[int(t) for t in prompt_ids], params=params,
                    prompt=prompt, on_update=on_update)
      req._seed = params.seed if params.seed is not None else (self.seed * 1_000_003 + n) % 2**63
      self._waiting.append(req)
    self._work.set()
    return req

  def abort(self, request: Request) -> None:
    """Cancels a request; its slot and pages are freed at the next step boundary."""
    with self._lock:
      request._cancelled = True
      if request.state is RequestState.WAITING and request in self._waiting:
        self._waiting.remove(request)
        self._finish(request, "abort")
    self._work.set()

  def wake(self) -> None:
    """Ends a `wait_for_work` early (e.g. to stop an engine thread)."""
    self._work.set()

  def wait_for_work(self, timeout: float | None = None) -> bool:
    """Blocks until `add_request`, `abort` or `wake` is called (or `timeout` seconds pass); True if
    woken. For an engine thread that is idle: `step()` while `has_unfinished()`, else this. A call
    made between the caller's `has_unfinished()` check and this wait still wakes it."""
    woken = self._work.wait(timeout)
    self._work.clear()
    return woken

  def has_unfinished(self) -> bool:
    with self._lock:
      return bool(self._waiting or self._running)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._running)

  # -- the loop -----------------------------------------------------------------------
  def step(self) -> None:
    """Frees cancelled requests, admits what fits, prefills up to `max_num_tokens` prompt
    tokens, then runs one decode chunk over the requests past their prefill.

    A request whose work raises finishes with finish_reason "error" (its `error` says why) and
    the others go on: a failing prefill group or decode chunk is retried one request at a time
    to find the request at fault. Only if a failed step consumed the donated KV pool is every
    running request failed (their keys and values are gone) and the pool rebuilt.
    """
    self._reap_cancelled()
    self._admit()
    if self._prefilling:
      self._prefill_step()
    decoding = [r for r in self._running.values() if not r._in_prefill]
    if decoding:
      self._isolated(self._decode, decoding, lambda req: self._decode(only=[req.slot]), "decode")

  def fail_all(self, exc: BaseException, where: str = "engine step") -> None:
    """Fails every waiting and running request with `exc` and rebuilds the KV pool if a failed
    step consumed it: the last resort of an engine loop when `step` itself raised."""
    with self._lock:
      waiting, self._waiting = list(self._waiting), collections.deque()
      running = list(self._running.values())
    self._fail(waiting + running, exc, where)
    self._restore_cache(exc)

  def _isolated(self, run_all: Callable[[], None], reqs: list[Request], run_one: Callable[[Request], None],
                where: str) -> None:
    """Runs `run_all`; if it raises, runs `run_one` for each of `reqs` (when more than one) and
    fails those that raise alone."""
    try:
      run_all()
      return
    except Exception as e:
      if self._restore_cache(e) or len(reqs) == 1:
        self._fail(reqs, e, where)
        return
    for req in reqs:
      if req.finished or self._running.get(req.slot) is not req:
        continue
      try:
        run_one(req)
      except Exception as e:
        if self._restore_cache(e):
          self._fail([req], e, where)
          return
        self._fail([req], e, where)

  def _fail(self, reqs: list[Request], exc: BaseException, where: str) -> None:
    with self._lock:
      for req in reqs:
        self._fail_locked(req, exc, where)

  def _fail_locked(self, req: Request, exc: BaseException, where: str) -> None:
    if req.finished:
      return
    req.error = f"{where} failed: {type(exc).__name__}: {exc}"
    log.error("request %s: %s", req.request_id, req.error, exc_info=exc)
    if req.slot is not None and self._running.get(req.slot) is req:
      self._release(req.slot)
    if req in self._waiting:
      self._waiting.remove(req)
    self._finish(req, "error")

  def _restore_cache(self, exc: BaseException) -> bool:
    """After a failed step: if the donated KV pool was consumed, fails every running request and
    rebuilds the pool. True if it did."""
    donated = jax.tree.leaves((self.cache, self.history))
    if not any(getattr(x, "is_deleted", lambda: False)() for x in donated):
      return False
    self._fail(list(self._running.values()), exc, "a step that lost the KV cache")
    self.cache = self._make_cache()
    self.history = TokenHistory.zeros(self.max_batch_size, self.model_config.vocab_size)
    self.allocator.clear_cache()  # cached prefix pages pointed into the lost pool
    return True

  def run_until_done(self) -> None:
    while self.has_unfinished():
      self.step()

  def _reap_cancelled(self) -> None:
    with self._lock:
      for slot, req in list(self._running.items()):
        if req._cancelled:
          if req._in_prefill:
            self.stats["prefills_cancelled"] += 1
          self._release(slot)
          self._finish(req, "abort")

  def _generation_limit(self, req: Request) -> int:
    """Tokens the request may generate in all."""
    if req.params.max_tokens is not None:
      return req.params.max_tokens
    return min(self.max_seq_len, self.allocator.num_pages * self.page_size) - len(req.prompt_ids)

  def _reserved_tokens(self, context: int, params: SamplingParams, generated: int = 0) -> int:
    """Tokens of pages a request reserves at admission for a context of `context` tokens:
    with max_tokens, the worst case (the rest of max_tokens, at most a decode budget's worth
    when pages are evicted); without, one decode chunk (it grows later)."""
    if params.max_tokens is None:
      room = self.decode_chunk_size + 1
    else:
      room = params.max_tokens - generated
      if self.decode_budget is not None:
        room = min(room, max(self.decode_budget - context, 0) + self.decode_chunk_size + self.page_size)
    return min(context + room, self.max_pages_per_seq * self.page_size)

  def _compact_target_tokens(self, context: int, reserved: int) -> int:
    """Tokens of the own pages a prompt-compressing prefill writes its kept tokens to (with
    block reuse; 0 when the prompt is short enough to be kept whole, in place)."""
    if not (self._compacts and self.allocator.enable_reuse):
      return 0
    sparse = self.runtime.sparse
    kept = get_algorithm(sparse).kept_prompt_tokens(sparse, context)
    target = kept + (reserved - context)
    if kept >= context or self.allocator.pages_for(context) + self.allocator.pages_for(target) > self.allocator.num_pages:
      return 0  # kept whole, or the pool cannot hold the dense prompt beside its copy: compacted in place
    return target

  def _admit(self) -> None:
    with self._lock:
      free_slots = [s for s in range(self.max_batch_size) if s not in self._running]
      while self._waiting and free_slots:
        req = self._waiting[0]
        context = req._context
        # The part a prefill computes holds at least the last token, and the compression window.
        shared = self.allocator.match_prefix(context, len(context) - max(1, self._window))
        reserved = self._reserved_tokens(len(context), req.params, len(req.output_ids))
        compact_tokens = self._compact_target_tokens(len(context), reserved)
        row_tokens = len(context) if compact_tokens else reserved
        need = (self.allocator.pages_for(row_tokens) - len(shared) + self.allocator.pages_for(compact_tokens))
        unheld = sum(self.allocator.refcount(p) == 0 for p in shared)  # sharing takes them off the free count
        if need > self.allocator.free_pages - unheld:
          break  # FIFO: wait for pages rather than let later requests overtake
        self._waiting.popleft()
        slot = free_slots.pop(0)
        self.allocator.share(slot, shared)
        self.allocator.ensure(slot, row_tokens)
        req._compact_pages = self.allocator.take(self.allocator.pages_for(compact_tokens))
        req._prefilled = len(shared) * self.page_size
        if not req.output_ids:
          req.cached_prompt_tokens = req._prefilled
        if self.allocator.enable_reuse:
          self.stats["prefix_cache_queries"] += len(context)
          self.stats["prefix_cache_hits"] += req._prefilled
        req.slot, req.state, req._in_prefill = slot, RequestState.RUNNING, True
        req._admitted = next(self._admissions)
        self._running[slot] = req
        self._prefilling.append(req)
        try:
          self._set_sampling(slot, req)
        except Exception as e:  # a seed the PRNG cannot take fails this request alone
          self._fail_locked(req, e, "sampling setup")
      self.peak_pages = max(self.peak_pages, self.allocator.used_pages)

  def _set_sampling(self, slot: int, req: Request) -> None:
    p = req.params
    s = self._samp
    s["temperature"][slot] = p.temperature
    s["top_k"][slot] = p.top_k
    s["top_p"][slot] = p.top_p
    s["keys"][slot] = np.asarray(jax.random.key_data(jax.random.PRNGKey(req._seed)), np.uint32)
    s["counters"][slot] = len(req.output_ids)  # a preempted request continues its random stream
    s["presence_penalty"][slot] = p.presence_penalty
    s["frequency_penalty"][slot] = p.frequency_penalty
    s["repetition_penalty"][slot] = p.repetition_penalty
    s["min_tokens"][slot] = p.min_tokens
    if p.penalised:
      vocab = self.model_config.vocab_size
      prompt_mask = np.zeros(vocab, bool)
      prompt_mask[req.prompt_ids] = True
      stop_mask = np.zeros(vocab, bool)
      stop_mask[[t for t in p.stop_token_ids if 0 <= t < vocab]] = True
      if not p.ignore_eos:
        stop_mask[[t for t in self.eos_token_ids if 0 <= t < vocab]] = True
      counts = np.bincount(np.asarray(req.output_ids, np.int64), minlength=vocab).astype(np.int32)
      self.history = self._set_history_fn(self.history, slot, prompt_mask, counts, stop_mask)

  def _empty_sampling(self) -> dict[str, np.ndarray]:
    s = self.max_batch_size
    return dict(temperature=np.zeros(s, np.float32), top_k=np.zeros(s, np.int32), top_p=np.ones(s, np.float32),
                keys=np.zeros((s, 2), np.uint32), counters=np.zeros(s, np.int32),
                presence_penalty=np.zeros(s, np.float32), frequency_penalty=np.zeros(s, np.float32),
                repetition_penalty=np.ones(s, np.float32), min_tokens=np.zeros(s, np.int32))

  def sampling_state(self, rows: np.ndarray | None = None) -> SamplingState:
    """The device sampling parameters of every batch slot (or of `rows`), as decode_fn /
    prefill_fn take them."""
    s = self._samp
    pick = (lambda a: a[rows]) if rows is not None else (lambda a: a)
    return SamplingState(**{k: jnp.asarray(pick(v)) for k, v in s.items()})

  def _prefill_step(self) -> None:
    """Prefills at most `max_num_tokens` prompt tokens: the whole prompts that fit, in admission
    order and from anywhere in the queue (one call per group of similar padded length), then a
    chunk of the earliest prompt that does not go whole (a long one, or one continuing after a
    cached prefix or an earlier chunk) in what is left of the budget. So a short prompt that
    arrives behind a long one gets its first token before the long prefill ends; the whole
    prompts leave the chunk at least one page, so the long prefill always advances."""
    left = {id(r): len(r._context) - r._prefilled for r in self._prefilling}
    chunked = next((r for r in self._prefilling if r._prefilled > 0 or left[id(r)] > self.max_num_tokens), None)
    room = self.max_num_tokens - (min(left[id(chunked)], self.page_size) if chunked is not None else 0)
    whole: list[Request] = []
    for req in self._prefilling:
      if req is not chunked and req._prefilled == 0 and left[id(req)] <= room:
        whole.append(req)
        room -= left[id(req)]
    if chunked is None:
      chunked = next((r for r in self._prefilling if r not in whole), None)
    budget = self.max_num_tokens - sum(left[id(r)] for r in whole)
    for group in self._groups(whole):
      self._isolated(lambda: self._prefill_group(group), group, lambda req: self._prefill_group([req]), "prefill")
    if chunked is not None and not chunked.finished and budget >= min(left[id(chunked)], self.page_size):
      self._isolated(lambda: self._prefill_chunk(chunked, budget), [chunked], None, "prefill")

  def _groups(self, reqs: list[Request]) -> list[list[Request]]:
    """Whole prompts grouped by padded length, rows x length at most max_num_tokens (a longer
    prompt goes alone)."""
    groups, current = [], []
    for req in sorted(reqs, key=lambda r: len(r._context)):
      t = length_bucket(len(req._context))
      if current and (t != length_bucket(len(current[0]._context)) or
                      pow2_at_least(len(current) + 1) * t > self.max_num_tokens):
        groups.append(current)
        current = []
      current.append(req)
    if current:
      groups.append(current)
    return groups

  def _compact_table(self, reqs: list[Request]) -> jax.Array | None:
    """Per slot, the own pages a compressing prefill writes to (None when no row has any)."""
    if not any(r._compact_pages for r in reqs):
      return None
    table = np.full((self.max_batch_size, self.max_pages_per_seq), -1, np.int32)
    for r in reqs:
      table[r.slot, :len(r._compact_pages)] = r._compact_pages
    return jnp.asarray(table)

  def _prefill_group(self, group: list[Request]) -> None:
    t = length_bucket(max(len(r._context) for r in group))
    rows = pow2_at_least(len(group))
    tokens = np.zeros((rows, t), np.int32)
    lengths = np.zeros(rows, np.int32)
    slots = np.full(rows, self.max_batch_size, np.int32)  # padding rows: out-of-range slot
    for i, req in enumerate(group):
      context = req._context
      tokens[i, :len(context)] = context
      lengths[i] = len(context)
      slots[i] = req.slot
    samp_rows = np.array([r.slot for r in group] + [group[0].slot] * (rows - len(group)))
    n_pages = self.page_table_width(t)
    self.cache, self.history, first, counts, logprobs = self.prefill_fn(
        self.params, self.cache, jnp.asarray(self.allocator.table()), jnp.asarray(tokens), jnp.asarray(lengths),
        jnp.asarray(slots), jnp.zeros(rows, jnp.int32), self.sampling_state(samp_rows), self.history,
        self._compact_table(group), n_pages=n_pages, chunked=False, final=True, with_logprobs=_wants_logprobs(group))
    self.stats["prefill_calls"] += 1
    self.stats["prefill_tokens"] += int(lengths.sum())
    self._after_prefill(group, np.asarray(first), np.asarray(counts), _host(logprobs))

  def _prefill_chunk(self, req: Request, budget: int) -> None:
    """The next chunk of a prompt, at most `budget` tokens: it attends to the tokens stored
    before it (all of them, or the algorithm's selection within prefill_budget) and to
    itself. A prompt's last chunk is at least the compression window long."""
    context, start = req._context, req._prefilled
    n = len(context)
    end = min(n, start + budget)
    if end < n and n - end < self._window:
      end = max(start + 1, n - self._window)
    t = length_bucket(end - start)
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :end - start] = context[start:end]
    n_pages = self.page_table_width(start + t)
    final = end == n
    self.cache, self.history, first, counts, logprobs = self.prefill_fn(
        self.params, self.cache, jnp.asarray(self.allocator.table()), jnp.asarray(tokens),
        jnp.asarray([end - start], jnp.int32), jnp.asarray([req.slot], jnp.int32), jnp.asarray([start], jnp.int32),
        self.sampling_state(np.array([req.slot])), self.history, self._compact_table([req]) if final else None,
        n_pages=n_pages, chunked=True, final=final, with_logprobs=final and _wants_logprobs([req]))
    self.stats["prefill_chunks"] += 1
    self.stats["prefill_tokens"] += end - start
    algo = self.runtime.algorithm
    if (self.runtime.sparse_prefill and algo is not None and algo.chunk_scores is not None
        and start > self.runtime.sparse.prefill_budget):
      self.stats["sparse_prefill_chunks"] += 1  # attended to a selection smaller than its stored context
    req._prefilled = end
    if final:
      self.stats["prefill_calls"] += 1
      self._after_prefill([req], np.asarray(first), np.asarray(counts), _host(logprobs))

  def _after_prefill(self, group: list[Request], first: np.ndarray, counts: np.ndarray,
                     logprobs: SampledLogprobs | None) -> None:
    now = time.perf_counter()
    with self._lock:
      for i, req in enumerate(group):
        slot = req.slot
        kept = int(counts[i])
        context = req._context
        req._prefilled = len(context)
        req._in_prefill = False
        self._prefilling.remove(req)
        req.kept_prompt_tokens = kept
        self._slot_len[slot] = kept
        reserve = self._reserved_tokens(kept, req.params, len(req.output_ids))
        if req._compact_pages:  # the kept tokens live in the request's own pages: the dense ones become cache
          self.allocator.register(slot, context)
          self.allocator.replace_row(slot, req._compact_pages)
          req._compact_pages = []
        elif kept == len(context):  # (compacted in place: the pages no longer hold the prompt)
          self.allocator.register(slot, context)
        if reserve < len(self.allocator.pages(slot)) * self.page_size:  # compaction freed the tail
          self.allocator.truncate(slot, reserve)
        req.pages_after_prefill = len(self.allocator.pages(slot))
        if req.first_token_time is None:
          req.first_token_time = now
        self._samp["counters"][slot] = len(req.output_ids) + 1
        self._last_token[slot] = first[i]
        self._emit_isolated(req, [int(first[i])], [_token_logprobs(logprobs, req, i)])

  def _grow(self) -> None:
    """Gives every request without max_tokens the pages for its next decode chunk, preempting
    the most recently admitted of them while the pool cannot (its pages return to the pool;
    it waits again at the head of the queue)."""
    with self._lock:
      while True:
        growing = [r for r in self._running.values() if not r._in_prefill and r.params.max_tokens is None]
        try:
          for req in growing:
            need = min(int(self._slot_len[req.slot]) + self.decode_chunk_size + 1,
                       self.max_pages_per_seq * self.page_size)
            self.allocator.ensure(req.slot, need)
          return
        except CacheExhaustedError:
          victim = max(growing, key=lambda r: r._admitted)
          self._release(victim.slot)
          victim.slot, victim.state, victim._prefilled = None, RequestState.WAITING, 0
          victim.preemptions += 1
          self.stats["preemptions"] += 1
          self._waiting.appendleft(victim)

  def _decode(self, only: list[int] | None = None) -> None:
    if only is None:
      self._grow()
      slots = sorted(s for s, r in self._running.items() if not r._in_prefill)
    else:
      slots = only
    if not slots:
      return
    active = np.zeros(self.max_batch_size, bool)
    remaining = np.zeros(self.max_batch_size, np.int32)
    ignore_eos = np.zeros(self.max_batch_size, bool)
    for s in slots:
      req = self._running[s]
      active[s] = True
      remaining[s] = self._generation_limit(req) - len(req.output_ids)
      ignore_eos[s] = req.params.ignore_eos
    steps = self.decode_chunk_size
    need = max(int(self._slot_len[s]) + steps for s in slots)
    n_pages = self.page_table_width(need)
    dense = self._dense_below is not None and need <= self._dense_below
    out = self.decode_fn(self.params, self.cache, jnp.asarray(self.allocator.table()), jnp.asarray(self._last_token),
                         jnp.asarray(active), jnp.asarray(remaining), jnp.asarray(ignore_eos),
                         self.sampling_state(), self.history, n_pages=n_pages, num_steps=steps, dense=dense,
                         with_logprobs=_wants_logprobs(self._running.values()))
    self.cache, self.history, tokens, counters, last, importance, logprobs = out
    tokens, counters, last = np.asarray(tokens), np.asarray(counters), np.asarray(last)
    logprobs = _host(logprobs)  # fields [steps, S, ...]
    self.stats["decode_calls"] += 1
    if self.runtime.sparse is not None and not dense:  # the algorithm's prediction ran in this chunk
      self.stats["sparse_decode_calls"] += 1
    with self._lock:
      self._samp["counters"][:] = counters
      self._last_token[:] = last
      for s in slots:
        column = tokens[:, s]
        new = [int(x) for x in column if x >= 0]
        self._slot_len[s] += len(new)
        self.stats["decode_tokens"] += len(new)
        req = self._running.get(s)
        if req is not None and not req.finished:
          self._emit_isolated(req, new, [_token_logprobs(logprobs, req, (i, s)) for i in range(len(new))]
                              if logprobs is not None else None)
      if self.decode_budget is not None:
        self._evict(np.asarray(importance))

  def _evict(self, importance: np.ndarray) -> None:
    """Drops the lowest-importance pages of every sequence over the decode budget (under the
    lock). Never the first page (attention sinks) nor the newest one; the evicted pages are
    recycled to the end of the sequence's row for its next tokens."""
    ps = self.page_size
    deltas = np.zeros(self.max_batch_size, np.int32)
    recycled = []
    for s, req in self._running.items():
      length = int(self._slot_len[s])
      if length <= self.decode_budget:
        continue
      newest = (length - 1) // ps
      row = self.allocator.pages(s)
      # Pages shared through the prefix cache stay: other sequences read them.
      candidates = [p for p in range(1, newest) if self.allocator.refcount(row[p]) == 1]
      n = min(len(candidates), -(-(length - self.decode_budget) // ps))
      if n <= 0:
        continue
      order = sorted(candidates, key=lambda p: (importance[s, p], p))[:n]
      recycled += self.allocator.recycle_pages(s, order)
      deltas[s] = n * ps
      self._slot_len[s] -= n * ps
      self.stats["evicted_pages"] += n
    if recycled:
      ids = np.full(pow2_at_least(len(recycled)), self.allocator.num_pages, np.int32)
      ids[:len(recycled)] = recycled
      self.cache = self._evict_fn(self.cache, jnp.asarray(deltas), jnp.asarray(ids))

  def _evict_impl(self, cache, deltas, recycled):
    return clear_importance(cache.replace(lengths=cache.lengths - deltas), recycled)

  # -- per-request bookkeeping ------------------------------------------------------------
  def _emit_isolated(self, req: Request, new_ids: list[int], logprobs: list | None = None) -> None:
    """`_emit` under the lock; if it raises (a detokenizer error), fails only this request."""
    try:
      self._emit(req, new_ids, logprobs)
    except Exception as e:
      self._fail_locked(req, e, "detokenization")

  def _emit(self, req: Request, new_ids: list[int], logprobs: list | None = None) -> None:
    """Appends generated tokens (and their log-probabilities), applies stop conditions, finishes
    the request if done."""
    reason = None
    already = len(req.output_ids)
    params = req.params
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
      stop_ids |= set(self.eos_token_ids)
    for j, tok in enumerate(new_ids):
      req.output_ids.append(tok)
      if logprobs is not None and logprobs[j] is not None:
        req.logprobs.append(logprobs[j])
        req.cumulative_logprob = (req.cumulative_logprob or 0.0) + logprobs[j][0]
      if tok in stop_ids and len(req.output_ids) > params.min_tokens:
        reason = "stop"
        req.stop_reason = tok if tok in params.stop_token_ids else None
        break
      if len(req.output_ids) >= self._generation_limit(req):
        reason = "length"
        break
    if self.tokenizer is not None:
      req.text = self.tokenizer.decode(req.output_ids)
      if len(req.output_ids) >= params.min_tokens and any(stop in req.text for stop in params.stop):
        # Keep the tokens up to the one that completes a stop string: the rest of the decode
        # chunk was generated past the end of the answer and is not part of it (nor of usage).
        for k in range(max(already + 1, params.min_tokens), len(req.output_ids) + 1):
          text = self.tokenizer.decode(req.output_ids[:k])
          found = [(text.find(stop), stop) for stop in params.stop if stop in text]
          if found:
            at, req.stop_reason = min(found)
            del req.output_ids[k:]
            if req.logprobs:
              del req.logprobs[k:]
              req.cumulative_logprob = sum(lp for lp, _, _ in req.logprobs)
            req.text = text[:at]
            break
        reason = "stop"
    if reason is not None:
      self._release(req.slot)
      self._finish(req, reason)
    else:
      self._notify(req)

  def _release(self, slot: int) -> None:
    req = self._running.pop(slot, None)
    if req is not None:
      if req._in_prefill:
        self._prefilling.remove(req)
        req._in_prefill = False
      self.allocator.drop(req._compact_pages)
      req._compact_pages = []
    self.allocator.free(slot)
    self._slot_len[slot] = 0

  def _finish(self, req: Request, reason: str) -> None:
    req.state = RequestState.FINISHED
    req.finish_reason = reason
    req.finish_time = time.perf_counter()
    self._notify(req)
    req.done.set()

  def _notify(self, req: Request) -> None:
    """Calls the request's `on_update`; one that raises cancels its own request, nothing more."""
    if req.on_update is None:
      return
    try:
      req.on_update(req)
    except Exception:
      log.exception("on_update of request %s raised; the request is cancelled", req.request_id)
      req._cancelled = True

  # -- jitted steps --------------------------------------------------------------------------
  def _prefill_impl(self, params, cache, table, tokens, lengths, slots, starts, samp: SamplingState,
                    history: TokenHistory, compact_table=None, *, n_pages: int, chunked: bool, final: bool,
                    with_logprobs: bool = False):
    model = nnx.merge(self.graphdef, params)
    view = cache.replace(page_table=table[:, :n_pages])
    logits, view = model.prefill(tokens, lengths, slots, view, self.runtime, starts if chunked else None, final,
                                 compact_table)
    counts = jnp.take(view.lengths, slots, mode="fill", fill_value=0)
    first, logprobs = sample(logits, samp, history.rows(slots), with_logprobs)
    if final:  # padding rows name slot max_batch_size: their counts are dropped
      history = dataclasses.replace(history, output_counts=history.output_counts.at[slots, first].add(1, mode="drop"))
    return view.replace(page_table=table), history, first, counts, logprobs

  def _decode_impl(self, params, cache, table, tokens, active, remaining, ignore_eos, samp: SamplingState,
                   history: TokenHistory, *, n_pages: int, num_steps: int, dense: bool = False,
                   with_logprobs: bool = False):
    model = nnx.merge(self.graphdef, params)
    runtime = dataclasses.replace(self.runtime, predict=False) if dense else self.runtime
    eos = jnp.asarray(self._eos)
    slots = tokens.shape[0]
    out = jnp.full((num_steps, slots), -1, jnp.int32)
    # Per step and slot, filled only when some request asked for log-probabilities (static).
    lp_out = (SampledLogprobs(jnp.zeros((num_steps, slots)), jnp.zeros((num_steps, slots), jnp.int32),
                              jnp.zeros((num_steps, slots, MAX_TOP_LOGPROBS), jnp.int32),
                              jnp.zeros((num_steps, slots, MAX_TOP_LOGPROBS))) if with_logprobs else None)

    def cond(carry):
      i, _, _, active, *_ = carry
      return (i < num_steps) & jnp.any(active)

    def body(carry):
      i, view, tokens, active, remaining, counters, history, out, lp_out = carry
      logits, view = model.decode(tokens, view, active, runtime)
      nxt, lp = sample(logits, dataclasses.replace(samp, counters=counters), history, with_logprobs)
      out = out.at[i].set(jnp.where(active, nxt, -1))
      if with_logprobs:
        lp_out = jax.tree.map(lambda acc, x: acc.at[i].set(x), lp_out, lp)
      history = history.record(nxt, active)
      hit_eos = jnp.any(nxt[:, None] == eos[None, :], axis=-1) & ~ignore_eos
      remaining = remaining - active.astype(jnp.int32)
      done = active & (hit_eos | (remaining <= 0))
      counters = counters + active.astype(jnp.int32)
      tokens = jnp.where(active, nxt, tokens)
      return i + 1, view, tokens, active & ~done, remaining, counters, history, out, lp_out

    view = cache.replace(page_table=table[:, :n_pages])
    carry = (jnp.int32(0), view, tokens, active, remaining, samp.counters, history, out, lp_out)
    _, view, tokens, _, _, counters, history, out, lp_out = jax.lax.while_loop(cond, body, carry)
    importance = None
    if self.runtime.evict:  # per slot and logical page, summed over layers
      importance = sequence_importance(view)
    return view.replace(page_table=table), history, out, counters, tokens, importance, lp_out


def _set_history_row(history: TokenHistory, slot, prompt_mask, output_counts, stop_mask) -> TokenHistory:
  return TokenHistory(history.prompt_mask.at[slot].set(prompt_mask), history.output_counts.at[slot].set(output_counts),
                      history.stop_mask.at[slot].set(stop_mask))


def _wants_logprobs(requests) -> bool:
  return any(r.params.logprobs is not None for r in requests)


def _host(logprobs: SampledLogprobs | None) -> SampledLogprobs | None:
  return None if logprobs is None else jax.tree.map(np.asarray, logprobs)


def _token_logprobs(logprobs: SampledLogprobs | None, req: Request, index) -> tuple | None:
  """One token's (logprob, rank, top alternatives) for `req` from host arrays at `index` (a row,
  or a (step, slot) pair); None if the request did not ask for log-probabilities."""
  k = req.params.logprobs
  if logprobs is None or k is None:
    return None
  top = [(int(t), float(v)) for t, v in zip(logprobs.top_ids[index][:k], logprobs.top_logprobs[index][:k])]
  return float(logprobs.logprob[index]), int(logprobs.rank[index]), top
