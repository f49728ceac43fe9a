"""Every adapter family and method, listed explicitly, and the operations over all families.

`FAMILIES` holds the `family.Family` of LoRA, AdaLoRA, SoRA and LoRA²;
`METHODS` maps each method name (``full_ft`` and the families' methods) to
its entry. `merge`, `attach`, `delta_weights`, `delta_factors`,
`adapter_product` and `family_of` take the adapters of any family in
``families`` (default: all of ours), so a user's own family joins by being
passed in, not by registering itself.

Example::

  merged = merge(params, adapters, spec)  # LoRA, AdaLoRA, SoRA or LoRA² adapters
  family_of(next(iter(adapters.values()))).name  # "adalora"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rmlora_jax.adapters import adalora, full, lora, lora2, sora
from rmlora_jax.adapters import family as family_lib
from rmlora_jax.adapters.base import Method, MethodSettings
from rmlora_jax.adapters.family import Family

FAMILIES: tuple[Family, ...] = (lora.FAMILY, adalora.FAMILY, sora.FAMILY, lora2.FAMILY)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodEntry:
  """One method: how it is built, and its family."""

  # ``MethodSettings -> Method``.
  build: Callable[[MethodSettings], Method]
  # Its adapter family; None for full_ft, which trains the weights themselves.
  definition: Family | None = None

  @property
  def family(self) -> str:
    """The family's name ("lora", "adalora", ...; "full" for full_ft)."""
    return "full" if self.definition is None else self.definition.name

  @property
  def options(self) -> type | None:
    """The type of ``MethodSettings.options`` it takes (None: none)."""
    return None if self.definition is None else self.definition.options

  @property
  def adapts(self) -> bool:
    """Whether it adapts (needs ``MethodSettings.spec``)."""
    return self.definition is not None


def _methods() -> dict[str, MethodEntry]:
  out = {"full_ft": MethodEntry(build=full.build)}
  for fam in FAMILIES:
    for name, build in fam.methods.items():
      out[name] = MethodEntry(build=build, definition=fam)
  return out


METHODS: dict[str, MethodEntry] = _methods()


def get(name: str, *, where: str = "method") -> MethodEntry:
  """The entry of method ``name``; unknown names list the choices."""
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


def family_of(adapter: Mapping[str, Any], *, path: str = "<adapter>",
              families: Sequence[Family] = FAMILIES) -> Family:
  """The family whose factors ``adapter`` has; ValueError naming the choices if none."""
  return family_lib.family_of(adapter, families, path=path)


def adapter_product(adapter: Mapping[str, Any], *, path: str = "<adapter>", families: Sequence[Family] = FAMILIES):
  """The unscaled update (d_out, d_in) of one adapter of any family."""
  return family_lib.adapter_product(adapter, families, path=path)


def delta_weights(adapters, spec, *, families: Sequence[Family] = FAMILIES):
  """The updates ``dW = spec.scale * product``, each (d_out, d_in), of adapters of any family."""
  return family_lib.delta_weights(adapters, spec, families)


def delta_factors(adapters, spec, *, families: Sequence[Family] = FAMILIES):
  """Each update as ``(left, right)`` with ``dW = left @ right`` (the scale in ``left``); see `delta_weights`."""
  return family_lib.delta_factors(adapters, spec, families)


def merge(params, adapters, spec, *, families: Sequence[Family] = FAMILIES):
  """``params`` with each adapted kernel replaced by ``W0 + dW.T``, adapters of any family (pure, jittable)."""
  return family_lib.merge(params, adapters, spec, families)


def attach(params, adapters, spec, *, families: Sequence[Family] = FAMILIES):
  """Like `merge`, but each adapted kernel becomes a `rmlora_jax.LowRankKernel` (no dense dW)."""
  return family_lib.attach(params, adapters, spec, families)


def families_of(adapters: Mapping[str, Mapping[str, Any]], *, families: Sequence[Family] = FAMILIES) -> list[Family]:
  """The distinct families of ``adapters``, in the order first met."""
  out: list[Family] = []
  for path, ad in adapters.items():
    fam = family_of(ad, path=path, families=families)
    if fam not in out:
      out.append(fam)
  return out
