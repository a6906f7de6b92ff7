"""Data- and vocab-parallel scoring across processes: one program per process.

Run one copy per host (here: per process on one machine), e.g.::

  python -m lpkernel.examples.multihost --coordinator localhost:12345 \\
      --num-processes 2 --process-id 0 --local-devices 4   # and --process-id 1

Each process initialises ``jax.distributed``, builds a ``(data, model)`` mesh
over every process's devices, makes global arrays from its own slice of the
batch with ``jax.make_array_from_process_local_data`` (nothing unsharded is
captured as a constant), and runs data-parallel ``score`` and the
vocab-parallel ``vocab_parallel_score`` / ``vocab_parallel_score_hidden``,
values and gradients. With ``--check`` it compares them with the same global
batch scored by one device of its own and exits non-zero on a mismatch.

On a real TPU pod or GPU cluster: drop ``--local-devices`` and the CPU
collectives, and call ``jax.distributed.initialize()`` with no arguments (the
cluster environment supplies the coordinator, process count and id).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lpkernel as lpk
from lpkernel import sharding

B, T, D, V = 8, 6, 16, 64


def global_batch(seed: int = 0):
  """The global batch every process derives (NumPy, identical everywhere)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = np.arange(T)[None, :] >= rng.integers(1, T, size=(B, 1))
  hidden = rng.normal(size=(B, T, D)).astype(np.float32)
  unembed = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  return logits, tokens, mask, hidden, unembed


def losses(mesh, logits, tokens, mask, hidden, unembed):
  """The three scoring forms as scalar losses (for values and gradients)."""

  def data_parallel(x):
    return lpk.score(x, tokens, mask).joint_logprob.sum()

  def vocab_parallel(x):
    return sharding.vocab_parallel_score(
      x, tokens, mask, mesh, batch_axis="data"
    ).joint_logprob.sum()

  def fused(h, w):
    s = sharding.vocab_parallel_score_hidden(h, w, tokens, mask, mesh, batch_axis="data")
    return s.joint_logprob.sum()

  return data_parallel, vocab_parallel, fused


def one_device(logits, tokens, mask, hidden, unembed):
  """Values and gradients of the three forms for the global batch on one device."""
  with jax.default_device(jax.local_devices()[0]):
    one_mesh = Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), ("data", "model"))
    dp, vp, fused = losses(one_mesh, logits, tokens, mask, hidden, unembed)
    return (
      jax.value_and_grad(dp)(logits),
      jax.value_and_grad(vp)(logits),
      jax.value_and_grad(fused, argnums=(0, 1))(hidden, unembed),
    )


def save_shards(path: str, out) -> None:
  """This process's shards of every result, with where each sits in the global array."""
  arrays = {}
  for k, leaf in enumerate(jax.tree.leaves(out)):
    for j, shard in enumerate(leaf.addressable_shards):
      arrays[f"leaf{k}_shard{j}"] = np.asarray(shard.data)
      bounds = [s.indices(n)[:2] for s, n in zip(shard.index, leaf.shape, strict=True)]
      arrays[f"leaf{k}_index{j}"] = np.array(bounds, np.int64).reshape(-1, 2)
  np.savez(path, **arrays)  # type: ignore[arg-type]  # names of arrays, not allow_pickle


def run(
  process_id: int,
  num_processes: int,
  coordinator: str,
  local_devices: int,
  check: bool,
  out_path: str | None = None,
):
  if local_devices:
    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)

  devices = np.array(jax.devices()).reshape(-1, 2)  # (data, model) across both processes
  mesh = Mesh(devices, ("data", "model"))
  logits, tokens, mask, hidden, unembed = global_batch()
  rows = B // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

  def global_array(local, spec):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)

  args = dict(
    logits=global_array(logits[mine], P("data", None, "model")),
    tokens=global_array(tokens[mine], P("data")),
    mask=global_array(mask[mine], P("data")),
    hidden=global_array(hidden[mine], P("data")),
    unembed=global_array(unembed, P(None, "model")),
  )

  @jax.jit
  def everything(logits, tokens, mask, hidden, unembed):
    dp, vp, fused = losses(mesh, logits, tokens, mask, hidden, unembed)
    return (
      jax.value_and_grad(dp)(logits),
      jax.value_and_grad(vp)(logits),
      jax.value_and_grad(fused, argnums=(0, 1))(hidden, unembed),
    )

  out = everything(**args)
  if out_path:
    save_shards(out_path, out)
  if not check:
    return out
  # The same global batch on this process's first device alone.
  want = one_device(logits, tokens, mask, hidden, unembed)
  for got, expected in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
    expected = np.asarray(expected)
    for shard in got.addressable_shards:  # this process's part of each global result
      np.testing.assert_allclose(
        np.asarray(shard.data), expected[shard.index], rtol=2e-5, atol=2e-5
      )
  print(f"process {process_id}: values and gradients match one device", flush=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coordinator", default="localhost:12345")
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument(
    "--local-devices", type=int, default=4, help="CPU devices per process (0: real accelerators)"
  )
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--out", help="write this process's result shards to this .npz file")
  args = parser.parse_args(argv)
  if args.local_devices and not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # before any backend starts
  run(
    args.process_id, args.num_processes, args.coordinator, args.local_devices, args.check, args.out
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
