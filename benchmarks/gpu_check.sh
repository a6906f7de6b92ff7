#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool): installs the peers
# from wheels carried in .whl/, runs the gpu suite and the GPU-relevant tests, and
# leaves results under $OUT. Usage there: bash benchmarks/gpu_check.sh
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
timeout "${BENCH_TIMEOUT:-300}" python3 -m benchmarks --suite gpu --repeats 10 --no-progress \
  --out "$out/results" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/test_logprobs.py tests/test_scoring.py tests/test_fused.py tests/test_checks.py 2>&1 | tail -40 | tee "$out/pytest.log"
