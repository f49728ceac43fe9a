"""AdaLoRA's rank budget: the cubic schedule, importance scores, global pruning.

Shared by AdaLoRA and LoRA². Both adapters hold a vector ``lam`` of r
"singular values" whose i-th entry, together with a slice of each neighbouring
factor, forms triplet i. Training runs in three phases over steps
``t = 1, ..., T`` (``t`` is the 1-based index of the optimizer step being
taken, so the first update is step 1 and the last is step T):

* ``t <= t_init``: warm-up with the whole initial budget; nothing is pruned.
* ``t_init < t <= T - t_final``: the total budget decays cubically; every
  ``delta_t`` steps (and at ``t = T - t_final``, where it reaches the target)
  the triplets with the lowest importance scores get ``lam_i = 0``. Pruned
  triplets stay trainable and may regrow before the next pruning step.
* ``t > T - t_final``: the keep-pattern chosen at ``T - t_final`` is frozen
  and enforced after every step; scores are no longer updated.

Importance of one element theta (Zhang et al. 2023, Section 3.3): sensitivity
``s = |theta * dL/dtheta|`` on the raw gradient, smoothed
``I <- beta1 I + (1 - beta1) s``, uncertainty
``U <- beta2 U + (1 - beta2) |s - I|`` (with the new I, as PEFT), score
``I * U``. A triplet's score is its ``lam_i``'s score plus the mean score of
each scored factor's i-th slice along the rank axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import paths as paths_lib
from rmlora_jax import stacking

Array = jax.Array


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetSchedule:
  """AdaLoRA's rank budget over training (PEFT's ``AdaLoraConfig`` fields).

  The total budget counts triplets over all adapters: it starts at
  ``initial_rank * num_adapters`` and ends at ``target_rank * num_adapters``
  (PEFT's convention), so ``target_rank`` is the *average* final rank and
  single adapters may end above or below it.

  Example::

    schedule = BudgetSchedule(initial_rank=12, target_rank=8, total_steps=1000,
                              t_init=100, t_final=200, delta_t=10)
  """

  # r at init: the length of every adapter's lam (PEFT's init_r).
  initial_rank: int
  # Average rank per adapter kept at the end, 1..initial_rank (PEFT's target_r).
  target_rank: int
  # T, the number of optimizer steps the schedule spans (PEFT's total_step).
  total_steps: int
  # Warm-up steps with the full budget and no pruning (PEFT's tinit).
  t_init: int
  # Final steps with the rank pattern frozen (PEFT's tfinal).
  t_final: int
  # Prune every delta_t steps while the budget decays (PEFT's deltaT).
  delta_t: int = 1
  # EMA coefficient of the smoothed sensitivity I.
  beta1: float = 0.85
  # EMA coefficient of the uncertainty U.
  beta2: float = 0.85

  def __post_init__(self):
    for name in ("initial_rank", "target_rank", "total_steps", "delta_t"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        raise ValueError(f"BudgetSchedule.{name} must be a positive integer, got {v!r}")
    for name in ("t_init", "t_final"):
      v = getattr(self, name)
      if not _is_int(v) or v < 0:
        raise ValueError(f"BudgetSchedule.{name} must be an integer >= 0, got {v!r}")
    if self.target_rank > self.initial_rank:
      raise ValueError(
          f"BudgetSchedule.target_rank={self.target_rank} exceeds "
          f"initial_rank={self.initial_rank}; pruning can only lower the rank"
      )
    if self.t_init + self.t_final >= self.total_steps:
      raise ValueError(
          f"BudgetSchedule: t_init + t_final = {self.t_init} + {self.t_final} must be "
          f"below total_steps={self.total_steps}, leaving steps for the budget to decay"
      )
    for name in ("beta1", "beta2"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ValueError(f"BudgetSchedule.{name} must be in (0, 1), got {v!r}")

  @property
  def decay_steps(self) -> int:
    """``T - t_final - t_init``, the length of the cubic decay."""
    return self.total_steps - self.t_final - self.t_init


def _budget_table(schedule: BudgetSchedule, num_adapters: int) -> np.ndarray:
  """Budgets at ``t = t_init + s`` for ``s = 0..decay_steps``, in exact integers.

  ``floor(target + (initial - target) (1 - s / D)^3)`` computed with Python
  integers, so it is exact where PEFT's float64 ``int(...)`` may round an
  integer value down by one.
  """
  d = schedule.decay_steps
  initial = schedule.initial_rank * num_adapters
  target = schedule.target_rank * num_adapters
  return np.array(
      [target + (initial - target) * (d - s) ** 3 // d**3 for s in range(d + 1)], np.int32
  )


def budget_schedule(schedule: BudgetSchedule, step: Any, num_adapters: int = 1) -> Any:
  """The total rank budget b(t) at ``step`` (1-based), over ``num_adapters`` adapters.

  ``initial`` for ``t <= t_init``; ``target`` for ``t >= T - t_final``; in
  between ``floor(target + (initial - target) (1 - (t - t_init) / (T - t_final - t_init))^3)``,
  with ``initial = initial_rank * num_adapters`` and ``target = target_rank * num_adapters``.

  Args:
    schedule: the budget settings.
    step: an int, a NumPy array of steps (for plotting) or a traced JAX integer.
    num_adapters: how many adapters share the budget.

  Returns:
    int32 budgets shaped like ``step`` (a JAX array when ``step`` is one).

  Example::

    plt.plot(budget_schedule(schedule, np.arange(1, schedule.total_steps + 1)))
  """
  if not _is_int(num_adapters) or num_adapters < 1:
    raise ValueError(f"budget_schedule: num_adapters must be a positive integer, got {num_adapters!r}")
  table = _budget_table(schedule, num_adapters)
  if isinstance(step, jax.Array):
    idx = jnp.clip(step.astype(jnp.int32) - schedule.t_init, 0, schedule.decay_steps)
    return jnp.asarray(table)[idx]
  idx = np.clip(np.asarray(step, np.int64) - schedule.t_init, 0, schedule.decay_steps)
  return table[idx]


def is_pruning_step(schedule: BudgetSchedule, step: Any) -> Any:
  """Whether the keep-pattern is recomputed at ``step`` (1-based).

  True for ``t_init < t <= T - t_final`` when ``t % delta_t == 0``, and at
  ``t = T - t_final``, where the final pattern is chosen. Works on ints,
  NumPy arrays and traced JAX integers.
  """
  xp = jnp if isinstance(step, jax.Array) else np
  step = xp.asarray(step)
  last = schedule.total_steps - schedule.t_final
  in_decay = (step > schedule.t_init) & (step <= last)
  return in_decay & ((step % schedule.delta_t == 0) | (step == last))


# ---------------------------------------------------------------------------
# Importance scores.


def update_importance(
    ipt: Any, unc: Any, params: Any, grads: Any, *, beta1: float, beta2: float
) -> tuple[Any, Any]:
  """One step of AdaLoRA's smoothed sensitivity and uncertainty, elementwise.

  ``s = |theta * g|``, ``I' = beta1 I + (1 - beta1) s``,
  ``U' = beta2 U + (1 - beta2) |s - I'|``. All four trees share a structure.

  Returns:
    ``(I', U')``, in float32 (or wider).
  """

  def sensitivity(p, g):
    dtype = jnp.promote_types(p.dtype, jnp.float32)
    return jnp.abs(p.astype(dtype) * g.astype(dtype))

  s = jax.tree.map(sensitivity, params, grads)
  new_ipt = jax.tree.map(lambda i, s_: beta1 * i + (1 - beta1) * s_, ipt, s)
  new_unc = jax.tree.map(lambda u, s_, i: beta2 * u + (1 - beta2) * jnp.abs(s_ - i), unc, s, new_ipt)
  return new_ipt, new_unc


def triplet_scores(ipt: Mapping[str, Array], unc: Mapping[str, Array], rank_axes: Mapping[str, int]) -> Array:
  """The (r,) importance of one adapter's triplets from its element statistics.

  Args:
    ipt, unc: ``{factor name: I}`` and ``{factor name: U}`` for ``lam`` and the
      factors named in ``rank_axes``; an adapter stacked over a scanned
      model's layers has a leading layer axis on each.
    rank_axes: ``{factor name: axis of the rank index}`` for each 2-D factor
      that contributes the mean score of its i-th slice (AdaLoRA: ``p`` 1,
      ``q`` 0; LoRA²: ``u`` 1, ``v`` 0), counted in the factor's last two axes.

  Returns:
    ``score(lam_i) + sum_f mean_j score(f)[slice i]``: (r,), or (layers, r)
    for a stacked adapter.
  """
  total = ipt["lam"] * unc["lam"]
  for name, axis in rank_axes.items():
    total = total + jnp.mean(ipt[name] * unc[name], axis=-1 - axis)  # over the other of the last two axes
  return total


def _layer_rows(path: str, scores: Array) -> list[tuple[str, Array]]:
  """``[(adapter path, (r,) scores)]``: one row, or a stacked adapter's rows at its layers' unrolled paths."""
  if jnp.ndim(scores) == 1:
    return [(path, scores)]
  if jnp.ndim(scores) != 2 or not stacking.is_stacked_path(path):
    raise ValueError(f"global_keep_mask: scores at {path!r} have shape {jnp.shape(scores)}; expected (r,), "
                     f"or (layers, r) for an adapter stacked over a scanned model's layers")
  return [(stacking.layer_path(path, i), scores[i]) for i in range(jnp.shape(scores)[0])]


def _num_adapters(scores: Mapping[str, Any]) -> int:
  """How many adapters share the budget: one per entry, or one per layer of a stacked entry."""
  return sum(int(np.prod(np.shape(x)[:-1], dtype=np.int64)) for x in scores.values())


def global_keep_mask(scores: Mapping[str, Array], budget: Array | int) -> dict[str, Array]:
  """Keeps the ``budget`` highest-scoring triplets over all adapters.

  Ties go to the earlier triplet in sorted-path, then index, order, so exactly
  ``min(budget, total)`` triplets are kept (PEFT's threshold ``<= kth value``
  may keep fewer on ties). Jittable with a traced ``budget``. An adapter
  stacked over a scanned model's layers (scores (layers, r) at a stacked path,
  `rmlora_jax.stacking`) counts as its layers' adapters at their unrolled
  paths (``model/layers_3/...``), so the kept set is the unrolled model's.

  Returns:
    ``{path: bool (r,)}`` (or (layers, r)), True for the triplets kept.
  """
  rows_of = {path: _layer_rows(path, value) for path, value in scores.items()}
  rows = sorted((row for own in rows_of.values() for row in own), key=lambda row: row[0])
  flat = jnp.concatenate([row for _, row in rows])
  # -s + 0.0 turns -0.0 into +0.0, so zero scores tie and keep index order.
  order = jnp.argsort(-flat + 0.0, stable=True)
  position = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.shape[0], dtype=jnp.int32))
  keep = position < budget
  by_row, start = {}, 0
  for name, row in rows:
    by_row[name] = keep[start : start + row.shape[0]]
    start += row.shape[0]
  return {path: by_row[path] if jnp.ndim(scores[path]) == 1 else jnp.stack([by_row[n] for n, _ in own])
          for path, own in rows_of.items()}


# ---------------------------------------------------------------------------
# Finding adapters in a tree and the pruning transform.


@dataclasses.dataclass(frozen=True, kw_only=True)
class TripletFamily:
  """Which adapters a pruning transform acts on and how it scores them."""

  # The family's name, for messages ("AdaLoRA", "LoRA²").
  name: str
  # The exact factor names of one adapter dict; one of them is "lam".
  factors: frozenset[str]
  # {2-D factor: axis of its rank index} for the factors that enter the score.
  rank_axes: Mapping[str, int]


def _by_adapter(tree: Any) -> dict[str, dict[str, Any]]:
  """``{adapter path: {factor name: leaf}}`` from a tree's leaves (masked nodes hold none)."""
  out: dict[str, dict[str, Any]] = {}
  for path, leaf in paths_lib.flatten_with_paths(tree).items():
    parent, _, name = path.rpartition("/")
    out.setdefault(parent, {})[name] = leaf
  return out


def _at_paths(tree: Any, fill: Mapping[str, Any]) -> Any:
  """``tree``'s structure with ``fill[path]`` at the listed leaf paths and `optax.MaskedNode` elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: fill.get(paths_lib.path_str(kp), optax.MaskedNode()), tree)


class BudgetPruningState(NamedTuple):
  """State of `budget_pruning` (and so of `adalora_pruning` and `lora2_pruning`).

  The statistics and the keep-pattern are trees of the parameters' structure
  (`optax.MaskedNode` at the leaves they do not cover), so that
  `optax.tree_map_params` finds them and each takes the sharding of the
  factor it belongs to (`rmlora_jax.partitioning.optimizer_shardings`).
  ``ipt``, ``unc`` and ``keep`` give them by adapter.
  """

  count: Array  # int32 scalar, the number of updates taken
  ipt_by_param: Any  # smoothed sensitivity I at each scored factor
  unc_by_param: Any  # uncertainty U at each scored factor
  keep_by_param: Any  # bool (r,) at each lam: the current keep-pattern
  inner_state: Any  # the wrapped optimizer's state

  @property
  def ipt(self) -> dict[str, dict[str, Array]]:
    """``{adapter path: {factor: I}}``."""
    return _by_adapter(self.ipt_by_param)

  @property
  def unc(self) -> dict[str, dict[str, Array]]:
    """``{adapter path: {factor: U}}``."""
    return _by_adapter(self.unc_by_param)

  @property
  def keep(self) -> dict[str, Array]:
    """``{adapter path: bool (r,)}``, True for the triplets kept."""
    return {p: factors["lam"] for p, factors in _by_adapter(self.keep_by_param).items()}


def budget_pruning(
    inner: optax.GradientTransformation, schedule: BudgetSchedule, family: TripletFamily
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` with AdaLoRA-style importance scoring and global pruning.

  It needs the raw gradient (for the sensitivities) and the final update (to
  zero pruned ``lam`` entries after the step), so it wraps the optimizer as
  `optax.MultiSteps` does. Each call: update the scores from ``params`` and
  the raw gradient (while ``t <= T - t_final``); run ``inner``; at pruning
  steps keep the b(t) best triplets over all adapters; at pruning steps and
  throughout the final phase, replace the ``lam`` update of dropped triplets
  by ``-lam`` so that `optax.apply_updates` leaves them exactly 0. Leaves
  that are not adapters of ``family`` (a classifier head) get ``inner``'s
  update unchanged. Extra keyword arguments of ``update`` (``value=`` for
  `optax.contrib.reduce_on_plateau`, say) are passed on to ``inner``.

  Args:
    inner: the optimizer, e.g. ``optax.adamw(1e-3)``.
    schedule: the budget settings; every adapter's ``lam`` must have
      ``schedule.initial_rank`` entries ((layers, r) for an adapter stacked
      over a scanned model's layers, which counts as one adapter per layer).
    family: the adapter family and its score.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose ``update`` requires ``params``.
  """
  inner = optax.with_extra_args_support(inner)

  def locate(tree):
    found = paths_lib.find_adapters(tree, family.factors)
    if not found:
      raise ValueError(
          f"{family.name} pruning found no adapters with factors {sorted(family.factors)} "
          f"in the tree it was given; pass the adapters (and any head) it should train"
      )
    flat = paths_lib.flatten_with_paths(tree)
    for path, names in found.items():
      shape = tuple(flat[names["lam"]].shape)
      stacked = len(shape) == 2 and stacking.is_stacked_path(path)  # (layers, r) on a scanned model
      if shape[-1:] != (schedule.initial_rank,) or not (len(shape) == 1 or stacked):
        raise ValueError(
            f"{family.name} pruning: adapter {path!r} has lam of shape {shape}, but "
            f"BudgetSchedule.initial_rank={schedule.initial_rank} (lam must be (r,), or (layers, r) when "
            f"stacked over a scanned model's layers)"
        )
    return found

  scored = ("lam", *family.rank_axes)

  def scored_only(tree, found):
    flat = paths_lib.flatten_with_paths(tree)
    return _at_paths(tree, {names[n]: flat[names[n]] for names in found.values() for n in scored})

  def init_fn(params):
    # `optax.tree_map_params` calls init on a placeholder without leaves to
    # find the parameter-shaped parts of the state: nothing to check then,
    # and update_fn checks the real tree.
    found = locate(params) if jax.tree.leaves(params) else {}
    stats = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                         scored_only(params, found))
    flat = paths_lib.flatten_with_paths(params)
    return BudgetPruningState(
        count=jnp.zeros((), jnp.int32),
        ipt_by_param=stats,
        unc_by_param=stats,
        keep_by_param=_at_paths(params, {names["lam"]: jnp.ones(flat[names["lam"]].shape, bool)
                                         for names in found.values()}),
        inner_state=inner.init(params),
    )

  last_scored = schedule.total_steps - schedule.t_final

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{family.name} pruning needs params: call tx.update(grads, state, params)")
    found = locate(params)
    step = state.count + 1
    ipt, unc = update_importance(
        state.ipt_by_param, state.unc_by_param, scored_only(params, found), scored_only(updates, found),
        beta1=schedule.beta1, beta2=schedule.beta2,
    )
    scoring = step <= last_scored
    ipt = jax.tree.map(lambda new, old: jnp.where(scoring, new, old), ipt, state.ipt_by_param)
    unc = jax.tree.map(lambda new, old: jnp.where(scoring, new, old), unc, state.unc_by_param)

    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)

    prune_now = is_pruning_step(schedule, step)

    def new_keep():
      ipt_of, unc_of = _by_adapter(ipt), _by_adapter(unc)
      scores = {p: triplet_scores(ipt_of[p], unc_of[p], family.rank_axes) for p in found}
      keep = global_keep_mask(scores, budget_schedule(schedule, step, _num_adapters(scores)))
      return _at_paths(params, {names["lam"]: keep[p] for p, names in found.items()})

    keep_by_param = jax.lax.cond(prune_now, new_keep, lambda: state.keep_by_param)
    keep = paths_lib.flatten_with_paths(keep_by_param)  # {lam path: bool (r,)}
    enforce = prune_now | (step > last_scored)

    def final_update(key_path, u, theta):
      path = paths_lib.path_str(key_path)
      if path not in keep:
        return u
      drop = enforce & ~keep[path]
      return jnp.where(drop, -theta, u).astype(u.dtype)

    final = jax.tree_util.tree_map_with_path(final_update, inner_updates, params)
    new_state = BudgetPruningState(
        count=optax.safe_increment(state.count), ipt_by_param=ipt, unc_by_param=unc,
        keep_by_param=keep_by_param, inner_state=inner_state,
    )
    return final, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nonzero_ranks(adapters: Any, factors: frozenset[str], gate: str) -> dict[str, int]:
  """``{adapter path: number of nonzero entries of its gate vector}`` (host-side).

  An adapter stacked over a scanned model's layers gives one entry per layer,
  at the layer's unrolled path.
  """
  flat = paths_lib.flatten_with_paths(adapters)
  out = {}
  for p, names in paths_lib.find_adapters(adapters, factors).items():
    gates = np.asarray(flat[names[gate]])
    for name, row in _layer_rows(p, gates):
      out[name] = int(np.count_nonzero(row))
  return out
