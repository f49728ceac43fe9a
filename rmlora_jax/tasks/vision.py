"""Image classification for the trainer: on pixels, or on a frozen backbone's cached features.

`ImageClassification` is a `rmlora_jax.tasks.base.Task` over an
`rmlora_jax.data.images.ImageSplit`: each epoch's batches are shuffled,
augmented (random crop and flip) and normalised on the host, the module is
any image classifier taking (B, C, H, W) ``pixel_values`` (`models.vit.ViT`
with head "image_classification"), the loss is weighted cross-entropy.

`FeatureClassification` is the same task when only the classifier trains
(the RM-LoRA paper's last-layer experiment): the frozen backbone's [CLS]
features of a few augmented views of every training image are computed once
(`extract_features`) and the module is just the classifier (`LinearHead`,
whose parameters ``classifier/{kernel,bias}`` are the ViT's own). Its numbers
are those of the pixel task run on the same views, at the cost of a matrix
product per step.

Both report, at every evaluation, the paper's Figure 1 measures: test
accuracy and loss, training accuracy and loss (on the un-augmented training
images) and the generalisation gap, train minus test accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax.data import images as images_lib
from rmlora_jax.models import torch_port
from rmlora_jax.tasks import base


def _num_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)


def _rows(order: np.ndarray, batch_size: int, index: int) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of batch ``index`` of ``order``, filled to ``batch_size`` with row 0, and their weights."""
  rows = order[index * batch_size:(index + 1) * batch_size]
  weights = np.ones(batch_size, np.float32)
  weights[len(rows):] = 0.0
  return np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)]), weights


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))


def _scores(predict: Callable[[base.Batch], Any], batches: Iterator[base.Batch]) -> dict[str, float]:
  """Weighted accuracy and mean cross-entropy of ``predict`` over ``batches``."""
  predictions, seen = base.run_predictions(predict, batches)
  weights = np.concatenate([b["weights"] for b in seen])
  labels = np.concatenate([b["labels"] for b in seen])
  correct = np.concatenate([p["label"] for p in predictions]) == labels
  losses = np.concatenate([p["loss"] for p in predictions])
  total = max(float(weights.sum()), 1.0)
  return {"accuracy": float(np.sum(weights * correct) / total), "loss": float(np.sum(weights * losses) / total)}


class _Scoring:
  """Loss, predictions and the Figure 1 evaluation shared by both tasks."""

  main_metric = "accuracy"

  def loss(self, outputs, batch) -> jax.Array:
    """Weighted mean cross-entropy (fill rows weigh 0)."""
    per_example = _cross_entropy(outputs["logits"], batch["labels"])
    return jnp.sum(batch["weights"] * per_example) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def predict(self, outputs, batch) -> dict[str, jax.Array]:
    """``{"label": argmax class, "loss": per-example cross-entropy}``."""
    logits = outputs["logits"]
    return {"label": jnp.argmax(logits, axis=-1), "loss": _cross_entropy(logits, batch["labels"])}

  def evaluate(self, predict: Callable[[base.Batch], Any], batch_size: int) -> dict[str, float]:
    """``accuracy``, ``loss`` of the first eval split (later ones suffixed ``_<name>``),
    ``train_accuracy``, ``train_loss`` (un-augmented training images) and
    ``generalization_gap`` = train_accuracy - accuracy."""
    out = {}
    for i, name in enumerate(self.evals):
      suffix = "" if i == 0 else f"_{name}"
      out.update({k + suffix: v for k, v in _scores(predict, self.eval_batches(name, batch_size)).items()})
    if self.score_train:
      train = _scores(predict, self.eval_batches(None, batch_size))
      out.update({"train_accuracy": train["accuracy"], "train_loss": train["loss"]})
      if self.evals:
        out["generalization_gap"] = train["accuracy"] - out["accuracy"]
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageClassification(_Scoring):
  """Classification of images by a module taking ``pixel_values`` (B, C, H, W).

  Example::

    task = ImageClassification(name="cifar10_transfer", train=train, evals={"test": test},
                               mean=(0.5,) * 3, std=(0.5,) * 3)
  """

  name: str
  # Training images (uint8, at the model's input size).
  train: images_lib.ImageSplit
  # Evaluation splits by name; the first one's metrics keep their names.
  evals: Mapping[str, images_lib.ImageSplit] = dataclasses.field(default_factory=dict)
  # The processor's per-channel normalisation.
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)
  # Random crop (after this much zero padding; 0: none) and horizontal flip in training.
  crop_padding: int = 4
  flip: bool = True
  # Also score the un-augmented training images at each evaluation.
  score_train: bool = True

  def num_train_batches(self, batch_size: int) -> int:
    return _num_batches(len(self.train), batch_size)

  def train_batches(self, batch_size: int, *, seed: int, epoch: int, start: int) -> Iterator[base.Batch]:
    order = np.random.default_rng([seed, epoch]).permutation(len(self.train))
    for index in range(start, self.num_train_batches(batch_size)):
      rows, weights = _rows(order, batch_size, index)
      # The augmentation of batch ``index`` depends on (seed, epoch, index) only: resumes are exact.
      rng = np.random.default_rng([seed, epoch, index, 1])
      pixels = images_lib.augment(self.train.images[rows], rng, padding=self.crop_padding, flip=self.flip)
      yield {"pixel_values": images_lib.normalize(pixels, mean=self.mean, std=self.std),
             "labels": self.train.labels[rows], "weights": weights}

  def eval_batches(self, split: str | None, batch_size: int) -> Iterator[base.Batch]:
    """Batches of eval split ``split`` (None: the un-augmented training images), in order."""
    data = self.train if split is None else self.evals[split]
    order = np.arange(len(data))
    for index in range(_num_batches(len(data), batch_size)):
      rows, weights = _rows(order, batch_size, index)
      yield {"pixel_values": images_lib.normalize(data.images[rows], mean=self.mean, std=self.std),
             "labels": data.labels[rows], "weights": weights}

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["pixel_values"], deterministic=deterministic, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class FeatureSplit:
  """A frozen backbone's features of a split: (views, N, D) for training, (1, N, D) for evaluation."""

  features: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureClassification(_Scoring):
  """Classification of cached features by the classifier alone (`LinearHead`).

  Each epoch shows every training image once, in one of its cached augmented
  views drawn by (seed, epoch); view 0 is the un-augmented image.
  """

  name: str
  train: FeatureSplit
  evals: Mapping[str, FeatureSplit] = dataclasses.field(default_factory=dict)
  score_train: bool = True

  def num_train_batches(self, batch_size: int) -> int:
    return _num_batches(len(self.train), batch_size)

  def train_batches(self, batch_size: int, *, seed: int, epoch: int, start: int) -> Iterator[base.Batch]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(self.train))
    views = self.train.features.shape[0]
    # Augmented views 1.. when there are any, as the pixel task always augments.
    view = rng.integers(1 if views > 1 else 0, views, size=len(self.train))
    for index in range(start, self.num_train_batches(batch_size)):
      rows, weights = _rows(order, batch_size, index)
      yield {"features": self.train.features[view[rows], rows], "labels": self.train.labels[rows],
             "weights": weights}

  def eval_batches(self, split: str | None, batch_size: int) -> Iterator[base.Batch]:
    """Batches of eval split ``split`` (None: view 0 of the training images), in order."""
    data = self.train if split is None else self.evals[split]
    order = np.arange(len(data))
    for index in range(_num_batches(len(data), batch_size)):
      rows, weights = _rows(order, batch_size, index)
      yield {"features": data.features[0, rows], "labels": data.labels[rows], "weights": weights}

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["features"], deterministic=deterministic, rngs=rngs)


class LinearHead(nn.Module):
  """The ViT's classifier alone: ``{"logits": features @ kernel + bias}``, params ``classifier/{kernel,bias}``.

  Its Dense takes a `rmlora_jax.low_rank.LowRankKernel`, so adapters apply
  as on the whole model.
  """

  num_labels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    del deterministic  # no dropout before the classifier, as in the ViT
    dense = torch_port.dense(self.num_labels, init=nn.initializers.zeros, dtype=self.dtype, name="classifier")
    return {"logits": dense(features)}


def extract_features(module: Any, params: Any, split: images_lib.ImageSplit, *, views: int, seed: int,
                     mean: Sequence[float], std: Sequence[float], crop_padding: int = 4, flip: bool = True,
                     batch_size: int = 128) -> FeatureSplit:
  """The [CLS] features (after the final LayerNorm) of ``views`` versions of every image.

  View 0 is the image itself; views 1.. are augmented as in training, drawn
  by (``seed``, view). ``module`` is a ViT whose ``last_hidden_state`` is
  read; its classifier is not run on the result.

  Returns:
    `FeatureSplit` with features (views, N, hidden) float32.
  """
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x, deterministic=True)["last_hidden_state"][:, 0])
  out = []
  for v in range(views):
    rng = np.random.default_rng([seed, v, 2])
    chunks = []
    for start in range(0, len(split), batch_size):
      pixels = split.images[start:start + batch_size]
      if v > 0:
        pixels = images_lib.augment(pixels, rng, padding=crop_padding, flip=flip)
      n = len(pixels)
      x = images_lib.normalize(pixels, mean=mean, std=std)
      if n < batch_size:  # one compiled shape
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
      chunks.append(np.asarray(apply(params, x))[:n])
    out.append(np.concatenate(chunks))
  return FeatureSplit(np.stack(out).astype(np.float32), split.labels)
