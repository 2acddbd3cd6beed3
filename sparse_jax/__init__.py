"""sparse_jax: a JAX/Pallas inference engine with prediction-based token-sparse attention."""
__version__ = "0.1.0"

from sparse_jax.config import (BaseSparseAttentionConfig, ConfigError, KvCacheConfig, get_algorithm,
                               load_llm_api_options, load_sparse_attention_config, registered_algorithms)
from sparse_jax.selection import AttnSelection, KeepSelection, to_pages, to_units

_LAZY = {
    "LLM": "sparse_jax.llm", "SamplingParams": "sparse_jax.llm", "RequestOutput": "sparse_jax.llm",
    "CompletionOutput": "sparse_jax.llm", "RequestError": "sparse_jax.llm", "SparseAttention": "sparse_jax.attention", "Runtime": "sparse_jax.attention",
    "PagedKVCache": "sparse_jax.cache", "PageAllocator": "sparse_jax.cache",
}


def __getattr__(name):
  # The LLM layer imports models/, which imports sparse_jax: resolve it lazily to keep imports one-way.
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name.endswith("SparseAttentionConfig"):
    for algorithm in registered_algorithms().values():
      if algorithm.config_cls.__name__ == name:
        return algorithm.config_cls
  raise AttributeError(f"module 'sparse_jax' has no attribute {name!r}")


__all__ = ["BaseSparseAttentionConfig", "ConfigError", "KvCacheConfig", "AttnSelection", "KeepSelection",
           "to_pages", "to_units", "get_algorithm", "load_llm_api_options", "load_sparse_attention_config",
           "registered_algorithms", *_LAZY]
