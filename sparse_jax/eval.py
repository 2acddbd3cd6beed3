"""Accuracy of dense and sparse attention on RULER-style tasks or LongBench-v2, via the LLM API.

    python -m sparse_jax.eval --task=niah_single --context_length=4096 --num_samples=100 \\
        [--model=DIR] [--extra_llm_api_options=configs/rocket.yaml] \\
        [--sweep_budgets=256,512,1024,2048 --plot=acc.png] [--output=results.json]

Samples come from `sparse_jax.tasks` (eval split; deterministic per --seed) or from a
LongBench-v2 file as released (--task=longbench_v2 --data=data.json, a JSON array, or JSONL;
--difficulty / --length filter it; --context_length truncates the context in the middle as
LongBench does). Generation is greedy. Scores: RULER's string_match_all (fraction of expected
answers present); for LongBench-v2 the letter its reference code extracts, with accuracy per
difficulty, length and domain.

Chat templates: with --apply_chat_template=auto (default) a checkpoint with a chat template
(or --chat_template=FILE) gets each prompt as the user's message, rendered by the template; a
RULER prompt's answer prefix ("The special magic number for X ... is") starts the assistant's
reply, as RULER does. --context_length counts the task text; the template adds its own tokens.

Without --sweep_budgets one configuration runs: the YAML's sparse algorithm, or dense
attention without a YAML. With it, dense runs once as the reference and every algorithm of
every YAML (comma list) runs at each token budget B, the config scaled by its algorithm's
`with_budget` hook (RocketKV: prompt_budget=B and topk=B // page_size, ...). B is what each
sparse layer attends to; the config's `dense_layers` first layers attend to the whole context, so
each swept point also reports `dense_layers`, `num_layers` and `attended_fraction`: the share of
the prompt a decode step attends to, averaged over the layers (dense layers count 1). Printed:
one JSON line per point, then (last line) a JSON summary with every point.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

from absl import flags

from sparse_jax import tasks
from sparse_jax.config import get_algorithm

EVAL_TASKS = tasks.RULER_TASKS + ("longbench_v2",)


# -- budgets ----------------------------------------------------------------------------------

def with_budget(cfg, budget: int):
  """`cfg` (a sparse-attention config) scaled to a token budget of `budget` tokens by its
  algorithm's `with_budget` hook (keep B prompt tokens, or attend to B tokens per decode step).
  Raises ValueError when the algorithm has no budget to scale."""
  if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
    raise ValueError(f"budget={budget!r} must be a positive integer")
  scale = get_algorithm(cfg).with_budget
  if scale is None:
    raise ValueError(f"algorithm {cfg.algorithm!r} ({type(cfg).__name__}) has no token budget to sweep")
  return scale(cfg, budget)


def attended_fraction(budget: int | None, prompt_tokens: int, num_layers: int, dense_layers: int) -> float:
  """The share of a `prompt_tokens`-token prompt that a decode step attends to, averaged over the
  model's `num_layers` layers: the first `dense_layers` attend to all of it, the others to the
  token budget (at most the whole prompt). Dense attention (budget None) is 1."""
  if budget is None or prompt_tokens <= 0:
    return 1.0
  sparse = min(budget, prompt_tokens) / prompt_tokens
  return (dense_layers + (num_layers - dense_layers) * sparse) / num_layers


def budget_figures(budget: int | None, sparse_config, num_layers: int, prompt_lengths: Sequence[int]) -> dict:
  """A point's budget as reported: its dense layers and the attended fraction (`attended_fraction`,
  mean over the prompts), which counts the dense layers at full context. Empty for a sparse
  configuration without a swept budget (its budget is the algorithm's own fields)."""
  if sparse_config is not None and budget is None:
    return {}
  dense = 0 if sparse_config is None else sparse_config.dense_layers
  fractions = [attended_fraction(budget, n, num_layers, dense) for n in prompt_lengths]
  return {"dense_layers": dense, "num_layers": num_layers,
          "attended_fraction": round(sum(fractions) / max(1, len(fractions)), 4)}


# -- samples --------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalSample:
  prompt: str
  answers: list[str]
  kind: str  # "ruler" (string match) or "choice" (LongBench-v2 letter)
  meta: dict[str, Any]


def load_samples(task: str, context_length: int, num_samples: int, seed: int, counter: tasks.TokenCounter,
                 data: str | None = None, difficulty: str | None = None, length: str | None = None) -> list[EvalSample]:
  """Eval-split samples of a RULER task, or LongBench-v2 records (first num_samples; 0 = all)."""
  if task == "longbench_v2":
    if not data:
      raise ValueError("--task=longbench_v2 needs --data=FILE (the release's data.json or JSONL)")
    records = tasks.read_longbench_v2(data, difficulty=difficulty, length=length)
    if num_samples:
      records = records[:num_samples]
    out = []
    for rec in records:
      prompt = tasks.longbench_v2_prompt(rec, counter, context_length or None)
      out.append(EvalSample(prompt, [rec["answer"]], "choice",
                            {k: rec[k] for k in ("_id", "domain", "sub_domain", "difficulty", "length")}))
    return out
  if task not in tasks.RULER_TASKS:
    raise ValueError(f"--task={task!r}: expected one of {EVAL_TASKS}")
  samples = tasks.generate_samples(task, context_length, num_samples, seed, counter.tokenizer, split="eval")
  return [EvalSample(s["prompt"], s["answers"], "ruler", {"seed": s["seed"], "num_prompt_tokens": s["num_prompt_tokens"]})
          for s in samples]


def score_sample(sample: EvalSample, prediction: str) -> float:
  if sample.kind == "choice":
    return tasks.score_choice(prediction, sample.answers[0])
  return tasks.score(prediction, sample.answers)


# -- running ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Point:
  algorithm: str
  budget: int | None
  sparse_config: Any


def prompt_ids(sample: EvalSample, tokenizer, chat: bool) -> list[int]:
  """The model's input for a sample: the prompt, or (chat) the prompt as the user's message with
  a RULER answer prefix starting the assistant's reply."""
  if not chat:
    return tokenizer.encode(sample.prompt)
  question, prefix = tasks.split_answer_prefix(sample.prompt) if sample.kind == "ruler" else (sample.prompt, "")
  text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
  return tokenizer.encode(text + prefix, add_special_tokens=False)


def category_accuracy(records: list[dict]) -> dict[str, float]:
  """LongBench-v2's result table: accuracy per difficulty, length and domain."""
  groups: dict[str, list[float]] = {}
  for r in records:
    for key in ("difficulty", "length", "domain"):
      if key in r:
        groups.setdefault(f"{key}={r[key]}", []).append(r["score"])
  return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}


def run_point(point: Point, samples: list[EvalSample], ids: list[list[int]], *, model: str, dtype: str,
              backend: str | None,
              tensor_parallel_size: int | None = None,
              kv_cache_config, max_batch_size: int, max_tokens: int, max_seq_len: int,
              bar=None) -> tuple[dict, list[dict]]:
  """Generates every sample with one configuration; returns (point summary, per-sample records).

  max_seq_len: the engine's per-sequence capacity (longest prompt + max_tokens): the KV cache
  is sized from it, so it is kept tight rather than the model's max_position_embeddings. A task
  at the model's longest context generates its answer a few positions past them (RULER's
  prompts fill the context), which is allowed with a warning."""
  from sparse_jax import LLM, SamplingParams
  llm = LLM(model=model, dtype=dtype, kv_cache_config=kv_cache_config, sparse_attention_config=point.sparse_config,
            backend=backend, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
            tensor_parallel_size=tensor_parallel_size, allow_long_max_seq_len=True)
  longest = max(len(p) for p in ids)
  if longest + max_tokens > llm.max_seq_len:
    raise ValueError(f"a prompt of {longest} tokens + max_tokens={max_tokens} exceeds max_seq_len={llm.max_seq_len}")
  params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
  records = []
  t0 = time.monotonic()
  for start in range(0, len(samples), max_batch_size):
    chunk = list(range(start, min(len(samples), start + max_batch_size)))
    outs = llm.generate([ids[i] for i in chunk], params)
    for i, out in zip(chunk, outs):
      text = out.outputs[0].text
      records.append({"algorithm": point.algorithm, "budget": point.budget, "index": i,
                      "prompt_tokens": len(ids[i]), "prediction": text, "answers": samples[i].answers,
                      "score": score_sample(samples[i], text), **samples[i].meta})
    if bar is not None:
      bar.update(len(chunk))
  summary = {"algorithm": point.algorithm, "budget": point.budget,
             "accuracy": sum(r["score"] for r in records) / max(1, len(records)),
             "num_samples": len(records), "seconds": round(time.monotonic() - t0, 2),
             **budget_figures(point.budget, point.sparse_config, llm.engine.layout.num_layers,
                              [r["prompt_tokens"] for r in records])}
  if any(s.kind == "choice" for s in samples):
    summary["categories"] = category_accuracy(records)
  return summary, records


def default_max_tokens(task: str, samples: Sequence[EvalSample], counter: tasks.TokenCounter,
                       chat: bool = False) -> int:
  """LongBench-v2: 32 (its answer sentence and some preamble); RULER: the longest answer + 8, and
  + 24 more for a chat model, which may close its sentence before the end-of-turn token."""
  if task == "longbench_v2":
    return 32
  longest = max(len(counter.pieces([tasks.answer_text(s.answers)])[0]) for s in samples)
  return longest + 8 + (24 if chat else 0)


def plot_sweep(path: str, points: list[dict], task: str, context_length: int) -> None:
  """Accuracy vs token budget per algorithm; dense as a horizontal reference line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  by_algo: dict[str, list[dict]] = {}
  for p in points:
    if p["budget"] is not None:
      by_algo.setdefault(p["algorithm"], []).append(p)
  for name, pts in sorted(by_algo.items()):
    pts = sorted(pts, key=lambda p: p["budget"])
    ax.plot([p["budget"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=name)
  for p in points:
    if p["budget"] is None:
      ax.axhline(p["accuracy"], color="black", linestyle="--", label=f"{p['algorithm']} (reference)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("token budget")
  ax.set_ylabel("accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{task} @ {context_length} tokens")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate(*, task: str, context_length: int, num_samples: int, seed: int = 0, model: str | None = None,
             extra_llm_api_options: Sequence[str] = (), backend: str | None = None, dtype: str = "auto",
             sweep_budgets: Sequence[int] = (), max_batch_size: int = 8, max_tokens: int = 0,
             data: str | None = None, output: str | None = None, plot: str | None = None,
             progress: bool = True, tensor_parallel_size: int | None = None, apply_chat_template: str = "auto",
             chat_template: str | None = None, difficulty: str | None = None,
             length: str | None = None) -> dict[str, Any]:
  """Runs the evaluation; prints one JSON line per point and returns {"summary", "points", "samples"}."""
  from sparse_jax.config import KvCacheConfig, load_llm_api_options
  from sparse_jax.defaults import default_model_path
  if task not in EVAL_TASKS:
    raise ValueError(f"--task={task!r}: expected one of {EVAL_TASKS}")
  if task != "longbench_v2" and (not isinstance(context_length, int) or context_length <= 0):
    raise ValueError(f"--context_length={context_length!r} must be a positive integer")
  if sweep_budgets and not extra_llm_api_options:
    raise ValueError("--sweep_budgets needs --extra_llm_api_options naming the sparse algorithm(s) to sweep")
  if apply_chat_template not in ("auto", "true", "false"):
    raise ValueError(f"--apply_chat_template={apply_chat_template!r}: expected auto, true or false")
  model = model or default_model_path()
  tokenizer = eval_tokenizer(model, chat_template)
  chat = tokenizer.has_chat_template if apply_chat_template == "auto" else apply_chat_template == "true"
  if chat and not tokenizer.has_chat_template:
    raise ValueError(f"--apply_chat_template=true but {model} has no chat template; pass --chat_template=FILE")
  counter = tasks.TokenCounter(tokenizer.backend)
  samples = load_samples(task, context_length, num_samples, seed, counter, data, difficulty, length)
  if not samples:
    raise ValueError(f"no samples to evaluate (task={task!r}, num_samples={num_samples}, data={data!r}, "
                     f"difficulty={difficulty!r}, length={length!r})")
  ids = [prompt_ids(s, tokenizer, chat) for s in samples]
  max_tokens = max_tokens or default_max_tokens(task, samples, counter, chat)
  max_seq_len = max(len(i) for i in ids) + max_tokens + 16

  options = [(path, load_llm_api_options(path)) for path in extra_llm_api_options]
  names = [o.sparse_attention_config.algorithm if o.sparse_attention_config else "dense" for _, o in options]
  names = [n if names.count(n) == 1 else f"{n}:{os.path.splitext(os.path.basename(p))[0]}"
           for n, (p, _) in zip(names, options)]
  base_kv = options[0][1].kv_cache_config if options else KvCacheConfig()
  backend = backend or next((o.backend for _, o in options if o.backend), None)
  runs: list[tuple[Point, Any]] = []
  if sweep_budgets:
    runs.append((Point("dense", None, None), base_kv))
    for name, (path, opts) in zip(names, options):
      if opts.sparse_attention_config is None:
        raise ValueError(f"{path}: has no sparse_attention_config to sweep")
      for b in sweep_budgets:
        runs.append((Point(name, b, with_budget(opts.sparse_attention_config, b)), opts.kv_cache_config))
  elif options:
    for name, (_, opts) in zip(names, options):
      runs.append((Point(name, None, opts.sparse_attention_config), opts.kv_cache_config))
  else:
    runs.append((Point("dense", None, None), base_kv))

  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(runs) * len(samples), desc=f"{task}@{context_length}", unit="sample", file=sys.stderr)
  points, records = [], []
  for point, kv in runs:
    summary, recs = run_point(point, samples, ids, model=model, dtype=dtype, backend=backend, kv_cache_config=kv,
                              tensor_parallel_size=tensor_parallel_size,
                              max_batch_size=max_batch_size, max_tokens=max_tokens, max_seq_len=max_seq_len, bar=bar)
    summary = {"task": task, "context_length": context_length, **summary}
    if not sweep_budgets:
      summary.pop("budget")
    points.append(summary)
    records.extend(recs)
    if sweep_budgets or len(runs) > 1:
      print(json.dumps(summary), flush=True)
  if bar is not None:
    bar.close()
  if len(points) == 1:
    final = dict(points[0])
  else:
    final = {"task": task, "context_length": context_length, "num_samples": len(samples), "points": points}
    head = next((p for p in points if p["algorithm"] == "dense"), points[0])
    final["accuracy"] = head["accuracy"]
    final["algorithm"] = head["algorithm"]
  final["model"] = model
  final["chat_template"] = chat
  result = {"summary": final, "points": points, "samples": records, "max_tokens": max_tokens}
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(result, f, indent=1)
  if plot:
    if not sweep_budgets:
      raise ValueError("--plot needs --sweep_budgets")
    plot_sweep(plot, points, task, context_length)
  print(json.dumps(final), flush=True)
  return result


def eval_tokenizer(model_dir: str, chat_template: str | None = None):
  """The checkpoint's tokenizer (with --chat_template instead of its own template, if given)."""
  import models
  tokenizer = models.load_tokenizer(model_dir)
  if tokenizer is None:
    raise FileNotFoundError(f"{model_dir} has no tokenizer.json; the eval needs the model's tokenizer")
  if chat_template is not None:
    tokenizer = tokenizer.with_chat_template(models.tokenizer.read_chat_template_arg(chat_template))
  return tokenizer


# -- CLI -------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_enum("task", "niah_single", EVAL_TASKS, "Task to evaluate.")
  flags.DEFINE_integer("context_length", 4096, "Prompt length in tokens (LongBench-v2: truncation limit, 0 = none).")
  flags.DEFINE_integer("num_samples", 100, "Samples (LongBench-v2: first N records, 0 = all).")
  flags.DEFINE_integer("seed", 0, "Seed of the eval-split samples.")
  flags.DEFINE_string("model", None, "Checkpoint directory (default: the embedded default model).")
  flags.DEFINE_list("extra_llm_api_options", [], "Options YAML(s) (TensorRT-LLM layout); comma list to compare.")
  flags.DEFINE_string("backend", None, "reference or pallas (default: the YAML's, else auto).")
  flags.DEFINE_integer("tensor_parallel_size", None, "devices the model is split over (default: 1)", lower_bound=1)
  flags.DEFINE_string("dtype", "auto", "auto, bfloat16 or float32.")
  flags.DEFINE_list("sweep_budgets", [], "Token budgets to sweep (needs a YAML with a sparse algorithm).")
  flags.DEFINE_string("plot", None, "PNG of accuracy vs budget (with --sweep_budgets).")
  flags.DEFINE_string("output", None, "JSON with every sample and the summary.")
  flags.DEFINE_string("data", None, "LongBench-v2 file (--task=longbench_v2): the release's data.json or JSONL.")
  flags.DEFINE_enum("difficulty", None, list(tasks.LONGBENCH_DIFFICULTIES), "LongBench-v2: only this difficulty.")
  flags.DEFINE_enum("length", None, list(tasks.LONGBENCH_LENGTHS), "LongBench-v2: only this length class.")
  flags.DEFINE_enum("apply_chat_template", "auto", ["auto", "true", "false"],
                    "Render prompts with the chat template (auto: when the checkpoint or --chat_template has one).")
  flags.DEFINE_string("chat_template", None, "Chat template (a .jinja file, a chat_template.json, or the text) used "
                      "instead of the checkpoint's.")
  flags.DEFINE_integer("max_batch_size", 8, "Engine batch slots.")
  flags.DEFINE_integer("max_tokens", 0, "Tokens to generate (0: longest answer + 8; LongBench-v2: 32).")


def main(argv):
  del argv
  evaluate(task=FLAGS.task, context_length=FLAGS.context_length, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
           model=FLAGS.model, extra_llm_api_options=FLAGS.extra_llm_api_options, backend=FLAGS.backend,
           dtype=FLAGS.dtype, sweep_budgets=[int(b) for b in FLAGS.sweep_budgets],
           max_batch_size=FLAGS.max_batch_size, max_tokens=FLAGS.max_tokens, data=FLAGS.data, output=FLAGS.output,
           plot=FLAGS.plot, tensor_parallel_size=FLAGS.tensor_parallel_size,
           apply_chat_template=FLAGS.apply_chat_template, chat_template=FLAGS.chat_template,
           difficulty=FLAGS.difficulty, length=FLAGS.length)


if __name__ == "__main__":
  from sparse_jax.cli import run_tool
  run_tool("eval")
