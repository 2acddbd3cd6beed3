"""Trains the project's default model: a small Llama (GQA) for long-context retrieval.

    python -m sparse_jax.train --output_dir=DIR [--time_budget_s=500] [--seed=0] [--smoke]

The model learns RULER-style tasks (`sparse_jax.tasks`, train split only) plus `kv_lookup`
(many facts, several questions per sample), with a curriculum over context lengths; the loss
is on answer tokens (and the EOS after each final answer), plus a small auxiliary next-token
loss on every token (--lm_loss_weight). It writes a Hugging Face checkpoint to --output_dir
(config.json, bf16 safetensors, sharded above --max_shard_bytes, tokenizer.json,
tokenizer_config.json, generation_config.json, training_log.json) every --save_every_s and at
the end, so a killed run still leaves a usable model.

Modules: `config` (TrainConfig, ModelShape, the flags derived from their fields), `data`
(packed rows, worker processes, the batch loader), `curriculum` (learning rate, phase
schedule), `steps` (model, loss, compiled steps), `checkpoint` (Hugging Face files), `loop`
(the run).

Budget, and why these defaults (one H100, ~7.5 minutes of training inside a 530 s budget):
  Model: 4 layers, hidden 512, 8 query / 4 KV heads of 64, MLP 1024, vocab 4096, untied:
  13.6M parameters, 27 MB in bf16. FLOPs per trained token: 6 x 9.4M (layer matmuls) + 6 x
  2.1M (lm_head: answer slots + the auxiliary LM loss on every token) ~= 69M, plus attention
  3.5 (forward + flash backward) x 4 layers x 2 x T x 512 (QK^T and PV over T/2 keys on
  average) = 14.3k x T: 7M at T=512, 29M at 2K, 117M at 8K, 235M at 16K, 470M at 32K. At ~200
  TFLOP/s effective for the small matmuls (d=512; elementwise work is memory-bound) and ~300
  TFLOP/s for cuDNN flash attention (head_dim 64): ~1.5-2.5M tok/s at 512-2K, ~1M at 8K,
  ~0.6-0.9M at 16K, ~0.35-0.5M at 32K, i.e. 300-450M tokens in ~460 s: ~10^5-10^6 short
  samples while the retrieval (induction) circuits form, then a few thousand samples at
  16K-32K to adapt them to long positions (RoPE theta 500000; the last phase trains at 32K
  itself, so the eval lengths are in distribution). Host side: one worker builds ~0.3-0.8M
  tokens/s of samples, so 13 workers keep up. An accuracy gate keeps training at <= 2K until
  the answer tokens are ~70% right (or half the time is gone), since longer contexts only slow
  the formation of retrieval down. Rows are packed (a sample of [L/4, L] tokens, the rest
  filled by more samples, no cross-sample mask), so every phase also keeps training shorter
  contexts. Compiles (one per (batch, length) shape: 5 train + 3 eval) run in a background
  thread while training proceeds on the shapes already compiled.
"""
from __future__ import annotations

from absl import app, flags

from sparse_jax.train.checkpoint import hf_tensors, tokenizer_config, write_static_files, write_weights
from sparse_jax.train.config import (BOS_ID, DEFAULT_CURRICULUM, DEFAULT_MAX_SHARD_BYTES, DEFAULT_MIXTURE, EOS_ID,
                                     PAD_ID, ModelShape, TrainConfig, config_from_flag_values, format_curriculum,
                                     parse_curriculum, parse_phase_mixture, smoke_config)
from sparse_jax.train.curriculum import Schedule, lr_at, phase_at
from sparse_jax.train.data import MIN_SAMPLE_TOKENS, BatchLoader, make_eval_rows, make_row, make_rows
from sparse_jax.train.loop import Compiler, Trainer, train
from sparse_jax.train.steps import build_model, cudnn_attention_works, eval_step, make_optimizer, run_eval, train_step
from sparse_jax.train import config as _config

__all__ = [
    "BOS_ID", "DEFAULT_CURRICULUM", "DEFAULT_MAX_SHARD_BYTES", "DEFAULT_MIXTURE", "EOS_ID", "MIN_SAMPLE_TOKENS",
    "PAD_ID", "BatchLoader", "Compiler", "ModelShape", "Schedule", "TrainConfig", "Trainer", "build_model",
    "config_from_flags", "cudnn_attention_works", "define_flags", "eval_step", "format_curriculum", "hf_tensors",
    "lr_at", "main", "make_eval_rows", "make_optimizer", "make_row", "make_rows", "parse_curriculum",
    "parse_phase_mixture", "phase_at", "run_eval", "smoke_config", "tokenizer_config", "train", "train_step",
    "write_static_files", "write_weights",
]

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags: one per flag field of TrainConfig and ModelShape, plus --output_dir and
  --smoke (defined only when run as a program, so importing this package in data workers or
  tests never registers them twice)."""
  flags.DEFINE_string("output_dir", None, "Checkpoint directory (HF format).")
  flags.DEFINE_bool("smoke", False, "Tiny model and lengths, 20 steps, CPU-friendly: exercises the whole pipeline.")
  _config.define_flags(module_name=__name__)


def config_from_flags() -> TrainConfig:
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required")
  if FLAGS.smoke:
    return smoke_config(FLAGS.output_dir, seed=FLAGS.seed)
  return config_from_flag_values(FLAGS.output_dir, {name: FLAGS[name].value for name in FLAGS})


def main(argv):
  del argv
  train(config_from_flags())
