"""Orthogonality penalties on adapter factors (RM-LoRA's Eq. 10 and its kin).

The R-LoRA regulariser pushes the rows of ``a`` (rank, d_in) and the columns of
``b`` (d_out, rank) towards orthonormal sets: ``||a a^T - I||_F^2 + ||b^T b - I||_F^2``.
Both Gram matrices are (rank, rank), so the cost is O(rank^2 (d_in + d_out)),
small beside a forward pass, and it runs inside the jitted loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

REDUCTIONS = ("sum", "mean")


def check_reduction(reduction: str, *, where: str = "reduction") -> None:
  """Raises ValueError unless ``reduction`` is "sum" or "mean"."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"{where} must be one of {REDUCTIONS}, got {reduction!r}")


def gram_deviation(x: Array, *, rank_axis: int, squared: bool = True) -> Array:
  """``||G - I||_F`` (squared by default) for the Gram matrix over the rank axis.

  Args:
    x: a 2-D factor.
    rank_axis: 0 when rank is the row axis (``a``, shape (rank, d_in); G = x x^T),
      1 when it is the column axis (``b``, shape (d_out, rank); G = x^T x).
    squared: square the Frobenius norm (the paper) or not (the authors' code).

  Returns:
    A float32 (or wider) scalar.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  gram = x @ x.T if rank_axis == 0 else x.T @ x
  dev = gram - jnp.eye(gram.shape[0], dtype=gram.dtype)
  sq = jnp.sum(dev * dev)
  return sq if squared else jnp.sqrt(sq)


def reduce_terms(terms: Sequence[Array], reduction: str) -> Array:
  """Sums or averages penalty terms; zero when there are none."""
  check_reduction(reduction)
  if not terms:
    return jnp.zeros((), jnp.float32)
  total = sum(terms[1:], terms[0])
  return total / len(terms) if reduction == "mean" else total


def ortho_penalty(
    adapters: Mapping[str, Mapping[str, Array]] | Any,
    *,
    squared: bool = True,
    reduction: str = "sum",
) -> Array:
  """RM-LoRA's orthogonality regulariser (Eq. 10), summed over adapters.

  ``sum_adapters ||a a^T - I||_F^2 + ||b^T b - I||_F^2``.

  Args:
    adapters: ``{path: {"a": (rank, d_in), "b": (d_out, rank), ...}}``, as made
      by `init_lora`.
    squared: ``True`` for the paper's squared Frobenius norm; ``False`` for the
      plain norm of the authors' released code.
    reduction: ``"sum"`` over all terms (the paper), or ``"mean"`` over the
      2 x (number of adapters) terms (the authors' code, with weight 0.1).

  Returns:
    A scalar, differentiable with respect to ``adapters``.

  Example::

    loss = task_loss + 0.1 * ortho_penalty(adapters)
  """
  check_reduction(reduction)
  terms = []
  for path, ad in adapters.items():
    if "a" not in ad or "b" not in ad:
      raise ValueError(
          f"ortho_penalty: adapter at {path!r} has factors {sorted(ad)}; it needs "
          f"'a' and 'b' (use the family's own penalty for AdaLoRA or LoRA²)"
      )
    terms.append(gram_deviation(ad["a"], rank_axis=0, squared=squared))
    terms.append(gram_deviation(ad["b"], rank_axis=1, squared=squared))
  return reduce_terms(terms, reduction)
