"""GLUE evaluation metrics in plain numpy.

Accuracy for every classification task, binary F1 of class 1 for MRPC and
QQP, Matthews correlation for CoLA, Pearson and Spearman correlation for
STS-B. Written from the formulas (confusion counts, tie-averaged ranks) so
the library needs neither scikit-learn nor scipy; the tests compare them to
both.
"""

from __future__ import annotations

import numpy as np

from rmlora_jax.data import glue


def _pair(predictions: np.ndarray, labels: np.ndarray, where: str):
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.ndim != 1 or predictions.shape != labels.shape:
    raise ValueError(
        f"{where}: predictions and labels must be 1-D of one length, got shapes "
        f"{predictions.shape} and {labels.shape}"
    )
  return predictions, labels


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Share of predictions equal to their label."""
  predictions, labels = _pair(predictions, labels, "accuracy")
  return float(np.mean(predictions == labels)) if labels.size else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation of class ids (multi-class form; 0.0 when undefined).

  With ``c`` correct, ``s`` examples, ``t_k`` true and ``p_k`` predicted counts
  of class k: ``(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``. A constant
  prediction or label makes the denominator 0; the result is then 0.0, as
  scikit-learn returns.
  """
  predictions, labels = _pair(predictions, labels, "matthews_corrcoef")
  classes, inverse = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
  n = labels.size
  t = np.bincount(inverse[:n], minlength=len(classes)).astype(np.float64)
  p = np.bincount(inverse[n:], minlength=len(classes)).astype(np.float64)
  c = float(np.sum(labels == predictions))
  s = float(n)
  denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def f1_binary(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
  """F1 of the ``positive`` class: ``2 tp / (2 tp + fp + fn)``; 0.0 when undefined."""
  predictions, labels = _pair(predictions, labels, "f1_binary")
  predicted, actual = predictions == positive, labels == positive
  tp = np.sum(predicted & actual)
  wrong = np.sum(predicted != actual)
  return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Pearson correlation; 0.0 when either side is constant (scipy gives nan)."""
  x, y = _pair(predictions, labels, "pearson")
  x = x.astype(np.float64) - np.mean(x, dtype=np.float64)
  y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
  denominator = np.sqrt((x @ x) * (y @ y))
  if not denominator > 0:
    return 0.0
  return float(np.clip((x @ y) / denominator, -1.0, 1.0))


def rank_average(values: np.ndarray) -> np.ndarray:
  """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
  values = np.asarray(values)
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Start of each run of equal values in sorted order, and the run each element is in.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]
  run = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
  ranks = np.empty(len(values), np.float64)
  ranks[order] = ((starts + 1 + ends) / 2.0)[run]
  return ranks


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Spearman correlation: Pearson of tie-averaged ranks; 0.0 when undefined."""
  predictions, labels = _pair(predictions, labels, "spearman")
  return pearson(rank_average(predictions), rank_average(labels))


def glue_metrics(
    task: str | glue.GlueTask,
    predictions: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
  """The GLUE metrics of ``task`` (``task.metrics``) over the weight-1 examples.

  Args:
    task: a task name or `GlueTask`.
    predictions: (N,) class ids, or scores for the regression task STS-B.
    labels: (N,) class ids or scores.
    weights: optional (N,) of 0 and 1; rows with weight 0 (the fill rows of
      `rmlora_jax.data.batches`) are ignored.

  Returns:
    ``{"accuracy": ...}`` for every classification task, plus ``"f1"`` (MRPC,
    QQP) or ``"mcc"`` (CoLA); ``{"pearson", "spearman"}`` for STS-B.

  Example::

    glue_metrics("cola", logits.argmax(-1), batch["labels"], batch["weights"])
  """
  task = glue.get_task(task)
  predictions, labels = _pair(predictions, labels, f"glue_metrics({task.name!r})")
  if weights is not None:
    weights = np.asarray(weights)
    if weights.shape != labels.shape or not np.all((weights == 0) | (weights == 1)):
      raise ValueError(
          f"glue_metrics({task.name!r}): weights must be 0/1 of shape {labels.shape}, got "
          f"shape {weights.shape} with values {np.unique(weights)[:5].tolist()}"
      )
    keep = weights == 1
    predictions, labels = predictions[keep], labels[keep]
  if labels.size == 0:
    raise ValueError(f"glue_metrics({task.name!r}): no examples with weight 1")
  if not task.is_regression and not np.issubdtype(predictions.dtype, np.integer):
    raise ValueError(
        f"glue_metrics({task.name!r}): predictions must be integer class ids, got dtype "
        f"{predictions.dtype}; pass logits.argmax(-1)"
    )
  functions = {
      "accuracy": accuracy,
      "f1": f1_binary,
      "mcc": matthews_corrcoef,
      "pearson": pearson,
      "spearman": spearman,
  }
  return {name: functions[name](predictions, labels) for name in task.metrics}
