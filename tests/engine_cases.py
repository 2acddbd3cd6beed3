"""One engine case per registered algorithm (and variants): the golden-output test pins their
greedy tokens, bench/check_kernels_gpu.py compares them between the pallas and reference
backends on a GPU. No pytest import: the GPU check runs without the test extra."""
import os

import numpy as np

from sparse_jax.algorithms.dsa import DSASparseAttentionConfig
from sparse_jax.algorithms.hybrid import HybridSparseAttentionConfig
from sparse_jax.algorithms.indexer import IndexerSparseAttentionConfig
from sparse_jax.algorithms.oracle import OracleSparseAttentionConfig
from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.algorithms.snapkv import SnapKVSparseAttentionConfig
from sparse_jax.algorithms.streaming import StreamingSparseAttentionConfig
from sparse_jax.defaults import DEFAULT_MODEL_DIR

PROMPT_LEN, NEW_TOKENS, PAGE = (200, 170), 8, 16
DEFAULTS = dict(decode_chunk_size=8)  # LLM keyword arguments a case may override

# name -> (sparse config, LLM keyword arguments over DEFAULTS); budgets well below the prompt so
# every sparse path runs.
CASES = {
    "dense": (None, {}),
    "rocket": (RocketSparseAttentionConfig(prompt_budget=96, window_size=16, kernel_size=7, topr=1.0, topk=8, page_size=4), {}),
    "rocket_chunked": (RocketSparseAttentionConfig(prompt_budget=96, window_size=16, kernel_size=7, topr=1.0, topk=8,
                                                   page_size=4, prefill_budget=64),
                       dict(enable_chunked_prefill=True, max_num_tokens=64)),
    "quest": (QuestSparseAttentionConfig(topk=4, page_size=16, dense_layers=0), {}),
    "hybrid": (HybridSparseAttentionConfig(topk=4, page_size=16, sink_blocks=1, recent_blocks=1), {}),
    "quest_dense_layers": (QuestSparseAttentionConfig(topk=4, page_size=16, dense_layers=2), {}),
    # Decode chunks of 4: the sequences are still running after the first one, so eviction runs.
    "quest_evicting": (QuestSparseAttentionConfig(topk=4, page_size=16, decode_budget=3 * PAGE, dense_layers=0),
                       dict(decode_chunk_size=4)),
    "snapkv": (SnapKVSparseAttentionConfig(max_capacity_prompt=96, window_size=16, kernel_size=7), {}),
    "streaming": (StreamingSparseAttentionConfig(sink_tokens=4, window=60, block_size=16), {}),
    "oracle": (OracleSparseAttentionConfig(topk=4, block_size=16), {}),
    "indexer": (IndexerSparseAttentionConfig(
        weights_path=os.path.join(os.path.dirname(DEFAULT_MODEL_DIR), "default_model_indexer.safetensors"),
        topk=4, block_size=16, index_k_dtype="float32"), {}),
}
MLA_CASES = {
    "dsa": DSASparseAttentionConfig(index_topk=24),
}


def prompts(vocab: int) -> list[list[int]]:
  """The fixed prompts (PROMPT_LEN tokens each) every case generates from."""
  rng = np.random.default_rng(0)
  return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LEN]
