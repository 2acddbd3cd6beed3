"""Every config class's defaults and every shipped YAML fit every supported model shape: Llama,
Mistral, Qwen2 and Qwen3 families, head sizes 32, 48, 64, 80, 96, 128 and 256, MQA and GQA; DSA
on an MLA model. The checks that depend on the model (topr against head_dim, page sizes against
tokens_per_block, aux pools, learned predictors and their weights) all run while the engine is
built, so each case builds an `LLM` on a three-layer random model (Quest's default keeps the
first two layers dense, and the engine refuses a config with no sparse layer); shipped YAMLs are
named without a path from another working directory. On the head sizes that are not powers of two, every
algorithm's defaults also generate with a prompt longer than the budget, so the sparse path
(prompt compression, block scoring and selection) runs."""
import dataclasses
import os

import numpy as np
import pytest

import configs
import models
from sparse_jax.eval import with_budget
from sparse_jax import LLM, SamplingParams
from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
from sparse_jax.config import ConfigError, load_llm_api_options, registered_algorithms
from sparse_jax.defaults import DEFAULT_MODEL_DIR

# name -> (model_type, heads, kv_heads, head_dim)
SHAPES = {
    "llama_mqa_d32": ("llama", 4, 1, 32),
    "llama_gqa_d48": ("llama", 6, 2, 48),
    "llama_gqa_d64": ("llama", 9, 3, 64),  # SmolLM2-135M's attention
    "llama_mqa_d64": ("llama", 4, 1, 64),
    "llama_gqa_d80": ("llama", 8, 2, 80),
  "qwen2_gqa_d96": ("qwen2", 6, 2, 96),
  "llama_gqa_d128": ("llama", 4, 2, 128),
    "llama_gqa_d256": ("llama", 2, 1, 256),
    "mistral_gqa_d128": ("mistral", 4, 2, 128),
    "qwen2_gqa_d64": ("qwen2", 4, 2, 64),
    "qwen3_mqa_d128": ("qwen3", 4, 1, 128),
}
GQA_ALGORITHMS = sorted(set(registered_algorithms()) - {"dsa", "indexer"})  # indexer: needs weights for the model
SHIPPED = sorted(f[:-len(".yaml")] for f in os.listdir(configs.CONFIG_DIR) if f.endswith(".yaml"))
GQA_YAMLS = [n for n in SHIPPED if n not in ("dsa", "indexer")]


def random_model(model_type, heads, kv_heads, head_dim):
  cfg = dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
             rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=model_type == "qwen2")
  return models.build_model(cfg)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shaped_model(request):
  return request.param, random_model(*SHAPES[request.param])


def build(model, **kwargs):
  return LLM(model, dtype="float32", backend="reference", max_batch_size=1, max_seq_len=256, **kwargs)


@pytest.mark.parametrize("algorithm", GQA_ALGORITHMS)
def test_config_defaults_fit_every_shape(shaped_model, algorithm):
  name, model = shaped_model
  build(model, sparse_attention_config=registered_algorithms()[algorithm].config_cls())


@pytest.mark.parametrize("yaml_name", GQA_YAMLS)
def test_shipped_yaml_fits_every_shape(shaped_model, yaml_name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # named without a path, read from anywhere
  name, model = shaped_model
  build(model, extra_llm_api_options=yaml_name)


@pytest.mark.parametrize("algorithm", GQA_ALGORITHMS)
def test_config_defaults_generate_sparsely_on_odd_head_sizes(algorithm):
  """Defaults with only the token budget lowered (64 tokens of a 160-token prompt), as an eval
  sweep sets it: prompt compression or per-step selection runs on an 80- or 96-wide head (the
  algorithms alternate between the two shapes to keep the test short)."""
  shape = ("llama_gqa_d80", "qwen2_gqa_d96")[GQA_ALGORITHMS.index(algorithm) % 2]
  cfg = with_budget(registered_algorithms()[algorithm].config_cls(), 64)
  llm = build(random_model(*SHAPES[shape]), sparse_attention_config=cfg)
  prompt = np.random.default_rng(0).integers(1, 64, 160).tolist()
  out = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0.0))[0]
  assert len(out.outputs[0].token_ids) == 3
  evicts = {f.name for f in dataclasses.fields(cfg)} & {"prompt_budget", "max_capacity_prompt", "window"}
  assert (out.metrics["kept_prompt_tokens"] <= 64) if evicts else (out.metrics["kept_prompt_tokens"] == 160)


def test_topr_means_all_channels_on_every_head_size():
  """TensorRT-LLM's default topr=128 on its 128-wide heads is every channel; so is ours on any head."""
  for _, _, _, head_dim in SHAPES.values():
    assert RocketSparseAttentionConfig().channels(head_dim) == head_dim
  assert RocketSparseAttentionConfig(topr=0.5).channels(64) == 32
  with pytest.raises(ConfigError, match="topr=128 exceeds the model's head_dim=64"):
    RocketSparseAttentionConfig(topr=128).channels(64)


def test_dsa_default_and_yaml_on_an_mla_model(tmp_path, monkeypatch):
  from tests.test_dsa import tiny_deepseek
  from sparse_jax.algorithms.dsa import DSASparseAttentionConfig
  monkeypatch.chdir(tmp_path)
  model = tiny_deepseek(num_hidden_layers=1, mlp_layer_types=("dense",))
  build(model, sparse_attention_config=DSASparseAttentionConfig())
  build(model, extra_llm_api_options="dsa")


def test_every_shipped_yaml_on_the_embedded_model_from_another_directory(tmp_path, monkeypatch):
  """The README's way: a shipped config by name, the indexer's weights found next to the package."""
  monkeypatch.chdir(tmp_path)
  model = models.from_pretrained(DEFAULT_MODEL_DIR)
  tokenizer = models.load_tokenizer(DEFAULT_MODEL_DIR)
  for name in SHIPPED:
    if name == "dsa":
      with pytest.raises(ConfigError, match="needs an MLA model"):
        build(model, tokenizer=tokenizer, extra_llm_api_options=name)
      continue
    build(model, tokenizer=tokenizer, extra_llm_api_options=name)
  opts = load_llm_api_options(os.path.join(configs.CONFIG_DIR, "indexer.yaml"))
  assert os.path.isabs(opts.sparse_attention_config.weights_path)
  assert os.path.exists(opts.sparse_attention_config.weights_path)


def test_readme_rocket_example_generates_on_the_embedded_model():
  """`RocketSparseAttentionConfig(prompt_budget=256, topk=16)` on a 64-wide head (it used to fail on
  topr=128) compresses a 300-token prompt and decodes."""
  llm = LLM(sparse_attention_config=RocketSparseAttentionConfig(prompt_budget=256, topk=16), max_batch_size=1,
            max_seq_len=512)
  prompt = np.random.default_rng(0).integers(3, 4000, 300).tolist()
  out = llm.generate(prompt, SamplingParams(max_tokens=4))[0]
  assert len(out.outputs[0].token_ids) == 4 and out.metrics["kept_prompt_tokens"] <= 256
