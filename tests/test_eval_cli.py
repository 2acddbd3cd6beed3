"""The eval CLI end to end on the CPU: a tiny random checkpoint, dense and RocketKV, a budget
sweep with its plot, LongBench-v2 records, and the budget override rules."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from sparse_jax import eval as eval_lib
from sparse_jax import tasks, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = train.ModelShape(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
ROCKET_YAML = """
sparse_attention_config:
  algorithm: rocket
  prompt_budget: 128
  window_size: 16
  kernel_size: 7
  topr: 1.0
  topk: 8
  page_size: 4
  kt_cache_dtype: float32
kv_cache_config:
  enable_block_reuse: false
  tokens_per_block: 16
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random-init checkpoint in the trainer's format (no training needed for plumbing)."""
  out = str(tmp_path_factory.mktemp("tiny_model"))
  cfg = train.smoke_config(out, model=TINY)
  train.write_static_files(out, TINY, tasks.build_tokenizer(TINY.vocab_size))
  from flax import nnx
  _, params = nnx.split(train.build_model(cfg, jnp.float32), nnx.Param)
  train.write_weights(out, train.hf_tensors(params), cfg.max_shard_bytes)
  return out


@pytest.fixture(scope="module")
def rocket_yaml(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "rocket.yaml"
  path.write_text(ROCKET_YAML)
  return str(path)


def test_with_budget_rules():
  from sparse_jax.config import load_sparse_attention_config, registered_algorithms
  rocket = load_sparse_attention_config(os.path.join(REPO, "configs", "rocket.yaml"))
  r = eval_lib.with_budget(rocket, 1024)
  assert (r.prompt_budget, r.topk, r.page_size, r.window_size, r.kernel_size) == (1024, 256, 4, 32, 63)
  cases = [({"algorithm": "quest", "page_size": 16}, 512, "topk", 32),
           ({"algorithm": "snapkv"}, 300, "max_capacity_prompt", 300),
           ({"algorithm": "streaming", "sink_tokens": 4}, 256, "window", 252),
           ({"algorithm": "oracle", "block_size": 16}, 256, "topk", 16)]
  for spec, budget, field, expected in cases:
    if spec["algorithm"] in registered_algorithms():
      assert getattr(eval_lib.with_budget(load_sparse_attention_config(spec), budget), field) == expected
  with pytest.raises(ValueError, match="budget=0"):
    eval_lib.with_budget(rocket, 0)


def test_attended_fraction_counts_dense_layers_in_full():
  from sparse_jax.algorithms.quest import QuestSparseAttentionConfig
  assert eval_lib.attended_fraction(512, 8192, 4, 0) == 512 / 8192
  assert eval_lib.attended_fraction(512, 8192, 4, 2) == (2 + 2 * 512 / 8192) / 4
  assert eval_lib.attended_fraction(512, 300, 4, 0) == 1.0  # the budget covers the prompt
  assert eval_lib.attended_fraction(None, 8192, 4, 0) == 1.0  # dense
  quest = QuestSparseAttentionConfig(page_size=16, dense_layers=1)
  figures = eval_lib.budget_figures(64, quest, 2, [256, 128])
  assert figures == {"dense_layers": 1, "num_layers": 2, "attended_fraction": ((1 + 0.25) / 2 + (1 + 0.5) / 2) / 2}
  assert eval_lib.budget_figures(None, None, 2, [256])["attended_fraction"] == 1.0
  assert eval_lib.budget_figures(None, quest, 2, [256]) == {}  # no swept budget: nothing to count


def test_eval_suite_and_report_count_dense_layers(checkpoint, tmp_path):
  """bench/eval_suite.py records each point's dense layers and attended share, and
  bench/eval_report.py shows that share in the sweep table."""
  yaml_path = tmp_path / "quest.yaml"
  yaml_path.write_text("sparse_attention_config:\n  algorithm: quest\n  page_size: 16\n  minmax_dtype: float32\n"
                       "  dense_layers: 1\nkv_cache_config:\n  tokens_per_block: 16\n")
  out = tmp_path / "suite.json"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "bench/eval_suite.py", f"--model={checkpoint}", "--dense_tasks=niah_single",
         "--dense_contexts=256", "--dense_samples=1", "--sweep_tasks=niah_single", "--sweep_contexts=256",
         "--sweep_samples=1", "--budgets=64", f"--algorithms={yaml_path}", "--backend=reference",
         "--max_batch_size=1", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  points = {p["algorithm"]: p for p in json.loads(out.read_text())["points"]}
  quest = points["quest+dense_layers=1"]  # a variant with dense layers is named by them
  n = quest["mean_prompt_tokens"]
  assert (quest["dense_layers"], quest["num_layers"]) == (1, 2)
  assert quest["attended_fraction"] == pytest.approx((1 + 64 / n) / 2, abs=1e-4)  # layer 0 attends to all n
  assert points["dense"]["attended_fraction"] == 1.0
  proc = subprocess.run([sys.executable, "bench/eval_report.py", f"--suite={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = next(l for l in proc.stdout.splitlines() if l.startswith("| quest+dense_layers=1 |"))
  assert row.startswith(f"| quest+dense_layers=1 | 64 | {100 * quest['attended_fraction']:.3g}% | ")
  assert "| algorithm | budget | attended |" in proc.stdout


def test_cli_sweep_prints_points_and_writes_output_and_plot(checkpoint, rocket_yaml, tmp_path):
  out, png = tmp_path / "res.json", tmp_path / "sweep.png"
  cmd = [sys.executable, "-m", "sparse_jax.eval", f"--model={checkpoint}", "--task=niah_single",
         "--context_length=256", "--num_samples=2", f"--extra_llm_api_options={rocket_yaml}", "--sweep_budgets=64",
         f"--output={out}", f"--plot={png}", "--backend=reference", "--max_batch_size=2"]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.strip().splitlines() if l.startswith("{")]
  assert proc.stdout.strip().splitlines()[-1].startswith("{")
  dense, rocket, final = lines[-3:]
  assert dense["algorithm"] == "dense" and dense["budget"] is None
  assert rocket["algorithm"] == "rocket" and rocket["budget"] == 64
  for p in (dense, rocket):
    assert p["task"] == "niah_single" and p["context_length"] == 256 and p["num_samples"] == 2
    assert 0.0 <= p["accuracy"] <= 1.0
  assert final["points"] == [dense, rocket]
  # budget figures: RocketKV's every layer sparse (its default), so the attended share is the budget's
  lengths = [s["prompt_tokens"] for s in json.loads(out.read_text())["samples"] if s["algorithm"] == "rocket"]
  assert (rocket["dense_layers"], rocket["num_layers"], dense["attended_fraction"]) == (0, 2, 1.0)
  assert rocket["attended_fraction"] == pytest.approx(sum(64 / n for n in lengths) / len(lengths), abs=1e-4)
  assert {"task", "context_length", "num_samples", "accuracy", "algorithm"} <= set(final)
  result = json.loads(out.read_text())
  assert len(result["samples"]) == 4
  for s in result["samples"]:
    assert s["prompt_tokens"] <= 256 and s["score"] in (0.0, 1.0) and isinstance(s["prediction"], str)
    assert s["score"] == tasks.score(s["prediction"], s["answers"])
  assert png.exists() and png.stat().st_size > 1000
  assert "sample" in proc.stderr  # the tqdm bar


def test_longbench_v2_in_process(checkpoint, tmp_path, capsys):
  rec = dict(_id="lb-1", domain="d", sub_domain="s", difficulty="easy", length="short", question="Which?",
             choice_A="a", choice_B="b", choice_C="c", choice_D="d", answer="C", context="Some text here. " * 100)
  data = tmp_path / "lb.jsonl"
  data.write_text(json.dumps(rec) + "\n")
  result = eval_lib.evaluate(task="longbench_v2", context_length=300, num_samples=0, model=checkpoint,
                             data=str(data), backend="reference", max_tokens=4, progress=False)
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["task"] == "longbench_v2" and last["num_samples"] == 1 and last["algorithm"] == "dense"
  sample = result["samples"][0]
  assert sample["_id"] == "lb-1" and sample["prompt_tokens"] <= 300
  assert sample["score"] == tasks.score_choice(sample["prediction"], "C")


def test_longbench_v2_release_file_with_filters_and_categories(checkpoint, tmp_path, capsys):
  """The release's data.json: one JSON array of records in its field order, indented as released.
  --difficulty / --length keep the matching records; the summary has accuracy per difficulty,
  length and domain, each the mean of its records' scores."""
  def record(_id, domain, difficulty, length, answer):
    return {"_id": _id, "domain": domain, "sub_domain": "Academic", "difficulty": difficulty, "length": length,
            "question": f"Question {_id}?", "choice_A": "one", "choice_B": "two", "choice_C": "three",
            "choice_D": "four", "answer": answer, "context": f"Context of {_id}. " * 60}
  release = [record("66f36490821e116aacb2cc22", "Single-Document QA", "easy", "short", "A"),
             record("66ebed525a08c7b9b35e1cb4", "Multi-Document QA", "hard", "short", "B"),
             record("6719b96abb02136c067d4358", "Long In-context Learning", "hard", "medium", "D"),
             record("66fa208bbb02136c067c5fc1", "Single-Document QA", "hard", "short", "C")]
  data = tmp_path / "data.json"
  data.write_text(json.dumps(release, ensure_ascii=False, indent=4))
  result = eval_lib.evaluate(task="longbench_v2", context_length=300, num_samples=0, model=checkpoint,
                             data=str(data), backend="reference", max_tokens=4, progress=False,
                             difficulty="hard", length="short")
  samples = result["samples"]
  assert [s["_id"] for s in samples] == [release[1]["_id"], release[3]["_id"]]
  for s, rec in zip(samples, (release[1], release[3])):
    assert s["score"] == tasks.score_choice(s["prediction"], rec["answer"]) and s["prompt_tokens"] <= 300
  categories = result["summary"]["categories"]
  assert set(categories) == {"difficulty=hard", "length=short", "domain=Multi-Document QA", "domain=Single-Document QA"}
  assert categories["difficulty=hard"] == result["summary"]["accuracy"] == sum(s["score"] for s in samples) / 2
  assert categories["domain=Single-Document QA"] == samples[1]["score"]
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_samples"] == 2


def test_chat_template_flags(checkpoint, tmp_path, capsys):
  """A checkpoint without a template: --apply_chat_template=true is refused naming --chat_template;
  --chat_template=FILE renders each prompt as the user's message with RULER's answer prefix
  starting the reply, so the prompt grows by exactly the template's text."""
  with pytest.raises(ValueError, match="has no chat template; pass --chat_template"):
    eval_lib.evaluate(task="niah_single", context_length=128, num_samples=1, model=checkpoint,
                      apply_chat_template="true", progress=False)
  template = tmp_path / "chat.jinja"
  template.write_text("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
                      "{% if add_generation_prompt %}<<assistant>>{% endif %}")
  runs = {}
  for mode in ("false", "auto"):
    runs[mode] = eval_lib.evaluate(task="niah_single", context_length=128, num_samples=1, model=checkpoint,
                                   backend="reference", max_tokens=2, progress=False, apply_chat_template=mode,
                                   chat_template=str(template))
  assert runs["false"]["summary"]["chat_template"] is False and runs["auto"]["summary"]["chat_template"] is True
  import models
  tokenizer = models.load_tokenizer(checkpoint)
  sample = eval_lib.load_samples("niah_single", 128, 1, 0, tasks.TokenCounter(tokenizer.backend))[0]
  question, prefix = tasks.split_answer_prefix(sample.prompt)
  assert prefix.startswith("The special magic number for") and question + tasks.ANSWER_SUFFIX + " " + prefix == sample.prompt
  expected = tokenizer.encode(f"<<user>>{question}<<assistant>>{prefix}", add_special_tokens=False)
  assert runs["auto"]["samples"][0]["prompt_tokens"] == len(expected)
  assert runs["false"]["samples"][0]["prompt_tokens"] == len(tokenizer.encode(sample.prompt))


def test_bad_arguments(checkpoint):
  with pytest.raises(ValueError, match="--task='nope'"):
    eval_lib.evaluate(task="nope", context_length=256, num_samples=1, model=checkpoint)
  with pytest.raises(ValueError, match="--sweep_budgets needs --extra_llm_api_options"):
    eval_lib.evaluate(task="niah_single", context_length=256, num_samples=1, model=checkpoint, sweep_budgets=[64])
  with pytest.raises(ValueError, match="needs --data"):
    eval_lib.evaluate(task="longbench_v2", context_length=256, num_samples=1, model=checkpoint)


def test_default_model_path(tmp_path, monkeypatch):
  """The embedded model is installed (package data); a missing one is named with how to train it."""
  from sparse_jax import defaults
  path = defaults.default_model_path()
  assert path == defaults.DEFAULT_MODEL_DIR
  for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
    assert os.path.exists(os.path.join(path, name)), name
  (tmp_path / "config.json").write_text("{}")
  monkeypatch.setattr(defaults, "DEFAULT_MODEL_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"lacks tokenizer.json, model.safetensors .*sparse_jax.train"):
    defaults.default_model_path()
