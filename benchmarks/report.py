"""The suite's outputs: a printed table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax


def metadata(suite: str, repeats: int, allocators: list[str]) -> dict:
  device = jax.devices()[0]
  return {
    "suite": suite,
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else None,
    "python": platform.python_version(),
    "machine": platform.machine(),
    "allocators": allocators,
    "repeats": repeats,
  }


def _ratio(x):
  return "-" if x is None else f"{x:.2f}x"


def _ms(x):
  return f"{x:.3g}"


def table(results: list[dict]) -> str:
  """One table over every case, allocator and method."""
  header = [
    "method",
    "case",
    "alloc",
    "pass",
    "median ms (min-max)",
    "Mtok/s",
    "GB/s",
    "x read",
    "x exp",
    "x bwd floor",
    "x matmul",
    "x baseline",
    "x lpkernel",
    "temp MB",
  ]
  lines = [header]
  for res in results:
    for r in res["rows"]:
      base = [r["method"], res["case"], res.get("allocator", "-"), r["pass_"]]
      if r["status"] != "ok":
        lines.append(base + [f"skipped: {r['reason']}"])
        continue
      f = r["vs_floor"]
      lines.append(
        base
        + [
          f"{_ms(r['median_ms'])} ({_ms(r['min_ms'])}-{_ms(r['max_ms'])})",
          f"{r['tokens_per_s'] / 1e6:.2f}",
          f"{r['gb_per_s']:.1f}",
          _ratio(f.get("read")),
          _ratio(f.get("exp")),
          _ratio(f.get("read+write+2exp")),
          _ratio(f.get("matmul", f.get("3 matmuls"))),
          _ratio(r["vs_baseline"]),
          _ratio(r.get("vs_lpkernel")),
          "-" if r["temp_mb"] is None else f"{r['temp_mb']:.1f}",
        ]
      )
  full = [row for row in lines if len(row) == len(header)]
  widths = [max(len(row[i]) for row in full) for i in range(len(header))]
  out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in lines]
  floors = ["", "floors (median ms):"]
  for res in results:
    fl = ", ".join(f"{k} {v:.1f}" for k, v in res["floors_ms"].items())
    floors.append(f"  {res['case']} [{res.get('allocator', '-')}]: {fl}")
  return "\n".join(out + floors)


def write_json(path: Path, meta: dict, results: list[dict], **sections: list[dict]) -> None:
  """The run as JSON: ``meta``, the suite's ``results`` and any further ``sections``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"meta": meta, "results": results, **sections}, indent=1))


def plot(path: Path, results: list[dict]) -> None:
  """Time per method as a multiple of its floor, one panel per pass."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  passes = ["forward", "forward+backward"]
  fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=False)
  for ax, pass_name in zip(axes, passes, strict=True):
    labels, methods, values = [], [], {}
    for res in results:
      label = f"{res['case']}\n{res.get('allocator', '')}".strip()
      labels.append(label)
      for r in res["rows"]:
        if r["pass_"] != pass_name or r["status"] != "ok":
          continue
        floor = min(r["vs_floor"].values())
        values.setdefault(r["method"], {})[label] = floor
        if r["method"] not in methods:
          methods.append(r["method"])
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
      xs = [j + i * width for j, lab in enumerate(labels) if lab in values[m]]
      ys = [values[m][lab] for lab in labels if lab in values[m]]
      ax.bar(xs, ys, width, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(
      [j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7
    )
    ax.set_ylabel("time / floor (log)")
    ax.set_title(f"{pass_name}: lower is better, 1 = floor")
    ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sweep(results: list[dict], dim: str, pass_name: str = "forward", path: Path | None = None):
  """Time and temporary memory of each method (and the floors) against one shape dim.

  Args:
    results: from ``run_suite`` over cases that differ in ``dim`` (e.g. "vocab").
    dim: the shape field on the x axis.
  Returns:
    the matplotlib figure (also saved to ``path`` when given).
  """
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4))
  series: dict[str, list[tuple[int, float, float]]] = {}
  floors: dict[str, list[tuple[int, float]]] = {}
  for res in results:
    for r in res["rows"]:
      if r["pass_"] == pass_name and r["status"] == "ok":
        x = r["shape"][dim]
        series.setdefault(r["method"], []).append((x, r["median_ms"], r["temp_mb"] or 0.0))
    first = next(iter(res["rows"]), None)
    if first is not None:
      for name, ms in res["floors_ms"].items():
        floors.setdefault(name, []).append((first["shape"][dim], ms))
  for name, pts in series.items():
    pts.sort()
    ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax_m.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=name)
  for name, pts in floors.items():
    pts.sort()
    ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "k--", alpha=0.5, lw=1)
    ax_t.annotate(f"{name} floor", (pts[-1][0], pts[-1][1]), fontsize=7)
  for ax, label in ((ax_t, "median ms"), (ax_m, "temporary MB")):
    ax.set_xscale("log")
    ax.set_yscale("symlog" if ax is ax_m else "log")
    ax.set_xlabel(dim)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  ax_t.set_title(f"{pass_name}: time vs {dim}")
  ax_m.set_title(f"{pass_name}: compiled temporaries vs {dim}")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig
