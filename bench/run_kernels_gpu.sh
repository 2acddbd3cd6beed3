#!/usr/bin/env bash
# All kernel benchmarks on one GPU (H100), in well under 8 minutes:
#   1. correctness of every Pallas kernel vs its reference on the GPU (small shapes with
#      NaN poison + bench-size shapes), printing the max error: Triton lowering or compile
#      problems show up here first;
#   2. paged / block-sparse decode attention   (self-limits to ~180 s)
#   3. in-place compaction                     (~70 s)
#   4. RocketKV KT scoring + top-k             (~50 s)
# Each step is guarded by `timeout`, so one failure does not lose the rest. Logs and JSON go
# to $OUT (default /tmp/sparse_jax_bench_out). Usage, from the repository root:
#   bash bench/run_kernels_gpu.sh
#   SMOKE=1 OUT=/tmp/k bash bench/run_kernels_gpu.sh     # CPU dry run of the script
set -u
source "$(dirname "$0")/kernel_env.sh"
PY=python3

step() {  # step <name> <timeout seconds> <command...>
  local name=$1 limit=$2
  shift 2
  echo "=== $name (timeout ${limit}s) ==="
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
}

: > "$OUT/steps.txt"
record_machine

# Check each kernel against its reference in one process (one jax start-up).
step check 100 $PY -c '
import sys
from bench import bench_compaction, bench_paged_decode, bench_rocket_score
extra = sys.argv[1:]  # --smoke on a CPU
rcs = {m.__name__: m.main(["--check", *extra])
       for m in (bench_paged_decode, bench_compaction, bench_rocket_score)}
print("CHECK SUMMARY", {k: "OK" if rc == 0 else "FAIL" for k, rc in rcs.items()})
sys.exit(max(rcs.values()))
' $SMOKE_FLAG

step paged_decode 210 $PY bench/bench_paged_decode.py --budget-s 180 $SMOKE_FLAG
step compaction 90 $PY bench/bench_compaction.py --budget-s 70 $SMOKE_FLAG
step rocket_score 70 $PY bench/bench_rocket_score.py --budget-s 50 $SMOKE_FLAG

echo "=== steps (name exit seconds) ==="
cat "$OUT/steps.txt"
grep -h "^CHECK [a-z]" "$OUT/check.log" | grep -v " OK$" || echo "all kernel checks OK"
ls -l "$OUT"
