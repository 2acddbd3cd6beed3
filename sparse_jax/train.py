"""Trains the project's default model: a small Llama (GQA) for long-context retrieval.

    python -m sparse_jax.train --output_dir=DIR [--time_budget_s=500] [--seed=0] [--smoke]

The model learns RULER-style tasks (`sparse_jax.tasks`, train split only) plus `kv_lookup`
(many facts, several questions per sample), with a curriculum over context lengths; the loss
is on answer tokens (and the EOS after each final answer), plus a small auxiliary next-token
loss on every token (--lm_loss_weight). It writes a Hugging Face
checkpoint to --output_dir (config.json, bf16 safetensors, sharded above --max_shard_bytes,
tokenizer.json, tokenizer_config.json, generation_config.json, training_log.json) every
--save_every_s and at the end, so a killed run still leaves a usable model.

Budget, and why these defaults (one H100, ~7.5 minutes of training inside a 530 s budget):
  Model: 4 layers, hidden 512, 8 query / 4 KV heads of 64, MLP 1024, vocab 4096, untied:
  13.6M parameters, 27 MB in bf16 = two shards under 15 MB. FLOPs per trained token: 6 x 9.4M (layer
  matmuls) + 6 x 2.1M (lm_head: answer slots + the auxiliary LM loss on every token) ~= 69M,
  plus attention 3.5 (forward + flash backward) x 4 layers x 2 x T x 512 (QK^T and PV over
  T/2 keys on average) = 14.3k x T: 7M at T=512, 29M at 2K, 117M at 8K, 235M at 16K, 470M
  at 32K. At ~200 TFLOP/s effective for the small matmuls (d=512; elementwise work is
  memory-bound) and ~300 TFLOP/s for cuDNN flash attention (head_dim 64): ~1.5-2.5M tok/s at
  512-2K, ~1M at 8K, ~0.6-0.9M at 16K, ~0.35-0.5M at 32K, i.e. 300-450M tokens in ~460 s:
  ~10^5-10^6 short samples while the retrieval (induction) circuits form, then a few thousand
  samples at 16K-32K to adapt them to long positions (RoPE theta 500000; the last phase trains
  at 32K itself, so the eval lengths are in distribution). Host side: one worker builds
  ~0.3-0.8M tokens/s of samples, so 13 workers keep up. An accuracy gate keeps training at
  <= 2K until the answer tokens are ~70% right (or half the time is gone), since longer
  contexts only slow the formation of retrieval down. Rows are packed (a sample of
  [L/4, L] tokens, the rest filled by more samples, no cross-sample mask), so every phase also
  keeps training shorter contexts. Compiles (one per (batch, length) shape: 5 train + 3 eval)
  run in a background thread while training proceeds on the shapes already compiled.
"""
from __future__ import annotations

import time

_T_IMPORT = time.monotonic()

import collections
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import random
import sys
import threading
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from sparse_jax import tasks

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


# -- configuration -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelShape:
  """Architecture of the trained model (a transformers LlamaConfig)."""
  vocab_size: int = 4096
  hidden_size: int = 512
  intermediate_size: int = 1024
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 64
  rope_theta: float = 500000.0
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-5

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "max_position_embeddings"):
      if getattr(self, f) <= 0:
        raise ValueError(f"ModelShape.{f}={getattr(self, f)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelShape.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

  def hf_config(self) -> dict[str, Any]:
    """config.json: the fields transformers' LlamaConfig writes (v5 rope_parameters, plus v4 rope_theta)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings, "initializer_range": 0.02,
        "rms_norm_eps": self.rms_norm_eps, "use_cache": True, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID, "pretraining_tp": 1, "tie_word_embeddings": False,
        "rope_theta": self.rope_theta, "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "dtype": "bfloat16"}

  def num_params(self) -> int:
    h, layer = self.hidden_size, 0
    layer += h * self.num_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2
    layer += 3 * h * self.intermediate_size + 2 * h
    return self.num_layers * layer + 2 * self.vocab_size * h + h


DEFAULT_CURRICULUM = ((512, 0.12), (2048, 0.16), (8192, 0.2), (16384, 0.2), (32768, 0.32))
DEFAULT_MIXTURE = (("niah_single", 0.14), ("niah_multikey", 0.16), ("niah_multivalue", 0.13),
                   ("niah_multiquery", 0.13), ("variable_tracking", 0.12), ("common_words", 0.08),
                   ("kv_lookup", 0.24))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  curriculum: (sequence length, fraction of the training time[, tokens per step]) per phase,
    shortest first; a step holds the phase's tokens per step, else tokens_per_step (batch =
    tokens // length, at least 1). Short phases take small batches: retrieval circuits form
    after a number of optimizer *steps*, not tokens.
  max_steps: > 0 makes the schedule step-based (phase and LR by step / max_steps; deterministic);
    0 makes it time-based (by the fraction of the time left for training).
  time_budget_s: wall-clock budget counted from process start; training stops reserve_s
    before it to evaluate and save.
  answer_slots: supervised tokens a row can hold (per length: min(answer_slots, length // 2)).
  pack_min_length: rows shorter than this hold one sample each (see make_row), longer ones are packed.
  warmup_mixture: the task mixture of the first phase (empty: `mixture`), e.g. the single-needle
    task alone, on which the copy (induction) circuits form fastest.
  phase_mixtures: (phase index, mixture) pairs overriding the mixture of those phases, e.g. a
    second, gated phase weighted towards the multi-key needles (key matching forms after the copy
    circuits, and only where it is most of what the batch asks for).
  gate_*: the curriculum gates (see Schedule): each phase gate_from..gate_phase lasts until the
    teacher-forced exact match on gate_samples held-out train-split samples of each of its gate
    tasks (gate_tasks that its mixture trains) at its length, measured every gate_every steps,
    reaches gate_exact_match (or progress reaches gate_max_progress). gate_exact_match=0 gates on
    the answer-token accuracy (gate_answer_acc) instead; gate_phase=-1 disables the gates.
  """
  output_dir: str
  seed: int = 0
  time_budget_s: float = 500.0
  reserve_s: float = 30.0
  max_steps: int = 0
  model: ModelShape = ModelShape()
  tokens_per_step: int = 65536
  curriculum: tuple[tuple, ...] = DEFAULT_CURRICULUM
  mixture: tuple[tuple[str, float], ...] = DEFAULT_MIXTURE
  answer_slots: int = 128
  lm_loss_weight: float = 0.1
  lr: float = 1.5e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 150
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  compute_dtype: str = "auto"
  attention: str = "auto"
  num_workers: int = -1
  eval_lengths: tuple[int, ...] = (4096, 16384, 32768)
  eval_samples: int = 8
  eval_tasks: tuple[str, ...] = tasks.RULER_TASKS
  eval_every_s: float = 120.0
  save_every_s: float = 120.0
  log_every: int = 500
  log_every_s: float = 5.0
  background_compile: bool = True
  max_shard_bytes: int = 15_000_000
  prefetch_batches: int = 8
  pack_min_length: int = 0
  warmup_mixture: tuple[tuple[str, float], ...] = ()
  phase_mixtures: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()
  gate_from: int = 0
  gate_phase: int = 0
  gate_answer_acc: float = 0.7
  gate_max_progress: float = 0.5
  gate_exact_match: float = 0.9
  gate_tasks: tuple[str, ...] = tasks.NEEDLE_TASKS
  gate_samples: int = 16
  gate_every: int = 50
  tokenizer_corpus_seed: int = 0

  def __post_init__(self):
    if not self.curriculum:
      raise ValueError("TrainConfig.curriculum is empty")
    if any(len(e) not in (2, 3) for e in self.curriculum):
      raise ValueError(f"TrainConfig.curriculum entries must be (length, fraction[, tokens_per_step]): "
                       f"{self.curriculum}")
    lengths = [e[0] for e in self.curriculum]
    if lengths != sorted(set(lengths)) or any(l < 64 or l % 64 for l in lengths):
      raise ValueError(f"TrainConfig.curriculum lengths {lengths} must be distinct, ascending multiples of 64")
    if any(e[1] <= 0 for e in self.curriculum):
      raise ValueError(f"TrainConfig.curriculum fractions must be positive: {self.curriculum}")
    if any(len(e) == 3 and e[2] < 64 for e in self.curriculum):
      raise ValueError(f"TrainConfig.curriculum tokens_per_step must be at least 64: {self.curriculum}")
    if max(lengths) > self.model.max_position_embeddings:
      raise ValueError(f"TrainConfig.curriculum reaches {max(lengths)} > max_position_embeddings="
                       f"{self.model.max_position_embeddings}")
    bad_phase = [i for i, _ in self.phase_mixtures if not 0 <= i < len(self.curriculum)]
    if bad_phase:
      raise ValueError(f"TrainConfig.phase_mixtures names phase(s) {bad_phase}; the curriculum has "
                       f"{len(self.curriculum)} phases")
    for name, mix in (("mixture", self.mixture), ("warmup_mixture", self.warmup_mixture or self.mixture),
                      *((f"phase_mixtures[{i}]", m) for i, m in self.phase_mixtures)):
      unknown = [t for t, _ in mix if t not in tasks.TASKS]
      if unknown or not mix or any(w < 0 for _, w in mix) or sum(w for _, w in mix) <= 0:
        raise ValueError(f"TrainConfig.{name}={mix} must weight known tasks {tasks.TASKS} positively")
    if any(t not in tasks.TASKS for t in self.gate_tasks) or (self.gate_exact_match > 0 and not self.gate_tasks):
      raise ValueError(f"TrainConfig.gate_tasks={self.gate_tasks} must be known tasks {tasks.TASKS}")
    if self.gate_every < 1 or self.gate_samples < 1:
      raise ValueError(f"TrainConfig.gate_every={self.gate_every} and gate_samples={self.gate_samples} must be >= 1")
    bad_eval = [t for t in self.eval_tasks if t not in tasks.RULER_TASKS]
    if bad_eval:
      raise ValueError(f"TrainConfig.eval_tasks has unknown task(s) {bad_eval}; expected from {tasks.RULER_TASKS}")
    if any(l < 256 or l % 64 for l in self.eval_lengths):
      raise ValueError(f"TrainConfig.eval_lengths={self.eval_lengths} must be multiples of 64, at least 256")
    if self.compute_dtype not in ("auto", "bfloat16", "float32"):
      raise ValueError(f"TrainConfig.compute_dtype={self.compute_dtype!r}: expected auto, bfloat16 or float32")
    if self.attention not in ("auto", "cudnn", "xla"):
      raise ValueError(f"TrainConfig.attention={self.attention!r}: expected auto, cudnn or xla")
    if self.tokens_per_step < 64:
      raise ValueError(f"TrainConfig.tokens_per_step={self.tokens_per_step} is too small")

  def step_tokens(self, length: int) -> int:
    """Tokens per step at `length`: the curriculum entry's own, else tokens_per_step."""
    for e in self.curriculum:
      if e[0] == length and len(e) == 3:
        return int(e[2])
    return self.tokens_per_step

  def batch_size(self, length: int) -> int:
    return max(1, self.step_tokens(length) // length)

  def mixture_at(self, length: int) -> tuple[tuple[str, float], ...]:
    """The task mixture of rows of `length`: its phase's entry of phase_mixtures, else
    warmup_mixture in the first phase (when set), else `mixture`."""
    lengths = [e[0] for e in self.curriculum]
    for index, mix in self.phase_mixtures:
      if lengths[index] == length:
        return mix
    if self.warmup_mixture and len(self.curriculum) > 1 and length == self.curriculum[0][0]:
      return self.warmup_mixture
    return self.mixture

  def gate_tasks_at(self, length: int) -> tuple[str, ...]:
    """Tasks the gate of the phase at `length` measures: the gate tasks its mixture trains."""
    trained = {t for t, w in self.mixture_at(length) if w > 0}
    return tuple(t for t in self.gate_tasks if t in trained) or self.gate_tasks

  def slots(self, length: int) -> int:
    return max(16, min(self.answer_slots, length // 2))


def smoke_config(output_dir: str, **overrides) -> TrainConfig:
  """A tiny model, tiny lengths, ~20 steps on the CPU: exercises the whole pipeline incl. save."""
  base = dict(output_dir=output_dir, time_budget_s=300.0, reserve_s=5.0, max_steps=20,
              model=ModelShape(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, max_position_embeddings=1024),
              tokens_per_step=2048, curriculum=((256, 0.5), (512, 0.5)), lr=3e-3, warmup_steps=5,
              eval_lengths=(512,), eval_samples=2, eval_every_s=1e9, save_every_s=1e9, log_every=5, num_workers=2,
              max_shard_bytes=15_000_000)
  base.update(overrides)
  return TrainConfig(**base)


# -- clock ------------------------------------------------------------------------------------

def process_age_s() -> float:
  """Seconds since this process started (from /proc), else since this module was imported."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    if 0 <= age < 600:
      return age
  except (OSError, ValueError, IndexError):
    pass
  return time.monotonic() - _T_IMPORT


class Clock:
  def __init__(self):
    self.t0 = time.monotonic() - process_age_s()

  def __call__(self) -> float:
    return time.monotonic() - self.t0


class Log:
  """Prints progress lines (flushed) and keeps them for training_log.json."""

  def __init__(self, clock: Clock):
    self.clock = clock
    self.lines: list[str] = []

  def __call__(self, msg: str) -> None:
    line = f"[{self.clock():6.1f}s] {msg}"
    self.lines.append(line)
    print(line, flush=True)


# -- training rows (run in worker processes) ---------------------------------------------

MIN_SAMPLE_TOKENS = 160


def _train_options(task: str, rng: random.Random) -> dict[str, Any]:
  """Training-time variety on top of RULER's defaults (evaluation uses the defaults)."""
  if task in tasks.NEEDLE_TASKS:
    needle_p = 0.25 if task == "niah_multikey" else 0.08
    return {"haystack": rng.choices(("filler", "noise", "needle"), (0.84 - needle_p, 0.16, needle_p))[0]}
  if task == "variable_tracking":
    return {"haystack": rng.choice(("noise", "filler")), "num_chains": rng.choice((1, 1, 2)),
            "num_hops": rng.choice((2, 3, 4, 4, 4, 5))}
  if task == "kv_lookup":
    return {"num_turns": rng.randint(1, 8), "haystack": rng.choice(("filler", "filler", "noise"))}
  return {}


def make_row(counter: tasks.TokenCounter, length: int, slots: int, seed: int,
             mixture: Sequence[tuple[str, float]],
             pack: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
  """One packed training row.

  Returns tokens int32[length] (BOS sample ... EOS BOS sample ... EOS PAD...), and per
  supervised token (at most `slots`): pos int32[slots] (the position whose output predicts it),
  tgt int32[slots], w float32[slots] (1 for real slots, 0 for padding); and stats
  {"samples": {task: count}, "errors": int}. The first sample spans [length/4, length]
  tokens (half the time the whole row); later samples fill what is left. pack=False: one
  sample filling the row (no earlier sample's needles in its context: the plain retrieval
  the circuits first form on).
  """
  rng = random.Random(seed)
  names = [t for t, _ in mixture]
  weights = [w for _, w in mixture]
  tokens: list[int] = []
  pos: list[int] = []
  tgt: list[int] = []
  stats = {"samples": collections.Counter(), "errors": 0}
  k = 0
  while length - len(tokens) >= MIN_SAMPLE_TOKENS:
    remaining = length - len(tokens)
    if tokens and not pack:
      break
    if not tokens and pack and rng.random() < 0.5:
      target = rng.randint(remaining // 4, remaining)
    else:
      target = remaining
    # tasks.build fits prompt + answers into its budget; the EOS after the last answer takes one more.
    task = rng.choices(names, weights)[0]
    opts = _train_options(task, rng)
    sample_seed = tasks.split_seed("train", seed, k, "sample")
    k += 1
    try:
      built = tasks.build(task, target - 1, sample_seed, None, split="train", counter=counter, _answer_in_budget=True,
                          **opts)
    except tasks.TaskError:
      try:
        task = "niah_single"
        built = tasks.build(task, target - 1, sample_seed, None, split="train", counter=counter, _answer_in_budget=True)
      except tasks.TaskError:
        break
    except Exception:  # a generator bug must not kill a long run: skip the sample, count it
      stats["errors"] += 1
      if stats["errors"] > 3:
        break
      continue
    seq = [BOS_ID] + [i for ids in built.segment_ids for i in ids]
    sup: list[int] = []  # indices into seq of supervised tokens
    answers = counter.pieces([tasks.answer_text(built.answers)])[0]
    for q_ids, a_ids in [(None, answers)] + list(built.turn_ids):
      if q_ids is not None:
        seq += q_ids
      sup += range(len(seq), len(seq) + len(a_ids))
      seq += a_ids
    sup.append(len(seq))
    seq.append(EOS_ID)
    if len(seq) > remaining or len(pos) + len(sup) > slots:
      break
    base = len(tokens)
    pos += [base + i - 1 for i in sup]
    tgt += [seq[i] for i in sup]
    tokens += seq
    stats["samples"][task] += 1
  n = len(pos)
  out_tokens = np.full(length, PAD_ID, np.int32)
  out_tokens[:len(tokens)] = tokens
  out_pos = np.zeros(slots, np.int32)
  out_tgt = np.zeros(slots, np.int32)
  out_w = np.zeros(slots, np.float32)
  out_pos[:n], out_tgt[:n], out_w[:n] = pos, tgt, 1.0
  stats["samples"] = dict(stats["samples"])
  return out_tokens, out_pos, out_tgt, out_w, stats


def make_rows(counter, length: int, slots: int, seeds: Sequence[int], mixture, pack: bool = True) -> dict[str, Any]:
  rows = [make_row(counter, length, slots, s, mixture, pack) for s in seeds]
  samples = collections.Counter()
  for r in rows:
    samples.update(r[4]["samples"])
  return {"tokens": np.stack([r[0] for r in rows]), "pos": np.stack([r[1] for r in rows]),
          "tgt": np.stack([r[2] for r in rows]), "w": np.stack([r[3] for r in rows]),
          "samples": dict(samples), "errors": sum(r[4]["errors"] for r in rows)}


def make_eval_rows(counter, task: str, length: int, slots: int, num: int, seed: int, split: str = "eval",
                   salt_prefix: str = "") -> dict[str, Any]:
  """`num` samples of `task` (prompt <= length - 64 tokens), one per row, laid out like training
  rows; `answer_mask` marks answer slots (EOS excluded) for exact-match scoring. The curriculum
  gate uses split="train" with its own salt_prefix: held-out samples no training row contains."""
  salt = f"{salt_prefix}{task}:{length}"
  rows, masks = [], []
  for i in range(num):
    built = tasks.build(task, length - 64, tasks.split_seed(split, seed, i, salt), None, split=split, counter=counter)
    seq = [BOS_ID] + [t for ids in built.segment_ids for t in ids]
    ans = counter.pieces([tasks.answer_text(built.answers)])[0]
    if len(seq) + len(ans) + 1 > length or len(ans) + 1 > slots:
      raise RuntimeError(f"eval sample {task}@{length} does not fit: {len(seq)} + {len(ans)} answer tokens")
    start = len(seq)
    seq += ans + [EOS_ID]
    tokens = np.full(length, PAD_ID, np.int32)
    tokens[:len(seq)] = seq
    pos, tgt, w, mask = (np.zeros(slots, np.int32), np.zeros(slots, np.int32), np.zeros(slots, np.float32),
                         np.zeros(slots, bool))
    n = len(ans) + 1
    pos[:n] = np.arange(start - 1, start - 1 + n)
    tgt[:n] = seq[start:start + n]
    w[:n] = 1.0
    mask[:len(ans)] = True
    rows.append((tokens, pos, tgt, w))
    masks.append(mask)
  return {"tokens": np.stack([r[0] for r in rows]), "pos": np.stack([r[1] for r in rows]),
          "tgt": np.stack([r[2] for r in rows]), "w": np.stack([r[3] for r in rows]), "answer_mask": np.stack(masks)}


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str) -> None:
  from tokenizers import Tokenizer
  _WORKER["counter"] = tasks.TokenCounter(Tokenizer.from_str(tokenizer_json))


def _worker_rows(length, slots, seeds, mixture, pack=True):
  return make_rows(_WORKER["counter"], length, slots, seeds, mixture, pack)


def _worker_eval(task, length, slots, num, seed, split="eval", salt_prefix=""):
  return make_eval_rows(_WORKER["counter"], task, length, slots, num, seed, split, salt_prefix)


class BatchLoader:
  """Deterministic batches per shape, built ahead by a process pool (or inline when no pool).

  Batch b of length L holds rows seeded split_seed("train", seed, b * batch + r, f"row:{L}"),
  whatever the number of workers or the timing."""

  def __init__(self, cfg: TrainConfig, counter: tasks.TokenCounter, pool=None):
    self.cfg, self.counter, self.pool = cfg, counter, pool
    self.pending: dict[int, collections.deque] = collections.defaultdict(collections.deque)
    self.next_index: dict[int, int] = collections.defaultdict(int)

  def _submit(self, length: int) -> None:
    cfg = self.cfg
    batch, slots = cfg.batch_size(length), cfg.slots(length)
    b = self.next_index[length]
    self.next_index[length] += 1
    seeds = [tasks.split_seed("train", cfg.seed, b * batch + r, f"row:{length}") for r in range(batch)]
    pack, mixture = length >= cfg.pack_min_length, cfg.mixture_at(length)
    per_chunk = max(1, 16384 // length)
    chunks = [seeds[i:i + per_chunk] for i in range(0, batch, per_chunk)]
    if self.pool is None:
      jobs = [functools.partial(make_rows, self.counter, length, slots, c, mixture, pack) for c in chunks]
    else:
      # A worker that dies never answers: time out rather than hang the run.
      jobs = [functools.partial(self.pool.apply_async(_worker_rows, (length, slots, c, mixture, pack)).get, 300)
              for c in chunks]
    self.pending[length].append(jobs)

  def prime(self, length: int) -> None:
    while len(self.pending[length]) < self.cfg.prefetch_batches:
      self._submit(length)

  def drop(self, length: int) -> None:
    self.pending.pop(length, None)

  def next(self, length: int) -> dict[str, Any]:
    self.prime(length)
    parts = [job() for job in self.pending[length].popleft()]
    self._submit(length)
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "pos", "tgt", "w")}
    samples = collections.Counter()
    for p in parts:
      samples.update(p["samples"])
    out["samples"] = dict(samples)
    out["errors"] = sum(p["errors"] for p in parts)
    return out


# -- model, loss, steps ---------------------------------------------------------------------------

def build_model(cfg: TrainConfig, compute_dtype) -> nnx.Module:
  import models
  return models.build_model(cfg.model.hf_config(), dtype=compute_dtype, param_dtype=jnp.float32,
                            rngs=nnx.Rngs(cfg.seed))


def _hidden(graphdef, params, tokens, backend):
  model = nnx.merge(graphdef, params)
  return model, model(tokens, backend=backend, return_hidden=True)


def _answer_logits(graphdef, params, tokens, pos, backend):
  """tokens: int32[B, T]; pos: int32[B, K] -> float32 logits [B, K, vocab] at those positions."""
  model, h = _hidden(graphdef, params, tokens, backend)
  return model.logits(jnp.take_along_axis(h, pos[..., None], axis=1))


def _nll(logits, targets):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _loss(params, graphdef, batch, backend, lm_weight):
  """Mean NLL of the supervised (answer + EOS) tokens, plus lm_weight x the mean next-token NLL
  of every non-pad token (an auxiliary language-modelling loss: the repeated haystack
  sentences reward copying from context, which the retrieval circuits reuse)."""
  model, h = _hidden(graphdef, params, batch["tokens"], backend)
  logits = model.logits(jnp.take_along_axis(h, batch["pos"][..., None], axis=1))
  w = batch["w"]
  n = jnp.maximum(w.sum(), 1.0)
  answer = (_nll(logits, batch["tgt"]) * w).sum() / n
  acc = ((jnp.argmax(logits, -1) == batch["tgt"]) * w).sum() / n
  lm = jnp.zeros((), jnp.float32)
  if lm_weight:
    targets = batch["tokens"][:, 1:]
    mask = (targets != PAD_ID).astype(jnp.float32)
    lm = (_nll(model.logits(h[:, :-1]), targets) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return answer + lm_weight * lm, (answer, acc, lm)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW without the learning rate (the step scales by the scheduled LR it is passed)."""
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.scale_by_adam(cfg.b1, cfg.b2, eps=1e-8),
                     optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))


def train_step(state, batch, lr, *, graphdef, tx, backend, lm_weight=0.0):
  """state: {"params", "opt"} (donated); batch: tokens int32[B,T], pos/tgt int32[B,K], w f32[B,K];
  lr: float32 scalar. Returns (state, metrics); metrics["loss"] is the answer loss."""
  (_, (loss, acc, lm)), grads = jax.value_and_grad(_loss, has_aux=True)(state["params"], graphdef, batch, backend,
                                                                         lm_weight)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state["params"], updates)
  return {"params": params, "opt": opt}, {"loss": loss, "acc": acc, "lm_loss": lm,
                                          "grad_norm": _global_norm(grads)}


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def eval_step(params, tokens, pos, tgt, *, graphdef, backend):
  """-> bool[B, K]: greedy (argmax) token == target at each slot, teacher-forced."""
  logits = _answer_logits(graphdef, params, tokens, pos, backend)
  return jnp.argmax(logits, -1) == tgt


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
  """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio over progress."""
  warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
  cos = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
  return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def phase_at(curriculum: Sequence[tuple[int, float]], progress: float) -> int:
  """Index of the phase that `progress` (0..1) falls in; fractions are normalised."""
  total = sum(f for _, f in curriculum)
  acc = 0.0
  for i, (_, f) in enumerate(curriculum):
    acc += f / total
    if progress < acc:
      return i
  return len(curriculum) - 1


class Schedule:
  """Which curriculum phase each moment of training uses.

  Each phase gets its time fraction of the training time left when it starts (so without gates
  the phases follow their nominal fractions exactly). The gated phases, `gate_from` through
  `gate_phase` (never the last phase; gate_phase < 0 disables gating), last at least that long
  and until the gate metric passed to `phase` (the exact match of held-out retrieval samples at
  that phase's length, or the answer-token accuracy) reaches `gate_acc`, or progress reaches
  `gate_max`: the retrieval circuits must have formed first, before that longer contexts and
  harder tasks only slow learning down. A metric opens at most one gate (the next gated phase
  needs its own measurement). The phases after an opened gate share the time left in
  proportion to their fractions.
  """

  def __init__(self, curriculum: Sequence[tuple[int, float]], gate_phase: int, gate_acc: float, gate_max: float,
               gate_from: int | None = None):
    self.curriculum = [(e[0], e[1]) for e in curriculum]
    self.gate_phase = gate_phase
    self.gate_from = gate_phase if gate_from is None else gate_from
    self.gate_acc, self.gate_max = gate_acc, gate_max
    self.current = 0  # the phase training should be in
    self.start = 0.0  # progress at which it started
    self.opened_at: float | None = None  # progress at which the last gate opened

  def gated(self, index: int) -> bool:
    return 0 <= self.gate_from <= index <= self.gate_phase and index < len(self.curriculum) - 1

  def drop(self, index: int) -> None:
    """Removes phase `index` (its shape failed); later phases move up."""
    self.curriculum.pop(index)
    if index < self.current:
      self.current -= 1
    self.current = min(self.current, len(self.curriculum) - 1)
    if index <= self.gate_phase:
      self.gate_phase -= 1
    if index < self.gate_from:
      self.gate_from -= 1

  def phase(self, progress: float, metric: float) -> int:
    fresh = True
    while self.current < len(self.curriculum) - 1:
      fractions = [f for _, f in self.curriculum[self.current:]]
      end = self.start + (1.0 - self.start) * fractions[0] / sum(fractions)
      if progress < end:
        break
      if self.gated(self.current):
        if (not fresh or metric < self.gate_acc) and progress < self.gate_max:
          break
        self.start = self.opened_at = progress
        fresh = False
      else:
        self.start = end
      self.current += 1
    return self.current


def cudnn_attention_works(q_heads: int, kv_heads: int, head_dim: int) -> tuple[bool, str]:
  """Compiles and runs cuDNN flash attention forward + backward once on a small GQA shape."""
  if jax.default_backend() != "gpu":
    return False, f"backend is {jax.default_backend()}"
  try:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 256, q_heads, head_dim)), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(2, 256, kv_heads, head_dim)), jnp.bfloat16)

    def f(q, k, v):
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      return out.astype(jnp.float32).sum()

    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kv, kv)
    ok = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in g)
    return ok, "ok" if ok else "non-finite gradients"
  except Exception as e:  # any failure means: use the XLA path
    return False, f"{type(e).__name__}: {e}"


# -- checkpoints ----------------------------------------------------------------------------------

def tokenizer_config() -> dict[str, Any]:
  return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tasks.BOS_TOKEN, "eos_token": tasks.EOS_TOKEN,
          "pad_token": tasks.PAD_TOKEN, "add_bos_token": True, "add_eos_token": False,
          "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def write_static_files(output_dir: str, shape: ModelShape, tokenizer) -> None:
  """config.json, generation_config.json, tokenizer.json, tokenizer_config.json."""
  os.makedirs(output_dir, exist_ok=True)
  _write_json(os.path.join(output_dir, "config.json"), shape.hf_config())
  _write_json(os.path.join(output_dir, "generation_config.json"),
              {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False})
  _write_json(os.path.join(output_dir, "tokenizer_config.json"), tokenizer_config())
  tmp = os.path.join(output_dir, "tokenizer.json.tmp")
  tokenizer.save(tmp)
  os.replace(tmp, os.path.join(output_dir, "tokenizer.json"))


def hf_tensors(params) -> dict[str, np.ndarray]:
  """Our parameters (nnx.State, host or device) -> {HF name: bf16 array}, kernels transposed to [out, in]."""
  from models.loading import model_type_of
  mt = model_type_of({"model_type": "llama"})
  out = {}
  for path, var in nnx.to_flat_state(params):
    name, transpose = mt.hf_name(tuple(path))
    arr = np.asarray(var.get_value(), dtype=np.float32)
    out[name] = np.ascontiguousarray(arr.T if transpose else arr).astype(jnp.bfloat16)
  return out


def _hf_order(name: str) -> tuple:
  parts = name.split(".")
  layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else (-1 if "embed" in name else 1 << 30)
  return layer, name


def write_weights(output_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when
  larger than max_shard_bytes (every shard stays under it). Each file is written to a temporary
  name and renamed, so a reader never sees a half-written file. Returns the files written."""
  from safetensors.numpy import save_file
  names = sorted(tensors, key=_hf_order)
  total = sum(tensors[n].nbytes for n in names)
  meta = {"format": "pt"}
  stale = [f for f in os.listdir(output_dir) if f.startswith("model") and f.endswith((".safetensors", ".json"))]
  if total <= max_shard_bytes:
    path = os.path.join(output_dir, "model.safetensors")
    save_file({n: tensors[n] for n in names}, path + ".tmp", metadata=meta)
    os.chmod(path + ".tmp", 0o644)
    os.replace(path + ".tmp", path)
    written = ["model.safetensors"]
  else:
    shards, cur, size = [], [], 0
    for n in names:
      nbytes = tensors[n].nbytes
      if nbytes > max_shard_bytes:
        raise ValueError(f"tensor {n} ({nbytes} bytes) exceeds max_shard_bytes={max_shard_bytes}")
      if cur and size + nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = [], 0
      cur.append(n)
      size += nbytes
    shards.append(cur)
    count = len(shards)
    weight_map = {}
    written = []
    for i, shard in enumerate(shards, 1):
      fname = f"model-{i:05d}-of-{count:05d}.safetensors"
      path = os.path.join(output_dir, fname)
      save_file({n: tensors[n] for n in shard}, path + ".tmp", metadata=meta)
      os.chmod(path + ".tmp", 0o644)
      os.replace(path + ".tmp", path)
      weight_map.update({n: fname for n in shard})
      written.append(fname)
    _write_json(os.path.join(output_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": int(total)}, "weight_map": weight_map})
    written.append("model.safetensors.index.json")
  for f in stale:
    if f not in written and f != "model.safetensors.index.json.tmp":
      os.remove(os.path.join(output_dir, f))
  return written


# -- evaluation ------------------------------------------------------------------------------------

def run_eval(compiled_eval, params, data: dict[str, Any], batch: int, limit: int | None = None) -> dict[str, float]:
  """Exact-match accuracy per task of teacher-forced greedy answers (equal to greedy decoding
  producing the whole answer) on the prepared eval rows {task: rows}."""
  out = {}
  for task, rows in data.items():
    n = rows["tokens"].shape[0] if limit is None else min(limit, rows["tokens"].shape[0])
    correct = []
    for i in range(0, n, batch):
      sl = slice(i, min(n, i + batch))
      k = sl.stop - sl.start
      pad = batch - k
      arrs = [np.concatenate([rows[key][sl], np.zeros((pad,) + rows[key].shape[1:], rows[key].dtype)])
              for key in ("tokens", "pos", "tgt")]
      ok = np.asarray(compiled_eval(params, *arrs))[:k]
      mask = rows["answer_mask"][sl]
      correct.extend(np.all(ok | ~mask, axis=1).tolist())
    out[task] = float(np.mean(correct)) if correct else float("nan")
  return out


# -- the run -------------------------------------------------------------------------------------

class Compiler:
  """Compiles jobs in order, in a background thread (or inline), and hands out the executables."""

  def __init__(self, jobs: list[tuple[Any, Callable[[], Any]]], background: bool, log: Log):
    self.results: dict[Any, Any] = {}
    self.errors: dict[Any, str] = {}
    self.done = {key: threading.Event() for key, _ in jobs}
    self.log = log
    self.jobs = jobs
    if background:
      self.thread = threading.Thread(target=self._run, daemon=True)
      self.thread.start()
    else:
      self._run()

  def _run(self):
    for key, fn in self.jobs:
      t = time.monotonic()
      try:
        self.results[key] = fn()
        self.log(f"compiled {key} in {time.monotonic() - t:.1f}s")
      except Exception as e:
        self.errors[key] = f"{type(e).__name__}: {e}"
        self.log(f"COMPILE FAILED for {key}: {self.errors[key]}")
      self.done[key].set()

  def get(self, key, block: bool, timeout: float | None = None):
    """The executable for `key`, or None if it is not ready (after waiting `timeout` s when blocking)."""
    if block:
      self.done[key].wait(timeout)
    return self.results.get(key) if self.done[key].is_set() else None

  def failed(self, key) -> bool:
    return self.done[key].is_set() and key in self.errors


def _start_pool(num_workers: int, tokenizer_json: str):
  """A spawn-context pool whose workers import no accelerator (they only build rows)."""
  saved = {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM")}
  os.environ.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
  try:
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(num_workers, initializer=_worker_init, initargs=(tokenizer_json,))
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def train(cfg: TrainConfig) -> dict[str, Any]:
  """Runs training, evaluation and saving; returns the training log (also in training_log.json)."""
  clock = Clock()
  log = Log(clock)
  on_gpu = jax.default_backend() == "gpu"
  compute_dtype = {"auto": jnp.bfloat16 if on_gpu else jnp.float32, "bfloat16": jnp.bfloat16,
                   "float32": jnp.float32}[cfg.compute_dtype]
  log(f"devices {jax.devices()} | model {cfg.model} ({cfg.model.num_params() / 1e6:.2f}M params) | "
      f"compute {jnp.dtype(compute_dtype).name}")

  tokenizer = tasks.build_tokenizer(cfg.model.vocab_size, cfg.tokenizer_corpus_seed)
  write_static_files(cfg.output_dir, cfg.model, tokenizer)
  counter = tasks.TokenCounter(tokenizer)
  # Leave cores for the training loop and the background compiler.
  workers = cfg.num_workers if cfg.num_workers >= 0 else max(1, (os.cpu_count() or 4) - 3)
  pool = _start_pool(workers, tokenizer.to_str()) if workers > 0 else None
  log(f"tokenizer vocab {tokenizer.get_vocab_size()}; {workers} data workers")

  def submit_eval_rows(*args) -> Callable[[], Any]:
    """make_eval_rows(counter, *args) on a worker (or inline); call the result to get the rows."""
    if pool is None:
      return functools.partial(make_eval_rows, counter, *args)
    return functools.partial(pool.apply_async(_worker_eval, args).get, 120)

  # Eval rows are built first (workers are idle while the first step compiles).
  eval_jobs = {(task, length): submit_eval_rows(task, length, cfg.slots(length), cfg.eval_samples, cfg.seed)
               for length in cfg.eval_lengths for task in cfg.eval_tasks}
  loader = BatchLoader(cfg, counter, pool)
  lengths = [e[0] for e in cfg.curriculum]
  loader.prime(lengths[0])
  # The curriculum gates measure exact match on held-out train-split samples at the gated phases' lengths.
  use_gate = cfg.gate_exact_match > 0
  nominal = Schedule(cfg.curriculum, cfg.gate_phase, cfg.gate_exact_match, cfg.gate_max_progress, cfg.gate_from)
  gate_lengths = [l for i, l in enumerate(lengths) if use_gate and nominal.gated(i)]
  gate_jobs = {gl: {task: submit_eval_rows(task, gl, cfg.slots(gl), cfg.gate_samples, cfg.seed, "train", "gate:")
                    for task in cfg.gate_tasks_at(gl)} for gl in gate_lengths}

  backend = "reference"
  attention = "xla"
  if cfg.attention in ("auto", "cudnn") and on_gpu and compute_dtype == jnp.bfloat16:
    ok, why = cudnn_attention_works(cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.head_dim)
    if ok:
      backend, attention = "pallas", "cudnn"
    else:
      log(f"WARNING: cuDNN flash attention unavailable ({why}); using XLA attention")
      if cfg.attention == "cudnn":
        raise RuntimeError(f"--attention=cudnn but cuDNN flash attention fails: {why}")
  if attention == "xla" and on_gpu and max(lengths) > 2048:
    # The XLA path materialises T x T scores per query chunk (and keeps them for the backward).
    lengths = [l for l in lengths if l <= 2048] or lengths[:1]
    log(f"WARNING: XLA attention on the GPU; curriculum capped at {lengths[-1]} tokens")
  gate_lengths = [l for l in gate_lengths if l in lengths[:-1]]
  use_gate = use_gate and bool(gate_lengths)
  gated_ids = [i for i, l in enumerate(lengths) if l in gate_lengths]
  schedule = Schedule([(e[0], e[1]) for e in cfg.curriculum if e[0] in lengths],
                      max(gated_ids) if use_gate else cfg.gate_phase,
                      cfg.gate_exact_match if use_gate else cfg.gate_answer_acc, cfg.gate_max_progress,
                      gate_from=min(gated_ids) if use_gate else None)
  curriculum = schedule.curriculum
  log(f"attention: {attention} (model backend {backend!r})")

  model = build_model(cfg, compute_dtype)
  graphdef, params = nnx.split(model, nnx.Param)
  del model
  tx = make_optimizer(cfg)
  state = {"params": params, "opt": tx.init(params)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, backend=backend,
                                      lm_weight=cfg.lm_loss_weight), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, backend=backend))

  def batch_spec(length):
    b, k = cfg.batch_size(length), cfg.slots(length)
    return {"tokens": jax.ShapeDtypeStruct((b, length), jnp.int32), "pos": jax.ShapeDtypeStruct((b, k), jnp.int32),
            "tgt": jax.ShapeDtypeStruct((b, k), jnp.int32), "w": jax.ShapeDtypeStruct((b, k), jnp.float32)}

  def train_job(length):
    return lambda: step_fn.lower(abstract, batch_spec(length), jax.ShapeDtypeStruct((), jnp.float32)).compile()

  def eval_job(length):
    spec = batch_spec(length)
    return lambda: eval_fn.lower(abstract["params"], spec["tokens"], spec["pos"], spec["tgt"]).compile()

  jobs = [(("train", l), train_job(l)) for l in lengths] + [(("eval", l), eval_job(l)) for l in cfg.eval_lengths]
  # Each gate's eval compiles right after the training shape of its phase.
  for gl in reversed(gate_lengths):
    if gl not in cfg.eval_lengths:
      jobs.insert(lengths.index(gl) + 1, (("eval", gl), eval_job(gl)))
  compiler = Compiler(jobs, cfg.background_compile, log)

  history: list[dict[str, Any]] = []
  evals: list[dict[str, Any]] = []
  gates: list[dict[str, Any]] = []
  record: dict[str, Any] = {"seed": cfg.seed, "config": _jsonable(dataclasses.asdict(cfg)), "attention": attention,
                            "device": str(jax.devices()[0]), "num_params": cfg.model.num_params(),
                            "log": history, "evals": evals, "gate": gates}
  eval_data: dict[int, dict[str, Any]] = {}

  def get_eval_data(length):
    if length not in eval_data:
      eval_data[length] = {t: eval_jobs[(t, length)]() for t in cfg.eval_tasks}
    return eval_data[length]

  def evaluate(params, limit=None, block=False):
    result = {}
    for length in cfg.eval_lengths:
      # The final eval waits for a late compile only while the budget allows (saving needs ~10 s).
      wait = max(0.0, cfg.time_budget_s - 10.0 - clock()) if block else None
      fn = compiler.get(("eval", length), block=block, timeout=wait)
      if fn is None:
        if block:
          log(f"skipping the eval at {length}: not compiled in time")
        continue
      acc = run_eval(fn, params, get_eval_data(length), cfg.batch_size(length), limit)
      result[str(length)] = acc
    return result

  gate_data: dict[int, dict[str, Any]] = {}

  def get_gate_data(gl):
    if gl not in gate_data:
      gate_data[gl] = {}
      for task, job in gate_jobs[gl].items():
        try:
          gate_data[gl][task] = job()
        except Exception as e:  # a task that does not fit the gate length is left out
          log(f"gate: leaving {task} out at L={gl} ({type(e).__name__}: {e})")
    if not gate_data[gl]:
      raise RuntimeError(f"no gate task fits the gate length {gl}")
    return gate_data[gl]

  saver: threading.Thread | None = None

  def save(params_host, final=False):
    nonlocal saver
    if saver is not None:
      saver.join()
    record["console"] = list(log.lines)
    payload = _jsonable(record)
    tensors = hf_tensors(params_host)

    def work():
      t = time.monotonic()
      files = write_weights(cfg.output_dir, tensors, cfg.max_shard_bytes)
      _write_json(os.path.join(cfg.output_dir, "training_log.json"), payload)
      log(f"saved {files} ({time.monotonic() - t:.1f}s)")

    if final:
      work()
    else:
      saver = threading.Thread(target=work)
      saver.start()

  compiled = compiler.get(("train", lengths[0]), block=True)
  if compiled is None:
    raise RuntimeError(f"the first training step failed to compile: {compiler.errors}")
  deadline = cfg.time_budget_s - cfg.reserve_s
  t_start = clock()
  log(f"training starts; deadline {deadline:.0f}s ({deadline - t_start:.0f}s of training)")
  phase = 0
  length = curriculum[0][0]
  step, tokens_seen, answer_tokens = 0, 0, 0
  inflight: collections.deque = collections.deque()
  window = {"loss": 0.0, "acc": 0.0, "lm": 0.0, "n": 0, "tokens": 0, "wait": 0.0, "t": time.monotonic()}
  samples_seen: collections.Counter = collections.Counter()
  last_save = last_eval = clock()
  step_time = collections.defaultdict(lambda: 0.0)
  snapshot, probation = None, 0
  acc_ema = 0.0
  gate_em = 0.0
  diverged = False
  errors = 0
  stop_reason = "time budget"

  def progress_now() -> float:
    if cfg.max_steps:
      return step / cfg.max_steps
    return (clock() - t_start) / max(1e-6, deadline - t_start)

  def drain(keep: int):
    nonlocal answer_tokens, acc_ema
    while len(inflight) > keep:
      s, m, n_tok, n_ans, l, t_disp = inflight.popleft()
      m = jax.device_get(m)
      acc_ema = 0.95 * acc_ema + 0.05 * float(m["acc"])
      window["loss"] += float(m["loss"])
      window["lm"] += float(m["lm_loss"])
      window["acc"] += float(m["acc"])
      window["n"] += 1
      window["tokens"] += n_tok
      answer_tokens += n_ans
      if not math.isfinite(float(m["loss"])):
        raise FloatingPointError(f"loss is {m['loss']} at step {s}")
      if window["n"] >= cfg.log_every or time.monotonic() - window["t"] >= cfg.log_every_s:
        dt = time.monotonic() - window["t"]
        entry = {"step": s + 1, "length": l, "loss": window["loss"] / window["n"],
                 "lm_loss": window["lm"] / window["n"], "answer_token_acc":
                 window["acc"] / window["n"], "tokens_per_s": window["tokens"] / dt, "lr": lr_at(cfg, s, progress_now()),
                 "grad_norm": float(m["grad_norm"]), "tokens": tokens_seen, "time_s": clock(),
                 "data_wait": window["wait"] / dt}
        history.append(entry)
        log(f"step {s + 1:5d} | L={l:5d} B={cfg.batch_size(l):3d} | loss {entry['loss']:.4f} | "
            f"lm {entry['lm_loss']:.3f} | "
            f"ans-acc {entry['answer_token_acc']:.3f} | {entry['tokens_per_s'] / 1e3:7.1f}k tok/s | "
            f"lr {entry['lr']:.2e} | gnorm {entry['grad_norm']:.2f} | data-wait {100 * entry['data_wait']:.0f}%")
        window.update(loss=0.0, acc=0.0, lm=0.0, n=0, tokens=0, wait=0.0, t=time.monotonic())

  try:
    while True:
      progress = progress_now()
      if cfg.max_steps and step >= cfg.max_steps:
        stop_reason = "max_steps"
        break
      if not cfg.max_steps and clock() + step_time[length] * 1.5 >= deadline:
        break
      while phase < schedule.phase(progress, gate_em if use_gate else acc_ema):
        nxt = curriculum[phase + 1][0]
        if compiler.failed(("train", nxt)):
          log(f"skipping phase L={nxt}: it did not compile")
          schedule.drop(phase + 1)
          continue
        fn = compiler.get(("train", nxt), block=bool(cfg.max_steps))
        if fn is None:
          break  # not compiled yet: keep training the current length
        drain(0)
        # A new shape may still fail when it first runs (e.g. out of memory): keep a host copy of
        # the state so its first steps can be undone and the previous length resumed.
        snapshot = (jax.device_get(state), length, compiled)
        probation = 2
        loader.drop(length)
        phase += 1
        length, compiled = nxt, fn
        loader.prime(length)
        log(f"phase {phase}: length {length}, batch {cfg.batch_size(length)} (progress {progress:.2f}, "
            f"answer-token acc {acc_ema:.2f}" + (f", gate exact match {gate_em:.2f})" if use_gate else ")"))
        gate_em = 0.0  # the next gate needs its own measurement
      t_wait = time.monotonic()
      batch = loader.next(length)
      window["wait"] += time.monotonic() - t_wait
      samples_seen.update(batch.pop("samples"))
      errors += batch.pop("errors")
      n_ans = int(batch["w"].sum())
      t0 = time.monotonic()
      lr = np.float32(lr_at(cfg, step, progress))
      try:
        state, metrics = compiled(state, jax.device_put(batch), lr)
        inflight.append((step, metrics, batch["tokens"].size, n_ans, length, t0))
        if probation:
          drain(0)
      except Exception as e:
        if not probation or snapshot is None:
          raise
        host_state, prev_length, prev_compiled = snapshot
        log(f"WARNING: the first steps at length {length} failed ({type(e).__name__}: {e}); "
            f"resuming length {prev_length}")
        state = jax.device_put(host_state)
        inflight.clear()
        loader.drop(length)
        schedule.drop(phase)
        phase -= 1
        length, compiled = prev_length, prev_compiled
        snapshot, probation = None, 0
        continue
      if probation:
        probation -= 1
        if not probation:
          snapshot = None
      tokens_seen += batch["tokens"].size
      step += 1
      drain(2)
      # Rolling per-length step time (dispatch-to-dispatch with 2 steps in flight ~ device time).
      step_time[length] = 0.8 * step_time[length] + 0.2 * (time.monotonic() - t0) if step_time[length] else (
          time.monotonic() - t0)
      if (use_gate and schedule.gated(phase) and schedule.current == phase and step % cfg.gate_every == 0
          and length in gate_jobs and ("eval", length) in compiler.done):
        fn = compiler.get(("eval", length), block=bool(cfg.max_steps))
        if fn is not None:
          drain(0)
          try:
            result = run_eval(fn, state["params"], get_gate_data(length), cfg.batch_size(length))
            gate_em = float(np.mean(list(result.values())))
            gates.append({"step": step, "time_s": clock(), "length": length, "exact_match": gate_em,
                          "tasks": result})
            log(f"gate @ step {step} (L={length}): exact match {gate_em:.3f} {json.dumps(result)}")
          except Exception as e:  # a broken gate must not end training: the schedule falls back to time
            log(f"gate eval failed ({type(e).__name__}: {e}); the curriculum follows time only")
            use_gate = False
            schedule.gate_phase = -1
      now = clock()
      if now - last_eval >= cfg.eval_every_s:
        drain(0)
        try:
          result = evaluate(state["params"], limit=max(1, cfg.eval_samples // 2))
        except Exception as e:  # a broken eval must not end training
          result = {}
          log(f"eval failed: {type(e).__name__}: {e}")
        if result:
          evals.append({"step": step, "time_s": clock(), "accuracy": result})
          log(f"eval @ step {step}: {json.dumps(result)}")
        last_eval = clock()
      if now - last_save >= cfg.save_every_s:
        drain(0)
        record.update(steps=step, tokens=tokens_seen, answer_tokens=answer_tokens, samples=dict(samples_seen))
        save(jax.device_get(state["params"]))
        last_save = clock()
    drain(0)
  except Exception as e:  # keep what was trained: evaluate and save below when the state survived
    log(f"TRAINING STOPPED by {type(e).__name__}: {e}\n{traceback.format_exc()}")
    stop_reason = f"error: {type(e).__name__}: {e}"
    if isinstance(e, FloatingPointError):
      diverged = True
  train_time = clock() - t_start
  record.update(steps=step, tokens=tokens_seen, answer_tokens=answer_tokens, samples=dict(samples_seen),
                sample_errors=errors, train_time_s=train_time, stop_reason=stop_reason,
                tokens_per_s=tokens_seen / max(train_time, 1e-6), final_length=length)
  log(f"trained {step} steps, {tokens_seen / 1e6:.1f}M tokens in {train_time:.0f}s "
      f"({tokens_seen / max(train_time, 1e-6) / 1e3:.0f}k tok/s); stop: {stop_reason}")
  try:
    if diverged:
      raise FloatingPointError("the parameters diverged")
    params_host = jax.device_get(state["params"])
  except Exception as e:
    log(f"parameters unusable after the error ({e}); the last periodic checkpoint stands")
    if saver is not None:
      saver.join()
    record["console"] = list(log.lines)
    _write_json(os.path.join(cfg.output_dir, "training_log.json"), _jsonable(record))
    if pool is not None:
      pool.terminate()
    return record
  final = {}
  try:
    final = evaluate(state["params"], block=True)
  except Exception as e:
    log(f"final eval failed: {type(e).__name__}: {e}")
  record["final_eval"] = final
  log(f"final eval (teacher-forced greedy exact match, {cfg.eval_samples}/task): {json.dumps(final)}")
  save(params_host, final=True)
  if pool is not None:
    pool.terminate()
  summary = {"steps": step, "tokens": tokens_seen, "train_time_s": round(train_time, 1),
             "tokens_per_s": round(tokens_seen / max(train_time, 1e-6)), "final_eval": final,
             "output_dir": cfg.output_dir, "elapsed_s": round(clock(), 1)}
  print(json.dumps(summary), flush=True)
  return record


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


# -- CLI -------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags (defined only when run as a program, so importing this module in data workers
  or tests never registers them twice)."""
  flags.DEFINE_string("output_dir", None, "Checkpoint directory (HF format).")
  flags.DEFINE_integer("seed", 0, "Seed of initialisation and training data.")
  flags.DEFINE_float("time_budget_s", 500.0, "Wall-clock budget from process start; stops training in time to "
                     "evaluate and save before it.")
  flags.DEFINE_float("reserve_s", 30.0, "Seconds kept for the final evaluation and save.")
  flags.DEFINE_integer("max_steps", 0, "If > 0: train this many steps (step-based schedule) instead of by time.")
  flags.DEFINE_bool("smoke", False, "Tiny model and lengths, 20 steps, CPU-friendly: exercises the whole pipeline.")
  flags.DEFINE_integer("tokens_per_step", 65536, "Tokens per optimizer step at every length.")
  flags.DEFINE_string("curriculum", format_curriculum(DEFAULT_CURRICULUM),
                      "length:fraction_of_training_time[:tokens_per_step] per phase, shortest first.")
  flags.DEFINE_string("mixture", ",".join(f"{t}:{w}" for t, w in DEFAULT_MIXTURE), "task:weight of training samples.")
  flags.DEFINE_float("lr", 1.5e-3, "Peak learning rate.")
  flags.DEFINE_integer("warmup_steps", 150, "Linear warmup steps.")
  flags.DEFINE_string("compute_dtype", "auto", "auto (bf16 on GPU, f32 on CPU), bfloat16 or float32.")
  flags.DEFINE_string("attention", "auto", "auto (cuDNN flash attention when it works), cudnn, or xla.")
  flags.DEFINE_integer("num_workers", -1, "Data worker processes (-1: cores - 3, 0: inline).")
  flags.DEFINE_string("eval_lengths", "4096,16384,32768", "Context lengths of the quick evaluation.")
  flags.DEFINE_integer("eval_samples", 8, "Samples per task and length in the quick evaluation.")
  flags.DEFINE_float("eval_every_s", 120.0, "Seconds between evaluations during training.")
  flags.DEFINE_float("save_every_s", 120.0, "Seconds between checkpoints.")
  flags.DEFINE_integer("max_shard_bytes", 15_000_000, "Shard the safetensors above this size.")
  flags.DEFINE_integer("hidden_size", 512, "Model width.")
  flags.DEFINE_integer("intermediate_size", 1024, "MLP width.")
  flags.DEFINE_integer("num_layers", 4, "Decoder layers.")
  flags.DEFINE_integer("num_heads", 8, "Attention (query) heads.")
  flags.DEFINE_integer("num_kv_heads", 4, "KV heads (GQA groups).")
  flags.DEFINE_integer("head_dim", 64, "Per-head width.")
  flags.DEFINE_float("rope_theta", 500000.0, "RoPE base.")
  flags.DEFINE_float("gate_answer_acc", 0.7, "With --gate_exact_match=0: stay at phases <= --gate_phase until the "
                     "answer-token accuracy reaches this (or --gate_max_progress); 0 disables that gate.")
  flags.DEFINE_float("gate_exact_match", 0.9, "Stay at phases <= --gate_phase until the teacher-forced exact match "
                     "on held-out samples of --gate_tasks at that phase's length reaches this (or "
                     "--gate_max_progress); 0 falls back to --gate_answer_acc.")
  flags.DEFINE_integer("gate_phase", 0, "Curriculum phase the gate holds training at (-1: no gate).")
  flags.DEFINE_float("gate_max_progress", 0.5, "Fraction of the training time after which the gate opens anyway.")
  flags.DEFINE_integer("gate_every", 50, "Steps between gate measurements.")
  flags.DEFINE_string("gate_tasks", ",".join(tasks.NEEDLE_TASKS), "Tasks the gate measures.")
  flags.DEFINE_float("min_lr_ratio", 0.1, "Final learning rate as a fraction of --lr (cosine decay).")
  flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
  flags.DEFINE_float("lm_loss_weight", 0.1, "Weight of the auxiliary next-token loss on all tokens.")
  flags.DEFINE_string("warmup_mixture", "", "task:weight mixture of the first curriculum phase (empty: --mixture), "
                      "e.g. niah_single:1, on which the retrieval circuits form fastest.")
  flags.DEFINE_multi_string("phase_mixture", [], "PHASE=task:weight,... : the task mixture of curriculum phase "
                            "PHASE (0-based), e.g. 1=niah_multikey:0.6,kv_lookup:0.25,niah_single:0.15.")
  flags.DEFINE_integer("pack_min_length", 0, "Rows shorter than this hold one sample each; longer rows are packed.")


def _pairs(text: str, cast) -> tuple:
  out = []
  for item in text.split(","):
    key, sep, value = item.strip().partition(":")
    if not sep:
      raise ValueError(f"expected key:value in {text!r}, got {item!r}")
    out.append((cast(key), float(value)))
  return tuple(out)


def parse_curriculum(text: str) -> tuple:
  """"512:0.2:16384,2048:0.3" -> ((512, 0.2, 16384), (2048, 0.3)): length:fraction[:tokens_per_step]."""
  out = []
  for item in text.split(","):
    parts = item.strip().split(":")
    if len(parts) not in (2, 3):
      raise ValueError(f"expected length:fraction[:tokens_per_step] in {text!r}, got {item!r}")
    entry = (int(parts[0]), float(parts[1])) + ((int(parts[2]),) if len(parts) == 3 else ())
    out.append(entry)
  return tuple(out)


def format_curriculum(curriculum) -> str:
  return ",".join(":".join(str(x) for x in e) for e in curriculum)


def config_from_flags() -> TrainConfig:
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required")
  if FLAGS.smoke:
    return smoke_config(FLAGS.output_dir, seed=FLAGS.seed)
  shape = ModelShape(hidden_size=FLAGS.hidden_size, intermediate_size=FLAGS.intermediate_size,
                     num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads, num_kv_heads=FLAGS.num_kv_heads,
                     head_dim=FLAGS.head_dim, rope_theta=FLAGS.rope_theta)
  return TrainConfig(
      output_dir=FLAGS.output_dir, seed=FLAGS.seed, time_budget_s=FLAGS.time_budget_s, reserve_s=FLAGS.reserve_s,
      max_steps=FLAGS.max_steps, model=shape, tokens_per_step=FLAGS.tokens_per_step,
      curriculum=parse_curriculum(FLAGS.curriculum), mixture=_pairs(FLAGS.mixture, str), lr=FLAGS.lr,
      warmup_steps=FLAGS.warmup_steps, compute_dtype=FLAGS.compute_dtype, attention=FLAGS.attention,
      num_workers=FLAGS.num_workers, eval_lengths=tuple(int(x) for x in FLAGS.eval_lengths.split(",") if x),
      eval_samples=FLAGS.eval_samples, eval_every_s=FLAGS.eval_every_s, save_every_s=FLAGS.save_every_s,
      max_shard_bytes=FLAGS.max_shard_bytes, gate_answer_acc=FLAGS.gate_answer_acc,
      gate_exact_match=FLAGS.gate_exact_match, gate_phase=FLAGS.gate_phase, gate_max_progress=FLAGS.gate_max_progress,
      gate_every=FLAGS.gate_every, gate_tasks=tuple(t for t in FLAGS.gate_tasks.split(",") if t),
      min_lr_ratio=FLAGS.min_lr_ratio, weight_decay=FLAGS.weight_decay, lm_loss_weight=FLAGS.lm_loss_weight,
      warmup_mixture=_pairs(FLAGS.warmup_mixture, str) if FLAGS.warmup_mixture else (),
      pack_min_length=FLAGS.pack_min_length, phase_mixtures=tuple(_phase_mixture(t) for t in FLAGS.phase_mixture))


def _phase_mixture(text: str) -> tuple:
  index, sep, mix = text.partition("=")
  if not sep or not index.strip().isdigit():
    raise ValueError(f"--phase_mixture expects PHASE=task:weight,..., got {text!r}")
  return int(index), _pairs(mix, str)


def main(argv):
  del argv
  train(config_from_flags())


if __name__ == "__main__":
  from sparse_jax.cli import run_tool
  run_tool("train")
