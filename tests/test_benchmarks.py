"""Smoke test of the benchmark suite on the quick suite (no timing asserted)."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import __main__ as cli
from benchmarks import methods, runner, shapes, suites


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  return cli.main(
    [
      "--suite",
      "quick",
      "--repeats",
      "2",
      "--allocator",
      "current",
      "--no-progress",
      "--out",
      str(out),
    ]
  )


def test_json_schema_and_floors(quick_run):
  data = json.loads(quick_run["json"].read_text())
  meta = data["meta"]
  for key in ("backend", "device", "jax", "jaxlib", "cpu_count", "allocators", "suite"):
    assert key in meta, key
  assert {r["case"] for r in data["results"]} == {c.label for c in suites.SUITES["quick"]}
  for res in data["results"]:
    want = (
      {"matmul", "3 matmuls"} if res["fused"] else {"read", "exp", "read+write", "read+write+2exp"}
    )
    assert set(res["floors_ms"]) == want
    assert all(v > 0 for v in res["floors_ms"].values())
    names = {r["method"] for r in res["rows"]}
    assert names == {m.name for m in methods.METHODS if m.fused == res["fused"]}
    for r in res["rows"]:
      assert r["status"] in ("ok", "skipped")
      if r["status"] == "skipped":
        assert r["reason"]
        continue
      assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
      assert r["vs_floor"] and r["vs_lpkernel"] is not None
      # A method with its own baseline (the processed rows') lacks a ratio only
      # where that baseline does not run (forward+backward of a sort).
      own = {m.name: m.baseline for m in methods.METHODS}.get(r["method"])
      baseline_ran = any(
        b["method"] == own and b["pass_"] == r["pass_"] and b["status"] == "ok" for b in res["rows"]
      )
      assert r["vs_baseline"] is not None or (own and not baseline_ran)
  assert quick_run["json"].with_suffix(".png").exists()
  requests = data["loglikelihood"]
  assert [r["packed"] for r in requests] == [True, False]
  assert all(r["requests_per_second"] > 0 and r["seconds"] > 0 for r in requests)
  steps = [r for r in data["policy_step"] if r["status"] == "ok"]
  assert {r["method"].split()[0] for r in steps} == {"tunix", "lpkernel"}
  assert all(r["seconds"] > 0 and r["temp_mib"] >= 0 for r in steps)
  for r in data["policy_step_production"]:  # compiled only: lpkernel's never near tunix's
    assert r["lpkernel_gib"] < 0.2 * r["tunix_gib"], r


def test_every_method_agrees_with_the_baseline(quick_run):
  checked = 0
  for res in quick_run["results"]:
    for r in res["rows"]:
      if r["status"] == "ok" and r["pass_"] == "forward":
        tol = 1e-2 if r["dtype"] == "bfloat16" and res["fused"] else 1e-4
        assert r["rel_diff_vs_baseline"] < tol, (
          r["method"],
          res["case"],
          r["rel_diff_vs_baseline"],
        )
        checked += 1
  assert checked >= 8


def test_suites_reuse_the_library_shapes():
  assert suites.Case(shapes.LLAMA2_VOCAB, "float32") in suites.SUITES["default"]
  every = [c.shape for cases in suites.SUITES.values() for c in cases]
  library = {
    v for v in vars(shapes).values() if isinstance(v, (shapes.LogitsShape, shapes.HiddenShape))
  }
  assert set(every) <= library


def test_unknown_method_is_an_error():
  with pytest.raises(ValueError, match="unknown methods"):
    methods.by_name(["nope"])


@pytest.mark.parametrize("settle", [True, False])
def test_rows_are_timed_in_turns(settle, monkeypatch):
  """Each function runs in every round (its runs spread over the measurement,
  not one stretch); a fast one several times a round, up to MAX_REPEATS, after
  one untimed run in each turn where its runs are under SETTLE_SECONDS; one
  that fails to compile is reported, the others still timed."""
  monkeypatch.setattr(runner, "SETTLE_SECONDS", 0.5 if settle else 0.0)
  calls = []

  def task(name):
    def fn(x):
      jax.debug.callback(lambda: calls.append(name))
      return jnp.sum(x)

    return fn, (jnp.ones(8),)

  def broken(x):
    return jnp.dot(x, jnp.ones(3))  # shapes [8] and [3]

  steps = []
  tasks = {"a": task("a"), "b": task("b"), "bad": (broken, (jnp.ones(8),))}
  got = runner.measure_in_turns(tasks, repeats=3, on_step=lambda: steps.append(1))
  assert isinstance(got["bad"], TypeError)
  timed = calls[2:]  # after one warm-up run each
  assert timed.count("a") == timed.count("b") == runner.MAX_REPEATS + 3 * settle
  stretches = 1 + sum(x != y for x, y in zip(timed, timed[1:], strict=False))
  assert stretches >= 4  # a stretch per function and round, two may meet at a round's edge
  for key in "ab":
    timing, value = got[key]
    assert value == 8.0 and 0 < timing.min_ms <= timing.median_ms <= timing.max_ms
  assert len(steps) == len(tasks) + 3


def test_the_gpu_checks_replay_section_runs(tmp_path, monkeypatch):
  """``benchmarks.gpu_kernels``' replay section (``--sections replay``), at small
  shapes with the kernels in interpret mode: the check's errors against the
  reference and a timed row for each method and pass, written to its JSON (a
  GPU session is short: a script that fails there loses it). A section before
  it that raises is recorded and the replay still runs; the run then fails."""
  import lpkernel as lpk
  from benchmarks import gpu_kernels

  def broken(out):
    raise RuntimeError("a kernel's first GPU")

  monkeypatch.setattr(gpu_kernels, "REPLAY_CHECK", (16, 64, 1000, 40))
  monkeypatch.setattr(gpu_kernels, "REPLAY_TIMED", (32, 64, 1000, 40))
  monkeypatch.setattr(gpu_kernels, "REPLAY_KERNELS", lpk.PallasGpuProcessed(interpret=True))
  monkeypatch.setattr(gpu_kernels, "_check_processed", broken)
  argv = ["--sections", "processed,replay", "--repeats", "2", "--out", str(tmp_path)]
  with pytest.raises(SystemExit, match=r"sections failed: \['processed'\]"):
    gpu_kernels.main(argv)
  (path,) = tmp_path.glob("gpu-kernels-*.json")
  out = json.loads(path.read_text())
  assert out["errors"] == {"processed": "RuntimeError: a kernel's first GPU"}
  assert [r["impl"] for r in out["replay_checks"]] == ["xla", "pallas_gpu"]
  for r in out["replay_checks"]:
    assert max(r["value"], r["dh"], r["dw"], r["dtau"]) < 1e-3, r
  timed = [(r["method"], r["pass_"]) for r in out["replay_timings"]]
  assert timed == [
    ("fused forward", "forward"),
    *[(m, p) for m in ("xla", "pallas_gpu") for p in ("forward", "forward+backward")],
  ]
  assert "timings" not in out and "processed_checks" not in out  # only the section asked for


def test_the_gpu_checks_processed_section_runs(tmp_path, monkeypatch):
  """``--sections processed`` (the GPU check's most important rows) at small
  shapes with the kernels in interpret mode: every kept set the reference's,
  values and gradients close, from logits and from hidden states, and a timed
  row for each sampler, method and dtype."""
  import lpkernel as lpk
  from benchmarks import gpu_kernels

  monkeypatch.setattr(gpu_kernels, "PROCESSED_CHECKS", [(6, 300)])
  monkeypatch.setattr(gpu_kernels, "PROCESSED_HIDDEN_CHECKS", [(5, 16, 400)])
  monkeypatch.setattr(gpu_kernels, "PROCESSED_TIMED", (1, 4, 300))
  monkeypatch.setattr(gpu_kernels, "PROCESSED_KERNELS", lpk.PallasGpuProcessed(interpret=True))
  gpu_kernels.main(["--sections", "processed", "--out", str(tmp_path)])
  (path,) = tmp_path.glob("gpu-kernels-*.json")
  out = json.loads(path.read_text())
  checks = out["processed_checks"]
  assert [r.get("path", "logits") for r in checks] == ["logits", "logits", "hidden"]
  for r in checks:
    assert r["kept_set_mismatches"] == 0 and r.get("kept_mismatches", 0) == 0, r
    assert max(r.get(e, 0) for e in ("logprobs", "dx", "dtau", "dh", "dw")) < 2e-2, r
  timed = [(r["dtype"], r["sampling"], r["impl"]) for r in out["processed_timings"]]
  assert len(timed) == 8 and all("forward_ms" in r for r in out["processed_timings"]), timed
  assert "errors" not in out


def test_a_replay_kernel_that_fails_leaves_the_rest_of_its_section(tmp_path, monkeypatch):
  """A method that fails on the device (here kernels that raise) is reported in
  its check rows and timed rows, and XLA's are still timed (the processed
  section), checked and timed beside the fused forward (the replay's)."""
  import lpkernel as lpk
  from benchmarks import gpu_kernels

  class Failing(lpk.PallasGpuProcessed):
    def kept_dots(self, h, w_rows, ids):
      raise RuntimeError("no Triton here")

    def partials_and_candidates(self, *args):
      raise RuntimeError("no Triton here")

    def hidden_partials_and_candidates(self, *args):
      raise RuntimeError("no Triton here")

  monkeypatch.setattr(gpu_kernels, "REPLAY_CHECK", (8, 16, 300, 5))
  monkeypatch.setattr(gpu_kernels, "REPLAY_TIMED", (8, 16, 300, 5))
  monkeypatch.setattr(gpu_kernels, "REPLAY_KERNELS", Failing(interpret=True))
  monkeypatch.setattr(gpu_kernels, "PROCESSED_CHECKS", [(3, 200)])
  monkeypatch.setattr(gpu_kernels, "PROCESSED_HIDDEN_CHECKS", [(3, 8, 200)])
  monkeypatch.setattr(gpu_kernels, "PROCESSED_TIMED", (1, 2, 200))
  monkeypatch.setattr(gpu_kernels, "PROCESSED_SAMPLINGS", {"0.7/50": lpk.Sampling(0.7, 50)})
  monkeypatch.setattr(gpu_kernels, "PROCESSED_KERNELS", Failing(interpret=True))
  argv = ["--sections", "processed,replay", "--repeats", "1", "--out", str(tmp_path)]
  gpu_kernels.main(argv)
  (path,) = tmp_path.glob("gpu-kernels-*.json")
  out = json.loads(path.read_text())
  error = "RuntimeError: no Triton here"
  assert [r["error"] for r in out["processed_checks"]] == [error] * 3  # 2 dtypes, hidden
  timed = [(r["impl"], "error" in r) for r in out["processed_timings"]]
  assert timed == [("xla", False), ("pallas_gpu", True)] * 2  # (2 dtypes)
  xla, failing = out["replay_checks"]
  assert xla["impl"] == "xla" and max(xla["value"], xla["dh"], xla["dw"]) < 1e-3
  assert failing == {"impl": "pallas_gpu", "error": "RuntimeError: no Triton here"}
  timed = [(r["method"], r["pass_"]) for r in out["replay_timings"]]
  assert timed == [("fused forward", "forward"), ("xla", "forward"), ("xla", "forward+backward")]
  assert "errors" not in out
