"""Every configuration value is type-checked where it enters: YAML options, KvCacheConfig, LLM
arguments, checkpoint files. Each wrong value raises an error that names it (and the file)."""
from __future__ import annotations

import json
import os

import pytest

import models
from sparse_jax import ConfigError, KvCacheConfig, LLM, SamplingParams, load_llm_api_options
from sparse_jax.defaults import DEFAULT_MODEL_DIR
from tests.model_fixtures import tiny_llama


@pytest.mark.parametrize("yaml_text, needles", [
    ("max_batch_size: eight\n", ["max_batch_size='eight'", "integer"]),
    ("max_seq_len: 4k\n", ["max_seq_len='4k'"]),
    ("max_batch_size: -4\n", ["max_batch_size=-4", ">= 1"]),
    ("tensor_parallel_size: 0.5\n", ["tensor_parallel_size=0.5"]),
    ("max_seq_len: true\n", ["max_seq_len=True"]),
    ("backend: gpu\n", ["backend='gpu'", "auto"]),
    ("enable_chunked_prefill: maybe\n", ["enable_chunked_prefill='maybe'"]),
    ("kv_cache_config:\n  tokens_per_block: true\n", ["tokens_per_block=True"]),
    ("kv_cache_config:\n  free_gpu_memory_fraction: abc\n", ["free_gpu_memory_fraction='abc'"]),
    ("kv_cache_config:\n  max_tokens: 1e6\n", ["max_tokens='1e6'"]),
    ("sparse_attention_config:\n  algorithm: rocket\n  prompt_budget: lots\n", ["prompt_budget", "lots"]),
])
def test_yaml_values_are_type_checked(tmp_path, yaml_text, needles):
  path = tmp_path / "options.yaml"
  path.write_text(yaml_text)
  with pytest.raises(ConfigError) as info:
    load_llm_api_options(str(path))
  message = str(info.value)
  assert message.startswith(str(path)), message
  for needle in needles:
    assert needle in message, message


@pytest.mark.parametrize("kwargs, needle", [
    (dict(free_gpu_memory_fraction="abc"), "free_gpu_memory_fraction='abc'"),
    (dict(free_gpu_memory_fraction="0.5"), "free_gpu_memory_fraction='0.5'"),
    (dict(free_gpu_memory_fraction=float("nan")), "free_gpu_memory_fraction=nan"),
    (dict(free_gpu_memory_fraction=True), "free_gpu_memory_fraction=True"),
    (dict(tokens_per_block=True), "tokens_per_block=True"), (dict(tokens_per_block=24), "tokens_per_block=24"),
    (dict(max_tokens=True), "max_tokens=True"), (dict(max_tokens=0), "max_tokens=0"),
    (dict(max_tokens=1.5), "max_tokens=1.5"), (dict(dtype=32), "dtype=32"),
    (dict(enable_block_reuse="no"), "enable_block_reuse='no'"),
])
def test_kv_cache_config_values_are_type_checked(kwargs, needle):
  with pytest.raises(ConfigError, match="KvCacheConfig") as info:
    KvCacheConfig(**kwargs)
  assert needle in str(info.value)


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(max_batch_size=0), ConfigError, "max_batch_size=0"),
    (dict(max_batch_size=2.0), ConfigError, "max_batch_size=2.0"),
    (dict(max_seq_len=10**9), ConfigError, "max_seq_len=1000000000 is more than the model's max_position_embeddings=256"),
    (dict(max_seq_len=512), ConfigError, "max_seq_len=512 is more than the model's max_position_embeddings=256"),
    (dict(max_seq_len="4k"), ConfigError, "max_seq_len='4k'"),
    (dict(tensor_parallel_size=0.5), ConfigError, "tensor_parallel_size=0.5"),
    (dict(backend="gpu"), ConfigError, "backend='gpu'"),
    (dict(decode_chunk_size=0), ConfigError, "decode_chunk_size=0"),
    (dict(max_queue_size=-1), ConfigError, "max_queue_size=-1"),
    (dict(seed="abc"), ConfigError, "seed='abc'"),
    (dict(enable_chunked_prefill="yes"), ConfigError, "enable_chunked_prefill='yes'"),
    (dict(kv_cache_config={"max_tokens": 64}), ConfigError, "kv_cache_config must be a KvCacheConfig, got dict"),
    (dict(kv_cache_config=KvCacheConfig(max_tokens=10**12)), ConfigError,
     "kv_cache_config.max_tokens=1000000000000 needs a KV pool of"),
    (dict(extra_llm_api_options={"max_batch_size": "eight"}), ConfigError, "max_batch_size='eight'"),
])
def test_llm_arguments_are_checked(kwargs, error, needle):
  with pytest.raises(error) as info:
    LLM(tiny_llama(0, max_pos=256), dtype="float32", **kwargs)
  assert needle in str(info.value)


def test_max_seq_len_past_the_model_positions_runs_when_allowed(caplog):
  """allow_long_max_seq_len turns the error into a warning; generation then runs past the
  model's positions (RoPE extrapolates) and gives as many tokens as asked."""
  with caplog.at_level("WARNING"):
    llm = LLM(tiny_llama(0, max_pos=32), dtype="float32", max_seq_len=64, allow_long_max_seq_len=True,
              kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=128), max_batch_size=1)
  assert llm.max_seq_len == 64
  assert "max_seq_len=64 is more than the model's max_position_embeddings=32" in caplog.text
  out = llm.generate([list(range(1, 31))], SamplingParams(max_tokens=20, ignore_eos=True))[0].outputs[0]
  assert len(out.token_ids) == 20


def test_llm_rejects_a_model_of_the_wrong_kind():
  with pytest.raises(TypeError, match="model must be a checkpoint directory, a model module or None, got int"):
    LLM(42)


@pytest.fixture
def checkpoint(tmp_path):
  """A copy of the embedded model's small files with links to its weights, to corrupt at will."""
  d = tmp_path / "ckpt"
  d.mkdir()
  for name in os.listdir(DEFAULT_MODEL_DIR):
    src = os.path.join(DEFAULT_MODEL_DIR, name)
    if name.endswith(".safetensors"):
      os.symlink(src, d / name)
    else:
      (d / name).write_bytes(open(src, "rb").read())
  return d


@pytest.mark.parametrize("field, value, needle", [
    ("num_hidden_layers", "four", "num_hidden_layers='four' must be an integer >= 1"),
    ("hidden_size", 64.0, "hidden_size=64.0 must be an integer"),
    ("vocab_size", -1, "vocab_size=-1"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps='1e-6' must be a positive number"),
    ("eos_token_id", "</s>", "eos_token_id='</s>'"),
])
def test_checkpoint_config_values_are_type_checked(checkpoint, field, value, needle):
  cfg = json.loads((checkpoint / "config.json").read_text())
  (checkpoint / "config.json").write_text(json.dumps({**cfg, field: value}))
  with pytest.raises(models.CheckpointError) as info:
    models.from_pretrained(str(checkpoint))
  assert str(checkpoint / "config.json") in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "model.safetensors.index.json"])
def test_corrupt_json_files_are_named(checkpoint, name):
  (checkpoint / name).write_text('{"model_type": "llama", ')
  with pytest.raises(models.CheckpointError, match=f"{checkpoint / name}: not valid JSON"):
    models.load_tokenizer(str(checkpoint)) if name == "tokenizer_config.json" else \
        models.from_pretrained(str(checkpoint))


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_names_stay_inside_the_checkpoint(checkpoint, shard, monkeypatch):
  index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
  first = next(iter(index["weight_map"]))
  index["weight_map"][first] = shard
  (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
  opened = []
  import safetensors
  real = safetensors.safe_open
  monkeypatch.setattr(safetensors, "safe_open", lambda f, *a, **k: opened.append(f) or real(f, *a, **k))
  with pytest.raises(models.CheckpointError, match="names shard\\(s\\) outside the checkpoint directory"):
    models.from_pretrained(str(checkpoint))
  assert opened == []


def test_yaml_paths_are_relative_to_the_yaml_and_shipped_configs_load_by_name(tmp_path, monkeypatch):
  """A relative `weights_path` names a file next to the YAML, whatever the working directory; an
  absolute one and a dict's are kept as written; a shipped config loads by its name alone."""
  import configs
  folder = tmp_path / "options"
  folder.mkdir()
  (folder / "indexer.yaml").write_text("sparse_attention_config:\n  algorithm: indexer\n"
                                       "  weights_path: weights/idx.safetensors\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  opts = load_llm_api_options(str(folder / "indexer.yaml"))
  assert opts.sparse_attention_config.weights_path == str(folder / "weights" / "idx.safetensors")
  (folder / "abs.yaml").write_text(f"sparse_attention_config:\n  algorithm: indexer\n  weights_path: {tmp_path}/w.st\n")
  assert load_llm_api_options(str(folder / "abs.yaml")).sparse_attention_config.weights_path == f"{tmp_path}/w.st"
  as_dict = {"sparse_attention_config": {"algorithm": "indexer", "weights_path": "w.safetensors"}}
  assert load_llm_api_options(as_dict).sparse_attention_config.weights_path == "w.safetensors"
  for name in ("rocket", "rocket.yaml"):
    assert load_llm_api_options(name) == load_llm_api_options(os.path.join(configs.CONFIG_DIR, "rocket.yaml"))
  shipped = load_llm_api_options("indexer").sparse_attention_config.weights_path
  assert os.path.isabs(shipped) and os.path.exists(shipped)
  with pytest.raises(ConfigError, match=r"options file not found: rockett .*shipped: \[.*'rocket'"):
    load_llm_api_options("rockett")
