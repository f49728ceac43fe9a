"""One training loop for every task: steps, checkpoints and exact resume, logs, results, plots.

`train_and_evaluate` trains a method (`rmlora_jax.methods`) on any task
(`rmlora_jax.tasks.base.Task`) with the jitted, sharded steps of
`rmlora_jax.training`. It resumes from the latest checkpoint in ``workdir``
when there is one (refusing one written under other settings), skips and
counts non-finite steps, evaluates every ``eval_every_steps``, and writes
``results.json``, TensorBoard scalars and PNG plots (process 0 only).

Example::

  results = trainer.train_and_evaluate(
      task, module, params, MethodSettings(name="rm_lora", spec=spec),
      TrainerSettings(batch_size=32, num_epochs=3, learning_rate=1e-3), workdir="runs/mine")
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from rmlora_jax import accounting
from rmlora_jax import analysis
from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import quantize
from rmlora_jax import training
from rmlora_jax.adapters import registry
from rmlora_jax.tasks import base as tasks_base

@dataclasses.dataclass(frozen=True, kw_only=True)
class Hooks:
  """Callbacks of `train_and_evaluate`; each is optional and runs on every process.

  A task extends the loop through these rather than around it: what a hook
  adds to ``history`` is saved in every checkpoint (so it survives a
  resume) and reaches results.json; what ``at_end`` returns is what
  results.json holds.

  Example (a spectrum of every adapter at each evaluation)::

    def spectra(step, trainable, metrics, history):
      history.setdefault("spectra", []).append({"step": step, **my_measures(partitioning.gather(trainable))})

    trainer.train_and_evaluate(..., hooks=trainer.Hooks(after_eval=spectra))
  """

  # ``(step, state, metrics)`` after step ``step`` (1-based) is done, logged,
  # evaluated and checkpointed; ``metrics`` are the step's device values.
  after_step: Callable[[int, training.TrainState, Mapping[str, Any]], None] | None = None
  # ``(step, trainable, metrics, history)`` after each evaluation (``trainable``
  # as sharded in training: `partitioning.gather` it for host arrays); may add
  # entries to the ``history`` dict.
  after_eval: Callable[[int, Any, Mapping[str, float], dict], None] | None = None
  # ``(step, state)`` after each checkpoint is saved.
  after_checkpoint: Callable[[int, training.TrainState], None] | None = None
  # ``(results, trainable) -> results`` before results.json is written (and
  # the plots drawn); ``trainable`` is gathered whole.
  at_end: Callable[[dict, Any], dict] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerSettings:
  """How long and how a run trains, logs and saves; the method's own settings are separate."""

  # Seeds the adapters' initialisation, the data order and dropout.
  seed: int = 0
  # Global batch size (all processes together): examples per optimizer step.
  batch_size: int = 32
  # Micro-batches per optimizer step (gradient accumulation): each of
  # batch_size / accumulate_steps examples; their gradients are averaged
  # (optax.MultiSteps), so the method's step counts (RM-LoRA's draws, the
  # budget schedules, the learning rate) advance once per optimizer step.
  accumulate_steps: int = 1
  num_epochs: int = 3
  # > 0: this many steps instead of num_epochs' worth.
  max_steps: int = -1
  # The peak learning rate.
  learning_rate: float = 1e-3
  # Linear warm-up over this share of the steps, then linear decay to 0.
  warmup_ratio: float = 0.06
  log_every_steps: int = 10
  # <= 0: at the end of each epoch.
  eval_every_steps: int = -1
  checkpoint_every_steps: int = 100
  keep_checkpoints: int = 2
  # This many non-finite steps in a row stop the run (its checkpoint intact).
  max_nonfinite_steps: int = 10
  # A tqdm progress bar on process 0.
  progress: bool = True
  # The settings that decide the run's numbers, stored in its checkpoints; a
  # resume under different ones is refused.
  fingerprint: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ("batch_size", "accumulate_steps", "num_epochs", "log_every_steps", "checkpoint_every_steps",
                 "keep_checkpoints", "max_nonfinite_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainerSettings.{name} must be a positive integer, got {value!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"TrainerSettings.seed must be a non-negative integer, got {self.seed!r}")
    if self.max_steps == 0 or self.max_steps < -1:
      raise ValueError(f"TrainerSettings.max_steps must be -1 (from num_epochs) or positive, got {self.max_steps}")
    if not 0 <= self.warmup_ratio <= 1:
      raise ValueError(f"TrainerSettings.warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"TrainerSettings.learning_rate must be positive, got {self.learning_rate!r}")
    if self.batch_size % self.accumulate_steps:
      raise ValueError(f"TrainerSettings.batch_size={self.batch_size} is not a multiple of "
                       f"TrainerSettings.accumulate_steps={self.accumulate_steps}")

  @property
  def micro_batch_size(self) -> int:
    """Examples per micro-batch: ``batch_size / accumulate_steps``."""
    return self.batch_size // self.accumulate_steps

  def total_steps(self, steps_per_epoch: int) -> int:
    """``max_steps`` when set, else ``num_epochs`` epochs: optimizer steps.

    ``steps_per_epoch`` counts micro-batches (batches when not accumulating);
    an epoch's last incomplete optimizer step carries over into the next.
    """
    if self.max_steps > 0:
      return self.max_steps
    return max(steps_per_epoch * self.num_epochs // self.accumulate_steps, 1)


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warm-up to ``peak``, then linear decay to zero."""
  warmup = int(round(warmup_ratio * total_steps))
  if warmup == 0:
    return optax.linear_schedule(peak, 0.0, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))],
      [warmup],
  )


def check_resumable(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> None:
  """Refuses to continue a checkpoint written under different settings."""
  if saved is None or saved == current:
    return
  diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:8])
  raise ValueError(
      f"{where} holds a run with other settings ({shown}); use a new workdir, "
      f"or the original settings to resume it"
  )


class NonFiniteGuard:
  """Counts skipped (non-finite) steps and stops the run after too many in a row.

  The train step never applies a non-finite update (see
  `training.make_train_step`), so every checkpoint holds finite parameters.
  Each step's flag is read one step late, when the next step is already
  queued, so counting costs no pipeline stall.
  """

  def __init__(self, limit: int, *, total: int = 0):
    self.limit = limit
    self.in_a_row = 0
    self.total = total  # skipped steps of the whole run, before a resume too
    self._pending: tuple[int, Any] | None = None

  def observe(self, step: int, finite: jax.Array, ckpt: training.Checkpointer) -> None:
    previous, self._pending = self._pending, (step, finite)
    if previous is not None:
      self._count(*previous, ckpt)

  def flush(self, ckpt: training.Checkpointer) -> None:
    """Counts the step still pending (waits for it); before a checkpoint and at the end."""
    if self._pending is not None:
      self._count(*self._pending, ckpt)
      self._pending = None

  def _count(self, step: int, finite: jax.Array, ckpt: training.Checkpointer) -> None:
    if bool(finite):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("step %d: loss or gradient is not finite; the update was skipped (%d in a row, %d in all)",
                    step, self.in_a_row, self.total)
    if self.in_a_row >= self.limit:
      ckpt.wait()
      latest = ckpt.latest_step()
      kept = f"the last checkpoint (step {latest}) is intact" if latest else "no checkpoint was written"
      raise ValueError(
          f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
          f"(TrainerSettings.max_nonfinite_steps={self.limit}); {kept}. Lower the learning rate or "
          f"check the data, then run again (the same settings resume)")


def train_and_evaluate(
    task: tasks_base.Task,
    module: Any,
    params: Any,
    method: methods_lib.MethodSettings,
    settings: TrainerSettings,
    workdir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    param_specs: Any = None,
    extra_results: Mapping[str, Any] | None = None,
    init_trainable: Callable[[Any], Any] | None = None,
    hooks: Hooks | None = None,
) -> dict[str, Any]:
  """Trains ``method`` on ``task`` (or resumes it) and returns the results dict.

  Args:
    task: what to train on (`rmlora_jax.tasks.base.Task`).
    module: the Flax module, run through ``task.forward``.
    params: its parameters (host or device arrays); placed by ``param_specs``.
      Kernels may be quantised (`rmlora_jax.quantize.quantize_base`): the
      method then trains over them, and results.json gets ``"quantize"``,
      the frozen base's and all parameters' bytes before and after.
    method: the method's settings; ``total_steps`` is filled in here.
    settings: steps, learning rate, logging and checkpointing.
    workdir: checkpoints, results.json, TensorBoard scalars and plots go here.
    mesh: the device mesh; None: every device on the data axis.
    param_specs: `PartitionSpec`s of ``params`` (`partitioning.match_partition_rules`);
      None: replicated.
    extra_results: merged into results.json (the model's name, the config).
    init_trainable: ``trainable -> trainable`` applied to the method's fresh
      initialisation, e.g. adapters read from a PEFT folder
      (`rmlora_jax.peft_format.start_from`); a resumed run restores its own.
    hooks: callbacks after steps, evaluations, checkpoints and at the end (`Hooks`).

  Returns:
    The results dict, as written to ``workdir/results.json``: final and best
    metrics, parameter counts, ranks, adapters' spectra summary, history.
  """
  workdir = pathlib.Path(workdir)
  hooks = hooks or Hooks()
  mesh = mesh if mesh is not None else partitioning.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  partitioning.check_batch_size(settings.micro_batch_size, mesh)
  k = settings.accumulate_steps
  primary = jax.process_index() == 0
  if param_specs is None:
    param_specs = jax.tree.map(lambda _: P(), params)
  params = partitioning.put_sharded(params, partitioning.named_shardings(params, param_specs, mesh))
  steps_per_epoch = task.num_train_batches(settings.micro_batch_size)  # micro-batches
  total_steps = settings.total_steps(steps_per_epoch)  # optimizer steps
  method = methods_lib.make_method(dataclasses.replace(method, total_steps=total_steps))
  quantized = quantize.has_quantized(params)
  if quantized:  # the adapters are initialised from the quantised kernels' shapes
    method = quantize.for_quantized_base(method)
  if init_trainable is not None:
    method = dataclasses.replace(method, init=lambda key, p, init=method.init: init_trainable(init(key, p)))
  tx = method.optimizer(lr_schedule(settings.learning_rate, total_steps, settings.warmup_ratio))
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  init_key = training.stream_key(settings.seed, training.INIT_STREAM)
  abstract, state_sh = training.abstract_state(method, tx, params, key=init_key, mesh=mesh, param_specs=param_specs)
  frozen = method.frozen(params)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  fingerprint = json.loads(json.dumps(dict(settings.fingerprint)))
  ckpt = training.Checkpointer(str(workdir / "checkpoints"), keep=settings.keep_checkpoints)
  start = ckpt.latest_step() or 0

  train_step = training.make_train_step(module, method, tx, task, seed=settings.seed, mesh=mesh,
                                        state_sharding=state_sh, frozen_sharding=frozen_sh, split=True)
  eval_step = training.make_eval_step(module, method, task, mesh=mesh, trainable_sharding=state_sh.trainable,
                                      frozen_sharding=frozen_sh)
  put = lambda batch: partitioning.put_batch(batch, mesh)
  # Tasks that know their padded shapes get those steps compiled in the
  # background (training.AheadOfTime) from here on, while the state is built
  # and the first steps run.
  examples = getattr(task, "example_batches", None)
  if examples is not None:
    train_step = training.AheadOfTime(train_step, abstract, frozen, mesh=mesh)
    eval_step = training.AheadOfTime(eval_step, abstract.trainable, frozen, mesh=mesh)
    first_epoch, first_index = divmod(start * k, steps_per_epoch)  # where this run's batches begin
    train_step.prepare(examples(settings.micro_batch_size, training=True, seed=settings.seed,
                                epoch=first_epoch, start=first_index))
    eval_step.prepare(examples(settings.batch_size, training=False), after=train_step)

  history: dict[str, list] = {"train": [], "eval": []}
  train_time = 0.0
  skipped_before = 0
  footprint = None
  try:
    state, _ = training.init_state(method, tx, params, key=init_key, mesh=mesh, param_specs=param_specs,
                                   shardings=state_sh)
    if quantized:
      footprint = quantize.footprint(frozen, state.trainable,
                                     exclude=methods_lib.head_paths(params, method.settings.train_patterns))
      # Warning level, as "resumed from": the command lines log warnings only.
      logging.warning("frozen base quantised (%s, %s, %d kernels): %.2f MiB -> %.2f MiB; all parameters "
                      "%.2f MiB -> %.2f MiB", footprint["format"], footprint["scales"], footprint["kernels"],
                      *(footprint[k] / 2**20 for k in ("base_bytes_before", "base_bytes_after",
                                                        "param_bytes_before", "param_bytes_after")))
    del params
    if start:
      # Compare settings before reading the state, whose structure may not even fit.
      check_resumable(ckpt.record(start).get("run_config"), fingerprint, str(workdir / "checkpoints"))
      state, record = ckpt.restore(start, training.abstract_like(state))
      history, train_time = record["history"], record["train_time_s"]
      skipped_before = int(record.get("nonfinite_steps", 0))
      logging.warning("resumed from step %d in %s", start, workdir / "checkpoints")
  except BaseException:
    for step_fn in (train_step, eval_step):  # no compile left running behind the error
      if isinstance(step_fn, training.AheadOfTime):
        step_fn.close()
    raise

  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  writer = SummaryWriter(str(workdir / "tensorboard")) if primary else None
  bar = tqdm(total=total_steps, initial=start, desc=f"{task.name} {method.settings.name}",
             disable=not (settings.progress and primary), dynamic_ncols=True, unit="step")
  eval_every = settings.eval_every_steps if settings.eval_every_steps > 0 else max(steps_per_epoch // k, 1)
  batches = None
  nonfinite = NonFiniteGuard(settings.max_nonfinite_steps, total=skipped_before)
  tick = time.perf_counter()
  try:
    for step in range(start, total_steps):
      done = step + 1
      micro_metrics = []
      for micro in range(step * k, done * k):  # one optimizer step: k micro-batches
        epoch, index = divmod(micro, steps_per_epoch)
        if batches is None or index == 0:
          batches = task.train_batches(settings.micro_batch_size, seed=settings.seed, epoch=epoch, start=index)
        state, m = train_step(state, frozen, put(next(batches)))
        nonfinite.observe(done, m["finite"], ckpt)
        micro_metrics.append(m)
      if done % settings.log_every_steps == 0 or done == total_steps:
        # Over the optimizer step's micro-batches: their mean (the loss the step's gradient is of).
        m = {name: float(np.mean([float(mm[name]) for mm in micro_metrics])) for name in m if name != "finite"}
        history["train"].append({"step": done, **m})
        _add_scalars(writer, "train", m, done)
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
      if done % eval_every == 0 or done == total_steps:
        ev = task.evaluate(lambda batch: eval_step(state.trainable, frozen, put(batch)), settings.batch_size)
        history["eval"].append({"step": done, **ev})
        # The total rank as training prunes it (AdaLoRA, LoRA²) or gates it off (SoRA).
        adapters = method.adapters(state.trainable)
        if adapters:
          now = method.ranks({"adapters": partitioning.gather(adapters)})
          history.setdefault("rank", []).append({"step": done, "total_rank": int(sum(now.values()))})
        _add_scalars(writer, "eval", ev, done)
        if primary:
          bar.write(f"step {done}/{total_steps} eval " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if hooks.after_eval is not None:
          hooks.after_eval(done, state.trainable, ev, history)
      bar.update(1)
      if done % settings.checkpoint_every_steps == 0 or done == total_steps:
        now = time.perf_counter()
        train_time, tick = train_time + now - tick, now
        nonfinite.flush(ckpt)  # the count saved below includes this step
        ckpt.save(done, state, {"history": history, "train_time_s": train_time,
                                "nonfinite_steps": nonfinite.total, "run_config": fingerprint})
        if hooks.after_checkpoint is not None:
          hooks.after_checkpoint(done, state)
      if hooks.after_step is not None:
        hooks.after_step(done, state, m)
  except BaseException:
    # An exception (a data error, Ctrl-C) leaves the loop: let the checkpoint
    # save in flight finish, so the run resumes from it, then re-raise.
    for step_fn in (train_step, eval_step):
      if isinstance(step_fn, training.AheadOfTime):
        step_fn.close()
    try:
      ckpt.close()
    except training.CheckpointError as e:
      logging.error("the checkpoint save in flight failed as well: %s", e)
    raise
  nonfinite.flush(ckpt)
  for step_fn in (train_step, eval_step):
    if isinstance(step_fn, training.AheadOfTime):
      step_fn.close()
  bar.close()
  if writer is not None:
    writer.close()
  ckpt.close()

  trainable = partitioning.gather(state.trainable)  # whole, on every process
  results = _results(task, method, settings, trainable, history, train_time, total_steps)
  results["nonfinite_steps"] = nonfinite.total
  if footprint is not None:
    results["quantize"] = footprint
  if k > 1:
    results["accumulate_steps"] = k
  results.update(extra_results or {})
  if hooks.at_end is not None:
    results = hooks.at_end(results, trainable)
  if primary:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plots(workdir, history, method, trainable, task.name)
  return results


def _add_scalars(writer, prefix: str, scalars: Mapping[str, float], step: int) -> None:
  if writer is not None:
    for k, v in scalars.items():
      writer.add_scalar(f"{prefix}/{k}", v, step)


def _results(task, method, settings, trainable, history, train_time, steps) -> dict[str, Any]:
  adapters = method.adapters(trainable)
  # Factors, not dense dW: each spectrum from rank-sized QRs (analysis.factored_singular_values).
  deltas = registry.delta_factors(adapters, method.settings.spec) if adapters else {}
  counts = accounting.param_counts(trainable)
  evals = history["eval"]
  ranks = {k: int(v) for k, v in method.ranks(trainable).items()}
  spec = method.settings.spec
  initial_rank = 0 if spec is None else spec.rank
  return {
      "task": task.name,
      "method": method.settings.name,
      "seed": settings.seed,
      "metrics": {k: v for k, v in (evals or [{}])[-1].items() if k != "step"},
      "main_metric": task.main_metric,
      # GLUE papers report the best dev score over evaluations; "metrics" is the final one.
      "final": dict((evals or [{}])[-1]),
      "best": dict(max(evals, key=lambda h: h[task.main_metric])) if evals else {},
      "trainable_params": counts.trainable,
      "inference_params": counts.inference,
      # Each adapter's rank now (pruned or gated directions not counted), and
      # the totals over adapters at the start and the end: the papers' "# Rank".
      "ranks": ranks,
      "total_rank": {"initial": initial_rank * len(adapters), "final": sum(ranks.values())},
      "steps": int(steps),
      "train_time_s": round(float(train_time), 2),
      "learning_rate": settings.learning_rate,
      "adapters": analysis.delta_report(deltas),
      "history": history,
  }


def _plots(workdir: pathlib.Path, history, method, trainable, task_name: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ranks = history.get("rank", [])
  pruned = len({h["total_rank"] for h in ranks}) > 1
  fig, axes = plt.subplots(1, 3 if pruned else 2, figsize=(15 if pruned else 10, 4))
  ax1, ax2 = axes[:2]
  tr = history["train"]
  ax1.plot([h["step"] for h in tr], [h["task_loss"] for h in tr], label="task loss")
  if any(h["penalty"] for h in tr):
    ax1.plot([h["step"] for h in tr], [h["penalty"] for h in tr], label="ortho penalty (weighted)")
  ax1.set_xlabel("step")
  ax1.set_title("training")
  ax1.legend()
  ev = history["eval"]
  for key in sorted({k for h in ev for k in h if k != "step"}):
    ax2.plot([h["step"] for h in ev], [h.get(key, np.nan) for h in ev], marker="o", label=key)
  ax2.set_xlabel("step")
  ax2.set_title(f"{task_name} evaluation")
  ax2.legend()
  if pruned:
    axes[2].plot([h["step"] for h in ranks], [h["total_rank"] for h in ranks], marker="o")
    axes[2].set_xlabel("step")
    axes[2].set_title("total rank (nonzero gates / singular values)")
  fig.tight_layout()
  fig.savefig(workdir / "curves.png", dpi=110)
  plt.close(fig)

  adapters = method.adapters(trainable)
  if not adapters:
    return
  spec = method.settings.spec
  rank = spec.rank
  deltas = registry.delta_factors(adapters, spec)
  kinds = sorted({re.sub(r"layer_\d+/", "", p) for p in deltas})
  cols = min(3, len(kinds))
  rows = -(-len(kinds) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, kind in zip(axes.flat, kinds):
    for path, dw in deltas.items():
      if re.sub(r"layer_\d+/", "", path) == kind:
        s = analysis.delta_singular_values(dw)
        layer = re.search(r"layer_(\d+)", path)
        ax.semilogy(np.arange(1, len(s) + 1)[: 4 * rank], np.maximum(s[: 4 * rank], 1e-12),
                    marker=".", label=f"layer {layer.group(1)}" if layer else path)
    ax.set_title(kind.replace("encoder/", "").replace("/kernel", ""), fontsize=9)
    ax.set_xlabel("index")
    ax.axvline(rank, color="grey", lw=0.5, ls="--")
  for ax in list(axes.flat)[len(kinds):]:
    ax.axis("off")
  axes.flat[0].set_ylabel("singular value of dW")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("singular value spectra of dW (dashed: the LoRA rank)")
  fig.tight_layout()
  fig.savefig(workdir / "spectra.png", dpi=110)
  plt.close(fig)
