"""DSA on our MLA model: config, errors, sparse == dense at full budget, cached == no-cache,
the FP8 indexer cache (bytes per token, no Hadamard rotation), kernels wired into the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.algorithms import dsa
from sparse_jax.attention import Runtime
from sparse_jax.cache import create_cache_for
from sparse_jax.config import ConfigError, get_algorithm, load_llm_api_options
from tests.kernel_platform import INTERPRET
from tests.model_fixtures import tiny_deepseek
from tests.model_loops import cached_generate, forward, jaccard

DSA = dsa.DSASparseAttentionConfig




@pytest.fixture(scope="module")
def model():
  return tiny_deepseek(num_hidden_layers=1, mlp_layer_types=("sparse",))


# -- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("index_topk", 0), ("index_topk", -4), ("index_topk", True),
                                         ("index_topk", "2048"), ("indexer_k_dtype", "int8"),
                                         ("skip_indexer_for_short_seqs", "yes")])
def test_config_rejects_bad_values_by_name(field, value):
  with pytest.raises(ConfigError, match=rf"DSASparseAttentionConfig\.{field}={value!r}"):
    DSA(**{field: value})


def test_yaml_layout_block_reuse_and_chunked_prefill_accepted():
  opts = load_llm_api_options("configs/dsa.yaml")
  assert opts.sparse_attention_config == DSA(index_topk=2048, indexer_k_dtype="float8_e4m3fn",
                                             skip_indexer_for_short_seqs=True)
  assert opts.kv_cache_config.enable_block_reuse            # accepted: DSA evicts nothing
  assert not DSA.compacts_prompt
  chunked = load_llm_api_options({"sparse_attention_config": {"algorithm": "dsa"}, "enable_chunked_prefill": True})
  assert chunked.enable_chunked_prefill and DSA.supports_chunked_prefill
  with pytest.raises(ConfigError, match="unknown key.*index_top_k"):
    load_llm_api_options({"sparse_attention_config": {"algorithm": "dsa", "index_top_k": 5}})
  assert get_algorithm("dsa").config_cls is DSA
  assert DSA().topk(2048) == 2048 and DSA(index_topk=64).topk(2048) == 64


def test_gqa_model_gets_a_clear_error():
  from tests.model_fixtures import tiny_llama
  llama = tiny_llama()
  with pytest.raises(ConfigError, match="needs an MLA model with a lightning indexer"):
    llama.cache_layout(DSA(), 16)
  algo = get_algorithm("dsa")
  assert not algo.serves_gqa and algo.predict_kv is None and algo.mla is not None
  spec = llama.layers[0].self_attn.spec(16, Runtime(sparse=DSA()))
  with pytest.raises(ConfigError, match="needs an MLA model"):
    algo.mla.write_aux(DSA(), spec, None, None, None)
  with pytest.raises(ConfigError, match="needs an MLA model"):
    algo.mla.select_decode(DSA(), spec, None, None, None, None, None)


def test_mla_model_rejects_gqa_only_algorithms(model):
  rocket = get_algorithm("rocket").config_cls()
  with pytest.raises(ConfigError, match="does not support MLA"):
    model.cache_layout(rocket, 16)


# -- numerics ----------------------------------------------------------------------------------

def test_sparse_equals_dense_when_topk_covers_the_sequence(model):
  """index_topk >= every length but below the padded prompt (24) and the page-table capacity
  (40), indexer not skipped: prefill and decode run the indexer and top-k, which must pick
  every token, and the DSA model's cached logits equal dense MLA's (no sparse config)."""
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 97, size=n).tolist() for n in (9, 17, 4)]
  full = DSA(index_topk=30, indexer_k_dtype="float32", skip_indexer_for_short_seqs=False)
  ids_sparse, sparse = cached_generate(model, prompts, 12, full, page_size=4, pad_to=24)
  ids_dense, dense = cached_generate(model, prompts, 12, None, page_size=4, pad_to=24)
  diff = np.abs(sparse - dense).max()
  print(f"sparse (topk >= length) vs dense MLA logits: {diff:.2e}")
  assert diff <= 1e-5
  assert np.array_equal(ids_sparse, ids_dense)
  ids = rng.integers(0, 97, size=(2, 24))
  no_cache_full, no_cache_default = forward(model, ids, index_topk=24), forward(model, ids)
  assert np.abs(no_cache_full - no_cache_default).max() > 1e-3    # index_topk 8 really is sparse


def test_cached_prefill_and_decode_equal_the_no_cache_forward():
  """Ragged prompts, permuted pages, top-8 of up to 33 tokens: every cached logit row equals
  the no-cache forward of the same tokens (teacher-forced on what the cached loop generated)."""
  model = tiny_deepseek(1)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 97, size=n).tolist() for n in (21, 6, 13)]
  steps = 12
  ids, cached = cached_generate(model, prompts, steps, DSA(indexer_k_dtype="float32"), page_size=4, seed=3)
  seqs = np.zeros((len(prompts), max(map(len, prompts)) + steps - 1), np.int32)   # right-padded: causal
  for i, prompt in enumerate(prompts):
    seqs[i, :len(prompt) + steps - 1] = prompt + ids[i, :-1].tolist()
  ref = forward(model, seqs)
  worst = max(float(np.abs(cached[i] - ref[i, len(p) - 1:len(p) - 1 + steps]).max()) for i, p in enumerate(prompts))
  print(f"cached vs no-cache logits: {worst:.2e}")
  assert worst <= 1e-4


@pytest.mark.parametrize("sparse", [DSA(indexer_k_dtype="float32"), None], ids=["dsa", "dense"])
def test_chunked_prefill_equals_the_no_cache_forward(sparse):
  """A 29-token prompt prefilled in chunks of 8 (each chunk attends to the stored ones: top-8
  of up to 29 tokens with DSA, every token without) over permuted pages: every chunk's last
  logits equal the no-cache forward's at that position. The model has no q LoRA (q_proj)."""
  model = tiny_deepseek(3, q_lora_rank=None, num_hidden_layers=1, mlp_layer_types=("sparse",))
  assert model.layers[0].self_attn.q_proj is not None
  rng = np.random.default_rng(6)
  prompt = rng.integers(0, 97, size=29)
  chunk, page_size, pages = 8, 4, 9
  runtime = Runtime(sparse=sparse)
  cache = create_cache_for(model.cache_layout(sparse, page_size), num_pages=pages + 3, page_size=page_size,
                           batch_slots=2, max_pages_per_seq=pages, dtype=jnp.float32)
  table = np.full((2, pages), -1, np.int32)
  table[1] = rng.permutation(pages + 3)[:pages]
  cache = cache.replace(page_table=jnp.asarray(table))
  graphdef, params = nnx.split(model)
  step = jax.jit(lambda params, tok, n, start, cache: nnx.merge(graphdef, params).prefill(
      tok, n, jnp.array([1], jnp.int32), cache, runtime, start))
  ref = forward(model, prompt[None], **({} if sparse else dict(index_topk=len(prompt))))[0]   # dense: no top-k
  worst = 0.0
  for start in range(0, len(prompt), chunk):
    piece = prompt[start:start + chunk]
    tok = np.zeros((1, chunk), np.int32)
    tok[0, :len(piece)] = piece
    logits, cache = step(params, jnp.asarray(tok), jnp.asarray([len(piece)], jnp.int32),
                         jnp.asarray([start], jnp.int32), cache)
    worst = max(worst, float(np.abs(np.asarray(logits)[0] - ref[start + len(piece) - 1]).max()))
  assert int(cache.lengths[1]) == int(cache.positions[1]) == len(prompt)
  print(f"chunked prefill vs no-cache logits ({'dsa' if sparse else 'dense'}): {worst:.2e}")
  assert worst <= 1e-4


def test_pallas_kernels_in_the_model_match_the_reference():
  """Decode with backend="pallas" (indexer, top-k and sparse MLA kernels; interpret mode off the GPU) vs
  "reference", FP8 cache; contexts grow from 7 and 3 tokens past index_topk=8. (The prefill
  kernel is checked on its own in test_kernel_mla.py.)"""
  model = tiny_deepseek(2, num_hidden_layers=1, mlp_layer_types=("sparse",))
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 97, size=n).tolist() for n in (7, 3)]
  cfg = DSA(indexer_k_dtype="float8_e4m3fn")
  ids_ref, ref = cached_generate(model, prompts, 7, cfg, page_size=4)
  ids_pl, pl = cached_generate(model, prompts, 7, cfg, page_size=4, backend="pallas", interpret=INTERPRET)
  assert np.abs(pl - ref).max() <= 1e-4
  assert np.array_equal(ids_pl, ids_ref)


# -- the FP8 indexer cache --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,expected", [("float8_e4m3fn", 132), ("bfloat16", 256), ("float32", 512)])
def test_indexer_cache_bytes_per_token(dtype, expected):
  """Measured on the allocated aux pool arrays: index_head_dim 128 -> fp8 keys (128 B) + one
  float32 scale (4 B) = 132 bytes per token and layer."""
  model = tiny_deepseek(index_head_dim=128)
  page_size, num_pages = 16, 6
  cache = create_cache_for(model.cache_layout(DSA(indexer_k_dtype=dtype), page_size), num_pages=num_pages,
                           page_size=page_size, batch_slots=2, max_pages_per_seq=3)
  pools = [pool for name in cache.aux for pool in cache.aux[name]]
  per_token = sum(p.size * p.dtype.itemsize for p in pools) / (num_pages * page_size * model.num_layers)
  print(f"indexer cache bytes/token/layer ({dtype}): {per_token:g}")
  assert per_token == expected
  assert cache.aux[dsa.INDEXER_K][0].shape == (1, num_pages, page_size, 128)


def _hadamard(n: int) -> np.ndarray:
  """Normalised Sylvester Hadamard matrix (fast_hadamard_transform's order, as DeepSeek uses)."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def _keys(kind: str, rng, n: int, d: int) -> np.ndarray:
  k = rng.standard_normal((n, d)).astype(np.float32)
  if kind.startswith("outliers_x"):             # a few channels far larger than the rest
    k[:, :4] *= float(kind[len("outliers_x"):])
  elif kind == "lognormal":                       # channel scales spread over decades
    k *= np.exp(2.0 * rng.standard_normal(d)).astype(np.float32)
  elif kind == "model":                           # the tiny model's own indexer keys
    model = tiny_deepseek(index_head_dim=d)
    x = model.embed_tokens(jnp.asarray(rng.integers(0, 97, size=(1, n))))
    attn = model.layers[0].self_attn
    p = attn.project(model.layers[0].input_layernorm(x), jnp.arange(n)[None])
    k = np.asarray(attn.indexer.keys(model.layers[0].input_layernorm(x), p.cos, p.sin))[0]
  return k


@pytest.mark.parametrize("kind", ["gaussian", "outliers_x100", "outliers_x10000", "lognormal", "model"])
def test_skipping_the_hadamard_rotation_costs_nothing(kind):
  """DeepSeek's reference rotates indexer q/k by a Hadamard matrix before FP8 quantization; we
  do not (sparse_jax/algorithms/dsa.py says why). Measured here: FP8 indexer scores and their
  top-k against exact float32, quantizing k as is vs rotated (q rotated alike, unquantized)."""
  rng = np.random.default_rng(0)
  n, d, heads, topk = 2048, 128, 16, 128
  k = jnp.asarray(_keys(kind, rng, n, d))
  q = jnp.asarray(rng.standard_normal((32, heads, d)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((32, heads)).astype(np.float32))
  h = jnp.asarray(_hadamard(d))
  hp = jax.lax.Precision.HIGHEST
  rot = lambda x: jnp.einsum("...d,de->...e", x, h, precision=hp)
  dots = lambda qq, kk: jnp.einsum("qhd,nd->qhn", qq, kk, precision=hp)
  np.testing.assert_allclose(np.asarray(dots(rot(q), rot(k))), np.asarray(dots(q, k)),
                             rtol=1e-4, atol=1e-4 * float(jnp.abs(k).max()))        # the rotation is exact

  def scores(qq, kk):
    return jnp.einsum("qh,qhn->qn", w, jax.nn.relu(dots(qq, kk)), precision=hp)

  exact = scores(q, k)
  plain = scores(q, dsa.dequantize_fp8(*dsa.quantize_fp8(k)))
  rotated = scores(rot(q), dsa.dequantize_fp8(*dsa.quantize_fp8(rot(k))))
  err = lambda s: float(jnp.abs(s - exact).mean() / jnp.abs(exact).mean())
  top = lambda s: np.asarray(jax.lax.top_k(s, topk)[1])
  jac_plain, jac_rot = jaccard(top(plain), top(exact)), jaccard(top(rotated), top(exact))
  print(f"FP8 indexer ({kind}): relative score error plain {err(plain):.4f} / Hadamard {err(rotated):.4f}; "
        f"top-{topk} Jaccard plain {jac_plain:.4f} / Hadamard {jac_rot:.4f}")
  assert err(plain) <= 1.1 * err(rotated)
  assert jac_plain >= jac_rot - 0.01


def test_fp8_quantization_is_per_token_per_128_channels():
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.standard_normal((5, 256)).astype(np.float32) * np.array([1.0, 100.0]).repeat(128))
  q, s = dsa.quantize_fp8(k)
  assert q.dtype == jnp.float8_e4m3fn and s.shape == (5, 2) and s.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(s), np.abs(np.asarray(k)).reshape(5, 2, 128).max(-1) / 448.0, rtol=1e-6)
  back = dsa.dequantize_fp8(q, s)
  rel = np.abs(np.asarray(back - k)) / np.abs(np.asarray(k)).reshape(5, 2, 128).max(-1).repeat(128, axis=1)
  assert rel.max() <= 2 ** -4        # e4m3: 3 mantissa bits


@pytest.mark.parametrize("sparse", [None, DSA(index_topk=8)], ids=["dense", "dsa"])
def test_engine_greedy_tokens_pallas_equal_reference(sparse):
  """Through the LLM API (engine, paged cache, decode chunks): greedy tokens with the Pallas
  kernels (interpret mode; dense decode: mla_decode, DSA: indexer + one-launch top-k + sparse
  MLA) equal the reference backend's, on a tiny random DeepSeek-V3.2 with ragged prompts."""
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  model = tiny_deepseek(5, num_hidden_layers=1, mlp_layer_types=("dense",))
  rng = np.random.default_rng(7)
  prompts = [rng.integers(3, 97, n).tolist() for n in (14, 9)]        # one prefill bucket; both past index_topk
  params = SamplingParams(max_tokens=5, ignore_eos=True)
  tokens = {}
  for backend in ("reference", "pallas"):
    llm = LLM(model, dtype="float32", backend=backend, max_batch_size=2, max_seq_len=32,
              sparse_attention_config=sparse, decode_chunk_size=4, kv_cache_config=KvCacheConfig(tokens_per_block=8))
    tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
  assert all(len(t) == 5 for t in tokens["reference"])
  assert tokens["pallas"] == tokens["reference"]
