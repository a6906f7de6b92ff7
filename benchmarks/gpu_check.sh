#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool). Most important first:
# the Pallas fused (token chunks) and logits kernels checked on the device and timed
# against the floors (benchmarks/gpu_kernels.py, results saved after each section),
# then the gpu suite. Results land under $OUT.
# Usage there: bash benchmarks/gpu_check.sh
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out/results"
nvidia-smi -L
python3 -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout "${KERNEL_TIMEOUT:-330}" python3 -m benchmarks.gpu_kernels --out "$out/results" ${KERNEL_ARGS:-} 2>&1 | tee "$out/kernels.log"
timeout "${BENCH_TIMEOUT:-200}" python3 -m benchmarks --suite gpu --repeats 10 --no-progress \
  --out "$out/results" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
