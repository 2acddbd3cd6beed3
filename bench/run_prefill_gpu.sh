#!/usr/bin/env bash
# Sparse chunked prefill on one GPU (H100), Llama-3.1-8B shape, stages of under 10 minutes:
#   check   bench/check_chunk_attention_gpu.py: the chunk attention's cuDNN paths against a
#           float32 reference (peaked attention, per-head context lengths, empty contexts, a short
#           last chunk) and greedy tokens of the default model, one-shot vs chunked prefill;
#   layer   bench/bench_chunk_prefill.py: one 4096-query chunk's attention over 2K / 4K / 8K
#           selected context tokens per KV head (two flash-attention calls merged by their
#           log-sum-exps, the packed single call, the XLA reference, cuDNN dense prefill as the
#           peer), then the per-layer prefill core of one chunk after 61,440 stored tokens;
#   ttft    time to first token, dense one-shot prefill vs RocketKV sparse chunked prefill
#           (configs/rocket_chunked.yaml), prompts of 32K, 64K and 128K, random bf16 weights;
#   memory  bench/probe_prefill_memory.py: XLA's memory analysis of the 128K prefill programs.
# Logs and JSON go to $OUT (default /tmp/sparse_jax_bench_out). Usage, from the repository root:
#   bash bench/run_prefill_gpu.sh [check|layer|ttft|memory|all]    # default: all
#   SMOKE=1 OUT=/tmp/p bash bench/run_prefill_gpu.sh layer         # CPU dry run (tiny shapes)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/sparse_jax_jax_cache}"
OUT="${OUT:-/tmp/sparse_jax_bench_out}"
mkdir -p "$OUT"
STAGE="${1:-all}"
case "$STAGE" in check|layer|ttft|memory|all) ;;
  *) echo "unknown stage '$STAGE': use check, layer, ttft, memory or all" >&2; exit 2 ;; esac
filter() { grep -a -v "^I1\|^W1\|DeprecationWarning\|warnings.warn\|Pallas.*deprecated\|Unable to initialize backend"; }
MODEL=(--weights=random --config=llama-3.1-8b --backend=pallas --dtype=bfloat16)
LENS="32768,65536,130560"; SM=()
if [ "${SMOKE:-0}" = "1" ]; then
  MODEL=(--weights=random --config=tiny-llama --backend=reference --dtype=float32); LENS="512,1024"; SM=(--smoke)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
rc=0
run() {  # run NAME LIMIT_S COMMAND...: log in $OUT/NAME.log; the script's status is the first failure
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | filter | tee "$OUT/$name.log" | tail -n 30
  local r=${PIPESTATUS[0]}
  echo "=== $name: exit $r"
  [ "$r" = 0 ] || [ "$rc" != 0 ] || rc=$r
}
want() { [ "$STAGE" = "$1" ] || [ "$STAGE" = all ]; }
want check && run chunk_attention_check 150 python3 -m bench.check_chunk_attention_gpu
want layer && run chunk_prefill_layer 200 python3 -m bench.bench_chunk_prefill "${SM[@]}" --out="$OUT/chunk_prefill_layer.json"
want ttft && run ttft 560 python3 -m sparse_jax.bench --mode=latency "${MODEL[@]}" \
  --extra_llm_api_options=dense,configs/rocket_chunked.yaml --input_len=$LENS --output_len=2 \
  --max_batch_size=1 --num_requests=2 --warmup_requests=1 --time_budget_s=520 --output="$OUT/ttft.json"
want memory && run prefill_memory 200 python3 -m bench.probe_prefill_memory "${SM[@]}" \
  --options=configs/rocket_chunked.yaml,configs/rocket.yaml,dense
exit $rc
