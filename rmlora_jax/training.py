"""Jitted, sharded train and eval steps, and checkpoints that survive a kill.

The train step is one `jax.jit` with explicit shardings over a
`jax.sharding.Mesh`: the batch is split over the ``"data"`` axis, the
trainable state and frozen weights are replicated. Gradients are taken with
respect to the method's trainable tree only, so frozen base weights are never
differentiated; the method's penalty (RM-LoRA's orthogonality term) sits
inside the jitted loss. Dropout keys are ``fold_in(key(seed), step)``, so a
resumed run draws the same dropout masks as one never interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmlora_jax import methods as methods_lib


class TrainState(NamedTuple):
  """Everything a step changes: the step count, trainable params, optimizer state."""

  step: jax.Array
  trainable: Any
  opt_state: Any


def make_mesh(data: int = -1, devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over ``data`` devices (-1: all of them)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices) if data == -1 else data
  if not 1 <= n <= len(devices):
    raise ValueError(f"mesh.data={data} must be -1 or in 1..{len(devices)} (the devices available)")
  return Mesh(np.array(devices[:n]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the data axis."""
  n = mesh.shape["data"]
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {n} devices of the mesh's data axis")


def model_outputs(module, params, batch: Mapping[str, jax.Array], *, deterministic: bool, rng=None):
  """Runs a text encoder with a head on a batch dict."""
  return module.apply(
      {"params": params},
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      token_type_ids=batch["token_type_ids"],
      deterministic=deterministic,
      rngs=None if rng is None else {"dropout": rng},
  )


def task_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, *, regression: bool) -> jax.Array:
  """Weighted mean cross-entropy (classification) or squared error (regression)."""
  logits = logits.astype(jnp.float32)
  if regression:
    per_example = (logits[:, 0] - labels.astype(jnp.float32)) ** 2
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(
    module,
    method: methods_lib.Method,
    tx: optax.GradientTransformation,
    *,
    regression: bool,
    seed: int,
    mesh: Mesh,
) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted ``(state, frozen, batch) -> (state, metrics)`` step."""

  def step_fn(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(trainable):
      params = method.assemble(trainable, frozen)
      out = model_outputs(module, params, batch, deterministic=False, rng=rng)
      loss = task_loss(out["logits"], batch["labels"], batch["weights"], regression=regression)
      pen = method.penalty(trainable)
      return loss + pen, (loss, pen)

    (total, (loss, pen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": total, "task_loss": loss, "penalty": pen, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, trainable, opt_state), metrics

  rep, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(step_fn, in_shardings=(rep, rep, data), out_shardings=(rep, rep), donate_argnums=(0,))


def make_eval_step(module, method: methods_lib.Method, *, regression: bool, mesh: Mesh):
  """The jitted ``(trainable, frozen, batch) -> predictions`` step (class ids or scores)."""

  def eval_fn(trainable, frozen, batch):
    out = model_outputs(module, method.assemble(trainable, frozen), batch, deterministic=True)
    logits = out["logits"].astype(jnp.float32)
    return logits[:, 0] if regression else jnp.argmax(logits, axis=-1)

  rep, data = replicated(mesh), data_sharded(mesh)
  return jax.jit(eval_fn, in_shardings=(rep, rep, data), out_shardings=rep)


def abstract_like(tree: Any, sharding) -> Any:
  """`jax.ShapeDtypeStruct`s of ``tree`` carrying ``sharding``, for restoring into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Orbax checkpoints of the train state plus a JSON side record.

  Orbax writes each step into a temporary folder and renames it only once
  complete, so a run killed mid-save leaves no checkpoint that looks whole:
  `latest_step` sees committed steps only.
  """

  def __init__(self, directory: str, *, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: TrainState, record: Mapping[str, Any]) -> None:
    self._mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record))),
        force=True,
    )

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    out = self._mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()),
    )
    return TrainState(*out.state), dict(out.record)

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
