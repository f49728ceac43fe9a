"""The contract between a task and the trainer.

A task owns its data and its arithmetic: the trainer asks it for batches
(host numpy dicts of fixed shapes), runs its ``forward``, ``loss`` and
``predict`` inside the jitted steps, and hands it a prediction function to
evaluate with. Nothing in the trainer knows what a token or an image is.

Example: a task of one's own (see README.md, "Bring your own model")::

  class Regression:
    name, main_metric = "toy", "neg_mse"
    def num_train_batches(self, batch_size): ...
    def train_batches(self, batch_size, *, seed, epoch, start): ...
    def forward(self, module, params, batch, *, deterministic, rngs):
      return module.apply({"params": params}, batch["x"])
    def loss(self, outputs, batch): return jnp.mean((outputs[:, 0] - batch["y"]) ** 2)
    def predict(self, outputs, batch): return outputs[:, 0]
    def evaluate(self, predict, batch_size): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np

Batch = Mapping[str, np.ndarray]


class Task(Protocol):
  """What the trainer needs of a task (a structural type: no base class to inherit).

  Attributes:
    name: shown in the progress bar and written to results.json.
    main_metric: the key of ``evaluate``'s result by which the best evaluation
      is chosen (higher is better).
  """

  name: str
  main_metric: str

  def num_train_batches(self, batch_size: int) -> int:
    """Batches in one training epoch."""

  def train_batches(self, batch_size: int, *, seed: int, epoch: int, start: int) -> Iterator[Batch]:
    """One epoch's training batches from batch ``start`` on, a pure function of (seed, epoch).

    Every batch has ``batch_size`` rows and a ``"weights"`` entry (1 for real
    rows, 0 for fill); the same arguments must give the same batches, so a
    resumed run sees the data an uninterrupted one would.
    """

  def forward(self, module: Any, params: Any, batch: Batch, *, deterministic: bool,
              rngs: Mapping[str, jax.Array] | None) -> Any:
    """The model's outputs on a batch (traced inside the jitted steps)."""

  def loss(self, outputs: Any, batch: Batch) -> jax.Array:
    """The scalar task loss (traced); the method's penalty is added by the trainer."""

  def predict(self, outputs: Any, batch: Batch) -> Any:
    """Per-example predictions (traced), a pytree of arrays with a leading batch axis."""

  def evaluate(self, predict: Callable[[Batch], Any], batch_size: int) -> dict[str, float]:
    """Metrics of every evaluation split; ``predict(batch)`` runs the jitted eval step.

    A task scored on generated text may also define ``generate(module,
    params, batch)`` (traced): the eval step then returns its output instead
    of ``predict``'s (`rmlora_jax.tasks.causal_lm.InstructionTuning`).
    """


class CompilesAhead(Protocol):
  """An optional addition to `Task`: the padded shapes a run will meet, known before it starts.

  The trainer then compiles its steps for them on a background thread while
  the first steps run (`rmlora_jax.training.AheadOfTime`), instead of
  stopping at each new shape.
  """

  def example_batches(self, batch_size: int, *, training: bool, seed: int = 0, epoch: int = 0,
                      start: int = 0) -> list[Batch]:
    """One batch (any values) of each shape training (or evaluation) will use, in the order first needed.

    Training is the run that begins at batch ``start`` of ``epoch`` with the
    batch order of ``seed`` (as `Task.train_batches`); the background thread
    builds the shapes in this order, so the first step waits for one only.
    """


def run_predictions(predict: Callable[[Batch], Any], batches: Iterable[Batch]) -> tuple[list[Any], list[Batch]]:
  """``predict`` over ``batches``, fetched to host numpy: ``(predictions, batches)`` in order."""
  predictions, seen = [], []
  for batch in batches:
    predictions.append(jax.tree.map(np.asarray, predict(batch)))
    seen.append(batch)
  return predictions, seen
