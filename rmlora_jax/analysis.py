"""Measures of adapters: parameter counts and the paper's Table 4 statistics."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_params(tree: Any) -> int:
  """Total number of elements over the array leaves of ``tree``.

  Accepts arrays and `jax.ShapeDtypeStruct`s, so it can count a model's
  parameters from `jax.eval_shape` without allocating them.
  """
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")))


def _as_matrix(matrix: Any, where: str) -> np.ndarray:
  m = np.asarray(matrix, dtype=np.float64)
  if m.ndim != 2:
    raise ValueError(f"{where} expects a 2-D matrix, got shape {m.shape}")
  return m


def singular_values(matrix: Any) -> np.ndarray:
  """Singular values of a 2-D matrix in descending order, computed in float64."""
  return np.linalg.svd(_as_matrix(matrix, "singular_values"), compute_uv=False)


def effective_rank(matrix: Any, *, rtol: float = 1e-3) -> int:
  """Numerical rank: singular values above ``rtol`` times the largest.

  The paper's "Rank of dW" (Table 4). Zero for an all-zero matrix.
  """
  if not rtol > 0:
    raise ValueError(f"effective_rank: rtol must be > 0, got {rtol!r}")
  s = np.linalg.svd(_as_matrix(matrix, "effective_rank"), compute_uv=False)
  if s.size == 0 or s[0] == 0:
    return 0
  return int(np.sum(s > rtol * s[0]))


def ortho_loss(delta: Any) -> float:
  """``||dW dW^T - I||_F^2`` for dW of shape (d_out, d_in): the paper's Table 4 measure.

  Through dW's singular values s_i it is ``sum_i (s_i^2 - 1)^2 + (d_out -
  rank(dW))``: a rank-r update cannot go below ``d_out - r``, reaches it only
  with every s_i = 1, and a near-zero update scores about ``d_out``. When A
  has orthonormal rows and B orthonormal columns (what R-LoRA's penalty pushes
  them to), every s_i of ``(alpha / rank) B A`` equals ``alpha / rank``, so the
  measure rewards the penalty only where ``alpha == rank``.
  """
  d = _as_matrix(delta, "ortho_loss")
  dev = d @ d.T - np.eye(d.shape[0])
  return float(np.sum(dev * dev))


def delta_report(deltas: dict[str, Any], *, rtol: float = 1e-3) -> dict[str, Any]:
  """The paper's Table 4 measures for each update dW and their summary.

  Args:
    deltas: ``{path: dW}``, e.g. from `delta_weights`.
    rtol: passed to `effective_rank`.

  Returns:
    ``{"per_matrix": {path: {"effective_rank", "ortho_loss"}}, "summary":
    {"mean_effective_rank", "min_effective_rank", "mean_ortho_loss",
    "num_adapted"}}``; the summary is empty when there are no updates.
  """
  per_matrix = {p: {"effective_rank": effective_rank(d, rtol=rtol), "ortho_loss": ortho_loss(d)}
                for p, d in deltas.items()}
  if not per_matrix:
    return {"summary": {}, "per_matrix": {}}
  ranks = np.array([v["effective_rank"] for v in per_matrix.values()])
  losses = np.array([v["ortho_loss"] for v in per_matrix.values()])
  summary = {"mean_effective_rank": float(ranks.mean()), "min_effective_rank": int(ranks.min()),
             "mean_ortho_loss": float(losses.mean()), "num_adapted": len(per_matrix)}
  return {"summary": summary, "per_matrix": per_matrix}
