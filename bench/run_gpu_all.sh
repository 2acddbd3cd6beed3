#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md and EVAL.md, topic by topic, each with its peers,
# after the on-GPU correctness checks of the kernels. About 75 minutes on one H100 (plus the
# tensor-parallel topic, about 8 minutes, when two GPUs are visible).
#
#   bash bench/run_gpu_all.sh RESULTS_DIR [TOPIC...]
#
# TOPIC: check kernels dsa decode prefill serving eval tp (default: all of them, in this order).
# Each topic writes its JSON and logs to RESULTS_DIR/<topic>/ and its console to
# RESULTS_DIR/<topic>.log; RESULTS_DIR/summary.txt lists each topic's exit status and seconds.
# `check` (bench/check_kernels_gpu.py: every Pallas kernel against its reference on the GPU:
# paged decode, compaction, RocketKV scoring and the fused RocketKV step, the DSA kernels, dense
# MLA decode, the chunk attention merge; the engine's greedy tokens per algorithm, Pallas vs
# reference, in float32; then the chunk attention's cuDNN paths and the kernel test files, which
# run the compiled kernels there) runs first; if it fails nothing else runs, because timings of a
# kernel that is wrong on the GPU are not results (KEEP_GOING=1 runs the rest anyway). SMOKE=1
# makes every topic a tiny CPU dry run.
set -u
if [ $# -lt 1 ]; then
  echo "usage: bash bench/run_gpu_all.sh RESULTS_DIR [check kernels dsa decode prefill serving eval tp]" >&2
  exit 2
fi
RESULTS=$(mkdir -p "$1" && cd "$1" && pwd); shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ALL=(check kernels dsa decode prefill serving eval tp)
TOPICS=("$@")
[ ${#TOPICS[@]} -gt 0 ] || TOPICS=("${ALL[@]}")
for t in "${TOPICS[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "unknown topic '$t': use ${ALL[*]}" >&2; exit 2; }
done
SM=(); [ "${SMOKE:-0}" = "1" ] && SM=(--smoke)
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -n 1; date -u; } \
  | tee "$RESULTS/environment.txt"
: > "$RESULTS/summary.txt"

topic() {  # topic NAME COMMAND...: OUT=RESULTS/NAME, console to RESULTS/NAME.log
  local name=$1; shift
  local t0=$SECONDS
  mkdir -p "$RESULTS/$name"
  echo "######## $name: $*"
  OUT="$RESULTS/$name" "$@" > "$RESULTS/$name.log" 2>&1
  local r=$?
  tail -n 25 "$RESULTS/$name.log"
  echo "$name exit $r after $((SECONDS - t0))s" | tee -a "$RESULTS/summary.txt"
  return $r
}

checks() {  # the correctness checks alone, each kernel against its reference on this device
  local rc=0
  python3 -m bench.check_kernels_gpu "${SM[@]}" || rc=1
  if [ "${SMOKE:-0}" != "1" ]; then
    python3 -m bench.check_chunk_attention_gpu || rc=1
    # The kernel test files: on a GPU they run the compiled kernels (tests/kernel_platform.py).
    python3 -m pytest -q -p no:cacheprovider tests/test_kernel_*.py || rc=1
  fi
  return $rc
}

for t in "${TOPICS[@]}"; do
  case "$t" in
    check)
      if ! topic check checks && [ "${KEEP_GOING:-0}" != "1" ]; then
        echo "correctness checks failed: no timings taken (see $RESULTS/check.log)" | tee -a "$RESULTS/summary.txt"
        exit 1
      fi ;;
    kernels) topic kernels bash bench/run_kernels_gpu.sh ;;
    dsa)     topic dsa bash bench/run_dsa_gpu.sh ;;
    decode)  topic decode bash bench/run_decode_gpu.sh all ;;
    prefill) topic prefill bash bench/run_prefill_gpu.sh all ;;
    serving)
      for stage in short long 128k http; do topic "serving_$stage" bash bench/run_serving_gpu.sh "$stage"; done ;;
    eval)
      for stage in grid indexer chunked; do topic "eval_$stage" bash bench/run_eval_gpu.sh "$stage"; done ;;
    tp)
      if [ "${GPUS:-0}" -ge 2 ] || [ "${SMOKE:-0}" = "1" ]; then
        topic tp bash bench/run_tp_gpu.sh
      else
        echo "tp skipped: needs two GPUs" | tee -a "$RESULTS/summary.txt"
      fi ;;
  esac
done
cat "$RESULTS/summary.txt"
