"""GLUE evaluation metrics on scikit-learn and SciPy.

Accuracy for every classification task, binary F1 of class 1 for MRPC and
QQP, Matthews correlation for CoLA, Pearson and Spearman correlation for
STS-B. The formulas are `sklearn.metrics` (`accuracy_score`, `f1_score`,
`matthews_corrcoef`) and `scipy.stats` (`pearsonr`, `spearmanr`); this module
adds input checks and one convention: where a metric is undefined (no
examples, a constant side of a correlation) it is 0.0, not nan or an error.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from rmlora_jax.data import glue
from rmlora_jax.data import squad


def _pair(predictions: np.ndarray, labels: np.ndarray, where: str):
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.ndim != 1 or predictions.shape != labels.shape:
    raise ValueError(
        f"{where}: predictions and labels must be 1-D of one length, got shapes "
        f"{predictions.shape} and {labels.shape}"
    )
  return predictions, labels


def _constant(x: np.ndarray) -> bool:
  return bool(x.size) and bool(np.all(x == x[0]))


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Share of predictions equal to their label; 0.0 for no examples."""
  predictions, labels = _pair(predictions, labels, "accuracy")
  return float(skm.accuracy_score(labels, predictions)) if labels.size else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation of class ids (multi-class form; 0.0 when undefined).

  With ``c`` correct, ``s`` examples, ``t_k`` true and ``p_k`` predicted counts
  of class k: ``(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``. A constant
  prediction or label makes the denominator 0; the result is then 0.0, as
  scikit-learn returns (checked here first, which also spares scikit-learn's
  warning about a single class).
  """
  predictions, labels = _pair(predictions, labels, "matthews_corrcoef")
  if not labels.size or _constant(predictions) or _constant(labels):
    return 0.0
  return float(skm.matthews_corrcoef(labels, predictions))


def f1_binary(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
  """F1 of the ``positive`` class: ``2 tp / (2 tp + fp + fn)``; 0.0 when undefined.

  The other classes all count as negative, so it is defined for any number
  of classes; with no ``positive`` among predictions and labels it is 0.0.
  """
  predictions, labels = _pair(predictions, labels, "f1_binary")
  if not labels.size:
    return 0.0
  per_class = skm.f1_score(labels, predictions, labels=[positive], average=None, zero_division=0.0)
  return float(per_class[0])


def _correlation(statistic, predictions: np.ndarray, labels: np.ndarray, where: str) -> float:
  x, y = _pair(predictions, labels, where)
  # Undefined (scipy: nan and a warning, or an error below two points): 0.0.
  if x.size < 2 or _constant(x) or _constant(y):
    return 0.0
  return float(statistic(x.astype(np.float64), y.astype(np.float64)).statistic)


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Pearson correlation; 0.0 when either side is constant (scipy gives nan)."""
  return _correlation(stats.pearsonr, predictions, labels, "pearson")


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Spearman correlation: Pearson of tie-averaged ranks; 0.0 when undefined."""
  return _correlation(stats.spearmanr, predictions, labels, "spearman")


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


# --------------------------------------------------------------------------- SQuAD
# Extractive QA scores as the official SQuAD v1.1 evaluation script computes
# them: exact match and token F1 of normalised text, each the best over the
# reference answers, averaged over questions on a 0-100 scale. Appended below
# the GLUE metrics, so its imports sit here.


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """Lower case, no punctuation, no articles, single spaces (official v1.1 order).

  Example::

    normalize_answer("The  Denver Broncos!")  # "denver broncos"
  """
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def _references(references: Sequence[str], where: str) -> Sequence[str]:
  if isinstance(references, str):
    raise ValueError(
        f"{where}: references must be a sequence of strings, got the string {references!r}"
    )
  if not references:
    raise ValueError(f"{where}: no reference answers to compare with")
  return references


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 when the normalised prediction equals some normalised reference, else 0.0."""
  references = _references(references, "exact_match")
  predicted = normalize_answer(prediction)
  return float(max(predicted == normalize_answer(r) for r in references))


def _f1(predicted_tokens: list[str], reference: str) -> float:
  reference_tokens = normalize_answer(reference).split()
  common = collections.Counter(predicted_tokens) & collections.Counter(reference_tokens)
  num_same = sum(common.values())
  if num_same == 0:  # Also when both sides are empty, as in the official script.
    return 0.0
  precision = num_same / len(predicted_tokens)
  recall = num_same / len(reference_tokens)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
  """The best F1, over references, of the normalised prediction's whitespace tokens.

  Tokens are matched as multisets; with no token in common (an empty side
  included) the F1 is 0.0, as in the official script.
  """
  references = _references(references, "token_f1")
  predicted_tokens = normalize_answer(prediction).split()
  return max(_f1(predicted_tokens, r) for r in references)


def squad_metrics(
    predictions: Mapping[str, str], examples: Sequence[squad.QAExample]
) -> dict[str, float]:
  """SQuAD v1.1 exact match and F1, averaged over ``examples``, in percent.

  Args:
    predictions: example id -> predicted answer text (`squad.postprocess`);
      an example without a prediction counts as answered "".
    examples: the questions with their reference answers.

  Returns:
    ``{"exact_match": ..., "f1": ...}``, each in [0, 100].

  Raises:
    ValueError: no examples, an example without answers, or predictions for
      ids that are not among the examples.

  Example::

    squad_metrics(squad.postprocess(dev, features, start, end), dev)
  """
  if not examples:
    raise ValueError("squad_metrics: no examples to score")
  ids = {e.id for e in examples}
  unknown = [i for i in predictions if i not in ids]
  if unknown:
    raise ValueError(
        f"squad_metrics: {len(unknown)} predictions are for ids not among the "
        f"{len(examples)} examples, e.g. {sorted(unknown)[:5]}"
    )
  em = f1 = 0.0
  for e in examples:
    if not e.answers:
      raise ValueError(
          f"squad_metrics: question id {e.id!r} has no reference answers to score against"
      )
    prediction = predictions.get(e.id, "")
    em += exact_match(prediction, e.answers)
    f1 += token_f1(prediction, e.answers)
  return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples)}
