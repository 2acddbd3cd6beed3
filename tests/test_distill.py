"""Lightning-indexer distillation: held-out top-k recall against the oracle improves; the paged
serving path computes what training optimises; LLM serves with the saved weights; the CLI runs."""
import dataclasses
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import LLM, KvCacheConfig, SamplingParams
from sparse_jax import distill
from sparse_jax.algorithms import indexer as indexer_lib
from sparse_jax.algorithms.indexer import IndexerSparseAttentionConfig
from sparse_jax.algorithms.oracle import select_topk_blocks
from sparse_jax.attention import AttentionSpec
from sparse_jax.cache import LayerCache

VOCAB, SEQ, PAGE = 97, 128, 8
CFG = IndexerSparseAttentionConfig(weights_path="unused", topk=4, block_size=8, index_heads=4, index_head_dim=16,
                                   rope_dim=8, index_k_dtype="float32")
DCFG = distill.DistillConfig(steps=200, block_size=8, topk=4, log_every=100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  model = distill.random_model(0, vocab_size=VOCAB)
  train = distill.random_batches(VOCAB, 8, SEQ, seed=1)
  held_out = list(itertools.islice(distill.random_batches(VOCAB, 8, SEQ, seed=2), 2))  # never trained on
  indexers, report = distill.distill(model, CFG, train, held_out, DCFG, log=None)
  path = str(tmp_path_factory.mktemp("distill") / "indexer.safetensors")
  indexer_lib.save_indexers(path, indexers)
  return model, indexers, report, path


def test_distillation_improves_held_out_recall_against_the_oracle(trained):
  _, _, report, _ = trained
  before, after = report["before"], report["after"]
  print(f"recall@4x8 before {before['recall']:.3f} after {after['recall']:.3f} recency {after['recency_recall']:.3f} "
        f"KL {before['kl']:.3f} -> {after['kl']:.3f} ({report['steps']} steps, {report['train_seconds']:.1f}s)")
  assert report["steps"] == DCFG.steps
  assert after["recall"] >= before["recall"] + 0.15
  assert after["recall"] >= after["recency_recall"] + 0.1, "no better than attending to the newest blocks"
  assert min(after["recall_per_layer"]) >= before["recall"] + 0.1, "every layer's indexer must learn"
  assert after["kl"] <= 0.8 * before["kl"]


def test_recall_of_the_true_distribution_is_one():
  """block_recall is the oracle's measure: index scores equal to log p select the oracle's blocks."""
  model = distill.random_model(1, vocab_size=VOCAB)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, 64)), jnp.int32)
  lengths = jnp.asarray([64, 50], jnp.int32)
  _, p = jax.jit(functools.partial(distill.teacher, model))(tokens, lengths)[1]
  r = distill.block_recall(jnp.log(p), p, lengths, block_size=8, topk=3, query_from=32)
  assert float(r["count"]) == 2 * (32 + 18)  # KV heads x valid queries
  np.testing.assert_allclose(float(r["indexer"]) / float(r["count"]), 1.0, atol=1e-6)
  assert float(r["recency"]) / float(r["count"]) < 0.9


def test_paged_indexer_scores_what_training_optimises(trained):
  """update_aux (prefill of L - 1 tokens, then one decode token) + token_index_scores on a
  permuted page table equal the dense training form index_logits at query L - 1."""
  model, indexers, _, _ = trained
  length, num_pages = 77, 32
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, size=(1, length)), jnp.int32)
  x, _ = jax.jit(functools.partial(distill.teacher, model))(tokens, jnp.asarray([length]))[1]
  ix = indexers[1]
  expected = np.asarray(distill.index_logits(ix, x))[0, :, -1]  # [kv_heads, L]
  spec = AttentionSpec(q_heads=4, kv_heads=2, head_dim=16, page_size=PAGE, scale=0.25)
  table = jnp.asarray(np.random.default_rng(0).permutation(num_pages)[None, :16].astype(np.int32))
  aux = {n: jnp.zeros((s.heads, num_pages, *s.entry_shape), s.dtype) for n, s in indexer_lib.aux_spec(CFG, spec).items()}
  layer = LayerCache(k=jnp.zeros((2, num_pages, PAGE, 16)), v=jnp.zeros((2, num_pages, PAGE, 16)), aux=aux)
  prompt = jnp.asarray([length - 1])
  layer = indexer_lib.update_aux(CFG, spec, layer, table, jnp.zeros(1, jnp.int32), prompt, length - 1, predictor=ix,
                                 hidden=x[:, :length - 1])
  layer = indexer_lib.update_aux(CFG, spec, layer, table, prompt, prompt + 1, 1, predictor=ix, hidden=x[:, -1:])
  lengths = jnp.asarray([length])
  got = np.asarray(indexer_lib.token_index_scores(None, layer, table, lengths, predictor=ix, hidden=x[:, -1:]))[0]
  np.testing.assert_allclose(got[:, :length], expected, rtol=1e-4, atol=1e-4)
  assert np.all(np.isneginf(got[:, length:]))
  sel = indexer_lib.predict_attn(CFG, spec, None, layer, table, lengths, predictor=ix, hidden=x[:, -1:])
  ref = select_topk_blocks(indexer_lib.block_logsumexp(jnp.asarray(expected)[None], 8), lengths, 8, CFG.topk)
  np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(ref.indices))


def test_llm_serves_with_the_saved_weights_and_evicts_by_its_page_scores(trained):
  _, indexers, _, path = trained
  model = distill.random_model(0, vocab_size=VOCAB)
  cfg = dataclasses.replace(CFG, weights_path=path, decode_budget=64)
  llm = LLM(model, dtype="float32", sparse_attention_config=cfg, kv_cache_config=KvCacheConfig(tokens_per_block=PAGE),
            max_batch_size=2, max_seq_len=256, decode_chunk_size=4)
  for attn, ix in zip(model.attention_layers(), indexers):
    for name in indexer_lib.PARAM_NAMES:
      np.testing.assert_array_equal(np.asarray(getattr(attn.predictor, name)[...]), np.asarray(getattr(ix, name)[...]))
  prompts = [np.random.default_rng(s).integers(0, VOCAB, size=n).tolist() for s, n in ((0, 120), (1, 100))]
  outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
  assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]
  assert llm.engine.stats["evicted_pages"] > 0, "the indexer's page scores drive eviction above decode_budget"
  assert llm.engine.allocator.free_pages == llm.engine.allocator.num_pages


def test_cli_trains_reports_and_saves(tmp_path):
  out = tmp_path / "cli" / "indexer.safetensors"
  cmd = [sys.executable, "-m", "sparse_jax.distill", "--model=random", f"--output={out}", "--steps=30",
         "--batch_size=4", "--seq_len=64", "--eval_batches=1", "--block_size=8", "--topk=2", "--index_head_dim=16",
         "--rope_dim=8", "--eval_seq_lens=48,96"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-3000:]
  assert re.search(r"top-2 recall vs oracle \(blocks of 8\): before \d\.\d{3} -> after \d\.\d{3}", res.stdout), res.stdout
  assert out.exists()
  tensors, meta = indexer_lib.load_indexer_file(out)
  assert meta["num_layers"] == 2 and tensors["layers.1.wq"].shape == (64, 2, 4, 16)
  for n in (48, 96):
    assert re.search(rf"at {n} tokens: before \d\.\d{{3}} -> after \d\.\d{{3}} \(recency baseline", res.stdout), res.stdout
  assert "serve with: --extra_llm_api_options=" in res.stdout and (out.parent / "indexer.yaml").exists()
  with_missing = subprocess.run([sys.executable, "-m", "sparse_jax.distill", "--model=random"], cwd=root,
                                capture_output=True, text=True, timeout=300)
  assert with_missing.returncode != 0 and "--model=random needs --output" in with_missing.stderr


def test_cli_on_text_files_writes_weights_and_yaml_next_to_the_model(tmp_path):
  """A user's checkpoint directory (a copy of the embedded model) and two text files: a progress bar,
  the recall line, indexer.safetensors + indexer.yaml in the model directory, and LLM serves the
  model with that YAML."""
  from sparse_jax.config import load_llm_api_options
  from sparse_jax.defaults import DEFAULT_MODEL_DIR
  model_dir = tmp_path / "my_model"
  shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
  words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "the", "key", "is", "42."], 3000)
  for i in range(2):
    (tmp_path / f"doc{i}.txt").write_text(" ".join(words[i::2]))
  cmd = [sys.executable, "-m", "sparse_jax.distill", f"--model={model_dir}", f"--text_files={tmp_path}/doc*.txt",
         "--steps=3", "--batch_size=2", "--seq_len=96", "--min_seq_len=48", "--eval_batches=1", "--block_size=16",
         "--topk=2", "--index_heads=1", "--index_head_dim=16", "--rope_dim=8", "--decode_queries=4"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-3000:]
  assert "(text data, 3 steps of 2 x 48-96 tokens)" in res.stdout, res.stdout
  assert re.search(r"distill: 100%.*3/3.*loss=\d", res.stderr), res.stderr[-2000:]
  assert re.search(r"top-2 recall vs oracle \(blocks of 16\): before \d\.\d{3} -> after \d\.\d{3}", res.stdout)
  weights, options = model_dir / "indexer.safetensors", model_dir / "indexer.yaml"
  assert weights.exists() and options.exists()
  cfg = load_llm_api_options(str(options)).sparse_attention_config
  assert cfg.algorithm == "indexer" and os.path.samefile(cfg.weights_path, weights)
  assert (cfg.index_heads, cfg.index_head_dim, cfg.rope_dim) == (1, 16, 8)
  llm = LLM(str(model_dir), dtype="float32", max_batch_size=1, max_seq_len=256,
            extra_llm_api_options=str(options))
  assert llm.model.attention_layers()[0].predictor is not None
  bad = subprocess.run(cmd[:4] + [f"--text_files={tmp_path}/none*.txt", "--steps=1"], cwd=root,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert bad.returncode != 0 and "no file matches" in bad.stderr


def test_decode_loss_prefers_the_oracle_blocks_and_handles_short_rows():
  model = distill.random_model(1, vocab_size=VOCAB)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(3, 64)), jnp.int32)
  lengths = jnp.asarray([64, 40, 3], jnp.int32)  # the last row is shorter than the decode queries
  _, p = jax.jit(functools.partial(distill.teacher, model))(tokens, lengths)[1]
  loss = functools.partial(distill.decode_topblock_loss, p=p, lengths=lengths, block_size=8, topk=3, queries=5)
  informed = float(loss(jnp.log(jnp.maximum(p, 1e-30))))
  uniform = float(loss(jnp.zeros_like(p)))
  reversed_ = float(loss(-jnp.log(jnp.maximum(p, 1e-30))))
  assert np.isfinite([informed, uniform, reversed_]).all()
  assert informed < uniform < reversed_
  grad = jax.grad(loss)(jnp.zeros_like(p))
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0
  # Only the last `queries` valid queries of each row carry gradient (the 3-token row has one
  # block: nothing to rank).
  rows = np.nonzero(np.asarray(jnp.abs(grad).sum(axis=(1, 3))))
  assert set(zip(*rows)) == {(0, t) for t in range(59, 64)} | {(1, t) for t in range(35, 40)}


def test_length_randomisation_and_text_splits(tmp_path):
  tokens, lengths = next(distill.random_batches(VOCAB, 64, 50, seed=0, min_seq_len=10))
  assert lengths.min() >= 10 and lengths.max() <= 50 and len(set(lengths.tolist())) > 10
  assert all(np.all(tokens[i, lengths[i]:] == 0) for i in range(64))
  from sparse_jax import tasks
  tok = tasks.build_tokenizer(vocab_size=512)
  text = " ".join(f"word{i}" for i in range(2000))
  (tmp_path / "a.txt").write_text(text)
  paths = distill.read_text_files(f"{tmp_path}/*.txt")
  ids = tasks.TokenCounter(tok).prompt_ids(text)
  cut = len(ids) - int(len(ids) * distill.HELD_OUT_FRACTION)
  train_part, held_part = ids[:cut], ids[cut:]

  def windows(split):
    tokens, lengths = next(distill.text_batches(tok, paths, 16, 40, seed=0, split=split, min_seq_len=20))
    assert lengths.min() >= 20 and lengths.max() <= 40
    return [tokens[i, :lengths[i]].tolist() for i in range(16)]

  contains = lambda part, w: any(part[j:j + len(w)] == w for j in range(len(part) - len(w) + 1))
  assert all(contains(train_part, w) for w in windows("train"))
  assert all(contains(held_part, w) for w in windows("eval"))
  with pytest.raises(FileNotFoundError, match="no file matches"):
    distill.read_text_files(f"{tmp_path}/missing*.txt")


def test_task_batches_come_from_the_train_split(monkeypatch):
  from sparse_jax import tasks
  calls = []
  real = tasks.generate_sample

  def spy(task, context_length, seed, tokenizer, *, split="eval", **kw):
    calls.append((task, seed, split))
    return real(task, context_length, seed, tokenizer, split=split, **kw)

  monkeypatch.setattr(tasks, "generate_sample", spy)
  tok = tasks.build_tokenizer(vocab_size=512)
  tokens, lengths = next(distill.task_batches(tok, 3, 200, seed=0, split="train"))
  assert tokens.shape == (3, 200) and tokens.dtype == np.int32
  assert np.all((lengths > 150) & (lengths <= 200)) and tokens.max() < 512
  assert all(np.all(tokens[i, lengths[i]:] == 0) for i in range(3))
  lo, hi = tasks.SPLITS["train"]
  assert [c[0] for c in calls] == list(tasks.RULER_TASKS[:3]) and all(c[2] == "train" and lo <= c[1] < hi for c in calls)
  held_out, _ = next(distill.task_batches(tok, 3, 200, seed=0, split="eval"))
  assert calls[-1][2] == "eval" and not np.array_equal(held_out, tokens)
