"""An ahead-of-time pod plan: per-chip memory and FLOPs of the sharded RM-LoRA step of a decoder LLM.

For each model, mesh (``data x fsdp x model``), sequence length and remat
policy of the config, it builds the library's train step exactly as training
does (`rmlora_jax.training.make_train_step` over `rmlora_jax.methods`'
``rm_lora``: rank-r adapters attached to the frozen bf16 kernels of every
attention and MLP projection, the orthogonality penalty inside the jitted
loss, the clipped and direction-masked AdamW on the adapters only), with the
shardings of `rmlora_jax.partitioning` (``DECODER_RULES``; adapters and Adam
moments follow their kernels; with ``config.activation_sharding="batch"`` the
hidden states between layers are constrained to the batch split, without
which XLA's propagation gives up the batch split for the kernels' fsdp split
of the hidden dimension and every device computes on the whole global batch).
It lowers the step from `jax.ShapeDtypeStruct`s carrying those shardings and
compiles it, allocating nothing; then reads XLA's per-device memory
(``compiled.memory_analysis()``) and FLOPs (``compiled.cost_analysis()``) and
tabulates them against the chips' HBM, with the step time the FLOPs imply at
peak and at ``config.mfu``.

Two compilers:

* ``config.topology`` names TPU slices (``"v5e:16x16"``, ``"v5p:4x4x4"``):
  the mesh is laid over the slice's devices from
  `jax.experimental.topologies` and the step is compiled by the TPU compiler
  (libtpu), which runs on a machine without a TPU. Every case is compiled at
  full depth; the numbers are the TPU's buffer assignment, tiled layouts
  included. Run under ``scripts/tpu_env.sh``, which puts libtpu on the path
  for this process only.
* Empty ``config.topology``: fake CPU devices and XLA:CPU, the fallback
  without libtpu. XLA:CPU computes bf16 matmuls in float32 (it keeps float32
  copies of the gathered kernels) and schedules differently, so its
  temporaries are an upper estimate for a TPU. Full-depth compiles of 32 or
  80 unrolled layers are slow there; with ``config.compile_layers = (l1,
  l2)`` each case is compiled at l1 and l2 layers and extrapolated linearly
  to the full depth (``config.verify`` cases are also compiled at full depth
  to check the line).

The step times count compute only (no communication). With the layers
under `nn.scan` (``config.scan_layers``, the default) XLA's cost analysis
counts the scanned layer once, so the step times come from the analytic
FLOPs (`model_flops`) and XLA's FLOPs and bytes are left out of the tables.

Usage::

  scripts/tpu_env.sh python -m experiments.plan --config=configs/plan.py:tpu
  python -m experiments.plan --config=configs/plan.py     # fake CPU devices
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from absl import logging
from ml_collections import config_flags

from rmlora_jax import cli

# Defined when run as a program (below), not on import: the tests import this
# module beside experiments.bench, whose own --config flag would clash.
_CONFIG = None
GIB = 2**30
DEVICE_FLAG = "--xla_force_host_platform_device_count"
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# XLA:CPU's default scheduler orders for concurrency, not memory; off, the
# schedule (and so the buffer assignment) minimises memory as TPU's does.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# The memory_analysis fields tabulated, by the names the JSON uses.
MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
}
# How the hidden states between layers are sharded: "batch" over the data
# axes (a constraint), or "none" (left to XLA's sharding propagation).
ACTIVATION_SHARDINGS = ("batch", "none")
# Quantities extrapolated per layer (bytes, and FLOPs per device).
LINEAR_FIELDS = (*MEMORY_FIELDS, "total", "flops", "bytes_accessed")
# What each decoder layer keeps for the backward pass: everything ("none"),
# only its input ("full": the whole layer is recomputed) or its input and
# the matmul outputs ("dots": `jax.checkpoint_policies.dots_saveable`;
# only the elementwise work is recomputed).
REMAT_POLICIES = ("none", "full", "dots")
# The environment variable jax reads libtpu's path from (before `import libtpu`).
TPU_LIBRARY_ENV = "TPU_LIBRARY_PATH"


# --------------------------------------------------------------------------- devices


def xla_flags(num_devices: int, fast_compile: bool, current: str = "") -> str:
  """``current`` XLA flags with the fake device count, the memory scheduler (and fast compile) set."""
  ours = (DEVICE_FLAG, FAST_COMPILE_FLAG.split("=")[0], MEMORY_SCHEDULER_FLAG.split("=")[0])
  kept = [f for f in current.split() if not f.startswith(ours)]
  return " ".join([*kept, f"{DEVICE_FLAG}={num_devices}", MEMORY_SCHEDULER_FLAG,
                   *([FAST_COMPILE_FLAG] if fast_compile else [])])


def ensure_devices(num_devices: int, fast_compile: bool) -> None:
  """Re-executes this program with ``num_devices`` fake CPU devices unless it already has them.

  The device count of a process is fixed when JAX's backend starts, so it is
  set in ``XLA_FLAGS`` of a fresh process (before any JAX backend exists);
  the persistent compilation cache is turned off there, so compile times are
  real and no executables are written.
  """
  want = xla_flags(num_devices, fast_compile, os.environ.get("XLA_FLAGS", ""))
  if os.environ.get("XLA_FLAGS", "") == want and os.environ.get("JAX_PLATFORMS") == "cpu":
    return
  env = dict(os.environ, XLA_FLAGS=want, JAX_PLATFORMS="cpu", **{cli.CACHE_ENV: ""})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "experiments.plan", *sys.argv[1:]], env)


def ensure_tpu_compiler(topology: tuple[str, ...]) -> None:
  """Checks that libtpu can be loaded and re-executes on the CPU backend without the compilation cache.

  The TPU compiler needs no TPU: `jax.experimental.topologies` loads libtpu
  as a compile-only plugin beside the CPU backend. ``scripts/tpu_env.sh``
  sets the environment; this fails early with the command when it is missing.
  """
  path = os.environ.get(TPU_LIBRARY_ENV, "")
  if not os.path.isfile(path):
    try:
      import libtpu  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise RuntimeError(
          f"config.topology={topology} needs the TPU compiler, but "
          f"{TPU_LIBRARY_ENV}={path!r} is not a file and libtpu is not importable; run "
          "`scripts/tpu_env.sh install` once, then `scripts/tpu_env.sh python -m experiments.plan ...`") from None
  if os.environ.get("JAX_PLATFORMS") == "cpu" and os.environ.get(cli.CACHE_ENV) == "":
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{cli.CACHE_ENV: ""})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "experiments.plan", *sys.argv[1:]], env)


def topology_chip(config, name: str) -> str:
  """The `config.chips` entry of topology ``name`` (``"v5e:16x16"`` -> ``"v5e"``)."""
  chip = name.split(":")[0]
  if ":" not in name or chip not in config.chips:
    raise ValueError(f"config.topology entry {name!r} must be 'chip:AxB[xC]' with chip one of "
                     f"{sorted(config.chips)}")
  return chip


def topology_devices(name: str) -> list[Any]:
  """The compile-only devices of TPU slice ``name`` (one per chip), from libtpu."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)


# --------------------------------------------------------------------------- the step


def arch_of(config, name: str, num_layers: int | None = None):
  """The `LlamaArch` of ``config.archs[name]``, at ``num_layers`` layers if given."""
  from rmlora_jax.models import llama  # pylint: disable=g-import-not-at-top

  if name not in config.archs:
    raise ValueError(f"config.models names {name!r}, which config.archs does not define; "
                     f"defined: {sorted(config.archs)}")
  fields = dict(config.archs[name].to_dict())
  if num_layers is not None:
    fields["num_layers"] = num_layers
  return llama.LlamaArch(**fields)


def make_method(config):
  """RM-LoRA as the trainer builds it: low-rank adapters, penalty in the loss, masked AdamW."""
  from rmlora_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from rmlora_jax.adapters import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from rmlora_jax.models import llama  # pylint: disable=g-import-not-at-top

  spec = lora_lib.LoraSpec(rank=config.rank, alpha=config.alpha,
                           targets=tuple(config.targets) or llama.DEFAULT_LORA_TARGETS)
  options = methods_lib.RmOptions(**config.rm.to_dict())
  return methods_lib.make_method(methods_lib.MethodSettings(
      name="rm_lora", spec=spec, seed=config.seed, total_steps=1000, options=options,
      adapter_apply="low_rank"))


@dataclasses.dataclass(frozen=True)
class NextTokenTask:
  """The forward pass and loss of causal-LM fine-tuning on full sequences (what the step needs of a task)."""

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                        deterministic=deterministic, rngs=rngs)

  def loss(self, outputs, batch):
    from rmlora_jax.tasks import causal_lm  # pylint: disable=g-import-not-at-top

    return causal_lm.response_loss(outputs, batch["input_ids"], batch["loss_mask"], batch["weights"])


def parse_mesh(devices: int, model_axis: int, data_axis: int, *, where: str) -> dict[str, int] | None:
  """``{"data", "fsdp", "model"}`` sizes for ``devices``, or None when the axes do not divide it."""
  for name, value in (("model_axis", model_axis), ("data_axis", data_axis), ("devices", devices)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{where}: config.{name} entries must be positive integers, got {value!r}")
  if devices % (model_axis * data_axis):
    return None
  return {"data": data_axis, "fsdp": devices // (model_axis * data_axis), "model": model_axis}


def abstract_step(config, arch, mesh, seq_len: int, remat: str = "full"):
  """The jitted step and its abstract, sharded arguments ``(state, frozen, batch)``.

  ``remat`` is one of `REMAT_POLICIES` ("none", or the decoder's
  `llama.REMAT_POLICIES`: "full", "dots").

  Returns:
    ``(step, args, info)``: ``info`` holds the global batch, the parameter
    counts and the bytes each device holds of every argument, counted from
    the shardings' shard shapes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rmlora_jax import partitioning, quantize, training  # pylint: disable=g-import-not-at-top
  from rmlora_jax.models import llama  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(config.dtype)
  if config.activation_sharding not in ACTIVATION_SHARDINGS:
    raise ValueError(f"config.activation_sharding must be one of {ACTIVATION_SHARDINGS}, "
                     f"got {config.activation_sharding!r}")
  hidden = None if config.activation_sharding == "none" else partitioning.batch_sharding(mesh)
  module = llama.LlamaForCausalLM(arch=arch, dtype=dtype, param_dtype=dtype, remat=remat != "none",
                                  remat_policy="full" if remat == "none" else remat,
                                  activation_sharding=hidden, scan_layers=config.get("scan_layers", False))
  key = jax.random.key(config.seed)
  params = jax.eval_shape(module.init, key, jnp.ones((1, 8), jnp.int32))["params"]
  method = make_method(config)
  fmt = config.get("quantize", "")
  if fmt:
    # QLoRA: the frozen transformer-block kernels stored quantised (what
    # config.model.quantize does in training), the adapters in float32.
    spec = quantize.QuantizeSpec(format=fmt)
    params = jax.eval_shape(lambda p: quantize.quantize_base(p, spec), params)
    method = quantize.for_quantized_base(method)
  specs = partitioning.match_partition_rules(params, partitioning.DECODER_RULES, where="DECODER_RULES")
  param_sh = partitioning.named_shardings(params, specs, mesh)
  tx = method.optimizer(config.learning_rate)

  def init(key, params):
    trainable = method.init(key, params)
    return training.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))

  # The shardings training.init_state gives, derived here from shapes alone.
  abstract = jax.eval_shape(init, key, params)
  trainable_sh = partitioning.named_shardings(
      abstract.trainable,
      partitioning.follow_specs(abstract.trainable, params, specs, where="trainable tree"), mesh)
  state_sh = training.TrainState(partitioning.replicated(mesh), trainable_sh,
                                 partitioning.optimizer_shardings(tx, abstract.trainable, trainable_sh, mesh))
  frozen = method.frozen(params)
  batch_size = config.sequences_per_shard * partitioning.batch_shards(mesh)
  data = partitioning.batch_sharding(mesh)
  batch = {
      "input_ids": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=data),
      "attention_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=data),
      "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=data),
      "weights": jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=data),
  }
  place = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  args = (place(abstract, state_sh), place(frozen, param_sh), batch)
  step = training.make_train_step(module, method, tx, NextTokenTask(), seed=config.seed, mesh=mesh,
                                  state_sharding=state_sh, frozen_sharding=param_sh)
  info = {
      "global_batch": batch_size,
      "tokens": batch_size * seq_len,
      "frozen_params": sum(math.prod(x.shape) for x in jax.tree.leaves(quantize.abstract_kernels(frozen))),
      "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.trainable)),
      "counted_bytes": {name: shard_bytes(tree) for name, tree in zip(("state", "frozen", "batch"), args)},
  }
  return step, args, info


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s (the largest shard)."""
  import jax  # pylint: disable=g-import-not-at-top

  from rmlora_jax import quantize  # pylint: disable=g-import-not-at-top

  # Sub-byte values (nf4, int4) counted at their bits, packed.
  return sum(quantize.array_bytes(jax.ShapeDtypeStruct(x.sharding.shard_shape(x.shape), x.dtype))
             for x in jax.tree.leaves(tree))


def compile_case(config, model: str, mesh_sizes: dict[str, int], seq_len: int, num_layers: int,
                 remat: str = "full", devices: list[Any] | None = None) -> dict[str, Any]:
  """Lowers and compiles one case; returns XLA's per-device memory and FLOPs and the timings.

  ``devices``: the devices to lay the mesh over (a TPU topology's, compiled
  by libtpu); None: the first of this process's (fake CPU) devices.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from rmlora_jax import partitioning  # pylint: disable=g-import-not-at-top

  n = math.prod(mesh_sizes.values())
  mesh = partitioning.make_mesh(mesh_sizes, devices=(jax.devices() if devices is None else devices)[:n])
  start = time.perf_counter()
  step, args, info = abstract_step(config, arch_of(config, model, num_layers), mesh, seq_len, remat)
  lowered = step.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose buffers exceed the chip's HBM
    # even after its own rematerialisation: that case does not fit, and
    # there is no executable to analyse.
    if devices is None or "RESOURCE_EXHAUSTED" not in str(e):
      raise
    out = dict.fromkeys(LINEAR_FIELDS)
    out.update(layers=num_layers, remat=remat, scan_layers=bool(config.get("scan_layers", False)),
               quantize=config.get("quantize", ""), lower_s=lower_s, compile_s=time.perf_counter() - start,
               out_of_memory=str(e).strip().splitlines()[0], **info)
    logging.warning("%s %s seq %d remat %s: the TPU compiler ran out of memory: %s", model, mesh_sizes, seq_len,
                    remat, out["out_of_memory"])
    return out
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  out = {name: int(getattr(mem, attr)) for name, attr in MEMORY_FIELDS.items()}
  # What the device must hold at once: arguments and outputs (the donated
  # state's outputs reuse its arguments' buffers), temporaries and the code.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  out["flops"] = float(cost.get("flops", 0.0))
  out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
  out.update(layers=num_layers, remat=remat, scan_layers=bool(config.get("scan_layers", False)),
             quantize=config.get("quantize", ""), lower_s=lower_s, compile_s=compile_s, **info)
  logging.info("compiled %s %s seq %d remat %s at %d layers on %s: lower %.1f s, compile %.1f s, total %.2f GiB",
               model, mesh_sizes, seq_len, remat, num_layers, mesh.devices.flat[0].device_kind, lower_s,
               compile_s, out["total"] / GIB)
  return out


def extrapolate(low: dict[str, Any], high: dict[str, Any], num_layers: int) -> dict[str, float]:
  """Each of `LINEAR_FIELDS` at ``num_layers``, on the line through the two compiled depths."""
  l1, l2 = low["layers"], high["layers"]
  return {k: low[k] + (num_layers - l1) * (high[k] - low[k]) / (l2 - l1) for k in LINEAR_FIELDS}


# Memory fields that XLA:CPU's schedule decides, and so may not grow with depth.
SCHEDULED_FIELDS = ("temp", "total")


def memory_fell(low: dict[str, Any], high: dict[str, Any]) -> str | None:
  """Why the line through two depths says nothing about full-depth memory, or None.

  Every layer adds weights, adapters and activations, so a deeper compile
  needing fewer temporary bytes means XLA:CPU scheduled the two depths
  differently; the line through them can then fall below zero.
  """
  fell = [k for k in SCHEDULED_FIELDS if high[k] < low[k]]
  if not fell:
    return None
  return "; ".join(f"{k} fell from {low[k] / GIB:.2f} GiB at {low['layers']} layers to "
                   f"{high[k] / GIB:.2f} GiB at {high['layers']}" for k in fell)


def model_flops(arch, tokens: int, seq_len: int, remat: str) -> float:
  """Matmul FLOPs of one step from the architecture (no weight gradient of a frozen kernel).

  Per token and layer the projections cost ``2 * P_layer`` forward and the
  same again for their input gradient; attention scores and mixing
  ``4 * T * heads * D`` forward and twice that backward; the LM head
  ``2 * H * vocab`` forward and again backward. Remat "full" runs the
  layers' forward a second time ("dots" keeps the matmul outputs, so it
  recomputes none). Adapter matmuls (rank 8) are left out.
  """
  a = arch
  p_layer = (a.hidden_size * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)
             + 3 * a.hidden_size * a.intermediate_size)
  dense = 2.0 * tokens * a.num_layers * p_layer
  attention = 4.0 * tokens * seq_len * a.num_heads * a.head_dim * a.num_layers
  head = 2.0 * tokens * a.hidden_size * a.vocab_size
  return 2 * (dense + head) + 3 * attention + (dense + attention if remat == "full" else 0.0)


# --------------------------------------------------------------------------- the plan


def _verify_keys(config) -> set[tuple[str, int, int, int]]:
  keys = set()
  for entry in config.verify:
    parts = entry.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
      raise ValueError(f"config.verify entry {entry!r} must be 'model:devices:model_axis:seq_len'")
    keys.add((parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
  return keys


def check_config(config) -> None:
  """Raises ValueError naming the first bad setting."""
  if not config.models or not config.model_axis or not config.seq_lens:
    raise ValueError("config.models, config.model_axis and config.seq_lens must be non-empty")
  if not config.topology and not config.devices:
    raise ValueError("config.devices must be non-empty when config.topology is empty (fake CPU devices)")
  for name in config.models:
    if name not in config.archs:
      raise ValueError(f"config.models names {name!r}, which config.archs does not define")
  layers = tuple(config.compile_layers)
  if layers and (len(layers) != 2 or not 0 < layers[0] < layers[1]):
    raise ValueError(f"config.compile_layers must be () or two increasing depths (l1, l2), got {layers}")
  if not 0 < config.mfu <= 1:
    raise ValueError(f"config.mfu must be in (0, 1], got {config.mfu!r}")
  if isinstance(config.remat, str) or not config.remat or any(r not in REMAT_POLICIES for r in config.remat):
    raise ValueError(f"config.remat must be a non-empty tuple of {REMAT_POLICIES}, got {config.remat!r}")
  for name in config.topology:
    topology_chip(config, name)
  for entry in _verify_keys(config):
    if entry[0] not in config.models or entry[1] not in config.devices or entry[2] not in config.model_axis \
        or entry[3] not in config.seq_lens:
      raise ValueError(f"config.verify case {':'.join(map(str, entry))} is not in the grid")


def step_flops(row: dict[str, Any]) -> float:
  """The FLOPs per device the step-time columns use: XLA's count, or the model's under a scan.

  XLA's ``cost_analysis`` counts a while loop's body once, so for scanned
  layers it gives about one layer's FLOPs; the analytic count (`model_flops`,
  within 8% of XLA's on the unrolled compiles) stands in.
  """
  return row["model_flops_per_device"] if row.get("scan_layers") else row["flops"]


def _chip_columns(config, row: dict[str, Any], chips: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Fits, step times and throughput of ``row`` on each of ``chips`` (default: every `config.chips`)."""
  out = {}
  flops = None if row.get("out_of_memory") else step_flops(row)
  for chip in chips or tuple(config.chips):
    c = config.chips[chip]
    peak = c.peak_tflops * 1e12
    if row.get("out_of_memory"):
      out[chip] = {"fits": False, "step_s_peak": None, "step_s_mfu": None, "tokens_per_s_per_chip_mfu": None}
      continue
    out[chip] = {
        # None: unknown (`memory_fell`).
        "fits": None if row["total"] is None else row["total"] <= config.hbm_fraction * c.hbm_gib * GIB,
        "step_s_peak": flops / peak,
        "step_s_mfu": flops / (config.mfu * peak),
        "tokens_per_s_per_chip_mfu": row["tokens"] / (flops / (config.mfu * peak)) / row["devices"],
    }
  return out


def plan(config, on_row=None) -> dict[str, Any]:
  """Compiles (or extrapolates) every case of the grid; returns the results dict.

  Args:
    config: a `configs/plan.py` config.
    on_row: called with the results so far after each case (to write them out).
  """
  check_config(config)
  rows, checks = [], []

  def emit(row):
    rows.append(row)
    if on_row is not None:
      on_row(_results(config, rows, checks))

  if config.topology:
    _plan_topologies(config, emit)
  else:
    _plan_cpu(config, emit, checks)
  return _results(config, rows, checks)


def _plan_topologies(config, emit) -> None:
  """Every case on every TPU slice of `config.topology`, compiled by libtpu at full depth."""
  for name in config.topology:
    chip = topology_chip(config, name)
    devices = topology_devices(name)
    n = len(devices)
    for model in config.models:
      full = arch_of(config, model)
      for m in config.model_axis:
        sizes = parse_mesh(n, m, config.data_axis, where=f"topology {name}")
        if sizes is None:
          logging.warning("skipping %s (%d chips) with model=%d, data=%d: they do not divide", name, n, m,
                          config.data_axis)
          continue
        for t in config.seq_lens:
          for remat in config.remat:
            row = dict(compile_case(config, model, sizes, t, full.num_layers, remat, devices),
                       source="compiled", compiler="TPU", topology=name, device_kind=devices[0].device_kind)
            row.update(model=model, devices=n, mesh=sizes, seq_len=t,
                       model_flops_per_device=model_flops(full, row["tokens"], t, remat) / n)
            row["chips"] = _chip_columns(config, row, (chip,))
            emit(row)


def _plan_cpu(config, emit, checks) -> None:
  """Every case on fake CPU devices, compiled by XLA:CPU (extrapolated from `config.compile_layers`)."""
  import jax  # pylint: disable=g-import-not-at-top

  verify = _verify_keys(config)
  depths = tuple(config.compile_layers)
  for model in config.models:
    full = arch_of(config, model)
    for n in config.devices:
      if n > len(jax.devices()):
        raise ValueError(f"config.devices asks for {n} devices; this process has {len(jax.devices())}")
      for m in config.model_axis:
        sizes = parse_mesh(n, m, config.data_axis, where="plan")
        if sizes is None:
          logging.warning("skipping %d devices with model=%d, data=%d: they do not divide", n, m, config.data_axis)
          continue
        for t in config.seq_lens:
          for remat in config.remat:
            key = (model, n, m, t)
            if not depths or key in verify:
              row = dict(compile_case(config, model, sizes, t, full.num_layers, remat), source="compiled")
              if depths:
                low, high = (compile_case(config, model, sizes, t, d, remat) for d in depths)
                guess = extrapolate(low, high, full.num_layers)
                checks.append({"model": model, "devices": n, "mesh": sizes, "seq_len": t, "remat": remat,
                               "from_layers": depths, "compiled": {k: row[k] for k in LINEAR_FIELDS},
                               "extrapolated": guess,
                               "relative_error": {k: (guess[k] - row[k]) / row[k] if row[k] else 0.0
                                                  for k in LINEAR_FIELDS},
                               "compile_s": {"full": row["compile_s"], "low": low["compile_s"],
                                             "high": high["compile_s"]}})
            else:
              row = _extrapolated_row(config, model, sizes, t, full, remat)
            row.update(model=model, devices=n, mesh=sizes, seq_len=t, compiler="CPU", topology=None,
                       model_flops_per_device=model_flops(full, row["tokens"], t, remat) / n)
            row["chips"] = _chip_columns(config, row)
            emit(row)


def _extrapolated_row(config, model: str, sizes: dict[str, int], seq_len: int, full,
                      remat: str = "full") -> dict[str, Any]:
  """One case from compiles at ``config.compile_layers`` (or at full depth when memory falls with depth)."""
  depths = tuple(config.compile_layers)
  low, high = (compile_case(config, model, sizes, seq_len, d, remat) for d in depths)
  why = memory_fell(low, high)
  if why and config.full_depth_when_memory_falls:
    logging.warning("%s %s seq %d: %s; compiling at full depth", model, sizes, seq_len, why)
    return dict(compile_case(config, model, sizes, seq_len, full.num_layers, remat), source="compiled",
                extrapolation_refused=why)
  row = dict(high, **extrapolate(low, high, full.num_layers), layers=full.num_layers,
             source=f"extrapolated from {depths[0]} and {depths[1]} layers",
             lower_s=low["lower_s"] + high["lower_s"], compile_s=low["compile_s"] + high["compile_s"],
             compiled_depths={d: {k: x[k] for k in (*LINEAR_FIELDS, "compile_s")} for d, x in zip(depths, (low, high))})
  if why:
    # No estimate rather than a wrong one (the line went negative for some
    # 4096-token FSDP-only cases): fits is unknown.
    logging.warning("%s %s seq %d: no memory estimate: %s", model, sizes, seq_len, why)
    row.update({k: None for k in SCHEDULED_FIELDS}, memory_unknown=why)
  # Everything the shardings fix is exact at full depth, not extrapolated.
  _, _, info = abstract_step(config, full, partitioning_mesh(sizes), seq_len, remat)
  row.update(info)
  return row


def partitioning_mesh(sizes: dict[str, int]):
  """The mesh of ``sizes`` over the first devices."""
  import jax  # pylint: disable=g-import-not-at-top

  from rmlora_jax import partitioning  # pylint: disable=g-import-not-at-top

  return partitioning.make_mesh(sizes, devices=jax.devices()[:math.prod(sizes.values())])


def recommend(config, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per model, sequence length, devices (or topology), remat and chip: the mesh to use, or None when none fits.

  FLOPs do not see communication and every mesh does about the same FLOPs
  per token, so among the meshes that fit the plan takes the smallest model
  axis (tensor parallelism all-reduces activations in every layer; FSDP's
  weight gathers overlap with compute).
  """
  out = []
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault((r["model"], r["seq_len"], r["devices"], r.get("topology"), r.get("remat", "full")),
                      []).append(r)
  for (model, t, n, topology, remat), group in groups.items():
    for chip in config.chips:
      if not any(chip in r["chips"] for r in group):
        continue
      fitting = sorted((r for r in group if r["chips"][chip]["fits"]), key=lambda r: r["mesh"]["model"])
      best = fitting[0] if fitting else None
      # Meshes with a smaller model axis whose memory is unknown might fit too.
      unknown = sorted(r["mesh"]["model"] for r in group if r["chips"][chip]["fits"] is None
                       and (best is None or r["mesh"]["model"] < best["mesh"]["model"]))
      out.append({"model": model, "seq_len": t, "devices": n, "topology": topology, "remat": remat, "chip": chip,
                  "unknown_model_axes": unknown,
                  "mesh": None if best is None else best["mesh"],
                  "global_batch": None if best is None else best["global_batch"],
                  "total_gib": None if best is None else best["total"] / GIB,
                  "source": None if best is None else best["source"],
                  **({} if best is None else {k: best["chips"][chip][k] for k in
                                              ("step_s_peak", "step_s_mfu", "tokens_per_s_per_chip_mfu")})})
  return out


def _results(config, rows, checks) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  return {"config": config.to_dict(), "rows": rows, "extrapolation_checks": checks,
          "recommended": recommend(config, rows),
          "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                          "compiler": "TPU (libtpu)" if config.topology else "XLA:CPU, fake devices",
                          "tpu_library": os.environ.get(TPU_LIBRARY_ENV) if config.topology else None,
                          "devices": len(jax.devices()), "cpu_count": os.cpu_count(),
                          "load_average": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", "")}}


# --------------------------------------------------------------------------- output


def _mesh_str(sizes: dict[str, int] | None) -> str:
  return "—" if sizes is None else f"{sizes['data']}×{sizes['fsdp']}×{sizes['model']}"


def markdown_topologies(results: dict[str, Any]) -> str:
  """The TPU-compiler rows (one chip each) as a Markdown table."""
  c = results["config"]
  lines = [f"Per-chip memory and FLOPs of one RM-LoRA step, compiled by the TPU compiler (libtpu) for each "
           f"slice at full depth (rank {c['rank']}, r_hat {c['rm']['num_directions']}, {c['dtype']} weights, "
           f"{c['sequences_per_shard']} sequence(s) per data×fsdp shard). \"fits\": total ≤ "
           f"{c['hbm_fraction']:.0%} of the chip's HBM.",
           "",
           "| topology | chips | model | base | seq | remat | mesh d×f×m | batch | arg GiB | out GiB | temp GiB "
           "| code MiB | total GiB | HBM GiB | fits | TFLOP/chip (XLA) | TFLOP/chip (model) | GB accessed/chip "
           f"| s @peak | s @{c['mfu']:.0%} | tokens/s/chip @{c['mfu']:.0%} | compile s |",
           "|" + "---|" * 22]
  num = lambda v, scale, digits: "—" if v is None else f"{v / scale:.{digits}f}"
  # XLA counts a scanned layer's FLOPs and bytes once (`step_flops`): not shown.
  xla = lambda r, key: None if r.get("scan_layers") else r[key]
  for r in results["rows"]:
    chip, col = next(iter(r["chips"].items()))
    fits = "no (out of memory†)" if r.get("out_of_memory") else "yes" if col["fits"] else "no"
    lines.append(
        f"| {r['topology']} | {r['devices']} | {r['model']} | {r.get('quantize') or c['dtype']} | {r['seq_len']} | "
        f"{r['remat']} | "
        f"{_mesh_str(r['mesh'])} | {r['global_batch']} | {num(r['argument'], GIB, 2)} | {num(r['output'], GIB, 2)} | "
        f"{num(r['temp'], GIB, 2)} | {num(r['generated_code'], 2**20, 1)} | {num(r['total'], GIB, 2)} | "
        f"{c['chips'][chip]['hbm_gib']:g} | {fits} | {num(xla(r, 'flops'), 1e12, 1)} | "
        f"{r['model_flops_per_device'] / 1e12:.1f} | {num(xla(r, 'bytes_accessed'), 1e9, 0)} | "
        f"{num(col['step_s_peak'], 1, 2)} | {num(col['step_s_mfu'], 1, 2)} | "
        f"{num(col['tokens_per_s_per_chip_mfu'], 1, 0)} | {r['compile_s']:.0f} |")
  for r in results["rows"]:
    if r.get("out_of_memory"):
      lines += ["", f"† {r['topology']} {r['model']} {r['seq_len']} remat {r['remat']}: the TPU compiler refused "
                f"the program: {r['out_of_memory']}"]
  return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
  """The rows, the recommended meshes and the extrapolation checks as Markdown tables."""
  c = results["config"]
  if c.get("topology"):
    return markdown_topologies(results)
  chips = list(c["chips"])
  head = ("| model | seq | devices | mesh d×f×m | remat | batch | source | arg GiB | out GiB | temp GiB | code MiB "
          "| total GiB | TFLOP/dev (XLA) | TFLOP/dev (model) |"
          + "".join(f" {ch} fits | {ch} s @peak | {ch} s @{c['mfu']:.0%} |" for ch in chips))
  budgets = ", ".join(f"{k} {v['hbm_gib']:g} GiB" for k, v in c["chips"].items())
  lines = [f"Per-device memory and FLOPs of one RM-LoRA step on fake CPU devices, compiled by XLA:CPU (an upper "
           f"estimate for a TPU: see experiments/plan.py) (rank {c['rank']}, r_hat "
           f"{c['rm']['num_directions']}, {c['dtype']} weights, "
           f"{c['sequences_per_shard']} sequence(s) per data×fsdp shard). \"fits\": total ≤ "
           f"{c['hbm_fraction']:.0%} of {budgets}.",
           "", head, "|" + "---|" * (head.count("|") - 1)]
  gib = lambda v: "?" if v is None else f"{v / GIB:.2f}"
  for r in results["rows"]:
    src = "compiled" if r["source"] == "compiled" else "extrapolated"
    if r.get("memory_unknown"):
      src += " (memory unknown†)"
    if r.get("extrapolation_refused"):
      src += " at full depth‡"
    line = (f"| {r['model']} | {r['seq_len']} | {r['devices']} | {_mesh_str(r['mesh'])} | {r.get('remat', 'full')} | "
            f"{r['global_batch']} | "
            f"{src} | {gib(r['argument'])} | {gib(r['output'])} | {gib(r['temp'])} | "
            f"{r['generated_code'] / 2**20:.1f} | {gib(r['total'])} | "
            f"{'—' if r.get('scan_layers') else format(r['flops'] / 1e12, '.1f')} | "
            f"{r['model_flops_per_device'] / 1e12:.1f} |")
    for ch in chips:
      col = r["chips"][ch]
      fits = "?" if col["fits"] is None else ("yes" if col["fits"] else "no")
      line += f" {fits} | {col['step_s_peak']:.2f} | {col['step_s_mfu']:.2f} |"
    lines.append(line)
  if any(r.get("memory_unknown") for r in results["rows"]):
    lines += ["", "† The deeper of the two compiles needed less memory than the shallower one (XLA:CPU "
              "scheduled them differently), so the line through them says nothing about full depth; "
              "such rows have no memory estimate and are not recommended."]
  if any(r.get("extrapolation_refused") for r in results["rows"]):
    lines += ["", "‡ The deeper of the two compiles needed less memory than the shallower one, so the case "
              "was compiled at full depth instead of extrapolated (`config.full_depth_when_memory_falls`)."]
  lines += ["", f"Recommended mesh (the smallest model axis that fits), step time at {c['mfu']:.0%} MFU:", "",
            "| model | seq | devices | remat | chip | mesh d×f×m | batch | total GiB | step s @peak | step s @MFU "
            "| tokens/s/chip @MFU | source |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["recommended"]:
    unknown = ", ".join(f"model={m}" for m in r.get("unknown_model_axes", ()))
    if r["mesh"] is None:
      none = f"none fits ({unknown}: unknown)" if unknown else "none fits"
      lines.append(f"| {r['model']} | {r['seq_len']} | {r['devices']} | {r.get('remat', 'full')} | {r['chip']} | "
                   f"{none} | | | | | | |")
      continue
    src = "compiled" if r["source"] == "compiled" else "extrapolated"
    if unknown:
      src += f"; {unknown} unknown"
    lines.append(f"| {r['model']} | {r['seq_len']} | {r['devices']} | {r.get('remat', 'full')} | {r['chip']} | "
                 f"{_mesh_str(r['mesh'])} | "
                 f"{r['global_batch']} | {r['total_gib']:.2f} | {r['step_s_peak']:.2f} | {r['step_s_mfu']:.2f} | "
                 f"{r['tokens_per_s_per_chip_mfu']:.0f} | {src} |")
  if results["extrapolation_checks"]:
    fields = [k for k in LINEAR_FIELDS if k in results["extrapolation_checks"][0]["relative_error"]]
    lines += ["", "Extrapolation against a deeper compile (relative error of the extrapolated value):", "",
              "| model | devices | mesh | seq | from layers | at layers | " + " | ".join(fields) + " |",
              "|" + "---|" * (6 + len(fields))]
    for ch in results["extrapolation_checks"]:
      errs = " | ".join(f"{ch['relative_error'][k]:+.2%}" for k in fields)
      lines.append(f"| {ch['model']} | {ch['devices']} | {_mesh_str(ch['mesh'])} | {ch['seq_len']} | "
                   f"{ch['from_layers'][0]}, {ch['from_layers'][1]} | {ch.get('at_layers', 'full')} | {errs} |")
  return "\n".join(lines)


def write(results: dict[str, Any], output: str) -> None:
  """Writes the results JSON to ``output`` and the Markdown next to it (``.md``)."""
  if not output:
    return
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    f.write(json.dumps(results, indent=1, default=str))
  with open(os.path.splitext(output)[0] + ".md", "w") as f:
    f.write(markdown(results) + "\n")


def main(argv):
  del argv
  config = _CONFIG.value
  check_config(config)
  if config.topology:
    ensure_tpu_compiler(tuple(config.topology))
  else:
    ensure_devices(max(config.devices), config.fast_compile)
  start = time.perf_counter()
  results = plan(config, on_row=lambda partial: write(partial, config.output))
  results["environment"]["wall_s"] = time.perf_counter() - start
  write(results, config.output)
  print(markdown(results))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/plan.py", "Plan config.")
  cli.run(main)
