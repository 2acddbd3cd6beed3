"""Our Llama-family model against transformers: loading, logits, greedy generation."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import models
from tests.hf_checkpoints import LLAMA_FAMILY_CASES, write_checkpoint


@pytest.fixture(scope="module", params=sorted(LLAMA_FAMILY_CASES))
def checkpoint(request, tmp_path_factory):
  path, hf_model = write_checkpoint(str(tmp_path_factory.mktemp("hf")), request.param)
  return request.param, path, hf_model


def test_logits_match_transformers(checkpoint):
  case, path, hf_model = checkpoint
  model = models.from_pretrained(path, dtype=jnp.float32)
  ids = np.random.default_rng(0).integers(0, 128, size=(2, 40))
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_layouts_v4_and_v5_agree(checkpoint, tmp_path):
  """transformers 5 writes rope_parameters; published checkpoints carry rope_theta + rope_scaling."""
  case, path, _ = checkpoint
  cfg = json.load(open(os.path.join(path, "config.json")))
  v5 = models.build_model(cfg, abstract=True).config.rope
  legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
  params = dict(cfg.get("rope_parameters") or {})
  legacy["rope_theta"] = params.pop("rope_theta", 10000.0)
  if params.get("rope_type", "default") != "default":
    legacy["rope_scaling"] = params
  v4 = models.build_model(legacy, abstract=True).config.rope
  assert v4 == v5
