"""Two processes x 4 CPU devices: jax.distributed with a local coordinator and gloo
collectives, running the README's multi-host program (lpkernel.examples.multihost)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_two_processes_match_one_device():
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no forced device count
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "lpkernel.examples.multihost",
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--local-devices",
        "4",
        "--check",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outputs.append(out)
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    assert f"process {i}: values and gradients match one device" in out
