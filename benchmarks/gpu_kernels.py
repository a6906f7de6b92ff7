"""Checks and times the Pallas GPU logits kernels on a GPU: ``python -m benchmarks.gpu_kernels``.

1. Correctness on the device (compiled, not interpret mode) against the plain
   reference: values, greedy flags and gradients, awkward V, softcap and
   per-row temperature, -inf rows and a NaN row.
2. Forward and forward+backward times at the accelerator shapes against the
   read and read+write floors measured in the same process, for the Pallas
   kernels (a few tilings), lpkernel's XLA path, the plain reference and optax.

Writes ``gpu-kernels-<stamp>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lpkernel as lpk
from benchmarks import floors
from benchmarks.runner import measure
from lpkernel import reference

TILINGS = [  # (block_rows, block_v, num_warps)
  (1, 4096, 8),
  (1, 8192, 8),
  (1, 8192, 16),
  (2, 4096, 8),
  (4, 2048, 8),
  (1, 2048, 4),
]
BWD_TILINGS = [(4, 1024, 4), (8, 1024, 8), (2, 2048, 8), (16, 512, 4)]


def _check(out: dict) -> None:
  rows = []
  for n, v in [(64, 1000), (37, 4097), (16, 32003), (8, 128256)]:
    for dtype in (jnp.float32, jnp.bfloat16):
      for softcap, tau in [(None, None), (30.0, "rows")]:
        k1, k2 = jax.random.split(jax.random.key(v))
        x = (4 * jax.random.normal(k1, (n, v))).astype(dtype)
        x = x.at[0].set(-jnp.inf).at[1, : v // 2].set(-jnp.inf).at[2, 5].set(jnp.nan)
        x = x.at[3, 1].set(x[3, 0])  # an exact tie for the first-argmax rule
        t = jax.random.randint(k2, (n,), 0, v).at[3].set(1).at[4].set(v - 1)
        temp = 1.0 if tau is None else jnp.linspace(0.5, 2.0, n)
        w = jax.random.normal(jax.random.key(1), (n,)).at[:3].set(0.0)

        def loss(x, impl):
          lp = lpk.token_logprobs(x, t, temperature=temp, softcap=softcap, implementation=impl)
          return jnp.sum(jnp.where(w != 0, w * lp, 0.0))

        got = lpk.token_logprobs_and_greedy(
          x, t, temperature=temp, softcap=softcap, implementation="pallas_gpu"
        )
        want = reference.token_logprobs_and_greedy(x, t, temperature=temp, softcap=softcap)
        g_got = jax.grad(loss)(x, "pallas_gpu").astype(jnp.float32)
        g_want = jax.grad(loss)(x, "reference").astype(jnp.float32)
        same_nan = bool(jnp.all(jnp.isnan(got[0]) == jnp.isnan(want[0])))
        finite = jnp.isfinite(want[0])
        rows.append(
          dict(
            n=n,
            v=v,
            dtype=jnp.dtype(dtype).name,
            softcap=softcap,
            tau=tau,
            max_lp_err=float(jnp.max(jnp.abs(jnp.where(finite, got[0] - want[0], 0.0)))),
            same_nan_and_inf=same_nan
            and bool(jnp.all(jnp.isneginf(got[0]) == jnp.isneginf(want[0]))),
            greedy_equal=bool(jnp.all(got[1] == want[1])),
            max_grad_err=float(jnp.nanmax(jnp.abs(g_got - g_want))),
          )
        )
        print("check", rows[-1], flush=True)
  out["checks"] = rows


def _time(out: dict, repeats: int) -> None:
  rows = []
  for b, t, v in [(8, 4096, 128256), (8, 512, 32000)]:
    for dtype in ("bfloat16", "float32"):
      x = (3 * jax.random.normal(jax.random.key(0), (b * t, v), jnp.float32)).astype(dtype)
      tg = jax.random.randint(jax.random.key(1), (b * t,), 0, v)
      gb = 2 * x.size * x.dtype.itemsize / 1e9
      read = measure(floors.read, (x,), repeats)[0].median_ms
      rw = measure(floors.read_write, (x,), repeats)[0].median_ms
      label = f"{b}x{t}x{v} {dtype}"
      print(f"{label}: read floor {read:.3f} ms, read+write {rw:.3f} ms", flush=True)

      def row(name, fn, floor, pass_):
        try:
          timing = measure(fn, (x,), repeats)[0]
        except Exception as e:  # a tiling the compiler rejects is reported, not fatal
          print(f"  {name} {pass_}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
          return
        r = dict(
          shape=label,
          method=name,
          pass_=pass_,
          ms=timing.median_ms,
          min_ms=timing.min_ms,
          floor_ms=floor,
          ratio=timing.median_ms / floor,
          temp_mb=timing.temp_mb,
        )
        rows.append(r)
        print(f"  {name:34s} {pass_:17s} {r['ms']:8.3f} ms  x{r['ratio']:.2f}", flush=True)

      def fwd(impl):
        return lambda x: jnp.sum(lpk.token_logprobs(x, tg, implementation=impl))

      def fwd_bwd(impl):
        return jax.grad(lambda x: jnp.sum(lpk.token_logprobs(x, tg, implementation=impl)))

      for bn, bv, nw in TILINGS:
        impl = lpk.PallasGpuLogits(block_rows=bn, block_v=bv, num_warps=nw)
        row(f"pallas fwd {bn}x{bv} w{nw}", fwd(impl), read, "forward")
      for bn, bv, nw in BWD_TILINGS:
        impl = lpk.PallasGpuLogits(bwd_block_rows=bn, bwd_block_v=bv, bwd_num_warps=nw)
        row(f"pallas bwd {bn}x{bv} w{nw}", fwd_bwd(impl), rw, "forward+backward")
      row("xla", fwd("xla"), read, "forward")
      row("xla", fwd_bwd("xla"), rw, "forward+backward")
      plain = lambda x: jnp.sum(reference.token_logprobs(x, tg))  # noqa: E731
      row("plain", plain, read, "forward")
      row("plain", jax.grad(plain), rw, "forward+backward")
      opt = lambda x: (
        -jnp.sum(  # noqa: E731
          optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), tg)
        )
      )
      row("optax", opt, read, "forward")
      row("optax", jax.grad(opt), rw, "forward+backward")
      del gb
  out["timings"] = rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--skip-checks", action="store_true")
  args = parser.parse_args(argv)
  out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  print(out, flush=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  path = f"{args.out}/gpu-kernels-{stamp}.json"
  try:
    if not args.skip_checks:
      _check(out)
    _time(out, args.repeats)
  finally:
    with open(path, "w") as f:
      json.dump(out, f, indent=1, default=lambda o: None if o is None else float(np.asarray(o)))
    print("wrote", path)


if __name__ == "__main__":
  main()
