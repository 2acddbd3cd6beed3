#!/usr/bin/env bash
# Trains the default model (sparse_jax/assets/default_model) on one H100 in one command of at most
# 9.5 minutes wall, jax start-up and compilation included:
#
#   cd <repo> && bash bench/run_train_gpu.sh          # writes $OUT/model (OUT defaults to /tmp/train_out)
#
# The trainer stops training by itself 25 s before --time_budget_s (counted from process start),
# evaluates (teacher-forced greedy exact match, 8 samples per task at 4K/16K/32K) and saves, so the
# process ends about 530 s after it starts. It also saves every 120 s, so a kill leaves a model.
#
# $OUT/model gets exactly 8 files, each under 15 MB (the device tool returns at most 8 files of
# 16 MiB): config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
# model.safetensors.index.json, two bf16 safetensors shards, and training_log.json, which holds
# the whole console log ("console") next to the loss curve ("log") and the evals. Progress also
# streams to stdout (PYTHONUNBUFFERED=1). Nothing else is written under $OUT (a ninth file would
# not come back).
#
# Then: cp $OUT/model/* sparse_jax/assets/default_model/
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/train_out}"
mkdir -p "$OUT/model"
exec python3 -m sparse_jax.train --output_dir="$OUT/model" --time_budget_s=530 --reserve_s=25 --seed=0 \
  --tokens_per_step=65536 --curriculum=512:0.12,2048:0.16,8192:0.2,16384:0.2,32768:0.32 \
  --eval_lengths=4096,16384,32768 --eval_samples=8 --save_every_s=120 --eval_every_s=120 "$@"
