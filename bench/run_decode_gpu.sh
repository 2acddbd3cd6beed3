#!/usr/bin/env bash
# Decode on one GPU (H100), two stages of under 6 minutes each:
#   step   RocketKV's decode step per layer (bench/bench_rocket_step.py): KT scoring, block
#          selection and block-sparse attention over the compacted cache, batch 8, 32 q / 8 KV
#          heads of 128, fused kernels vs the unfused Pallas path vs the XLA composition;
#   model  whole-model dense decode (bench/bench_decode.py): Llama-3.1-8B shape, random bf16
#          weights, batch 8, 4K / 16K / 32K context, the engine's jitted 32-step decode with the
#          cache donated, Pallas vs the XLA reference attention, bandwidth vs a copy ceiling
#          measured in the same run, host overhead of a single-step call.
# Logs and JSON go to $OUT (default /tmp/sparse_jax_bench_out). Usage, from the repository root:
#   bash bench/run_decode_gpu.sh [step|model|all]      # default: all
#   SMOKE=1 OUT=/tmp/d bash bench/run_decode_gpu.sh    # CPU dry run (tiny shapes)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The 8B pool (35 GB) plus weights (16 GB): allocate on demand, up to 95% of HBM.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
OUT="${OUT:-/tmp/sparse_jax_bench_out}"
mkdir -p "$OUT"
STAGE="${1:-all}"
case "$STAGE" in step|model|all) ;; *) echo "unknown stage '$STAGE': use step, model or all" >&2; exit 2 ;; esac
STEP_ARGS=(); MODEL_ARGS=(--iters=20)
if [ "${SMOKE:-0}" = "1" ]; then
  STEP_ARGS=(--smoke)
  MODEL_ARGS=(--smoke)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
rc=0
if [ "$STAGE" = step ] || [ "$STAGE" = all ]; then
  timeout --signal=TERM --kill-after=10 330 python3 -m bench.bench_rocket_step "${STEP_ARGS[@]}" \
    --out="$OUT/rocket_step.json" 2>&1 | tee "$OUT/rocket_step.log"
  r=${PIPESTATUS[0]}; echo "=== rocket step: exit $r"; [ "$r" = 0 ] || rc=$r
fi
if [ "$STAGE" = model ] || [ "$STAGE" = all ]; then
  timeout --signal=TERM --kill-after=10 330 python3 -m bench.bench_decode "${MODEL_ARGS[@]}" \
    --out="$OUT/decode.json" 2>&1 | tee "$OUT/decode.log"
  r=${PIPESTATUS[0]}; echo "=== model decode: exit $r"; [ "$r" = 0 ] || rc=$r
fi
exit $rc
