"""Runs a suite: builds inputs, measures floors and methods, returns result rows."""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from benchmarks import floors
from benchmarks.methods import BASELINE, METHODS, Method
from benchmarks.suites import PASSES, Case

KEPT_IDS = 512  # the replayed kept set's size


@dataclasses.dataclass
class Timing:
  median_ms: float
  min_ms: float
  max_ms: float
  temp_mb: float | None


def _temp_mb(compiled) -> float | None:
  stats = compiled.memory_analysis()
  return None if stats is None else stats.temp_size_in_bytes / 1e6


# Fast rows run more than `repeats` times: until this much time is timed (each
# row's median then over a few dozen runs, not three, on a shared machine).
MIN_TIMED_SECONDS = 0.2
MAX_REPEATS = 30
# A row whose run takes under this many seconds runs once untimed at the start of
# each turn: the run after another function's bore its after-effects (the fused
# forward at N 4096, D 512, V 32000 in bfloat16 on 2 CPU cores: 182 ms median
# timed in turns with the floors' matmuls, whose float32 logits are 0.5 GB, 164
# ms without them; their minima 156 and 160 ms). A slower row's run outweighs
# them, and a second run would cost more of the suite's time.
SETTLE_SECONDS = 0.5


def measure(fn: Callable, args: tuple, repeats: int, warmup: int = 1) -> tuple[Timing, object]:
  """(Timing, value) of ``fn`` alone: :func:`measure_in_turns` with one function
  (``repeats`` runs after the warm-up, or more, up to ``MAX_REPEATS``, until
  about ``MIN_TIMED_SECONDS`` are timed). Raises what compiling or running it
  raised."""
  got = measure_in_turns({0: (fn, args)}, repeats, warmup)[0]
  if isinstance(got, Exception):
    raise got
  return got


def _timed(compiled, args) -> tuple[object, float]:
  """(output, milliseconds) of one run."""
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, (time.perf_counter() - start) * 1e3


def measure_in_turns(
  tasks: dict, repeats: int, warmup: int = 1, on_step: Callable[[], None] = lambda: None
) -> dict:
  """Times several functions in turns: ``repeats`` rounds, each running every
  one (in a fresh shuffled order), so that a shared machine's slow spells fall
  on all of them alike instead of on whichever was timed at that moment; a
  function whose run takes under ``SETTLE_SECONDS`` runs once untimed at the
  start of each of its turns, so that no timed run bears the after-effects of
  the function before it (a run with large temporaries). A function whose
  warm-up run took under ``MIN_TIMED_SECONDS / repeats`` runs several times a
  round, so that about that much of it is timed (up to ``MAX_REPEATS`` runs in
  all), as :func:`measure`.

  Args:
    tasks: ``{key: (fn, args)}``.
    on_step: called after each function's compile and warm-up, and after each round.

  Returns:
    ``{key: (Timing, value)}`` (the warm-up's output as a float where it is one
    number, else None: no gradient is held while the others run), or ``{key:
    exception}`` for a function that failed to compile or warm up.
  """
  ready, out = {}, {}
  for key, (fn, args) in tasks.items():
    try:
      compiled = jax.jit(fn).lower(*args).compile()
      result, warm_ms = None, 0.0
      for _ in range(warmup):
        result, warm_ms = _timed(compiled, args)
    except Exception as e:  # noqa: BLE001 - a peer failing on this backend is reported
      out[key] = e
    else:
      total = min(
        max(repeats, MAX_REPEATS), max(1, int(1e3 * MIN_TIMED_SECONDS / max(warm_ms, 1e-3)))
      )
      value = float(result) if getattr(result, "size", None) == 1 else None
      per_round = max(repeats, total) // repeats
      ready[key] = (compiled, args, value, per_round, [], warm_ms < 1e3 * SETTLE_SECONDS)
    on_step()
  order = list(ready)
  shuffle = random.Random(0).shuffle
  for _ in range(repeats):
    shuffle(order)
    for key in order:
      compiled, args, _, per_round, times, settle = ready[key]
      if settle:
        _timed(compiled, args)
      times.extend(_timed(compiled, args)[1] for _ in range(per_round))
    on_step()
  for key, (compiled, _, value, _, times, _) in ready.items():
    timing = Timing(statistics.median(times), min(times), max(times), _temp_mb(compiled))
    out[key] = (timing, value)
  return out


def make_inputs(case: Case, seed: int = 0) -> dict:
  """Random inputs for a case: logits rows or hidden states, targets and masks."""
  s, dtype = case.shape, jnp.dtype(case.dtype)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  if case.fused:
    hidden = jax.random.normal(k1, (s.tokens, s.width), jnp.float32).astype(dtype)
    unembed = (jax.random.normal(k2, (s.width, s.vocab), jnp.float32) / s.width**0.5).astype(dtype)
    targets = jax.random.randint(k3, (s.tokens,), 0, s.vocab, jnp.int32)
    # A recorded kept set per token: the target and 511 other distinct ids (-1 past V).
    spread = jnp.arange(KEPT_IDS, dtype=jnp.int32) * 7919
    kept_ids = (targets[:, None] + spread) % s.vocab
    kept_ids = jnp.where(jnp.arange(KEPT_IDS) < s.vocab, kept_ids, -1)
    return {
      "hidden": hidden,
      "unembed": unembed,
      "unembed_t": unembed.T.copy(),
      "targets": targets,
      "kept_ids": kept_ids,
    }
  logits = (3 * jax.random.normal(k1, (s.batch, s.time, s.vocab), jnp.float32)).astype(dtype)
  tokens = jax.random.randint(k2, (s.batch, s.time), 0, s.vocab, jnp.int32)
  response_mask = jnp.broadcast_to(jnp.arange(s.time) >= s.time // 2, (s.batch, s.time))
  return {"logits": logits, "tokens": tokens, "response_mask": response_mask}


def _floor_tasks(case: Case) -> dict[str, tuple[Callable, tuple[str, ...]]]:
  if case.fused:
    return {name: (fn, ("hidden", "unembed")) for name, fn in floors.FUSED_FLOORS.items()}
  return {name: (fn, ("logits",)) for name, fn in floors.LOGITS_FLOORS.items()}


def _pass_fn(method: Method, pass_name: str, names: list[str]) -> Callable:
  """A positional-argument function for one pass over the named inputs."""

  def loss(*args):
    return method.loss(dict(zip(names, args, strict=True)))

  if pass_name == "forward":
    return loss
  argnums = tuple(names.index(n) for n in method.wrt)
  return jax.grad(loss, argnums=argnums)


def _bytes_read(case: Case) -> int:
  s, itemsize = case.shape, jnp.dtype(case.dtype).itemsize
  if case.fused:
    return (s.tokens * s.width + s.width * s.vocab) * itemsize
  return s.batch * s.time * s.vocab * itemsize


def run_case(case: Case, methods: list[Method], passes, repeats: int, on_step=lambda: None) -> dict:
  """Floors and method rows for one case, timed in turns (:func:`measure_in_turns`)."""
  inputs = make_inputs(case)
  names = sorted(inputs)
  tasks = {
    ("floor", name): (fn, tuple(inputs[a] for a in arg_names))
    for name, (fn, arg_names) in _floor_tasks(case).items()
  }
  rows = []
  for method in methods:
    if method.fused != case.fused:
      continue
    for pass_name in case.passes or passes:
      row = dict(
        method=method.name,
        case=case.label,
        shape=case.shape._asdict(),
        dtype=case.dtype,
        pass_=pass_name,
        fused=case.fused,
      )
      reason = method.missing()
      if case.methods is not None and method.name not in case.methods:
        reason = "not run at this shape (see the suite)"
      reason = reason or method.skip(case, pass_name)
      if reason is None:
        fn = _pass_fn(method, pass_name, names)
        tasks[(method.name, pass_name)] = (fn, tuple(inputs[n] for n in names))
      else:
        on_step()
      rows.append((row, reason))
  measured = measure_in_turns(tasks, repeats, on_step=on_step)
  floor_ms = {}
  for name in _floor_tasks(case):
    got = measured[("floor", name)]
    if isinstance(got, Exception):
      raise got
    floor_ms[name] = got[0].median_ms
  if not case.fused:
    floor_ms["read+write+2exp"] = floor_ms["read+write"] + 2 * floor_ms["exp"]
  results = [_row(case, row, reason, measured) for row, reason in rows]
  _add_ratios(results, floor_ms, case)
  return {"case": case.label, "fused": case.fused, "floors_ms": floor_ms, "rows": results}


def _row(case: Case, row: dict, reason: str | None, measured: dict) -> dict:
  """A method row: skipped with its reason (or the error that stopped it), or
  its timing, throughput and forward value."""
  got = None if reason else measured[(row["method"], row["pass_"])]
  if isinstance(got, Exception):
    reason = f"{type(got).__name__}: {str(got).splitlines()[0][:160]}"
  if reason:
    return row | dict(status="skipped", reason=reason)
  timing, value = got
  row |= dict(status="ok", **dataclasses.asdict(timing))
  if row["pass_"] == "forward":
    row["value"] = value
  row["tokens_per_s"] = case.shape.tokens / (timing.median_ms / 1e3)
  row["gb_per_s"] = _bytes_read(case) / 1e9 / (timing.median_ms / 1e3)
  return row


def _add_ratios(rows: list[dict], floor_ms: dict, case: Case) -> None:
  """Each row against the floors, its baseline (the method's own, else the
  case's) and lpkernel's plain per-token path (``vs_lpkernel``)."""
  ok = {(r["method"], r["pass_"]): r for r in rows if r["status"] == "ok"}
  lpkernel = "lpkernel-fused" if case.fused else "lpkernel"
  baselines = {m.name: m.baseline for m in METHODS}
  for r in rows:
    if r["status"] != "ok":
      continue
    base = ok.get((baselines.get(r["method"]) or BASELINE[case.fused], r["pass_"]))
    plain = ok.get((lpkernel, r["pass_"]))
    r["vs_lpkernel"] = r["median_ms"] / plain["median_ms"] if plain else None
    if case.fused:
      floor_names = ("matmul",) if r["pass_"] == "forward" else ("3 matmuls",)
    else:
      floor_names = ("read", "exp") if r["pass_"] == "forward" else ("read+write+2exp",)
    r["vs_floor"] = {f: r["median_ms"] / floor_ms[f] for f in floor_names}
    r["vs_baseline"] = r["median_ms"] / base["median_ms"] if base else None
    if "value" in r and base and "value" in base:
      r["rel_diff_vs_baseline"] = abs(r["value"] - base["value"]) / max(abs(base["value"]), 1e-30)


def steps(cases: list[Case], methods: list[Method], passes, repeats: int) -> int:
  """Progress steps of a suite: each floor and row, and each case's rounds."""
  total = 0
  for case in cases:
    total += len(_floor_tasks(case)) + repeats
    total += sum(len(case.passes or passes) for m in methods if m.fused == case.fused)
  return total


def run_suite(
  cases: list[Case], methods: list[Method], passes=PASSES, repeats: int = 5, progress: bool = True
) -> list[dict]:
  """Runs every case; a tqdm bar shows the sweep when ``progress``."""
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=steps(cases, methods, passes, repeats), desc="benchmarks", unit="run")
  results = []
  for case in cases:
    if bar is not None:
      bar.set_postfix_str(case.label)
    results.append(
      run_case(case, methods, passes, repeats, on_step=bar.update if bar else lambda: None)
    )
  if bar is not None:
    bar.close()
  return results
