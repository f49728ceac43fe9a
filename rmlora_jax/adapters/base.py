"""What every fine-tuning method is made of: its settings, its functions, its optimizer.

A method splits a model's parameters into a *trainable* tree (what the
optimizer sees and gradients are taken of) and the *frozen* parameters, and
says how to put them back together for a forward pass. Each adapter family
(`rmlora_jax.adapters.lora`, `adalora`, `sora`, `lora2`, `full`) builds its
methods from the pieces here; `rmlora_jax.methods` is the registry that maps a
method's name to its family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmlora_jax import paths as paths_lib

ADAPTER_APPLY = ("merge", "low_rank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSettings:
  """What a method needs to know beyond the model: typed, validated once.

  Example::

    settings = MethodSettings(name="rm_lora", spec=LoraSpec(rank=8, alpha=16.0, targets=(r".*kernel",)),
                              options=RmOptions(num_directions=4, ortho_weight=0.1))
  """

  # A name of `rmlora_jax.methods.METHODS`.
  name: str
  # Adapter placement and size (None for full_ft); a Lora2Spec for lora2.
  spec: Any = None
  # Regexes of parameters trained alongside the adapters (the task head).
  train_patterns: tuple[str, ...] = ()
  # Seed of the method's own randomness (the direction draws).
  seed: int = 0
  # Optimizer steps of the run; budget schedules (AdaLoRA, LoRA²) need it.
  total_steps: int = 0
  # How adapters reach the model: "merge" (kernels W0 + dW, any Flax model)
  # or "low_rank" (`rmlora_jax.attach`: `rmlora_jax.low_rank.LowRankKernel`s, which
  # the models of rmlora_jax.models apply as x W0 + (x a^T) b^T s without a
  # (d_in, d_out) weight gradient; the same numbers).
  adapter_apply: str = "merge"
  # Gradient clipping by global norm before the optimizer; <= 0: none.
  max_grad_norm: float = 1.0
  # AdamW's decoupled weight decay.
  weight_decay: float = 0.01
  # The family's own settings (`lora.RmOptions`, `adalora.AdaLoraOptions`,
  # `sora.SoraOptions`, `lora2.Lora2Options`); None: the family's defaults.
  options: Any = None

  def __post_init__(self):
    if self.adapter_apply not in ADAPTER_APPLY:
      raise ValueError(f"MethodSettings.adapter_apply must be one of {ADAPTER_APPLY}, got {self.adapter_apply!r}")
    if isinstance(self.train_patterns, str):
      raise ValueError(f"MethodSettings.train_patterns must be a tuple of regexes, got the string "
                       f"{self.train_patterns!r}")
    object.__setattr__(self, "train_patterns", tuple(self.train_patterns))
    if not isinstance(self.total_steps, int) or self.total_steps < 0:
      raise ValueError(f"MethodSettings.total_steps must be a non-negative integer, got {self.total_steps!r}")
    if not self.weight_decay >= 0:
      raise ValueError(f"MethodSettings.weight_decay must be >= 0, got {self.weight_decay!r}")

  def with_options(self, expected: type, *, method: str) -> Any:
    """``options``, or ``expected()`` when unset; a wrong type names the method."""
    if self.options is None:
      return expected()
    if not isinstance(self.options, expected):
      raise ValueError(f"method {method!r} takes options of type {expected.__name__}, "
                       f"got {type(self.options).__name__}")
    return self.options


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
    ranks: ``trainable -> {path: rank}``, the rank each adapter has now
      (pruned or gated directions not counted).
  """

  settings: MethodSettings
  init: Callable[[jax.Array, Any], Any]
  assemble: Callable[[Any, Any], Any]
  penalty: Callable[[Any], jax.Array]
  optimizer: Callable[[Any], optax.GradientTransformation]
  frozen: Callable[[Any], Any]
  adapters: Callable[[Any], Mapping[str, Any]]
  ranks: Callable[[Any], Mapping[str, int]] = lambda trainable: {}


def no_penalty(_: Any) -> jax.Array:
  """The zero penalty of methods without a regulariser."""
  return jnp.zeros((), jnp.float32)


def base_optimizer(
    learning_rate, *, weight_decay: float, max_grad_norm: float, between=(), wrap=None
) -> optax.GradientTransformation:
  """Gradient clipping (when ``max_grad_norm > 0``), ``between``, then AdamW (``wrap``-ped).

  ``between`` (e.g. a direction mask) sees the clipped full gradient, as in
  the RM-LoRA authors' code, which clips and then masks. ``wrap`` (e.g.
  AdaLoRA's pruning, ``lambda inner: adalora_pruning(inner, schedule)``)
  wraps AdamW and so also sees the clipped gradient, as PEFT's AdaLoRA
  scores the gradients the optimizer steps with.
  """
  adamw = optax.adamw(learning_rate, weight_decay=weight_decay)
  clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm and max_grad_norm > 0 else []
  return optax.chain(*clip, *between, wrap(adamw) if wrap else adamw)


def settings_optimizer(settings: MethodSettings, learning_rate, between=(), wrap=None) -> optax.GradientTransformation:
  """`base_optimizer` with the clipping and weight decay of ``settings``."""
  return base_optimizer(learning_rate, weight_decay=settings.weight_decay,
                        max_grad_norm=settings.max_grad_norm, between=between, wrap=wrap)


def head_paths(params: Any, patterns: tuple[str, ...]) -> list[str]:
  """Parameter paths trained alongside adapters; every pattern must match."""
  if not patterns:
    return []
  return paths_lib.match_paths(paths_lib.flatten_with_paths(params), patterns, where="MethodSettings.train_patterns")


def with_head(params: Any, head: Mapping[str, jax.Array]) -> Any:
  """``params`` with the leaves named in ``head`` (by "/"-path) replaced."""
  if not head:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda kp, w: head.get(paths_lib.path_str(kp), w), params
  )
