"""Extractive question answering (SQuAD v1.1): start and end logits over each window's tokens.

`ExtractiveQA` is a `rmlora_jax.tasks.base.Task` over the windows ("features")
of `rmlora_jax.data.squad.build_features`: length-bucketed batches, an
encoder with the ``"qa"`` head, the mean of the start and end
cross-entropies, and the official v1.1 exact match and F1 of the best span
over every window of an example (`rmlora_jax.data.squad.postprocess`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import metrics as metrics_lib
from rmlora_jax.data import batching
from rmlora_jax.data import squad
from rmlora_jax.tasks import base
from rmlora_jax.tasks import classification

_TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def gather(features: squad.QAFeatures, idx: np.ndarray, batch_size: int, buckets: Sequence[int]) -> dict:
  """The windows ``idx`` as one batch of ``batch_size`` rows, cut to the smallest bucket that fits.

  A last partial batch is filled with copies of its first window at weight 0.
  ``"index"`` holds each row's window number.
  """
  real = len(idx)
  idx = np.concatenate([idx, np.full(batch_size - real, idx[0], idx.dtype)])
  # The full window width is the last bucket, whatever ``buckets`` holds.
  length = batching.bucket_for(int(features.lengths[idx].max()), sorted({*buckets, features.input_ids.shape[1]}))
  batch = {k: getattr(features, k)[idx, :length] for k in _TOKEN_FIELDS}
  weights = np.zeros(batch_size, np.float32)
  weights[:real] = 1.0
  batch.update(start_positions=features.start_positions[idx], end_positions=features.end_positions[idx],
               weights=weights, index=idx.astype(np.int32))
  return batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractiveQA:
  """SQuAD-style extractive QA.

  Example::

    task = ExtractiveQA(train=build_features(train_examples, tokenizer),
                        eval_examples=dev, eval_features=build_features(dev, tokenizer),
                        buckets=(128, 256, 384))
  """

  # Training windows (None: a task that only scores batches given to it).
  train: squad.QAFeatures | None
  # The evaluation questions and their windows.
  eval_examples: Sequence[squad.QAExample]
  eval_features: squad.QAFeatures
  # Padded lengths of the batches; windows are cut to the smallest that fits.
  buckets: tuple[int, ...]
  # Candidates per window for the start and the end of a span.
  n_best: int = 20
  # The longest answer, in tokens.
  max_answer_len: int = 30
  name: str = "squad"
  main_metric: str = "f1"

  def num_train_batches(self, batch_size: int) -> int:
    if self.train is None:
      raise ValueError(f"task {self.name!r} was built without training windows (ExtractiveQA.train)")
    return batching.num_batches(len(self.train), batch_size, drop_remainder=False)

  def train_batches(self, batch_size: int, *, seed: int, epoch: int, start: int) -> Iterator[base.Batch]:
    plan = batching.batch_plan(self.train.lengths, batch_size, seed=seed, epoch=epoch, shuffle=True)
    for idx in plan[start:]:
      yield gather(self.train, idx, batch_size, self.buckets)

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], deterministic=deterministic, rngs=rngs)

  def loss(self, outputs, batch) -> jax.Array:
    """The mean of the start and end cross-entropies over each window's real tokens, weighted.

    transformers' QA loss takes the softmax over every position, padding
    included; here padding is masked out, so a window's loss does not depend
    on the bucket it was padded to. On the embedded MiniLM with 2,000 SQuAD
    questions, counting the padding cost 4.5 F1 (docs/RESULTS.md).
    """
    keep = batch["attention_mask"] > 0
    per_example = 0.5 * sum(
        optax.softmax_cross_entropy_with_integer_labels(
            jnp.where(keep, outputs[f"{side}_logits"].astype(jnp.float32), -1e9),
            batch[f"{side}_positions"].astype(jnp.int32))
        for side in ("start", "end"))
    return classification.weighted_mean(per_example, batch["weights"])

  def predict(self, outputs, batch) -> dict[str, jax.Array]:
    return {"start_logits": outputs["start_logits"].astype(jnp.float32),
            "end_logits": outputs["end_logits"].astype(jnp.float32)}

  def logits(self, predict: Callable[[base.Batch], Any], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits (F, L) of every evaluation window (-inf beyond a batch's length)."""
    f = self.eval_features
    plan = batching.batch_plan(f.lengths, batch_size, seed=0, epoch=0, shuffle=False)
    predictions, batches = base.run_predictions(
        predict, (gather(f, idx, batch_size, self.buckets) for idx in plan))
    start = np.full(f.input_ids.shape, -np.inf, np.float32)
    end = np.full(f.input_ids.shape, -np.inf, np.float32)
    for out, batch in zip(predictions, batches):
      rows = batch["index"][batch["weights"] > 0]
      n, length = len(rows), out["start_logits"].shape[1]
      start[rows, :length] = out["start_logits"][:n]
      end[rows, :length] = out["end_logits"][:n]
    return start, end

  def evaluate(self, predict: Callable[[base.Batch], Any], batch_size: int) -> dict[str, float]:
    """Official SQuAD v1.1 ``exact_match`` and ``f1`` (0-100) of the best span per question."""
    start, end = self.logits(predict, batch_size)
    answers = squad.postprocess(self.eval_examples, self.eval_features, start, end, n_best=self.n_best,
                                max_answer_len=self.max_answer_len)
    return {k: float(v) for k, v in metrics_lib.squad_metrics(answers, self.eval_examples).items()}
