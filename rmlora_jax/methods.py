"""The registry of fine-tuning methods: a name, its adapter family, and how it is built.

The trainer, the benchmark and the configs all read `METHODS`; each family
(`rmlora_jax.adapters.*`) builds its methods from a `MethodSettings`:

* ``full_ft`` (`adapters.full`): everything is trainable.
* ``lora``, ``r_lora``, ``gm_lora``, ``rm_lora`` (`adapters.lora`): adapters
  and head trainable, base weights frozen; R adds the orthogonality penalty,
  GM the random direction mask, RM both (`lora.RmOptions`).
* ``adalora`` (`adapters.adalora`), ``lora2`` (`adapters.lora2`): SVD-form
  (two-plane) adapters, their penalties and importance pruning to a budget.
* ``sora`` (`adapters.sora`): gated adapters, the gates on SGD plus a proximal L1 step.

Example::

  method = make_method(MethodSettings(name="rm_lora", spec=spec, options=RmOptions(num_directions=4)))
  trainable = method.init(key, params)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from rmlora_jax.adapters import adalora, full, lora, lora2, sora
from rmlora_jax.adapters.base import (ADAPTER_APPLY, Method, MethodSettings, base_optimizer, head_paths,
                                      no_penalty, with_head)
from rmlora_jax.adapters.lora import MASK_MODES, RmOptions
from rmlora_jax.adapters.adalora import AdaLoraOptions
from rmlora_jax.adapters.lora2 import Lora2Options
from rmlora_jax.adapters.sora import SoraOptions


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodEntry:
  """One registered method."""

  # The adapter family's module name ("lora", "adalora", ...; "full" for full_ft).
  family: str
  # ``MethodSettings -> Method``.
  build: Callable[[MethodSettings], Method]
  # The type of ``MethodSettings.options`` it takes (None: none).
  options: type | None
  # Whether it adapts (needs ``MethodSettings.spec``) or trains the weights themselves.
  adapts: bool = True
  # Whether its spec is a `lora2.Lora2Spec` rather than a `lora.LoraSpec`.
  two_plane: bool = False


METHODS: dict[str, MethodEntry] = {
    "full_ft": MethodEntry(family="full", build=full.build, options=None, adapts=False),
    "lora": MethodEntry(family="lora", build=functools.partial(lora.build, ortho=False, mask=False),
                        options=RmOptions),
    "r_lora": MethodEntry(family="lora", build=functools.partial(lora.build, ortho=True, mask=False),
                          options=RmOptions),
    "gm_lora": MethodEntry(family="lora", build=functools.partial(lora.build, ortho=False, mask=True),
                           options=RmOptions),
    "rm_lora": MethodEntry(family="lora", build=functools.partial(lora.build, ortho=True, mask=True),
                           options=RmOptions),
    "adalora": MethodEntry(family="adalora", build=adalora.build, options=AdaLoraOptions),
    "sora": MethodEntry(family="sora", build=sora.build, options=SoraOptions),
    "lora2": MethodEntry(family="lora2", build=lora2.build, options=Lora2Options, two_plane=True),
}


def get(name: str, *, where: str = "method") -> MethodEntry:
  """The registry entry of ``name``; unknown names list the choices."""
  if name not in METHODS:
    raise ValueError(f"{where}={name!r} is unknown; choose one of {tuple(METHODS)}")
  return METHODS[name]


def check_available(name: str, *, where: str = "method") -> None:
  """Raises ValueError naming the choices for an unknown method."""
  get(name, where=where)


def make_method(settings: MethodSettings) -> Method:
  """Builds the method ``settings.name`` from its settings.

  Raises:
    ValueError: an unknown method, a missing spec, or options of another family.
  """
  entry = get(settings.name, where="MethodSettings.name")
  if entry.adapts and settings.spec is None:
    raise ValueError(f"method {settings.name!r} needs an adapter spec (MethodSettings.spec)")
  return entry.build(settings)


__all__ = [
    "ADAPTER_APPLY", "MASK_MODES", "METHODS", "AdaLoraOptions", "Lora2Options", "Method", "MethodEntry",
    "MethodSettings", "RmOptions", "SoraOptions", "base_optimizer", "check_available", "get", "head_paths",
    "make_method", "no_penalty", "with_head",
]
