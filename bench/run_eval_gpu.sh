#!/usr/bin/env bash
# Accuracy of the embedded default model (EVAL.md), RULER-style tasks, Pallas kernels, greedy,
# stages of under 10 minutes:
#   grid     bench/eval_suite.py: the dense table (100 samples per point, 4K-32K) and the budget
#            sweep (25 samples, 8K-32K, budgets 128-2048) of RocketKV, RocketKV with sparse chunked
#            prefill, Quest (every layer sparse), the oracle, SnapKV and StreamingLLM. With two GPUs visible the
#            algorithms are split over them (one process each) and the two JSON files merged;
#   indexer  distils the lightning indexer onto the default model (sparse_jax.distill, 300 steps
#            at 1K) and sweeps the `indexer` algorithm with those weights;
#   chunked  needle tasks at 32K, budget 2048: dense vs RocketKV with sparse chunked prefill
#            (the cuDNN chunk-attention path end to end).
# Writes $OUT/eval_<stage>.json (+ logs); the tables and plot come from
#   python -m bench.eval_report --suite=$OUT/eval_grid.json --plot=docs/eval_budgets.png
# Usage, from the repository root:
#   bash bench/run_eval_gpu.sh [grid|indexer|chunked]   # default: grid
#   SMOKE=1 OUT=/tmp/e bash bench/run_eval_gpu.sh chunked   # CPU dry run (1K, 2 samples)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/sparse_jax_bench_out}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: a YAML written there names files in it
STAGE="${1:-grid}"
filter() { grep -a -v "^I1\|^W1\|DeprecationWarning\|warnings.warn\|Pallas.*deprecated"; }
BACKEND=pallas; BUDGET=500; LIMIT=545
SIZES=(--dense_samples=100 --sweep_samples=25 --budgets=512,128,2048,256,1024)
if [ "${SMOKE:-0}" = "1" ]; then
  BACKEND=reference; BUDGET=60; LIMIT=120
  SIZES=(--dense_contexts=1024 --sweep_contexts=1024 --dense_samples=2 --sweep_samples=2 --budgets=256)
fi
NEEDLES=niah_single,niah_multikey,niah_multivalue,niah_multiquery
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
suite() {  # suite NAME [eval_suite args...]: $OUT/NAME.json and $OUT/NAME.log
  local name=$1; shift
  timeout --signal=TERM --kill-after=10 "$LIMIT" python3 -m bench.eval_suite --backend=$BACKEND \
    --time_budget_s=$BUDGET "$@" --out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local r=$?
  echo "===== $name: exit $r"; filter < "$OUT/$name.log" | tail -n 12
  return $r
}
case "$STAGE" in
  grid)
    # Every algorithm with every layer sparse, so a budget is what each layer attends to: Quest's
    # shipped config keeps its paper's two dense layers, half of the default model's four.
    sed -E 's/^(  dense_layers:) .*/\1 0/' configs/quest.yaml > "$OUT/quest.yaml"
    FIRST=configs/rocket.yaml,configs/rocket_chunked.yaml
    REST=$OUT/quest.yaml,configs/oracle.yaml,configs/snapkv.yaml,configs/streaming.yaml
    if [ "${GPUS:-0}" -ge 2 ]; then
      CUDA_VISIBLE_DEVICES=0 suite eval_grid_0 "${SIZES[@]}" --algorithms=$FIRST & p0=$!
      CUDA_VISIBLE_DEVICES=1 suite eval_grid_1 "${SIZES[@]}" --nodense --algorithms=$REST & p1=$!
      wait $p0; r0=$?; wait $p1; r1=$?
      python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
parts = [json.load(open(f"{out}/eval_grid_{i}.json")) for i in (0, 1)]
merged = dict(parts[0], points=[p for r in parts for p in r["points"]],
              skipped=[s for r in parts for s in r.get("skipped", [])],
              argv=[r["argv"] for r in parts], sources=[r["date"] for r in parts])
json.dump(merged, open(f"{out}/eval_grid.json", "w"), indent=1)
print(f"merged {len(merged['points'])} points into {out}/eval_grid.json")
PY
      exit $(( r0 || r1 ))
    fi
    suite eval_grid "${SIZES[@]}" --algorithms=$FIRST,$REST ;;
  indexer)
    STEPS=300; [ "${SMOKE:-0}" = "1" ] && STEPS=2
    timeout 150 python3 -m sparse_jax.distill --model=sparse_jax/assets/default_model \
      --output="$OUT/default_model_indexer.safetensors" --steps=$STEPS --seq_len=1024 --batch_size=8 --topk=8 \
      2>&1 | filter | tee "$OUT/distill.log" | tail -n 12
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
    # configs/indexer.yaml with the weights path (however it is written) pointing at the new weights
    sed -E "s#[^ \"']*default_model_indexer\.safetensors#$OUT/default_model_indexer.safetensors#" \
      configs/indexer.yaml > "$OUT/indexer.yaml"
    suite eval_indexer "${SIZES[@]}" --nodense --algorithms="$OUT/indexer.yaml" ;;
  chunked)
    EV=(--dense_contexts=32768 --sweep_contexts=32768 --dense_samples=25 --sweep_samples=25 --budgets=2048)
    [ "${SMOKE:-0}" = "1" ] && EV=("${SIZES[@]}")
    suite eval_chunked --dense_tasks=$NEEDLES --sweep_tasks=$NEEDLES "${EV[@]}" \
      --algorithms=configs/rocket_chunked.yaml ;;
  *) echo "unknown stage '$STAGE': use grid, indexer or chunked" >&2; exit 2 ;;
esac
