"""Configurations chosen, not hard-coded: heuristics, checked by a tuned table.

An implementation's defaults come from ``config_for(shape, dtype, platform)``:
heuristics keyed on what the machine offers (on the CPU, whether it has native
bfloat16 dot instructions: AVX512_BF16 or AMX on x86, BF16 on Arm), then
overridden by the tuned table when it holds an entry for this machine. The
table is a JSON file (``$LPKERNEL_TUNED_TABLE``, else
``~/.cache/lpkernel/tuned.json``) that ``python -m benchmarks --tune`` writes
after timing the candidate configurations on the machine itself, as JAX's
Pallas ops keep tuned block sizes per device. Entries are keyed by op,
implementation, machine (:func:`machine_key`) and dtype; their values are the
configuration's fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform as host
from pathlib import Path
from typing import Any, ClassVar

import jax.numpy as jnp

TABLE_ENV = "LPKERNEL_TUNED_TABLE"
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 BF16, AMX), Arm (BF16)


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The host CPU's feature flags (Linux's ``/proc/cpuinfo``; empty elsewhere)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return frozenset(value.split())
  return frozenset()


def native_bfloat16_dots() -> bool:
  """The CPU multiplies bfloat16 in hardware (else XLA:CPU emulates it, about 4x
  slower than float32 on an AVX2 EPYC: 2151 ms against 550 ms for a
  ``[4096, 512] x [512, 32000]`` bfloat16 dot)."""
  return bool(_BF16_FLAGS & cpu_flags())


def machine_key(platform: str) -> str:
  """What the heuristics and the table key on: ``cpu-bf16`` / ``cpu-nobf16`` for a
  CPU (with its architecture), the platform name otherwise."""
  if platform != "cpu":
    return platform
  return f"cpu-{host.machine().lower()}-{'bf16' if native_bfloat16_dots() else 'nobf16'}"


def table_path() -> Path:
  env = os.environ.get(TABLE_ENV)
  if env:
    return Path(env)
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lpkernel" / "tuned.json"


def _key(op: str, implementation: str, platform: str, dtype) -> str:
  return f"{op}/{implementation}/{machine_key(platform)}/{jnp.dtype(dtype).name}"


def load_table(path: Path | None = None) -> dict[str, dict[str, Any]]:
  """The tuned table (empty when there is none); a malformed file raises ``ValueError``.

  Read once per version of the file (its modification time): implementations
  are configured on every call that names them.
  """
  path = table_path() if path is None else path
  try:
    mtime = path.stat().st_mtime_ns
  except FileNotFoundError:
    return {}
  return dict(_read(path, mtime))


@functools.lru_cache(maxsize=8)
def _read(path: Path, mtime_ns: int) -> dict[str, dict[str, Any]]:
  """The table in ``path`` as of ``mtime_ns`` (the cache key)."""
  try:
    table = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"the tuned table {path} is not JSON ({e}): rewrite it with "
                     "`python -m benchmarks --tune` or remove it") from e  # fmt: skip
  if not isinstance(table, dict):
    raise ValueError(f"the tuned table {path} must map keys to configurations")
  return table


def tuned(op: str, implementation: str, platform: str, dtype) -> dict[str, Any] | None:
  """The table's configuration fields for this op, implementation, machine and dtype."""
  return load_table().get(_key(op, implementation, platform, dtype))


def record(op: str, implementation: str, platform: str, dtype, fields: dict[str, Any]) -> Path:
  """Writes one entry of the tuned table (the benchmark's ``--tune``); returns the file."""
  path = table_path()
  table = load_table(path)
  table[_key(op, implementation, platform, dtype)] = fields
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
  _read.cache_clear()  # a rewrite within the clock's resolution keeps its mtime
  return path


def configured(cls, op: str, platform: str, dtype, **heuristic: Any):
  """``cls(**fields)``: the heuristics' fields, then the tuned table's on top.

  A field whose default is a dataclass (``XlaFused.config``, ``XlaLogits.chunks``)
  may be given as a dict of its own fields; the table's dict is merged into the
  heuristics' one.
  """
  fields = dict(heuristic)
  for name, value in (tuned(op, cls.name, platform, dtype) or {}).items():
    base = fields.get(name)
    fields[name] = (
      {**base, **value} if isinstance(base, dict) and isinstance(value, dict) else value
    )
  defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(cls)}
  for name, value in fields.items():
    if name not in defaults:
      raise ValueError(f"the tuned table's {cls.__name__} entry has no field {name!r}")
    if isinstance(value, dict) and dataclasses.is_dataclass(defaults[name]):
      fields[name] = type(defaults[name])(**value)
  return cls(**fields)


class Configured:
  """``config_for`` for an implementation whose defaults are its measured best:
  the tuned table's fields on top of them (``op`` names the table's op)."""

  op: ClassVar[str]
  name: ClassVar[str]

  @classmethod
  def config_for(cls, shape: tuple[int, ...], dtype, platform: str):
    """The configuration for ``shape`` and ``dtype`` on ``platform``: the defaults
    (the measured best so far), then this machine's tuned table."""
    return configured(cls, cls.op, platform, dtype)
