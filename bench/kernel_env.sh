# Sourced by the kernel benchmark scripts (run_kernels_gpu.sh, run_dsa_gpu.sh): runs from the
# repository root with it on PYTHONPATH, unbuffered output, XLA allocating on demand (128K-token
# pools, the plain-XLA baselines' gathered copies, cuDNN workspaces) unless the caller says
# otherwise, $OUT (default /tmp/sparse_jax_bench_out) created and exported, SMOKE_FLAG set to
# --smoke under SMOKE=1, and record_machine writing the GPU and jax versions to $OUT.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
OUT="${OUT:-/tmp/sparse_jax_bench_out}"
export OUT
mkdir -p "$OUT"
SMOKE_FLAG=""
if [ "${SMOKE:-0}" = "1" ]; then SMOKE_FLAG="--smoke"; fi

record_machine() {  # the GPU (name, memory, max SM clock) -> $OUT/gpu.txt, jax's versions and devices -> $OUT/jax.txt
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 \
    | tee "$OUT/jax.txt"
}
