#!/usr/bin/env bash
# The fourth device session's measurements, one H100, two calls of under 10 minutes:
#   bash bench/run_session4_gpu.sh chunk     # sparse chunked prefill: per-layer attention and
#       prefill-core breakdown (bench/bench_chunk_prefill.py), then TTFT of dense prefill vs
#       RocketKV sparse chunked prefill (configs/rocket_chunked.yaml) at 32K / 64K, 8B shape
#   bash bench/run_session4_gpu.sh serve128  # serving at 128K, 8B shape, 512 output tokens:
#       dense vs RocketKV with sparse chunked prefill at batch 2, then RocketKV at its largest
#       batch (capped at 24: each of its requests is a 128K prefill), then (time allowing)
#       RocketKV with one-shot prefill (configs/rocket.yaml) at batch 2.
#   bash bench/run_session4_gpu.sh final4    # bench/check_chunk_attention_gpu.py (kernel and engine
#       agreement), accuracy of sparse chunked prefill on the GPU path (default model, needle tasks at 32K, 25 samples: dense vs RocketKV + chunked prefill at
#       budget 2048), then TTFT of dense vs sparse chunked prefill at 64K and 128K, 8B shape.
# Results land in $OUT (JSON + logs). Compiled programs are cached in $JAX_COMPILATION_CACHE_DIR.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/sparse_jax_jax_cache}"
OUT="${OUT:-/tmp/sj_s4_out}"
mkdir -p "$OUT"
START=$SECONDS
left() { echo $(( ${WALL:-570} - (SECONDS - START) )); }
filter() { grep -a -v "^I1\|^W1\|DeprecationWarning\|warnings.warn\|Pallas.*deprecated\|Unable to initialize backend"; }
MODEL=(--weights=random --config=llama-3.1-8b --backend=pallas --dtype=bfloat16)
if [ "${SMOKE:-0}" = "1" ]; then
  MODEL=(--weights=random --config=tiny-llama --backend=reference --dtype=float32)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
case "${1:-chunk}" in
  chunk)
    SM=(); [ "${SMOKE:-0}" = "1" ] && SM=(--smoke)
    timeout 150 python3 bench/bench_chunk_prefill.py "${SM[@]}" --out="$OUT/chunk_prefill.json" 2>&1 | filter \
      | tee "$OUT/chunk_prefill.log"
    LENS="32768,65536"; [ "${SMOKE:-0}" = "1" ] && LENS="512,1024"
    timeout $(( $(left) - 10 )) python3 -m sparse_jax.bench --mode=latency "${MODEL[@]}" \
        --extra_llm_api_options=dense,configs/rocket_chunked.yaml --input_len=$LENS --output_len=2 \
        --max_batch_size=1 --num_requests=3 --warmup_requests=1 --time_budget_s=$(( $(left) - 30 )) \
        --output="$OUT/chunked_prefill.json" 2>&1 | filter | tee "$OUT/chunked_prefill.log" | tail -n 30 ;;
  serve128)
    L=130560; OUTLEN=512; CAP=24
    [ "${SMOKE:-0}" = "1" ] && { L=1024; OUTLEN=40; CAP=8; MODEL+=(--kv_max_tokens=16384); }
    common=(--mode=throughput "${MODEL[@]}" --output_len=$OUTLEN --warmup_requests=1 --max_batch_cap=$CAP)
    timeout $(( $(left) - 10 )) python3 -m sparse_jax.bench "${common[@]}" \
        --extra_llm_api_options=dense,configs/rocket_chunked.yaml --points=$L:2 --time_budget_s=$(( $(left) - 20 )) \
        --output="$OUT/serve128_b2.json" 2>&1 | filter | tee "$OUT/serve128_b2.log" | tail -n 25
    timeout $(( $(left) - 10 )) python3 -m sparse_jax.bench "${common[@]}" \
        --extra_llm_api_options=configs/rocket_chunked.yaml --points=$L:max --time_budget_s=$(( $(left) - 20 )) \
        --output="$OUT/serve128_max.json" 2>&1 | filter | tee "$OUT/serve128_max.log" | tail -n 25
    if [ "$(left)" -gt 90 ]; then
      timeout $(( $(left) - 5 )) python3 -m sparse_jax.bench "${common[@]}" \
          --extra_llm_api_options=configs/rocket.yaml --points=$L:2 --time_budget_s=$(( $(left) - 15 )) \
          --output="$OUT/serve128_oneshot.json" 2>&1 | filter | tee "$OUT/serve128_oneshot.log" | tail -n 25
    fi ;;
  final4)
    NEEDLES=niah_single,niah_multikey,niah_multivalue,niah_multiquery
    EV=(--dense_contexts=32768 --sweep_contexts=32768 --dense_samples=25 --sweep_samples=25 --budgets=2048)
    LENS="65536,130560"
    if [ "${SMOKE:-0}" = "1" ]; then
      EV=(--dense_contexts=1024 --sweep_contexts=1024 --dense_samples=2 --sweep_samples=2 --budgets=256); LENS="512,1024"
    fi
    timeout 120 python3 bench/check_chunk_attention_gpu.py 2>&1 | filter | tee "$OUT/check_chunk.log" | tail -n 8
    timeout 200 python3 bench/eval_suite.py --backend=${EVAL_BACKEND:-pallas} --dense_tasks=$NEEDLES --sweep_tasks=$NEEDLES \
        "${EV[@]}" --algorithms=configs/rocket_chunked.yaml --time_budget_s=170 --out="$OUT/eval_chunked.json" 2>&1 \
      | filter | tee "$OUT/eval_chunked.log" | tail -n 12
    timeout $(( $(left) - 5 )) python3 -m sparse_jax.bench --mode=latency "${MODEL[@]}" \
        --extra_llm_api_options=dense,configs/rocket_chunked.yaml --input_len=$LENS --output_len=2 \
        --max_batch_size=1 --num_requests=2 --warmup_requests=1 --time_budget_s=$(( $(left) - 20 )) \
        --output="$OUT/ttft_long.json" 2>&1 | filter | tee "$OUT/ttft_long.log" | grep -v "req/s" | tail -n 12 ;;
  *) echo "unknown stage '$1': use chunk, serve128 or final4" >&2; exit 2 ;;
esac
echo "stage ${1:-chunk} done in $((SECONDS - START))s"
