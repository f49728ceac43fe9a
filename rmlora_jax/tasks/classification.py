"""Sequence classification and regression over tokenised text (the GLUE tasks).

`TextClassification` is a `rmlora_jax.tasks.base.Task`: length-bucketed
batches of a `rmlora_jax.data.batching.TokenizedSplit`, an encoder with a
classification or regression head, weighted cross-entropy or squared error,
and the GLUE metrics of its `rmlora_jax.data.glue.GlueTask` description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import metrics as metrics_lib
from rmlora_jax.data import batching
from rmlora_jax.data import glue
from rmlora_jax.tasks import base


def weighted_mean(per_example: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over the weight-1 rows (fill rows of a last partial batch weigh 0)."""
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextClassification:
  """Text (pair) classification or regression on an encoder with a head.

  Example::

    task = TextClassification(spec=glue.get_task("rte"), train=train, evals={"validation": dev},
                              buckets=batching.bucket_lengths(128))
  """

  # What is predicted and how it is scored: labels, regression or not, metrics.
  spec: glue.GlueTask
  # Padded lengths of the batches (few shapes, few compilations).
  buckets: tuple[int, ...]
  # The tokenised training examples; None: a task that only scores batches
  # given to it (forward, loss, predict), as the benchmark's.
  train: batching.TokenizedSplit | None = None
  # Evaluation splits by name; the first one's metrics keep their names,
  # later ones' get the split's last word as a suffix (MNLI: "accuracy_mismatched").
  evals: Mapping[str, batching.TokenizedSplit] = dataclasses.field(default_factory=dict)
  # The tokenizer's padding id.
  pad_id: int = 0

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def main_metric(self) -> str:
    return self.spec.main_metric

  def num_train_batches(self, batch_size: int) -> int:
    if self.train is None:
      raise ValueError(f"task {self.name!r} was built without training data (TextClassification.train)")
    return batching.num_batches(len(self.train), batch_size, drop_remainder=False)

  def train_batches(self, batch_size: int, *, seed: int, epoch: int, start: int) -> Iterator[base.Batch]:
    return batching.batches(self.train, batch_size, seed=seed, epoch=epoch, shuffle=True, buckets=self.buckets,
                        pad_id=self.pad_id, start=start)

  def example_batches(self, batch_size: int, *, training: bool, seed: int = 0, epoch: int = 0,
                      start: int = 0) -> list[base.Batch]:
    """One all-zero batch per padded shape, in the order a run first meets them (`base.CompilesAhead`).

    Training from batch ``start`` of ``epoch`` (shuffled by ``seed``) meets
    the rest of that epoch, then the next; shapes that only the first epoch
    uses come last. Evaluation meets its splits' batches in order.
    """
    if training:
      if self.train is None:
        return []
      lengths = self.train.lengths()
      seen = [batching.batch_max_lengths(lengths, batch_size, seed=seed, epoch=e, shuffle=True)[skip:]
              for e, skip in dict.fromkeys([(epoch, start), (epoch + 1, 0), (0, 0)])]  # a run from 0 reads epoch 0 once
    else:
      seen = [batching.batch_max_lengths(split.lengths(), batch_size, shuffle=False)
              for split in self.evals.values()]
    order = dict.fromkeys(batching.bucket_for(int(n), self.buckets) for part in seen for n in part)
    if not order:
      return []
    labels = np.zeros(batch_size, (self.train if training else next(iter(self.evals.values()))).labels.dtype)
    return [{"input_ids": np.zeros((batch_size, length), np.int32),
             "attention_mask": np.zeros((batch_size, length), np.int32),
             "token_type_ids": np.zeros((batch_size, length), np.int32),
             "labels": labels, "weights": np.zeros(batch_size, np.float32), "index": np.zeros(batch_size, np.int32)}
            for length in order]

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], deterministic=deterministic, rngs=rngs)

  def loss(self, outputs, batch) -> jax.Array:
    """Weighted mean cross-entropy (classification) or squared error (regression)."""
    logits = outputs["logits"].astype(jnp.float32)
    if self.spec.is_regression:
      per_example = (logits[:, 0] - batch["labels"].astype(jnp.float32)) ** 2
    else:
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"].astype(jnp.int32))
    return weighted_mean(per_example, batch["weights"])

  def predict(self, outputs, batch) -> jax.Array:
    """Class ids, or the regression score."""
    logits = outputs["logits"].astype(jnp.float32)
    return logits[:, 0] if self.spec.is_regression else jnp.argmax(logits, axis=-1)

  def evaluate(self, predict: Callable[[base.Batch], Any], batch_size: int) -> dict[str, float]:
    """The GLUE metrics of every evaluation split."""
    out = {}
    for i, (name, split) in enumerate(self.evals.items()):
      batches = batching.batches(split, batch_size, seed=0, epoch=0, shuffle=False, buckets=self.buckets,
                             pad_id=self.pad_id)
      predictions, seen = base.run_predictions(predict, batches)
      m = metrics_lib.glue_metrics(self.spec, np.concatenate(predictions),
                                   np.concatenate([b["labels"] for b in seen]),
                                   np.concatenate([b["weights"] for b in seen]))
      suffix = "" if i == 0 else "_" + name.rsplit("_", 1)[-1]
      out.update({k + suffix: float(v) for k, v in m.items()})
    return out
