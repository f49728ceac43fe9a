"""The GLUE experiment: data, method, jitted sharded steps, checkpoints, results.

`train_and_evaluate(config, workdir)` is the whole run. It validates the
config before loading or compiling anything, resumes from the latest
checkpoint in ``workdir`` when there is one, and writes ``results.json``,
TensorBoard scalars and PNG plots there.

It runs on one device or many, in one process or several (``config.mesh``,
``config.distributed``; docs/SCALING.md): parameters are placed sharded by the
model's partition rules, each process feeds its own rows of every global
batch, orbax saves and restores across processes, and only process 0 writes
results, scalars and plots.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rmlora_jax.adapters import adalora as adalora_lib
from rmlora_jax import analysis
from rmlora_jax import accounting
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.adapters import lora2 as lora2_lib
from rmlora_jax import methods as methods_lib
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty as penalty_lib
from rmlora_jax import metrics as metrics_lib
from rmlora_jax import partitioning
from rmlora_jax import training
from rmlora_jax.data import glue
from rmlora_jax.models import hub

# Trained alongside the adapters whatever the model: its classifier, plus every
# parameter the checkpoint lacked (a new pooler, for DeBERTa).
HEAD_PATTERNS = (r"classifier/.*",)
DEFAULT_LEARNING_RATES = {"full_ft": 1e-5}  # Table 3; every other method 1e-3
ADAPTER_LEARNING_RATE = 1e-3


def learning_rate(config: ml_collections.ConfigDict) -> float:
  """The configured learning rate, or Table 3's for the method when unset (<= 0)."""
  if config.learning_rate > 0:
    return float(config.learning_rate)
  return DEFAULT_LEARNING_RATES.get(config.method, ADAPTER_LEARNING_RATE)


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> glue.GlueTask:
  """Fails fast, before any loading or compilation, on bad settings."""
  methods_lib.check_available(config.method)
  task = glue.get_task(config.task)
  check_finite_floats(config)
  positive = {"batch_size": config.batch_size, "max_seq_len": config.max_seq_len,
              "num_epochs": config.num_epochs, "lora.rank": config.lora.rank,
              "checkpoint_every_steps": config.checkpoint_every_steps,
              "log_every_steps": config.log_every_steps}
  for name, value in positive.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
  if config.max_steps == 0 or config.max_steps < -1:
    raise ValueError(f"config.max_steps must be -1 (from num_epochs) or positive, got {config.max_steps}")
  if config.method in ("gm_lora", "rm_lora") and not 1 <= config.rm.num_directions <= config.lora.rank:
    raise ValueError(
        f"config.rm.num_directions={config.rm.num_directions} must be in 1..config.lora.rank={config.lora.rank}"
    )
  if config.rm.mask_mode not in methods_lib.MASK_MODES:
    raise ValueError(f"config.rm.mask_mode must be one of {methods_lib.MASK_MODES}, got {config.rm.mask_mode!r}")
  data_dir = glue.resolve_data_source(config.data.dir)
  if data_dir is not None and not os.path.isdir(data_dir):
    source = "config.data.dir" if config.data.dir else "$GLUE_DIR"
    raise ValueError(f"{source}={data_dir!r} is not a directory (expected the GLUE layout, e.g. RTE/train.tsv)")
  if config.head_bias not in ("label_mean", "zero"):
    raise ValueError(f"config.head_bias must be 'label_mean' or 'zero', got {config.head_bias!r}")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
  _validate_method_fields(config)
  return task


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def adalora_budget(adalora: ml_collections.ConfigDict, rank: int) -> dict[str, Any]:
  """``config.adalora`` as a dict with its ranks resolved: unset (<= 0) means 2R -> R."""
  out = adalora.to_dict()
  out["init_rank"], out["target_rank"] = adalora_lib.budget_ranks(rank, out["init_rank"], out["target_rank"])
  return out


def check_finite_floats(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every float setting must be a finite number (``nan`` and ``inf`` are refused).

  Raises:
    ValueError: naming the first non-finite field, e.g. ``config.learning_rate=nan``.
  """
  for key, value in config.items():
    where = f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):
      check_finite_floats(value, where)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{where}={value!r} is not a finite number; give a real value")


def default_workdir(config: ml_collections.ConfigDict, method: str | None = None) -> str:
  """``runs/<task>_<method>_<model>_s<seed>``: where a run without ``config.workdir`` writes.

  The model part is the last component of ``config.model.name_or_path``
  (``minilm-l6``, ``deberta-v3-base``), so the same command maps to the same
  folder and, run again, resumes it.
  """
  model = re.sub(r"[^A-Za-z0-9._-]+", "-", pathlib.PurePath(str(config.model.name_or_path)).name or "model")
  return os.path.join("runs", f"{config.task}_{method or config.method}_{model}_s{config.seed}")


def resolve_workdir(config: ml_collections.ConfigDict, workdir: str | None, method: str | None = None) -> pathlib.Path:
  """``workdir``, or `default_workdir` when empty; created, and checked writable.

  Raises:
    ValueError: the folder cannot be created or written (naming it and why).
  """
  chosen = workdir or default_workdir(config, method)
  if not workdir and jax.process_index() == 0:
    print(f"workdir: {chosen} (config.workdir was empty; run the same command again to resume)",
          file=sys.stderr, flush=True)
  path = pathlib.Path(chosen)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"config.workdir={chosen!r} cannot be written ({e.strerror or e}); "
                     f"choose a folder you can write to") from e
  return path


def _validate_method_fields(config: ml_collections.ConfigDict) -> None:
  """The method, optimizer and checkpoint settings that would otherwise fail late."""
  if not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"config.seed must be a non-negative integer, got {config.seed!r}")
  if config.lora.apply not in methods_lib.ADAPTER_APPLY:
    raise ValueError(f"config.lora.apply must be one of {methods_lib.ADAPTER_APPLY}, got {config.lora.apply!r}")
  penalty_lib.check_reduction(config.rm.ortho_reduction, where="config.rm.ortho_reduction")
  for name in ("rm.ortho_weight", "adalora.ortho_weight", "lora2.ortho_weight", "optim.weight_decay", "sora.xi"):
    value = config[name.split(".")[0]][name.split(".")[1]]
    if not value >= 0:
      raise ValueError(f"config.{name} must be >= 0, got {value!r}")
  if not 0 <= config.optim.warmup_ratio <= 1:
    raise ValueError(f"config.optim.warmup_ratio must be in [0, 1], got {config.optim.warmup_ratio!r}")
  for name, value in (("rm.mask_period", config.rm.mask_period), ("keep_checkpoints", config.keep_checkpoints)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
  ranges = {"lora.init_std": (0.0, None), "adalora.t_init_ratio": (0.0, 1.0), "adalora.t_final_ratio": (0.0, 1.0),
            "lora2.t_init_ratio": (0.0, 1.0), "lora2.t_final_ratio": (0.0, 1.0),
            "adalora.beta1": (0.0, 1.0), "adalora.beta2": (0.0, 1.0),
            "lora2.beta1": (0.0, 1.0), "lora2.beta2": (0.0, 1.0)}
  for name, (low, high) in ranges.items():
    value = _get(config, name)
    if (low is not None and value < low) or (high is not None and value > high):
      raise ValueError(f"config.{name} must be in [{low}, {high}], got {value!r}")
  if not isinstance(config.optim.max_nonfinite_steps, int) or config.optim.max_nonfinite_steps < 1:
    raise ValueError(f"config.optim.max_nonfinite_steps must be a positive integer, "
                     f"got {config.optim.max_nonfinite_steps!r}")
  paths_lib.compile_patterns(tuple(config.lora.targets), where="config.lora.targets")
  paths_lib.compile_patterns(tuple(config.lora.train_patterns), where="config.lora.train_patterns")
  ada = adalora_budget(config.adalora, config.lora.rank)
  budgets = {"adalora": (ada["target_rank"], ada["init_rank"], "config.adalora.init_rank"),
             "lora2": (config.lora2.target_rank, config.lora2.r, "config.lora2.r")}
  if config.method in budgets:
    target, initial, initial_name = budgets[config.method]
    if not 1 <= target <= initial:
      raise ValueError(f"config.{config.method}.target_rank={target} must be in 1..{initial_name}={initial}")


# Settings that may change between a run and its resumption: where and how it
# runs and reports, not what it computes.
_RESUMABLE_CHANGES = ("workdir", "progress", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                      "keep_checkpoints", "mesh", "distributed", "data.dir", "data.hub_name",
                      "optim.max_nonfinite_steps")


def run_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flattened settings that decide a run's numbers (stored in its checkpoints)."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if any(name == r or name.startswith(r + ".") for r in _RESUMABLE_CHANGES):
        continue
      if isinstance(value, dict):
        walk(value, name + ".")
      else:
        flat[name] = list(value) if isinstance(value, tuple) else value

  walk(config.to_dict(), "")
  return json.loads(json.dumps(flat))


def check_resumable(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
  """Refuses to continue a checkpoint written under different settings."""
  if saved is None or saved == current:
    return
  diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:8])
  raise ValueError(
      f"{where} holds a run with other settings ({shown}); use a new config.workdir, "
      f"or the original settings to resume it"
  )


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Starts `jax.distributed` when ``config.distributed`` or the environment asks for it.

  Each setting falls back to an environment variable: the coordinator's
  ``host:port`` to ``$JAX_COORDINATOR_ADDRESS``, the process count and id to
  ``$JAX_NUM_PROCESSES`` and ``$JAX_PROCESS_ID``. With
  ``config.distributed.initialize`` and nothing else set, JAX detects them
  itself (TPU pods, SLURM, Open MPI). Must run before JAX touches a device.
  """
  d = config.distributed
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = d.num_processes if d.num_processes > 0 else int(os.environ.get("JAX_NUM_PROCESSES", -1))
  process_id = d.process_id if d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
  if not (d.initialize or address) or jax.distributed.is_initialized():
    return
  kwargs = {"coordinator_address": address or None,
            "num_processes": num_processes if num_processes > 0 else None,
            "process_id": process_id if process_id >= 0 else None}
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  logging.info("jax.distributed: process %d of %d, %d local and %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def method_settings(config, report, hf_config, total_steps: int) -> methods_lib.MethodSettings:
  """The method's settings from the config and what the loader had to initialise."""
  spec = None
  if config.method != "full_ft":
    targets = tuple(config.lora.targets) or hub.default_lora_targets(hf_config)
    common = dict(alpha=config.lora.alpha, targets=targets, init_std=config.lora.init_std)
    if config.method == "lora2":
      spec = lora2_lib.Lora2Spec(k=config.lora2.k, r=config.lora2.r, **common)
    else:
      ada_rank = adalora_budget(config.adalora, config.lora.rank)["init_rank"]
      rank = {"adalora": ada_rank, "sora": config.sora.init_rank}.get(config.method, config.lora.rank)
      spec = lora_lib.LoraSpec(rank=rank, **common)
  head = tuple(HEAD_PATTERNS) + tuple(re.escape(p) for p in report.missing) + tuple(config.lora.train_patterns)
  return methods_lib.MethodSettings(
      name=config.method, spec=spec, train_patterns=tuple(dict.fromkeys(head)),
      num_directions=config.rm.num_directions, ortho_weight=config.rm.ortho_weight,
      ortho_squared=config.rm.ortho_squared, ortho_reduction=config.rm.ortho_reduction,
      mask_mode=config.rm.mask_mode, mask_period=config.rm.mask_period, seed=config.seed,
      total_steps=total_steps,
      adapter_apply="merge" if config.method == "full_ft" else config.lora.apply,
      extra={"adalora": adalora_budget(config.adalora, config.lora.rank), "sora": config.sora.to_dict(),
             "lora2": config.lora2.to_dict()},
  )


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warm-up to ``peak``, then linear decay to zero."""
  warmup = int(round(warmup_ratio * total_steps))
  if warmup == 0:
    return optax.linear_schedule(peak, 0.0, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))],
      [warmup],
  )


def load_data(config, task, tokenizer):
  """Tokenised training split (optionally a seeded subset) and eval splits.

  With ``config.data.dev_from_train > 0`` that many training examples (drawn
  by ``config.data.subset_seed``) are held out and become the evaluation
  split instead of the task's dev file, which is then never read.
  """
  data_dir = glue.resolve_data_source(config.data.dir)
  load = lambda split: glue.load_split(task, split, data_dir, hub_name=config.data.hub_name)
  train_text = load("train")
  if config.data.dev_from_train > 0:
    if config.data.dev_from_train >= len(train_text):
      raise ValueError(f"config.data.dev_from_train={config.data.dev_from_train} must be below the "
                       f"{len(train_text)} examples of {task.name}'s training split")
    train_text, dev_text = glue.split_off(train_text, config.data.dev_from_train, seed=config.data.subset_seed)
    eval_text = {task.eval_splits[0]: dev_text}
  else:
    eval_text = {s: load(s) for s in task.eval_splits}
  if config.data.train_subset > 0:
    order = np.random.default_rng(config.data.subset_seed).permutation(len(train_text.labels))
    train_text = glue.select(train_text, np.sort(order[: config.data.train_subset]))
  train = glue.tokenize_split(train_text, tokenizer, config.max_seq_len)
  evals = {s: glue.tokenize_split(t, tokenizer, config.max_seq_len) for s, t in eval_text.items()}
  return train, evals


def evaluate_splits(predict, splits, task, *, batch_size: int, buckets) -> dict[str, float]:
  """GLUE metrics of ``predict(batch) -> predictions`` over each eval split.

  The first split's metrics keep their names; later splits' get a suffix
  (MNLI: ``accuracy`` for matched, ``accuracy_mismatched``).
  """
  out = {}
  for i, (name, split) in enumerate(splits.items()):
    preds, labels, weights = [], [], []
    for batch in glue.batches(split, batch_size, seed=0, epoch=0, shuffle=False, buckets=buckets):
      preds.append(np.asarray(predict(batch)))
      labels.append(batch["labels"])
      weights.append(batch["weights"])
    m = metrics_lib.glue_metrics(task, np.concatenate(preds), np.concatenate(labels), np.concatenate(weights))
    suffix = "" if i == 0 else "_" + name.rsplit("_", 1)[-1]
    out.update({k + suffix: float(v) for k, v in m.items()})
  return out


# Tests only: the run SIGKILLs itself right after this step (resume tests).
SIGKILL_ENV = "RMLORA_TEST_SIGKILL_AT_STEP"


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
          f"(config.optim.max_nonfinite_steps={self.limit}); {kept}. Lower config.learning_rate or "
          f"check the data, then run again (the same settings resume)")


def set_output_bias(params: Any, value: float, new_paths: tuple[str, ...]) -> Any:
  """``params`` with the bias of the newly initialised one-output head set to ``value``.

  STS-B's scores average about 2.7. From a zero bias, AdamW moves the bias
  by about the learning rate per step, so the fastest way to fit the mean is
  to push every example's pooled features the same way, which collapses the
  [CLS] representation (predictions constant to 1e-3 within 100 steps, in
  our runs and in PEFT's on the same seeds; docs/RESULTS.md). Starting the
  bias at the mean training score leaves nothing to collapse for.
  """
  flat = paths_lib.flatten_with_paths(params)
  candidates = [p for p in new_paths if p.endswith("bias") and tuple(flat[p].shape) == (1,)]
  if len(candidates) != 1:
    raise ValueError(f"config.head_bias='label_mean' needs exactly one new one-output bias in the model, "
                     f"found {candidates} among the newly initialised {list(new_paths)}; set config.head_bias='zero'")
  return jax.tree_util.tree_map_with_path(
      lambda kp, w: jnp.full_like(w, value) if paths_lib.path_str(kp) == candidates[0] else w, params)


def load_model(config: ml_collections.ConfigDict, head: str, num_labels: int):
  """`hub.load_pretrained` of ``config.model``; a model that cannot be found names the offline choices."""
  try:
    return hub.load_pretrained(config.model.name_or_path, head=head, num_labels=num_labels,
                               dtype=jnp.dtype(config.model.dtype), seed=config.seed, return_report=True)
  except ValueError as e:
    if "resolve_model_path" not in str(e):
      raise
    raise ValueError(
        f"config.model.name_or_path={config.model.name_or_path!r} cannot be loaded: {e} Offline, use the "
        f"embedded model with --config=configs/<task>.py:model=minilm (installed by scripts/setup.sh), "
        f"or --config.model.name_or_path=<folder with config.json and model.safetensors>") from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one fine-tuning run and returns its results dict."""
  task = validate_config(config, workdir)
  initialize_distributed(config)
  mesh = partitioning.make_mesh(config.mesh.to_dict())
  partitioning.check_batch_size(config.batch_size, mesh)
  primary = jax.process_index() == 0
  workdir = resolve_workdir(config, workdir)
  head = "regression" if task.is_regression else "classification"
  # Read into host memory, then each device receives only its own slices.
  with jax.default_device(partitioning.host_device()):
    module, params, tokenizer, hf_config, report = load_model(config, head, task.num_labels)
  param_specs = partitioning.match_partition_rules(
      params, partitioning.rules_for(hf_config.model_type), where=f"partition rules of {hf_config.model_type}")
  train, evals = load_data(config, task, tokenizer)
  if task.is_regression and config.head_bias == "label_mean":
    params = set_output_bias(params, float(np.mean(train.labels)), report.missing)
  params = partitioning.put_sharded(params, partitioning.named_shardings(params, param_specs, mesh))
  buckets = glue.bucket_lengths(config.max_seq_len, config.data.num_buckets)
  steps_per_epoch = glue.num_batches(len(train), config.batch_size, drop_remainder=False)
  total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_epochs

  settings = method_settings(config, report, hf_config, total_steps)
  method = methods_lib.make_method(settings, weight_decay=config.optim.weight_decay,
                                   max_grad_norm=config.optim.max_grad_norm)
  peak_lr = learning_rate(config)
  tx = method.optimizer(lr_schedule(peak_lr, total_steps, config.optim.warmup_ratio))
  state, state_sh = training.init_state(method, tx, params, key=training.stream_key(config.seed, training.INIT_STREAM),
                                        mesh=mesh, param_specs=param_specs)
  frozen = method.frozen(params)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  del params

  ckpt = training.Checkpointer(str(workdir / "checkpoints"), keep=config.keep_checkpoints)
  history: dict[str, list] = {"train": [], "eval": []}
  train_time = 0.0
  start = ckpt.latest_step() or 0
  skipped_before = 0
  if start:
    # Compare settings before reading the state, whose structure may not even fit.
    check_resumable(ckpt.record(start).get("run_config"), run_fingerprint(config), str(workdir / "checkpoints"))
    state, record = ckpt.restore(start, training.abstract_like(state))
    history, train_time = record["history"], record["train_time_s"]
    skipped_before = int(record.get("nonfinite_steps", 0))
    logging.warning("resumed from step %d in %s", start, workdir / "checkpoints")

  train_step = training.make_train_step(module, method, tx, regression=task.is_regression,
                                        seed=config.seed, mesh=mesh, state_sharding=state_sh,
                                        frozen_sharding=frozen_sh)
  eval_step = training.make_eval_step(module, method, regression=task.is_regression, mesh=mesh,
                                      trainable_sharding=state_sh.trainable, frozen_sharding=frozen_sh)
  put = lambda batch: partitioning.put_batch(batch, mesh)

  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  writer = SummaryWriter(str(workdir / "tensorboard")) if primary else None
  bar = tqdm(total=total_steps, initial=start, desc=f"{task.name} {config.method}",
             disable=not (config.progress and primary), dynamic_ncols=True, unit="step")
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  batches = None
  nonfinite = NonFiniteGuard(config.optim.max_nonfinite_steps, total=skipped_before)
  kill_at = int(os.environ.get(SIGKILL_ENV, "-1"))
  tick = time.perf_counter()
  for step in range(start, total_steps):
    epoch, index = divmod(step, steps_per_epoch)
    if batches is None or index == 0:
      batches = glue.batches(train, config.batch_size, seed=config.seed, epoch=epoch,
                             shuffle=True, buckets=buckets, start=index)
    state, m = train_step(state, frozen, put(next(batches)))
    done = step + 1
    nonfinite.observe(done, m["finite"], ckpt)
    if done % config.log_every_steps == 0 or done == total_steps:
      m = {k: float(v) for k, v in m.items() if k != "finite"}
      history["train"].append({"step": done, **m})
      _add_scalars(writer, "train", m, done)
      bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
    if done % eval_every == 0 or done == total_steps:
      ev = evaluate_splits(lambda batch: eval_step(state.trainable, frozen, put(batch)), evals, task,
                           batch_size=config.batch_size, buckets=buckets)
      history["eval"].append({"step": done, **ev})
      _add_scalars(writer, "eval", ev, done)
      if primary:
        bar.write(f"step {done}/{total_steps} dev " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    bar.update(1)
    if done % config.checkpoint_every_steps == 0 or done == total_steps:
      now = time.perf_counter()
      train_time, tick = train_time + now - tick, now
      nonfinite.flush(ckpt)  # the count saved below includes this step
      ckpt.save(done, state, {"history": history, "train_time_s": train_time,
                              "nonfinite_steps": nonfinite.total, "run_config": run_fingerprint(config)})
    if done == kill_at:
      # For tests: die like a killed job, without flushing anything (an
      # asynchronous checkpoint save may be left half-written).
      os.kill(os.getpid(), signal.SIGKILL)
  nonfinite.flush(ckpt)
  bar.close()
  if writer is not None:
    writer.close()
  ckpt.close()

  trainable = partitioning.gather(state.trainable)  # whole, on every process
  results = _results(config, task, method, trainable, history, train_time, total_steps, peak_lr)
  results["nonfinite_steps"] = nonfinite.total
  if primary:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plots(workdir, history, method, trainable, task)
  return results


def _add_scalars(writer, prefix: str, scalars: dict[str, float], step: int) -> None:
  if writer is not None:
    for k, v in scalars.items():
      writer.add_scalar(f"{prefix}/{k}", v, step)


def _results(config, task, method, trainable, history, train_time, steps, peak_lr) -> dict[str, Any]:
  adapters = method.adapters(trainable)
  deltas = lora_lib.delta_weights(adapters, method.settings.spec) if adapters else {}
  counts = accounting.param_counts(trainable)
  return {
      "task": task.name,
      "method": config.method,
      "seed": config.seed,
      "model": config.model.name_or_path,
      "metrics": {k: v for k, v in (history["eval"] or [{}])[-1].items() if k != "step"},
      "main_metric": task.main_metric,
      # GLUE papers report the best dev score over evaluations; "metrics" is the final one.
      "final": dict((history["eval"] or [{}])[-1]),
      "best": dict(max(history["eval"], key=lambda h: h[task.main_metric])) if history["eval"] else {},
      "trainable_params": counts.trainable,
      "inference_params": counts.inference,
      "steps": int(steps),
      "train_time_s": round(float(train_time), 2),
      "learning_rate": peak_lr,
      "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha,
               "num_directions": config.rm.num_directions, "ortho_weight": config.rm.ortho_weight},
      "adapters": analysis.delta_report(deltas),
      "history": history,
  }


def _plots(workdir, history, method, trainable, task) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
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
  ax2.set_title(f"{task.name} dev")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(workdir / "curves.png", dpi=110)
  plt.close(fig)

  adapters = method.adapters(trainable)
  if not adapters:
    return
  spec = method.settings.spec
  rank = spec.r if isinstance(spec, lora2_lib.Lora2Spec) else spec.rank
  deltas = lora_lib.delta_weights(adapters, spec)
  kinds = sorted({re.sub(r"layer_\d+/", "", p) for p in deltas})
  cols = min(3, len(kinds))
  rows = -(-len(kinds) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, kind in zip(axes.flat, kinds):
    for path, dw in deltas.items():
      if re.sub(r"layer_\d+/", "", path) == kind:
        s = analysis.singular_values(dw)
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
