"""LLM API: greedy generation equals transformers, batching, sampling, clear errors.

The tests on checkpoints written by transformers skip without torch; the others run anyway."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import models
from sparse_jax import LLM, KvCacheConfig, SamplingParams
from tests.hf_checkpoints import LLAMA_FAMILY_CASES, write_checkpoint
from tests.model_fixtures import tiny_llama


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  root = str(tmp_path_factory.mktemp("ckpt"))
  return {case: write_checkpoint(root, case, seed=i) for i, case in enumerate(sorted(LLAMA_FAMILY_CASES))}


@pytest.mark.parametrize("case", sorted(LLAMA_FAMILY_CASES))
def test_greedy_generation_matches_transformers(checkpoints, case):
  import torch
  path, hf_model = checkpoints[case]
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 19, 12)]
  llm = LLM(path, dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=8), max_batch_size=4,
            max_seq_len=128)
  outs = llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
  for prompt, out in zip(prompts, outs):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].finish_reason == "length"


def test_more_prompts_than_slots_and_mixed_lengths(checkpoints):
  path, _ = checkpoints["llama3"]
  llm = LLM(path, dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=8), max_batch_size=2,
            max_seq_len=96, decode_chunk_size=4)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 128, size=int(n)).tolist() for n in rng.integers(1, 40, size=7)]
  alone = [llm.generate(p, SamplingParams(max_tokens=9, ignore_eos=True))[0].outputs[0].token_ids for p in prompts]
  together = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=9, ignore_eos=True))]
  assert together == alone
  assert llm.engine.allocator.free_pages == llm.engine.allocator.num_pages, "pages leaked"


def test_sampling_is_seeded_and_on_device():
  llm = LLM(tiny_llama(3), dtype="float32", max_batch_size=2, max_seq_len=64)
  p = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
  a = llm.generate([[1, 2, 3]], p)[0].outputs[0].token_ids
  b = llm.generate([[1, 2, 3]], p)[0].outputs[0].token_ids
  c = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))
  assert a == b and len(a) == 12
  assert c[0].outputs[0].token_ids != a
  greedy = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
  top1 = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=12, temperature=0.7, top_k=1, seed=3,
                                                   ignore_eos=True))[0].outputs[0].token_ids
  assert top1 == greedy


def test_eos_and_stop_token_ids_end_generation():
  model = tiny_llama(4)
  llm = LLM(model, dtype="float32", max_batch_size=1, max_seq_len=64)
  free = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
  stop_at = free[4]
  out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, stop_token_ids=[stop_at]))[0].outputs[0]
  assert out.token_ids == free[:free.index(stop_at) + 1]
  assert out.finish_reason == "stop"


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(max_tokens=4), "prompt 0 is empty"),
    ([1] * 60, SamplingParams(max_tokens=10), "prompt 0 has 60 tokens; with max_tokens=10 that is 70 > max_seq_len=64"),
    ([1, 500], SamplingParams(max_tokens=1), r"token id\(s\) \[500\] outside the vocabulary"),
])
def test_bad_requests_name_the_value(prompt, params, match):
  llm = LLM(tiny_llama(0), dtype="float32", max_batch_size=1, max_seq_len=64)
  with pytest.raises(ValueError, match=match):
    llm.generate([prompt], params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens=0"), (dict(max_tokens=-3), "max_tokens=-3"),
    (dict(temperature=-1.0), "temperature=-1.0"), (dict(top_p=0.0), "top_p=0.0"), (dict(n=0), "n=0")])
def test_bad_sampling_params(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_bad_model_inputs(tmp_path, checkpoints):
  with pytest.raises(ValueError, match="unknown dtype 'float7'"):
    LLM(tiny_llama(0), dtype="float7")
  with pytest.raises(models.CheckpointError, match="checkpoint directory not found"):
    LLM(str(tmp_path / "nope"))
  path, _ = checkpoints["qwen2"]
  broken = tmp_path / "broken"
  broken.mkdir()
  for f in os.listdir(path):
    data = open(os.path.join(path, f), "rb").read()
    if f.endswith(".safetensors"):
      data = data[: len(data) // 2]
    (broken / f).write_bytes(data)
  with pytest.raises(models.CheckpointError, match="model.safetensors"):
    LLM(str(broken))
  cfg = json.load(open(os.path.join(path, "config.json")))
  (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(models.CheckpointError, match="unsupported model_type 'gpt2'"):
    LLM(str(broken))


def test_mis_shaped_and_missing_tensors(tmp_path, checkpoints):
  from safetensors.numpy import load_file, save_file
  path, _ = checkpoints["llama3"]
  tensors = load_file(os.path.join(path, "model.safetensors"))
  for name, mutate, match in [
      ("model.norm.weight", lambda t: t.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
      ("extra", lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)), "unexpected tensor"),
      ("shape", lambda t: t.__setitem__("model.norm.weight", np.zeros(3, np.float32)),
       r"'model.norm.weight' has shape \(3,\), expected \(64,\)")]:
    d = tmp_path / name
    d.mkdir()
    t = dict(tensors)
    mutate(t)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(models.CheckpointError, match=match):
      models.from_pretrained(str(d))


def test_sharded_checkpoint_loads(tmp_path, checkpoints):
  import shutil
  path, hf_model = checkpoints["mistral"]
  hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  a = models.from_pretrained(path)
  b = models.from_pretrained(str(tmp_path / "sharded"))
  ids = jnp.asarray([[1, 2, 3, 4]])
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
