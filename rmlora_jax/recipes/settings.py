"""The edge between an experiment's `ml_collections` config and the library.

Only the recipes read config keys. These functions turn a config into the
frozen, typed settings the library takes (`rmlora_jax.trainer.TrainerSettings`,
`rmlora_jax.methods.MethodSettings` and the families' options), once and
before anything is loaded or compiled; a bad value is reported under its config name
(``config.rm.mask_period must be a positive integer, got 0``).

The config layout is the GLUE configs' (configs/base.py): ``seed``,
``workdir``, ``batch_size``, ``num_epochs``, ``learning_rate``, ``lora.*``,
``rm.*``, ``adalora.*``, ``sora.*``, ``lora2.*``, ``optim.*``, ``mesh.*``,
``distributed.*``, so one override means the same for every task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from rmlora_jax import methods as methods_lib
from rmlora_jax import paths as paths_lib
from rmlora_jax import peft_format
from rmlora_jax import quantize as quantize_lib
from rmlora_jax import trainer as trainer_lib
from rmlora_jax.adapters import adalora as adalora_lib
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.adapters import lora2 as lora2_lib

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
for _family in methods_lib.FAMILIES:
  for _field in dataclasses.fields(_family.options):
    _CONFIG_NAMES[f"{_family.options.__name__}.{_field.name}"] = f"config.{_family.config_section}.{_field.name}"


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
               "rm.mask_sets": "shared", "rm.emulate_frozen_head": False, "lora2.variant": "paper",
               "model.quantize": "", "model.quantize_block": -1}

# config.task of the image experiments (configs/cifar100.py, cifar10_transfer.py, vit_pretrain.py).
VISION_TASKS = ("cifar100", "cifar10_transfer", "vit_pretrain")


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
  family = methods_lib.get(config.method, where="config.method").definition
  if family is None:
    return None
  extra = {}
  if family is adalora_lib.FAMILY:  # its target rank defaults from lora.rank
    _, extra["target_rank"] = adalora_lib.budget_ranks(config.lora.rank, config.adalora.init_rank,
                                                       config.adalora.target_rank)
  section = family.config_section
  return _section(family.options, config[section], f"config.{section}", **extra)


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
  two_plane = entry.definition is lora2_lib.FAMILY
  if config.lora.init != "gaussian" and (two_plane or config.method == "adalora"):
    raise ValueError(f"config.lora.init={config.lora.init!r} applies to the LoRA family and SoRA; "
                     f"{config.method} draws its factors from N(0, config.lora.init_std^2) (set init='gaussian')")
  if two_plane:
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
    initial = spec.rank
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
  check_quantize(config)
  trainer_settings(config)
  settings = method_settings(config, default_targets=(".*",))
  if config.get("init_adapters") and not os.path.isdir(config.init_adapters):
    raise ValueError(f"config.init_adapters={config.init_adapters!r} is not a folder (expected a PEFT adapter: "
                     f"{peft_format.ADAPTER_CONFIG} and {peft_format.ADAPTER_WEIGHTS})")
  if config.method in ("gm_lora", "rm_lora") and not 1 <= config.rm.num_directions <= config.lora.rank:
    raise ValueError(
        f"config.rm.num_directions={config.rm.num_directions} must be in 1..config.lora.rank={config.lora.rank}")
  return settings

def quantize_format(config: ml_collections.ConfigDict) -> str:
  """``config.model.quantize``: "" (the frozen base stays float) or a `rmlora_jax.quantize.FORMATS` name."""
  return config.model.get("quantize", "") or ""


def check_quantize(config: ml_collections.ConfigDict) -> None:
  """``config.model.quantize`` must name a format, for an adapter method.

  Raises:
    ValueError: an unknown format, a block size below -1
      (``config.model.quantize_block``), or full fine-tuning (it trains the
      base weights).
  """
  fmt = quantize_format(config)
  block = config.model.get("quantize_block", -1)
  if isinstance(block, bool) or not isinstance(block, int) or block < -1:
    raise ValueError(f"config.model.quantize_block must be -1 (the format's default), 0 (one scale per output "
                     f"column) or a positive block size, got {block!r}")
  if not fmt:
    return
  if fmt not in quantize_lib.FORMATS:
    raise ValueError(f"config.model.quantize must be '' (off) or one of {tuple(quantize_lib.FORMATS)}, got {fmt!r}")
  if not methods_lib.get(config.method, where="config.method").adapts:
    raise ValueError(f"config.model.quantize={fmt!r} quantises the frozen base, but config.method={config.method!r} "
                     f"trains the base weights themselves; choose an adapter method or config.model.quantize=''")


def summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What results.json records of the config besides the trainer's own entries."""
  return {"model": config.model.name_or_path, "preset": config.get("preset", ""),
          "lora": {"rank": config.lora.rank, "alpha": adapter_alpha(config),
                   "num_directions": config.rm.num_directions, "ortho_weight": config.rm.ortho_weight},
          "config": config.to_dict()}
