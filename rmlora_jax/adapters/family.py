"""What an adapter family is, and the operations every family shares.

A family (LoRA, AdaLoRA, SoRA, LoRA², or one of a user's own) is one
`Family` value: the exact factor names of its adapter dicts, how they
multiply into an update, how its parameters are counted, and the methods
built on it. Each family module (`rmlora_jax.adapters.lora`, ...) defines its
``FAMILY``; `rmlora_jax.adapters.registry` lists them. Nothing registers
itself on import: the functions here take the families to choose from, and
the registry's versions of them default to all of ours.

Example, a family of one's own beside ours::

  mine = Family(name="scaled", factors=frozenset({"a", "b", "s"}),
                product=lambda ad: ad["s"] * (ad["b"] @ ad["a"]),
                counts=lambda ad: (ad["a"].size + ad["b"].size + 1,) * 2)
  merged = registry.merge(params, adapters, spec, families=(*registry.FAMILIES, mine))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax import low_rank
from rmlora_jax import quantize
from rmlora_jax import stacking
from rmlora_jax.low_rank import LowRankKernel

Array = jax.Array
Adapter = Mapping[str, Array]
Adapters = Mapping[str, Adapter]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
  """One adapter family; holds functions and names, no arrays."""

  # Short name ("lora", "adalora", "sora", "lora2"), as in results and errors.
  name: str
  # The exact keys of its adapter dicts, e.g. {"a", "b"}.
  factors: frozenset[str]
  # One adapter -> its unscaled update, shape (d_out, d_in).
  product: Callable[[Adapter], Array]
  # One adapter -> (left (d_out, r'), right (r', d_in)) with left @ right ==
  # product; None: the update is formed densely (`attach` then merges it).
  factored: Callable[[Adapter], tuple[Array, Array]] | None = None
  # Whether ``factored`` multiplies factors (LoRA²'s ``U (u lam)``, ``v V``):
  # `attach` then forms it once for each stack of same-shaped adapters, a few
  # batched products instead of two per adapter (less to compile). False for
  # a ``factored`` that only picks or scales factors, where stacking would
  # add work.
  batch_factored: bool = False
  # One adapter -> (trainable, needed at inference) parameter counts.
  counts: Callable[[Adapter], tuple[int, int]]
  # The factor whose nonzero entries are the adapter's rank now (AdaLoRA's
  # and LoRA²'s "lam", SoRA's "g"); None: always the spec's rank.
  gate: str | None = None
  # The type of `MethodSettings.options` its methods take.
  options: type | None = None
  # The config section of those options ("rm", "adalora", ...).
  config_section: str | None = None
  # PEFT's ``peft_type`` its adapters are saved as without folding; None:
  # saved as plain LoRA factors of their active rank.
  peft_type: str | None = None
  # Its methods: {name: MethodSettings -> Method}.
  methods: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "factors", frozenset(self.factors))

  def holds(self, adapter: Adapter) -> bool:
    """Whether ``adapter`` has exactly this family's factors."""
    return frozenset(adapter) == self.factors


def nonzero(x: Any) -> int:
  """Number of nonzero entries (host-side: read the values after training)."""
  return int(np.count_nonzero(np.asarray(x)))


def gated_counts(gate: str, row: str, col: str) -> Callable[[Adapter], tuple[int, int]]:
  """Counts of a family with one gate per rank: ``r (d + 1)`` trained, ``kept (d + 1)`` at inference.

  ``row`` is the (r, d_in) factor, ``col`` the (d_out, r) one, ``gate`` the
  (r,) diagonal whose nonzero entries are the kept ranks (each with a
  leading layer axis when stacked over a scanned model's layers).
  """

  def counts(ad: Adapter) -> tuple[int, int]:
    *layers, r, d_in = ad[row].shape
    per_rank = d_in + ad[col].shape[-2] + 1
    return int(np.prod(layers, dtype=np.int64)) * r * per_rank, nonzero(ad[gate]) * per_rank

  return counts


def family_of(adapter: Adapter, families: Sequence[Family], *, path: str = "<adapter>") -> Family:
  """The family in ``families`` whose factors ``adapter`` has exactly.

  Raises:
    ValueError: no family matches; the message names the factors and the choices.
  """
  for family in families:
    if family.holds(adapter):
      return family
  known = ", ".join(f"{f.name} {{{', '.join(sorted(f.factors))}}}" for f in families)
  raise ValueError(f"adapter at {path!r} has factors {sorted(adapter)}, which match no known "
                   f"adapter family ({known})")


def adapter_product(adapter: Adapter, families: Sequence[Family], *, path: str = "<adapter>") -> Array:
  """The unscaled update (d_out, d_in) of one adapter of any of ``families``."""
  return family_of(adapter, families, path=path).product(adapter)


def delta_weights(adapters: Adapters, spec: Any, families: Sequence[Family]) -> dict[str, Array]:
  """The weight updates ``dW = spec.scale * product``, each (d_out, d_in)."""
  return {path: spec.scale * adapter_product(ad, families, path=path) for path, ad in adapters.items()}


def delta_factors(adapters: Adapters, spec: Any,
                  families: Sequence[Family]) -> dict[str, Array | tuple[Array, Array]]:
  """Each update as ``(left, right)`` with ``dW = left @ right`` (the scale in ``left``).

  The same updates as `delta_weights`; a family without ``factored`` gives
  its dense dW instead.
  """
  out = {}
  for path, ad in adapters.items():
    family = family_of(ad, families, path=path)
    if family.factored is None:
      out[path] = spec.scale * family.product(ad)
    else:
      left, right = family.factored(ad)
      out[path] = (spec.scale * left, right)
  return out


def _factored(adapters: Adapters, families: Sequence[Family]) -> dict[str, tuple[Array, Array]]:
  """``{path: family.factored(adapter)}`` for the adapters whose family has a factored form.

  A family with ``batch_factored`` has its adapters of equal factor shapes
  and dtypes stacked and their factored forms computed by one vmapped call;
  the values are those of one call per adapter.
  """
  out, groups = {}, {}
  for path, ad in adapters.items():
    family = family_of(ad, families, path=path)
    if family.factored is None:
      continue
    if family.batch_factored:
      key = (id(family), tuple((n, jnp.shape(x), jnp.result_type(x)) for n, x in sorted(ad.items())))
      groups.setdefault(key, (family, []))[1].append(path)
    else:
      out[path] = family.factored(ad)
  for family, paths in groups.values():
    if len(paths) == 1:
      out[paths[0]] = family.factored(adapters[paths[0]])
      continue
    stacked = {n: jnp.stack([adapters[p][n] for p in paths]) for n in adapters[paths[0]]}
    lefts, rights = jax.vmap(family.factored)(stacked)
    out.update({p: (lefts[i], rights[i]) for i, p in enumerate(paths)})
  return {p: out[p] for p in adapters if p in out}  # the adapters' own order


def _check_fits(flat: Mapping[str, Any], path: str, update_shape: tuple[int, ...], *, where: str) -> None:
  """Raises ValueError unless an update (d_out, d_in), or (layers, d_out, d_in), fits the kernel at ``path``."""
  if path not in flat:
    raise ValueError(
        f"{where}: adapter path {path!r} is not a parameter path; adapters must "
        f"come from init_* on the same parameter tree"
    )
  w_shape = tuple(flat[path].shape)
  if w_shape != (*update_shape[:-2], update_shape[-1], update_shape[-2]):
    raise ValueError(
        f"{where}: adapter at {path!r} gives an update of shape (d_out, d_in)="
        f"{update_shape}, which does not fit the kernel of shape {w_shape}"
    )


def _stacked(paths: Sequence[str], flat: Mapping[str, Any]) -> dict[str, dict[int, str]]:
  """``{stacked kernel path: {layer: adapter path}}`` for adapters on layers of a scanned model's stacks."""
  out: dict[str, dict[int, str]] = {}
  for path in paths:
    split = None if path in flat else stacking.split_path(path)
    if split is not None and split[0] in flat:
      out.setdefault(split[0], {})[split[1]] = path
  return out


def merge(params: Any, adapters: Adapters, spec: Any, families: Sequence[Family]) -> Any:
  """Returns ``params`` with each adapted kernel replaced by ``W0 + dW.T``.

  Pure, jittable and differentiable with respect to ``adapters``; leaves
  without an adapter are returned as they are (same objects). A quantised
  ``W0`` (a `qwix.QArray`, `rmlora_jax.quantize`) is dequantised and the
  update merged into it: the merged kernel is float, in the scale's dtype.
  Adapters at a layer's path (``model/layers_3/...``) of a scanned model's
  stacked kernel (``model/layers/...``, `rmlora_jax.stacking`) are merged
  into that layer of it; an adapter at the stacked path itself, its factors
  stacked over the layers (`stacking.stack_adapters`), into every layer.

  Raises:
    ValueError: an adapter of no family in ``families``, a path that is not
      in ``params``, or an update whose shape does not fit the kernel there.
  """
  deltas = delta_weights(adapters, spec, families)
  flat = quantize.flatten_kernels(params)
  view = stacking.layer_view(flat)
  for path, d in deltas.items():
    _check_fits(flat if path in flat else view, path, tuple(d.shape), where="merge")
  stacks = {}
  for stacked, layers in _stacked(list(deltas), flat).items():
    shape = tuple(np.shape(flat[stacked]))
    zero = jnp.zeros((shape[2], shape[1]), next(iter(deltas[p] for p in layers.values())).dtype)
    stacks[stacked] = jnp.stack([deltas[layers[i]] if i in layers else zero for i in range(shape[0])])

  def merge_leaf(path, w):
    if path in stacks:
      return (low_rank.frozen_kernel(w) + jnp.swapaxes(stacks[path], 1, 2)).astype(w.dtype)
    if path not in deltas:
      return w
    return (low_rank.frozen_kernel(w) + jnp.swapaxes(deltas[path], -1, -2)).astype(w.dtype)

  return quantize.map_kernels(merge_leaf, params)


def _stacked_factors(layers: Mapping[int, tuple[Array, Array]], num: int) -> tuple[Array, Array]:
  """The layers' ``(left, right)`` stacked, zeros for layers without, padded to the largest rank."""
  some_left, some_right = next(iter(layers.values()))
  rank = max(left.shape[1] for left, _ in layers.values())

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, widths)

  zero = (jnp.zeros((some_left.shape[0], rank), some_left.dtype), jnp.zeros((rank, some_right.shape[1]), some_right.dtype))
  pairs = [(pad(layers[i][0], 1), pad(layers[i][1], 0)) if i in layers else zero for i in range(num)]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def attach(params: Any, adapters: Adapters, spec: Any, families: Sequence[Family]) -> Any:
  """Like `merge`, but leaves each adapted kernel as a `LowRankKernel`.

  The forward pass of a model whose Dense layers use `dense_apply` is then
  numerically equal to its forward on the merged params (up to float
  rounding) and cheaper to differentiate. Adapters of a family without
  ``factored`` are merged into a plain kernel here.

  A quantised ``W0`` (a `qwix.QArray`) stays quantised inside the
  `LowRankKernel`; the low-rank factors are float. A scanned model's stacked
  kernel gets one `LowRankKernel` holding its layers' factors stacked (zeros
  for a layer without an adapter; as they are when stored stacked), which
  the scan hands to each layer.

  Raises:
    ValueError: as `merge`.
  """
  flat = quantize.flatten_kernels(params)
  view = stacking.layer_view(flat)
  kernels, factors = {}, {}
  for path, (left, right) in _factored(adapters, families).items():
    _check_fits(flat if path in flat else view, path, (*left.shape[:-1], right.shape[-1]), where="attach")
    factors[path] = (spec.scale * left, right)
  for path, pair in factors.items():
    if path in flat:
      kernels[path] = LowRankKernel(flat[path], *pair)
  for stacked, layers in _stacked(list(factors), flat).items():
    left, right = _stacked_factors({i: factors[p] for i, p in layers.items()}, np.shape(flat[stacked])[0])
    kernels[stacked] = LowRankKernel(flat[stacked], left, right)
  merged = merge(params, {p: ad for p, ad in adapters.items() if p not in factors}, spec, families)

  return quantize.map_kernels(lambda path, w: kernels.get(path, w), merged)
