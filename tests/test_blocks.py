"""The row and column loops every XLA pass shares (``lpkernel.ops.blocks``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lpkernel.ops.blocks import map_row_chunks


def _row_fn(calls):
  def fn(x, pair):
    calls.append(1)
    scale, offset = pair
    return {"sum": x.sum(1) * scale + offset, "head": x[:, :2] * 2, "none": None}

  return fn


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 23), chunk=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_row_chunks_are_the_rows_at_once(n, chunk, seed):
  """Every row once, whatever the chunk (a divisor of ``n`` or not, the last
  chunk overlapping its predecessor, wider than ``n``), for pytrees of rows,
  and ``fn`` traced once."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
  pair = (jnp.asarray(rng.normal(size=n), jnp.float32), jnp.arange(n, dtype=jnp.int32))
  calls = []
  got = jax.jit(lambda x, pair: map_row_chunks(_row_fn(calls), (x, pair), chunk))(x, pair)
  want = _row_fn([])(x, pair)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert len(calls) == 1


def test_row_chunks_are_differentiable():
  """The XLA implementations are differentiated by JAX at any order: the loop
  takes reverse-mode derivatives."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 3)), jnp.float32)

  def loss(x):
    return jnp.sum(map_row_chunks(lambda a: jnp.sin(a).sum(1) ** 2, (x,), 3))

  chex.assert_trees_all_close(
    jax.grad(loss)(x), jax.grad(lambda x: jnp.sum(jnp.sin(x).sum(1) ** 2))(x), rtol=1e-5
  )
