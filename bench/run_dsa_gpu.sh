#!/usr/bin/env bash
# DeepSeek Sparse Attention and MLA decode kernels on one GPU (H100), under 7 minutes:
#   1. correctness of every DSA Pallas kernel (indexer scores, radix top-k, sparse MLA decode
#      and prefill, the whole DSA step) vs its reference on the GPU, at a small NaN-poisoned
#      shape and at the bench size ("CHECK ... OK|FAIL" lines, "CHECK SUMMARY");
#   2. timings at 128K / 64K / 32K context, batch 8, DeepSeek-V3.2 attention shapes: config
#      sweeps at 128K, then ours vs lax.top_k / approx_max_k / plain XLA; the DSA step vs its
#      byte limit and vs dense absorbed MLA (self-limits to ~200 s);
#   3. dense absorbed MLA decode (bench/bench_mla_decode.py): mla_decode's config sweep, the
#      token-list kernel over every token, lean XLA and the reference; TFLOP/s and TB/s
#      (self-limits to ~150 s).
# Logs and JSON (bench_dsa.json, bench_mla_decode.json) go to $OUT (default
# /tmp/sparse_jax_bench_out). Usage, from the repository root:
#   bash bench/run_dsa_gpu.sh
#   SMOKE=1 OUT=/tmp/d bash bench/run_dsa_gpu.sh      # CPU dry run (interpret mode, tiny shapes)
set -u
source "$(dirname "$0")/kernel_env.sh"

record_machine
t0=$SECONDS
timeout --signal=TERM --kill-after=10 225 python3 bench/bench_dsa.py --budget-s 200 $SMOKE_FLAG 2>&1 \
  | tee "$OUT/bench_dsa.log"
rc=${PIPESTATUS[0]}
echo "=== bench_dsa: exit $rc after $((SECONDS - t0))s ==="
grep -h "^CHECK" "$OUT/bench_dsa.log" | grep -v " OK$" || echo "all DSA kernel checks OK"
t0=$SECONDS
timeout --signal=TERM --kill-after=10 175 python3 -m bench.bench_mla_decode --budget-s 150 $SMOKE_FLAG \
  --out="$OUT" 2>&1 | tee "$OUT/bench_mla_decode.log"
rc_mla=${PIPESTATUS[0]}
echo "=== bench_mla_decode: exit $rc_mla after $((SECONDS - t0))s ==="
ls -l "$OUT"
[ "$rc" = 0 ] || exit $rc
exit $rc_mla
