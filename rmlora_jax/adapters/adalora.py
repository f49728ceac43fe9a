"""AdaLoRA (Zhang et al. 2023): SVD-shaped adapters with a pruned rank budget.

An adapter for a kernel of shape (d_in, d_out) is
``{"p": (d_out, r), "lam": (r,), "q": (r, d_in)}`` with
``dW = (alpha / r) * p @ diag(lam) @ q``, r the *initial* rank (PEFT divides
by ``ranknum``, which stays the initial r). Training adds the orthogonality
penalty `adalora_penalty` to the loss and wraps the optimizer in
`adalora_pruning`, which scores triplets ``(p[:, i], lam[i], q[i])`` and
zeroes the ``lam`` of the least important ones under the cubic budget of
`rmlora_jax.budget`.

Example::

  spec = LoraSpec(rank=12, alpha=12.0, targets=(r".*/kernel",))
  adapters = init_adalora(jax.random.key(0), params, spec)
  schedule = BudgetSchedule(initial_rank=12, target_rank=8, total_steps=1000,
                            t_init=100, t_final=200, delta_t=10)
  tx = adalora_pruning(optax.adamw(1e-3), schedule)
  loss = task_loss + 0.5 * adalora_penalty(adapters, squared=False, reduction="mean")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmlora_jax import budget as budget_lib
from rmlora_jax.adapters import lora
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty

Array = jax.Array

ADALORA_FACTORS = frozenset({"p", "lam", "q"})
ADALORA = budget_lib.TripletFamily(name="AdaLoRA", factors=ADALORA_FACTORS, rank_axes={"p": 1, "q": 0})

lora.register_adapter_kind(ADALORA_FACTORS, lambda ad: (ad["p"] * ad["lam"]) @ ad["q"],
                           lambda ad: (ad["p"] * ad["lam"], ad["q"]))


def init_adalora(key: Array, params: Any, spec: lora.LoraSpec) -> dict[str, dict[str, Array]]:
  """Creates AdaLoRA adapters for every leaf of ``params`` that ``spec`` targets.

  Args:
    key: a PRNG key; adapter ``path`` uses ``fold_in(key, hash(path))``, split
      into one key for ``p`` and one for ``q``.
    params: the frozen parameter pytree (Flax kernels are (d_in, d_out)).
    spec: ``spec.rank`` is the initial rank r; ``spec.init_std`` the std of p and q.

  Returns:
    ``{path: {"p": (d_out, r), "lam": zeros (r,), "q": (r, d_in)}}``, p and q
    ~ N(0, init_std^2), so dW = 0 at init.
  """
  adapters = {}
  for path, leaf in lora.select_targets(params, spec).items():
    d_in, d_out = leaf.shape
    dtype = lora.adapter_dtype(leaf)
    kp, kq = jax.random.split(jax.random.fold_in(key, paths_lib.path_hash(path)))
    adapters[path] = {
        "p": spec.init_std * jax.random.normal(kp, (d_out, spec.rank), dtype),
        "lam": jnp.zeros((spec.rank,), dtype),
        "q": spec.init_std * jax.random.normal(kq, (spec.rank, d_in), dtype),
    }
  return adapters


def _require(ad: Mapping[str, Array], names: frozenset[str], path: str, where: str) -> None:
  if frozenset(ad) != names:
    raise ValueError(f"{where}: adapter at {path!r} has factors {sorted(ad)}; expected {sorted(names)}")


def adalora_penalty(
    adapters: Mapping[str, Mapping[str, Array]], *, squared: bool = True, reduction: str = "sum"
) -> Array:
  """AdaLoRA's orthogonality regulariser ``sum ||p^T p - I||_F^2 + ||q q^T - I||_F^2``.

  Args:
    adapters: ``{path: {"p", "lam", "q"}}`` as made by `init_adalora`.
    squared: the squared Frobenius norm (the paper) or the plain norm (PEFT).
    reduction: ``"sum"`` over the 2 x (number of adapters) terms, or
      ``"mean"`` (PEFT, which weights the mean by ``orth_reg_weight=0.5``).

  Returns:
    A scalar, differentiable with respect to ``adapters``.
  """
  penalty.check_reduction(reduction)
  terms = []
  for path, ad in adapters.items():
    _require(ad, ADALORA_FACTORS, path, "adalora_penalty")
    terms.append(penalty.gram_deviation(ad["p"], rank_axis=1, squared=squared))
    terms.append(penalty.gram_deviation(ad["q"], rank_axis=0, squared=squared))
  return penalty.reduce_terms(terms, reduction)


def adalora_pruning(
    inner: optax.GradientTransformation, schedule: budget_lib.BudgetSchedule
) -> optax.GradientTransformation:
  """AdaLoRA's training transform: ``inner`` plus importance scoring and pruning.

  Triplet i of an adapter scores ``score(lam_i) + mean_j score(q_ij) +
  mean_j score(p_ji)``; the b(t) best triplets over all adapters are kept at
  each pruning step, the others' ``lam`` set to exactly 0 after the step. See
  `rmlora_jax.budget.budget_pruning` for the phases.

  Args:
    inner: the optimizer that produces the updates, e.g. ``optax.adamw(1e-3)``.
    schedule: the budget; ``schedule.initial_rank`` must equal the adapters' r.

  Returns:
    An `optax.GradientTransformation`; call ``update(grads, state, params)``.

  Example::

    tx = adalora_pruning(optax.adam(1e-3), schedule)
    updates, state = tx.update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  """
  return budget_lib.budget_pruning(inner, schedule, ADALORA)


def adalora_ranks(adapters: Any) -> dict[str, int]:
  """``{path: number of nonzero lam entries}``: each AdaLoRA adapter's rank now."""
  return budget_lib.nonzero_ranks(adapters, ADALORA_FACTORS, "lam")


def budget_ranks(rank: int, init_rank: int = 0, target_rank: int = 0) -> tuple[int, int]:
  """AdaLoRA's ``(initial, target)`` ranks beside a LoRA of rank ``rank``.

  The papers compare AdaLoRA at LoRA's inference budget: it starts at rank
  2R and is pruned to R (RM-LoRA Table 2: "16 / 8" beside LoRA R = 8). Each
  rank given as a positive number is kept; unset (<= 0) takes that default.

  Example::

    budget_ranks(8)         # (16, 8)
    budget_ranks(8, 12, 6)  # (12, 6)
  """
  return (init_rank if init_rank > 0 else 2 * rank, target_rank if target_rank > 0 else rank)
