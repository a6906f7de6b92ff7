"""No logits-sized temporaries, under every option: the compiled programs' temporary bytes.

Each dtype (float32, bfloat16, float16), and within it every pair of values of
temperature (none, scalar, per-example), softcap (none, 30), pass (forward,
forward+backward) and vocabulary (32000 in one chunk, 65536 in two, 32771
swept in column blocks: it is prime), for ``score``, ``token_logprobs``,
``nll_loss`` and the fused paths (``fused_token_stats``, ``fused_nll_loss``:
their logits never exist). The bound is 10% of the logits' bytes (float32
logits for the fused paths); the gradient is
an output, not a temporary. ``test_reference_does_materialise`` shows the
measurement can fail.
"""

import jax
import jax.numpy as jnp
import pytest

import lpkernel as lpk
from lpkernel import reference
from lpkernel.ops import tuning
from tests.helpers import pairwise

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TEMPERATURES = ["none", "scalar", "per-example"]
SOFTCAPS = [None, 30.0]
PASSES = [False, True]
# One vocabulary chunk, two chunks, and no chunk (a sweep over column blocks) on the CPU.
SHAPES = [(8, 512, 32000), (2, 256, 65536), (2, 256, 32771)]
WIDTH = 512


def _temperature(kind, tau):
  return {"none": 1.0, "scalar": 0.7, "per-example": tau}[kind]


def _logits_loss(path, kind, softcap):
  def loss(x, tokens, mask, tau):
    temperature = _temperature(kind, tau)
    if path == "score":  # greedy flags too: their first-argmax pass once copied the logits
      scores = lpk.score(x, tokens, mask, temperature=temperature, softcap=softcap)
      return scores.joint_logprob.sum() + scores.response_greedy.sum()
    if path == "nll_loss":  # its one pass once shared, and stored, a broadcast temperature
      return lpk.nll_loss(x, tokens, mask, temperature=temperature, softcap=softcap)
    return jnp.sum(lpk.token_logprobs(x, tokens, temperature=temperature, softcap=softcap))

  return loss


def _temp_fraction(fn, args, argnums, with_grad, reference_bytes):
  fn = jax.grad(fn, argnums=argnums) if with_grad else fn
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return stats.temp_size_in_bytes / reference_bytes


@pytest.mark.slow
@pytest.mark.parametrize("path", ["score", "token_logprobs", "nll_loss", "fused", "fused_nll_loss"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_no_logits_sized_temporaries_under_any_option(path, dtype, monkeypatch):
  failures = []
  # Chunks and sweeps matter where they are (the logits paths); float16 shares
  # their code with bfloat16, so it runs the one-chunk shape only.
  fused = path.startswith("fused")
  shapes = SHAPES[:1] if fused or dtype == jnp.float16 else SHAPES
  # The fused path's configuration follows the CPU (lpkernel.ops.tuning): this
  # one's, and that of a CPU without bfloat16 dots (float32 matmuls).
  cpus = [tuning.cpu_flags(), frozenset({"avx2"})] if fused else [tuning.cpu_flags()]
  for (b, t, v), kind, softcap, with_grad, cpu in pairwise(
    shapes, TEMPERATURES, SOFTCAPS, PASSES, cpus
  ):
    monkeypatch.setattr(tuning, "cpu_flags", lambda cpu=cpu: cpu)
    tau = jax.ShapeDtypeStruct((b, t), jnp.float32)
    if fused:
      args = (
        jax.ShapeDtypeStruct((b * t, WIDTH), dtype),
        jax.ShapeDtypeStruct((WIDTH, v), dtype),
        jax.ShapeDtypeStruct((b * t,), jnp.int32),
        jax.ShapeDtypeStruct((b * t,), jnp.float32),
      )

      def fn(h, w, targets, tau, kind=kind, softcap=softcap):
        temperature = _temperature(kind, tau)
        if path == "fused_nll_loss":  # its float32 token chunks held 25-50% of the logits
          return lpk.fused_nll_loss(h, w, targets, temperature=temperature, softcap=softcap)
        stats = lpk.fused_token_stats(h, w, targets, temperature=temperature, softcap=softcap)
        return jnp.sum(stats.logprobs)

      argnums, logits_bytes = (0, 1), b * t * v * 4
    else:
      args = (
        jax.ShapeDtypeStruct((b, t, v), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.bool_),
        tau,
      )
      fn, argnums = _logits_loss(path, kind, softcap), 0
      logits_bytes = b * t * v * jnp.dtype(dtype).itemsize
    fraction = _temp_fraction(fn, args, argnums, with_grad, logits_bytes)
    if fraction >= 0.10:
      failures.append(
        f"V={v} temperature={kind} softcap={softcap} grad={with_grad} "
        f"cpu={tuning.machine_key('cpu')}: {fraction:.2f}x"
      )
  assert not failures, "temporaries vs the logits' bytes:\n" + "\n".join(failures)


@pytest.mark.parametrize("v", [256, 257, 384, 509, 1000, 2048, 4096, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("softcap", SOFTCAPS, ids=["uncapped", "softcap"])
def test_small_vocabularies_hold_no_large_temporary(v, dtype, softcap):
  """Scores and greedy flags of short rows, forward and backward at temperature 0.7.

  The first argmax's blocks are sized to the row: the target's block is read
  again and every block's maximum kept, ``d + V / d`` values per row, so blocks
  of 1024 columns were half of V = 1000's or 2048's float32 logits and a
  quarter of V = 4096's. Under 10% of the float32 logits' bytes now (a
  bfloat16 row of 1000 is too short for 10% of its own bytes: ``d + V / d``
  float32 values are at least ``4 sqrt(V)`` bytes). A row of up to 512 columns
  takes its max's first column from the CPU's block statistics kernel, one
  read: its blocks were 14% of V = 256's logits, and a row without blocks (a
  prime, V = 257) took a masked max whose select XLA:CPU materialised (a
  float32 copy, two of bfloat16 logits). Capped (or float16) rows are reduced
  in blocks of rows whose float32 copies XLA:CPU makes; blocks of 2 MiB were
  the whole of V = 256's logits, a quarter of V = 1000's: now within 2% of them."""
  from lpkernel.ops.processed import cpu_top_k

  if v <= 512 and softcap is None and dtype != jnp.float16 and not cpu_top_k.available():
    pytest.skip("the CPU kernels are not built here (tests/test_cpu_top_k.py asserts the build)")
  b, t = 8, 512
  args = (
    jax.ShapeDtypeStruct((b, t, v), dtype),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
    jax.ShapeDtypeStruct((b, t), jnp.float32),
  )
  loss = _logits_loss("score", "scalar", softcap)
  for with_grad in PASSES:
    fraction = _temp_fraction(loss, args, 0, with_grad, b * t * v * 4)
    assert fraction < 0.10, (
      f"grad={with_grad}: temporaries {fraction:.3f}x the float32 logits' bytes"
    )


@pytest.mark.parametrize("kind", ["scalar", "per-example"])
def test_the_loss_gradient_at_a_temperature_holds_no_float32_copy(kind):
  """``nll_loss``'s one pass writes ``d logits`` beside the forward's sums: XLA:CPU
  merged their broadcasts of the temperature into one float32 ``[N, V]``
  buffer, the size of bfloat16 logits twice over (and 1.7x the time)."""
  b, t, v = 8, 512, 32000
  args = (
    jax.ShapeDtypeStruct((b, t, v), jnp.bfloat16),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
    jax.ShapeDtypeStruct((b, t), jnp.float32),
  )
  fraction = _temp_fraction(_logits_loss("nll_loss", kind, None), args, 0, True, b * t * v * 4)
  assert fraction < 0.10, f"temporaries {fraction:.3f}x the float32 logits' bytes"


def test_reference_does_materialise():
  """The memory test can fail: the plain reference builds a [B, T, V] float32 log-softmax."""
  logits = jax.ShapeDtypeStruct((2, 64, 1000), jnp.float32)
  rows = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  stats = (
    jax.jit(lambda x, t: reference.score(x, t, t > 0).joint_logprob.sum())
    .lower(logits, rows)
    .compile()
    .memory_analysis()
  )
  assert stats.temp_size_in_bytes >= 2 * 64 * 1000 * 4 * 0.9


@pytest.mark.parametrize("path", ["token_logprobs", "nll_loss"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_two_dimensional_logits_hold_no_float32_copy(path, dtype):
  """``[N, V]`` logits in one vocabulary chunk: the forward reduces ``x`` itself, and
  XLA:CPU merged its float32 upcast with the backward's and materialised it (a
  float32 ``[N, V]`` copy, 200% of bfloat16 logits) until the backward read ``x``
  through a barrier. The gradient of the loss is written in its forward pass."""
  x = jax.ShapeDtypeStruct((2048, 32000), dtype)
  t = jax.ShapeDtypeStruct((2048,), jnp.int32)

  def fn(x, t):
    if path == "nll_loss":
      return lpk.nll_loss(x, t)
    return jnp.sum(lpk.token_logprobs(x, t))

  fraction = _temp_fraction(fn, (x, t), 0, True, 2048 * 32000 * jnp.dtype(dtype).itemsize)
  assert fraction < 0.10, f"temporaries {fraction:.2f}x the logits' bytes"


@pytest.mark.parametrize("vocab_axis", [0, 1], ids=["tied-VD", "DV"])
def test_a_long_sequence_backward_holds_one_hidden_sized_accumulator(vocab_axis):
  """A 32k-token sequence's log-prob head (log-probabilities and entropy,
  forward+backward, bfloat16, Qwen-sized V and D), compiled and never run: the
  temporaries are ``d hidden``'s float32 accumulator and blocks. No second
  ``[N, D]`` buffer (the blocks' ``dz @ w^T`` go into it in token chunks) and,
  for a tied ``[V, D]`` table, no table-sized one (its gradient is written in
  place); a ``[D, V]`` matrix's gradient is carried as its bits on the CPU,
  whose view back is one copy of it."""
  n, d, v = 32768, 4096, 151936
  w_shape = (v, d) if vocab_axis == 0 else (d, v)
  args = (
    jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
    jax.ShapeDtypeStruct(w_shape, jnp.bfloat16),
    jax.ShapeDtypeStruct((n,), jnp.int32),
  )

  def fn(h, w, targets):
    stats = lpk.fused_token_stats(h, w, targets, vocab_axis=vocab_axis)
    return jnp.sum(stats.logprobs) + 0.01 * jnp.sum(stats.entropy)

  temporaries = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile().memory_analysis()
  bound = n * d * 4 + (128 << 20)
  if vocab_axis == 1 and jax.default_backend() == "cpu":
    bound += v * d * 2
  assert temporaries.temp_size_in_bytes < bound, (temporaries.temp_size_in_bytes / 2**30, bound)


@pytest.mark.parametrize(
  "n,d,chunked", [(4096, 512, False), (32768, 1024, True)], ids=["sweeps", "chunks"]
)
def test_the_float32_loss_takes_token_chunks_within_the_bound(n, d, chunked):
  """``fused_nll_loss`` in float32 on the CPU takes token chunks only where
  their temporaries (a float32 ``[D, V]`` product per chunk, copies of its
  ``[C, V]`` logits) are within the bound (``FusedConfig.chunked_loss``): at N
  = 4096, D = 512 they held 25% of the float32 logits, 50% with softcap and
  a temperature; a long sequence holds them under 10%."""
  v = 32000
  assert lpk.FusedConfig().chunked_loss(jnp.float32, True, n, d, v) is chunked
  assert not lpk.FusedConfig().chunked_loss(jnp.float32, False, n, d, v)  # other backends
  assert not lpk.FusedConfig().chunked_loss(jnp.bfloat16, True, n, d, v)
  args = (
    jax.ShapeDtypeStruct((n, d), jnp.float32),
    jax.ShapeDtypeStruct((d, v), jnp.float32),
    jax.ShapeDtypeStruct((n,), jnp.int32),
  )

  def loss(h, w, targets):
    return lpk.fused_nll_loss(h, w, targets, temperature=0.7, softcap=30.0)

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile()
  assert ("fused_loss_chunks" in compiled.as_text()) is chunked
  assert compiled.memory_analysis().temp_size_in_bytes / (n * v * 4) < 0.10
