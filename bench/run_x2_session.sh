#!/usr/bin/env bash
# The GPU measurements of one device session on a 2-GPU machine (nvidia-h100-x2), in three calls
# of under 10 minutes each, two independent jobs side by side (one per GPU) where they fit:
#   bash bench/run_x2_session.sh train   # GPU0 / GPU1: bench/run_train2_gpu.sh (two learning rates)
#   bash bench/run_x2_session.sh trainbench  # GPU0: bench/run_train_gpu.sh (one run); GPU1: DSA
#                                        # kernels (bench/run_dsa_gpu.sh), 8B dense decode with its
#                                        # memory report (stage by stage, compiled step, HLO)
#   bash bench/run_x2_session.sh eval    # GPU0: bench/eval_suite.py on the trained model;
#                                        # GPU1: bench/run_dsa_gpu.sh, 8B dense decode, indexer distillation
#   bash bench/run_x2_session.sh tp      # both: bench/run_tp_gpu.sh; then GPU0: serving bench (short),
#                                        # GPU1: sparse chunked prefill vs dense prefill (TTFT)
# Results: $OUT/<stage>*.tgz (+ the trained model's parts for `train`). The trained model stays on
# the machine at /tmp/sj_best_model for the `eval` stage (else the embedded default model is used).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/sj_x2_out}"
mkdir -p "$OUT"
stage=$1
filter() { grep -a -v "^I1\|^W1\|DeprecationWarning\|warnings.warn\|Pallas.*deprecated"; }
case "$stage" in
  train)
    OUT="$OUT" BUDGET="${BUDGET:-450}" bash bench/run_train2_gpu.sh ;;
  trainbench)
    mkdir -p /tmp/sj_train/a /tmp/sj_gpu1
    ( CUDA_VISIBLE_DEVICES=0 OUT=/tmp/sj_train/a BUDGET="${BUDGET:-500}" bash bench/run_train_gpu.sh \
        --num_workers="${WORKERS:-16}" > /tmp/sj_train/a/console.log 2>&1 ) &
    p0=$!
    (
      export CUDA_VISIBLE_DEVICES=1
      w1=/tmp/sj_gpu1
      OUT=$w1/dsa timeout 240 bash bench/run_dsa_gpu.sh > $w1/dsa.log 2>&1
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        timeout "${DECODE_LIMIT:-260}" python3 bench/bench_decode.py --iters=20 --out=$w1/decode8b.json \
        --hlo_dir=$w1/hlo > $w1/decode8b.log 2>&1
    ) &
    p1=$!
    wait $p0 $p1
    if [ -f /tmp/sj_train/a/model/config.json ]; then
      rm -rf /tmp/sj_best_model && cp -r /tmp/sj_train/a/model /tmp/sj_best_model
      tar cf /tmp/sj_best.tar -C /tmp/sj_best_model . && split -b 14m /tmp/sj_best.tar "$OUT/best.tar.part-"
    fi
    grep -a -E "gate|phase|eval|final|ERROR|Traceback|Error" /tmp/sj_train/a/console.log | tail -n 30
    for f in /tmp/sj_gpu1/*.log; do echo "===== $f"; filter < "$f" | tail -n 40; done
    tar czf "$OUT/trainbench.tgz" -C /tmp sj_gpu1 sj_train/a/console.log ;;
  evalgrid)   # the accuracy grid on both GPUs: GPU0 dense table + RocketKV; GPU1 the other algorithms
    w0=/tmp/sj_eval; w1=/tmp/sj_eval1; mkdir -p $w0 $w1
    common="--backend=pallas --time_budget_s=${EVAL_BUDGET:-500} --sweep_samples=25"
    ( CUDA_VISIBLE_DEVICES=0 timeout "${EVAL_LIMIT:-545}" python3 bench/eval_suite.py $common --dense_samples=100 \
        --budgets=512,128,2048,256,1024 --algorithms=configs/rocket.yaml,configs/rocket_chunked.yaml \
        --out=$w0/eval.json > $w0/eval.log 2>&1 ) &
    p0=$!
    ( CUDA_VISIBLE_DEVICES=1 timeout "${EVAL_LIMIT:-545}" python3 bench/eval_suite.py $common --nodense --budgets=512,128,2048,256,1024 \
        --algorithms=configs/quest.yaml,configs/oracle.yaml,configs/snapkv.yaml,configs/streaming.yaml \
        --out=$w1/eval.json > $w1/eval.log 2>&1 ) &
    p1=$!
    wait $p0 $p1
    for f in $w0/*.log $w1/*.log; do echo "===== $f"; filter < "$f" | tail -n 12; done
    tar czf "$OUT/evalgrid.tgz" -C /tmp sj_eval sj_eval1 ;;
  final3)   # GPU0: DSA kernels + 8B dense decode; GPU1: indexer distillation for the model, its sweep, leftovers
    w0=/tmp/sj_f0; w1=/tmp/sj_f1; mkdir -p $w0 $w1
    (
      export CUDA_VISIBLE_DEVICES=0
      OUT=$w0/dsa timeout 235 bash bench/run_dsa_gpu.sh > $w0/dsa.log 2>&1
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        timeout "${DECODE_LIMIT:-250}" python3 bench/bench_decode.py --iters=20 --out=$w0/decode8b.json \
        > $w0/decode8b.log 2>&1
    ) &
    p0=$!
    (
      export CUDA_VISIBLE_DEVICES=1
      timeout 110 python3 -m sparse_jax.distill --model=sparse_jax/assets/default_model \
        --output=$w1/default_model_indexer.safetensors --steps=300 --seq_len=1024 --batch_size=8 --topk=8 \
        > $w1/distill.log 2>&1
      sed "s#sparse_jax/assets/default_model_indexer.safetensors#$w1/default_model_indexer.safetensors#" \
        configs/indexer.yaml > $w1/indexer.yaml
      timeout 170 python3 bench/eval_suite.py --backend=pallas --time_budget_s=150 --sweep_samples=25 --nodense \
        --budgets=1024 --algorithms=$w1/indexer.yaml,configs/rocket.yaml,configs/quest.yaml \
        --out=$w1/eval_1024.json > $w1/eval_1024.log 2>&1
      timeout 200 python3 bench/eval_suite.py --backend=pallas --time_budget_s=185 --sweep_samples=25 --nodense \
        --budgets=512,2048,128,256 --algorithms=$w1/indexer.yaml --out=$w1/eval_indexer.json > $w1/eval_indexer.log 2>&1
    ) &
    p1=$!
    wait $p0 $p1
    for f in $w0/*.log $w1/*.log; do echo "===== $f"; filter < "$f" | tail -n 14; done
    grep -h "^CHECK" $w0/dsa/bench_dsa.log | grep -v " OK$" || echo "all DSA kernel checks OK"
    tar czf "$OUT/final3.tgz" -C /tmp sj_f0 sj_f1 ;;
  eval)
    model=/tmp/sj_best_model; [ -f $model/config.json ] || model=sparse_jax/assets/default_model
    w0=/tmp/sj_eval; w1=/tmp/sj_gpu1; mkdir -p $w0 $w1
    ( CUDA_VISIBLE_DEVICES=0 timeout "${EVAL_LIMIT:-545}" python3 bench/eval_suite.py --model=$model --backend=pallas \
        --time_budget_s="${EVAL_BUDGET:-490}" --dense_samples=100 --sweep_samples=25 \
        --budgets=512,1024,2048,256,128 \
        --algorithms=configs/rocket.yaml,configs/quest.yaml,configs/snapkv.yaml,configs/streaming.yaml,configs/oracle.yaml,configs/rocket_chunked.yaml \
        --out=$w0/eval.json > $w0/eval.log 2>&1 ) &
    p0=$!
    (
      export CUDA_VISIBLE_DEVICES=1
      OUT=$w1/dsa timeout 240 bash bench/run_dsa_gpu.sh > $w1/dsa.log 2>&1
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        timeout "${DECODE_LIMIT:-200}" python3 bench/bench_decode.py --iters=20 --out=$w1/decode8b.json \
        > $w1/decode8b.log 2>&1
      timeout "${DISTILL_LIMIT:-90}" python3 -m sparse_jax.distill --model=$model --output=$w1/indexer.safetensors \
        --steps=300 --seq_len=1024 --batch_size=8 --topk=8 > $w1/distill.log 2>&1
    ) &
    p1=$!
    wait $p0 $p1
    for f in $w0/*.log $w1/*.log $w1/dsa/*.log; do echo "===== $f"; filter < "$f" | tail -n 40; done
    tar czf "$OUT/eval_stage.tgz" -C /tmp sj_eval sj_gpu1 ;;
  tp)
    w=/tmp/sj_tp2; mkdir -p $w
    OUT=$w/tp timeout "${TP_LIMIT:-300}" bash bench/run_tp_gpu.sh > $w/tp.log 2>&1
    ( CUDA_VISIBLE_DEVICES=0 OUT=$w/serving bash bench/run_serving_gpu.sh short > $w/serving.log 2>&1 ) &
    p0=$!
    ( CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        timeout "${PREFILL_LIMIT:-270}" python3 -m sparse_jax.bench --mode=latency --weights=random \
        --config=llama-3.1-8b --backend=pallas --dtype=bfloat16 \
        --extra_llm_api_options=dense,configs/rocket_chunked.yaml --input_len=32768,65536 --output_len=2 \
        --max_batch_size=1 --num_requests=3 --warmup_requests=1 --time_budget_s=240 --output=$w/prefill.json \
        > $w/prefill.log 2>&1 ) &
    p1=$!
    wait $p0 $p1
    for f in $w/*.log; do echo "===== $f"; filter < "$f" | tail -n 40; done
    tar czf "$OUT/tp_stage.tgz" -C /tmp sj_tp2 ;;
  *) echo "unknown stage $stage (train|eval|tp)" >&2; exit 2 ;;
esac
ls -l "$OUT"
