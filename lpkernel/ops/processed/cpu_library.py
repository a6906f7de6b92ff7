"""The compiled CPU kernels' library: built on first use, registered with XLA:CPU.

One shared library from ``cpu_top_k.cc`` (:mod:`.cpu_top_k`), ``cpu_replay.cc``
(:mod:`.cpu_replay`) and ``cpu_search.cc`` (:mod:`.cpu_search`), with what they
share in ``cpu_common.h``, through JAX's typed FFI (no Python headers). It is compiled
with the C++ compiler (``$CXX``, else ``c++``) against the FFI headers of the
installed jaxlib and cached under ``$LPKERNEL_CACHE`` (default
``~/.cache/lpkernel``) by a hash of the sources, the compiler, its flags and
jaxlib's version. Without a compiler, or with ``LPKERNEL_CPU_KERNELS=0``,
:func:`available` says False and every caller takes XLA's steps: the same
numbers, slower on the CPU; the reason is logged once.

Two builds: the portable one (no ``-march``: SSE2 on x86-64, NEON on arm64,
vector loops 4 lanes wide) and, on an x86-64 CPU with AVX2 (as the portable
build's ``LpkernelCpuRunsAvx2`` tells), one with ``-mavx2`` whose wide vector
loops (``kLanes`` in ``cpu_common.h``) run 8 lanes, registered in its place
unless ``LPKERNEL_CPU_AVX2=0``; it rounds every float as the portable one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

_LOG = logging.getLogger(__name__)
_HERE = pathlib.Path(__file__).parent
SOURCES = ("cpu_top_k.cc", "cpu_replay.cc", "cpu_search.cc")
HEADERS = ("cpu_common.h",)
_TARGETS = {
  "lpkernel_cpu_top_k": "LpkernelTopK",
  "lpkernel_cpu_groups_top_k": "LpkernelGroupsTopK",
  "lpkernel_cpu_maxima_top_k": "LpkernelMaximaTopK",
  "lpkernel_cpu_block_stats": "LpkernelBlockStats",
  "lpkernel_cpu_block_stats_top_k": "LpkernelBlockStatsTopK",
  "lpkernel_cpu_replay_dots": "LpkernelReplayDots",
  "lpkernel_cpu_replay_grads": "LpkernelReplayGrads",
  "lpkernel_cpu_replay_repeats": "LpkernelReplayRepeats",
  "lpkernel_cpu_kept_set": "LpkernelKeptSet",
  "lpkernel_cpu_kept_set_of_logits": "LpkernelKeptSetOfLogits",
}
# Portable: no -march. No contraction into fused multiply-adds on any target
# (arm64's NEON has them; x86-64 has none without -mfma): each product is
# rounded, then added, as the kernels' comments and tests count on.
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-ffp-contract=off")
_AVX2 = ("-mavx2", "-DLPKERNEL_LANES=8")  # no -mfma: no contraction, the same rounding
_state = {"avx2": False}


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "lpkernel"
  return pathlib.Path(os.environ.get("LPKERNEL_CACHE", default))


def _build(extra: tuple[str, ...] = ()) -> pathlib.Path:
  """The compiled library's path (compiled once per sources, compiler, flags
  (``extra`` beyond the portable ones) and jaxlib)."""
  import jaxlib

  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found)")
  texts = [(_HERE / name).read_bytes() for name in SOURCES + HEADERS]
  flags = " ".join(_FLAGS + extra).encode()
  tag = hashlib.sha256(b"\0".join([*texts, compiler.encode(), flags, jaxlib.__version__.encode()]))
  out = _cache_dir() / f"cpu_kernels-{tag.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # concurrent builds: last rename wins
    built = pathlib.Path(tmp) / out.name
    sources = [str(_HERE / name) for name in SOURCES]
    cmd = [compiler, *_FLAGS, *extra, f"-I{jax.ffi.include_dir()}", *sources, "-o", str(built)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
      raise OSError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    os.replace(built, out)
  return out


@functools.cache
def available() -> bool:
  """Whether the CPU kernels are built and registered (tried once per process)."""
  return _register()


def _register() -> bool:
  if os.environ.get("LPKERNEL_CPU_KERNELS", "1") == "0":
    _LOG.info("lpkernel: LPKERNEL_CPU_KERNELS=0, XLA's steps on the CPU")
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except OSError as e:
    _LOG.warning("lpkernel: the CPU kernels are not built, XLA's steps on the CPU: %s", e)
    return False
  if library.LpkernelCpuRunsAvx2() and os.environ.get("LPKERNEL_CPU_AVX2", "1") != "0":
    try:
      library = ctypes.cdll.LoadLibrary(str(_build(_AVX2)))
      _state["avx2"] = True
    except OSError as e:
      _LOG.warning("lpkernel: the AVX2 build of the CPU kernels failed, the portable one: %s", e)
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def avx2() -> bool:
  """Whether the AVX2 build is the one registered (after :func:`available`)."""
  return _state["avx2"]
