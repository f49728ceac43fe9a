"""Jitted, sharded train and eval steps, and checkpoints that survive a kill.

The train step is one `jax.jit` with explicit shardings over a
`jax.sharding.Mesh` (see `rmlora_jax.partitioning`): the batch is split over
the data axes, the trainable state and frozen weights are sharded as the
partition rules say (replicated when no shardings are given). Gradients are taken with
respect to the method's trainable tree only, so frozen base weights are never
differentiated; the method's penalty (RM-LoRA's orthogonality term) sits
inside the jitted loss. Dropout keys are ``fold_in(stream_key(seed, DROPOUT_STREAM), step)``, so a
resumed run draws the same dropout masks as one never interrupted.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import stacking


# Streams of a run's randomness, folded into key(seed) before anything else.
# Both are >= 2**31, so they can never equal a step or a path hash (< 2**31)
# folded in elsewhere from the same root (the direction masks).
INIT_STREAM = 0x80000001
DROPOUT_STREAM = 0x80000002


def stream_key(seed: int, stream: int) -> jax.Array:
  """The root key of one purpose (`INIT_STREAM`, `DROPOUT_STREAM`) of a run."""
  return jax.random.fold_in(jax.random.key(seed), stream)


class TrainState(NamedTuple):
  """Everything a step changes: the step count, trainable params, optimizer state."""

  step: jax.Array
  trainable: Any
  opt_state: Any


def make_mesh(data: int = -1, devices: list[jax.Device] | None = None, *, fsdp: int = 1, model: int = 1) -> Mesh:
  """A ``("data", "fsdp", "model")`` mesh (see `partitioning.make_mesh`); -1: the rest of the devices."""
  return partitioning.make_mesh({"data": data, "fsdp": fsdp, "model": model}, devices=devices)


replicated = partitioning.replicated
data_sharded = partitioning.batch_sharding
check_batch_size = partitioning.check_batch_size


class TrainStep(NamedTuple):
  """The train step as two jitted programs; called as the one-program step is.

  ``grad(state, frozen, batch) -> (grads, losses)`` runs the forward and
  backward pass and depends on the batch's shape; ``apply(state, grads,
  losses) -> (state, metrics)`` runs the optimizer and the non-finite guard,
  and compiles once whatever the batch shapes. A run whose batches come in
  several padded lengths compiles the optimizer once instead of once per
  length. The updates are those of the one-program step (`make_train_step`);
  a step costs a second dispatch.
  """

  grad: Any
  apply: Any

  def __call__(self, state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
    grads, losses = self.grad(state, frozen, batch)
    return self.apply(state, grads, losses)


def make_train_step(
    module,
    method: methods_lib.Method,
    tx: optax.GradientTransformation,
    task: Any,
    *,
    seed: int,
    mesh: Mesh,
    state_sharding: Any = None,
    frozen_sharding: Any = None,
    split: bool = False,
) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted ``(state, frozen, batch) -> (state, metrics)`` step.

  A step whose loss or gradient norm is not finite is not applied: the
  trainable tree and optimizer state come back unchanged (the step count
  still advances) and ``metrics["finite"]`` is False, for the caller to count.

  Args:
    module: the Flax module, run through ``task.forward``.
    method: the fine-tuning method (`rmlora_jax.methods.make_method`).
    tx: its optimizer.
    task: supplies ``forward`` and ``loss`` (`rmlora_jax.tasks.base.Task`).
    seed: the run's seed; dropout keys derive from it and the step.
    mesh: the device mesh.
    state_sharding, frozen_sharding: `NamedSharding` trees (or one sharding
      for all leaves) of the state and the frozen weights, which the step
      keeps; None: replicated. The batch is split over the mesh's data axes
      and the metrics are replicated.
    split: return a `TrainStep`, the gradient and the update as two programs
      (what the trainer runs); else one `jax.jit` (what `experiments.plan`
      compiles for a pod's memory).
  """

  def grad_fn(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(stream_key(seed, DROPOUT_STREAM), state.step)

    def loss_fn(trainable):
      params = method.assemble(trainable, frozen)
      out = task.forward(module, params, batch, deterministic=False, rngs={"dropout": rng})
      loss = task.loss(out, batch)
      pen = method.penalty(trainable)
      return loss + pen, (loss, pen)

    (total, (loss, pen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    return grads, {"loss": total, "task_loss": loss, "penalty": pen}

  def apply_fn(state: TrainState, grads, losses):
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.tree.norm(grads)
    # A nan/inf loss or gradient (a poisoned batch, a diverging rate) leaves the
    # parameters and optimizer state as they were; the step still counts, so
    # the data order, dropout and masks of later steps do not shift.
    finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    trainable = jax.tree.map(keep, trainable, state.trainable)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = {**losses, "grad_norm": grad_norm, "finite": finite}
    return TrainState(state.step + 1, trainable, opt_state), metrics

  def step_fn(state: TrainState, frozen, batch):
    return apply_fn(state, *grad_fn(state, frozen, batch))

  rep, data = replicated(mesh), data_sharded(mesh)
  state_sh = rep if state_sharding is None else state_sharding
  frozen_sh = rep if frozen_sharding is None else frozen_sharding
  if not split:
    return jax.jit(partitioning.under_mesh(mesh, step_fn), in_shardings=(state_sh, frozen_sh, data),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
  grads_sh = state_sh.trainable if isinstance(state_sh, TrainState) else state_sh
  grad = jax.jit(partitioning.under_mesh(mesh, grad_fn), in_shardings=(state_sh, frozen_sh, data),
                 out_shardings=(grads_sh, rep))
  apply = jax.jit(partitioning.under_mesh(mesh, apply_fn), in_shardings=(state_sh, grads_sh, rep),
                  out_shardings=(state_sh, rep), donate_argnums=(0,))
  return TrainStep(grad, apply)


def make_eval_step(module, method: methods_lib.Method, task: Any, *, mesh: Mesh,
                   trainable_sharding: Any = None, frozen_sharding: Any = None):
  """The jitted ``(trainable, frozen, batch) -> task.predict(...)`` step.

  A task scored on generated tokens defines ``generate(module, params,
  batch)``, which the step runs instead of ``forward`` and ``predict``. The
  predictions come back replicated, so every process can read them whole.
  """

  def eval_fn(trainable, frozen, batch):
    params = method.assemble(trainable, frozen)
    if hasattr(task, "generate"):
      return task.generate(module, params, batch)
    out = task.forward(module, params, batch, deterministic=True, rngs=None)
    return task.predict(out, batch)

  rep, data = replicated(mesh), data_sharded(mesh)
  trainable_sh = rep if trainable_sharding is None else trainable_sharding
  frozen_sh = rep if frozen_sharding is None else frozen_sharding
  return jax.jit(partitioning.under_mesh(mesh, eval_fn), in_shardings=(trainable_sh, frozen_sh, data),
                 out_shardings=rep)


class AheadOfTime:
  """A jitted step called through executables compiled per batch shape, some before they are needed.

  Padded batches come in a few shapes (length buckets), and each new shape
  costs a trace, a lowering and a compile (or a load from the persistent
  compilation cache) the first time it is met, with the step waiting.
  `prepare` hands the shapes a run will meet to one background thread,
  which builds their executables while the first steps run: tracing is
  Python, and a running step holds no Python lock. A call whose shape is
  not ready waits for the thread, or, if the thread has not started on it,
  compiles it on the spot.

  The arguments before the batch (state, frozen weights) keep the shapes,
  dtypes and shardings of those given here, arrays or `jax.ShapeDtypeStruct`s
  with shardings (`abstract_state`: the step compiles while the state is
  built); the first call checks its own against them and, should they
  differ, drops what was built and calls the jitted step. The batch is split
  over the mesh's data axes, as `partitioning.put_batch` places it. Where
  they hold sub-byte arrays (a 4-bit quantised base), the calls go through
  the jitted function itself: an executable compiled ahead of time wants
  those packed, and XLA:CPU places them unpacked.

  A `TrainStep` (``make_train_step(..., split=True)``) has its gradient
  program built per shape and its update program once, right after the
  first shape.

  Example::

    step = AheadOfTime(make_train_step(...), state, frozen, mesh=mesh)
    step.prepare(task.example_batches(batch_size, training=True))
    state, metrics = step(state, frozen, put_batch(batch, mesh))
  """

  def __init__(self, jitted: Any, *fixed: Any, mesh: Mesh):
    self._step = jitted
    self._split = isinstance(jitted, TrainStep)
    self._jitted = jitted.grad if self._split else jitted
    self._apply: concurrent.futures.Future | None = None  # a TrainStep's update program
    self._direct = any(jax.dtypes.itemsize_bits(x.dtype) < 8 for x in jax.tree.leaves(fixed))
    self._fixed = [jax.tree.map(_abstract, x) for x in fixed]
    self._sharding = data_sharded(mesh)
    self._checked = False
    self._futures: dict[tuple, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._queue: queue.SimpleQueue | None = None
    self._thread: threading.Thread | None = None

  def prepare(self, batches: Iterable[Mapping[str, Any]], *, after: AheadOfTime | None = None) -> None:
    """Starts compiling, in the background and in order, for the shapes of ``batches`` (numpy or arrays).

    ``after``: begin once the shapes ``after`` has queued so far are built
    (or dropped), so that two steps' compilations do not share the cores
    with each other as well as with the running steps; an eval step's
    shapes, needed only at the first evaluation, wait for the train step's.
    """
    if self._direct:
      return
    for batch in batches:
      key = _batch_key(batch)
      with self._lock:
        if key in self._futures:
          continue
        if self._queue is None:
          self._queue = queue.SimpleQueue()
          if after is not None:
            self._queue.put((_AFTER, after.pending()))
          # A daemon, should `close` never be called; `close` drops the shapes not begun.
          self._thread = threading.Thread(target=self._work, name="rmlora-compile", daemon=True)
          self._thread.start()
        self._futures[key] = future = concurrent.futures.Future()
        self._queue.put((key, future))
        if self._split and self._apply is None:
          self._apply = concurrent.futures.Future()
          self._queue.put((_APPLY, self._apply))

  def pending(self) -> list[concurrent.futures.Future]:
    """The futures of the shapes queued so far (done or not), and of a `TrainStep`'s update program."""
    with self._lock:
      return list(self._futures.values()) + ([self._apply] if self._apply is not None else [])

  def _work(self) -> None:
    while (item := self._queue.get()) is not None:
      key, future = item
      if key is _AFTER:
        concurrent.futures.wait(future)
        continue
      if future.set_running_or_notify_cancel():
        try:
          future.set_result(self._compile(key))
        except BaseException as err:  # pylint: disable=broad-except  # Raised where the step is called.
          future.set_exception(err)

  def __call__(self, *args: Any) -> Any:
    if not self._checked:
      self._checked = True
      if not self._direct and not _same_types(self._fixed, args[:-1]):
        # Built for other types (a weak type, a sharding): drop those executables
        # and call the jitted step, which compiles for what it is given.
        logging.warning("AheadOfTime: the step's arguments differ from those it was built for; "
                        "compiling on the spot instead")
        self.close()
        self._direct = True
    if self._direct:
      return self._step(*args)
    key = _batch_key(args[-1])
    with self._lock:
      future = self._futures.get(key)
      if future is None or future.cancel():  # Not queued, or queued and not begun: build it here.
        future = concurrent.futures.Future()
        future.set_result(self._compile(key))
        self._futures[key] = future
    out = future.result()(*args)
    if not self._split:
      return out
    with self._lock:
      future = self._apply
      if future is not None and future.cancel():  # queued and not begun: build it here
        future = None
    try:
      apply = None if future is None else future.result()
    except Exception:  # pylint: disable=broad-except  # failed on the thread: build it here, where its error shows
      apply = None
    if apply is None:  # not built ahead (or no gradient program was ready then): build it for these outputs
      apply = self._step.apply.lower(self._fixed[0], *out).compile()
      with self._lock:
        self._apply = concurrent.futures.Future()
        self._apply.set_result(apply)
    return apply(args[0], *out)

  def close(self) -> None:
    """Drops the compilations not begun and waits for the one running, if any, to end the thread.

    Waiting matters: a process that exits while XLA compiles on a daemon
    thread is aborted mid-compile (SIGABRT, after its results were written).
    """
    with self._lock:
      for future in [*self._futures.values(), self._apply]:
        if future is not None:
          future.cancel()
      if self._queue is not None:
        self._queue.put(None)
      thread = self._thread
    if thread is not None and thread is not threading.current_thread():
      thread.join()

  def _compile(self, key: Any) -> Any:
    if key is _APPLY:
      return self._compile_apply()
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding) for name, shape, dtype in key}
    return self._jitted.lower(*self._fixed, batch).compile()

  def _compile_apply(self) -> Any:
    """A `TrainStep`'s update program, for the outputs of a gradient program built; None if none is."""
    with self._lock:
      built = [f.result() for f in self._futures.values()
               if f.done() and not f.cancelled() and f.exception() is None]
    if not built:
      return None
    grads, losses = jax.tree.map(_abstract, built[0].out_info)
    return self._step.apply.lower(self._fixed[0], grads, losses).compile()


# Queue items of `AheadOfTime`: wait for these futures before the next shape;
# build a `TrainStep`'s update program.
_AFTER = object()
_APPLY = object()


def _same_types(built: list[Any], given: Sequence[Any]) -> bool:
  """Whether ``given`` (arrays) has the structure, shapes, dtypes, weak types and shardings of ``built``."""
  if len(built) != len(given):
    return False
  for want, have in zip(built, given):
    want_leaves, want_def = jax.tree.flatten(want)
    have_leaves, have_def = jax.tree.flatten(have)
    if want_def != have_def:
      return False
    for w, h in zip(want_leaves, have_leaves):
      if (w.shape != h.shape or w.dtype != h.dtype or w.weak_type != getattr(h, "weak_type", False)
          or not w.sharding.is_equivalent_to(h.sharding, len(w.shape))):
        return False
  return True


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  # Unlike `abstract_like` (checkpoint targets), this keeps weak types: a
  # compiled executable refuses arguments whose types differ from its own.
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=getattr(x, "weak_type", False))


def _batch_key(batch: Mapping[str, Any]) -> tuple:
  """(name, shape, dtype) of each entry, as the jitted step will see it (x64 off: int64 -> int32)."""
  out = []
  for name, v in sorted(batch.items()):
    dtype = v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype
    out.append((name, tuple(np.shape(v)), jax.dtypes.canonicalize_dtype(dtype)))
  return tuple(out)


def abstract_state(
    method: methods_lib.Method,
    tx: optax.GradientTransformation,
    params: Any,
    *,
    key: jax.Array,
    mesh: Mesh,
    param_specs: Any,
) -> tuple[TrainState, TrainState]:
  """What `init_state` makes, without making it: ``(state as jax.ShapeDtypeStructs, state_shardings)``.

  The structs carry the shardings (and weak types) the state will have, so
  the train step can be compiled (`AheadOfTime`) while the state is built.
  Arguments as `init_state`'s.
  """
  def init(key, params):
    trainable = method.init(key, params)
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))

  abstract = jax.eval_shape(init, key, params)
  trainable_sh = partitioning.named_shardings(
      abstract.trainable,
      partitioning.follow_specs(abstract.trainable, params, param_specs, where="trainable tree"), mesh)
  # Optimizer-state leaves that mirror a trainable leaf take its sharding
  # (`optax.tree_map_params`); counts and rank-sized statistics are replicated.
  shardings = TrainState(replicated(mesh), trainable_sh,
                         partitioning.optimizer_shardings(tx, abstract.trainable, trainable_sh, mesh))
  structs = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh, weak_type=a.weak_type),
                         abstract, shardings)
  return structs, shardings


def init_state(
    method: methods_lib.Method,
    tx: optax.GradientTransformation,
    params: Any,
    *,
    key: jax.Array,
    mesh: Mesh,
    param_specs: Any,
    shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
  """The initial state, placed sharded, and its shardings.

  The trainable tree follows the parameters it adapts or copies (see
  `partitioning.follow_specs`), the optimizer state follows the trainable
  tree, the step count is replicated. The optimizer state is created by one
  `jax.jit` with ``out_shardings``, so it never exists whole on one device.

  Args:
    method: the fine-tuning method.
    tx: its optimizer.
    params: the (sharded) model parameters.
    key: seeds the adapters' initialisation.
    mesh: the device mesh.
    param_specs: `partitioning.match_partition_rules(params, ...)`.
    shardings: what `abstract_state` returned for the same arguments, if
      called already (else worked out here).

  Returns:
    ``(state, state_shardings)``; the state's leaves are distinct buffers, so
    it can be donated.
  """
  if shardings is None:
    _, shardings = abstract_state(method, tx, params, key=key, mesh=mesh, param_specs=param_specs)
  # Eagerly, as on one device, so every mesh starts from bit-identical
  # adapters (a jitted init may fuse `std * normal` differently). What is new
  # here is rank-sized; copied leaves (a head, full_ft's params) are already
  # sharded parameters.
  trainable = jax.tree.map(_place, method.init(key, params), shardings.trainable)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
  step = partitioning.put_sharded(np.zeros((), np.int32), shardings.step)
  # An output may be an input passed through (a head leaf) or one buffer
  # twice (an optimizer state's zeros): copy so that donation is safe.
  state = jax.tree.map(jnp.copy, TrainState(step, trainable, opt_state))
  return jax.device_put(state, shardings), shardings


def _place(x: jax.Array, sharding) -> jax.Array:
  if x.sharding.is_equivalent_to(sharding, x.ndim):  # a parameter, already in place
    return x
  if x.is_fully_addressable:  # new on this process's default device
    return partitioning.put_sharded(x, sharding)
  return jax.device_put(x, sharding)


def abstract_like(tree: Any, sharding=None) -> Any:
  """`jax.ShapeDtypeStruct`s of ``tree`` carrying ``sharding``, for restoring into.

  ``sharding``: one sharding for every leaf, or None to keep each leaf's own.
  """
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def restack_saved(saved: Any, abstract_state: Any) -> Any:
  """``saved`` (a checkpoint's state as read back: dicts, lists, arrays) in the structure of ``abstract_state``.

  Each leaf of ``abstract_state`` is looked up in ``saved`` by its path. Where
  a dict entry at a stacked path (``model/layers/...``, `rmlora_jax.stacking`)
  is missing but ``saved`` holds its layers' entries (``model/layers_0/...``
  up to the leaf's leading axis), their values are stacked: a scanned
  model's per-layer adapters, and every optimizer statistic that mirrors
  them, become the stacked ones. The leaves are placed with
  ``abstract_state``'s shardings and dtypes.

  Raises:
    KeyError: a leaf found neither way.
  """

  def lookup(node, keys, shape):
    if not keys:
      return np.asarray(node)
    key, rest = keys[0], keys[1:]
    if isinstance(key, jax.tree_util.GetAttrKey):
      return lookup(node[key.name], rest, shape)
    if isinstance(key, jax.tree_util.SequenceKey):
      return lookup(node[key.idx], rest, shape)
    name = key.key
    if name in node:
      return lookup(node[name], rest, shape)
    layers = [stacking.layer_path(name, i) for i in range(shape[0])] if shape else []
    if not layers or layers[0] is None or any(layer not in node for layer in layers):
      raise KeyError(name)
    return np.stack([lookup(node[layer], rest, shape[1:]) for layer in layers])

  def place(path, leaf):
    value = lookup(saved, path, tuple(leaf.shape)).astype(leaf.dtype)
    if value.shape != tuple(leaf.shape):
      raise KeyError(jax.tree_util.keystr(path))
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(place, abstract_state)


class CheckpointError(ValueError):
  """A checkpoint could not be written; the message says what is left and how to resume.

  A `ValueError`, so command lines report it as one line (`rmlora_jax.cli`).
  """


class Checkpointer:
  """Orbax checkpoints of the train state plus a JSON side record.

  Orbax writes each step into a temporary folder and renames it only once
  complete, so a run killed mid-save leaves no checkpoint that looks whole:
  `latest_step` sees committed steps only.
  """

  def __init__(self, directory: str, *, keep: int = 2, create: bool = True):
    """``create=False``: read an existing folder (e.g. to export a run) without making one."""
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: TrainState, record: Mapping[str, Any]) -> None:
    """Starts saving ``state`` and ``record`` as ``step`` (asynchronously).

    Raises:
      CheckpointError: this save, or the previous one still in flight, failed
        (disk full, no permission); the last committed step stays intact.
    """
    try:
      self._mngr.save(
          step,
          # Saving is asynchronous: snapshot the record now, or entries appended
          # after this call could leak into this step's checkpoint.
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  record=ocp.args.JsonSave(json.loads(json.dumps(dict(record))))),
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from e

  def wait(self) -> None:
    """Blocks until the save in flight is committed; `CheckpointError` if it failed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(None, e) from e

  def _failed(self, step: int | None, error: Exception) -> "CheckpointError":
    try:
      latest = self._mngr.latest_step()
    except Exception:  # pylint: disable=broad-except
      latest = None
    kept = f"the last complete checkpoint is step {latest}" if latest else "no complete checkpoint exists yet"
    what = f"step {step}" if step is not None else "a checkpoint"
    return CheckpointError(
        f"saving {what} to {str(self.directory)!r} failed ({type(error).__name__}: {error}); {kept}: "
        f"free space or fix the folder, then run the same command to resume")

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The train state and side record of ``step``, restored into ``abstract_state``'s shapes and shardings.

    A checkpoint that holds a scanned model's adapters per layer
    (``.../layers_{i}/...``, as AdaLoRA and LoRA² stored them before they
    were stacked) where the run stores them stacked over the layers is
    restored stacked (`restack_saved`), optimizer statistics included.

    Raises:
      ValueError: the checkpoint's state is laid out otherwise than
        ``abstract_state`` in another way (other entries); the message names
        the entries that differ.
    """
    try:
      out = self._mngr.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()),
      )
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      try:
        state = restack_saved(self.state_tree(step), abstract_state)
      except KeyError:
        pass  # not a layout that stacking explains: refused below
      else:
        logging.warning("the checkpoint of step %d held a scanned model's adapters per layer: restored them "
                        "stacked over the layers, as this run stores them", step)
        return state, self.record(step)
      # Orbax lists each differing entry as an unindented "path:" line.
      entries = [line[:-1] for line in str(e).splitlines()[1:] if line.endswith(":") and not line[:1].isspace()]
      shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
      raise ValueError(
          f"the checkpoint of step {step} in {str(self.directory)!r} holds a train state laid out otherwise than "
          f"this run's (entries {shown} differ): was it written by another version of rmlora_jax? Resume it "
          f"with the version that wrote it, or start in a new workdir") from None
    return TrainState(*out.state), dict(out.record)

  def state_tree(self, step: int) -> dict[str, Any]:
    """The train state of ``step`` as saved (a dict of arrays), without an abstract state to restore into."""
    return self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state

  def record(self, step: int) -> dict[str, Any]:
    """The JSON side record of ``step`` alone (cheap; no arrays are read)."""
    out = self._mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out.record)

  def close(self) -> None:
    """Waits for the save in flight (`CheckpointError` if it failed) and closes."""
    try:
      self.wait()
    finally:
      self._mngr.close()
