"""Strict test environment: 8 fake CPU devices, fixed seeds, hypothesis profile."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
settings.load_profile("ci")
