"""Configurations chosen, not hard-coded (lpkernel.ops.tuning): the heuristics key on
what the CPU offers, a tuned table written by ``python -m benchmarks --tune``
overrides them, ``implementation=None`` reads both, and the choice the
heuristic makes for a CPU without bfloat16 dots keeps values, gradients and
the temporaries' bound."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk
from benchmarks import tune
from benchmarks.shapes import HiddenShape
from benchmarks.suites import Case
from lpkernel import ops
from lpkernel.ops import tuning

LIKE = ((4096, 512, 32000), jnp.bfloat16)


@pytest.fixture
def table(tmp_path, monkeypatch):
  path = tmp_path / "tuned.json"
  monkeypatch.setenv(tuning.TABLE_ENV, str(path))
  return path


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "no-bf16-cpu"])
def native(request, monkeypatch):
  flags = frozenset({"avx2", "avx512_bf16"} if request.param else {"avx2", "fma"})
  monkeypatch.setattr(tuning, "cpu_flags", lambda: flags)
  return request.param


def test_the_heuristic_upcasts_bfloat16_matmuls_only_where_the_cpu_lacks_them(table, native):
  cpu = ops.XlaFused.config_for(*LIKE, "cpu")
  assert cpu.config.dot_dtype == (None if native else "float32")
  assert ops.XlaFused.config_for(LIKE[0], jnp.float32, "cpu").config.dot_dtype is None
  assert ops.XlaFused.config_for(*LIKE, "gpu").config.dot_dtype is None
  assert tuning.machine_key("cpu").endswith("-bf16" if native else "-nobf16")
  # implementation=None is configured the same way for the call's shape and dtype.
  assert ops.fused_implementation(None, LIKE) == cpu


def test_the_tuned_table_overrides_the_heuristics_for_this_machine_only(table, native):
  tuning.record("fused", "xla", "cpu", jnp.bfloat16, {"config": {"vocab_block": 512}})
  got = ops.fused_implementation(None, LIKE).config
  assert got.vocab_block == 512 and got.dot_dtype == (None if native else "float32")  # merged
  tuning.record("fused", "xla", "cpu", jnp.bfloat16, {"config": {"dot_dtype": "float32"}})
  assert ops.fused_implementation(None, LIKE).config.dot_dtype == "float32"
  entries = json.loads(table.read_text())
  assert list(entries) == [f"fused/xla/{tuning.machine_key('cpu')}/bfloat16"]
  # Every implementation reads its entry (the Pallas ones too).
  tuning.record("logits", "pallas_gpu", "cpu", jnp.float32, {"block_v": 512})
  assert ops.PallasGpuLogits.config_for((8, 1000), jnp.float32, "cpu").block_v == 512
  # An object passed as implementation= is used as given.
  mine = lpk.XlaFused(lpk.FusedConfig(vocab_block=8))
  assert ops.fused_implementation(mine, LIKE) is mine


def test_a_bad_table_is_a_clear_error(table):
  table.write_text("{not json")
  with pytest.raises(ValueError, match="is not JSON"):
    ops.fused_implementation(None, LIKE)
  table.write_text(json.dumps({f"fused/xla/{tuning.machine_key('cpu')}/bfloat16": {"nope": 1}}))
  with pytest.raises(ValueError, match="no field 'nope'"):
    ops.fused_implementation(None, LIKE)
  with pytest.raises(ValueError, match="dot_dtype"):
    lpk.FusedConfig(dot_dtype="int8")


@pytest.mark.parametrize("vocab_axis", [1, 0], ids=["unembed", "tied-table"])
def test_float32_matmuls_give_the_same_values_and_gradients(vocab_axis):
  """Upcasting bfloat16 operands is exact: the products accumulate in float32
  either way, so values and gradients match the bfloat16 matmuls'."""
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (37, 24)).astype(jnp.bfloat16)
  w = (jax.random.normal(k[1], (24, 300)) / 5).astype(jnp.bfloat16)
  w = w if vocab_axis == 1 else w.T
  t = jax.random.randint(k[2], (37,), 0, 300)
  tau = jnp.linspace(0.5, 1.5, 37)

  def loss(h, w, tau, config):
    impl = lpk.XlaFused(config)
    s = lpk.fused_token_stats(
      h, w, t, temperature=tau, softcap=30.0, implementation=impl, vocab_axis=vocab_axis
    )
    nll = lpk.fused_nll_loss(h, w, t, jnp.ones(37), implementation=impl, vocab_axis=vocab_axis)
    return jnp.sum(s.logprobs + 0.1 * s.entropy) + nll

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  for extra in [{}, {"grad_chunks": True, "loss_chunks": True, "loss_chunk_tokens": 16}]:
    want = grad(h, w, tau, lpk.FusedConfig(vocab_block=64, **extra))
    got = grad(h, w, tau, lpk.FusedConfig(vocab_block=64, dot_dtype="float32", **extra))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2
      )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


def test_float32_matmuls_hold_the_temporaries_bound():
  """No logits-sized temporary: a block of the table and one copy of the hidden
  states in float32 (the bound of tests/test_memory.py, 10% of the logits)."""
  n, d, v = 4096, 512, 32000
  h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  impl = lpk.XlaFused(lpk.FusedConfig(dot_dtype="float32"))

  def loss(h, w, t):
    return jnp.sum(lpk.fused_token_logprobs(h, w, t, implementation=impl))

  stats = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, t).compile().memory_analysis()
  assert stats.temp_size_in_bytes < 0.1 * n * v * 4


def test_the_benchmark_writes_the_table_and_records_what_ran(table):
  case = Case(HiddenShape("t", 64, 32, 1031), "bfloat16")
  rows = tune.tune([case, Case(case.shape, "float32")], repeats=1)
  assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
  assert sum(r["chosen"] for r in rows) == 2  # one choice per dtype
  entries = json.loads(table.read_text())
  chosen = next(r["config"] for r in rows if r["chosen"] and r["dtype"] == "bfloat16")
  assert entries[f"fused/xla/{tuning.machine_key('cpu')}/bfloat16"] == {"config": chosen}
  ran = tune.configurations([case])[case.label]
  assert f"dot_dtype={chosen['dot_dtype']!r}" in ran
