"""Strict test environment: 8 fake CPU devices, fixed seeds, hypothesis profile."""

import os
import subprocess
import sys

# 8 fake CPU devices for the mesh tests. The suite compiles over a thousand
# small programs and runs them on tiny shapes, so it compiles them the cheapest
# way: LLVM's cheapest pipeline (-O0, no expensive passes; about 30% of the
# time) and XLA:CPU's loop emitters in place of its fusion emitters (compiles
# about 2.5x faster), one LLVM module per program. XLA's HLO passes,
# fusion and buffer assignment are XLA's own either way (the temporaries'
# bytes agree to a few hundred bytes). tests/test_default_emitters.py runs the
# float64-oracle and temporaries tests again under the fusion emitters, the
# codegen users run; benchmarks run with XLA's defaults. Notebook kernels and
# the multi-process workers inherit these flags (and xdist's workers the
# controller's).
CHEAP_CODEGEN = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
# One LLVM module per program: XLA:CPU splits its codegen across threads, which
# only costs here (each xdist worker has one core); compiles about 17% faster.
ONE_CODEGEN_MODULE = "--xla_cpu_parallel_codegen_split_count=1"


def _xla_accepts(flags: str) -> bool:
  """Whether this jaxlib's XLA knows ``flags`` (an unknown flag aborts it)."""
  probe = [sys.executable, "-c", "import jax; jax.devices('cpu')"]
  env = {**os.environ, "XLA_FLAGS": flags}
  return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0


if "XLA_FLAGS" not in os.environ:
  optional = [ONE_CODEGEN_MODULE]
  if os.environ.get("LPKERNEL_TEST_EMITTERS") != "fusion":
    optional.append(LOOP_EMITTERS)
  if not _xla_accepts(" ".join(optional)):  # one probe where all are known (~2 s each)
    optional = [flag for flag in optional if _xla_accepts(flag)]
  os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_force_host_platform_device_count=8", CHEAP_CODEGEN, *optional]
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


def pytest_collection_modifyitems(items):
  """The tests marked ``long`` (tens of seconds each) first: xdist's workers then
  end on short tests and finish together, not one waiting on the other's last
  long test (the order is the same in every worker, as xdist requires)."""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)
