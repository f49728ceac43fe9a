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

from rmlora_jax.adapters import adalora, lora2, sora
from rmlora_jax import paths as paths_lib

Array = jax.Array

LORA_FACTORS = frozenset({"a", "b"})
# Families with one gate per rank: {factors: (gate, (r, d_in) factor, (d_out, r) factor)}.
_GATED = {
    adalora.ADALORA_FACTORS: ("lam", "q", "p"),
    sora.SORA_FACTORS: ("g", "a", "b"),
}


class ParamCounts(NamedTuple):
  """Numbers of parameters trained and needed at inference."""

  trainable: int
  inference: int


def _nonzero(x: Any) -> int:
  return int(np.count_nonzero(np.asarray(x)))


def adapter_param_counts(adapter: Mapping[str, Any], *, path: str = "<adapter>") -> ParamCounts:
  """`ParamCounts` of one adapter of any family (see the module's table)."""
  names = frozenset(adapter)
  if names == LORA_FACTORS:
    r, d_in = adapter["a"].shape
    n = r * (d_in + adapter["b"].shape[0])
    return ParamCounts(n, n)
  if names in _GATED:
    gate, row, col = _GATED[names]
    r, d_in = adapter[row].shape
    per_rank = d_in + adapter[col].shape[0] + 1
    return ParamCounts(r * per_rank, _nonzero(adapter[gate]) * per_rank)
  if names == lora2.LORA2_FACTORS:
    d_out, k = adapter["U"].shape
    d_in = adapter["V"].shape[1]
    r = adapter["lam"].shape[0]
    kept = _nonzero(adapter["lam"])
    outer = k * (d_in + d_out)
    return ParamCounts(outer + r * (2 * k + 1), outer + kept * (2 * k + 1) if kept else 0)
  raise ValueError(f"adapter_param_counts: adapter at {path!r} has factors {sorted(names)}, of no known family")


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
  for factors in (LORA_FACTORS, adalora.ADALORA_FACTORS, sora.SORA_FACTORS, lora2.LORA2_FACTORS):
    for path, names in paths_lib.find_adapters(tree, factors).items():
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
