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
On x86-64 both are built together, each source a compiler of its own (as many
at once as cores; one after the other they took 27 s on 2 cores), and
processes that start at once (a test run's workers) build them once: the
others wait on a lock in the cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import itertools
import logging
import os
import pathlib
import platform
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
  "lpkernel_cpu_running_values": "LpkernelRunningValues",
  "lpkernel_cpu_replay_dots": "LpkernelReplayDots",
  "lpkernel_cpu_replay_grads": "LpkernelReplayGrads",
  "lpkernel_cpu_replay_repeats": "LpkernelReplayRepeats",
  "lpkernel_cpu_kept_set": "LpkernelKeptSet",
  "lpkernel_cpu_kept_set_of_logits": "LpkernelKeptSetOfLogits",
}
# Portable: no -march. No contraction into fused multiply-adds on any target
# (arm64's NEON has them; x86-64 has none without -mfma): each product is
# rounded, then added, as the kernels' comments and tests count on.
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-w", "-ffp-contract=off")
_AVX2 = ("-mavx2", "-DLPKERNEL_LANES=8")  # no -mfma: no contraction, the same rounding
_state = {"avx2": False}


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "lpkernel"
  return pathlib.Path(os.environ.get("LPKERNEL_CACHE", default))


def _compiler() -> str:
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found)")
  return compiler


def _library(compiler: str, extra: tuple[str, ...]) -> pathlib.Path:
  """Where the build with ``extra`` flags (beyond the portable ones) is cached:
  named by a hash of the sources, the compiler, the flags and jaxlib's version."""
  import jaxlib

  texts = [(_HERE / name).read_bytes() for name in SOURCES + HEADERS]
  flags = " ".join(_FLAGS + extra).encode()
  tag = hashlib.sha256(b"\0".join([*texts, compiler.encode(), flags, jaxlib.__version__.encode()]))
  return _cache_dir() / f"cpu_kernels-{tag.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """Holds an exclusive lock on the file ``path`` (POSIX ``flock``; no lock
  where there is none): a second process wanting it waits."""
  try:
    import fcntl
  except ImportError:  # not POSIX: concurrent builds, the last rename wins
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str]) -> OSError | None:
  """Runs ``cmd``: None, or the ``OSError`` naming it and its error output."""
  run = subprocess.run(cmd, capture_output=True, text=True)
  return OSError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}") if run.returncode else None


def _build(*variants: tuple[str, ...]) -> list[pathlib.Path | OSError]:
  """Each variant's library (``extra`` flags beyond the portable ones; the
  portable build where none is given), or the ``OSError`` its build raised:
  built where not cached, every source of every variant compiled at once (as
  many compilers as cores), then each linked. One process builds at a time;
  the next finds the libraries cached. ``OSError`` without a compiler."""
  compiler = _compiler()
  variants = variants or ((),)
  outs = [_library(compiler, extra) for extra in variants]
  if all(out.exists() for out in outs):
    return list(outs)
  cache = _cache_dir()
  cache.mkdir(parents=True, exist_ok=True)
  built: dict[pathlib.Path, pathlib.Path | OSError] = {}
  with _locked(cache / "build.lock"), tempfile.TemporaryDirectory(dir=cache) as tmp:
    include = f"-I{jax.ffi.include_dir()}"
    jobs = []  # per variant still to build: its flags, library, objects, compiles
    for n, (extra, out) in enumerate(zip(variants, outs, strict=True)):
      if out.exists():  # built by the process that held the lock before
        continue
      objects = [str(pathlib.Path(tmp) / f"{n}-{pathlib.Path(name).stem}.o") for name in SOURCES]
      compiles = [
        [compiler, *_FLAGS, *extra, include, "-c", str(_HERE / name), "-o", obj]
        for name, obj in zip(SOURCES, objects, strict=True)
      ]
      jobs.append((extra, out, objects, compiles))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      failures = iter(list(pool.map(_run, [cmd for *_, compiles in jobs for cmd in compiles])))
    for extra, out, objects, compiles in jobs:
      errors = [e for e in itertools.islice(failures, len(compiles)) if e is not None]
      library = pathlib.Path(tmp) / out.name
      link = [compiler, *_FLAGS, *extra, "-shared", *objects, "-o", str(library)]
      error = errors[0] if errors else _run(link)
      if error is None:
        os.replace(library, out)
      built[out] = out if error is None else error
  return [built.get(out, out) for out in outs]


def _may_run_avx2() -> bool:
  """Whether to build the AVX2 variant beside the portable one: an x86-64
  machine, ``LPKERNEL_CPU_AVX2`` not 0 (the portable build then says whether
  this CPU runs it)."""
  x86 = platform.machine().lower() in ("x86_64", "amd64")
  return x86 and os.environ.get("LPKERNEL_CPU_AVX2", "1") != "0"


@functools.cache
def available() -> bool:
  """Whether the CPU kernels are built and registered (tried once per process)."""
  return _register()


def _register() -> bool:
  if os.environ.get("LPKERNEL_CPU_KERNELS", "1") == "0":
    _LOG.info("lpkernel: LPKERNEL_CPU_KERNELS=0, XLA's steps on the CPU")
    return False
  try:
    portable, *fast = _build((), *([_AVX2] if _may_run_avx2() else []))
    if isinstance(portable, OSError):
      raise portable
    library = ctypes.cdll.LoadLibrary(str(portable))
  except OSError as e:
    _LOG.warning("lpkernel: the CPU kernels are not built, XLA's steps on the CPU: %s", e)
    return False
  if fast and library.LpkernelCpuRunsAvx2():
    try:
      if isinstance(fast[0], OSError):
        raise fast[0]
      library = ctypes.cdll.LoadLibrary(str(fast[0]))
      _state["avx2"] = True
    except OSError as e:
      _LOG.warning("lpkernel: the AVX2 build of the CPU kernels failed, the portable one: %s", e)
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def avx2() -> bool:
  """Whether the AVX2 build is the one registered (after :func:`available`)."""
  return _state["avx2"]
