"""One GRPO policy step's log-probability work: tunix's way against lpkernel's, in one run.

Both sides run the real loss functions tunix's learner calls (its registered
``"grpo"`` and lpkernel's ``"lpkernel_grpo"``, ``lpkernel.tunix``) on the same
``TrainExample``, through a tunix-style model whose transformer body is given:
its hidden states are a parameter and its tied table projects them
(``HeadModel``, Qwen3's tail), so the rows time the head's log-probabilities,
entropy, objective and their gradients, nothing of the layers. Also the
forward-only ``compute_per_token_logps`` (the reference and old-policy
log-probabilities), and, compiled but never run, the production shape's
temporaries (``jax.ShapeDtypeStruct`` inputs, ``memory_analysis()``).
"""

from __future__ import annotations

import functools
import time
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class StepShape(NamedTuple):
  batch: int
  prompt: int
  completion: int
  width: int
  vocab: int

  @property
  def label(self) -> str:
    return f"B{self.batch} P{self.prompt}+C{self.completion} D{self.width} V{self.vocab}"


# Qwen3's vocabulary, scaled to 2 CPU cores (one step of tunix's takes seconds here).
CPU_STEP = StepShape(batch=2, prompt=256, completion=256, width=512, vocab=151936)
QUICK_STEP = StepShape(batch=2, prompt=8, completion=8, width=32, vocab=1000)
# Compiled only: a 32k-token GRPO rollout on a 4096-wide model (MaxText PR 4409's case).
PRODUCTION = [
  StepShape(batch=1, prompt=1024, completion=31744, width=4096, vocab=151936),
  StepShape(batch=1, prompt=512, completion=3584, width=4096, vocab=151936),
]
PAD, EOS = 0, 2


def _tunix():
  """tunix and lpkernel.tunix, or None when tunix is not installed."""
  try:
    from flax import nnx
    from tunix.rl import common, function_registry
    from tunix.rl.grpo import grpo_learner

    import lpkernel.tunix as lpk_tunix
  except ImportError:
    return None
  return types.SimpleNamespace(
    nnx=nnx,
    common=common,
    registry=function_registry,
    grpo=grpo_learner,
    lpk_tunix=lpk_tunix,
  )


def head_model(t, hidden, table):
  """A tunix-style causal LM whose body is given: ``hidden`` ``[B, L, D]`` in,
  ``hidden @ table.T`` float32 logits out (tied ``[V, D]`` table), the hidden
  states sown as tunix's Qwen3 sows them."""
  nnx = t.nnx

  class Embedder(nnx.Module):
    def __init__(self, table):
      self.input_embedding = nnx.Param(table)

  class HeadModel(nnx.Module):
    def __init__(self, hidden, table):
      self.hidden = nnx.Param(hidden)
      self.embedder = Embedder(table)
      self.config = types.SimpleNamespace(use_tied_embedding=True)

    def __call__(self, tokens, positions, cache, attention_mask, output_hidden_states=False):
      x = self.hidden[...]
      if output_hidden_states:
        self.sow(nnx.Intermediate, "all_hidden_states", x)
      logits = jnp.dot(x, self.embedder.input_embedding[...].T)
      return jnp.astype(logits, jnp.float32), None

  return HeadModel(hidden, table)


def _example(t, shape: StepShape, key):
  b, p, c = shape.batch, shape.prompt, shape.completion
  k = jax.random.split(key, 3)
  lp = -jax.random.uniform(k[0], (b, c), minval=0.0, maxval=5.0)
  return t.grpo.TrainExample(
    prompt_ids=jnp.ones((b, p), jnp.int32),
    prompt_mask=jnp.ones((b, p), bool),
    completion_ids=jax.random.randint(k[1], (b, c), 3, shape.vocab),
    completion_mask=jnp.ones((b, c), jnp.int32),
    advantages=jax.random.normal(k[2], (b,)),
    ref_per_token_logps=lp + 0.1,
    old_per_token_logps=lp - 0.1,
  )


def _config(t):
  config = t.grpo.GRPOConfig(beta=0.04, epsilon=0.2, loss_agg_mode="sequence-mean-token-mean")
  config.temperature = 1.0
  return config


def _step(t, name: str, graphdef, config):
  """``(state, example) -> (loss, d state)`` through the named registered policy loss."""
  loss_fn = t.registry.get_policy_loss_fn(name)

  def step(state, example):
    return jax.value_and_grad(
      lambda s: loss_fn(t.nnx.merge(graphdef, s), example, config, PAD, EOS)[0]
    )(state)

  return jax.jit(step)


def _logps(t, who: str, graphdef):
  """``(state, example) -> per-token log-probabilities``: tunix's or lpkernel's forward."""
  compute = (
    t.common.compute_per_token_logps if who == "tunix" else t.lpk_tunix.compute_per_token_logps
  )

  def logps(state, example):
    return compute(graphdef, state, example.prompt_ids, example.completion_ids, PAD, EOS)

  return jax.jit(logps)


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _temporaries(fn, args) -> float:
  """MiB of the compiled program's temporaries."""
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def _chunked(t) -> str | None:
  """The installed tunix's sequence-chunked log-prob function, if it has one."""
  names = [n for n in dir(t.common) if "chunk" in n and "logp" in n]
  return names[0] if names else None


def measure(repeats: int = 3, quick: bool = False) -> list[dict]:
  """Times and temporaries of one policy step (forward+backward) and of the
  forward log-probabilities, tunix's way and lpkernel's, float32 and bfloat16."""
  t = _tunix()
  if t is None:
    return [{"status": "skipped: tunix is not installed (pip install 'lpkernel[tunix]')"}]
  shape = QUICK_STEP if quick else CPU_STEP
  rows = []
  for dtype in ("float32", "bfloat16"):
    k = jax.random.split(jax.random.key(0), 3)
    length = shape.prompt + shape.completion
    hidden = jax.random.normal(k[0], (shape.batch, length, shape.width), dtype)
    table = (jax.random.normal(k[1], (shape.vocab, shape.width)) / shape.width**0.5).astype(dtype)
    graphdef, state = t.nnx.split(head_model(t, hidden, table))
    example = _example(t, shape, k[2])
    config = _config(t)
    case = f"{shape.label} {dtype}"
    for pass_ in ("forward+backward", "forward"):
      timed = {}
      for who, loss_name in (("tunix", "grpo"), ("lpkernel", "lpkernel_grpo")):
        if pass_ == "forward+backward":
          fn = _step(t, loss_name, graphdef, config)
        else:
          fn = _logps(t, who, graphdef)
        args = (state, example)
        timed[who] = (_time(fn, args, repeats), _temporaries(fn, args))
      for who, (seconds, temps) in timed.items():
        what = "grpo_loss_fn" if pass_ == "forward+backward" else "compute_per_token_logps"
        rows.append(
          {
            "case": case,
            "pass_": pass_,
            "method": f"{who} {what}",
            "seconds": seconds,
            "temp_mib": temps,
            "vs_tunix_time": seconds / timed["tunix"][0],
            "vs_tunix_temporaries": temps / timed["tunix"][1],
            "status": "ok",
          }
        )
      if pass_ == "forward+backward" and _chunked(t) is None:
        rows.append(
          {
            "case": case,
            "pass_": pass_,
            "method": "tunix chunked",
            "status": "skipped: the installed tunix has no sequence-chunked log-prob path",
          }
        )
  return rows


def _zeros_head(t, shape: StepShape):
  length = shape.prompt + shape.completion
  return head_model(
    t,
    jnp.zeros((shape.batch, length, shape.width), jnp.bfloat16),
    jnp.zeros((shape.vocab, shape.width), jnp.bfloat16),
  )


def production_temporaries() -> list[dict]:
  """GiB of temporaries of a GRPO step's log-prob head (policy log-probs and
  entropy, forward+backward, bfloat16 hidden states and tied table), compiled for
  this backend at production shapes and never run."""
  t = _tunix()
  if t is None:
    return [{"status": "skipped: tunix is not installed"}]
  rows = []
  for shape in PRODUCTION:
    graphdef, state = t.nnx.split(t.nnx.eval_shape(functools.partial(_zeros_head, t, shape)))
    example = jax.eval_shape(functools.partial(_example, t, shape, jax.random.key(0)))
    length = shape.prompt + shape.completion
    out = {"case": f"{shape.label} bfloat16", "logits_gib": length * shape.vocab * 4 / 2**30}
    for who, name in (("tunix", "grpo"), ("lpkernel", "lpkernel_grpo")):
      step = _step(t, name, graphdef, _config(t))
      out[f"{who}_gib"] = _temporaries(step, (state, example)) / 2**10
    rows.append(out)
  return rows


def table(rows: list[dict], production: list[dict]) -> str:
  lines = [
    f"{'case':<34} {'pass':<17} {'method':<37} {'seconds':>8} {'temp MiB':>9} "
    f"{'x tunix time':>12} {'x tunix temp':>12}"
  ]
  for r in rows:
    if r.get("status") != "ok":
      lines.append(f"{r.get('case', ''):<34} {r.get('pass_', ''):<17} {r.get('method', '')} "
                   f"{r['status']}")  # fmt: skip
      continue
    lines.append(
      f"{r['case']:<34} {r['pass_']:<17} {r['method']:<37} {r['seconds']:>8.3f} "
      f"{r['temp_mib']:>9.1f} {r['vs_tunix_time']:>12.2f} {r['vs_tunix_temporaries']:>12.3f}"
    )
  lines.append("\ncompiled, never run (GiB of temporaries):")
  for p in production:
    if "case" not in p:
      lines.append(f"  {p['status']}")
      continue
    lines.append(
      f"  {p['case']:<40} tunix {p['tunix_gib']:7.2f}  lpkernel {p['lpkernel_gib']:5.2f}  "
      f"(float32 logits alone {p['logits_gib']:.2f})"
    )
  return "\n".join(lines)
