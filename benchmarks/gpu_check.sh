#!/usr/bin/env bash
# The GPU check, on any machine with an NVIDIA GPU and a CUDA jax: prints the
# device and the JAX/Flax versions, then, most important first, checks the Pallas
# fused (token chunks) and logits kernels on the device against the reference and
# times them against the device's floors (benchmarks/gpu_kernels.py, results saved
# after each section; KERNEL_ARGS="--sections processed,replay" runs only those),
# then runs `python -m benchmarks --suite gpu`. Results (JSON,
# plots, logs) go under $OUT (default /tmp/gpu-out). Wheels in .whl/, if any, are
# installed first into /tmp/site (for a machine without a package index).
# Usage: bash benchmarks/gpu_check.sh
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
