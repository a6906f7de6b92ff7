"""Strict test environment: 8 fake CPU devices, fixed seeds, hypothesis profile."""

import os

# 8 fake CPU devices for the mesh tests. The suite compiles hundreds of small
# programs and runs them on tiny shapes, so LLVM's cheapest pipeline (-O0, no
# expensive passes) saves about 30% of its time; XLA's HLO passes, fusion and
# buffer assignment (the memory tests) are unchanged. Benchmarks run with XLA's
# defaults. Notebook kernels and the multi-process workers inherit these flags.
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true",
)

# No tuned table of the machine's user (~/.cache/lpkernel/tuned.json) reaches the
# tests: each that needs one writes its own (tests/test_tuning.py).
os.environ["LPKERNEL_TUNED_TABLE"] = os.path.join(
  os.environ.get("TMPDIR", "/tmp"), f"lpkernel-tests-no-table-{os.getpid()}.json"
)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8) if hasattr(jax.config, "jax_num_cpu_devices") else None

settings.register_profile(
  "ci",
  max_examples=8,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A longer randomised search for local runs: HYPOTHESIS_PROFILE=thorough python -m pytest -k ...
settings.register_profile(
  "thorough",
  max_examples=300,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
