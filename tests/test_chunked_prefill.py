"""Chunked prefill: dense chunks equal one-shot prefill; sparse chunks (RocketKV) equal dense when
the selection covers everything, and stay within budget when it does not."""
import dataclasses
from typing import ClassVar

import numpy as np
import pytest

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.config import BaseSparseAttentionConfig, ConfigError
from tests.model_fixtures import tiny_llama

EXACT = dict(window_size=8, kernel_size=5, topr=1.0, page_size=4, kt_cache_dtype="float32")


def _generate(sparse=None, chunked=False, prompts=None, max_tokens=8, always_predict=False, max_num_tokens=64):
  llm = LLM(tiny_llama(9, max_pos=2048), dtype="float32", sparse_attention_config=sparse,
            kv_cache_config=KvCacheConfig(tokens_per_block=16), max_batch_size=2, max_seq_len=1024,
            enable_chunked_prefill=chunked, max_num_tokens=max_num_tokens)
  if always_predict:  # decode runs the prediction even where it would select every block
    llm.engine._dense_below = None
  outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
  return [o.outputs[0].token_ids for o in outs], llm


PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 97, size=n)] for i, n in enumerate((300, 200))]


def test_dense_chunked_equals_one_shot():
  plain, one_shot = _generate(prompts=PROMPTS, max_num_tokens=512)  # both prompts in one step
  assert one_shot.engine.stats["prefill_chunks"] == 0
  chunked, llm = _generate(prompts=PROMPTS)
  assert chunked == plain
  assert llm.engine.stats["prefill_chunks"] == 5 + 4


def test_sparse_chunked_with_full_selection_equals_dense():
  """Budgets that cover every prompt: the chunks' context selection (RocketKV's KT scores) runs
  and selects everything, and so does every decode step's prediction (dense_below switched off)."""
  full = RocketSparseAttentionConfig(prompt_budget=512, topk=256, prefill_budget=1024, **EXACT)
  dense, _ = _generate(prompts=PROMPTS)
  sparse, llm = _generate(full, chunked=True, prompts=PROMPTS, always_predict=True)
  assert sparse == dense
  stats = llm.engine.stats
  assert stats["prefill_chunks"] == 5 + 4 and stats["sparse_prefill_chunks"] == 0
  assert stats["sparse_decode_calls"] == stats["decode_calls"] > 0


def test_sparse_chunked_prefill_compresses_and_generates():
  rk = RocketSparseAttentionConfig(prompt_budget=96, topk=16, prefill_budget=64, **EXACT)
  outs, llm = _generate(rk, chunked=True, prompts=PROMPTS, max_tokens=12)
  assert all(len(o) == 12 for o in outs)
  stats = llm.engine.stats
  # Chunks starting past 64 stored tokens attend to a selection of them (3 of 300's, 2 of 200's
  # 5 + 4 chunks of 64); the prompts are compressed to 96 tokens; decode predicts.
  assert stats["sparse_prefill_chunks"] == 3 + 2 and stats["sparse_decode_calls"] > 0
  assert llm.engine.allocator.free_pages == llm.engine.allocator.num_pages


def test_algorithms_without_chunk_support_are_rejected():
  @dataclasses.dataclass(frozen=True)
  class NoChunks(BaseSparseAttentionConfig):
    algorithm: ClassVar[str] = "no_chunks"

  with pytest.raises(ConfigError, match="'no_chunks' does not support enable_chunked_prefill=True"):
    NoChunks().validate_with(KvCacheConfig(), enable_chunked_prefill=True)


@pytest.mark.parametrize("flash_statistics", ["xla", "cudnn_like", "untrusted"])
def test_split_chunk_attention_merges_empty_rows_to_zero(flash_statistics, monkeypatch):
  """Two attention calls merged by log-sum-exps equal the reference on every valid query, with
  per-head contexts of 0 tokens, a short chunk (padding query rows) and an empty chunk. Under
  "cudnn_like" every row without a valid key reports -inf statistics and a NaN output; under
  "untrusted" (what cuDNN was seen to do on an H100 for padding rows and empty contexts) such rows
  report finite, +inf or NaN statistics beside a NaN output: the merge must still give the
  reference, and exactly 0 on padding rows, never NaN."""
  import jax.numpy as jnp
  from pallas_kernels import _compat
  from sparse_jax.attention import chunk_attention, chunk_attention_split
  if flash_statistics != "xla":
    xla = _compat.attention_with_lse

    def flash_like(*args, **kwargs):
      out, lse = xla(*args, **kwargs)
      empty = lse < -1e30
      if flash_statistics == "cudnn_like":
        bad = jnp.full_like(lse, -jnp.inf)
      else:  # 0.0, +inf and NaN in turn along the query rows
        row = jnp.arange(lse.shape[1])[None, :, None] % 3
        bad = jnp.where(row == 0, 0.0, jnp.where(row == 1, jnp.inf, jnp.nan)).astype(lse.dtype)
      return jnp.where(empty[..., None], jnp.nan, out), jnp.where(empty, bad, lse)

    monkeypatch.setattr(_compat, "attention_with_lse", flash_like)
  rng = np.random.default_rng(0)
  n, c, hq, hkv, d, u = 3, 24, 8, 2, 16, 40
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((n, c, hq, d), (n, c, hkv, d), (n, c, hkv, d)))
  kc, vc = (jnp.asarray(rng.normal(size=(n, hkv, u, d)), jnp.float32) for _ in range(2))
  chunk_lens, ctx_lens = [24, 17, 0], [[40, 0], [0, 0], [13, 7]]
  cl, ctx = jnp.asarray(chunk_lens), jnp.asarray(ctx_lens)
  ref = np.asarray(chunk_attention(q, k, v, cl, kc, vc, ctx, 0.25))
  got = np.asarray(chunk_attention_split(q, k, v, cl, kc, vc, ctx, 0.25, implementation="xla"))
  assert got.shape == ref.shape and not np.isnan(got).any()
  for r in range(n):
    np.testing.assert_allclose(got[r, :chunk_lens[r]], ref[r, :chunk_lens[r]], atol=2e-5)
    assert (got[r, chunk_lens[r]:] == 0).all(), "padding query rows must be exactly 0"


@pytest.mark.parametrize("ctx_lens,chunk_lens", [([[40, 13], [0, 29]], [24, 17]), ([[40, 40], [40, 40]], [24, 24])])
def test_packed_chunk_attention_equals_reference(ctx_lens, chunk_lens):
  """The packed layout (one square causal attention per row and KV head, the form cuDNN runs)
  equals the reference on every valid query, with per-head context lengths and a short chunk."""
  import jax.numpy as jnp
  from sparse_jax.attention import chunk_attention, chunk_attention_packed
  rng = np.random.default_rng(0)
  n, c, hq, hkv, d, u = 2, 24, 8, 2, 16, 40
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((n, c, hq, d), (n, c, hkv, d), (n, c, hkv, d)))
  kc, vc = (jnp.asarray(rng.normal(size=(n, hkv, u, d)), jnp.float32) for _ in range(2))
  cl, ctx = jnp.asarray(chunk_lens), jnp.asarray(ctx_lens)
  ref = np.asarray(chunk_attention(q, k, v, cl, kc, vc, ctx, 0.25))
  got = np.asarray(chunk_attention_packed(q, k, v, cl, kc, vc, ctx, 0.25, implementation="xla"))
  assert got.shape == ref.shape
  for r in range(n):
    np.testing.assert_allclose(got[r, :chunk_lens[r]], ref[r, :chunk_lens[r]], atol=2e-5)


def test_page_granularity_selects_whole_pages_by_summed_block_scores():
  """prefill_granularity="page": the top KV pages by the sum of their blocks' scores, gathered as
  whole pages in ascending order; a page holding no valid block is never selected."""
  import jax.numpy as jnp
  from sparse_jax.attention import chunk_context_units
  # 2-token blocks in 4-token pages: pages score 0.3, 0.9, 0.5 and (no valid block) -inf.
  scores = jnp.asarray([[[0.1, 0.2, 0.45, 0.45, 0.5, 0.0, -jnp.inf, -jnp.inf]]], jnp.float32)
  rows = jnp.asarray([[7, 3, 5, -1]], jnp.int32)
  starts = jnp.asarray([11], jnp.int32)
  ids, lens, unit = chunk_context_units(scores, 2, rows, starts, 4, prefill_budget=8, granularity="page")
  assert unit == 4
  assert np.asarray(ids).tolist() == [[[3, 5]]] and np.asarray(lens).tolist() == [[7]]  # page 5 holds 3 tokens
  ids, _, unit = chunk_context_units(scores, 2, rows, starts, 4, prefill_budget=8)
  assert unit == 2 and np.asarray(ids).tolist() == [[[15, 6, 7, 10]]]  # blocks 1 (0.2), 2, 3, 4 in block order


def test_prefill_granularity_is_validated():
  rk = RocketSparseAttentionConfig(prefill_granularity="token")
  with pytest.raises(ConfigError, match="prefill_granularity='token'"):
    rk.validate_with(KvCacheConfig(), enable_chunked_prefill=True)
