"""Two processes x 4 CPU devices: jax.distributed with a local coordinator and gloo
collectives, running the README's multi-host program (lpkernel.examples.multihost).

Each process writes its shards of every result (values and gradients of the
data-parallel, vocab-parallel and fused forms); this test checks them itself
against the same global batch on one device, and that the two processes'
shards cover every element, so a program that skipped a comparison or a
result cannot pass.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lpkernel.examples import multihost

ROOT = Path(__file__).resolve().parents[1]
# Generous: two JAX processes compile the program while the rest of the suite runs
# beside them; a process that fails ends the wait at once (below).
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(out_dir: Path) -> list[str]:
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
        "--out",
        str(out_dir / f"process{i}.npz"),
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break  # one failed (the other would wait for it forever) or time is up
      time.sleep(0.5)
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      if p.poll() is None:
        p.kill()
    outputs = [p.communicate()[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{out[-3000:]}"
  return outputs


@pytest.mark.long
@pytest.mark.timeout(TIMEOUT_S + 120)
def test_two_processes_match_one_device(tmp_path):
  _run_two_processes(tmp_path)
  want = [np.asarray(x) for x in jax.tree.leaves(multihost.one_device(*multihost.global_batch()))]
  assert len(want) == 7  # 3 forms: a value and a gradient each, the fused form two gradients
  covered = [np.zeros(w.shape, bool) for w in want]
  for i in range(2):
    with np.load(tmp_path / f"process{i}.npz") as shards:
      names = [n for n in shards.files if "_shard" in n]
      assert {int(n[4 : n.index("_")]) for n in names} == set(range(len(want)))
      for name in names:
        k = int(name[4 : name.index("_")])
        where = tuple(slice(a, b) for a, b in shards[name.replace("shard", "index")])
        np.testing.assert_allclose(
          shards[name], want[k][where], rtol=2e-5, atol=2e-5, err_msg=f"process {i} {name}"
        )
        covered[k][where] = True
  assert all(c.all() for c in covered), "the processes' shards leave elements out"
