"""Configuration: KV cache config, sparse-attention config base class, algorithm registry, YAML.

Configs are frozen dataclasses validated in `__post_init__`; every failure names the field
and the value. The YAML layout is TensorRT-LLM's `--extra_llm_api_options` file:

    sparse_attention_config:
      algorithm: rocket
      prompt_budget: 2048
    kv_cache_config:
      enable_block_reuse: false
    enable_chunked_prefill: false

Unknown keys are rejected by name. A shipped config is named without a path ("rocket" is
configs/rocket.yaml); a relative path inside a YAML (`weights_path`) is relative to the YAML file,
so the file works from any working directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import yaml

from pallas_kernels.common import BACKENDS, is_power_of_two


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and value."""


def fail_field(cls_name: str, field: str, value: Any, why: str) -> None:
  raise ConfigError(f"{cls_name}.{field}={value!r}: {why}")


def is_int(value: Any) -> bool:
  """An integer that is not a bool (YAML's `true` and Python's True are not counts)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
  """A finite int or float that is not a bool (no strings, no nan or inf)."""
  if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
    return False
  try:
    return math.isfinite(value)
  except OverflowError:  # an int beyond float's range
    return False


def check_int(where: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
              optional: bool = False) -> None:
  """Raises ConfigError naming `where` and `value` unless it is an int in [minimum, maximum]
  (or None when `optional`)."""
  if value is None and optional:
    return
  if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
    bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    raise ConfigError(f"{where}={value!r}: must be an integer {bound}" + (" or None" if optional else ""))


def check_positive_int(obj: Any, *fields: str) -> None:
  for f in fields:
    value = getattr(obj, f)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      fail_field(type(obj).__name__, f, value, "must be a positive integer")


@dataclasses.dataclass(frozen=True)
class KvCacheConfig:
  """Paged KV cache settings (TensorRT-LLM's KvCacheConfig names).

  tokens_per_block: tokens per KV page.
  max_tokens: total tokens the pool holds over all sequences; None sizes the pool from
    `free_gpu_memory_fraction` of the accelerator's free memory (on the CPU: enough for every
    batch slot at max_seq_len).
  enable_block_reuse: prefix caching. Full prompt pages are kept after their request ends,
    keyed by a hash chain over their token ids, and a later prompt with the same prefix takes
    them by reference and prefills only the rest. Unheld cached pages are evicted (least
    recently used first) only when the pool has no free page left.
  dtype: "auto" (the model's dtype), "bfloat16", "float16" or "float32".
  """
  tokens_per_block: int = 32
  max_tokens: int | None = None
  free_gpu_memory_fraction: float = 0.9
  enable_block_reuse: bool = False
  dtype: str = "auto"

  def __post_init__(self):
    if not is_power_of_two(self.tokens_per_block):
      fail_field("KvCacheConfig", "tokens_per_block", self.tokens_per_block, "must be a power of two")
    check_int("KvCacheConfig.max_tokens", self.max_tokens, optional=True)
    if not is_real(self.free_gpu_memory_fraction) or not 0.0 < self.free_gpu_memory_fraction <= 1.0:
      fail_field("KvCacheConfig", "free_gpu_memory_fraction", self.free_gpu_memory_fraction, "must be a number in (0, 1]")
    if not isinstance(self.dtype, str) or self.dtype not in ("auto", "bfloat16", "float16", "float32"):
      fail_field("KvCacheConfig", "dtype", self.dtype, "must be one of auto, bfloat16, float16, float32")
    if not isinstance(self.enable_block_reuse, bool):
      fail_field("KvCacheConfig", "enable_block_reuse", self.enable_block_reuse, "must be a bool")


@dataclasses.dataclass(frozen=True)
class BaseSparseAttentionConfig:
  """Base of every sparse-attention algorithm config; subclasses register a YAML name."""
  algorithm: ClassVar[str] = ""
  #: whether the algorithm keeps only some prompt tokens after prefill (prompt compression).
  #: With block reuse the kept tokens are written to pages of the request's own, so the dense
  #: prompt pages stay shareable; without, they are compacted in place.
  compacts_prompt: ClassVar[bool] = False
  #: whether the algorithm supports chunked prefill.
  supports_chunked_prefill: ClassVar[bool] = False

  #: Block-level eviction during generation: once a sequence holds more than this many tokens,
  #: its lowest-scoring KV pages (by the algorithm's page scores accumulated over layers and
  #: steps; never the first or the newest page) are dropped, so memory stays bounded. None = off.
  decode_budget: int | None = dataclasses.field(default=None, kw_only=True)
  #: Chunked sparse prefill: tokens of earlier context each prompt chunk attends to (the top
  #: blocks by the algorithm's chunk scores); its own chunk is always attended densely.
  prefill_budget: int = dataclasses.field(default=4096, kw_only=True)
  #: What that selection ranks: "block" (the algorithm's blocks) or "page" (whole KV pages by their
  #: blocks' summed scores: contiguous page-sized gathers and a top-k over fewer scores).
  prefill_granularity: str = dataclasses.field(default="block", kw_only=True)
  #: Layers 0..dense_layers-1 attend densely: no decode-time selection and no chunk selection in
  #: chunked prefill. Their aux pools stay current, and an algorithm that compacts the prompt
  #: compacts them too, since every layer holds the same tokens. 0 = every layer sparse. The default
  #: is each algorithm's paper's setting, stated in its module docstring: 0 here, and Quest's config
  #: class overrides it with 2 (its first two layers' attention is not sparse). The engine refuses
  #: a value that leaves no layer of the model sparse.
  dense_layers: int = dataclasses.field(default=0, kw_only=True)

  def validate_with(self, kv_cache_config: KvCacheConfig, enable_chunked_prefill: bool) -> None:
    """Rejects combinations with the cache/scheduler settings, saying why."""
    if self.decode_budget is not None:
      if isinstance(self.decode_budget, bool) or not isinstance(self.decode_budget, int) or self.decode_budget <= 0:
        fail_field(type(self).__name__, "decode_budget", self.decode_budget, "must be a positive integer or None")
      if self.decode_budget < 3 * kv_cache_config.tokens_per_block:
        fail_field(type(self).__name__, "decode_budget", self.decode_budget,
                   f"must hold at least 3 KV pages (3 x tokens_per_block={kv_cache_config.tokens_per_block})")
      if get_algorithm(self).page_scores is None:
        fail_field(type(self).__name__, "decode_budget", self.decode_budget,
                   f"algorithm {self.algorithm!r} has no page scores to choose pages to evict")
    if isinstance(self.prefill_budget, bool) or not isinstance(self.prefill_budget, int) or self.prefill_budget <= 0:
      fail_field(type(self).__name__, "prefill_budget", self.prefill_budget, "must be a positive integer")
    if not is_int(self.dense_layers) or self.dense_layers < 0:
      fail_field(type(self).__name__, "dense_layers", self.dense_layers, "must be an integer >= 0")
    if self.prefill_granularity not in ("block", "page"):
      fail_field(type(self).__name__, "prefill_granularity", self.prefill_granularity, "must be 'block' or 'page'")
    if enable_chunked_prefill and self.supports_chunked_prefill and get_algorithm(self).chunk_scores is None:
      fail_field(type(self).__name__, "algorithm", self.algorithm, "declares chunked prefill but has no chunk_scores")
    if enable_chunked_prefill and not self.supports_chunked_prefill:
      raise ConfigError(
          f"sparse_attention_config.algorithm={self.algorithm!r} does not support enable_chunked_prefill=True: "
          "it has no chunk scores to choose the earlier tokens a prompt chunk attends to (long prompts are still "
          "prefilled in chunks of max_num_tokens, each attending to every earlier token)")


def keeps_every_prompt_token(cfg: Any, prompt_len: int) -> int:
  """The `kept_prompt_tokens` of an algorithm that compacts nothing."""
  return prompt_len


def no_final_chunk_minimum(cfg: Any) -> int:
  """The `min_final_chunk` of an algorithm whose prompt compression reads no query window."""
  return 0


@dataclasses.dataclass(frozen=True)
class MlaOps:
  """How an algorithm serves MLA attention layers (sparse_jax/mla.py); `spec` is the layer's
  `MLASpec` (its `indexer` describes the layer's lightning indexer, `runtime` the compiled step).

  write_aux(cfg, spec, layer, flat_slots, index_k) -> LayerCache: stores the indexer keys
    index_k [N, index_head_dim] of N tokens at pool slots flat_slots int32[N] (out of range =
    dropped) in the algorithm's aux pools (`aux_spec(cfg, spec)`).
  select_prefill(cfg, spec, q, w, layer, rows, fresh_keys, key_lengths, q_pos) -> int32[n, T, k] | None:
    each prompt query's top-k token ids (ascending, -1 padded), or None where every query
    attends densely. q [n, T, H, D] / w float32[n, T, H]: the indexer's queries and weights;
    fresh_keys [n, T, D]: the keys of fresh prompts (no earlier context), or None for a chunk
    whose earlier context is read back from the cache through rows int32[n, max_pages];
    key_lengths int32[n]: keys stored per row; q_pos int32[n, T]: the queries' positions.
  select_decode(cfg, spec, q, w, layer, page_table, lengths) -> int32[S, k]: the top-k token ids
    of one decode query per slot (q [S, H, D], w float32[S, H]; lengths: tokens stored, the
    new one included, 0 for inactive slots).
  """
  write_aux: Callable[..., Any]
  select_prefill: Callable[..., Any]
  select_decode: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """Everything the rest of the system needs of one algorithm: its config class and hooks.
  Nothing outside `sparse_jax/algorithms/` reads an algorithm's config fields; it calls these.

  aux_spec(cfg, spec) -> {name: AuxPoolSpec}: the aux pools it needs (spec: an AttentionSpec,
    or an MLASpec for MLA layers).

  GQA layers (sparse_jax/attention.py); None for an algorithm that serves MLA layers only:
  predict_kv(cfg, spec, q, k, lengths) -> KeepSelection | None          (context phase)
  update_aux(cfg, spec, layer, page_table, start, end, max_tokens) -> LayerCache
  predict_attn(cfg, spec, q, layer, page_table, lengths) -> AttnSelection | None  (generation)
  page_scores(cfg, spec, q, layer, page_table, lengths) -> float32[batch, max_pages] | None:
    the eviction importance of each KV page (pages with the lowest sums over layers and steps
    are evicted once a sequence outgrows `decode_budget`).
  chunk_scores(cfg, spec, q, layer, page_table, lengths) -> (float32[batch, kv_heads, blocks], block_size):
    scores of the stored context's blocks for several queries per row (q: [batch, samples,
    q_heads, D]; the max over them; -inf = not a block); a chunked sparse prefill takes each
    chunk's top blocks by them.
  dense_below(cfg) -> int: sequences of at most this many tokens decode densely (the engine skips
    the prediction while all are shorter, keeping aux pools current): at least the length up to
    which predict_attn selects every block; an algorithm may set it higher where its sparse
    paths are meant to stay off (RocketKV: up to prompt_budget).
  decode_attention(cfg, spec, q, layer, page_table, lengths) -> [batch, q_heads, D] | None: the
    generation-phase prediction and sparse attention of one decode token per row fused into the
    algorithm's own kernels (lengths include the token); None where it has none for this
    runtime, and the caller composes predict_attn, to_units and the paged decode kernel.
  build_predictor(cfg, spec, layer_index) -> nnx.Module | None: a learned predictor the attention
    layer owns; when present, predict_kv / update_aux / predict_attn / page_scores also receive
    `predictor=` and `hidden=` (the layer's input hidden states: [n, T, hidden]).

  Planning (host side, any layer kind):
  kept_prompt_tokens(cfg, prompt_len) -> int: tokens a request of `prompt_len` prompt tokens
    holds after prefill (equal to predict_kv's counts), for sizing the page pool.
  with_budget(cfg, budget) -> cfg: the config scaled to a token budget for sweeps (keep, or
    attend to, about `budget` tokens), other fields unchanged; raises ConfigError when it
    cannot be met. None: the algorithm has no budget to scale.
  min_final_chunk(cfg) -> int: the fewest tokens the last chunk of a chunked prefill must hold
    (the query window its prompt compression reads).

  MLA layers (sparse_jax/mla.py): mla, an `MlaOps`, or None for an algorithm that serves GQA
  layers only.
  """
  name: str
  config_cls: type
  aux_spec: Callable[..., Any]
  predict_kv: Callable[..., Any] | None = None
  update_aux: Callable[..., Any] | None = None
  predict_attn: Callable[..., Any] | None = None
  page_scores: Callable[..., Any] | None = None
  build_predictor: Callable[..., Any] | None = None
  chunk_scores: Callable[..., Any] | None = None
  dense_below: Callable[..., int] | None = None
  decode_attention: Callable[..., Any] | None = None
  kept_prompt_tokens: Callable[[Any, int], int] = keeps_every_prompt_token
  with_budget: Callable[[Any, int], Any] | None = None
  min_final_chunk: Callable[[Any], int] = no_final_chunk_minimum
  mla: MlaOps | None = None

  def __post_init__(self):
    gqa = (self.predict_kv, self.update_aux, self.predict_attn)
    if any(f is None for f in gqa) and not all(f is None for f in gqa):
      raise ValueError(f"algorithm {self.name!r}: predict_kv, update_aux and predict_attn come together "
                       "(all three for GQA layers, or none for an MLA-only algorithm)")
    if self.predict_attn is None and self.mla is None:
      raise ValueError(f"algorithm {self.name!r} serves neither GQA layers (predict_attn) nor MLA layers (mla)")

  @property
  def serves_gqa(self) -> bool:
    return self.predict_attn is not None


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
  if algorithm.name in _REGISTRY:
    raise ValueError(f"sparse attention algorithm {algorithm.name!r} is registered twice")
  cls = algorithm.config_cls
  if not (isinstance(cls, type) and issubclass(cls, BaseSparseAttentionConfig)) or cls.algorithm != algorithm.name:
    raise ValueError(f"{cls!r} must subclass BaseSparseAttentionConfig with algorithm = {algorithm.name!r}")
  _REGISTRY[algorithm.name] = algorithm
  return algorithm


def registered_algorithms() -> dict[str, Algorithm]:
  _load_builtin_algorithms()
  return dict(_REGISTRY)


def get_algorithm(name_or_config: str | BaseSparseAttentionConfig) -> Algorithm:
  _load_builtin_algorithms()
  name = name_or_config if isinstance(name_or_config, str) else name_or_config.algorithm
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ConfigError(f"unknown sparse attention algorithm {name!r}; registered: {sorted(_REGISTRY)}") from None


def _load_builtin_algorithms() -> None:
  import sparse_jax.algorithms  # noqa: F401  (importing registers every built-in algorithm)


def _from_mapping(cls: type, data: Mapping[str, Any], where: str):
  if not isinstance(data, Mapping):
    raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(names)}")
  try:
    return cls(**data)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  except (TypeError, ValueError) as e:  # a check that met a value of the wrong type, e.g. a string for a count
    raise ConfigError(f"{where}: invalid value in {dict(data)!r}: {e}") from None


def sparse_config_from_dict(data: Mapping[str, Any], where: str = "sparse_attention_config") -> BaseSparseAttentionConfig:
  if not isinstance(data, Mapping):
    raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
  data = dict(data)
  if "algorithm" not in data:
    raise ConfigError(f"{where}: missing key 'algorithm' (one of {sorted(registered_algorithms())})")
  algorithm = get_algorithm(str(data.pop("algorithm")))
  return _from_mapping(algorithm.config_cls, data, f"{where} (algorithm={algorithm.name!r})")


@dataclasses.dataclass(frozen=True)
class LlmApiOptions:
  """What an `--extra_llm_api_options` YAML file holds."""
  sparse_attention_config: BaseSparseAttentionConfig | None = None
  kv_cache_config: KvCacheConfig = dataclasses.field(default_factory=KvCacheConfig)
  enable_chunked_prefill: bool = False
  backend: str | None = None
  max_batch_size: int | None = None
  max_seq_len: int | None = None
  tensor_parallel_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.kv_cache_config, KvCacheConfig):
      fail_field("LlmApiOptions", "kv_cache_config", self.kv_cache_config, "must be a KvCacheConfig")
    if not isinstance(self.enable_chunked_prefill, bool):
      fail_field("LlmApiOptions", "enable_chunked_prefill", self.enable_chunked_prefill, "must be true or false")
    if self.backend is not None and self.backend not in BACKEND_CHOICES:
      fail_field("LlmApiOptions", "backend", self.backend, f"must be one of {list(BACKEND_CHOICES)}")
    for field in ("max_batch_size", "max_seq_len", "tensor_parallel_size"):
      check_int(field, getattr(self, field), optional=True)
    if self.sparse_attention_config is not None:
      self.sparse_attention_config.validate_with(self.kv_cache_config, self.enable_chunked_prefill)


BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: pallas on a GPU, else reference
_TOP_LEVEL_KEYS = ("sparse_attention_config", "kv_cache_config", "enable_chunked_prefill", "backend",
                   "max_batch_size", "max_seq_len", "tensor_parallel_size")


def resolve_options_path(name: str | os.PathLike) -> str:
  """An options file: an existing path, else a shipped config by name ("rocket" or "rocket.yaml")."""
  path = os.fspath(name)
  if os.path.exists(path) or os.sep in path or (os.altsep and os.altsep in path):
    return path
  import configs
  try:
    return configs.path(path)
  except FileNotFoundError as e:
    raise ConfigError(f"options file not found: {path} (and {e})") from None


def _relative_to(data: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
  """`data` with its relative `*_path` values made relative to `base_dir` (the YAML's folder)."""
  return {k: os.path.normpath(os.path.join(base_dir, v)) if k.endswith("_path") and isinstance(v, str) and v
          and not os.path.isabs(v) else v for k, v in data.items()}


def load_llm_api_options(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> LlmApiOptions:
  """Reads a TensorRT-LLM-style options YAML (a path or a shipped config's name) or an equivalent dict."""
  if isinstance(path_or_dict, Mapping):
    data, where = dict(path_or_dict), "options"
  else:
    where = resolve_options_path(path_or_dict)
    try:
      with open(where) as f:
        data = yaml.safe_load(f) or {}
    except FileNotFoundError:
      raise ConfigError(f"options file not found: {where}") from None
    except yaml.YAMLError as e:
      raise ConfigError(f"{where}: not valid YAML: {e}") from None
  if not isinstance(data, Mapping):
    raise ConfigError(f"{where}: top level must be a mapping, got {type(data).__name__}")
  unknown = sorted(set(data) - set(_TOP_LEVEL_KEYS))
  if unknown:
    raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; allowed: {list(_TOP_LEVEL_KEYS)}")
  try:
    sparse = data.get("sparse_attention_config")
    if isinstance(sparse, Mapping) and not isinstance(path_or_dict, Mapping):
      sparse = _relative_to(sparse, os.path.dirname(os.path.abspath(where)))
    sparse = None if sparse is None else sparse_config_from_dict(sparse, "sparse_attention_config")
    kv = data.get("kv_cache_config")
    kv = KvCacheConfig() if kv is None else _from_mapping(KvCacheConfig, kv, "kv_cache_config")
    return LlmApiOptions(sparse_attention_config=sparse, kv_cache_config=kv,
                         enable_chunked_prefill=data.get("enable_chunked_prefill", False),
                         **{k: data[k] for k in ("backend", "max_batch_size", "max_seq_len", "tensor_parallel_size")
                            if data.get(k) is not None})
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


def load_sparse_attention_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> BaseSparseAttentionConfig | None:
  """The sparse_attention_config of an options YAML (TensorRT-LLM layout) or dict.

  A dict may be either the whole options mapping or the inner sparse_attention_config mapping
  (recognised by its `algorithm` key).
  """
  if isinstance(path_or_dict, Mapping) and "algorithm" in path_or_dict:
    return sparse_config_from_dict(path_or_dict)
  return load_llm_api_options(path_or_dict).sparse_attention_config


def config_to_dict(cfg: BaseSparseAttentionConfig) -> dict[str, Any]:
  return {"algorithm": cfg.algorithm, **dataclasses.asdict(cfg)}
