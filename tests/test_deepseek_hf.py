"""Our DeepSeek-V3.2 (MLA + DSA indexer + MoE) against transformers' DeepseekV32ForCausalLM.

transformers applies DSA in its eager/SDPA attention by folding the indexer's top-k into the
attention mask (`attention_mask.masked_fill(index_mask, min)`), for prefill and for every
cached decode step, over all keys seen so far; our no-cache forward and our cached
prefill/decode must therefore match it logit for logit, with `index_topk` below the
sequence length so the sparse path is really taken.

Exact ties: a key whose ReLU(q_h . k) is zero for every index head scores exactly 0, and
torch.topk breaks such ties in its own order (we take the lower index). With 16 index heads
that has probability 2^-16 per key at random init, so these configs avoid it.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

import models
from sparse_jax.algorithms import dsa
from sparse_jax.attention import Runtime
from tests.model_loops import cached_generate, forward, jaccard

DEEPSEEK_SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=4, topk_group=2,
    num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=24,
    index_topk=8, index_head_dim=32, index_n_heads=16, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})


def write_deepseek_checkpoint(directory: str, seed: int = 0, **overrides):
  """Random-init DeepseekV32ForCausalLM (eager attention, float32) saved with save_pretrained;
  router biases made non-zero so DeepSeek-V3's e_score_correction_bias matters."""
  torch.manual_seed(seed)
  cfg = transformers.DeepseekV32Config(**{**DEEPSEEK_SMALL, **overrides})
  model = transformers.DeepseekV32ForCausalLM(cfg).eval().to(torch.float32)
  with torch.no_grad():
    for layer in model.model.layers:
      if hasattr(layer.mlp, "gate"):
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
        layer.mlp.gate.weight.normal_(0, 0.2)
  path = os.path.join(directory, f"deepseek_v32_{seed}")
  model.save_pretrained(path)
  model.config._attn_implementation = "eager"
  return path, model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_deepseek_checkpoint(str(tmp_path_factory.mktemp("dsv32")))


@pytest.fixture(scope="module")
def model(checkpoint):
  return models.from_pretrained(checkpoint[0], dtype=jnp.float32)


def hf_indexer_capture(hf_model, ids):
  """Runs transformers on ids; returns per layer (indexer input hidden states, its top-k ids)."""
  captured = []

  def hook(module, args, kwargs, out):
    captured.append((kwargs.get("hidden_states", args[0] if args else None).numpy(), out.numpy()))

  handles = [layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True) for layer in hf_model.model.layers]
  try:
    with torch.no_grad():
      logits = hf_model(torch.tensor(ids)).logits.numpy()
  finally:
    for h in handles:
      h.remove()
  return logits, captured


# -- tests -------------------------------------------------------------------------------------

def test_config_is_read_and_sparse_path_is_taken(checkpoint, model):
  path, hf_model = checkpoint
  cfg = model.config
  assert cfg.mlp_layer_types == ("dense", "sparse")
  assert cfg.index_topk == 8 < 40
  assert type(model.layers[1].mlp).__name__ == "MoE" and type(model.layers[0].mlp).__name__ == "MLP"
  hf_cfg = hf_model.config
  assert cfg.softmax_scale == pytest.approx(hf_model.model.layers[0].self_attn.scaling, rel=1e-7)
  assert cfg.softmax_scale != pytest.approx(hf_cfg.qk_head_dim ** -0.5)           # yarn mscale^2 applied


def test_logits_match_transformers(checkpoint, model):
  _, hf_model = checkpoint
  ids = np.random.default_rng(0).integers(0, 128, size=(2, 40))
  ref, captured = hf_indexer_capture(hf_model, ids)
  # The indexer really chose: later queries keep 8 of their t + 1 tokens.
  assert all(np.all(np.sort(sel[:, 39]) != np.arange(8)) for _, sel in captured[:1])
  ours = forward(model, ids)
  diff = np.abs(ours - ref).max()
  print(f"no-cache logits max |diff| vs transformers: {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("indexer_k_dtype,min_jaccard", [("float32", 0.99), ("float8_e4m3fn", 0.9)])
def test_indexer_topk_sets_match_transformers(checkpoint, model, indexer_k_dtype, min_jaccard):
  """Per layer and query (t >= index_topk), our prefill selection from transformers' own layer
  input vs transformers' indexer top-k (the cache dtype decides the keys we score)."""
  _, hf_model = checkpoint
  t = 48
  ids = np.random.default_rng(1).integers(0, 128, size=(2, t))
  _, captured = hf_indexer_capture(hf_model, ids)
  cfg = dsa.DSASparseAttentionConfig(indexer_k_dtype=indexer_k_dtype)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  sims = []
  for layer, (hidden, theirs) in zip(model.layers, captured):
    attn = layer.self_attn
    x = jnp.asarray(hidden)
    p = attn.project(x, pos)
    q, w = attn.indexer.queries(x, p.q_resid, p.cos, p.sin)
    k = attn.indexer.keys(x, p.cos, p.sin)
    keys = dsa.decode_keys(*dsa.encode_keys(cfg, k))          # as the cache stores them
    ours = dsa.select_prefill(cfg, attn.indexer.spec(4), q, w, keys, jnp.full((2,), t, jnp.int32), pos, Runtime())
    ours = np.asarray(ours)[:, 8:]
    sims.append(jaccard(ours, np.asarray(theirs)[:, 8:]))
  print(f"indexer top-k Jaccard vs transformers ({indexer_k_dtype}): {[round(s, 4) for s in sims]}")
  assert min(sims) >= min_jaccard


def test_greedy_generation_matches_transformers(checkpoint, model):
  """32 greedy tokens: our batched cached prefill + decode (ragged prompts, permuted pages,
  float32 indexer cache) vs hf_model.generate, prompt by prompt. Contexts grow past
  index_topk, so decode selects tokens from the paged indexer cache."""
  _, hf_model = checkpoint
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 23, 14)]
  cfg = dsa.DSASparseAttentionConfig(indexer_k_dtype="float32")
  ours, _ = cached_generate(model, prompts, 32, cfg)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got.tolist() == ref


def test_rope_scaling_layout_and_first_k_dense_replace(checkpoint):
  """DeepSeek's own config.json layout (rope_theta + rope_scaling with `type`, no mlp_layer_types)
  builds the same model description as transformers 5's."""
  path, _ = checkpoint
  cfg = json.load(open(os.path.join(path, "config.json")))
  v5 = models.build_model(cfg, abstract=True).config
  legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "mlp_layer_types")}
  params = dict(cfg["rope_parameters"])
  legacy["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")
  legacy["rope_scaling"] = params
  v4 = models.build_model(legacy, abstract=True).config
  assert v4 == v5


def test_llm_api_with_dsa_matches_transformers(checkpoint):
  """End to end through sparse_jax.LLM (continuous batching, jitted prefill and multi-step
  decode, block reuse allowed with DSA): greedy tokens equal transformers' generate."""
  from sparse_jax import LLM, KvCacheConfig, SamplingParams
  path, hf_model = checkpoint
  llm = LLM(path, dtype="float32", sparse_attention_config=dsa.DSASparseAttentionConfig(indexer_k_dtype="float32"),
            kv_cache_config=KvCacheConfig(tokens_per_block=8, enable_block_reuse=True), max_batch_size=2,
            max_seq_len=64, decode_chunk_size=8)
  rng = np.random.default_rng(7)
  prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 14)]     # one padded length: one prefill compile
  outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
  for prompt, out in zip(prompts, outs):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == ref


def test_checkpoint_errors_name_the_tensor(checkpoint, tmp_path):
  """Routed experts are stacked from per-expert tensors: a missing one is named."""
  from safetensors.numpy import load_file, save_file
  path, _ = checkpoint
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
  broken = tmp_path / "broken"
  broken.mkdir()
  save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
  (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  with pytest.raises(models.CheckpointError, match=r"experts\.5\.up_proj"):
    models.from_pretrained(str(broken))
