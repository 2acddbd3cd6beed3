"""Distils lightning indexers (sparse_jax/algorithms/indexer.py) onto a frozen GQA model.

    python -m sparse_jax.distill --model=CHECKPOINT_DIR                     # task generator data
    python -m sparse_jax.distill --model=CHECKPOINT_DIR --text_files='corpus/*.txt' \
        --seq_len=4096 --min_seq_len=1024                                 # the user's own text
    python -m sparse_jax.distill --model=random --output=/tmp/indexer.safetensors   # tiny random model

The indexer weights are written next to the model (CHECKPOINT_DIR/indexer.safetensors, or
--output), with an options YAML beside them (indexer.yaml: `algorithm: indexer`, the weights
path relative to it, the geometry trained) that serves the model with the indexer:

    sparse-jax serve --model=CHECKPOINT_DIR --extra_llm_api_options=CHECKPOINT_DIR/indexer.yaml

DeepSeek-V3.2's dense warm-up stage: the model is frozen and runs dense attention; only the
indexers train, one per layer, to minimise, for every query t and KV head g,

    KL( p_g[t, :] || softmax_s(I_g[t, :]) )

where p_g[t, :] is the layer's causal dense attention distribution summed over g's group of
query heads and renormalised (i.e. averaged), and I_g the indexer's scores (indexer.py). The
loss is averaged over queries, KV heads and layers; optax Adam with warmup + cosine decay and
global-norm clipping.

Decode loss (`--decode_weight`, `--decode_queries`): what decoding needs is the top blocks of
the *last* queries (the one that starts the answer, and its neighbours), not the average
prompt query. For the last `decode_queries` valid queries of every row, the oracle's top
`--topk` blocks of `--block_size` tokens (by true attention mass, as `block_recall` ranks
them) are the targets of a multi-label cross-entropy over the indexer's block scores (block
logsumexp, what serving ranks by):

    L_dec = - mean_{t, g} (1 / |top_k|) sum_{b in top_k(t, g)} log softmax_b(lse_b I_g[t, :])

added to the KL with weight decode_weight (0 = KL only).

Data (`--data`): `tasks` (default with a tokenizer): samples of the project's task generators
(`sparse_jax.tasks`, RULER tasks + kv_lookup) from the *train* split; held-out recall on the
eval split. `text` (default when --text_files is given): windows of the user's UTF-8 text files
(comma list of paths or globs), tokenized once; the last tenth of every file is held out for
the recall. `random`: uniformly random tokens (the default without a tokenizer).

Length and position randomisation (`--min_seq_len` < `--seq_len`): every row's length is drawn
uniformly from [min_seq_len, seq_len] (rows right padded), so one run sees short and long
contexts; task samples are generated at that length (their needles at the generator's random
depths), text windows start at a random token. RoPE scores depend on relative positions only,
so random absolute offsets would not change what the indexer sees; placement does.

Recall: on held-out sequences, for every query t in [seq_len // 2, length), the blocks of
`--block_size` tokens the indexer ranks in its top `--topk` (by block logsumexp of I, the
newest block always included) against the oracle's (by true block attention mass, the
newest block always included: `oracle.select_topk_blocks`); `selection_recall` averaged
over queries, KV heads and layers. The CLI shows a progress bar with the running loss, and
prints the recall before and after training next to the recency baseline (the newest `topk`
blocks); `--eval_seq_lens=1024,4096,...` adds the same measurement per context length (held-out
rows of exactly that length, which may exceed what was trained on).

`--model=random` builds a tiny Llama (2 layers, hidden 64, 4 query / 2 KV heads of 16,
vocab 256) whose q/k projections are scaled by `--random_qk_gain`: at the usual 0.02
initialisation a random model attends almost uniformly, and the top-k of a uniform
distribution is noise that no predictor can (or needs to) learn.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pallas_kernels.common import MASK_VALUE
from sparse_jax.algorithms.indexer import (IndexerSparseAttentionConfig, LightningIndexer, block_logsumexp,
                                           index_scores, init_indexers, save_indexers)
from sparse_jax.algorithms.oracle import block_sum, select_topk_blocks, selection_recall
from sparse_jax.attention import causal_attention

Batch = tuple[np.ndarray, np.ndarray]  # tokens int32[B, T], lengths int32[B]


# -- teacher: the frozen model's layer inputs and dense attention --------------------------

def group_attention(q: jax.Array, k: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
  """Causal dense attention averaged over each KV head's query group.

  q: [B, T, q_heads, D], k: [B, T, kv_heads, D] (roped); lengths: int32[B].
  Returns float32[B, kv_heads, T(query), T(key)], 0 for keys after the query or past lengths.
  """
  b, t, q_heads, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, q_heads // kv_heads, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  mask = _causal_mask(t, lengths)[:, None, None]  # [B, 1, 1, T, T]
  probs = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  return jnp.where(mask, probs, 0.0).mean(axis=2)


def _causal_mask(t: int, lengths: jax.Array) -> jax.Array:
  """bool[B, T, T]: key s visible to query t (s <= t and s < length)."""
  pos = jnp.arange(t)
  return (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])


def teacher(model: nnx.Module, tokens: jax.Array, lengths: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
  """Runs the frozen model densely. Per layer: (its attention input x [B, T, hidden], the
  group-averaged dense attention p [B, kv_heads, T, T]). Llama-family models (models/llama.py)."""
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  h = model.embed_tokens(tokens)
  out = []
  for layer in model.layers:
    def attend(attn, x):
      q, k, v = attn.project(x, pos)
      out.append((x, group_attention(q, k, lengths, attn.scale)))
      return attn.output(causal_attention(q, k, v, lengths, attn.scale))
    h = layer(h, attend)
  return out


# -- student: index scores, loss, recall ------------------------------------------------------

def index_logits(indexer: LightningIndexer, x: jax.Array) -> jax.Array:
  """I[b, g, t, s] for every query and key of a sequence (unmasked): float32[B, kv_heads, T, T]."""
  b, t, _ = x.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  q, w = indexer.queries(x, pos)
  k = indexer.rope_keys(jnp.swapaxes(indexer.keys(x), 1, 2))
  return index_scores(q, w, k)


def kl_loss(logits: jax.Array, p: jax.Array, lengths: jax.Array) -> jax.Array:
  """Mean over valid queries and KV heads of KL(p[t] || softmax(logits[t])) on visible keys.

  logits, p: float32[B, kv_heads, T, T]; lengths: int32[B]."""
  t = p.shape[-1]
  mask = _causal_mask(t, lengths)[:, None]
  log_q = jax.nn.log_softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  kl = jnp.sum(jnp.where(mask & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)
  valid = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, :]  # [B, 1, T]
  return jnp.sum(jnp.where(valid, kl, 0.0)) / (jnp.maximum(jnp.sum(valid), 1) * p.shape[1])


def decode_topblock_loss(logits: jax.Array, p: jax.Array, lengths: jax.Array, *, block_size: int, topk: int,
                         queries: int) -> jax.Array:
  """Multi-label cross-entropy of the index scores' block distribution on the oracle's top-`topk`
  blocks, for the last `queries` valid queries of each row (the decode-like ones).

  logits, p: float32[B, kv_heads, T, T]; lengths: int32[B]. Blocks of `block_size` keys; a block
  counts as a target only if it holds attention mass (short rows have fewer than topk blocks).
  Returns the mean over those queries and KV heads (a scalar).
  """
  t = p.shape[-1]
  q_pos = lengths[:, None] - 1 - jnp.arange(queries)[None, :]  # [B, n]
  ok = q_pos >= 0
  rows = jnp.clip(q_pos, 0)[:, None, :, None]  # [B, 1, n, 1]
  take = lambda a: jnp.take_along_axis(a, rows, axis=2)  # [B, g, n, T]
  visible = jnp.arange(t)[None, None, None, :] <= jnp.clip(q_pos, 0)[:, None, :, None]
  scores = block_logsumexp(jnp.where(visible, take(logits), -jnp.inf), block_size)  # [B, g, n, nb]
  mass = block_sum(take(p), block_size)
  k = min(topk, mass.shape[-1])
  top_mass, top_idx = jax.lax.top_k(mass, k)
  target = (top_mass > 0).astype(jnp.float32)
  log_q = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), top_idx, axis=-1)
  per_query = -jnp.sum(jnp.where(target > 0, log_q, 0.0), -1) / jnp.maximum(jnp.sum(target, -1), 1.0)
  weight = jnp.broadcast_to(ok[:, None, :], per_query.shape).astype(jnp.float32)
  return jnp.sum(per_query * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def block_recall(logits: jax.Array, p: jax.Array, lengths: jax.Array, *, block_size: int, topk: int,
                 query_from: int) -> dict[str, jax.Array]:
  """Top-k block recall of the index scores (and of the recency baseline) against the oracle.

  logits, p: float32[B, kv_heads, T, T]; lengths: int32[B]. Queries t in [query_from, length)
  select among the blocks of keys [0, t]. Returns sums and the query-head count:
  {"indexer": sum of recalls, "recency": ..., "count": number of (query, KV head) pairs}.
  """
  b, g, t, _ = p.shape
  tq = t - query_from
  mask = _causal_mask(t, lengths)[:, None, query_from:]  # [B, 1, Tq, T]
  to_rows = lambda s: jnp.swapaxes(s, 1, 2).reshape(b * tq, g, -1)  # [B, g, Tq, nb] -> [B*Tq, g, nb]
  oracle = to_rows(block_sum(p[:, :, query_from:], block_size))
  learned = to_rows(block_logsumexp(jnp.where(mask, logits[:, :, query_from:], -jnp.inf), block_size))
  recency = jnp.broadcast_to(jnp.arange(oracle.shape[-1], dtype=jnp.float32), oracle.shape)
  q_pos = jnp.arange(query_from, t)
  q_len = jnp.broadcast_to(q_pos[None, :] + 1, (b, tq)).reshape(-1)
  weight = (q_pos[None, :] < lengths[:, None]).reshape(-1, 1).astype(jnp.float32)  # [B*Tq, 1]
  ref = select_topk_blocks(oracle, q_len, block_size, topk)
  out = {name: jnp.sum(selection_recall(select_topk_blocks(s, q_len, block_size, topk), ref) * weight)
         for name, s in (("indexer", learned), ("recency", recency))}
  out["count"] = jnp.sum(weight) * g
  return out


# -- training ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """steps / lr / warmup_steps / clip: the optimisation; block_size / topk: the blocks of the
  recall measured (queries from `query_from`, default half the sequence) and of the decode loss
  (weight `decode_weight` on the last `decode_queries` queries of each row; 0 = KL only)."""
  steps: int = 300
  lr: float = 1e-2
  warmup_steps: int = 20
  clip: float = 1.0
  seed: int = 0
  block_size: int = 16
  topk: int = 4
  query_from: int | None = None
  log_every: int = 50
  decode_weight: float = 1.0
  decode_queries: int = 8


class Indexers(nnx.Module):
  """The indexers of every layer (what is trained)."""

  def __init__(self, layers: Sequence[LightningIndexer]):
    self.layers = nnx.List(list(layers))


def _model_geometry(model) -> tuple[int, int, int]:
  cfg = model.config
  return cfg.hidden_size, cfg.num_key_value_heads, cfg.num_hidden_layers


def make_steps(model: nnx.Module, indexers: Sequence[LightningIndexer], dcfg: DistillConfig, *, total_steps: int):
  """Jitted (train_step, eval_step) closures over the frozen model and the optimiser."""
  mgraph, mstate = nnx.split(model)
  igraph, _ = nnx.split(Indexers(indexers))
  schedule = optax.warmup_cosine_decay_schedule(0.0, dcfg.lr, max(1, min(dcfg.warmup_steps, total_steps - 1)),
                                                max(total_steps, 2), end_value=dcfg.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(dcfg.clip), optax.adam(schedule))

  def loss_fn(iparams, layers):
    ixs = nnx.merge(igraph, iparams)
    losses = []
    for ix, (x, p, lens) in zip(ixs.layers, layers):
      logits = index_logits(ix, x)
      loss = kl_loss(logits, p, lens)
      if dcfg.decode_weight:
        loss = loss + dcfg.decode_weight * decode_topblock_loss(
            logits, p, lens, block_size=dcfg.block_size, topk=dcfg.topk, queries=dcfg.decode_queries)
      losses.append(loss)
    return sum(losses) / len(losses)

  def layer_targets(mstate, tokens, lengths):
    m = nnx.merge(mgraph, mstate)
    return [(x, p, lengths) for x, p in jax.lax.stop_gradient(teacher(m, tokens, lengths))]

  @jax.jit
  def train_step(iparams, opt_state, mstate, tokens, lengths):
    loss, grads = jax.value_and_grad(loss_fn)(iparams, layer_targets(mstate, tokens, lengths))
    updates, opt_state = tx.update(grads, opt_state, iparams)
    return optax.apply_updates(iparams, updates), opt_state, loss

  @jax.jit
  def eval_step(iparams, mstate, tokens, lengths):
    ixs = nnx.merge(igraph, iparams)
    query_from = dcfg.query_from if dcfg.query_from is not None else tokens.shape[1] // 2
    sums = {"indexer": 0.0, "recency": 0.0, "count": 0.0, "loss": 0.0}
    per_layer = []
    for ix, (x, p, lens) in zip(ixs.layers, layer_targets(mstate, tokens, lengths)):
      logits = index_logits(ix, x)
      r = block_recall(logits, p, lens, block_size=dcfg.block_size, topk=dcfg.topk, query_from=query_from)
      per_layer.append(r["indexer"] / jnp.maximum(r["count"], 1))
      for key in ("indexer", "recency", "count"):
        sums[key] = sums[key] + r[key]
      sums["loss"] = sums["loss"] + kl_loss(logits, p, lens) / len(ixs.layers)
    return sums, jnp.stack(per_layer)

  return tx, mstate, train_step, eval_step


def evaluate(eval_step, iparams, mstate, batches: Sequence[Batch]) -> dict[str, Any]:
  """Mean recall (indexer, recency baseline, per layer) and KL over held-out batches."""
  tot = {"indexer": 0.0, "recency": 0.0, "count": 0.0, "loss": 0.0}
  per_layer = 0.0
  for tokens, lengths in batches:
    sums, layers = eval_step(iparams, mstate, jnp.asarray(tokens), jnp.asarray(lengths))
    for key in tot:
      tot[key] += float(sums[key])
    per_layer = per_layer + np.asarray(layers)
  count = max(tot["count"], 1.0)
  return dict(recall=tot["indexer"] / count, recency_recall=tot["recency"] / count,
              recall_per_layer=[float(x) for x in np.asarray(per_layer) / len(batches)],
              kl=tot["loss"] / len(batches))


def distill(model: nnx.Module, index_cfg: IndexerSparseAttentionConfig, train_batches: Iterator[Batch],
            eval_batches: Sequence[Batch], dcfg: DistillConfig = DistillConfig(),
            log: Callable[[str], None] | None = print, progress: bool = False,
            eval_sets: Mapping[str, Sequence[Batch]] | None = None) -> tuple[list[LightningIndexer], dict[str, Any]]:
  """Trains fresh indexers (geometry from index_cfg, seed dcfg.seed) on `train_batches` for
  dcfg.steps steps; `progress`: a progress bar on stderr with the running loss (instead of a
  log line every dcfg.log_every steps). Returns (trained indexers, report with recall and KL
  before and after, the loss history and seconds); `eval_sets` (name -> held-out batches, e.g.
  one per context length) are measured before and after as well: report["sets"][name]."""
  hidden, kv_heads, num_layers = _model_geometry(model)
  indexers = init_indexers(index_cfg, hidden_size=hidden, kv_heads=kv_heads, num_layers=num_layers, seed=dcfg.seed)
  tx, mstate, train_step, eval_step = make_steps(model, indexers, dcfg, total_steps=dcfg.steps)
  igraph, iparams = nnx.split(Indexers(indexers))
  opt_state = tx.init(iparams)
  before = evaluate(eval_step, iparams, mstate, eval_batches)
  sets = {name: {"before": evaluate(eval_step, iparams, mstate, batches)} for name, batches in (eval_sets or {}).items()}
  if log:
    log(f"before: recall@{dcfg.topk}x{dcfg.block_size} {before['recall']:.3f} (recency baseline "
        f"{before['recency_recall']:.3f}), KL {before['kl']:.3f}")
  history = []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=dcfg.steps, desc="distill", unit="step", file=sys.stderr)
  start = time.perf_counter()
  for step, (tokens, lengths) in zip(range(dcfg.steps), train_batches):
    iparams, opt_state, loss = train_step(iparams, opt_state, mstate, jnp.asarray(tokens), jnp.asarray(lengths))
    history.append(float(loss))
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{np.mean(history[-dcfg.log_every:]):.4f}")
    elif log and ((step + 1) % dcfg.log_every == 0 or step + 1 == dcfg.steps):
      log(f"step {step + 1}/{dcfg.steps}: loss {np.mean(history[-dcfg.log_every:]):.4f} "
          f"({time.perf_counter() - start:.1f}s)")
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start
  after = evaluate(eval_step, iparams, mstate, eval_batches)
  for name, batches in (eval_sets or {}).items():
    sets[name]["after"] = evaluate(eval_step, iparams, mstate, batches)
  if log:
    log(f"after:  recall@{dcfg.topk}x{dcfg.block_size} {after['recall']:.3f} (recency baseline "
        f"{after['recency_recall']:.3f}), KL {after['kl']:.3f}; per layer "
        f"{[round(r, 3) for r in after['recall_per_layer']]}")
  trained = list(nnx.merge(igraph, iparams).layers)
  return trained, dict(before=before, after=after, sets=sets, history=history, train_seconds=seconds,
                       steps=len(history))


# -- data ---------------------------------------------------------------------------------------

def _row_lengths(rng: np.random.Generator, batch_size: int, seq_len: int, min_seq_len: int | None) -> np.ndarray:
  """Per-row lengths: seq_len, or uniform in [min_seq_len, seq_len] (length randomisation)."""
  if min_seq_len is None or min_seq_len >= seq_len:
    return np.full(batch_size, seq_len, np.int32)
  return rng.integers(min_seq_len, seq_len + 1, size=batch_size).astype(np.int32)


def random_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int,
                   min_seq_len: int | None = None) -> Iterator[Batch]:
  """Endless batches of uniformly random tokens (rows of `_row_lengths`, zero padded)."""
  rng = np.random.default_rng(seed)
  while True:
    lengths = _row_lengths(rng, batch_size, seq_len, min_seq_len)
    tokens = rng.integers(0, vocab_size, size=(batch_size, seq_len)).astype(np.int32)
    yield np.where(np.arange(seq_len)[None, :] < lengths[:, None], tokens, 0).astype(np.int32), lengths


def task_batches(tokenizer, batch_size: int, seq_len: int, seed: int, split: str,
                 min_seq_len: int | None = None) -> Iterator[Batch]:
  """Endless batches of `sparse_jax.tasks` samples of `split` (RULER tasks; + kv_lookup for
  train), each generated at its row's length (`_row_lengths`) and cut to it, right padded."""
  from sparse_jax import tasks
  names = tasks.RULER_TASKS + (tasks.TRAIN_ONLY_TASKS if split == "train" else ())
  counter = tasks.TokenCounter(tokenizer)
  index = itertools.count()
  rng = np.random.default_rng([seed, 1 if split == "train" else 2])
  while True:
    tokens = np.zeros((batch_size, seq_len), np.int32)
    lengths = np.zeros(batch_size, np.int32)
    for row, target in enumerate(_row_lengths(rng, batch_size, seq_len, min_seq_len)):
      i = next(index)
      task = names[i % len(names)]
      sample_seed = tasks.split_seed(split, seed, i, f"distill:{task}:{target}")
      prompt = tasks.generate_sample(task, int(target), sample_seed, tokenizer, split=split, counter=counter)["prompt"]
      ids = counter.prompt_ids(prompt)[:target]
      tokens[row, :len(ids)] = ids
      lengths[row] = len(ids)
    yield tokens, lengths


HELD_OUT_FRACTION = 0.1  # the tail of every text file kept for the held-out recall


def read_text_files(patterns: str | Sequence[str]) -> list[str]:
  """Paths of a comma list (or sequence) of files or globs, sorted and unique; raises
  FileNotFoundError naming a pattern that matches no file."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  paths = []
  for pattern in patterns:
    found = sorted(glob.glob(os.path.expanduser(pattern.strip())))
    found = [f for f in found if os.path.isfile(f)]
    if not found:
      raise FileNotFoundError(f"--text_files: no file matches {pattern!r}")
    paths.extend(found)
  return list(dict.fromkeys(paths))


def text_batches(tokenizer, paths: Sequence[str], batch_size: int, seq_len: int, seed: int, split: str,
                 min_seq_len: int | None = None) -> Iterator[Batch]:
  """Endless batches of windows of the user's text files: each file is tokenized once; "train"
  windows come from the first 90% of its tokens, "eval" windows from the last 10%. A row picks
  a file (in proportion to its tokens), a length (`_row_lengths`) and a random start (shorter
  parts give shorter rows), right padded. Raises ValueError when the files hold no tokens."""
  from sparse_jax import tasks
  counter = tasks.TokenCounter(tokenizer)
  parts = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      ids = np.asarray(counter.prompt_ids(f.read()), np.int32)
    cut = len(ids) - max(1, int(len(ids) * HELD_OUT_FRACTION))
    part = ids[:cut] if split == "train" else ids[cut:]
    if len(part):
      parts.append(part)
  if not parts:
    raise ValueError(f"--text_files: {list(paths)} hold no tokens for the {split} split")
  sizes = np.asarray([len(p) for p in parts], np.float64)
  rng = np.random.default_rng([seed, 1 if split == "train" else 2])
  while True:
    tokens = np.zeros((batch_size, seq_len), np.int32)
    lengths = np.zeros(batch_size, np.int32)
    for row, target in enumerate(_row_lengths(rng, batch_size, seq_len, min_seq_len)):
      part = parts[rng.choice(len(parts), p=sizes / sizes.sum())]
      n = min(int(target), len(part))
      start = int(rng.integers(0, len(part) - n + 1))
      tokens[row, :n] = part[start:start + n]
      lengths[row] = n
    yield tokens, lengths


def random_model(seed: int = 0, *, vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, max_position_embeddings: int = 4096,
                 qk_gain: float = 10.0):
  """A tiny random Llama whose q/k projections are multiplied by `qk_gain` (logits by its
  square), so that its attention is peaked as a trained model's is."""
  from models.llama import LlamaConfig, LlamaForCausalLM
  from sparse_jax.rope import RopeSpec
  cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    head_dim=head_dim, rope=RopeSpec(head_dim, theta=10000.0,
                                                     max_position_embeddings=max_position_embeddings),
                    max_position_embeddings=max_position_embeddings)
  model = LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
  for attn in model.attention_layers():
    attn.q_proj.kernel[...] = attn.q_proj.kernel[...] * qk_gain
    attn.k_proj.kernel[...] = attn.k_proj.kernel[...] * qk_gain
  return model


# -- CLI ------------------------------------------------------------------------------------------

def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("model", None, "HF checkpoint directory, or 'random' for a tiny random model.")
  flags.DEFINE_string("output", None, "Where to write the indexer weights (safetensors); default: "
                      "MODEL/indexer.safetensors. An options YAML using them is written beside (indexer.yaml).")
  flags.DEFINE_integer("steps", 300, "Training steps.")
  flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
  flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (the longest rows).")
  flags.DEFINE_integer("min_seq_len", None, "Shortest rows: each row's length is drawn uniformly from "
                       "[min_seq_len, seq_len] (default: every row seq_len).")
  flags.DEFINE_float("lr", 1e-2, "Peak learning rate (Adam, warmup + cosine).")
  flags.DEFINE_integer("warmup_steps", 20, "Linear warmup steps.")
  flags.DEFINE_integer("seed", 0, "Seed of the indexers' initialisation and of the data.")
  flags.DEFINE_enum("data", "auto", ["auto", "tasks", "text", "random"],
                    "auto: --text_files when given, else the task generators (train split) when the model has a "
                    "tokenizer, else random tokens.")
  flags.DEFINE_string("text_files", None, "Comma list of UTF-8 text files or globs (--data=text); the last tenth of "
                      "each is held out for the recall.")
  flags.DEFINE_float("decode_weight", 1.0, "Weight of the decode loss (the last queries' top blocks); 0 = KL only.")
  flags.DEFINE_integer("decode_queries", 8, "Last queries per row the decode loss covers.")
  flags.DEFINE_integer("eval_batches", 4, "Held-out batches for the recall.")
  flags.DEFINE_list("eval_seq_lens", [], "Context lengths at which the held-out recall is also reported (before and "
                    "after), on --eval_batches single-row batches each; may exceed --seq_len.")
  flags.DEFINE_integer("block_size", 16, "Block size of the recall measurement and the decode loss.")
  flags.DEFINE_integer("topk", 4, "Blocks selected in the recall measurement and targeted by the decode loss.")
  flags.DEFINE_integer("index_heads", 4, "Index query heads per KV head.")
  flags.DEFINE_integer("index_head_dim", 64, "Index query/key width.")
  flags.DEFINE_integer("rope_dim", 32, "Leading index channels rotated by RoPE (even).")
  flags.DEFINE_float("rope_theta", 10000.0, "RoPE base of the indexer.")
  flags.DEFINE_float("random_qk_gain", 10.0, "--model=random: q/k projection gain (peaked attention).")


def write_options_yaml(path: str, weights_path: str, index_cfg: IndexerSparseAttentionConfig) -> None:
  """An options YAML (TensorRT-LLM layout) serving the indexer at `weights_path` (written relative
  to the YAML's folder) with the geometry it was trained with."""
  import yaml
  rel = os.path.relpath(os.path.abspath(weights_path), os.path.dirname(os.path.abspath(path)))
  sparse = {"algorithm": "indexer", "weights_path": rel, "topk": index_cfg.topk, "block_size": index_cfg.block_size,
            "index_heads": index_cfg.index_heads, "index_head_dim": index_cfg.index_head_dim,
            "rope_dim": index_cfg.rope_dim, "rope_theta": index_cfg.rope_theta}
  with open(path, "w") as f:
    f.write("# Written by sparse_jax.distill: serves the model with its distilled lightning indexers.\n"
            "# Use: --extra_llm_api_options=" + os.path.basename(path) + " (weights_path is relative to this file)\n")
    yaml.safe_dump({"sparse_attention_config": sparse}, f, sort_keys=False)


def _data(FLAGS, model, tokenizer) -> tuple[str, tuple[Iterator[Batch], Iterator[Batch]],
                                             Callable[[int], Iterator[Batch]]]:
  """(kind, (train batches, held-out batches), seq_len -> held-out single-row batches of that length)."""
  from absl import app
  data = FLAGS.data
  if data == "auto":
    data = "text" if FLAGS.text_files else ("tasks" if tokenizer is not None else "random")
  if data in ("tasks", "text") and tokenizer is None:
    raise app.UsageError(f"--data={data} needs a tokenizer.json in {FLAGS.model}")
  if data == "text" and not FLAGS.text_files:
    raise app.UsageError("--data=text needs --text_files")
  if FLAGS.min_seq_len is not None and not 1 <= FLAGS.min_seq_len <= FLAGS.seq_len:
    raise app.UsageError(f"--min_seq_len={FLAGS.min_seq_len} must be in [1, --seq_len={FLAGS.seq_len}]")
  args = (FLAGS.batch_size, FLAGS.seq_len, FLAGS.seed)
  if data == "tasks":
    return data, (task_batches(tokenizer, *args, "train", FLAGS.min_seq_len),
                  task_batches(tokenizer, *args, "eval", FLAGS.min_seq_len)), (
                      lambda n: task_batches(tokenizer, 1, n, FLAGS.seed, "eval"))
  if data == "text":
    try:
      paths = read_text_files(FLAGS.text_files)
    except FileNotFoundError as e:
      raise app.UsageError(str(e)) from None
    return data, (text_batches(tokenizer, paths, *args, "train", FLAGS.min_seq_len),
                  text_batches(tokenizer, paths, *args, "eval", FLAGS.min_seq_len)), (
                      lambda n: text_batches(tokenizer, paths, 1, n, FLAGS.seed, "eval"))
  vocab = model.config.vocab_size
  held_seed = FLAGS.seed + 1_000_003
  return data, (random_batches(vocab, *args, FLAGS.min_seq_len),
                random_batches(vocab, FLAGS.batch_size, FLAGS.seq_len, held_seed, FLAGS.min_seq_len)), (
                    lambda n: random_batches(vocab, 1, n, held_seed))


def main(argv) -> None:
  from absl import app, flags
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.model:
    raise app.UsageError("--model is required")
  if FLAGS.model == "random" and not FLAGS.output:
    raise app.UsageError("--model=random needs --output (there is no model directory to write next to)")
  output = FLAGS.output or os.path.join(FLAGS.model, "indexer.safetensors")
  tokenizer = None
  if FLAGS.model == "random":
    model = random_model(FLAGS.seed, qk_gain=FLAGS.random_qk_gain)
  else:
    import models
    model = models.from_pretrained(FLAGS.model, dtype="float32")
    tokenizer = models.load_tokenizer(FLAGS.model)
  try:
    eval_lens = [int(n) for n in FLAGS.eval_seq_lens]
    if any(n < 2 for n in eval_lens):
      raise ValueError
  except ValueError:
    raise app.UsageError(f"--eval_seq_lens={','.join(FLAGS.eval_seq_lens)}: must be integers >= 2") from None
  data, (train, held_out), at_length = _data(FLAGS, model, tokenizer)
  eval_batches = list(itertools.islice(held_out, FLAGS.eval_batches))
  eval_sets = {n: list(itertools.islice(at_length(n), FLAGS.eval_batches)) for n in eval_lens}
  index_cfg = IndexerSparseAttentionConfig(weights_path=output, index_heads=FLAGS.index_heads,
                                           index_head_dim=FLAGS.index_head_dim, rope_dim=FLAGS.rope_dim,
                                           rope_theta=FLAGS.rope_theta)
  dcfg = DistillConfig(steps=FLAGS.steps, lr=FLAGS.lr, warmup_steps=FLAGS.warmup_steps, seed=FLAGS.seed,
                       block_size=FLAGS.block_size, topk=FLAGS.topk, decode_weight=FLAGS.decode_weight,
                       decode_queries=FLAGS.decode_queries)
  lengths = (f"{FLAGS.min_seq_len}-{FLAGS.seq_len}" if FLAGS.min_seq_len and FLAGS.min_seq_len < FLAGS.seq_len
             else str(FLAGS.seq_len))
  print(f"distilling indexers for {FLAGS.model} ({data} data, {FLAGS.steps} steps of {FLAGS.batch_size} x "
        f"{lengths} tokens)", flush=True)
  indexers, report = distill(model, index_cfg, train, eval_batches, dcfg, progress=True, eval_sets=eval_sets)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  save_indexers(output, indexers)
  yaml_path = os.path.join(os.path.dirname(os.path.abspath(output)), "indexer.yaml")
  write_options_yaml(yaml_path, output, index_cfg)
  b, a = report["before"], report["after"]
  print(f"top-{dcfg.topk} recall vs oracle (blocks of {dcfg.block_size}): before {b['recall']:.3f} -> after "
        f"{a['recall']:.3f} (recency baseline {a['recency_recall']:.3f}); {report['steps']} steps in "
        f"{report['train_seconds']:.1f}s")
  for n, r in report["sets"].items():
    print(f"  at {n} tokens: before {r['before']['recall']:.3f} -> after {r['after']['recall']:.3f} "
          f"(recency baseline {r['after']['recency_recall']:.3f})")
  print(f"wrote {output} and {yaml_path}; serve with: --extra_llm_api_options={yaml_path}")


if __name__ == "__main__":
  from sparse_jax.cli import run_tool
  run_tool("distill")
