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

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmlora_jax import budget as budget_lib
from rmlora_jax.adapters import base
from rmlora_jax.adapters import family as family_lib
from rmlora_jax.adapters import lora
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty

Array = jax.Array

ADALORA_FACTORS = frozenset({"p", "lam", "q"})
ADALORA = budget_lib.TripletFamily(name="AdaLoRA", factors=ADALORA_FACTORS, rank_axes={"p": 1, "q": 0})



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
  if spec.init != "gaussian":
    raise ValueError(f"AdaLoRA draws p and q from N(0, init_std^2); LoraSpec.init={spec.init!r} "
                     f"applies to LoRA and SoRA only")
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
    terms += [(ad["p"], 1), (ad["q"], 0)]
  return penalty.gram_deviations(terms, squared=squared, reduction=reduction)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetOptions:
  """Settings of a method pruned to a rank budget (AdaLoRA, LoRA²); the initial rank is the spec's."""

  # Average rank per adapter at the end of pruning (the budget b(T) / adapters);
  # None: half the initial rank, the papers' 2R -> R.
  target_rank: int | None = None
  # Weight of the family's orthogonality penalty.
  ortho_weight: float = 0.5
  # Fraction of the steps before pruning starts (t_i) ...
  t_init_ratio: float = 0.1
  # ... and at the end with the rank pattern frozen (t_f).
  t_final_ratio: float = 0.2
  # Steps between pruning steps.
  delta_t: int = 10
  # EMA factors of the sensitivity and of its uncertainty.
  beta1: float = 0.85
  beta2: float = 0.85

  def __post_init__(self):
    name = type(self).__name__
    for field in ("t_init_ratio", "t_final_ratio", "beta1", "beta2"):
      value = getattr(self, field)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}.{field} must be in [0, 1], got {value!r}")
    if not self.ortho_weight >= 0:
      raise ValueError(f"{name}.ortho_weight must be >= 0, got {self.ortho_weight!r}")
    for field in ("target_rank", "delta_t"):
      value = getattr(self, field)
      if field == "target_rank" and value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}")

  def schedule(self, initial_rank: int, total_steps: int) -> budget_lib.BudgetSchedule:
    """The budget schedule of a run of ``total_steps`` from ``initial_rank``."""
    target = max(1, initial_rank // 2) if self.target_rank is None else self.target_rank
    if not 1 <= target <= initial_rank:
      raise ValueError(f"{type(self).__name__}.target_rank={target} must be in 1..{initial_rank} "
                       f"(the initial rank)")
    return budget_lib.BudgetSchedule(
        initial_rank=initial_rank, target_rank=target, total_steps=total_steps,
        t_init=int(round(self.t_init_ratio * total_steps)), t_final=int(round(self.t_final_ratio * total_steps)),
        delta_t=self.delta_t, beta1=self.beta1, beta2=self.beta2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraOptions(BudgetOptions):
  """AdaLoRA's settings; the initial rank is ``MethodSettings.spec.rank``.

  The defaults follow the AdaLoRA authors' GLUE scripts (QingruZhang/AdaLoRA,
  SST-2's): orthogonality weight 0.1 (0.3 on RTE and STS-B), pruning from
  12% of the steps, the rank pattern frozen for the last 44%; beta1 = beta2
  = 0.85. Pruning every 10 steps is this project's, for runs of hundreds of
  steps (theirs: every 100 of tens of thousands). PEFT's ``AdaLoraConfig``
  defaults differ: weight 0.5, ``tinit = tfinal = 0``, ``deltaT = 1``.
  """

  ortho_weight: float = 0.1
  t_init_ratio: float = 0.12
  t_final_ratio: float = 0.44


def budget_method(settings: base.MethodSettings, options: BudgetOptions, *, family: family_lib.Family,
                  initial_rank: int, init_adapters, penalty, pruning, ranks) -> base.Method:
  """A method pruned to a rank budget: ``options.ortho_weight * penalty`` (plain norms,
  averaged, PEFT's form) in the loss; gradients clipped, then ``pruning`` around AdamW, so
  the importance scores see the clipped gradients the optimizer steps with (as PEFT's)."""
  schedule = options.schedule(initial_rank, settings.total_steps)
  return lora.adapter_method(
      settings, family=family, init_adapters=init_adapters,
      penalty=lambda ads: options.ortho_weight * penalty(ads, squared=False, reduction="mean"),
      optimizer=lambda lr: base.settings_optimizer(settings, lr, wrap=lambda inner: pruning(inner, schedule)),
      ranks=ranks, stack_layers=True)


def build(settings: base.MethodSettings) -> base.Method:
  """AdaLoRA: SVD-form adapters, PEFT's penalty (plain norms, averaged), budget pruning."""
  opts = settings.with_options(AdaLoraOptions, method=settings.name)
  return budget_method(settings, opts, family=FAMILY, initial_rank=settings.spec.rank, init_adapters=init_adalora,
                       penalty=adalora_penalty, pruning=adalora_pruning, ranks=adalora_ranks)


FAMILY = family_lib.Family(
    name="adalora", factors=ADALORA_FACTORS, product=lambda ad: (ad["p"] * ad["lam"][..., None, :]) @ ad["q"],
    factored=lambda ad: (ad["p"] * ad["lam"][..., None, :], ad["q"]), counts=family_lib.gated_counts("lam", "q", "p"),
    gate="lam", options=AdaLoraOptions, config_section="adalora", peft_type="ADALORA", methods={"adalora": build},
)

