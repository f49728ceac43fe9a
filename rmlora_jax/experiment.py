"""The edge between an experiment's `ml_collections` config and the library.

Only this module and the tasks' ``from_config``-style functions read config
keys. They turn a config into the frozen, typed settings the library takes
(`rmlora_jax.trainer.TrainerSettings`, `rmlora_jax.methods.MethodSettings`
and the families' options), once and before anything is loaded or
compiled; a bad value is reported under its config name
(``config.rm.mask_period must be a positive integer, got 0``).

The config layout is the GLUE configs' (configs/base.py): ``seed``,
``workdir``, ``batch_size``, ``num_epochs``, ``learning_rate``, ``lora.*``,
``rm.*``, ``adalora.*``, ``sora.*``, ``lora2.*``, ``optim.*``, ``mesh.*``,
``distributed.*``, so one override means the same for every task.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rmlora_jax import methods as methods_lib
from rmlora_jax import paths as paths_lib
from rmlora_jax import peft_format
from rmlora_jax import trainer as trainer_lib
from rmlora_jax import training
from rmlora_jax.adapters import adalora as adalora_lib
from rmlora_jax.adapters import base as base_lib
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.adapters import lora2 as lora2_lib
from rmlora_jax.data import glue as glue_data
from rmlora_jax.models import hub

# Table 3 of the RM-LoRA paper: full fine-tuning at 1e-5, every adapter method at 1e-3.
DEFAULT_LEARNING_RATES = {"full_ft": 1e-5}
ADAPTER_LEARNING_RATE = 1e-3

# Settings that may change between a run and its resumption: where and how it
# runs and reports, not what it computes.
RESUMABLE_CHANGES = ("workdir", "progress", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "mesh", "distributed", "data.dir", "data.hub_name",
                     "optim.max_nonfinite_steps", "data.cache_dir")


# Typed settings -> the config names their fields come from, for error messages.
_CONFIG_NAMES: dict[str, str] = {
    "TrainerSettings.seed": "config.seed", "TrainerSettings.batch_size": "config.batch_size",
    "TrainerSettings.accumulate_steps": "config.optim.accumulate_steps",
    "TrainerSettings.num_epochs": "config.num_epochs", "TrainerSettings.max_steps": "config.max_steps",
    "TrainerSettings.learning_rate": "config.learning_rate", "TrainerSettings.warmup_ratio": "config.optim.warmup_ratio",
    "TrainerSettings.log_every_steps": "config.log_every_steps",
    "TrainerSettings.eval_every_steps": "config.eval_every_steps",
    "TrainerSettings.checkpoint_every_steps": "config.checkpoint_every_steps",
    "TrainerSettings.keep_checkpoints": "config.keep_checkpoints",
    "TrainerSettings.max_nonfinite_steps": "config.optim.max_nonfinite_steps",
    "TrainerSettings.progress": "config.progress",
    "MethodSettings.adapter_apply": "config.lora.apply", "MethodSettings.weight_decay": "config.optim.weight_decay",
    "MethodSettings.train_patterns": "config.lora.train_patterns",
    "LoraSpec.alpha": "config.lora.alpha", "LoraSpec.targets": "config.lora.targets",
    "LoraSpec.init_std": "config.lora.init_std", "LoraSpec.init": "config.lora.init", "LoraSpec.rank": "config.lora.rank",
    "Lora2Spec.alpha": "config.lora.alpha", "Lora2Spec.targets": "config.lora.targets",
    "Lora2Spec.init_std": "config.lora.init_std", "Lora2Spec.k": "config.lora2.k", "Lora2Spec.r": "config.lora2.r",
}
for _cls, _section_name in ((methods_lib.RmOptions, "rm"), (methods_lib.AdaLoraOptions, "adalora"),
                            (methods_lib.SoraOptions, "sora"), (methods_lib.Lora2Options, "lora2")):
  for _field in dataclasses.fields(_cls):
    _CONFIG_NAMES[f"{_cls.__name__}.{_field.name}"] = f"config.{_section_name}.{_field.name}"


def config_names(message: str, extra: Mapping[str, str] | None = None) -> str:
  """``message`` with typed-settings names (``RmOptions.mask_period``) replaced by config names."""
  names = {**_CONFIG_NAMES, **(extra or {})}
  return re.sub(r"\b[A-Z]\w*\.\w+\b", lambda m: names.get(m.group(0), m.group(0)), message)


@contextlib.contextmanager
def config_errors(extra: Mapping[str, str] | None = None):
  """Re-raises a ValueError from the library with config names in place of settings' names."""
  try:
    yield
  except ValueError as e:
    renamed = config_names(str(e), extra)
    if renamed == str(e):
      raise
    raise type(e)(renamed) from e


def _typed(cls: type, values: Mapping[str, Any], names: Mapping[str, str]) -> Any:
  """``cls(**values)``, its ValueErrors naming config fields (``names``: "Cls.field" -> config name)."""
  with config_errors(names):
    return cls(**values)


def _section(cls: type, section: ml_collections.ConfigDict, where: str, **overrides: Any) -> Any:
  """``cls`` from the config section of the same field names (``config.rm`` -> `RmOptions`)."""
  fields = [f.name for f in dataclasses.fields(cls)]
  values = {f: section[f] for f in fields if f in section}
  values.update(overrides)
  return _typed(cls, values, {f"{cls.__name__}.{f}": f"{where}.{f}" for f in fields})


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


def check_positive_ints(config: ml_collections.ConfigDict, names: tuple[str, ...]) -> None:
  """Each dotted ``name`` of ``config`` must be a positive integer."""
  for name in names:
    value = get(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """``config.a.b`` for ``"a.b"``."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def learning_rate(config: ml_collections.ConfigDict) -> float:
  """The configured learning rate, or Table 3's for the method when unset (<= 0)."""
  if config.learning_rate > 0:
    return float(config.learning_rate)
  return DEFAULT_LEARNING_RATES.get(config.method, ADAPTER_LEARNING_RATE)


# Keys added after runs were made, with the value that reproduces those runs:
# a run's fingerprint leaves them out at that value, so its checkpoints resume.
_LATER_KEYS = {"init_adapters": "", "preset": "", "optim.accumulate_steps": 1, "rm.mask_start_step": 0,
               "rm.mask_sets": "shared", "rm.emulate_frozen_head": False, "lora2.variant": "paper"}


def run_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flattened settings that decide a run's numbers (stored in its checkpoints)."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if any(name == r or name.startswith(r + ".") for r in RESUMABLE_CHANGES):
        continue
      if name in _LATER_KEYS and value == _LATER_KEYS[name]:
        continue  # at its neutral value: the fingerprints of runs from before the key stay as they were
      if isinstance(value, dict):
        walk(value, name + ".")
      else:
        flat[name] = list(value) if isinstance(value, tuple) else value

  walk(config.to_dict(), "")
  return json.loads(json.dumps(flat))


def trainer_settings(config: ml_collections.ConfigDict) -> trainer_lib.TrainerSettings:
  """`TrainerSettings` from the config's top-level keys and ``optim.*``."""
  fields = [f.name for f in dataclasses.fields(trainer_lib.TrainerSettings) if f.name != "fingerprint"]
  values = {f: get(config, _CONFIG_NAMES[f"TrainerSettings.{f}"].removeprefix("config.")) for f in fields}
  values["learning_rate"] = learning_rate(config)
  values["fingerprint"] = run_fingerprint(config)
  return _typed(trainer_lib.TrainerSettings, values, {})


def method_options(config: ml_collections.ConfigDict) -> Any:
  """The method's family options from its config section (None for full_ft)."""
  entry = methods_lib.get(config.method, where="config.method")
  if entry.options is None:
    return None
  if entry.options is methods_lib.RmOptions:
    return _section(methods_lib.RmOptions, config.rm, "config.rm")
  if entry.options is methods_lib.AdaLoraOptions:
    _, target = adalora_lib.budget_ranks(config.lora.rank, config.adalora.init_rank, config.adalora.target_rank)
    return _section(methods_lib.AdaLoraOptions, config.adalora, "config.adalora", target_rank=target)
  section = {methods_lib.SoraOptions: "sora", methods_lib.Lora2Options: "lora2"}[entry.options]
  return _section(entry.options, config[section], f"config.{section}")


def adapter_alpha(config: ml_collections.ConfigDict) -> float:
  """``config.lora.alpha``; for AdaLoRA with ``config.adalora.alpha_over_rank > 0``, that ratio times its initial rank.

  AdaLoRA scales by alpha over its initial rank (2R by default), so the
  LoRA family's alpha 32 gives it 2 where its authors' GLUE scripts use 8
  to 16; ``adalora.alpha_over_rank`` sets that ratio directly.
  """
  ratio = config.adalora.get("alpha_over_rank", -1.0)
  if config.method != "adalora" or ratio <= 0:
    return float(config.lora.alpha)
  init_rank, _ = adalora_lib.budget_ranks(config.lora.rank, config.adalora.init_rank, config.adalora.target_rank)
  return float(ratio * init_rank)


def adapter_spec(config: ml_collections.ConfigDict, default_targets: tuple[str, ...]) -> Any:
  """The method's `LoraSpec` (`Lora2Spec` for lora2), None for full_ft.

  ``config.lora.targets`` when set, else ``default_targets`` (the model's).
  AdaLoRA starts at ``config.adalora.init_rank`` (unset: 2 * lora.rank),
  SoRA at ``config.sora.init_rank``, the others at ``config.lora.rank``;
  the alpha is `adapter_alpha`'s.
  """
  entry = methods_lib.get(config.method, where="config.method")
  if not entry.adapts:
    return None
  targets = tuple(config.lora.targets) or tuple(default_targets)
  common = dict(alpha=adapter_alpha(config), targets=targets, init_std=config.lora.init_std)
  if config.lora.init != "gaussian" and (entry.two_plane or config.method == "adalora"):
    raise ValueError(f"config.lora.init={config.lora.init!r} applies to the LoRA family and SoRA; "
                     f"{config.method} draws its factors from N(0, config.lora.init_std^2) (set init='gaussian')")
  if entry.two_plane:
    return _typed(lora2_lib.Lora2Spec, dict(k=config.lora2.k, r=config.lora2.r, **common), {})
  common["init"] = config.lora.init
  init_rank, _ = adalora_lib.budget_ranks(config.lora.rank, config.adalora.init_rank, config.adalora.target_rank)
  rank, rank_name = {"adalora": (init_rank, "config.adalora.init_rank"),
                     "sora": (config.sora.init_rank, "config.sora.init_rank")}.get(
                         config.method, (config.lora.rank, "config.lora.rank"))
  return _typed(lora_lib.LoraSpec, dict(rank=rank, **common), {"LoraSpec.rank": rank_name})


def method_settings(config: ml_collections.ConfigDict, *, default_targets: tuple[str, ...],
                    head_patterns: tuple[str, ...] = ()) -> methods_lib.MethodSettings:
  """`MethodSettings` of ``config.method``; the head (``head_patterns``) trains beside the adapters."""
  spec = adapter_spec(config, default_targets)
  options = method_options(config)
  if isinstance(options, adalora_lib.BudgetOptions) and options.target_rank is not None:
    initial = spec.r if isinstance(spec, lora2_lib.Lora2Spec) else spec.rank
    where = "config.lora2.r" if isinstance(spec, lora2_lib.Lora2Spec) else "config.adalora.init_rank"
    if not 1 <= options.target_rank <= initial:
      raise ValueError(f"config.{config.method}.target_rank={options.target_rank} must be in 1..{where}={initial}")
  patterns = tuple(dict.fromkeys(tuple(head_patterns) + tuple(config.lora.train_patterns)))
  paths_lib.compile_patterns(patterns, where="config.lora.train_patterns")
  return _typed(methods_lib.MethodSettings, dict(
      name=config.method, spec=spec, train_patterns=patterns, seed=config.seed,
      adapter_apply="merge" if spec is None else config.lora.apply,
      max_grad_norm=config.optim.max_grad_norm, weight_decay=config.optim.weight_decay, options=options), {})


def validate(config: ml_collections.ConfigDict) -> methods_lib.MethodSettings:
  """Checks every setting shared by the experiments, before anything is loaded.

  Builds the typed settings once to let them check themselves (a model's
  default targets stand in for empty ``config.lora.targets``).
  """
  methods_lib.check_available(config.method, where="config.method")
  check_finite_floats(config)
  check_positive_ints(config, ("batch_size", "max_seq_len", "lora.rank"))
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
  trainer_settings(config)
  settings = method_settings(config, default_targets=(".*",))
  if config.get("init_adapters") and not os.path.isdir(config.init_adapters):
    raise ValueError(f"config.init_adapters={config.init_adapters!r} is not a folder (expected a PEFT adapter: "
                     f"{peft_format.ADAPTER_CONFIG} and {peft_format.ADAPTER_WEIGHTS})")
  if config.method in ("gm_lora", "rm_lora") and not 1 <= config.rm.num_directions <= config.lora.rank:
    raise ValueError(
        f"config.rm.num_directions={config.rm.num_directions} must be in 1..config.lora.rank={config.lora.rank}")
  return settings


def default_workdir(config: ml_collections.ConfigDict, task: str, method: str | None = None) -> str:
  """``runs/<task>_<method>_<model>_s<seed>``: where a run without ``config.workdir`` writes.

  The model part is the last component of ``config.model.name_or_path``
  (``minilm-l6``, ``deberta-v3-base``), so the same command maps to the same
  folder and, run again, resumes it.
  """
  model = re.sub(r"[^A-Za-z0-9._-]+", "-", pathlib.PurePath(str(config.model.name_or_path)).name or "model")
  return os.path.join("runs", f"{task}_{method or config.method}_{model}_s{config.seed}")


def resolve_workdir(config: ml_collections.ConfigDict, workdir: str | None, *, task: str,
                    method: str | None = None) -> pathlib.Path:
  """``workdir``, or `default_workdir` when empty; created, and checked writable.

  Raises:
    ValueError: the folder cannot be created or written (naming it and why).
  """
  chosen = workdir or default_workdir(config, task, method)
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


def summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What results.json records of the config besides the trainer's own entries."""
  return {"model": config.model.name_or_path, "preset": config.get("preset", ""),
          "lora": {"rank": config.lora.rank, "alpha": adapter_alpha(config),
                   "num_directions": config.rm.num_directions, "ortho_weight": config.rm.ortho_weight},
          "config": config.to_dict()}


PEFT_ANCHORS = {"lora": "peft_lora", "adalora": "peft_adalora"}


def peft_anchor_method(config: ml_collections.ConfigDict) -> str:
  """The anchor's method name for ``config.method`` (PEFT's LoRA or AdaLoRA); errors for others."""
  if config.method not in PEFT_ANCHORS:
    raise ValueError(f"config.method={config.method!r}: the PEFT anchor runs {' or '.join(PEFT_ANCHORS)} "
                     "(PEFT's LoraConfig or AdaLoraConfig)")
  return PEFT_ANCHORS[config.method]


def run_peft_anchor(task: Any, model: Any, config: ml_collections.ConfigDict, workdir: Any) -> dict[str, Any]:
  """`rmlora_jax.peft_anchor.train_peft_lora` with the config's method, rank, alpha, optimizer and steps.

  ``config.method="adalora"`` trains PEFT's AdaLoRA with the budget and
  schedule our AdaLoRA gets from the same config (2R -> R unless set).
  """
  from rmlora_jax import peft_anchor  # pylint: disable=g-import-not-at-top  (torch is imported lazily there)

  peft_anchor_method(config)
  settings = trainer_settings(config)
  adalora = None
  if config.method == "adalora":
    init_r, _ = adalora_lib.budget_ranks(config.lora.rank, config.adalora.init_rank, config.adalora.target_rank)
    opts = method_options(config)
    total = settings.total_steps(task.num_train_batches(settings.batch_size))
    schedule = opts.schedule(init_r, total)
    adalora = peft_anchor.PeftAdaLora(
        init_r=init_r, target_r=schedule.target_rank, tinit=schedule.t_init, tfinal=schedule.t_final,
        delta_t=opts.delta_t, beta1=opts.beta1, beta2=opts.beta2, orth_reg_weight=opts.ortho_weight)
  return peft_anchor.train_peft_lora(
      task, model, settings, workdir, rank=config.lora.rank, alpha=adapter_alpha(config),
      weight_decay=config.optim.weight_decay, max_grad_norm=config.optim.max_grad_norm, adalora=adalora,
      extra_results={"model": config.model.name_or_path, "preset": config.get("preset", ""),
                     "lora": {"rank": config.lora.rank, "alpha": adapter_alpha(config)}, "config": config.to_dict()})


def initial_trainable(config: ml_collections.ConfigDict, params: Any, hf_config: Any, head: str,
                      method: methods_lib.MethodSettings) -> Callable[[Any], Any] | None:
  """The trainer's ``init_trainable`` for ``config.init_adapters`` (a PEFT folder); None when unset."""
  folder = config.get("init_adapters", "")
  if not folder:
    return None
  try:
    return peft_format.start_from(peft_format.load_peft(folder, params, hf_config, head=head), method)
  except ValueError as e:
    raise ValueError(f"config.init_adapters={folder!r}: {e}") from e


EXPORT_FORMATS = ("peft", "merged")
# config.task of the image experiments (configs/cifar100.py, cifar10_transfer.py, vit_pretrain.py).
VISION_TASKS = ("cifar100", "cifar10_transfer", "vit_pretrain")
IMAGE_HEAD = "image_classification"


def model_head(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """``(head, num_labels)`` of a run's model: "qa" for SQuAD, "causal_lm" for SFT,
  "image_classification" for the image tasks, else its GLUE task's head.

  An image run over every class of its source (empty ``config.data.classes``)
  gives ``num_labels`` 0: its checkpoint's classifier tells.
  """
  if config.task == "squad":
    return "qa", 2
  if config.task == "sft":
    return "causal_lm", 1
  if config.task in VISION_TASKS:
    return IMAGE_HEAD, len(config.data.classes)
  try:
    task = glue_data.get_task(config.task)
  except ValueError as e:
    raise ValueError(f"config.task={config.task!r}: export handles GLUE, SQuAD, SFT and image ({', '.join(VISION_TASKS)}) "
                     f"runs ({e})") from e
  return ("regression" if task.is_regression else "classification"), task.num_labels


def saved_config(workdir: str | os.PathLike, defaults: ml_collections.ConfigDict | None = None
                 ) -> ml_collections.ConfigDict:
  """The config of the run in ``workdir``: its results.json's, else its latest checkpoint's settings.

  ``defaults`` (``configs.base.get_config()``) fill in keys that runs from before they existed lack.
  """
  workdir = pathlib.Path(workdir)
  saved = None
  if (workdir / "results.json").is_file():
    saved = json.loads((workdir / "results.json").read_text()).get("config")
  if saved is None:
    with _checkpoints(workdir) as (ckpt, step):
      flat = ckpt.record(step)["run_config"]
    saved = {}
    for dotted, value in flat.items():
      *parents, last = dotted.split(".")
      node = saved
      for part in parents:
        node = node.setdefault(part, {})
      node[last] = value

  def deep_merge(base, over):
    out = dict(base)
    for key, value in over.items():
      out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out

  return ml_collections.ConfigDict(deep_merge(defaults.to_dict() if defaults is not None else {}, saved))


@contextlib.contextmanager
def _checkpoints(workdir: pathlib.Path):
  """``(training.Checkpointer, latest step)`` of a workdir's checkpoints, read-only."""
  folder = workdir / "checkpoints"
  if not folder.is_dir():
    raise ValueError(f"{str(workdir)!r} has no checkpoints folder: is it the workdir of a run?")
  ckpt = training.Checkpointer(str(folder), create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f"{str(folder.absolute())!r} holds no complete checkpoint yet")
    yield ckpt, step
  finally:
    ckpt.close()


def trained_state(workdir: str | os.PathLike) -> tuple[Any, int]:
  """The trainable tree (numpy) of a run's latest checkpoint, and its step; no optimizer is rebuilt."""
  with _checkpoints(pathlib.Path(workdir)) as (ckpt, step):
    state = ckpt.state_tree(step)
  return jax.tree.map(np.asarray, state["trainable"]), step


def export_run(workdir: str | os.PathLike, *, fmt: str, out: str | os.PathLike | None = None,
               defaults: ml_collections.ConfigDict | None = None) -> pathlib.Path:
  """Writes a run's trained model as a PEFT adapter folder (``fmt="peft"``) or a merged HF folder ("merged").

  The run's base model is loaded as it was for training (its config; an image
  run's new classifier W0 from the run's seed), the trainable tree is read
  from its latest checkpoint. ``out`` defaults to ``<workdir>/<fmt>``. The
  merged folder holds the tokenizer, or for an image run the image processor
  (the base folder's, else a ``ViTImageProcessor`` of the run's size, mean and std).

  Raises:
    ValueError: an unknown format, a folder without checkpoints, or
      ``fmt="peft"`` for full fine-tuning (no adapter) or for adapters on a
      weight the base checkpoint lacks (an image run's new classifier).
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f"--format={fmt!r} is not one of {EXPORT_FORMATS}")
  workdir = pathlib.Path(workdir)
  config = saved_config(workdir, defaults)
  head, num_labels = model_head(config)
  trainable, step = trained_state(workdir)
  out = pathlib.Path(out) if out else workdir / fmt
  if head == IMAGE_HEAD:
    params, processor, hf_config, new, default_targets = _image_model(
        config, workdir, num_labels or _classifier_outputs(trainable))
  else:
    _, params, processor, hf_config, report = load_model(config, head, num_labels)
    new, default_targets = report.missing, hub.default_lora_targets(hf_config)
  if "params" in trainable:
    if fmt == "peft":
      raise ValueError(f"{str(workdir)!r} is a full fine-tuning run: it has no adapter to write in PEFT's format; "
                       f"use --format=merged")
    # Every parameter, or only the classifier of a linear probe on frozen image features.
    trained = base_lib.with_head(params, paths_lib.flatten_with_paths(trainable["params"]))
    return peft_format.save_merged(out, params=trained, hf_config=hf_config, head=head, tokenizer=processor)
  settings = method_settings(config, default_targets=default_targets)
  if fmt == "merged":
    return peft_format.save_merged(out, params=params, hf_config=hf_config, head=head, adapters=trainable["adapters"],
                                   spec=settings.spec, trained=trainable["head"], tokenizer=processor)
  fresh = sorted(set(trainable["adapters"]) & set(new))
  if fresh:
    source = (f"not in the base checkpoint {config.model.name_or_path!r}" if config.model.name_or_path else
              "the run built its model from config.model.vit")
    raise ValueError(f"{str(workdir)!r} has an adapter on {fresh[0]!r}, whose W0 the run initialised itself "
                     f"({source}), so PEFT on the base model cannot rebuild it; use --format=merged")
  extra = {}
  if isinstance(settings.options, adalora_lib.AdaLoraOptions):
    # PEFT's AdaLoraConfig checks its schedule on loading: write the run's.
    schedule = settings.options.schedule(settings.spec.rank, step)
    extra = {"target_r": schedule.target_rank, "total_step": schedule.total_steps, "tinit": schedule.t_init,
             "tfinal": schedule.t_final, "deltaT": schedule.delta_t, "beta1": schedule.beta1,
             "beta2": schedule.beta2, "orth_reg_weight": settings.options.ortho_weight}
  return peft_format.save_peft(out, params=params, adapters=trainable["adapters"], spec=settings.spec,
                               trained=trainable["head"], hf_config=hf_config, head=head,
                               base_model_name_or_path=config.model.name_or_path, extra_config=extra)


def _classifier_outputs(trainable: Mapping[str, Any]) -> int:
  """The classes of an image run's classifier, read from its trainable tree (full, head or adapter)."""
  flat = paths_lib.flatten_with_paths(trainable)
  for path, value in flat.items():
    if path.endswith("classifier/kernel"):  # params/... or head/...: (hidden, classes)
      return int(value.shape[-1])
    if path.endswith("classifier/kernel/b"):  # an adapter's b: (classes, rank)
      return int(value.shape[0])
  raise ValueError("the checkpoint trains no classifier and config.data.classes is empty: cannot tell the classes")


def _image_model(config: ml_collections.ConfigDict, workdir: pathlib.Path, num_labels: int):
  """An image run's ViT: ``(params, image processor, hf_config with the class names, new param paths,
  default adapter targets)``."""
  # The image task's edge builds the ViT (a checkpoint's or one from config.model.vit, the new
  # classifier seeded by config.seed) exactly as for training; it imports this module, hence here.
  from rmlora_jax.tasks import cifar  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model = cifar.load_model(config, num_labels)
  names = list(config.data.classes)
  if not names and (workdir / "results.json").is_file():
    names = json.loads((workdir / "results.json").read_text()).get("classes") or []
  hf_config = model.hf_config
  if len(names) == num_labels:
    hf_config = copy.deepcopy(hf_config)
    hf_config.id2label = dict(enumerate(names))
    hf_config.label2id = {n: i for i, n in enumerate(names)}
  folder = hub.resolve_model_path(config.model.name_or_path) if config.model.name_or_path else None
  if folder is not None and (folder / "preprocessor_config.json").is_file():
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
  else:
    h, w = model.image_size
    processor = transformers.ViTImageProcessor(do_resize=True, size={"height": h, "width": w},
                                               image_mean=list(model.mean), image_std=list(model.std))
  return model.params, processor, hf_config, model.missing, cifar.targets_and_head(config)[0]
