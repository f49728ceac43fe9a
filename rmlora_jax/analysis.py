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


def factored_singular_values(left: Any, right: Any) -> np.ndarray:
  """Singular values of ``left @ right`` without forming it, in float64, descending.

  ``left`` is (d_out, r) and ``right`` (r, d_in), as an adapter's update
  (`rmlora_jax.delta_factors`). With ``left = Q_l R_l`` and
  ``right^T = Q_r R_r`` (reduced QR), ``left @ right = Q_l (R_l R_r^T) Q_r^T``
  and the Q's have orthonormal columns, so the singular values are those of
  the small core ``R_l R_r^T``: O((d_out + d_in) r^2) work instead of an SVD
  of the (d_out, d_in) product. The result is padded with zeros to
  ``min(d_out, d_in)`` values, as many as `singular_values` of the product.
  """
  l, r = _as_matrix(left, "factored_singular_values (left)"), _as_matrix(right, "factored_singular_values (right)")
  if l.shape[1] != r.shape[0]:
    raise ValueError(f"factored_singular_values: left {l.shape} and right {r.shape} do not multiply")
  core = np.linalg.qr(l, mode="r") @ np.linalg.qr(r.T, mode="r").T
  s = np.linalg.svd(core, compute_uv=False)
  n = min(l.shape[0], r.shape[1])
  return np.concatenate([s, np.zeros(max(n - s.size, 0))])[:n]


def delta_singular_values(delta: Any) -> np.ndarray:
  """`singular_values` of a dW, or `factored_singular_values` of ``(left, right)``."""
  return factored_singular_values(*delta) if isinstance(delta, tuple) else singular_values(delta)


def _rank_of_spectrum(s: np.ndarray, rtol: float, where: str) -> int:
  if not rtol > 0:
    raise ValueError(f"{where}: rtol must be > 0, got {rtol!r}")
  if s.size == 0 or s[0] == 0:
    return 0
  return int(np.sum(s > rtol * s[0]))


def effective_rank(matrix: Any, *, rtol: float = 1e-3) -> int:
  """Numerical rank: singular values above ``rtol`` times the largest.

  The paper's "Rank of dW" (Table 4). Zero for an all-zero matrix.
  """
  s = np.linalg.svd(_as_matrix(matrix, "effective_rank"), compute_uv=False)
  return _rank_of_spectrum(s, rtol, "effective_rank")


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


def _measures(delta: Any, rtol: float, spectra: bool) -> dict[str, Any]:
  """Effective rank and ortho loss of a dW, or of ``(left, right)`` with dW = left @ right."""
  s = delta_singular_values(delta)
  if isinstance(delta, tuple):
    # ortho_loss through the spectrum: the d_out eigenvalues of dW dW^T are
    # the squared singular values and d_out - min(d_out, d_in) zeros.
    loss = float(np.sum((s * s - 1.0) ** 2) + (np.shape(delta[0])[0] - s.size))
  else:
    loss = ortho_loss(delta)
  rank = _rank_of_spectrum(s, rtol, "delta_report")
  out = {"effective_rank": rank, "ortho_loss": loss, "frobenius_norm": float(np.sqrt(np.sum(s * s))),
         "singular_value_rms": float(np.sqrt(np.mean(s[:rank] ** 2))) if rank else 0.0}
  if spectra:
    out["singular_values"] = [float(v) for v in s]
  return out


def delta_report(deltas: dict[str, Any], *, rtol: float = 1e-3, spectra: bool = False) -> dict[str, Any]:
  """The paper's Table 4 measures for each update dW and their summary.

  Args:
    deltas: ``{path: dW}`` (e.g. from `delta_weights`) or ``{path: (left,
      right)}`` with dW = left @ right (from `delta_factors`: the spectrum
      then comes from the rank-sized factors, `factored_singular_values`,
      which at a decoder's sizes is thousands of times cheaper than an SVD
      of each dW).
    rtol: passed to `effective_rank`.
    spectra: also give each update's ``"singular_values"`` (the list the
      rank is counted from, computed once).

  Returns:
    ``{"per_matrix": {path: {"effective_rank", "ortho_loss",
    "frobenius_norm", "singular_value_rms"[, "singular_values"]}},
    "summary": {"mean_effective_rank", "min_effective_rank",
    "mean_ortho_loss", "mean_frobenius_norm", "mean_singular_value_rms",
    "num_adapted"}}``: ``frobenius_norm`` is ``||dW||_F`` and
    ``singular_value_rms`` the root mean square of the singular values
    counted in the effective rank (0 for a zero update). The summary is
    empty when there are no updates.
  """
  per_matrix = {p: _measures(d, rtol, spectra) for p, d in deltas.items()}
  if not per_matrix:
    return {"summary": {}, "per_matrix": {}}
  ranks = np.array([v["effective_rank"] for v in per_matrix.values()])
  losses = np.array([v["ortho_loss"] for v in per_matrix.values()])
  summary = {"mean_effective_rank": float(ranks.mean()), "min_effective_rank": int(ranks.min()),
             "mean_ortho_loss": float(losses.mean()),
             "mean_frobenius_norm": float(np.mean([v["frobenius_norm"] for v in per_matrix.values()])),
             "mean_singular_value_rms": float(np.mean([v["singular_value_rms"] for v in per_matrix.values()])),
             "num_adapted": len(per_matrix)}
  return {"summary": summary, "per_matrix": per_matrix}
