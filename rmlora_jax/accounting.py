"""Trainable and inference parameter counts (the papers' "# T-Params / I-Params").

`param_counts` walks a tree of trained parameters (adapters of any family,
plus whatever else is trained, such as a classifier head; or a whole model's
params for full fine-tuning). Adapter dicts are counted by their family's
convention below; every other leaf counts its full size in both columns.
Frozen base weights are not part of the tree and are counted by neither.

Conventions, per adapter on a kernel with d_in inputs and d_out outputs
(d = d_in + d_out):

=========  ==========================  ==============================================
family     trainable                   needed at inference
=========  ==========================  ==============================================
LoRA       r d                         r d
AdaLoRA    r (d + 1)                   kept (d + 1), kept = nonzero lam entries
SoRA       r (d + 1)                   kept (d + 1), kept = nonzero gates
LoRA²      k d + r (2k + 1)            k d + kept (2k + 1); 0 when kept = 0
full FT    every parameter             every parameter
=========  ==========================  ==============================================

At inference a pruned triplet's row, column and diagonal entry are dropped;
the diagonal (lam or g) is counted as stored, although it could be folded into
a neighbouring factor to save ``kept`` more. An adapter with nothing kept
needs nothing. Counts of kept ranks read the values (host-side), so call
this on concrete arrays after training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from rmlora_jax import paths as paths_lib
from rmlora_jax.adapters import registry

Array = jax.Array


class ParamCounts(NamedTuple):
  """Numbers of parameters trained and needed at inference."""

  trainable: int
  inference: int


def adapter_param_counts(adapter: Mapping[str, Any], *, path: str = "<adapter>") -> ParamCounts:
  """`ParamCounts` of one adapter of any family (see the module's table; `Family.counts`)."""
  return ParamCounts(*registry.family_of(adapter, path=path).counts(adapter))


def param_counts(tree: Any) -> ParamCounts:
  """Trainable and inference parameter counts of everything in ``tree``.

  Args:
    tree: the trained parameters: a dict of adapters, a tree holding adapters
      and other trained leaves, or a model's full params (full fine-tuning).

  Returns:
    `ParamCounts`, summed over the adapters found (by the module's
    conventions) and all other leaves (full size in both).

  Example::

    param_counts({"adapters": adapters, "head": head_params})
  """
  flat = paths_lib.flatten_with_paths(tree)
  counted: set[str] = set()
  trainable = inference = 0
  for family in registry.FAMILIES:
    for path, names in paths_lib.find_adapters(tree, family.factors).items():
      c = adapter_param_counts({n: flat[p] for n, p in names.items()}, path=path)
      trainable += c.trainable
      inference += c.inference
      counted.update(names.values())
  for path, leaf in flat.items():
    if path not in counted and hasattr(leaf, "shape"):
      size = int(np.prod(leaf.shape))
      trainable += size
      inference += size
  return ParamCounts(trainable, inference)
