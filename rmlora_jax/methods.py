"""Fine-tuning methods as (trainable tree, assembly, penalty, optimizer) bundles.

A method splits a model's parameters into a *trainable* tree (what the
optimizer sees and gradients are taken of) and the *frozen* parameters, and
says how to put them back together for a forward pass:

* ``full_ft``: everything is trainable.
* ``lora``, ``r_lora``, ``gm_lora``, ``rm_lora``: ``{"adapters": ..., "head": ...}``
  is trainable; the base weights are frozen and never differentiated. R adds
  the orthogonality penalty, GM the random direction mask, RM both.
* ``adalora``, ``lora2``: the same split with SVD-form (resp. two-plane)
  adapters, their orthogonality penalties, and importance pruning to a rank
  budget wrapped around the optimizer.
* ``sora``: gated LoRA adapters; the gates take SGD plus a proximal L1 step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmlora_jax.adapters import adalora as adalora_lib
from rmlora_jax import budget as budget_lib
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.adapters import lora2 as lora2_lib
from rmlora_jax import masking
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty as penalty_lib
from rmlora_jax.adapters import sora as sora_lib

METHODS = ("full_ft", "lora", "r_lora", "gm_lora", "rm_lora", "adalora", "sora", "lora2")
MASK_MODES = ("update", "gradient")
ADAPTER_APPLY = ("merge", "low_rank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSettings:
  """What a method needs to know beyond the model; built from the experiment config."""

  # One of METHODS.
  name: str
  # Adapter placement and size (unused by full_ft); a Lora2Spec for lora2.
  spec: lora_lib.LoraSpec | lora2_lib.Lora2Spec | None = None
  # Regexes of parameters trained alongside the adapters (the task head).
  train_patterns: tuple[str, ...] = ()
  # r_hat for gm_lora / rm_lora.
  num_directions: int = 0
  # Weight of the orthogonality penalty for r_lora / rm_lora.
  ortho_weight: float = 0.0
  # Squared Frobenius norm (the paper) or plain (the authors' code).
  ortho_squared: bool = True
  # "sum" (the paper) or "mean" over terms (the authors' code).
  ortho_reduction: str = "sum"
  # "update": mask before and after the optimizer; "gradient": before only.
  mask_mode: str = "update"
  # Steps between fresh direction draws.
  mask_period: int = 1
  # Seed of the direction draws.
  seed: int = 0
  # Optimizer steps of the run; AdaLoRA's and LoRA²'s budget schedules need it.
  total_steps: int = 0
  # How `assemble` hands adapters to the model: "merge" (kernels W0 + dW, any
  # Flax model) or "low_rank" (`lora.attach`: kernels the models of
  # rmlora_jax.models apply as x W0 + (x a^T) b^T s, which skips the (d_in,
  # d_out) weight gradient of every adapted kernel; the same numbers).
  adapter_apply: str = "merge"
  # Family-specific settings by method name: "adalora" (init_rank, target_rank,
  # t_init_ratio, t_final_ratio, delta_t, beta1, beta2, ortho_weight), "sora"
  # (xi, gate_lr), "lora2" (target_rank, ortho_weight, delta_t ...).
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"method {self.name!r} is unknown; choose one of {METHODS}")
    if self.mask_mode not in MASK_MODES:
      raise ValueError(f"rm.mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
    penalty_lib.check_reduction(self.ortho_reduction, where="rm.ortho_reduction")
    if self.adapter_apply not in ADAPTER_APPLY:
      raise ValueError(f"adapter_apply must be one of {ADAPTER_APPLY}, got {self.adapter_apply!r}")
    if self.name != "full_ft" and self.spec is None:
      raise ValueError(f"method {self.name!r} needs a LoraSpec")
    if self.name in ("gm_lora", "rm_lora") and not 1 <= self.num_directions <= self.spec.rank:
      raise ValueError(
          f"rm.num_directions={self.num_directions} must be in 1..lora.rank={self.spec.rank}"
      )
    if self.ortho_weight < 0:
      raise ValueError(f"rm.ortho_weight must be >= 0, got {self.ortho_weight}")

  @property
  def uses_penalty(self) -> bool:
    return self.name in ("r_lora", "rm_lora") and self.ortho_weight > 0

  @property
  def uses_mask(self) -> bool:
    return self.name in ("gm_lora", "rm_lora")


@dataclasses.dataclass(frozen=True)
class Method:
  """A method's pure functions; holds no arrays.

  Attributes:
    settings: what it was built from.
    init: ``(key, params) -> trainable``.
    assemble: ``(trainable, frozen) -> params`` for the model's forward pass.
    penalty: ``trainable -> scalar`` added to the task loss (inside the jitted loss).
    optimizer: ``learning_rate (float or schedule) -> optax.GradientTransformation``.
    frozen: ``params -> frozen`` (what stays fixed; full_ft keeps nothing).
    adapters: ``trainable -> {path: adapter}`` for analysis (empty for full_ft).
  """

  settings: MethodSettings
  init: Callable[[jax.Array, Any], Any]
  assemble: Callable[[Any, Any], Any]
  penalty: Callable[[Any], jax.Array]
  optimizer: Callable[[Any], optax.GradientTransformation]
  frozen: Callable[[Any], Any]
  adapters: Callable[[Any], Mapping[str, Any]]


def _zero(_):
  return jnp.zeros((), jnp.float32)


def base_optimizer(
    learning_rate, *, weight_decay: float, max_grad_norm: float, between=()
) -> optax.GradientTransformation:
  """Gradient clipping (when ``max_grad_norm > 0``), ``between``, then AdamW.

  ``between`` (e.g. a direction mask) sees the clipped full gradient, as in
  the RM-LoRA authors' code, which clips and then masks.
  """
  adamw = optax.adamw(learning_rate, weight_decay=weight_decay)
  clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm and max_grad_norm > 0 else []
  return optax.chain(*clip, *between, adamw)


def head_paths(params: Any, patterns: tuple[str, ...]) -> list[str]:
  """Parameter paths trained alongside adapters; every pattern must match."""
  if not patterns:
    return []
  return paths_lib.match_paths(paths_lib.flatten_with_paths(params), patterns, where="lora.train_patterns")


def with_head(params: Any, head: Mapping[str, jax.Array]) -> Any:
  """``params`` with the leaves named in ``head`` (by "/"-path) replaced."""
  if not head:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda kp, w: head.get(paths_lib.path_str(kp), w), params
  )


def make_method(
    settings: MethodSettings,
    *,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
) -> Method:
  """Builds the method's functions from its settings."""
  s = settings
  opt = lambda lr, between=(): base_optimizer(lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                                             between=between)

  if s.name == "full_ft":
    return Method(
        settings=s,
        init=lambda key, params: {"params": params},
        assemble=lambda trainable, frozen: trainable["params"],
        penalty=_zero,
        optimizer=opt,
        frozen=lambda params: {},
        adapters=lambda trainable: {},
    )

  spec = s.spec
  init_adapters = {"adalora": adalora_lib.init_adalora, "sora": sora_lib.init_sora,
                   "lora2": lora2_lib.init_lora2}.get(s.name, lora_lib.init_lora)

  def init(key, params):
    flat = paths_lib.flatten_with_paths(params)
    head = {p: flat[p] for p in head_paths(params, s.train_patterns)}
    return {"adapters": init_adapters(key, params, spec), "head": head}

  combine = lora_lib.attach if s.adapter_apply == "low_rank" else lora_lib.merge

  def assemble(trainable, frozen):
    return combine(with_head(frozen, trainable["head"]), trainable["adapters"], spec)

  def penalty(trainable):
    ads = trainable["adapters"]
    if s.name == "adalora":
      # PEFT's convention: plain Frobenius norms averaged over matrices.
      return s.extra["adalora"]["ortho_weight"] * adalora_lib.adalora_penalty(ads, squared=False, reduction="mean")
    if s.name == "lora2":
      return s.extra["lora2"]["ortho_weight"] * lora2_lib.lora2_penalty(ads, squared=False, reduction="mean")
    if not s.uses_penalty:
      return _zero(trainable)
    return s.ortho_weight * penalty_lib.ortho_penalty(ads, squared=s.ortho_squared, reduction=s.ortho_reduction)

  def optimizer(lr):
    if s.name in ("adalora", "lora2"):
      return _budget_pruning(s, opt(lr))
    if s.name == "sora":
      return _sora_optimizer(s, opt, lr)
    if not s.uses_mask:
      return opt(lr)
    mask = lambda: masking.random_direction_mask(s.num_directions, seed=s.seed, period=s.mask_period)
    tx = opt(lr, between=(mask(),))  # clip, mask, AdamW
    return optax.chain(tx, mask()) if s.mask_mode == "update" else tx

  return Method(
      settings=s,
      init=init,
      assemble=assemble,
      penalty=penalty,
      optimizer=optimizer,
      frozen=lambda params: params,
      adapters=lambda trainable: trainable["adapters"],
  )


def _budget_pruning(s: MethodSettings, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """AdaLoRA's or LoRA²'s importance pruning to a rank budget around ``inner``."""
  ex = s.extra[s.name]
  initial = s.spec.rank if s.name == "adalora" else s.spec.r
  schedule = budget_lib.BudgetSchedule(
      initial_rank=initial, target_rank=ex["target_rank"], total_steps=s.total_steps,
      t_init=int(round(ex["t_init_ratio"] * s.total_steps)),
      t_final=int(round(ex["t_final_ratio"] * s.total_steps)),
      delta_t=ex["delta_t"], beta1=ex["beta1"], beta2=ex["beta2"])
  prune = adalora_lib.adalora_pruning if s.name == "adalora" else lora2_lib.lora2_pruning
  return prune(inner, schedule)


def _sora_optimizer(s: MethodSettings, opt, lr) -> optax.GradientTransformation:
  """SoRA: plain SGD plus a proximal L1 step on the gates, ``opt`` on the rest.

  The proximal threshold per step is the gate learning rate times the
  sparsity weight lambda (``extra["sora"]["xi"]``), as in proximal gradient.
  """
  ex = s.extra["sora"]
  gate_lr = lr if ex["gate_lr"] <= 0 else ex["gate_lr"]
  lam = ex["xi"]
  xi = (lambda step: lam * gate_lr(step)) if callable(gate_lr) else lam * gate_lr
  labels = lambda tree: jax.tree_util.tree_map_with_path(
      lambda kp, _: "gate" if paths_lib.key_name(kp[-1]) == "g" and paths_lib.key_name(kp[0]) == "adapters" else "rest",
      tree)
  return optax.chain(optax.partition({"gate": optax.sgd(gate_lr), "rest": opt(lr)}, labels),
                     sora_lib.sora_proximal(xi))


def check_available(name: str) -> None:
  """Raises ValueError naming the choices for an unknown method."""
  if name not in METHODS:
    raise ValueError(f"method {name!r} is unknown; choose one of {METHODS}")
