"""qwix LoRA parameters viewed as this library's adapters, so its transforms work on qwix models.

qwix (`qwix.LoraProvider`, `qwix.apply_lora_to_model`; Flax NNX or linen)
gives each adapted weight ``w`` two parameters beside it, ``w_lora_a`` of
shape (..., d_in, rank) and ``w_lora_b`` of shape (..., rank, d_out), and
computes ``x @ w + (alpha / rank) x @ lora_a @ lora_b``; an einsum layer's
factors are (*contracted, rank) and (rank, *remaining), read here with
those axes flattened into d_in and d_out. This
library's adapter is ``{"a": (rank, d_in), "b": (d_out, rank)}`` with
``dW = (alpha / rank) b @ a``, so ``a = lora_a.T`` and ``b = lora_b.T``.
Leading batch axes (one adapter per expert, say) become one adapter each,
``<path>/<i>``.

* `as_adapters(tree)`: the view, ``{"<module path>/<weight>": {"a", "b"}}``,
  for `ortho_penalty`, `delta_weights`, `delta_report`, `effective_rank`.
* `in_adapter_layout(tx)`: runs an optax transform (RM-LoRA's masks around
  AdamW, `adalora_pruning`...) on that view of the tree it is given and
  returns its updates in qwix's layout: it drops into ``nnx.Optimizer``.
* `from_adapters(adapters, like)`: writes a view back in qwix's layout.

Example (RM-LoRA on a qwix-LoRA NNX model; README has the whole loop)::

  mask = lambda: rl.random_direction_mask(2, seed=0)
  tx = qwix_lora.in_adapter_layout(optax.chain(mask(), optax.adamw(1e-2), mask()))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  penalty = rl.ortho_penalty(qwix_lora.as_adapters(nnx.state(model, nnx.LoRAParam)))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import paths as paths_lib

# A factor's leaf path: "<module path>/<weight>_lora_<a|b>", and "/value" when
# the leaf sits in an NNX Variable (nnx.state keeps them; nnx.as_pure drops them).
_FACTOR = re.compile(r"^(?P<adapter>.+)_lora_(?P<factor>[ab])(?P<value>/value)?$")


def _layout(adapter: str, a: Any, b: Any) -> tuple[int, ...]:
  """The leading batch shape of a factor pair, checking that the shapes pair.

  A ``dot_general`` weight's factors are (*batch, d_in, rank) and (*batch,
  rank, d_out); an einsum weight's are (*contracted, rank) and (rank,
  *remaining), read as d_in = prod(contracted), d_out = prod(remaining) and
  no batch. (An einsum whose weight shares a batch axis with the input and
  the output puts it in lora_a only; shapes cannot tell it from a contracted
  axis, so such weights are read as contracted over it.)
  """
  if a.ndim >= 2 and b.ndim >= 2 and a.shape[:-2] == b.shape[:-2] and a.shape[-1] == b.shape[-2]:
    return tuple(a.shape[:-2])
  if a.ndim >= 1 and b.ndim >= 1 and a.shape[-1] == b.shape[0]:
    return ()
  raise ValueError(f"qwix LoRA weight {adapter!r}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are neither "
                   f"(..., d_in, rank) and (..., rank, d_out) nor an einsum's (..., rank) and (rank, ...)")


def _matrices(adapter: str, a: Any, b: Any) -> tuple[tuple[int, ...], Any, Any]:
  """``(batch shape, a as (n, d_in, rank), b as (n, rank, d_out))``, n the batch size (1 without)."""
  batch = _layout(adapter, a, b)
  if batch or (a.ndim == 2 and b.ndim == 2):
    return batch, a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
  rank = a.shape[-1]
  return (), a.reshape(1, -1, rank), b.reshape(1, rank, -1)


def _pairs(flat: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  """``{adapter path: {"a": leaf path of lora_a, "b": leaf path of lora_b}}`` in ``flat``."""
  found: dict[str, dict[str, str]] = {}
  for path in flat:
    m = _FACTOR.match(path)
    if m:
      found.setdefault(m["adapter"], {})[m["factor"]] = path
  pairs = {}
  for adapter, names in found.items():
    if set(names) != {"a", "b"}:
      raise ValueError(f"qwix LoRA weight {adapter!r} has only its lora_{''.join(names)} factor in the tree; "
                       f"pass both lora_a and lora_b")
    _layout(adapter, flat[names["a"]], flat[names["b"]])
    pairs[adapter] = names
  return pairs


def _batch_paths(adapter: str, batch_shape: tuple[int, ...]) -> list[str]:
  if not batch_shape:
    return [adapter]
  return [f"{adapter}/{'/'.join(map(str, i))}" for i in np.ndindex(*batch_shape)]


def as_adapters(tree: Any) -> dict[str, dict[str, jax.Array]]:
  """The qwix LoRA factors in ``tree`` as ``{path: {"a": lora_a.T, "b": lora_b.T}}``.

  Args:
    tree: a pytree holding ``*_lora_a`` / ``*_lora_b`` leaves (an NNX state,
      pure or not, or linen params); other leaves are ignored.

  Returns:
    One adapter per qwix LoRA weight (per index of its leading batch axes),
    ``a`` (rank, d_in) and ``b`` (d_out, rank) with an einsum's axes flattened,
    keyed by the weight's "/"-path (``"layers/0/kernel"``; ``".../kernel/3"``
    for batch index 3); ``dW = (alpha / rank) b @ a`` is qwix's update.

  Raises:
    ValueError: no factors, an unpaired factor, or shapes that do not pair.
  """
  flat = paths_lib.flatten_with_paths(tree)
  return _view(flat, _pairs(flat))


def _view(flat: Mapping[str, Any], pairs: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, jax.Array]]:
  """`as_adapters` of a flattened tree whose pairs `_pairs` found."""
  if not pairs:
    raise ValueError("as_adapters found no qwix LoRA factors (leaves named *_lora_a and *_lora_b) in the tree; "
                     "pass the model's LoRA state, e.g. nnx.state(model, nnx.LoRAParam)")
  out = {}
  for adapter, names in pairs.items():
    batch, a3, b3 = _matrices(adapter, flat[names["a"]], flat[names["b"]])
    for i, path in enumerate(_batch_paths(adapter, batch)):
      out[path] = {"a": a3[i].T, "b": b3[i].T}
  return out


def from_adapters(adapters: Mapping[str, Mapping[str, jax.Array]], like: Any) -> Any:
  """``like`` with its qwix LoRA factors replaced by ``adapters`` (as made by `as_adapters`), transposed back.

  Leaves of ``like`` that are not LoRA factors are returned as they are.

  Raises:
    ValueError: ``adapters`` lacks an adapter of ``like``.
  """
  return _replace(like, adapters, {})


def _replace(like: Any, adapters: Mapping[str, Mapping[str, jax.Array]], other: Mapping[str, Any]) -> Any:
  """``like`` with its factors from ``adapters`` (transposed back) and the leaves named in ``other``."""
  flat = paths_lib.flatten_with_paths(like)
  values = dict(other)
  for adapter, names in _pairs(flat).items():
    a, b = flat[names["a"]], flat[names["b"]]
    paths = _batch_paths(adapter, _layout(adapter, a, b))
    missing = [p for p in paths if p not in adapters]
    if missing:
      raise ValueError(f"from_adapters: no adapter {missing[0]!r} for the qwix LoRA weight {adapter!r}")
    values[names["a"]] = jnp.stack([adapters[p]["a"].T for p in paths]).reshape(a.shape).astype(a.dtype)
    values[names["b"]] = jnp.stack([adapters[p]["b"].T for p in paths]).reshape(b.shape).astype(b.dtype)
  return jax.tree_util.tree_map_with_path(lambda kp, x: values.get(paths_lib.path_str(kp), x), like)


def _split(tree: Any) -> dict[str, Any]:
  """``{"adapters": as_adapters(tree), "other": {path: leaf}}`` for the leaves that are no LoRA factor."""
  flat = paths_lib.flatten_with_paths(tree)
  pairs = _pairs(flat)
  factor_paths = {p for names in pairs.values() for p in names.values()}
  return {"adapters": _view(flat, pairs), "other": {p: x for p, x in flat.items() if p not in factor_paths}}


def _join(split: Mapping[str, Any], like: Any) -> Any:
  return _replace(like, split["adapters"], split["other"])


def in_adapter_layout(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` on the `as_adapters` view of qwix LoRA factors; updates come back in qwix's layout.

  ``inner`` sees ``{"adapters": {path: {"a", "b"}}, "other": {path: leaf}}``:
  `random_direction_mask` finds each adapter's pair there (and passes the
  other leaves, a head say), `ortho_penalty`'s gradients arrive in the same
  layout, and its state (Adam's moments) is kept in it. Use it as the
  optimizer of ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` or on linen
  params.
  """

  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_split(params))

  def update_fn(updates, state, params=None, **extra):
    ours, state = inner.update(_split(updates), state, None if params is None else _split(params), **extra)
    return _join(ours, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
