"""Decoder layers stored stacked for `nn.scan`, and the per-layer view every adapter sees.

A scanned model (``scan_layers=True`` in `rmlora_jax.models`' decoders)
keeps its layers as one subtree named ``layers`` whose leaves have the layer
axis first: ``model/layers/self_attn/q_proj/kernel`` is (L, d_in, d_out)
where the unrolled model has ``model/layers_{i}/self_attn/q_proj/kernel``,
(d_in, d_out) each. Adapters are made per layer, at the unrolled paths
(``model/layers_3/...``), so every layer's adapter has its own direction
draw, penalty term and rank budget exactly as when the layers are unrolled.
Every family's methods then store them stacked over the layers
(`stack_adapters`: one adapter per matrix kind at the stacked kernel's
path, factors with the layer axis first), and draw, penalise, prune and
count them per layer all the same. Adapters on some layers only stay per
layer, and `rmlora_jax.attach` and `rmlora_jax.merge` stack those onto the
stacked kernel for the forward pass.

The convention: a dict entry named ``layers`` whose own keys are not numbers
(an NNX list's are ``0``, ``1``, ...) is a stack, and ``layers_{i}`` is its
layer ``i``.

Example::

  stacked = stack_layers(params)     # model/layers_{i}/... -> model/layers/... (L, ...)
  params = unstack_layers(stacked)   # and back
  view = layer_view(paths.flatten_with_paths(stacked))  # {"model/layers_3/.../kernel": ShapeDtypeStruct}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STACK = "layers"
_LAYER = re.compile(r"^layers_(\d+)$")


def _is_stack(key: str, value: Any) -> bool:
  return key == STACK and isinstance(value, Mapping) and bool(value) and not any(str(k).isdigit() for k in value)


def _stack(leaves: list[Any]) -> Any:
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_layers(tree: Any, *, is_leaf: Callable[[Any], bool] | None = None,
                 stack: Callable[[list[Any]], Any] | None = None) -> Any:
  """``tree`` with every run ``layers_0 .. layers_{L-1}`` replaced by one stack ``layers``.

  Leaves are stacked on a new first axis (NumPy arrays with NumPy, anything
  else with `jnp.stack`; a `qwix.QArray` stacks its values and scales), or
  by ``stack(layers' leaves)`` when given.

  Raises:
    ValueError: the layers are not numbered 0 .. L-1, differ in structure or
      shape (the message names the layer), or a ``layers`` entry exists too.
  """
  if not isinstance(tree, Mapping):
    return tree
  numbered = {int(m[1]): k for k in tree if (m := _LAYER.match(str(k)))}
  out = {k: stack_layers(v, is_leaf=is_leaf, stack=stack) for k, v in tree.items() if k not in numbered.values()}
  if not numbered:
    return out
  if STACK in tree:
    raise ValueError(f"stack_layers: the tree has both {STACK!r} and layers_0 ... entries")
  if sorted(numbered) != list(range(len(numbered))):
    raise ValueError(f"stack_layers: layers must be numbered 0 .. L-1, got {sorted(numbered)}")
  layers = [tree[numbered[i]] for i in range(len(numbered))]
  first = jax.tree_util.tree_structure(layers[0], is_leaf=is_leaf)
  for i, layer in enumerate(layers[1:], 1):
    if jax.tree_util.tree_structure(layer, is_leaf=is_leaf) != first:
      raise ValueError(f"stack_layers: layers_{i} has other parameters than layers_0")
    bad = [(np.shape(x), np.shape(y)) for x, y in zip(jax.tree.leaves(layers[0]), jax.tree.leaves(layer))
           if np.shape(x) != np.shape(y)]
    if bad:
      raise ValueError(f"stack_layers: layers_{i} has shapes other than layers_0's, e.g. {bad[0][1]} for {bad[0][0]}")
  out[STACK] = jax.tree.map(lambda *xs: (stack or _stack)(list(xs)), *layers)
  return out


def num_layers(stack: Mapping[str, Any]) -> int:
  """The layer count of a stack (the leading size of its leaves)."""
  return int(np.shape(jax.tree.leaves(stack)[0])[0])


def unstack_layers(tree: Any) -> Any:
  """The inverse of `stack_layers`: each stack ``layers`` becomes ``layers_0 .. layers_{L-1}``."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for k, v in tree.items():
    if _is_stack(k, v):
      for i in range(num_layers(v)):
        out[f"{STACK}_{i}"] = jax.tree.map(lambda x, i=i: x[i], v)
    else:
      out[k] = unstack_layers(v)
  return out


def _stack_part(parts: list[str]) -> int | None:
  """The index of the stack's part in a flat path's parts (``layers`` not followed by a number), or None."""
  for j, part in enumerate(parts[:-1]):
    if part == STACK and not parts[j + 1].isdigit():
      return j
  return None


def split_path(path: str) -> tuple[str, int] | None:
  """``(stacked path, layer)`` of an unrolled path: ``a/layers_3/b`` -> ``("a/layers/b", 3)``; None if not a layer's."""
  parts = path.split("/")
  for j, part in enumerate(parts):
    m = _LAYER.match(part)
    if m:
      return "/".join(parts[:j] + [STACK] + parts[j + 1:]), int(m[1])
  return None


def layer_path(path: str, layer: int) -> str | None:
  """The unrolled path of ``layer`` of a stacked leaf: ``a/layers/b`` -> ``a/layers_{layer}/b``; None if not stacked."""
  parts = path.split("/")
  j = _stack_part(parts)
  if j is None:
    return None
  return "/".join(parts[:j] + [f"{STACK}_{layer}"] + parts[j + 1:])


def layer_paths(path: str, shape: tuple[int, ...]) -> list[str]:
  """The unrolled paths of every layer of the stacked leaf at ``path`` (of ``shape``); [] if not stacked."""
  if layer_path(path, 0) is None:
    return []
  return [layer_path(path, i) for i in range(shape[0])]


def layer_view(flat: Mapping[str, Any]) -> dict[str, Any]:
  """A flat ``{path: leaf}`` with each stacked leaf replaced by its layers' shapes.

  ``model/layers/x/kernel`` (L, d_in, d_out) becomes ``model/layers_{i}/x/kernel``
  for each i, each a `jax.ShapeDtypeStruct` (d_in, d_out) of its dtype;
  other entries are kept. What adapter placement (`rmlora_jax.select_targets`)
  and partition rules see of a scanned model.
  """
  out = {}
  for path, leaf in flat.items():
    shape = tuple(np.shape(leaf))
    layers = layer_paths(path, shape)
    if not layers:
      out[path] = leaf
    for layer in layers:
      out[layer] = jax.ShapeDtypeStruct(shape[1:], leaf.dtype)
  return out


def is_stacked_path(path: str) -> bool:
  """Whether ``path`` names a stack's leaf or entry (``.../layers/...``, not ``.../layers_3/...``)."""
  return _stack_part(path.split("/")) is not None


def _is_stacked_adapter(path: str, adapter: Any) -> bool:
  return is_stacked_path(path) and any(len(np.shape(x)) == 3 for x in jax.tree.leaves(adapter))


def stack_adapters(adapters: Mapping[str, Mapping[str, Any]],
                   stacks: Mapping[str, int]) -> dict[str, dict[str, Any]]:
  """Per-layer adapters of a scanned model gathered into one adapter per stacked kernel.

  ``adapters`` is a flat ``{path: {factor: array}}`` at the unrolled paths
  (``model/layers_3/.../kernel``); ``stacks`` maps each stacked kernel's path
  (``model/layers/.../kernel``) to its layer count. Where every layer of a
  stacked kernel has an adapter, and all of one structure and shape, they
  become one entry at the stacked path whose factors have the layer axis
  first; any other adapter is kept as it is. `unstack_adapters` inverts it.
  Stored this way, a step handles one adapter per matrix kind instead of one
  per layer and matrix.
  """
  groups: dict[str, dict[int, str]] = {}
  for path in adapters:
    split = split_path(path)
    if split is not None and split[0] in stacks:
      groups.setdefault(split[0], {})[split[1]] = path
  out = dict(adapters)
  for stacked, layers in groups.items():
    if sorted(layers) != list(range(stacks[stacked])):
      continue
    members = [adapters[layers[i]] for i in range(stacks[stacked])]
    first = jax.tree.structure(members[0])
    if any(jax.tree.structure(m) != first or [np.shape(x) for x in jax.tree.leaves(m)]
           != [np.shape(x) for x in jax.tree.leaves(members[0])] for m in members[1:]):
      continue
    for path in layers.values():
      del out[path]
    out[stacked] = jax.tree.map(lambda *xs: _stack(list(xs)), *members)
  return out


def unstack_adapters(adapters: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """The inverse of `stack_adapters`: each stacked entry becomes one adapter per layer, at its layer's path.

  A stacked entry sits at a stack's path and has a 3-D factor (no family's
  per-layer factor has more than two axes), so an adapter on a kernel that
  merely lives under a module named ``layers`` is left as it is.
  """
  out = {}
  for path, ad in adapters.items():
    if not _is_stacked_adapter(path, ad):
      out[path] = ad
      continue
    for i in range(num_layers(ad)):
      out[layer_path(path, i)] = jax.tree.map(lambda x, i=i: x[i], ad)
  return out


def restack_like(adapters: Mapping[str, Mapping[str, Any]],
                 like: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per-layer ``adapters`` stacked as ``like`` (a `stack_adapters` result) is: the same entries stacked."""
  out = dict(adapters)
  for path, ad in like.items():
    if _is_stacked_adapter(path, ad):
      layers = [out.pop(layer_path(path, i)) for i in range(num_layers(ad))]
      out[path] = jax.tree.map(lambda *xs: _stack(list(xs)), *layers)
  return out

