"""The methods the suite times: lpkernel and its baselines and peers.

Every method turns one case's inputs into a scalar loss (a sum of target
log-probabilities, so every method computes the same number) and names the
inputs it differentiates for the forward+backward pass. A method that cannot
run here says why; the runner reports it as skipped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import lpkernel as lpk


@dataclasses.dataclass(frozen=True)
class Method:
  """A benchmarked implementation.

  Attributes:
    name: shown in the table.
    fused: runs on hidden-state cases (else on logits cases).
    loss: ``inputs dict -> float32 scalar``.
    wrt: names of the inputs the backward pass differentiates.
    missing: a zero-argument callable returning why it cannot run, or None.
    baseline: the method whose number it computes and against which its
      ``vs_baseline`` is taken (None: the case's, ``BASELINE``).
    skip: ``(case, pass name) -> why it does not run there, or None``.
  """

  name: str
  fused: bool
  loss: Callable[[dict], jax.Array]
  wrt: tuple[str, ...]
  missing: Callable[[], str | None] = lambda: None
  baseline: str | None = None
  skip: Callable[[object, str], str | None] = lambda case, pass_: None


def _needs(module: str) -> Callable[[], str | None]:
  return lambda: None if importlib.util.find_spec(module) else f"{module} is not installed"


# --- logits rows: score a response mask over [B, T, V] logits ---------------


def _lpkernel(implementation=None):
  def loss(inp):
    scores = lpk.score(
      inp["logits"], inp["tokens"], inp["response_mask"], implementation=implementation
    )
    return scores.response_logprob.sum()

  return loss


def _lpkernel_loss(implementation=None):
  def loss(inp):  # the training loss: d logits written in the forward pass
    nll = lpk.losses.sft_loss_logits(
      inp["logits"], inp["tokens"], inp["response_mask"], normalise="sum",
      implementation=implementation,
    )  # fmt: skip
    return -nll

  return loss


def _not_default(name: str, fused: bool = False) -> Callable[[], str | None]:
  """Skips an implementation that is already lpkernel's default here (timed as
  "lpkernel", or "lpkernel-fused")."""
  from lpkernel import ops

  def missing():
    defaults = ops.DEFAULT_FUSED if fused else ops.DEFAULT_LOGITS
    if defaults.get(jax.default_backend()) == name:
      return f"the default implementation on {jax.default_backend()} (see lpkernel)"
    return None

  return missing


def _on_gpu() -> str | None:
  return None if jax.default_backend() == "gpu" else "needs a GPU (Pallas Triton kernels)"


def _plain(inp):
  """The plain baseline: ``jax.nn.log_softmax`` + ``take_along_axis``, masked sum."""
  logits, tokens, mask = inp["logits"], inp["tokens"], inp["response_mask"]
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  lp = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask[:, 1:], lp, 0.0))


def _optax(inp):
  logits, tokens, mask = inp["logits"], inp["tokens"], inp["response_mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
  )
  return -jnp.sum(jnp.where(mask[:, 1:], ce, 0.0))


# --- fused rows: hidden [N, D] @ unembed [D, V] with targets [N] -------------


def _fused(implementation=None):
  def loss(inp):
    return lpk.fused_token_logprobs(
      inp["hidden"], inp["unembed"], inp["targets"], implementation=implementation
    ).sum()

  return loss


def _fused_loss(implementation=None):
  def loss(inp):
    return -lpk.fused_nll_loss(
      inp["hidden"], inp["unembed"], inp["targets"], implementation=implementation
    )

  return loss


# --- the rollout's processed distribution (temperature 0.7, top-k 50, top-p 0.95) ---

SAMPLING = lpk.Sampling(temperature=0.7, top_k=50, top_p=0.95)
# vLLM's default top_k=-1 with top_p < 1: on the suite's random logits every
# row's nucleus runs past the candidates, so every row is searched (the worst case).
TOP_P_ALONE = lpk.Sampling(temperature=0.7, top_p=0.95)
SORTED_ELEMENTS = 1 << 25  # XLA:CPU sorts about 7 M elements per second: v8k's 4096 rows


def _sorts_small(case, pass_: str) -> str | None:
  """The sort-and-mask baselines run forward, up to ``SORTED_ELEMENTS`` logits."""
  if pass_ != "forward":
    return "forward only (it sorts every row)"
  if case.shape.tokens * case.shape.vocab > SORTED_ELEMENTS:
    return f"over {SORTED_ELEMENTS} logits (it sorts every row; see the smaller cases)"
  return None


def _kept_sum(stats, where=True):
  """Sum of processed log-probabilities over the kept scored targets."""
  return jnp.sum(jnp.where(where & stats.kept, stats.logprobs, 0.0))


def _processed(implementation=None, sampling=SAMPLING):
  def loss(inp):  # targets shifted as score does: row t scores token t + 1
    tokens, mask = inp["tokens"], inp["response_mask"]
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    stats = lpk.processed_token_stats(
      inp["logits"], targets, sampling, implementation=implementation
    )
    scored = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    return _kept_sum(stats, scored)

  return loss


def _fused_processed(implementation=None):
  def loss(inp):
    stats = lpk.fused_processed_token_stats(
      inp["hidden"], inp["unembed"], inp["targets"], SAMPLING, implementation=implementation
    )
    return _kept_sum(stats)

  return loss


def _replay(implementation=None, vocab_axis=0):
  # vocab_axis 0: the table as a tied embedding [V, D] (Qwen's small models tie
  # it), rows gathered as stored; -1: an unembedding matrix [D, V] (the CPU
  # kernels copy a tile of its rows at a time; XLA transposes a slab of D at a time).
  table = "unembed_t" if vocab_axis == 0 else "unembed"

  def replayed(inp):
    lp = lpk.fused_replay_token_logprobs(
      inp["hidden"], inp[table], inp["targets"], inp["kept_ids"], temperature=0.7,
      vocab_axis=vocab_axis, implementation=implementation,
    )  # fmt: skip
    return jnp.sum(lp)

  return replayed


def _replay_shapes_only(case, pass_: str) -> str | None:
  del pass_
  return None if case.shape.name.startswith("replay") else "runs at the replay shapes"


def _replay_materialised(inp):
  logits = jnp.dot(inp["hidden"], inp["unembed"], preferred_element_type=jnp.float32)
  return jnp.sum(
    lpk.replay_token_logprobs(logits, inp["targets"], inp["kept_ids"], temperature=0.7)
  )


def _materialised(inp):
  logits = jnp.dot(inp["hidden"], inp["unembed"], preferred_element_type=jnp.float32)
  return lpk.token_logprobs(logits.astype(inp["hidden"].dtype), inp["targets"]).sum()


def _tokamax(inp):
  import tokamax
  from absl import flags

  if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; ours are not absl's
    flags.FLAGS.mark_as_parsed()

  loss = tokamax.linear_softmax_cross_entropy_loss(
    inp["hidden"], inp["targets"], inp["unembed"], reduction="sum", implementation="xla"
  )
  return -loss.astype(jnp.float32)


def _jax_cce(inp):
  import jax_cce

  # jax-cce takes the unembedding as [V, D] (given pre-transposed, untimed) and
  # returns the mean cross-entropy.
  loss = jax_cce.linear_cross_entropy(inp["hidden"], inp["unembed_t"], inp["targets"])
  return -loss.astype(jnp.float32) * inp["targets"].size


METHODS = [
  Method("lpkernel", False, _lpkernel(), ("logits",)),
  Method("lpkernel-xla", False, _lpkernel("xla"), ("logits",), _not_default("xla")),
  Method(
    "lpkernel-pallas",
    False,
    _lpkernel("pallas_gpu"),
    ("logits",),
    lambda: _on_gpu() or _not_default("pallas_gpu")(),
  ),
  Method("lpkernel-loss", False, _lpkernel_loss(), ("logits",)),
  Method("plain", False, _plain, ("logits",)),
  Method("optax", False, _optax, ("logits",)),
  Method("lpkernel-processed", False, _processed(), ("logits",), baseline="sort-and-mask"),
  Method(
    "lpkernel-processed-top-p",
    False,
    _processed(sampling=TOP_P_ALONE),
    ("logits",),
    baseline="sort-and-mask-top-p",
  ),
  Method(
    "lpkernel-processed-pallas",
    False,
    _processed("pallas_gpu"),
    ("logits",),
    _on_gpu,
    baseline="sort-and-mask",
  ),
  Method(
    "sort-and-mask",
    False,
    _processed("reference"),
    ("logits",),
    baseline="sort-and-mask",
    skip=_sorts_small,
  ),
  Method(
    "sort-and-mask-top-p",
    False,
    _processed("reference", TOP_P_ALONE),
    ("logits",),
    baseline="sort-and-mask-top-p",
    skip=_sorts_small,
  ),
  Method("lpkernel-fused", True, _fused(), ("hidden", "unembed")),
  Method(
    "lpkernel-fused-pallas",
    True,
    _fused("pallas_gpu"),
    ("hidden", "unembed"),
    lambda: _on_gpu() or _not_default("pallas_gpu", fused=True)(),
  ),
  Method("lpkernel-fused-loss", True, _fused_loss(), ("hidden", "unembed")),
  Method(
    "lpkernel-fused-loss-pallas",
    True,
    _fused_loss("pallas_gpu"),
    ("hidden", "unembed"),
    lambda: _on_gpu() or _not_default("pallas_gpu", fused=True)(),
  ),
  Method("materialised", True, _materialised, ("hidden", "unembed")),
  Method(
    "lpkernel-fused-processed",
    True,
    _fused_processed(),
    ("hidden", "unembed"),
    baseline="fused-sort-and-mask",
  ),
  Method(
    "lpkernel-fused-processed-pallas",
    True,
    _fused_processed("pallas_gpu"),
    ("hidden", "unembed"),
    _on_gpu,
    baseline="fused-sort-and-mask",
  ),
  Method(
    "fused-sort-and-mask",
    True,
    _fused_processed("reference"),
    ("hidden", "unembed"),
    baseline="fused-sort-and-mask",
    skip=_sorts_small,
  ),
  Method(
    "lpkernel-replay",
    True,
    _replay(),
    ("hidden", "unembed_t"),
    baseline="replay-materialised",
  ),
  Method(
    "lpkernel-replay-dv",
    True,
    _replay(vocab_axis=-1),
    ("hidden", "unembed"),
    baseline="replay-materialised",
    skip=_replay_shapes_only,
  ),
  Method(
    "lpkernel-replay-pallas",
    True,
    _replay("pallas_gpu"),
    ("hidden", "unembed_t"),
    _on_gpu,
    baseline="replay-materialised",
  ),
  Method(
    "replay-materialised",
    True,
    _replay_materialised,
    ("hidden", "unembed"),
    baseline="replay-materialised",
  ),
  Method("tokamax-xla", True, _tokamax, ("hidden", "unembed"), _needs("tokamax")),
  Method("jax-cce", True, _jax_cce, ("hidden", "unembed_t"), _needs("jax_cce")),
]
BASELINE = {False: "plain", True: "materialised"}


def by_name(names: list[str] | None) -> list[Method]:
  if not names:
    return METHODS
  known = {m.name: m for m in METHODS}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {sorted(known)}")
  return [known[n] for n in names]
