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


# 2-D factors with fewer elements than this are stacked with their likes into
# one batched Gram; larger ones get a Gram each. XLA:CPU, MiniLM's gradient
# program at 32 tokens: stacked, LoRA²'s tiny factors (k = 1, a few hundred
# elements) compiled in 7.6-7.8 s against 10.0-10.1 s with a Gram each, but
# RM-LoRA's rank-8 factors of 384-wide layers (3,072 elements) in 4.2 s
# against 3.3-3.4 s.
STACK_BELOW = 1024


def gram_deviations(
    factors: Sequence[tuple[Array, int]], *, squared: bool = True, reduction: str = "sum"
) -> Array:
  """`gram_deviation` of each ``(x, rank_axis)`` pair, summed (or averaged over the pairs).

  Small factors (under `STACK_BELOW` elements) of one shape and rank axis
  are stacked and go through one vmapped `gram_deviation`, so dozens of
  tiny adapters trace a few ops per shape rather than a few per factor. A
  3-D ``x`` is a stack of factors (a scanned model's layers,
  `rmlora_jax.stacking.stack_adapters`), one term per entry of its first
  axis, and is stacked with its likes too. Equal to the sum (mean) of the
  per-factor values up to the order of the float sums; zero when there are
  no factors.
  """
  check_reduction(reduction)
  if not factors:
    return jnp.zeros((), jnp.float32)
  groups: dict[tuple, list[Array]] = {}
  terms = 0
  total = jnp.zeros((), jnp.float32)
  for x, rank_axis in factors:
    if rank_axis not in (0, 1) or jnp.ndim(x) not in (2, 3):
      raise ValueError(f"gram_deviations: factors are 2-D (or stacks of them, 3-D) with rank_axis 0 or 1, "
                       f"got shape {jnp.shape(x)} and rank_axis {rank_axis!r}")
    if jnp.ndim(x) == 2 and jnp.size(x) >= STACK_BELOW:
      terms += 1
      total = total + gram_deviation(x, rank_axis=rank_axis, squared=squared)
      continue
    x = x if jnp.ndim(x) == 3 else x[None]
    terms += jnp.shape(x)[0]
    groups.setdefault((jnp.shape(x)[1:], jnp.result_type(x), rank_axis), []).append(x)
  for (_, _, rank_axis), xs in groups.items():
    stacked = xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    each = jax.vmap(lambda x, k=rank_axis: gram_deviation(x, rank_axis=k, squared=squared))(stacked)
    total = total + jnp.sum(each)
  return total / terms if reduction == "mean" else total


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
      by `init_lora`; factors stacked over a scanned model's layers
      (`rmlora_jax.stacking.stack_adapters`) give a term per layer.
    squared: ``True`` for the paper's squared Frobenius norm; ``False`` for the
      plain norm of the authors' released code.
    reduction: ``"sum"`` over all terms (the paper), or ``"mean"`` over the
      2 x (number of adapters, a stacked one counting once per layer) terms
      (the authors' code, with weight 0.1).

  Returns:
    A scalar, differentiable with respect to ``adapters``.

  Example::

    loss = task_loss + 0.1 * ortho_penalty(adapters)
  """
  check_reduction(reduction)
  factors = []
  for path, ad in adapters.items():
    if "a" not in ad or "b" not in ad:
      raise ValueError(
          f"ortho_penalty: adapter at {path!r} has factors {sorted(ad)}; it needs "
          f"'a' and 'b' (use the family's own penalty for AdaLoRA or LoRA²)"
      )
    factors += [(ad["a"], 0), (ad["b"], 1)]
  return gram_deviations(factors, squared=squared, reduction=reduction)
