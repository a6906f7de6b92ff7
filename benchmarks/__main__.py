"""``python -m benchmarks``: run a suite, print the table, write JSON and a plot.

On the CPU the suite runs twice when Debian's tcmalloc is installed, once under
the current allocator and once with tcmalloc preloaded: writing fresh large
buffers is page-fault bound under glibc malloc, and that moves the backward rows.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from benchmarks import loglikelihood, policy_step, report, tune
from benchmarks import methods as methods_lib
from benchmarks.runner import run_suite
from benchmarks.suites import PASSES, SUITES

TCMALLOC_GLOBS = [
  "/usr/lib/*-linux-gnu/libtcmalloc*.so.4",
  "/usr/lib64/libtcmalloc*.so.4",
  "/usr/lib/libtcmalloc*.so.4",
]


def current_allocator() -> str:
  return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default"


def find_tcmalloc() -> str | None:
  found = sorted(p for g in TCMALLOC_GLOBS for p in glob.glob(g) if "debug" not in p)
  return found[0] if found else None


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
  p.add_argument("--suite", choices=sorted(SUITES), default="default")
  p.add_argument("--methods", nargs="*", help=f"subset of {[m.name for m in methods_lib.METHODS]}")
  p.add_argument("--passes", nargs="*", choices=PASSES, default=list(PASSES))
  p.add_argument(
    "--repeats",
    type=int,
    default=3,
    help="timed runs per row, at least (after a warm-up; fast rows: 0.2 s of runs, up to 30)",
  )
  p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
  p.add_argument(
    "--allocator",
    choices=["both", "current"],
    default="both",
    help="CPU: also rerun with tcmalloc preloaded when it is installed",
  )
  p.add_argument(
    "--tune",
    action="store_true",
    help="time the fused path's candidate configurations on this machine and write "
    "lpkernel's tuned table (then exit)",
  )
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--raw-json", type=Path, help=argparse.SUPPRESS)  # child runs write here
  p.add_argument("--case", type=int, help=argparse.SUPPRESS)  # child runs: one case of the suite
  return p.parse_args(argv)


def _run_here(args) -> list[dict]:
  cases = SUITES[args.suite]
  results = run_suite(
    cases if args.case is None else [cases[args.case]],
    methods_lib.by_name(args.methods),
    tuple(args.passes),
    args.repeats,
    progress=not args.no_progress,
  )
  for res in results:
    res["allocator"] = current_allocator()
  return results


def _run_child(preload: str | None, argv: list[str]) -> list[dict]:
  """Runs the suite in a fresh process (with ``preload`` as LD_PRELOAD) and reads its rows."""
  with tempfile.TemporaryDirectory() as tmp:
    raw = Path(tmp) / "raw.json"
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
      env["LD_PRELOAD"] = preload
    cmd = [
      sys.executable,
      "-m",
      "benchmarks",
      *argv,
      "--allocator",
      "current",
      "--raw-json",
      str(raw),
    ]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(raw.read_text())


def _progress(items, show: bool):
  if not show:
    return items
  from tqdm.auto import tqdm

  return tqdm(items, desc="benchmarks (case, allocator)", unit="case")


def _both_allocators(args) -> bool:
  return (
    args.allocator == "both" and jax.default_backend() == "cpu" and current_allocator() == "default"
  )


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.tune:
    rows = tune.tune(SUITES[args.suite], args.repeats)
    print(tune.table(rows))
    print(f"\nwrote {tune.tuning.table_path()}")
    return {"tune": rows}
  tcmalloc = find_tcmalloc()
  if args.raw_json or not _both_allocators(args) or not tcmalloc:
    if not args.raw_json and _both_allocators(args):
      print("tcmalloc not found (apt-get install libtcmalloc-minimal4): default allocator only")
    results = _run_here(args)
    if args.raw_json:
      args.raw_json.write_text(json.dumps(results))
      return {}
  else:
    # One fresh process per case and allocator: no run inherits another's heap
    # (the largest rows hold several GB, and tcmalloc keeps what it frees; a
    # whole suite in one tcmalloc process was OOM-killed at 24 GB here).
    child_argv = [a for a in argv if a not in ("--allocator", "both")] + ["--no-progress"]
    runs = [(alloc, i) for alloc in (None, tcmalloc) for i in range(len(SUITES[args.suite]))]
    print(f"each case runs under the default allocator, then tcmalloc ({tcmalloc})", flush=True)
    results = []
    for alloc, i in _progress(runs, not args.no_progress):
      results += _run_child(alloc, child_argv + ["--case", str(i)])
  # lm-eval-style requests per second (packed and one per row), in this process.
  requests_rows = loglikelihood.measure(args.repeats, quick=args.suite == "quick")
  # One GRPO step's log-prob head, tunix's way and lpkernel's (lpkernel.tunix), and
  # the production shape's temporaries, compiled only.
  step_rows = policy_step.measure(args.repeats, quick=args.suite == "quick")
  production_rows = policy_step.production_temporaries()
  meta = report.metadata(args.suite, args.repeats, sorted({r["allocator"] for r in results}))
  # Which configuration implementation=None ran per case (heuristics, tuned table).
  meta["configurations"] = tune.configurations(SUITES[args.suite])
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  stem = args.out / f"{meta['backend']}-{stamp}"
  print(report.table(results))
  print("\nconfiguration implementation=None ran (heuristics, tuned table):")
  print("\n".join(f"  {case}: {impl}" for case, impl in meta["configurations"].items()))
  print("\nlm-eval-style loglikelihood requests:\n" + loglikelihood.table(requests_rows))
  print("\none GRPO policy step's log-prob head:\n" + policy_step.table(step_rows, production_rows))
  report.write_json(
    stem.with_suffix(".json"),
    meta,
    results,
    loglikelihood=requests_rows,
    policy_step=step_rows,
    policy_step_production=production_rows,
  )
  if not args.no_plot:
    report.plot(stem.with_suffix(".png"), results)
  print(
    f"\nwrote {stem.with_suffix('.json')}"
    + ("" if args.no_plot else f" and {stem.with_suffix('.png')}")
  )
  return {
    "meta": meta,
    "results": results,
    "loglikelihood": requests_rows,
    "policy_step": step_rows,
    "policy_step_production": production_rows,
    "json": stem.with_suffix(".json"),
  }


if __name__ == "__main__":
  main()
