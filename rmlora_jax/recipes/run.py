"""What every experiment does around the training loop.

The workdir (`resolve_workdir`), `jax.distributed` (`initialize_distributed`),
the pre-trained model (`load_model`; sharded and, with
``config.model.quantize``, its frozen base quantised: `load_sharded_model`),
the PEFT anchor (`run_peft_anchor`),
the start from a PEFT folder (`initial_trainable`), and a finished run's
config and trained parameters (`saved_config`, `trained_state`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rmlora_jax import hf_layout
from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import peft_format
from rmlora_jax import quantize
from rmlora_jax import stacking
from rmlora_jax import training
from rmlora_jax.adapters import adalora as adalora_lib
from rmlora_jax.models import hub
from rmlora_jax.recipes import settings as settings_lib

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


def load_model(config: ml_collections.ConfigDict, head: str, num_labels: int, *, quantized: bool = False):
  """`hub.load_pretrained` of ``config.model``; a model that cannot be found names the offline choices.

  ``quantized``: with ``config.model.quantize`` set, the kernels of
  `quantize_spec` are quantised as they are read (`hub.load_pretrained`'s
  ``quantize``), the params equal to `quantized_base` of the float ones.
  """
  try:
    spec = None
    if quantized and settings_lib.quantize_format(config):
      import transformers  # pylint: disable=g-import-not-at-top
      folder = hub.resolve_model_path(config.model.name_or_path)
      spec = quantize_spec(config, transformers.AutoConfig.from_pretrained(folder), ())
    with _quantize_errors(spec):
      return hub.load_pretrained(config.model.name_or_path, head=head, num_labels=num_labels,
                                 dtype=jnp.dtype(config.model.dtype), seed=config.seed, return_report=True,
                                 scan_layers=config.model.get("scan_layers", False), quantize=spec)
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
          "lora": {"rank": config.lora.rank, "alpha": settings_lib.adapter_alpha(config),
                   "num_directions": config.rm.num_directions, "ortho_weight": config.rm.ortho_weight},
          "config": config.to_dict()}


PEFT_ANCHORS = {"lora": "peft_lora", "adalora": "peft_adalora"}


def peft_anchor_method(config: ml_collections.ConfigDict) -> str:
  """The anchor's method name for ``config.method`` (PEFT's LoRA or AdaLoRA); errors for others.

  Also refuses, before anything loads, a ``config.model.quantize`` the
  anchor cannot reproduce: formats other than nf4 in 64-value blocks
  (`bitsandbytes_settings`), and AdaLoRA over a 4-bit base (PEFT's 4-bit
  AdaLoRA layer has no ``get_delta_weight``, which the anchor's report reads).
  """
  if config.method not in PEFT_ANCHORS:
    raise ValueError(f"config.method={config.method!r}: the PEFT anchor runs {' or '.join(PEFT_ANCHORS)} "
                     "(PEFT's LoraConfig or AdaLoraConfig)")
  fmt = settings_lib.quantize_format(config)
  if fmt and not _bitsandbytes_has(fmt, config.model.get("quantize_block", -1)):
    raise ValueError(f"config.model.quantize={fmt!r}: the PEFT anchor quantises through bitsandbytes, whose only "
                     f"format equal to ours is nf4 in 64-value blocks (config.model.quantize_block=-1 or 64); run "
                     f"it with config.model.quantize='nf4' or ''")
  if fmt and config.method == "adalora":
    raise ValueError(f"config.model.quantize={fmt!r}: the PEFT anchor runs LoRA over a 4-bit base, not AdaLoRA "
                     f"(PEFT's 4-bit AdaLoRA layer cannot report its update); use config.method='lora' or "
                     f"config.model.quantize=''")
  return PEFT_ANCHORS[config.method]


def run_peft_anchor(task: Any, model: Any, config: ml_collections.ConfigDict, workdir: Any) -> dict[str, Any]:
  """`rmlora_jax.peft_anchor.train_peft_lora` with the config's method, rank, alpha, optimizer and steps.

  ``config.method="adalora"`` trains PEFT's AdaLoRA with the budget and
  schedule our AdaLoRA gets from the same config (2R -> R unless set).
  """
  from rmlora_jax.recipes import peft_anchor  # pylint: disable=g-import-not-at-top  (torch is imported lazily there)

  peft_anchor_method(config)
  settings = settings_lib.trainer_settings(config)
  adalora = None
  if config.method == "adalora":
    init_r, _ = adalora_lib.budget_ranks(config.lora.rank, config.adalora.init_rank, config.adalora.target_rank)
    opts = settings_lib.method_options(config)
    total = settings.total_steps(task.num_train_batches(settings.batch_size))
    schedule = opts.schedule(init_r, total)
    adalora = peft_anchor.PeftAdaLora(
        init_r=init_r, target_r=schedule.target_rank, tinit=schedule.t_init, tfinal=schedule.t_final,
        delta_t=opts.delta_t, beta1=opts.beta1, beta2=opts.beta2, orth_reg_weight=opts.ortho_weight)
  extra = {"model": config.model.name_or_path, "preset": config.get("preset", ""),
           "lora": {"rank": config.lora.rank, "alpha": settings_lib.adapter_alpha(config)}, "config": config.to_dict()}
  fmt = settings_lib.quantize_format(config)
  if fmt:
    # The model came from `anchor_model_kwargs`: say what bitsandbytes quantised.
    four_bit = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit")
    if not four_bit:
      raise ValueError(f"config.model.quantize={fmt!r}, but the anchor's model has no 4-bit layer; load it with "
                       f"run.anchor_model_kwargs(config, ...)")
    for name in four_bit:
      # bitsandbytes' CPU inference path repacks the weights for a bfloat16
      # kernel (products rounded to bfloat16), after which training fails:
      # keep every layer on the float32 path.
      model.get_submodule(name).support_avx512bf16_for_cpu = False
    extra["quantize"] = {"format": fmt, "library": "bitsandbytes", "modules": four_bit}
  return peft_anchor.train_peft_lora(
      task, model, settings, workdir, rank=config.lora.rank, alpha=settings_lib.adapter_alpha(config),
      weight_decay=config.optim.weight_decay, max_grad_norm=config.optim.max_grad_norm, adalora=adalora,
      extra_results=extra)


def initial_trainable(config: ml_collections.ConfigDict, params: Any, hf_config: Any, head: str,
                      method: methods_lib.MethodSettings) -> Callable[[Any], Any] | None:
  """The trainer's ``init_trainable`` for ``config.init_adapters`` (a PEFT folder); None when unset."""
  folder = config.get("init_adapters", "")
  if not folder:
    return None
  try:
    # load_peft reads shapes only: a quantised kernel stands in as its shape.
    loaded = peft_format.load_peft(folder, quantize.abstract_kernels(params), hf_config, head=head)
    return peft_format.start_from(loaded, method)
  except ValueError as e:
    raise ValueError(f"config.init_adapters={folder!r}: {e}") from e


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
  """The trainable tree (numpy) of a run's latest checkpoint, and its step; no optimizer is rebuilt.

  Adapters come per layer, also where the run kept a scanned model's
  adapters stacked (`stacking.stack_adapters`).
  """
  with _checkpoints(pathlib.Path(workdir)) as (ckpt, step):
    state = ckpt.state_tree(step)
  trainable = jax.tree.map(np.asarray, state["trainable"])
  if "adapters" in trainable:
    trainable = {**trainable, "adapters": stacking.unstack_adapters(trainable["adapters"])}
  return trainable, step


def start(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Each recipe's first steps: `jax.distributed` when asked, the device mesh, the batch checked against it."""
  initialize_distributed(config)
  mesh = partitioning.make_mesh(config.mesh.to_dict())
  partitioning.check_batch_size(config.batch_size, mesh)
  return mesh


# Heads stay float whatever the adapter targets say: the classifiers train, and
# the output layer (lm_head) is the one QLoRA and bitsandbytes leave in float too.
HEAD_PATHS = (r"(classifier|qa_outputs|lm_head)(/.*)?",)

# QuantizeSpec's fields -> the config names they come from, for error messages.
_QUANTIZE_NAMES = {"QuantizeSpec.format": "config.model.quantize", "QuantizeSpec.targets": "config.lora.targets",
                   "QuantizeSpec.block_size": "config.model.quantize_block"}


def quantize_spec(config: ml_collections.ConfigDict, hf_config: Any,
                  missing: Sequence[str]) -> quantize.QuantizeSpec | None:
  """The `quantize.QuantizeSpec` of ``config.model.quantize`` for a loaded model; None when it is off.

  ``missing``: the parameter paths the checkpoint lacked (the load report's
  ``missing``), which stay float.

  Quantised: every Dense kernel of the transformer blocks
  (`quantize.BLOCK_KERNELS`) and every kernel the adapters target
  (``config.lora.targets``, else the model's defaults). Left float:
  embeddings, norms, biases, the pooler (unless adapted), the heads
  (`HEAD_PATHS`), the weights the checkpoint lacked (``missing``)
  and whatever ``config.lora.train_patterns`` trains.
  """
  fmt = settings_lib.quantize_format(config)
  if not fmt:
    return None
  targets = tuple(dict.fromkeys(quantize.BLOCK_KERNELS + (tuple(config.lora.targets) or
                                                          tuple(hub.default_lora_targets(hf_config)))))
  exclude = HEAD_PATHS + tuple(re.escape(p) for p in missing) + tuple(config.lora.train_patterns)
  with settings_lib.config_errors(_QUANTIZE_NAMES):
    return quantize.QuantizeSpec(format=fmt, targets=targets, exclude=exclude,
                                 block_size=config.model.get("quantize_block", -1))


@contextlib.contextmanager
def _quantize_errors(spec: quantize.QuantizeSpec | None):
  """Re-raises a `quantize.QuantizeSpec`'s ValueError as ``config.model.quantize=...: `` and the config's names."""
  try:
    yield
  except ValueError as e:
    if spec is None or "QuantizeSpec" not in str(e):
      raise
    raise ValueError(f"config.model.quantize={spec.format!r}: "
                     f"{settings_lib.config_names(str(e), _QUANTIZE_NAMES)}") from e


def quantized_base(config: ml_collections.ConfigDict, params: Any, hf_config: Any, missing: Sequence[str]) -> Any:
  """``params`` with the kernels of `quantize_spec` quantised; ``params`` itself when quantising is off.

  Deterministic, so a resumed run (or an export) rebuilds the base its adapters trained over.
  """
  spec = quantize_spec(config, hf_config, missing)
  if spec is None:
    return params
  with _quantize_errors(spec):
    return quantize.quantize_base(params, spec)


def _bitsandbytes_has(fmt: str, block_size: int) -> bool:
  """Whether bitsandbytes stores ``fmt`` in ``block_size`` (-1: the format's default) as we do: nf4 in 64s."""
  return fmt == "nf4" and block_size in (-1, 64)


def bitsandbytes_settings(spec: quantize.QuantizeSpec, kernels: Sequence[str], hf_config: Any, *, head: str,
                          num_labels: int) -> dict[str, Any] | None:
  """``transformers.BitsAndBytesConfig`` fields that quantise exactly ``kernels`` as ``spec`` does; None if none can.

  bitsandbytes' nf4 stores blocks of 64 consecutive values of PyTorch's
  (d_out, d_in) weight with their absmax, which are our nf4 blocks of 64
  values of d_in (tests/test_quantize_bnb.py), so an nf4 spec in 64-value
  blocks has an equivalent: 4-bit nf4, no double quantisation, and every
  other ``nn.Linear`` of the transformers model skipped. Its int8
  (LLM.int8(), outlier columns kept in 16 bits) is not our int8, and it has
  no int4 or fp8.

  Args:
    spec: the run's quantisation.
    kernels: our paths of the kernels it quantises (per layer for a scanned model).
    hf_config, head, num_labels: the transformers model's config, head and outputs.
  """
  if not _bitsandbytes_has(spec.format, spec.block_size):
    return None
  layout = hf_layout.torch_layout(hf_config, head=head, num_labels=num_labels)
  kernels = set(kernels)
  if not kernels <= set(layout.linear.values()):  # a kernel bitsandbytes would not see
    return None
  return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
          "llm_int8_skip_modules": sorted(m for m, p in layout.linear.items() if p not in kernels)}


def anchor_model_kwargs(config: ml_collections.ConfigDict, head: str, num_labels: int) -> dict[str, Any]:
  """``from_pretrained`` arguments of the PEFT anchor's transformers model for ``config.model.quantize``.

  Empty without quantisation. With nf4 (64-value blocks) the model is loaded
  4-bit by bitsandbytes (`bitsandbytes_settings`), quantising the kernels our
  run quantises, to the same values: QLoRA as PEFT runs it (`run_peft_anchor`
  keeps bitsandbytes on its float32 path on a CPU).

  Raises:
    ValueError: a format bitsandbytes has no equivalent of, or AdaLoRA (`peft_anchor_method`).
  """
  if not settings_lib.quantize_format(config):
    return {}
  peft_anchor_method(config)  # the formats and methods it can run
  # Our run's base, quantised as it is read, lists the kernels it quantises
  # (its host copy is freed before the transformers model loads).
  _, params, _, hf_config, report = load_model(config, head, num_labels, quantized=True)
  spec = quantize_spec(config, hf_config, report.missing)
  kernels = [path for path, leaf in quantize.flatten_kernels(stacking.unstack_layers(params)).items()
             if quantize.is_quantized(leaf)]
  del params
  settings = bitsandbytes_settings(spec, kernels, hf_config, head=head, num_labels=num_labels)
  if settings is None:
    raise ValueError(f"config.model.quantize={spec.format!r}: some kernel it quantises is no nn.Linear of the "
                     f"transformers model, so bitsandbytes cannot quantise the same ones")
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  bits = transformers.BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **settings)
  return {"quantization_config": bits, "device_map": "cpu", "dtype": torch.float32}


def load_sharded_model(config: ml_collections.ConfigDict, head: str, num_labels: int):
  """`load_model` into host memory (each device then receives only its own slices), with the
  model's partition specs: ``(module, params, tokenizer, hf_config, report, param_specs)``.

  With ``config.model.quantize`` the frozen base is quantised there, on the
  host, kernel by kernel as the checkpoint is read (`load_model`), so the
  float model is never held whole; the partition specs then cover the
  quantised kernels' values and scales.
  """
  with jax.default_device(partitioning.host_device()):
    module, params, tokenizer, hf_config, report = load_model(config, head, num_labels, quantized=True)
  param_specs = partitioning.match_partition_rules(
      params, partitioning.rules_for(hf_config.model_type), where=f"partition rules of {hf_config.model_type}")
  return module, params, tokenizer, hf_config, report, param_specs
