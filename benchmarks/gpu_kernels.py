"""Checks and times the Pallas GPU kernels on a GPU: ``python -m benchmarks.gpu_kernels``.

0. The fused path first (the newest, unmeasured): ``PallasGpuFused`` checked on
   the device against the reference (values, lse, entropy, gradients, softcap
   and temperature, a tied table), then timed forward and forward+backward at
   N = 32768, D = 4096, V = 128256 bfloat16 against one and three bare matmuls,
   beside the XLA sweep, for a few chunk sizes.
1. Correctness on the device (compiled, not interpret mode) against the plain
   reference: values, greedy flags and gradients, awkward V, softcap and
   per-row temperature, -inf rows and a NaN row; and the training loss
   (``nll_loss`` with z-loss, its opt-in one kernel per row) and its gradient;
   ``d temperature`` of the per-token path and of the default loss (both from
   the gradient kernel).
2. Forward and forward+backward times at the accelerator shapes against the
   read and read+write floors measured in the same process: first the
   training loss (one kernel per row at a few tilings, the default two
   kernels, and the XLA form), then
   the Pallas kernels (a few tilings), lpkernel's XLA path, the plain reference
   and optax.
3. The opt-in processed kernels (``PallasGpuProcessed``): kept sets, values
   and gradients against the sorting reference, then forward and
   forward+backward times beside the XLA path, under the suite's sampler and
   under top-p alone (every row searched).

4. Replay from hidden states (``fused_replay_token_logprobs``, 512 kept ids,
   a tied table): the opt-in Pallas kernels checked on the device against the
   materialised reference (values, d hidden, d unembed, d temperature), then
   forward and forward+backward times at N = 4096, D = 2048, V = 151936
   bfloat16 beside XLA's steps and the fused full-vocabulary forward.

Before them (about a second): softcap's ``tanh``
(:func:`lpkernel.partials.monotone_tanh`) never decreases over every float32
from 0 to 12 on the device (its ``exp`` and division are the device's), beside
XLA's own ``tanh``'s count of decreases, nor ``exp`` over [-104, 0] (min-p and
the kept sets read its order).

Writes ``gpu-kernels-<stamp>.json`` to ``--out`` after each section. A section
that raises is recorded under ``errors`` and the next one runs; the run then
exits with an error naming the failed sections.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import lpkernel as lpk
from benchmarks import floors
from benchmarks.runner import measure
from lpkernel import reference

# (block_rows, block_v, num_warps): the default first, then the runners-up of the
# H200 run (gpu-kernels-20261127-142936.log), to leave time for the loss.
TILINGS = [(1, 2048, 4), (1, 4096, 8), (2, 4096, 8)]
LOSS_TILINGS = [(1, 2048, 4), (1, 4096, 8), (2, 2048, 8), (1, 1024, 4)]
BWD_TILINGS = [(4, 1024, 4), (2, 2048, 8)]
# The logits kernels' checks (rows, V) and timed shapes (B, T, V): the design's targets.
LOGITS_CHECKS = [(64, 1000), (37, 4097), (16, 32003), (8, 128256)]
LOGITS_TIMED = [(8, 4096, 128256), (8, 512, 32000)]
# The processed kernels' checks (rows per example, V) and timed logits shape (B, T, V).
PROCESSED_CHECKS = [(64, 1000), (37, 32003), (16, 151936)]
PROCESSED_TIMED = (8, 512, 32000)
# The timed samplers: the benchmark suite's (settled by the candidates), and top-p
# alone at temperature 1.5, whose nuclei on these logits (3800-5700 tokens) run
# past the 64 candidates: every row searched by XLA's bisection
# (select.largest_key_within: 15-25 masked sums over 1% of the rows at a time),
# the worst case, never yet timed on a GPU.
PROCESSED_SAMPLINGS = {
  "0.7/50/0.95": lpk.Sampling(0.7, 50, 0.95),
  "1.5/top-p 0.95 alone": lpk.Sampling(1.5, 0, 0.95),
}
PROCESSED_HIDDEN_CHECKS = [(300, 256, 32003)]  # (tokens per example, D, V)
PROCESSED_KERNELS = "pallas_gpu"  # (an interpret-mode object for a CPU smoke run)
# Replay: (N, D, V, K) checked, then timed (the shape, Qwen's vocabulary).
REPLAY_CHECK = (256, 2048, 151936, 512)
REPLAY_TIMED = (4096, 2048, 151936, 512)
REPLAY_KERNELS = "pallas_gpu"  # (an interpret-mode object for a CPU smoke run)


def _failure(what: str, e: Exception) -> str:
  """``e`` printed under ``what`` and returned as a short line: a method that
  fails (a tiling the compiler rejects, a kernel's first GPU) is reported, and
  the rest of its section still runs."""
  line = f"{type(e).__name__}: {str(e)[:500]}"
  print(f"  {what}: failed {line}", flush=True)
  return line


def _rel_err(got, want) -> float:
  """max |got - want| over max |want|, in float32."""
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-30))


def _max_err(got: list, want: list) -> float:
  """The largest |got - want| over pairs of arrays (NaN ignored; 0 for none)."""
  pairs = zip(got, want, strict=True)
  return max((float(jnp.nanmax(jnp.abs(a - b))) for a, b in pairs), default=0.0)


def _check_monotone(out: dict) -> None:
  """Decreases over consecutive float32: of softcap's ``tanh`` and XLA's on [0,
  12), and of ``exp`` on [-104, 0] (min-p and the kept sets read its order)."""
  from lpkernel.partials import monotone_tanh

  chunk = 1 << 25

  @jax.jit
  def decreases(start, f_id, limit):
    bits = start + lax.iota(jnp.int32, chunk + 1)  # one past: pairs across chunks
    y = lax.bitcast_convert_type(bits, jnp.float32)  # increasing bits: |y| increasing
    t = lax.switch(f_id, [monotone_tanh, jnp.tanh, lambda y: -jnp.exp(y)], y)
    return jnp.sum((t[1:] < t[:-1]) & (jnp.abs(y[1:]) <= limit), dtype=jnp.int32)

  ranges = {"softcap_tanh": (0.0, 12.0), "xla_tanh": (0.0, 12.0), "exp": (-0.0, -104.0)}
  for f_id, (name, (lo, hi)) in enumerate(ranges.items()):
    start, end = (int(np.float32(b).view(np.int32)) for b in (lo, hi))
    total = sum(int(decreases(jnp.int32(a), f_id, abs(hi))) for a in range(start, end, chunk))
    out[f"{name}_decreases"] = total
    print(name, f"decreases over every float32 from {lo} to {hi}:", total, flush=True)
  if out["softcap_tanh_decreases"] or out["exp_decreases"]:  # recorded; the checks run on
    print("FAIL: softcap's tanh or exp is not monotone on this device", flush=True)


def _check(out: dict) -> None:
  rows = []
  for n, v in LOGITS_CHECKS:
    for dtype in (jnp.float32, jnp.bfloat16):
      for softcap, tau in [(None, None), (30.0, "rows")]:
        k1, k2 = jax.random.split(jax.random.key(v))
        x = (4 * jax.random.normal(k1, (n, v))).astype(dtype)
        x = x.at[0].set(-jnp.inf).at[1, : v // 2].set(-jnp.inf).at[2, 5].set(jnp.nan)
        x = x.at[3, 1].set(x[3, 0])  # an exact tie for the first-argmax rule
        t = jax.random.randint(k2, (n,), 0, v).at[3].set(1).at[4].set(v - 1)
        temp = 1.0 if tau is None else jnp.linspace(0.5, 2.0, n)
        w = jax.random.normal(jax.random.key(1), (n,)).at[:3].set(0.0)

        def loss(x, temp, impl):
          lp = lpk.token_logprobs(x, t, temperature=temp, softcap=softcap, implementation=impl)
          return jnp.sum(jnp.where(w != 0, w * lp, 0.0))

        def nll(x, temp, impl):
          return lpk.nll_loss(
            x, t, jnp.abs(w), z_loss=1e-4, temperature=temp, softcap=softcap, implementation=impl
          )

        # d temperature too (from the gradient kernel) when it is an array.
        argnums = (0,) if tau is None else (0, 1)

        def grads(fn, impl):
          return [a.astype(jnp.float32) for a in jax.grad(fn, argnums)(x, temp, impl)]

        # The training loss in one kernel per row (splits=1), gradient included.
        one_kernel = lpk.PallasGpuLogits(splits=1, loss_kernel=True)
        loss_got, g_loss = jax.value_and_grad(nll)(x, temp, one_kernel)
        loss_want, g_loss_want = jax.value_and_grad(nll)(x, temp, "reference")
        got = lpk.token_logprobs_and_greedy(
          x, t, temperature=temp, softcap=softcap, implementation="pallas_gpu"
        )
        want = reference.token_logprobs_and_greedy(x, t, temperature=temp, softcap=softcap)
        g_got, *dtau_got = grads(loss, "pallas_gpu")
        g_want, *dtau_want = grads(loss, "reference")
        # The default loss (forward kernel, then the gradient kernel with d tau).
        two_got, two_want = grads(nll, "pallas_gpu")[1:], grads(nll, "reference")[1:]
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
            loss_rel_err=float(jnp.abs(loss_got - loss_want) / jnp.abs(loss_want)),
            max_loss_grad_err=float(
              jnp.nanmax(jnp.abs(g_loss.astype(jnp.float32) - g_loss_want.astype(jnp.float32)))
            ),
            max_dtau_err=_max_err(dtau_got, dtau_want),
            max_loss_dtau_err=_max_err(two_got, two_want),
          )
        )
        print("check", rows[-1], flush=True)
  out["checks"] = rows


FUSED_CHUNKS = [None, 4096, 8192]  # tokens per chunk (None: 1 GiB of float32 logits)
FUSED_CHECKS = [(300, 256, 32003, jnp.float32), (1000, 512, 128256, jnp.bfloat16)]  # N, D, V
FUSED_TIMED = (32768, 4096, 128256)  # N, D, V in bfloat16


def _check_fused(out: dict) -> None:
  rows = []
  for n, d, v, dtype in FUSED_CHECKS:
    k = jax.random.split(jax.random.key(v), 3)
    h = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (d, v), jnp.float32) / d**0.5).astype(dtype)
    t = jax.random.randint(k[2], (n,), 0, v)
    c = jax.random.normal(jax.random.key(3), (3, n))
    for vocab_axis, softcap, tau in [(1, None, None), (0, 30.0, jnp.linspace(0.5, 2.0, n))]:
      table = w if vocab_axis == 1 else w.T
      temp = 1.0 if tau is None else tau

      def loss(h, table, impl):
        s = lpk.fused_token_stats(
          h,
          table,
          t,
          temperature=temp,
          softcap=softcap,
          implementation=impl,
          vocab_axis=vocab_axis,
        )
        return jnp.sum(c[0] * s.logprobs + c[1] * s.lse + c[2] * s.entropy), s

      impl = lpk.PallasGpuFused(chunk_tokens=128)  # several chunks and a tail
      with jax.default_matmul_precision("highest"):
        (_, got), g = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(
          h, table, impl
        )
        (_, want), g_ref = jax.jit(
          jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2
        )(h, table, "reference")
      err = {
        f: float(jnp.max(jnp.abs(getattr(got, f) - getattr(want, f))))
        for f in ("logprobs", "lse", "entropy")
      }
      for name, a, b in zip(("dh", "dw"), g, g_ref, strict=True):
        err[name] = _rel_err(a, b)
      err["greedy_mismatches"] = int(jnp.sum(got.greedy != want.greedy))

      def nll(h, table, impl):
        return lpk.fused_nll_loss(
          h,
          table,
          t,
          c[0] ** 2,
          z_loss=1e-4,
          temperature=temp,
          softcap=softcap,
          implementation=impl,
          vocab_axis=vocab_axis,
        )

      with jax.default_matmul_precision("highest"):
        grad = jax.jit(jax.value_and_grad(nll, (0, 1)), static_argnums=2)
        (got_loss, g), (want_loss, g_ref) = grad(h, table, impl), grad(h, table, "reference")
      err["loss_rel"] = float(jnp.abs(got_loss - want_loss) / jnp.abs(want_loss))
      for name, a, b in zip(("loss_dh", "loss_dw"), g, g_ref, strict=True):
        err[name] = _rel_err(a, b)
      r = dict(
        n=n,
        d=d,
        v=v,
        dtype=jnp.dtype(dtype).name,
        vocab_axis=vocab_axis,
        softcap=softcap,
        temperature=tau is not None,
        **err,
      )
      rows.append(r)
      print("fused check", r, flush=True)
  out["fused_checks"] = rows


def _beside_reference(grad, args: tuple, impl, r: dict, rows: list):
  """``(want, d want, got, d got)``: ``grad(*args, impl)``'s value, aux and
  gradients and the reference's; None where the implementation fails, its
  error then appended to ``rows`` as ``r``'s row."""
  (_, want), g_ref = grad(*args, "reference")
  try:
    (_, got), g = grad(*args, impl)
  except Exception as e:
    rows.append({**r, "error": _failure(f"processed check {r}", e)})
    return None
  return want, g_ref, got, g


def _check_processed(out: dict) -> None:
  """The opt-in processed kernels (``PallasGpuProcessed``) on the device against
  the sorting reference: kept sets, values, d logits and d temperature; then
  both implementations' forward and forward+backward times at B8 T512 V32000
  under each of :data:`PROCESSED_SAMPLINGS`."""
  impl = PROCESSED_KERNELS
  rows = []
  sampling = lpk.Sampling(top_k=jnp.array([0, 50, 2000, 7]), top_p=jnp.array([0.95, 1.0, 0.9, 0.5]))
  for n, v in PROCESSED_CHECKS:
    for dtype in (jnp.float32, jnp.bfloat16):
      k1, k2 = jax.random.split(jax.random.key(v))
      x = (4 * jax.random.normal(k1, (4, n, v))).astype(dtype)
      t = jax.random.randint(k2, (4, n), 0, v)
      tau = jnp.array([0.7, 1.0, 1.3, 0.9])

      def loss(x, tau, impl):
        s = lpk.processed_token_stats(
          x, t, sampling._replace(temperature=tau), softcap=30.0, implementation=impl
        )
        return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0)) + 0.3 * jnp.sum(s.raw_logprobs), s

      grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
      r = dict(n=n, v=v, dtype=jnp.dtype(dtype).name)
      if (pair := _beside_reference(grad, (x, tau), impl, r, rows)) is None:
        continue
      want, g_ref, got, g = pair
      r["kept_set_mismatches"] = int(jnp.sum(got.kept_count != want.kept_count))
      r["kept_mismatches"] = int(jnp.sum(got.kept != want.kept))
      r["logprobs"] = _max_err([jnp.where(want.kept, got.logprobs, 0)], [
        jnp.where(want.kept, want.logprobs, 0)
      ])  # fmt: skip
      for name, a, b in zip(("dx", "dtau"), g, g_ref, strict=True):
        r[name] = _rel_err(a, b)
      rows.append(r)
      print("processed check", r, flush=True)
  for n, d, v in PROCESSED_HIDDEN_CHECKS:  # from hidden states: token chunks and a tail
    k = jax.random.split(jax.random.key(v), 3)
    h = jax.random.normal(k[0], (4, n, d), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (d, v), jnp.float32) / d**0.25).astype(jnp.bfloat16)
    t = jax.random.randint(k[2], (4, n), 0, v)
    chunks = impl
    if isinstance(impl, str):
      chunks = lpk.PallasGpuProcessed(fused=lpk.PallasGpuFused(chunk_tokens=n))

    def hidden_loss(h, w, impl):
      s = lpk.fused_processed_token_stats(
        h, w, t, sampling._replace(temperature=0.8), implementation=impl
      )
      return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0)) + 0.3 * jnp.sum(s.raw_logprobs), s

    grad = jax.jit(jax.value_and_grad(hidden_loss, (0, 1), has_aux=True), static_argnums=2)
    r = dict(n=4 * n, d=d, v=v, dtype="bfloat16", path="hidden")
    with jax.default_matmul_precision("highest"):
      pair = _beside_reference(grad, (h, w), chunks, r, rows)
    if pair is None:
      continue
    want, g_ref, got, g = pair
    r["kept_set_mismatches"] = int(jnp.sum(got.kept_count != want.kept_count))
    for name, a, b in zip(("dh", "dw"), g, g_ref, strict=True):
      r[name] = _rel_err(a, b)
    rows.append(r)
    print("processed check", r, flush=True)
  out["processed_checks"] = rows
  timings = []
  for dtype in (jnp.bfloat16, jnp.float32):
    b, t_len, v = PROCESSED_TIMED
    x = (4 * jax.random.normal(jax.random.key(0), (b, t_len, v))).astype(dtype)
    t = jax.random.randint(jax.random.key(1), (b, t_len), 0, v)
    read = measure(floors.read, (x,), 10)[0].median_ms
    for (label, sampling), name in itertools.product(PROCESSED_SAMPLINGS.items(), ("xla", impl)):

      def fwd(x, name=name, sampling=sampling):
        s = lpk.processed_token_stats(x, t, sampling, implementation=name)
        return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0))

      r = dict(dtype=jnp.dtype(dtype).name, impl=getattr(name, "name", name), sampling=label)
      try:
        f_ms = measure(fwd, (x,), 10)[0].median_ms
        fb_ms = measure(jax.grad(fwd), (x,), 10)[0].median_ms
      except Exception as e:
        timings.append({**r, "error": _failure(f"processed time {r}", e)})
        continue
      r.update(forward_ms=f_ms, fwd_bwd_ms=fb_ms)
      r["forward_x_read"] = f_ms / read
      timings.append(r)
      print("processed time", r, flush=True)
  out["processed_timings"] = timings


def _replay_inputs(n, d, v, k):
  """A tied bfloat16 table ``[V, D]``, hidden states, targets, and distinct kept
  ids spread over the table (the target first, every 7th position padded with
  -1 past half of its ids), and per-token temperatures."""
  keys = jax.random.split(jax.random.key(n), 4)
  h = jax.random.normal(keys[0], (n, d), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(keys[1], (v, d), jnp.float32) / d**0.5).astype(jnp.bfloat16)
  t = jax.random.randint(keys[2], (n,), 0, v)
  ids = (t[:, None] + 293 * jnp.arange(k)) % v  # distinct while 293 * K < V
  ids = jnp.where((jnp.arange(n) % 7 == 0)[:, None] & (jnp.arange(k) >= k // 2), -1, ids)
  tau = jax.random.uniform(keys[3], (n,), jnp.float32, 0.6, 1.2)
  return h, w, t, ids.astype(jnp.int32), tau


def _replay(out: dict, repeats: int) -> None:
  """Section 4: the replay's Pallas kernels checked against the reference, then
  timed beside XLA's steps and the fused full-vocabulary forward."""

  def replayed(impl, t, ids):
    def f(h, w, tau):
      lp = lpk.fused_replay_token_logprobs(
        h, w, t, ids, temperature=tau, vocab_axis=0, implementation=impl
      )
      return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0.0))

    return f

  h, w, t, ids, tau = _replay_inputs(*REPLAY_CHECK)

  def grads(impl):
    with jax.default_matmul_precision("highest"):
      return jax.jit(jax.value_and_grad(replayed(impl, t, ids), (0, 1, 2)))(h, w, tau)

  want = grads("reference")
  checks = []
  for impl in ("xla", REPLAY_KERNELS):
    r = dict(impl=getattr(impl, "name", impl))
    try:
      got = grads(impl)
    except Exception as e:
      checks.append({**r, "error": _failure(f"replay check {r['impl']}", e)})
      continue
    for name, a, b in zip(("value", "dh", "dw", "dtau"), jax.tree.leaves(got),
                          jax.tree.leaves(want), strict=True):  # fmt: skip
      r[name] = _rel_err(a, b)
    checks.append(r)
    print("replay check", r, flush=True)
  out["replay_checks"] = checks
  n, d, v, k = REPLAY_TIMED
  h, w, t, ids, tau = _replay_inputs(*REPLAY_TIMED)
  fused = lambda h, w, tau: jnp.sum(lpk.fused_token_logprobs(h, w, t, vocab_axis=0))  # noqa: E731
  rows = []
  for name, f in [("fused forward", fused)] + [
    (getattr(impl, "name", impl), replayed(impl, t, ids)) for impl in ("xla", REPLAY_KERNELS)
  ]:
    for pass_, fn in (("forward", f), ("forward+backward", jax.grad(f, (0, 1, 2)))):
      if name == "fused forward" and pass_ != "forward":
        continue
      try:
        timing = measure(fn, (h, w, tau), repeats)[0]
      except Exception as e:
        _failure(f"replay {name} {pass_}", e)
        continue
      r = dict(method=name, pass_=pass_, ms=timing.median_ms, temp_mb=timing.temp_mb)
      rows.append(r)
      print(f"  replay N{n} D{d} V{v} K{k} {name:14s} {pass_:17s} {r['ms']:8.2f} ms", flush=True)
  out["replay_timings"] = rows


def _time_fused(out: dict, repeats: int) -> None:
  rows = []
  n, d, v = FUSED_TIMED
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (n, d), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(k[1], (d, v), jnp.float32) / d**0.5).astype(jnp.bfloat16)
  t = jax.random.randint(k[2], (n,), 0, v)
  one = measure(floors.matmul, (h, w), repeats)[0].median_ms
  three = measure(floors.three_matmuls, (h, w), repeats)[0].median_ms
  print(f"fused N{n} D{d} V{v} bfloat16: one matmul {one:.1f} ms, three {three:.1f} ms", flush=True)

  def fwd(impl):
    return lambda h, w: jnp.sum(lpk.fused_token_logprobs(h, w, t, implementation=impl))

  def loss(impl):  # the training loss: gradients written in the forward pass
    return jax.grad(lambda h, w: lpk.fused_nll_loss(h, w, t, implementation=impl), (0, 1))

  chunked = lpk.XlaFused(lpk.FusedConfig(loss_chunks=True))
  impls = [("xla", "xla")] + [
    (f"pallas_gpu chunk={c}", lpk.PallasGpuFused(chunk_tokens=c)) for c in FUSED_CHUNKS
  ]
  for name, impl in [*impls, ("xla loss chunks", chunked)]:
    passes = [
      ("forward", fwd(impl), one),
      ("forward+backward", jax.grad(fwd(impl), argnums=(0, 1)), three),
    ]
    passes = [("loss forward+backward", loss(impl), three)] + ([] if impl is chunked else passes)
    for pass_, fn, floor in passes:
      try:
        timing = measure(fn, (h, w), repeats)[0]
      except Exception as e:
        _failure(f"{name} {pass_}", e)
        continue
      r = dict(
        method=name,
        pass_=pass_,
        ms=timing.median_ms,
        floor_ms=floor,
        ratio=timing.median_ms / floor,
        temp_mb=timing.temp_mb,
      )
      rows.append(r)
      print(
        f"  {name:28s} {pass_:21s} {r['ms']:8.1f} ms  x{r['ratio']:.2f}  {r['temp_mb']} MB",
        flush=True,
      )
  out["fused_timings"] = rows


def _time(out: dict, repeats: int) -> None:
  rows = []
  for b, t, v in LOGITS_TIMED:
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
        except Exception as e:
          _failure(f"{name} {pass_}", e)
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
        print(f"  {name:34s} {pass_:21s} {r['ms']:8.3f} ms  x{r['ratio']:.2f}", flush=True)

      def fwd(impl):
        return lambda x: jnp.sum(lpk.token_logprobs(x, tg, implementation=impl))

      def fwd_bwd(impl):
        return jax.grad(lambda x: jnp.sum(lpk.token_logprobs(x, tg, implementation=impl)))

      def loss(impl):  # the training loss: d logits written in the forward pass
        return jax.grad(lambda x: lpk.nll_loss(x, tg, implementation=impl))

      # The loss first (the forward+backward target is read+write x1.3): its one
      # kernel per row (opt-in) at a few tilings, the default (forward kernel,
      # then gradient kernel), and the XLA form.
      for bn, bv, nw in LOSS_TILINGS:
        impl = lpk.PallasGpuLogits(block_rows=bn, block_v=bv, num_warps=nw, loss_kernel=True)
        row(f"pallas loss 1 kernel {bn}x{bv} w{nw}", loss(impl), rw, "forward+backward")
      row("pallas loss 2 kernels", loss("pallas_gpu"), rw, "forward+backward")
      row("xla loss", loss("xla"), rw, "forward+backward")
      for bn, bv, nw in TILINGS:
        impl = lpk.PallasGpuLogits(block_rows=bn, block_v=bv, num_warps=nw)
        row(f"pallas fwd {bn}x{bv} w{nw}", fwd(impl), read, "forward")
      for bn, bv, nw in BWD_TILINGS:
        impl = lpk.PallasGpuLogits(bwd_block_rows=bn, bwd_block_v=bv, bwd_num_warps=nw)
        row(f"pallas bwd {bn}x{bv} w{nw}", fwd_bwd(impl), rw, "forward+backward")
      row("xla", fwd("xla"), read, "forward")
      row("xla", fwd_bwd("xla"), rw, "forward+backward")
      plain = lambda x: jnp.sum(  # noqa: E731
        jnp.take_along_axis(jax.nn.log_softmax(x.astype(jnp.float32)), tg[:, None], -1)
      )
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


# The sections in their default order, most important first.
SECTIONS = (
  "monotone",
  "fused-check",
  "fused-time",
  "logits-check",
  "logits-time",
  "processed",
  "replay",
)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--skip-checks", action="store_true")
  parser.add_argument(
    "--sections",
    default=",".join(SECTIONS),
    help="comma-separated, run in this order (a short device budget: processed,replay)",
  )
  args = parser.parse_args(argv)
  chosen = args.sections.split(",")
  unknown = sorted(set(chosen) - set(SECTIONS))
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
  out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  print(out, flush=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  path = f"{args.out}/gpu-kernels-{stamp}.json"
  sections = {
    "monotone": None if args.skip_checks else _check_monotone,
    "fused-check": None if args.skip_checks else _check_fused,
    "fused-time": lambda out: _time_fused(out, min(args.repeats, 10)),
    "logits-check": None if args.skip_checks else _check,
    "logits-time": lambda out: _time(out, args.repeats),
    "processed": None if args.skip_checks else _check_processed,
    "replay": lambda out: _replay(out, min(args.repeats, 10)),
  }
  for name in chosen:
    if sections[name] is None:
      continue
    try:
      sections[name](out)
    except Exception as e:  # a failing section (a kernel's first GPU) leaves the next its time
      traceback.print_exc()
      out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:4000]
    finally:  # after every section: a run cut short by its timeout keeps what it measured
      with open(path, "w") as f:
        json.dump(out, f, indent=1, default=lambda o: None if o is None else float(np.asarray(o)))
      print("wrote", path, flush=True)
  if "errors" in out:
    raise SystemExit(f"sections failed: {sorted(out['errors'])} (their errors in {path})")


if __name__ == "__main__":
  main()
