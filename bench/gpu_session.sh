#!/usr/bin/env bash
# Runs one group of GPU measurements and packs logs + JSON into $OUT/<group>.tgz (the device
# tool brings back at most 8 files). Usage (repo root, on the GPU machine):
#   bash bench/gpu_session.sh kernels|step_decode|...
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
group=$1
work=/tmp/sj_$group
mkdir -p "$work"
case "$group" in
  kernels)
    OUT="$work" bash bench/run_kernels_gpu.sh > "$work/run.log" 2>&1 ;;
  step_decode)
    timeout 200 python3 bench/bench_rocket_step.py --out="$work/rocket_step.json" > "$work/rocket_step.log" 2>&1
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      timeout 330 python3 bench/bench_decode.py --out="$work/decode.json" \
      > "$work/decode.log" 2>&1 ;;
  decode8b)
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      timeout "${LIMIT:-240}" python3 bench/bench_decode.py --iters=10 \
      --out="$work/decode.json" > "$work/decode.log" 2>&1 ;;
  eval)
    timeout "${LIMIT:-420}" python3 bench/eval_suite.py --backend=pallas --time_budget_s="${BUDGET:-330}" \
      --out="$work/eval.json" > "$work/eval.log" 2>&1 ;;
  *)
    echo "unknown group $group" >&2; exit 2 ;;
esac
for f in "$work"/*.log; do echo "===== $f"; grep -v "^I1\|^W1\|DeprecationWarning\|warnings.warn" "$f" | tail -n 60; done
tar czf "${OUT:-/tmp}/$group.tgz" -C /tmp "sj_$group"
