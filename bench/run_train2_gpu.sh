#!/usr/bin/env bash
# Two training runs of bench/run_train_gpu.sh side by side on a 2-GPU machine (one per GPU, same
# seed and data, different peak learning rates: LR_A on GPU 0, LR_B on GPU 1), then keeps the one
# with the higher final mean exact match (sparse_jax/assets/default_model's training_log.json says
# which). Usage, from the repository root:
#   LR_A=4e-4 LR_B=7e-4 bash bench/run_train2_gpu.sh
# Writes: /tmp/sj_train/{a,b}/model (both runs), /tmp/sj_best_model (the winner, kept on the
# machine for a following eval call), $OUT/best.tar.part-* (the winner's files, in <15 MB parts:
# `cat best.tar.part-* | tar x -C DIR`), $OUT/logs.tgz (both training logs and consoles).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sj_train_out}"
mkdir -p "$OUT" /tmp/sj_train/a /tmp/sj_train/b
W="${WORKERS:-14}"
CUDA_VISIBLE_DEVICES=0 OUT=/tmp/sj_train/a bash bench/run_train_gpu.sh --lr="${LR_A:-4e-4}" --num_workers="$W" "$@" \
  > /tmp/sj_train/a/console.log 2>&1 &
pa=$!
CUDA_VISIBLE_DEVICES=1 OUT=/tmp/sj_train/b bash bench/run_train_gpu.sh --lr="${LR_B:-7e-4}" --num_workers="$W" "$@" \
  > /tmp/sj_train/b/console.log 2>&1 &
pb=$!
wait $pa; echo "run a exit $?"; wait $pb; echo "run b exit $?"
python3 - <<'PY'
import json, os, shutil
scores = {}
for r in ("a", "b"):
  p = f"/tmp/sj_train/{r}/model/training_log.json"
  try:
    d = json.load(open(p))
    fe = d.get("final_eval") or (d["evals"][-1]["accuracy"] if d.get("evals") else {})
    vals = [v for per in fe.values() for v in per.values()]
    scores[r] = (sum(vals) / max(1, len(vals)), d.get("steps"), d["config"]["lr"], fe)
  except Exception as e:
    print(f"run {r}: no usable log ({e})")
for r, (s, steps, lr, fe) in scores.items():
  print(f"run {r}: lr {lr} steps {steps} mean exact match {s:.3f} {json.dumps(fe)}")
if scores:
  best = max(scores, key=lambda r: scores[r][0])
  print(f"BEST run {best}")
  shutil.rmtree("/tmp/sj_best_model", ignore_errors=True)
  shutil.copytree(f"/tmp/sj_train/{best}/model", "/tmp/sj_best_model")
  open("/tmp/sj_best_model/WHICH", "w").write(best)
PY
for r in a b; do echo "===== run $r"; grep -a -E "gate|phase|eval|final|ERROR|Traceback|Error" /tmp/sj_train/$r/console.log | tail -n 40; done
tar czf "$OUT/logs.tgz" -C /tmp/sj_train a/console.log b/console.log $(cd /tmp/sj_train && ls */model/training_log.json 2>/dev/null)
if [ -d /tmp/sj_best_model ]; then
  tar cf /tmp/sj_best.tar -C /tmp/sj_best_model . && split -b 14m /tmp/sj_best.tar "$OUT/best.tar.part-"
fi
ls -l "$OUT"
