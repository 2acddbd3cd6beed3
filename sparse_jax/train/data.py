"""Training and evaluation rows built from the task generators (`sparse_jax.tasks`, train
split for training), and the loader that builds batches ahead in worker processes."""
from __future__ import annotations

import collections
import functools
import multiprocessing
import os
import random
from typing import Any, Sequence

import numpy as np

from sparse_jax import tasks
from sparse_jax.train.config import BOS_ID, EOS_ID, PAD_ID, TrainConfig

MIN_SAMPLE_TOKENS = 160


def _train_options(task: str, rng: random.Random, budget: int) -> dict[str, Any]:
  """Training-time variety on top of RULER's defaults (evaluation uses the defaults), with easy
  cases of the multi-hop and aggregation tasks beside RULER's own: one-hop chains, and lists with
  fewer common words (at most one per 64 tokens of the sample: 10 common words in 512 tokens would
  repeat only 3x against the others' 1x), so short samples keep a clear frequency gap, and both of
  RULER's frequency ratios at every length."""
  if task in tasks.NEEDLE_TASKS:
    needle_p = 0.25 if task == "niah_multikey" else 0.08
    return {"haystack": rng.choices(("filler", "noise", "needle"), (0.84 - needle_p, 0.16, needle_p))[0]}
  if task == "variable_tracking":
    return {"haystack": rng.choice(("noise", "filler")), "num_chains": rng.choice((1, 1, 2)),
            "num_hops": rng.choice((1, 2, 3, 4, 4, 4, 5))}
  if task == "common_words":
    cap = max(1, min(10, budget // 64))
    opts = {"num_cw": 10 if cap == 10 and rng.random() < 0.5 else rng.randint(1, cap)}
    # Half the time RULER's long-context ratio (up to 30x against 3x; below 4K tokens RULER's
    # defaults are 6x against 1x) where the common words can fill at most half of the sample.
    freq_cw = min(30, budget // (12 * opts["num_cw"]))
    if freq_cw >= 9 and rng.random() < 0.5:
      opts.update(freq_cw=freq_cw, freq_ucw=3)
    return opts
  if task == "kv_lookup":
    return {"num_turns": rng.randint(1, 8), "haystack": rng.choice(("filler", "filler", "noise"))}
  return {}


def _build_sample(counter: tasks.TokenCounter, task: str, budget: int, seed: int, rng: random.Random):
  """(task, built sample) of about `budget` tokens, falling back to a single needle where the
  task does not fit; None where nothing fits."""
  try:
    return task, tasks.build(task, budget, seed, None, split="train", counter=counter, _answer_in_budget=True,
                             **_train_options(task, rng, budget))
  except tasks.TaskError:
    try:
      return "niah_single", tasks.build("niah_single", budget, seed, None, split="train", counter=counter,
                                        _answer_in_budget=True)
    except tasks.TaskError:
      return None


def _sample_sequence(counter: tasks.TokenCounter, built) -> tuple[list[int], list[int]]:
  """(token ids: BOS prompt answer [question answer ...] EOS, indices of the supervised ids)."""
  seq = [BOS_ID] + [i for ids in built.segment_ids for i in ids]
  sup: list[int] = []
  answers = counter.pieces([tasks.answer_text(built.answers)])[0]
  for q_ids, a_ids in [(None, answers)] + list(built.turn_ids):
    if q_ids is not None:
      seq += q_ids
    sup += range(len(seq), len(seq) + len(a_ids))
    seq += a_ids
  sup.append(len(seq))
  seq.append(EOS_ID)
  return seq, sup


def make_row(counter: tasks.TokenCounter, length: int, slots: int, seed: int,
             mixture: Sequence[tuple[str, float]],
             pack: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
  """One packed training row.

  Returns tokens int32[length] (BOS sample ... EOS BOS sample ... EOS PAD...), and per
  supervised token (at most `slots`): pos int32[slots] (the position whose output predicts it),
  tgt int32[slots], w float32[slots] (1 for real slots, 0 for padding); and stats
  {"samples": {task: count}}. The first sample spans [length/4, length] tokens (half the time
  the whole row); later samples fill what is left. pack=False: one sample filling the row (no
  earlier sample's needles in its context: the plain retrieval the circuits first form on).
  """
  rng = random.Random(seed)
  names = [t for t, _ in mixture]
  weights = [w for _, w in mixture]
  tokens: list[int] = []
  pos: list[int] = []
  tgt: list[int] = []
  samples: collections.Counter = collections.Counter()
  k = 0
  while length - len(tokens) >= MIN_SAMPLE_TOKENS and (pack or not tokens):
    remaining = length - len(tokens)
    target = rng.randint(remaining // 4, remaining) if not tokens and pack and rng.random() < 0.5 else remaining
    # tasks.build fits prompt + answers into its budget; the EOS after the last answer takes one more.
    picked = _build_sample(counter, rng.choices(names, weights)[0], target - 1,
                           tasks.split_seed("train", seed, k, "sample"), rng)
    k += 1
    if picked is None:
      break
    task, built = picked
    seq, sup = _sample_sequence(counter, built)
    if len(seq) > remaining or len(pos) + len(sup) > slots:
      break
    base = len(tokens)
    pos += [base + i - 1 for i in sup]
    tgt += [seq[i] for i in sup]
    tokens += seq
    samples[task] += 1
  n = len(pos)
  out_tokens = np.full(length, PAD_ID, np.int32)
  out_tokens[:len(tokens)] = tokens
  out_pos = np.zeros(slots, np.int32)
  out_tgt = np.zeros(slots, np.int32)
  out_w = np.zeros(slots, np.float32)
  out_pos[:n], out_tgt[:n], out_w[:n] = pos, tgt, 1.0
  return out_tokens, out_pos, out_tgt, out_w, {"samples": dict(samples)}


def make_rows(counter, length: int, slots: int, seeds: Sequence[int], mixture, pack: bool = True) -> dict[str, Any]:
  rows = [make_row(counter, length, slots, s, mixture, pack) for s in seeds]
  samples = collections.Counter()
  for r in rows:
    samples.update(r[4]["samples"])
  return {"tokens": np.stack([r[0] for r in rows]), "pos": np.stack([r[1] for r in rows]),
          "tgt": np.stack([r[2] for r in rows]), "w": np.stack([r[3] for r in rows]), "samples": dict(samples)}


def make_eval_rows(counter, task: str, length: int, slots: int, num: int, seed: int, split: str = "eval",
                   salt_prefix: str = "") -> dict[str, Any]:
  """`num` samples of `task` (prompt <= length - 64 tokens), one per row, laid out like training
  rows; `answer_mask` marks answer slots (EOS excluded) for exact-match scoring. The curriculum
  gate uses split="train" with its own salt_prefix: held-out samples no training row contains.
  Raises tasks.TaskError when a sample does not fit."""
  salt = f"{salt_prefix}{task}:{length}"
  rows, masks = [], []
  for i in range(num):
    built = tasks.build(task, length - 64, tasks.split_seed(split, seed, i, salt), None, split=split, counter=counter)
    seq = [BOS_ID] + [t for ids in built.segment_ids for t in ids]
    ans = counter.pieces([tasks.answer_text(built.answers)])[0]
    if len(seq) + len(ans) + 1 > length or len(ans) + 1 > slots:
      raise tasks.TaskError(f"eval sample {task}@{length} does not fit: {len(seq)} + {len(ans)} answer tokens")
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


# -- worker processes ---------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_json: str) -> None:
  from tokenizers import Tokenizer
  _WORKER["counter"] = tasks.TokenCounter(Tokenizer.from_str(tokenizer_json))


def _worker_rows(length, slots, seeds, mixture, pack=True):
  return make_rows(_WORKER["counter"], length, slots, seeds, mixture, pack)


def _worker_eval(task, length, slots, num, seed, split="eval", salt_prefix=""):
  return make_eval_rows(_WORKER["counter"], task, length, slots, num, seed, split, salt_prefix)


def start_pool(num_workers: int, tokenizer_json: str):
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


def submit_eval_rows(pool, counter, *args):
  """make_eval_rows(counter, *args) on a worker of `pool` (or inline without one); call the
  result to get the rows."""
  if pool is None:
    return functools.partial(make_eval_rows, counter, *args)
  return functools.partial(pool.apply_async(_worker_eval, args).get, 120)


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
    return out
