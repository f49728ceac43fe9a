"""Times the library's train step per method against the floor and PEFT.

In one process, on random weights of one BERT shape (the same weights in
every runner: ours are converted from the PyTorch model), it times

* ``make_train_step`` of `rmlora_jax.training`, as the trainer runs it (the
  gradient and the update as two programs, `training.TrainStep`), for each method of
  ``config.methods`` (any of `rmlora_jax.methods.METHODS`; by default full
  fine-tuning, LoRA, RM-LoRA, AdaLoRA), with the settings the GLUE experiment
  builds from its config (`rmlora_jax.recipes.settings.method_settings`);
* the *floor*: the same step with only the classifier and the embeddings'
  LayerNorm bias trained, so the backward pass computes the input gradient of
  every layer and no weight gradient of any matrix;
* PEFT's LoRA step (AdamW, clipping, dropout on) on transformers' PyTorch
  ``BertForSequenceClassification``, when torch and peft are installed.

The decoder shapes (``smollm2``, ``tiny-llama``) time the same runners on a
random-weight Llama (`rmlora_jax.models.llama`, the LM head tied to the
embeddings and never trained) with the SFT task's loss
(`rmlora_jax.tasks.causal_lm.InstructionTuning`: next-token cross-entropy on
the response tokens, here the last third of each row), against PEFT's LoRA
on transformers' ``LlamaForCausalLM`` with that loss written out in torch.
Their floor trains the final norm's scale and the first layer's input norm's
scale (see `floor_method`).

Runners alternate step by step, so load on a shared machine hits all alike.
Reports median seconds per step, examples/s, the ratios to PEFT and to the
floor, RM-LoRA over LoRA, compile seconds, XLA's memory estimate of the step,
and on a GPU tokens/s and MFU. Usage::

  python -m experiments.bench --config=configs/bench.py:minilm
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from ml_collections import config_flags

from rmlora_jax import cli

# Defined when run as a program (below), not on import: tests import several
# entry points in one process, and their --config flags would clash.
_CONFIG = None
NUM_LABELS = 2
HEAD = (r"classifier/.*",)
FLOOR_TRAINED = (r"classifier/.*", r"embeddings/layer_norm/bias")
# The decoder's floor: the final norm stands where the classifier does (its
# gradient needs only the LM head's input gradient); the first layer's input
# norm is the earliest parameter after the embedding lookup, so its gradient
# needs every layer's input gradient, down to the first layer's attention
# input, which is as far as any adapter's gradient reaches. Training the
# embedding table itself would add a (vocab, H) weight gradient (tied: the LM
# head's too) that no adapter method computes.
DECODER_FLOOR_TRAINED = (r"model/norm/scale", r"model/layers_0/input_layernorm/scale")
# Scanned layers are one stacked leaf: every layer's input norm (L x H values, as little work).
DECODER_FLOOR_TRAINED_SCANNED = (r"model/norm/scale", r"model/layers/input_layernorm/scale")
# Our decoder's "qv" targets; "all" is `llama.DEFAULT_LORA_TARGETS`.
DECODER_QV = (r"model/layers_\d+/self_attn/(q|v)_proj/kernel",)


def _decoder(config) -> bool:
  return config.model.family == "llama"


def _targets(config) -> tuple[str, ...]:
  """Regexes of the kernels adapted by ``config.targets`` in our model."""
  from configs import bench as bench_config  # pylint: disable=g-import-not-at-top

  if not _decoder(config):
    return bench_config.TARGETS[config.targets]
  from rmlora_jax.models import llama  # pylint: disable=g-import-not-at-top

  choices = {"qv": DECODER_QV, "all": llama.DEFAULT_LORA_TARGETS}
  if config.targets not in choices:
    raise ValueError(f"config.targets: {config.targets!r} is not one of {tuple(choices)} for a decoder")
  return choices[config.targets]


def _hf_config(config):
  import transformers  # pylint: disable=g-import-not-at-top

  m = config.model
  if _decoder(config):
    return transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=max(2048, config.seq_len))
  return transformers.BertConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
      max_position_embeddings=max(512, config.seq_len), num_labels=NUM_LABELS)


def _torch_state(hf_config, seed: int, *, decoder: bool = False):
  """A random PyTorch model (when torch is installed) and its weights as NumPy."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None
  torch.manual_seed(seed)
  model = (transformers.LlamaForCausalLM if decoder else transformers.BertForSequenceClassification)(hf_config)
  return model, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _batch(config, rng) -> dict[str, Any]:
  """Random ids and labels; the second half of the batch padded over its last quarter."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  b, t = config.batch_size, config.seq_len
  mask = np.ones((b, t), np.int32)
  mask[b // 2:, t * 3 // 4:] = 0
  return {
      "input_ids": rng.integers(1, config.model.vocab_size, size=(b, t)).astype(np.int32),
      "attention_mask": mask,
      "token_type_ids": np.zeros((b, t), np.int32),
      "labels": rng.integers(0, NUM_LABELS, size=(b,)).astype(np.int32),
      "weights": np.ones((b,), np.float32),
  }


def _decoder_batch(config, rng) -> dict[str, Any]:
  """Random ids, right-padded as SFT batches are; the loss counts the last third of each row's tokens.

  The second half of the batch is padded over its last quarter, so those
  rows' responses are their real tokens' last third.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  b, t = config.batch_size, config.seq_len
  lengths = np.full((b,), t)
  lengths[b // 2:] = t - t // 4
  positions = np.arange(t)[None]
  return {
      "input_ids": rng.integers(1, config.model.vocab_size, size=(b, t)).astype(np.int32),
      "attention_mask": (positions < lengths[:, None]).astype(np.int32),
      "loss_mask": ((positions >= lengths[:, None] - lengths[:, None] // 3)
                    & (positions < lengths[:, None])).astype(np.int32),
      "weights": np.ones((b,), np.float32),
  }


def _settings(config, entry: str):
  """MethodSettings for ``entry`` (a method name, or ``name@merge`` / ``name@low_rank``; see `variant`).

  Built by the GLUE experiment's own `rmlora_jax.recipes.settings.method_settings`
  from its default config, with this config's rank, alpha, targets, seed and
  family sections (``config.rm``, ``config.adalora``, ``config.sora``,
  ``config.lora2``), so every method is timed as ``experiments.glue`` runs it.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top

  from configs import base  # pylint: disable=g-import-not-at-top
  from rmlora_jax.recipes import settings as settings_lib  # pylint: disable=g-import-not-at-top

  name, apply, *_ = variant(entry)
  glue = base.get_config()
  glue.method, glue.seed = name, config.seed
  glue.lora.rank, glue.lora.alpha = config.rank, config.alpha
  for section in ("rm", "adalora", "sora", "lora2"):
    glue[section] = config[section].copy_and_resolve_references()
  # A decoder trains no head: its LM head is the (frozen) embedding table.
  settings = settings_lib.method_settings(glue, default_targets=_targets(config),
                                        head_patterns=() if _decoder(config) else HEAD)
  return dataclasses.replace(settings, total_steps=1000, adapter_apply="merge" if settings.spec is None else (
      apply or config.adapter_apply))


# Runner suffixes naming a quantised frozen base (`rmlora_jax.quantize.FORMATS`).
QUANTIZE_SUFFIXES = ("int8", "nf4", "int4", "fp8")


def variant(entry: str) -> tuple[str, str, bool | None, str]:
  """``(method, adapter_apply or "", scan_layers or None, quantize or "")`` of a runner such as ``lora@nf4@unrolled``.

  The suffixes: ``@merge`` / ``@low_rank`` override ``config.adapter_apply``,
  ``@scan`` / ``@unrolled`` ``config.scan_layers`` (decoders only), ``@int8``,
  ``@nf4``, ``@int4``, ``@fp8`` store the runner's frozen transformer-block
  kernels quantised (`rmlora_jax.quantize.quantize_base`, the formats'
  default scales).
  """
  name, *suffixes = entry.split("@")
  apply, scan, fmt = "", None, ""
  for suffix in suffixes:
    if suffix in ("merge", "low_rank"):
      apply = suffix
    elif suffix in ("scan", "unrolled"):
      scan = suffix == "scan"
    elif suffix in QUANTIZE_SUFFIXES:
      fmt = suffix
    else:
      raise ValueError(f"config.methods entry {entry!r}: suffix @{suffix} is not one of @merge, @low_rank, "
                       f"@scan, @unrolled, " + ", ".join(f"@{q}" for q in QUANTIZE_SUFFIXES))
  return name, apply, scan, fmt


def floor_method(weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                 trained: tuple[str, ...] = FLOOR_TRAINED):
  """A `Method` training only the parameters ``trained`` names (regexes over paths).

  The default, BERT's head and the embeddings' LayerNorm bias, and the
  decoder's `DECODER_FLOOR_TRAINED` both need a gradient that flows back
  through every layer to the embeddings, so the backward pass computes every
  input gradient and no matrix's weight gradient: the least work any adapter
  method's step can do.
  """
  from rmlora_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from rmlora_jax import paths as paths_lib  # pylint: disable=g-import-not-at-top

  def init(key, params):
    del key
    flat = paths_lib.flatten_with_paths(params)
    return {"head": {p: flat[p] for p in methods_lib.head_paths(params, trained)}}

  return methods_lib.Method(
      settings=methods_lib.MethodSettings(name="full_ft"), init=init,
      assemble=lambda trainable, frozen: methods_lib.with_head(frozen, trainable["head"]),
      penalty=methods_lib.no_penalty,
      optimizer=lambda lr: methods_lib.base_optimizer(lr, weight_decay=weight_decay,
                                                      max_grad_norm=max_grad_norm),
      frozen=lambda params: params, adapters=lambda trainable: {})


def _task(config):
  """The task whose forward pass and loss the steps run: SST-2-shaped classification, or SFT."""
  if _decoder(config):
    return _sft_task(config)
  from rmlora_jax.data import glue  # pylint: disable=g-import-not-at-top
  from rmlora_jax.tasks import classification  # pylint: disable=g-import-not-at-top

  # The benchmark feeds its own batches: the task supplies only forward, loss and predict.
  return classification.TextClassification(spec=glue.get_task("sst2"), buckets=(config.seq_len,))


def _sft_task(config):
  """`InstructionTuning` around one placeholder row: the steps use only its forward and loss."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from rmlora_jax.data import sft  # pylint: disable=g-import-not-at-top
  from rmlora_jax.tasks import causal_lm  # pylint: disable=g-import-not-at-top

  t = config.seq_len
  # The task wants held-out rows to exist; the benchmark never evaluates them.
  placeholder = sft.SftFeatures(
      input_ids=np.zeros((1, t), np.int32), loss_mask=np.zeros((1, t), np.int32),
      lengths=np.array([t]), prompt_lengths=np.array([1]),
      examples=(sft.SftExample(id="bench", prompt="", response=""),), dropped=0)
  return causal_lm.InstructionTuning(train=None, eval=placeholder, buckets=(t,), decode=lambda ids: "",
                                     eos_token_ids=(0,), pad_token_id=0)


def _jax_runner(config, module, params, method, batch) -> tuple[Callable[[], None], dict]:
  """Compiles the library's train step for ``method``; returns (one step, facts)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rmlora_jax import training  # pylint: disable=g-import-not-at-top

  mesh = training.make_mesh(1)
  rep, data = training.replicated(mesh), training.data_sharded(mesh)
  lr = 1e-5 if method.settings.name == "full_ft" else 1e-3
  tx = method.optimizer(lr)
  trainable = method.init(jax.random.key(config.seed), params)
  state = training.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  # Donated each step: no two leaves may share a buffer (as the GLUE experiment does).
  state = jax.device_put(jax.tree.map(jnp.copy, state), rep)
  frozen = jax.device_put(method.frozen(params), rep)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, data)
  step = training.make_train_step(module, method, tx, _task(config), seed=config.seed, mesh=mesh, split=True)
  start = time.perf_counter()
  grad = step.grad.lower(state, frozen, batch).compile()
  grad_s = time.perf_counter() - start
  # The update program for the gradient program's outputs, as `training.AheadOfTime` builds it.
  abstract = training._abstract  # pylint: disable=protected-access
  apply = step.apply.lower(state, *jax.tree.map(abstract, grad.out_info)).compile()
  compile_s = time.perf_counter() - start
  flops, memory = 0.0, []
  for compiled in (grad, apply):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops += float((cost or {}).get("flops", 0.0))
    mem = compiled.memory_analysis()
    if mem is not None:  # arguments + outputs + temporaries, less what donation aliases
      memory.append(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                    - mem.alias_size_in_bytes)
  facts = {
      "compile_s": compile_s,
      # Of which the gradient program (compiled once per padded length in a run; the update once).
      "compile_grad_s": grad_s,
      "xla_flops": flops,
      # The larger of the two programs' (the gradient's holds the update's inputs as its outputs).
      "memory_mib": max(memory) / 2**20 if memory else None,
      "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
  }
  holder = {"state": state}
  # An executable refuses sub-byte (nf4, int4) arguments: call the jitted step
  # itself, which reuses the same compiled programs from its own cache.
  if any(jax.dtypes.itemsize_bits(x.dtype) < 8 for x in jax.tree.leaves(frozen)):
    call = step
  else:
    call = lambda state, frozen, batch: apply(state, *grad(state, frozen, batch))

  def run():
    holder["state"], metrics = call(holder["state"], frozen, batch)
    jax.block_until_ready(metrics)

  return run, facts


def _torch_response_loss(logits, input_ids, loss_mask, weights):
  """`causal_lm.response_loss` in torch: mean next-token cross-entropy over the counted response tokens."""
  import torch  # pylint: disable=g-import-not-at-top

  ce = torch.nn.functional.cross_entropy(
      logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
      reduction="none").view(input_ids.shape[0], -1)
  counted = loss_mask[:, 1:] * weights[:, None]
  return (ce * counted).sum() / counted.sum().clamp(min=1.0)


def _peft_runner(config, torch_model, batch) -> tuple[Callable[[], None], dict] | None:
  """PEFT's LoRA step on the PyTorch model, or None when peft is not installed.

  BERT: PEFT trains the classifier too and the model computes its loss. A
  decoder: the adapters alone (the LM head is tied, frozen), with the
  response-only loss computed from the logits as our task computes it.
  """
  try:
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from configs import bench as bench_config  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  decoder = _decoder(config)
  if decoder:
    lora_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
        target_modules=list(bench_config.DECODER_PEFT_TARGETS[config.targets]), task_type="CAUSAL_LM")
  else:
    lora_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
        target_modules=list(bench_config.PEFT_TARGETS[config.targets]),
        modules_to_save=["classifier"], task_type="SEQ_CLS")
  model = peft.get_peft_model(torch_model, lora_config).to(device)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
  if decoder:
    inputs = {k: torch.tensor(batch[k], dtype=torch.long, device=device) for k in ("input_ids", "attention_mask")}
    counted = {k: torch.tensor(batch[k], dtype=torch.float32, device=device) for k in ("loss_mask", "weights")}
    compute_loss = lambda: _torch_response_loss(model(**inputs).logits, inputs["input_ids"],
                                                counted["loss_mask"], counted["weights"])
  else:
    inputs = {k: torch.tensor(batch[k], dtype=torch.long, device=device)
              for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    compute_loss = lambda: model(**inputs).loss

  def run():
    opt.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  run()  # the first step stands in for compilation
  facts = {"compile_s": time.perf_counter() - start,
           "trainable_params": sum(p.numel() for p in trainable)}
  if device == "cuda":
    facts["memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
  return run, facts


def forward_flops(config) -> float:
  """Matmul FLOPs of one forward pass of the model on one batch (a decoder's LM head included)."""
  m, t = config.model, config.seq_len
  h, i = m.hidden_size, m.intermediate_size
  if _decoder(config):
    q, kv = h, h // m.num_heads * m.num_kv_heads
    # q, k, v, o and the three MLP matrices, then scores and values over all t keys (as computed).
    per_token_layer = 2 * (2 * h * q + 2 * h * kv + 3 * h * i) + 2 * 2 * t * q
    return float(config.batch_size * t * (m.num_layers * per_token_layer + 2 * h * m.vocab_size))
  per_token_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * t * h  # dense + attention
  return float(config.batch_size * t * m.num_layers * per_token_layer)


def step_flops(config, name: str) -> float:
  """Model FLOPs of a step: forward + input gradients, plus weight gradients for full FT."""
  return forward_flops(config) * (3.0 if name == "full_ft" else 2.0)


def benchmark(config) -> dict[str, Any]:
  """Compiles and times every runner; returns the results dict (see the module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from rmlora_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from rmlora_jax import quantize  # pylint: disable=g-import-not-at-top
  from rmlora_jax import stacking  # pylint: disable=g-import-not-at-top
  from rmlora_jax.models import bert  # pylint: disable=g-import-not-at-top
  from rmlora_jax.models import llama  # pylint: disable=g-import-not-at-top

  threads = config.threads or os.cpu_count()
  decoder = _decoder(config)
  hf_config = _hf_config(config)
  torch_model, state = _torch_state(hf_config, config.seed, decoder=decoder)
  dtype = jax.numpy.dtype(config.dtype)
  if decoder:
    module = llama.LlamaForCausalLM(arch=llama.arch_from_hf_config(hf_config), dtype=dtype)
    model_lib, head, floor_trained = llama, "causal_lm", DECODER_FLOOR_TRAINED
    if config.scan_layers:
      floor_trained = DECODER_FLOOR_TRAINED_SCANNED
  else:
    module = bert.Bert(arch=bert.arch_from_hf_config(hf_config), head="classification",
                       num_labels=NUM_LABELS, dtype=dtype)
    model_lib, head, floor_trained = bert, "classification", FLOOR_TRAINED
  if state is None:
    params = module.init(jax.random.key(config.seed), **model_lib.dummy_inputs(hf_config))["params"]
  else:
    params, _ = model_lib.params_from_state_dict(state, hf_config, head=head)
    params = jax.tree.map(jax.numpy.asarray, params)
  batch = (_decoder_batch if decoder else _batch)(config, np.random.default_rng(config.seed))

  runners: dict[str, Callable[[], None]] = {}
  facts: dict[str, dict] = {}
  def layout(scan):
    """The module and params of one runner: the decoder's layers scanned (stacked weights) or unrolled."""
    scan = config.scan_layers if scan is None else scan
    if not decoder or not scan:
      return module, params
    return module.clone(scan_layers=True), stacking.stack_layers(params)

  for name in config.methods:  # "lora", "lora@merge", "lora@unrolled", "lora@nf4" (see variant)
    method = methods_lib.make_method(_settings(config, name))
    _, _, scan, fmt = variant(name)
    runner_module, runner_params = layout(scan)
    if fmt:
      runner_params = quantize.quantize_base(runner_params, quantize.QuantizeSpec(format=fmt))
      method = quantize.for_quantized_base(method)
    runners[name], facts[name] = _jax_runner(config, runner_module, runner_params, method, batch)
    if fmt:
      facts[name]["frozen_mib"] = quantize.tree_bytes(runner_params) / 2**20
  runners["floor"], facts["floor"] = _jax_runner(config, *layout(None), floor_method(trained=floor_trained), batch)
  if config.peft and torch_model is not None:
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(threads)
    peft_runner = _peft_runner(config, torch_model, batch)
    if peft_runner is not None:
      runners["peft_lora"], facts["peft_lora"] = peft_runner

  for name, run in runners.items():
    for _ in range(config.warmup):
      run()
    logging.info("compiled and warmed up %s (compile %.1f s)", name, facts[name]["compile_s"])
  times: dict[str, list[float]] = {name: [] for name in runners}
  names = list(runners)
  order_rng = np.random.default_rng(config.seed)
  for i in range(config.repeats):
    # A fresh seeded order each round, so no runner is always the one after
    # PEFT's: at the SmolLM2 shape the step run right after PEFT's took 1-3 s
    # longer (OMP_WAIT_POLICY=PASSIVE did not change that), which a fixed
    # order charged to one method (docs/BENCHMARKS.md, "PEFT's shadow").
    for name in order_rng.permutation(names):
      start = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - start)
    logging.info("repeat %d: %s", i, {k: round(v[-1], 3) for k, v in times.items()})

  profiles = {}
  if config.profile:
    for name, run in runners.items():
      if name != "peft_lora":
        profiles[name] = profile_ops(run, config.profile_steps, os.path.join(config.profile, name.replace("@", "_")))

  gpu = jax.default_backend() == "gpu"
  rows = {}
  for name, ts in times.items():
    median = statistics.median(ts)
    row = dict(facts[name], median_s=median, min_s=min(ts), times_s=ts,
               examples_per_s=config.batch_size / median,
               tokens_per_s=config.batch_size * config.seq_len / median)
    if name != "peft_lora":
      row["model_tflops_per_s"] = step_flops(config, name) / median / 1e12
      if gpu and config.gpu_peak_tflops > 0:
        row["mfu"] = row["model_tflops_per_s"] / config.gpu_peak_tflops
    if name in profiles:
      row["profile"] = profiles[name]
    rows[name] = row
  for name, row in rows.items():
    if "peft_lora" in rows:
      row["vs_peft"] = row["median_s"] / rows["peft_lora"]["median_s"]
    row["vs_floor"] = row["median_s"] / rows["floor"]["median_s"]
  summary = {}
  if "lora" in rows and "rm_lora" in rows:
    summary["rm_lora_over_lora"] = rows["rm_lora"]["median_s"] / rows["lora"]["median_s"]
  return {
      "config": config.to_dict(), "rows": rows, "summary": summary,
      "environment": {
          "backend": jax.default_backend(), "device": str(jax.devices()[0]),
          "cpu_count": os.cpu_count(), "threads": threads, "jax": jax.__version__,
          "torch": _version("torch"), "peft": _version("peft"), "machine": platform.machine(),
          "cpu": cli.cpu_description(),
          "load_average": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      },
  }


# Trace events on XLA's threads that are not ops: thread-pool markers, the executor.
_NOT_OPS = ("ThreadpoolListener", "end: ", "ThunkExecutor")


def profile_ops(run: Callable[[], None], steps: int, folder: str, top: int = 12) -> list[dict[str, Any]]:
  """Traces ``steps`` calls of ``run`` into ``folder``; the XLA ops that took the most time.

  Reads the trace back with `jax.profiler.ProfileData`: on the CPU backend
  each executed thunk (a fusion, a matmul, a copy, an RNG) is one event on
  an XLA thread, named after its HLO instruction; events that hold others
  (the executor, calls) are left out, their children counted. Events are grouped by kind
  (the name without its ``.N`` suffix) and averaged per step.

  Returns:
    Up to ``top`` kinds, most time first: ``{"op", "count", "ms"}`` per step.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  jax.profiler.start_trace(folder)
  try:
    for _ in range(steps):
      run()
  finally:
    jax.profiler.stop_trace()
  newest = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  totals: dict[str, list[float]] = {}
  for plane in jax.profiler.ProfileData.from_file(newest).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      events = sorted((e for e in line.events if not e.name.startswith(_NOT_OPS)), key=lambda e: e.start_ns)
      for event, after in zip(events, events[1:] + [None]):
        if after is not None and after.start_ns < event.start_ns + event.duration_ns:
          continue  # A container (the executor, a call): its children are counted.
        kind = re.sub(r"\.\d+$", "", event.name)
        entry = totals.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += event.duration_ns
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
  return [{"op": kind, "count": count / steps, "ms": ns / steps / 1e6} for kind, (count, ns) in ranked]


def _version(module: str) -> str | None:
  try:
    return __import__(module).__version__
  except ImportError:
    return None


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table, one row per runner."""
  c, rows = results["config"], results["rows"]
  gpu = results["environment"]["backend"] == "gpu"
  fmt = lambda v, spec: "—" if v is None else format(v, spec)
  head = ("| runner | median s | min s | examples/s | ×PEFT | ×floor | compile s | memory MiB |"
          + (" tokens/s | MFU |" if gpu else ""))
  lines = [f"{c['shape']}: batch {c['batch_size']}, seq {c['seq_len']}, rank {c['rank']}, "
           f"targets {c['targets']}, {c['repeats']} timed steps, dtype {c['dtype']}", "",
           head, "|" + "---|" * (head.count("|") - 1)]
  for name, r in rows.items():
    line = (f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['examples_per_s']:.1f} | "
            f"{fmt(r.get('vs_peft'), '.2f')} | {fmt(r.get('vs_floor'), '.2f')} | "
            f"{r['compile_s']:.1f} | {fmt(r.get('memory_mib'), '.0f')} |")
    if gpu:
      line += f" {r['tokens_per_s']:.0f} | {fmt(r.get('mfu'), '.1%')} |"
    lines.append(line)
  for key, value in results["summary"].items():
    lines.append(f"\n{key}: {value:.3f}")
  for name, r in rows.items():
    if r.get("profile"):
      lines += ["", f"{name}: where a step's {1e3 * r['median_s']:.0f} ms go (traced; XLA op kinds)", "",
                "| op | count | ms | share |", "|---|---|---|---|"]
      lines += [f"| {p['op']} | {p['count']:.0f} | {p['ms']:.1f} | {p['ms'] / 1e3 / r['median_s']:.1%} |"
                for p in r["profile"]]
  return "\n".join(lines)


def report(results: dict[str, Any], output: str = "") -> None:
  """Prints the table and the results JSON; also writes the JSON to ``output`` if set."""
  print(markdown(results))
  print(json.dumps({k: results[k] for k in ("rows", "summary")}, default=str))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      f.write(json.dumps(results, indent=1, default=str))


def main(argv):
  del argv
  config = _CONFIG.value
  if config.profile:
    # Before the backend starts: the CPU thunks are traced only with this flag.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
  report(benchmark(config), config.output)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py", "Benchmark config.")
  cli.run(main)
