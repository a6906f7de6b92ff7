"""Small constructions used by the notebooks to teach the chain rule.

Kept in the library (and tested) so that notebook cells only call and plot.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def logits_from_conditionals(conditionals: list[dict[int, float]], vocab_size: int, floor=1e-6):
  """Logits ``[1, T, V]`` whose row ``t`` puts the given probabilities on tokens.

  Args:
    conditionals: for each position t, ``{token: Pr(token | prefix up to t)}``;
      the remaining mass is spread evenly over the other tokens (at least ``floor``).
    vocab_size: V.
  Returns:
    float32[1, T, V] log-probabilities usable as logits.
  """
  rows = []
  for probs in conditionals:
    row = np.zeros(vocab_size)
    for tok, p in probs.items():
      row[tok] = p
    rest = [i for i in range(vocab_size) if i not in probs]
    if rest:
      row[rest] = max((1.0 - sum(probs.values())) / len(rest), floor)
    with np.errstate(divide="ignore"):
      rows.append(np.log(row))
  return jnp.asarray(np.array(rows)[None], jnp.float32)


def product_vs_log_sum(per_token_prob: float, lengths):
  """float32 product of probabilities vs the float32 sum of their logs.

  Returns:
    dict of numpy arrays: ``length``, ``product`` (underflows to 0),
    ``log_of_product`` (-inf after underflow), ``log_sum`` (stays exact) and
    ``exact`` (float64 ``n * log p``).
  """
  lengths = np.asarray(lengths)
  p = np.float32(per_token_prob)
  product = np.array([np.prod(np.full(n, p, np.float32), dtype=np.float32) for n in lengths])
  log_sum = np.array([np.sum(np.full(n, np.log(p), np.float32), dtype=np.float32) for n in lengths])
  with np.errstate(divide="ignore"):
    log_of_product = np.log(product)
  return {
    "length": lengths,
    "product": product,
    "log_of_product": log_of_product,
    "log_sum": log_sum,
    "exact": lengths * np.log(np.float64(per_token_prob)),
  }
