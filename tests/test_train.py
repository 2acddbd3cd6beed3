"""Training pipeline: packed rows, loss going down, HF checkpoints that transformers agrees with."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from sparse_jax import tasks, train

TINY = train.ModelShape(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def counter():
  return tasks.TokenCounter(tasks.build_tokenizer(TINY.vocab_size))


def test_make_row_layout(counter):
  mixture = train.DEFAULT_MIXTURE
  tokens, pos, tgt, w, stats = train.make_row(counter, 1024, 128, 123, mixture)
  again = train.make_row(counter, 1024, 128, 123, mixture)
  assert all(np.array_equal(a, b) for a, b in zip((tokens, pos, tgt, w), again[:4]))
  other = train.make_row(counter, 1024, 128, 124, mixture)
  assert not np.array_equal(tokens, other[0])
  assert tokens.shape == (1024,) and pos.shape == tgt.shape == w.shape == (128,)
  n = int(w.sum())
  assert n > 0 and np.all(w[:n] == 1) and np.all(w[n:] == 0)
  assert tokens[0] == train.BOS_ID
  # Each supervised slot predicts the next token of the row from the position before it.
  np.testing.assert_array_equal(tokens[pos[:n] + 1], tgt[:n])
  # Every sample ends with a supervised EOS right after its (last turn's) answer, which ends the first sample's
  # text after its "Answer:" (and the answer prefix that restates the key).
  eos = np.flatnonzero(tokens == train.EOS_ID)
  assert len(eos) == sum(stats["samples"].values()) >= 1
  assert set(eos.tolist()) <= set((pos[:n] + 1).tolist())
  text = counter.tokenizer.decode(tokens[:eos[0] + 1].tolist())
  first_eos = int(np.flatnonzero(tgt[:n] == train.EOS_ID)[0])
  first_answer = counter.tokenizer.decode(tgt[:first_eos].tolist()).strip()
  assert first_answer and text.split("Answer:")[-1].rstrip().endswith(first_answer.split()[-1])
  # Rows are filled close to their length (padding only after the last sample).
  used = int(np.flatnonzero(tokens != train.PAD_ID)[-1]) + 1
  assert used > 1024 - train.MIN_SAMPLE_TOKENS - 64


def test_rows_only_use_train_split(counter, monkeypatch):
  seen = []
  real = tasks.build

  def spy(task, length, seed, tok, *, split="eval", **kw):
    seen.append((seed, split))
    return real(task, length, seed, tok, split=split, **kw)

  monkeypatch.setattr(tasks, "build", spy)
  train.make_rows(counter, 512, 64, [1, 2, 3], train.DEFAULT_MIXTURE)
  lo, hi = tasks.SPLITS["train"]
  assert seen and all(split == "train" and lo <= seed < hi for seed, split in seen)


def test_schedule():
  cur = ((512, 0.25), (2048, 0.25), (8192, 0.5))
  assert [train.phase_at(cur, p) for p in (0.0, 0.24, 0.26, 0.6, 1.0)] == [0, 0, 1, 2, 2]
  cfg = train.TrainConfig(output_dir="x", lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  assert train.lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
  assert train.lr_at(cfg, 100, 0.0) == pytest.approx(1e-3)
  assert train.lr_at(cfg, 100, 1.0) == pytest.approx(1e-4)
  # The gate holds phases <= 1 until the answer accuracy (retrieval) is there, then the later
  # phases share the remaining time.
  sched = train.Schedule(((512, .2), (2048, .2), (8192, .3), (32768, .3)), 1, 0.7, 0.5)
  assert [sched.phase(p, 0.1) for p in (0.1, 0.3, 0.45)] == [0, 1, 1]
  assert sched.phase(0.46, 0.9) == 2 and sched.opened_at == pytest.approx(0.46)
  assert [sched.phase(p, 0.0) for p in (0.72, 0.74, 1.0)] == [2, 3, 3]
  late = train.Schedule(((512, .2), (2048, .2), (8192, .3), (32768, .3)), 1, 0.7, 0.5)
  assert late.phase(0.49, 0.2) == 1 and late.phase(0.5, 0.2) == 2  # gate_max opens it anyway
  on_time = train.Schedule(((512, .2), (2048, .2), (8192, .3), (32768, .3)), 1, 0.7, 0.5)
  assert [on_time.phase(p, 0.9) for p in (0.1, 0.3, 0.4, 0.69, 0.71, 0.99)] == [0, 1, 2, 2, 3, 3]
  off = train.Schedule(((256, .5), (512, .5)), 1, 0.7, 0.5)  # gate on the last phase: disabled
  assert off.phase(0.6, 0.0) == 1
  with pytest.raises(ValueError, match="ascending"):
    train.TrainConfig(output_dir="x", curriculum=((2048, 0.5), (512, 0.5)))
  with pytest.raises(ValueError, match="mixture"):
    train.TrainConfig(output_dir="x", mixture=(("niah_nope", 1.0),))


def test_phase_mixtures_pick_each_phase_tasks_and_gate():
  """The recipe's second phase trains (and gates on) the multi-key needles; the others keep
  the warm-up or the main mixture."""
  single, keys = (("niah_single", 1.0),), (("niah_multikey", 0.6), ("kv_lookup", 0.3), ("niah_single", 0.1))
  cfg = train.TrainConfig(output_dir="x", curriculum=((256, 0.2), (512, 0.3), (1024, 0.5)), warmup_mixture=single,
                          phase_mixtures=((1, keys),), gate_tasks=("niah_single", "niah_multikey"))
  assert cfg.mixture_at(256) == single and cfg.mixture_at(512) == keys and cfg.mixture_at(1024) == cfg.mixture
  assert cfg.gate_tasks_at(256) == ("niah_single",)
  assert cfg.gate_tasks_at(512) == ("niah_single", "niah_multikey")
  with pytest.raises(ValueError, match="phase"):
    train.TrainConfig(output_dir="x", curriculum=((256, 0.5), (512, 0.5)), phase_mixtures=((2, keys),))
  with pytest.raises(ValueError, match="phase_mixtures"):
    train.TrainConfig(output_dir="x", curriculum=((256, 0.5), (512, 0.5)), phase_mixtures=((1, (("nope", 1.0),)),))
  assert train.parse_phase_mixture("1=niah_multikey:0.6,kv_lookup:0.4") == (1, (("niah_multikey", 0.6), ("kv_lookup", 0.4)))
  with pytest.raises(ValueError, match="PHASE="):
    train.parse_phase_mixture("niah_multikey:0.6")


def test_loss_decreases_on_fixed_batch(counter):
  cfg = train.smoke_config("unused", model=TINY, lr=3e-3, warmup_steps=1)
  model = train.build_model(cfg, jnp.float32)
  from flax import nnx
  graphdef, params = nnx.split(model, nnx.Param)
  tx = train.make_optimizer(cfg)
  state = {"params": params, "opt": tx.init(params)}
  batch = train.make_rows(counter, 256, 64, [11, 12, 13], cfg.mixture)
  batch = {k: jnp.asarray(batch[k]) for k in ("tokens", "pos", "tgt", "w")}
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, backend="reference"),
                 donate_argnums=(0,))
  losses = []
  for _ in range(30):
    state, m = step(state, batch, jnp.float32(3e-3))
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("smoke"))
  record = train.train(train.smoke_config(out, max_steps=6, num_workers=2))
  return out, record


def test_smoke_run_writes_a_complete_checkpoint(trained):
  out, record = trained
  for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
            "training_log.json"):
    assert os.path.exists(os.path.join(out, f)), f
  log = json.load(open(os.path.join(out, "training_log.json")))
  assert log["steps"] == 6 and log["seed"] == 0 and log["tokens"] == 6 * 2048
  assert set(log["final_eval"]["512"]) == set(tasks.RULER_TASKS)
  assert log["log"] and all(np.isfinite(e["loss"]) for e in log["log"])
  assert any("tok/s" in line for line in log["console"])
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["model_type"] == "llama" and cfg["rope_parameters"]["rope_theta"] == 500000.0
  assert cfg["num_key_value_heads"] == 2 and cfg["eos_token_id"] == train.EOS_ID


def test_checkpoint_matches_transformers(trained):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out, _ = trained
  ours = models.from_pretrained(out, dtype=jnp.float32)
  hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 64))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids, jnp.int32))), ref, atol=1e-4, rtol=0)
  # Both tokenizers (ours via models.load_tokenizer, transformers' fast tokenizer) agree, BOS included.
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  our_tok = models.load_tokenizer(out)
  text = "One of the special magic numbers for calm-river is: 1234567.\nAnswer:"
  assert hf_tok(text).input_ids == our_tok.encode(text) and our_tok.encode(text)[0] == train.BOS_ID
  assert our_tok.eos_token_ids == (train.EOS_ID,)


def test_sharded_save_loads_the_same(trained, tmp_path):
  out, _ = trained
  model = models.from_pretrained(out, dtype=jnp.float32)
  from flax import nnx
  _, params = nnx.split(model, nnx.Param)
  tensors = train.hf_tensors(params)
  total = sum(t.nbytes for t in tensors.values())
  shard_dir = str(tmp_path / "sharded")
  os.makedirs(shard_dir)
  for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(os.path.join(out, f)) as src, open(os.path.join(shard_dir, f), "w") as dst:
      dst.write(src.read())
  open(os.path.join(shard_dir, "model.safetensors"), "w").write("stale")  # must be removed
  written = train.write_weights(shard_dir, tensors, max_shard_bytes=total // 3)
  shards = [f for f in written if f.endswith(".safetensors")]
  assert len(shards) >= 3 and "model.safetensors.index.json" in written
  assert not os.path.exists(os.path.join(shard_dir, "model.safetensors"))
  assert all(os.path.getsize(os.path.join(shard_dir, f)) < total // 3 + 4096 for f in shards)
  index = json.load(open(os.path.join(shard_dir, "model.safetensors.index.json")))
  assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
  reloaded = models.from_pretrained(shard_dir, dtype=jnp.float32)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, size=(1, 32)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(model(ids)))
  with pytest.raises(ValueError, match="exceeds max_shard_bytes"):
    train.write_weights(shard_dir, tensors, max_shard_bytes=1000)


def test_flags_carry_the_config_defaults_and_values():
  from absl import flags
  from sparse_jax.train import config as train_config
  values = flags.FlagValues()
  train_config.define_flags("test", values)
  values(["prog"])
  assert train_config.config_from_flag_values("out", {n: values[n].value for n in values}) == \
      train.TrainConfig(output_dir="out")
  values(["prog", "--curriculum=256:0.5:4096,512:0.5", "--phase_mixture=1=kv_lookup:1", "--gate_tasks=niah_single",
          "--eval_lengths=512", "--num_heads=4", "--warmup_mixture=niah_single:1", "--max_shard_bytes=1000"])
  cfg = train_config.config_from_flag_values("out", {n: values[n].value for n in values})
  assert cfg.curriculum == ((256, 0.5, 4096), (512, 0.5)) and cfg.phase_mixtures == ((1, (("kv_lookup", 1.0),)),)
  assert cfg.gate_tasks == ("niah_single",) and cfg.eval_lengths == (512,) and cfg.model.num_heads == 4
  assert cfg.warmup_mixture == (("niah_single", 1.0),) and cfg.max_shard_bytes == 1000


def test_default_model_parameter_budget():
  shape = train.ModelShape()
  assert 10e6 < shape.num_params() < 16e6
  assert shape.num_params() * 2 <= train.DEFAULT_MAX_SHARD_BYTES  # one bf16 safetensors file
  model = models.build_model(shape.hf_config(), abstract=True)
  from flax import nnx
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == shape.num_params()


def test_failing_new_length_falls_back_to_the_previous_one(tmp_path, monkeypatch):
  """A shape that compiles but fails when it first runs (e.g. out of memory on the GPU) is
  undone from the host snapshot and training goes on at the previous length."""
  real_get = train.Compiler.get

  def get(self, key, block, timeout=None):
    fn = real_get(self, key, block, timeout)
    if key == ("train", 512) and fn is not None:
      def boom(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: simulated")
      return boom
    return fn

  monkeypatch.setattr(train.Compiler, "get", get)
  record = train.train(train.smoke_config(str(tmp_path), max_steps=4, num_workers=0, eval_lengths=(256,)))
  assert record["steps"] == 4 and record["final_length"] == 256
  assert any("resuming length 256" in line for line in record["console"])
  assert os.path.exists(os.path.join(str(tmp_path), "model.safetensors"))


def test_train_step_lowers_to_cudnn_flash_attention_for_cuda(monkeypatch):
  """On the GPU the step must use cuDNN fused attention (forward and backward), never the XLA
  path that materialises T x T scores: lower it for CUDA here and count the fused calls."""
  fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not hasattr(fa, "check_cudnn_version") or not hasattr(fa, "check_compute_capability"):
    pytest.skip("this jax has no cuDNN version hooks to stand in for a GPU")
  import sparse_jax.attention as attention
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(attention, "on_gpu", lambda: True)
  from flax import nnx
  cfg = train.smoke_config("unused", model=TINY)
  graphdef, params = nnx.split(train.build_model(cfg, jnp.bfloat16), nnx.Param)
  tx = train.make_optimizer(cfg)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params, "opt": tx.init(params)})
  b, t, k = 2, 1024, 64
  batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32), "pos": jax.ShapeDtypeStruct((b, k), jnp.int32),
           "tgt": jax.ShapeDtypeStruct((b, k), jnp.int32), "w": jax.ShapeDtypeStruct((b, k), jnp.float32)}
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, backend="pallas", lm_weight=0.1))
  text = step.trace(state, batch, jax.ShapeDtypeStruct((), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("cudnn$fmha") == 2 * TINY.num_layers  # forward + backward per layer


def _recipe_config() -> train.TrainConfig:
  """The TrainConfig of bench/run_train_gpu.sh's flags (those that do not read the environment)."""
  import re
  import shlex
  from absl import flags
  from sparse_jax.train import config as train_config
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "bench", "run_train_gpu.sh")) as f:
    script = f.read().replace("\\\n", " ")
  command = re.search(r"python3 -m sparse_jax\.train (.*)", script).group(1)
  args = [a for a in shlex.split(command) if a.startswith("--") and "$" not in a]
  values = flags.FlagValues()
  train_config.define_flags("recipe", values)
  values(["prog"] + args)
  return train_config.config_from_flag_values("out", {n: values[n].value for n in values})


def test_gpu_recipe_teaches_tracking_and_aggregation_in_a_gated_phase():
  """The recipe's third phase (1K) trains mostly variable tracking and common words, in their
  easy cases too (one-hop chains, fewer common words, whose count the question names), and its
  gate waits for their held-out exact match beside the needles'."""
  import re
  cfg = _recipe_config()
  lengths = [e[0] for e in cfg.curriculum]
  phase = lengths.index(1024)
  mix = dict(cfg.mixture_at(1024))
  assert mix["variable_tracking"] + mix["common_words"] >= 0.5
  assert set(cfg.gate_tasks_at(1024)) == {"niah_single", "niah_multikey", "variable_tracking", "common_words"}
  assert cfg.gate_tasks_at(256) == ("niah_single",)
  schedule = train.Schedule(cfg.curriculum, cfg.gate_phase, cfg.gate_exact_match, cfg.gate_max_progress,
                            cfg.gate_from)
  assert schedule.gated(phase) and schedule.gated(phase - 1) and not schedule.gated(phase + 1)
  counter = tasks.TokenCounter(tasks.build_tokenizer(cfg.model.vocab_size))
  rows = train.make_rows(counter, 1024, cfg.slots(1024), list(range(24)), cfg.mixture_at(1024),
                         pack=1024 >= cfg.pack_min_length)
  assert rows["samples"].get("variable_tracking", 0) >= 4 and rows["samples"].get("common_words", 0) >= 4
  text = "".join(counter.tokenizer.decode(r.tolist()) for r in rows["tokens"])
  counts = {int(n) for n in re.findall(r"What are the (\d+) most common words", text)}
  assert 10 in counts and min(counts) < 10
  hops = [len(re.findall(r"VAR [A-Z]{5} = VAR", sample)) for sample in text.split("Memorize and track")[1:]]
  assert min(hops) < 4
