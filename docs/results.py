"""The results page: the latest committed benchmark run per device and suite.

``write_results_page(root, out_dir)`` reads ``benchmarks/results/*.json`` (what
``python -m benchmarks`` writes), keeps the newest run of each (backend,
device, suite), and writes ``results.md`` with a table per run (median time,
ratio to the floors measured in the same run, ratio to the plain baseline,
compiled temporaries) and its plot, copied beside the page.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _runs(results: Path) -> dict[tuple[str, str, str], tuple[Path, dict]]:
  """The newest suite run per (backend, device, suite), with its parsed JSON;
  file names sort by time."""
  latest: dict[tuple[str, str, str], tuple[Path, dict]] = {}
  for path in sorted(results.glob("*.json")):
    data = json.loads(path.read_text())
    meta = data.get("meta") if isinstance(data, dict) else None
    if not meta or "results" not in data:
      continue  # the GPU kernel checks write another layout (their logs say what ran)
    latest[(meta["backend"], meta.get("device", "?"), meta.get("suite", "?"))] = (path, data)
  return latest


def _number(value, fmt: str) -> str:
  return "" if value is None else fmt.format(value)


def _ratio(row: dict) -> str:
  floors = row.get("vs_floor") or {}
  return ", ".join(f"{v:.2f}x {k}" for k, v in floors.items() if v is not None)


def _table(data: dict) -> list[str]:
  lines = [
    "| case | pass | method | median | vs floors | vs plain | temporaries |",
    "|---|---|---|---|---|---|---|",
  ]
  for case in data["results"]:
    for row in case["rows"]:
      if row.get("status") != "ok" or row.get("median_ms") is None:
        continue
      lines.append(
        f"| {row['case']} | {row['pass_']} | {row['method']} | {row['median_ms']:.1f} ms "
        f"| {_ratio(row)} | {_number(row.get('vs_baseline'), '{:.2f}x')} "
        f"| {_number(row.get('temp_mb'), '{:.1f} MB')} |"
      )
  return lines


def write_results_page(root: Path, out_dir: Path) -> Path:
  """Writes ``out_dir/results.md`` (and the plots beside it); returns its path."""
  results = root / "benchmarks" / "results"
  lines = [
    "# Benchmark results",
    "",
    "The newest committed run of `python -m benchmarks` per device and suite, read",
    "from `benchmarks/results/` when the documentation is built. Each time is a",
    "median of repeated runs; each ratio is to a floor measured in the same run",
    "(see [Benchmarks](guides/benchmarks.md)).",
    "",
  ]
  plots = out_dir / "_results"
  plots.mkdir(parents=True, exist_ok=True)
  for (backend, device, suite), (path, data) in sorted(_runs(results).items()):
    meta = data["meta"]
    lines += [
      f"## {backend}: {device}, suite `{suite}`",
      "",
      f"`{path.name}`: jax {meta.get('jax', '?')}, {meta.get('cpu_count', '?')} CPUs, "
      f"{meta.get('device_count', '?')} device(s).",
      "",
      *_table(data),
      "",
    ]
    for request in data.get("loglikelihood", []):
      packed = "packed" if request.get("packed") else "one per row"
      lines.append(
        f"- lm-eval requests ({request['case']}, {packed}): "
        f"{request['requests_per_second']:.0f} requests/s"
      )
    steps = [r for r in data.get("policy_step", []) if r.get("status") == "ok"]
    if steps:
      lines += [
        "",
        "One GRPO policy step's log-prob head (`benchmarks/policy_step.py`):",
        "",
        "| case | pass | method | s | temp MiB | x tunix time | x tunix temp |",
        "|---|---|---|---|---|---|---|",
      ]
      lines += [
        f"| {r['case']} | {r['pass_']} | {r['method']} | {r['seconds']:.3f} | "
        f"{r['temp_mib']:.1f} | {r['vs_tunix_time']:.2f} | {r['vs_tunix_temporaries']:.3f} |"
        for r in steps
      ]
    for p in data.get("policy_step_production", []):
      if "case" in p:
        lines.append(
          f"- compiled only, {p['case']}: temporaries tunix {p['tunix_gib']:.2f} GiB, "
          f"lpkernel {p['lpkernel_gib']:.2f} GiB"
        )
    png = path.with_suffix(".png")
    if png.exists():
      shutil.copy(png, plots / png.name)
      lines += ["", f"![{path.stem}](_results/{png.name})", ""]
  page = out_dir / "results.md"
  page.write_text("\n".join(lines) + "\n")
  return page
