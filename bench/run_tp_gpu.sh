#!/usr/bin/env bash
# Tensor parallelism on 2 GPUs (H100s), one command, under 8 minutes (each stage under `timeout`):
#   1. greedy equality, tensor_parallel_size 1 vs 2, float32, on tiny random models: dense Llama,
#      RocketKV, DSA on a DeepSeek-V3.2 (MLA) model; plus dense in bfloat16 (informational: the
#      split o_proj / down_proj sums in another order). Also the compiled tp2 decode step's
#      collectives: all-reduces per layer, no all-gather of the KV cache ("CHECK ..." lines).
#   2. decode throughput, tp1 vs tp2, Llama-3.1-70B layer shapes with 16 layers
#      (configs/models/llama-3.1-70b-16l.json, random bf16 weights, 31.6 GB), batch 2, at 64K
#      and 128K context: dense, RocketKV (configs/rocket.yaml after prompt compression) and RocketKV
#      without compression (one process per parallel size; see bench/bench_tp.py).
#   3. a summary (speed-up tp2/tp1, scaling efficiency = tp2 tok/s / (2 x tp1 tok/s)) on stdout.
# Everything goes to /tmp/sj_tp, packed as $OUT/tp.tgz (+ $OUT/summary.md). Usage (repo root):
#   bash bench/run_tp_gpu.sh
#   SMOKE=1 OUT=/tmp/o bash bench/run_tp_gpu.sh     # CPU dry run: 2 simulated devices, tiny sizes
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0                     # NVLink multicast off
export XLA_PYTHON_CLIENT_PREALLOCATE=false    # tp1 holds 31.6 GB of weights + up to ~20 GB of KV on one GPU
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
OUT="${OUT:-/tmp/sj_tp_out}"
W=/tmp/sj_tp
rm -rf "$W"
mkdir -p "$W" "$OUT"
NOISE='Pallas Triton|is deprecated|are deprecated|warnings\.warn\(|DeprecationWarning'

if [ "${SMOKE:-0}" = "1" ]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=2 ${XLA_FLAGS:-}"
  CHECK_ARGS="--smoke"
  DECODE_ARGS="--config=tiny-llama --contexts=512,1024 --batch=2 --steps=4 --iters=3 --prompt_budget=128 --topk=4 --page_size=16"
else
  CHECK_ARGS=""
  DECODE_ARGS="--config=llama-3.1-70b-16l --contexts=65536,131072 --batch=${BATCH:-2} --steps=16 --iters=8"
fi
T_CHECK="${T_CHECK:-140}"     # seconds per stage (the stage's own budget is 30 s less)
T_DECODE="${T_DECODE:-160}"

stage() {  # stage NAME LIMIT_S COMMAND...: full log in $W/NAME.log, console without warning noise
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  grep -v -E "$NOISE" "$W/$name.log" | grep -E "^(CHECK|#)|Error|error|Traceback" | tail -n 40
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  echo "$name $rc $((SECONDS - t0))" >> "$W/stages.txt"
}

t_all=$SECONDS
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  nvidia-smi topo -m 2>/dev/null
  env | grep -E '^(NCCL|XLA|JAX)_' | sort
} > "$W/env.txt"
timeout 60 python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" \
  >> "$W/env.txt" 2>&1
grep -v -E "$NOISE" "$W/env.txt" | head -n 20

stage check "$T_CHECK" python3 bench/bench_tp.py check $CHECK_ARGS --budget_s=$((T_CHECK - 30)) --out="$W/check.json"
for tp in 1 2; do
  stage "decode_tp$tp" "$T_DECODE" python3 bench/bench_tp.py decode --tp=$tp $DECODE_ARGS \
    --budget_s=$((T_DECODE - 30)) --out="$W/decode_tp$tp.json"
done

echo
echo "==================== SUMMARY (total $((SECONDS - t_all))s) ===================="
python3 bench/bench_tp.py summary --dir="$W" 2>&1 | grep -v -E "$NOISE"
echo "stages (name exit seconds):"; cat "$W/stages.txt"
cp "$W/summary.md" "$OUT/summary.md" 2>/dev/null
tar czf "$OUT/tp.tgz" -C /tmp sj_tp && echo "packed $OUT/tp.tgz ($(du -h "$OUT/tp.tgz" | cut -f1))"
