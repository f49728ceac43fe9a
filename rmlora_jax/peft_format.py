"""Adapters and trained heads as PEFT adapter folders, both ways.

`save_peft` writes our adapters (`rmlora_jax.adapters`) and the leaves
trained beside them (the task head) as the folder PEFT's
``PeftModel.from_pretrained`` reads, `load_peft` reads such a folder (ours, or
one PEFT wrote) back, and `start_from` makes it a run's starting point.
Whole models with ``dW`` merged are `rmlora_jax.hf_layout.save_merged`'s
(also importable from here).

On disk (checked against peft 0.21 and transformers 5):

* ``adapter_config.json``: PEFT's config (``peft_type``, ``task_type``, ``r``,
  ``lora_alpha``, ``target_modules``, ``modules_to_save``, ...).
* ``adapter_model.safetensors``: for LoRA
  ``base_model.model.<module>.lora_A.weight`` (r, d_in) and ``.lora_B.weight``
  (d_out, r), scaled by ``lora_alpha / r`` (per module through
  ``rank_pattern``/``alpha_pattern``; ``lora_alpha / sqrt(r)`` with rsLoRA);
  for AdaLoRA ``<module>.lora_A`` (r, d_in), ``.lora_E`` (r, 1) and
  ``.lora_B`` (d_out, r) (no ``.weight``), scaled by
  ``lora_alpha / (init_r + 1e-5)``; pruned triplets are cut out and listed in
  ``rank_pattern`` (``{"<module>.lora_E": [kept, ...]}``). A module of
  ``modules_to_save`` is stored whole under its own name,
  ``base_model.model.classifier.weight``, in PyTorch's layout.

``<module>`` is the module's name in the transformers model of the same head
(``bert.encoder.layer.0.attention.self.query``), found by inverting the
architecture's weight converter (`rmlora_jax.hf_layout.torch_layout`).

LoRA, R-, GM- and RM-LoRA differ only in training and export as PEFT LoRA;
AdaLoRA as PEFT AdaLoRA; SoRA and LoRA² (and any family with ``fold=True``)
as a PEFT LoRA of their active rank whose product is their ``dW`` (gates,
singular values and scale folded into ``lora_B``, ``lora_alpha = r``).

A ViT (head "image_classification") is written in the names of
``AutoModelForImageClassification``; its PEFT folder leaves ``task_type``
unset (PEFT has none for images) and saves the trained classifier whole in
``modules_to_save``, as PEFT's image-classification guide does.

Example::

  save_peft("out/peft", params=params, adapters=trainable["adapters"], spec=spec,
            trained=trainable["head"], hf_config=hf_config, head="classification")
  # PyTorch: PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), "out/peft")
  loaded = load_peft("out/peft", params, hf_config, head="classification")
  merged = merge(with_head(params, loaded.trained), loaded.adapters, loaded.spec)

Needs torch and transformers (the transformers model is built on the meta
device, for its names and shapes only).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rmlora_jax import hf_layout
from rmlora_jax import methods as methods_lib
from rmlora_jax import paths as paths_lib
from rmlora_jax import stacking
from rmlora_jax.adapters import base
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.adapters import registry
from rmlora_jax.models import hub
from rmlora_jax.models import torch_port

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every key of a PEFT adapter file starts so (the PeftModel around the transformers model).
PEFT_PREFIX = "base_model.model."
# PEFT's AdaLoRA divides by ranknum + this (ranknum: the initial rank, never saved).
ADALORA_EPS = 1e-5
# The PEFT types `load_peft` reads.
LOADABLE_TYPES = ("LORA", "ADALORA")

# Our heads -> PEFT's task type. PEFT has none for images: its
# image-classification guide leaves task_type unset (a plain PeftModel) and
# lists the classifier in modules_to_save.
TASK_TYPES = {"base": "FEATURE_EXTRACTION", "classification": "SEQ_CLS", "regression": "SEQ_CLS",
              "qa": "QUESTION_ANS", "image_classification": None, "causal_lm": "CAUSAL_LM"}
# The head modules PEFT adds to modules_to_save itself for a task type; saved whole.
_TASK_HEAD_MODULES = {"SEQ_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
# The heads each PEFT task type may be loaded into.
_TASK_HEADS = {"SEQ_CLS": ("classification", "regression"), "QUESTION_ANS": ("qa",), "CAUSAL_LM": ("causal_lm",)}

# base_model.model.<module>.lora_A.weight (LoRA) or .lora_A (AdaLoRA).
_ADAPTER_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>A|B|E)(?P<weight>\.weight)?")

Array = jax.Array


def _number(x: float) -> int | float:
  """``x`` as an int when it is one (PEFT's configs write ``"lora_alpha": 16``)."""
  return int(x) if float(x).is_integer() else float(x)


def _model_name(name_or_path: str | os.PathLike | None) -> str | None:
  """What PEFT's base_model_name_or_path should hold: a Hub id, or an absolute folder."""
  if name_or_path is None:
    return None
  name = os.fspath(name_or_path)
  if name in hub.ALIASES or os.path.isdir(name):
    return str(hub.resolve_model_path(name).resolve())
  return name


def _peft_type(adapters: Mapping[str, Mapping[str, Any]]) -> str | None:
  """The ``peft_type`` the adapters' one family saves as unfolded (None: folded into LoRA factors)."""
  families = registry.families_of(adapters)
  if len(families) > 1:
    raise ValueError(f"save_peft: adapters mix families {[f.name for f in families]}")
  return families[0].peft_type if families else None


def target_suffixes(adapted: Iterable[str], modules: Iterable[str]) -> list[str]:
  """The shortest ``target_modules`` that select exactly ``adapted`` among ``modules``.

  PEFT selects a module named ``n`` by entry ``s`` when ``n == s`` or
  ``n.endswith("." + s)``; each adapted module gets the shortest dotted suffix
  of its name that selects no module outside ``adapted`` (``"query"``, or
  ``"attention.output.dense"`` where ``"dense"`` would also take the pooler).
  """
  adapted, modules = set(adapted), list(modules)
  out = set()
  for name in adapted:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
      suffix = ".".join(parts[-k:])
      if all(n in adapted for n in modules if n == suffix or n.endswith("." + suffix)):
        out.add(suffix)
        break
  return sorted(out)


def _head_modules(layout: hf_layout.TorchLayout, trained: Iterable[str], task_type: str | None,
                  adapted: set[str]) -> list[str]:
  """The modules_to_save holding ``trained`` leaves: the task's head module whole, else each leaf's module."""
  out = set()
  for path in trained:
    if path not in layout.sources:
      raise ValueError(f"save_peft: trained leaf {path!r} has no counterpart in {layout.model_class}")
    module = layout.sources[path][0].rpartition(".")[0]
    for whole in _TASK_HEAD_MODULES.get(task_type, ()):
      if module == whole or module.startswith(whole + "."):
        module = whole
    clash = [m for m in adapted if m == module or m.startswith(module + ".") or module.startswith(m + ".")]
    if clash:
      raise ValueError(f"save_peft: trained leaf {path!r} lies in {module!r}, which also has an adapter "
                       f"({clash[0]!r}); PEFT cannot save a module both as an adapter and whole")
    out.add(module)
  return sorted(out)


def _adapter_config(peft_type: str, *, task_type: str | None, targets: list[str], modules_to_save: list[str],
                    base_model: str | None, **fields: Any) -> dict[str, Any]:
  return {"peft_type": peft_type, "task_type": task_type, "base_model_name_or_path": base_model,
          "target_modules": targets, "modules_to_save": modules_to_save or None, "bias": "none",
          "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
          "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
          "revision": None, **fields}


def save_peft(
    folder: str | os.PathLike,
    *,
    params: Any,
    adapters: Mapping[str, Mapping[str, Any]],
    spec: Any,
    trained: Mapping[str, Any] | None = None,
    hf_config: Any,
    head: str,
    fold: bool = False,
    base_model_name_or_path: str | os.PathLike | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes adapters and trained leaves as a PEFT adapter folder.

  Args:
    folder: created if needed; gets ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the model's base parameters (trained leaves not yet in).
    adapters: ``{kernel path: adapter}`` of one family (a trainable tree's ``"adapters"``).
    spec: their `LoraSpec` (`Lora2Spec` for LoRA²); its ``scale`` multiplies every update.
    trained: ``{path: value}`` trained beside the adapters (a trainable tree's
      ``"head"``); saved as whole modules in ``modules_to_save``.
    hf_config: the base checkpoint's transformers config.
    head: the head ``params`` were built with ("classification", "regression", "qa", "base",
      "image_classification", "causal_lm"). The base model PEFT wraps must hold every
      weight the adapters sit on: an adapter on a weight it lacks (a new
      classifier) would be applied to PyTorch's random init of that weight.
    fold: write any family as a PEFT LoRA of its active rank (the default for
      families other than LoRA and AdaLoRA).
    base_model_name_or_path: the base model (an alias or folder is written as
      its absolute folder), for ``AutoPeftModel*``.
    extra_config: more ``adapter_config.json`` fields, e.g. AdaLoRA's
      ``total_step``, ``tinit``, ``tfinal``, ``target_r`` (training settings PEFT checks).

  Returns:
    ``folder``.

  Raises:
    ValueError: an adapter on a leaf that is no linear layer of the
      transformers model, adapters of mixed families or ranks, or a trained
      leaf inside an adapted module.
  """
  folder = pathlib.Path(folder)
  params = stacking.unstack_layers(params)  # a scanned model's layers by their own paths, as the adapters'
  layout = hf_layout.torch_layout(hf_config, head=head, num_labels=hf_layout.num_labels_of(params, head))
  task_type = TASK_TYPES[head]
  trained = dict(trained or {})
  flat = paths_lib.flatten_with_paths(base.with_head(params, trained))
  modules = {path: layout.kernel_module(path, where="save_peft") for path in adapters}
  kind = _peft_type(adapters)
  tensors: dict[str, np.ndarray] = {}
  if kind == "LORA" and not fold:
    peft_type = "LORA"
    fields = {"r": spec.rank, "lora_alpha": _number(spec.alpha), "rank_pattern": {}, "alpha_pattern": {}}
    for path, ad in adapters.items():
      if ad["a"].shape[0] != spec.rank:
        raise ValueError(f"save_peft: adapter {path!r} has rank {ad['a'].shape[0]}, the spec {spec.rank}")
      tensors[f"{PEFT_PREFIX}{modules[path]}.lora_A.weight"] = hf_layout.to_torch(ad["a"], None)
      tensors[f"{PEFT_PREFIX}{modules[path]}.lora_B.weight"] = hf_layout.to_torch(ad["b"], None)
  elif kind == "ADALORA" and not fold:
    r = spec.rank
    pattern = {}
    for path, ad in adapters.items():
      lam = np.asarray(ad["lam"], np.float32)
      keep = lam != 0
      if not keep.all():
        pattern[f"{modules[path]}.lora_E"] = keep.tolist()
      # Ours: alpha / r * p diag(lam) q; PEFT's: alpha / (r + 1e-5) * B diag(E) A.
      e = lam[keep] * np.float32((r + ADALORA_EPS) / r)
      tensors[f"{PEFT_PREFIX}{modules[path]}.lora_A"] = hf_layout.to_torch(np.asarray(ad["q"])[keep], None)
      tensors[f"{PEFT_PREFIX}{modules[path]}.lora_E"] = hf_layout.to_torch(e[:, None], None)
      tensors[f"{PEFT_PREFIX}{modules[path]}.lora_B"] = hf_layout.to_torch(np.asarray(ad["p"])[:, keep], None)
    peft_type = "ADALORA"
    fields = {"init_r": r, "target_r": r, "lora_alpha": _number(spec.alpha), "total_step": 1, "tinit": 0, "tfinal": 0,
              "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "rank_pattern": pattern or None}
  else:
    peft_type, ranks = "LORA", {}
    for path, (left, right) in folded_factors(params, adapters, spec).items():
      if left.shape[1]:
        ranks[path] = left.shape[1]
        tensors[f"{PEFT_PREFIX}{modules[path]}.lora_A.weight"] = hf_layout.to_torch(right, None)
        tensors[f"{PEFT_PREFIX}{modules[path]}.lora_B.weight"] = hf_layout.to_torch(left, None)
    if not ranks:
      raise ValueError("save_peft: every adapter has rank 0 (all gates or singular values are zero)")
    modules = {p: modules[p] for p in ranks}
    # Scale folded into lora_B: lora_alpha = r everywhere; the usual rank is r, others in rank_pattern.
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {modules[p]: k for p, k in ranks.items() if k != r}
    fields = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}
  adapted = set(modules.values())
  head_modules = _head_modules(layout, trained, task_type, adapted)
  paths = layout.paths
  for module in head_modules:
    for key in layout.shapes:
      if key.startswith(module + "."):
        if key not in paths:
          raise ValueError(f"save_peft: {layout.model_class} weight {key!r} of {module!r} has no counterpart here")
        tensors[PEFT_PREFIX + key] = hf_layout.to_torch(flat[paths[key]], layout.sources[paths[key]][1])
  config = _adapter_config(peft_type, task_type=task_type, targets=target_suffixes(adapted, layout.modules),
                           modules_to_save=head_modules, base_model=_model_name(base_model_name_or_path), **fields)
  config.update(extra_config or {})
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return folder


def folded_factors(params: Any, adapters: Mapping[str, Mapping[str, Any]],
                   spec: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Each adapter as ``(left, right)`` of its active rank with ``left @ right == dW`` (scale folded in).

  From the family's factored form (`registry.attach`): directions whose
  left column or right row is zero (a pruned singular value, a closed gate)
  are dropped, which leaves the product exactly as it was.

  Returns:
    ``{path: (left (d_out, r'), right (r', d_in))}`` as float32 numpy arrays.
  """
  flat = paths_lib.flatten_with_paths(params)
  kernels = {path: flat[path] for path in adapters}
  attached = registry.attach(kernels, adapters, spec)
  out = {}
  for path in adapters:
    kernel = attached[path]
    if not hasattr(kernel, "left"):
      raise ValueError(f"folded_factors: the family of {path!r} has no factored form (Family.factored)")
    left, right = np.asarray(kernel.left, np.float32), np.asarray(kernel.right, np.float32)
    keep = np.any(left != 0, axis=0) & np.any(right != 0, axis=1)
    out[path] = (left[:, keep], right[keep])
  return out


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A PEFT adapter folder read into our layout (`load_peft`).

  ``merge(with_head(params, trained), adapters, spec)`` is the model PEFT
  builds from the folder, up to float rounding.
  """

  # The folder it was read from.
  folder: pathlib.Path
  # "LORA" or "ADALORA".
  peft_type: str
  # adapter_config.json as read.
  config: Mapping[str, Any]
  # {kernel path: {"a", "b"}} (LoRA) or {"p", "lam", "q"} (AdaLoRA); each
  # module's own PEFT scaling relative to spec.scale folded into b or lam.
  adapters: Mapping[str, Mapping[str, Array]]
  # LoRA: rank r, alpha lora_alpha; AdaLoRA: rank init_r.
  spec: lora_lib.LoraSpec
  # {path: value} of modules_to_save (and any other full weights), Flax layout.
  trained: Mapping[str, Array]


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """PEFT's rank_pattern/alpha_pattern lookup: the first key whose regex ends ``module`` at a dot."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _targets(config: Mapping[str, Any], module: str) -> bool:
  """Whether PEFT's target_modules/exclude_modules select ``module`` (layers_to_transform not applied)."""
  selects = lambda spec: (re.fullmatch(spec, module) is not None if isinstance(spec, str)
                          else module in spec or any(module.endswith("." + t) for t in spec))
  if config.get("exclude_modules") and selects(config["exclude_modules"]):
    return False
  if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or ()):
    return False
  return bool(config.get("target_modules")) and selects(config["target_modules"])


def _read_folder(folder: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  if not folder.is_dir():
    raise ValueError(f"load_peft: {str(folder)!r} is not a folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
  config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
  if not config_file.is_file():
    raise ValueError(f"load_peft: {config_file} does not exist; a PEFT adapter folder holds {ADAPTER_CONFIG} and "
                     f"{ADAPTER_WEIGHTS}")
  try:
    config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"load_peft: {config_file} is not JSON ({e})") from e
  if not weights_file.is_file():
    legacy = " (it has adapter_model.bin: save it with safe_serialization=True)" if (
        folder / "adapter_model.bin").is_file() else ""
    raise ValueError(f"load_peft: {weights_file} does not exist{legacy}")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  return config, load_file(str(weights_file))


def _check_config(config: Mapping[str, Any], file: pathlib.Path, head: str) -> str:
  """The PEFT type, after refusing what `load_peft` cannot reproduce."""
  peft_type = str(config.get("peft_type"))
  if peft_type not in LOADABLE_TYPES:
    raise ValueError(f"load_peft: {file} has peft_type {peft_type!r}, which cannot be loaded; rmlora_jax reads "
                     f"{' and '.join(LOADABLE_TYPES)} adapters")
  unsupported = {"use_dora": True, "fan_in_fan_out": True, "lora_bias": True}
  for field, bad in unsupported.items():
    if config.get(field) == bad:
      raise ValueError(f"load_peft: {file} sets {field}={bad}, which rmlora_jax cannot load")
  for field in ("layer_replication", "trainable_token_indices", "target_parameters"):
    if config.get(field):
      raise ValueError(f"load_peft: {file} sets {field}, which rmlora_jax cannot load")
  task_type = config.get("task_type")
  if task_type in _TASK_HEADS and head not in _TASK_HEADS[task_type]:
    raise ValueError(f"load_peft: {file} is a {task_type} adapter, for a model with head "
                     f"{' or '.join(map(repr, _TASK_HEADS[task_type]))}, not {head!r}")
  return peft_type


def load_peft(folder: str | os.PathLike, params: Any, hf_config: Any, *, head: str) -> PeftAdapter:
  """Reads a PEFT LoRA or AdaLoRA adapter folder for our model of ``hf_config``.

  Args:
    folder: holds ``adapter_config.json`` and ``adapter_model.safetensors``
      (written by `save_peft` or by PEFT's ``save_pretrained``).
    params: our model's parameters (for shapes; e.g. from `hub.load_pretrained`).
    hf_config: its transformers config.
    head: the head ``params`` have.

  Returns:
    A `PeftAdapter`.

  Raises:
    ValueError: naming the file: it is missing; a PEFT type or option we
      cannot load (which); target modules our model does not have (an adapter
      for another architecture); a weight whose shape does not fit ours
      (another hidden size, another number of labels); a weight of a module
      our model does not have.
  """
  folder = pathlib.Path(folder)
  config, state = _read_folder(folder)
  config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
  peft_type = _check_config(config, config_file, head)
  # A scanned model's stacked kernels are read layer by layer: the adapters get per-layer paths.
  params = jax.eval_shape(stacking.unstack_layers, params)
  layout = hf_layout.torch_layout(hf_config, head=head, num_labels=hf_layout.num_labels_of(params, head))
  flat = paths_lib.flatten_with_paths(params)
  described = (f"this {hf_config.model_type} model ({layout.model_class}, modules named like "
               f"{next(iter(layout.linear))!r})")
  base_model = config.get("base_model_name_or_path")
  origin = f" (the adapter was made for {base_model!r})" if base_model else ""

  targets = config.get("target_modules")
  # PEFT expands "all-linear" itself (every linear layer but the output one).
  every_linear = targets == "all-linear"
  entries = [] if every_linear else [targets] if isinstance(targets, str) else list(targets or ())
  for entry in entries:
    sub = {"target_modules": entry if isinstance(targets, str) else [entry]}
    if not any(_targets(sub, m) for m in layout.modules):
      raise ValueError(f"load_peft: {config_file} targets {entry!r}, which matches no module of {described}"
                       f"{origin}")

  factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  trained = {}
  paths = layout.paths
  for key, value in state.items():
    if not key.startswith(PEFT_PREFIX):
      raise ValueError(f"load_peft: {weights_file} holds {key!r}, not a PEFT key ({PEFT_PREFIX}...)")
    name = key.removeprefix(PEFT_PREFIX)
    match = _ADAPTER_KEY.fullmatch(name)
    if match:
      module = match["module"]
      if module not in layout.linear:
        what = "is not a linear layer of" if module in layout.modules else "is not a module of"
        raise ValueError(f"load_peft: {weights_file} adapts {module!r}, which {what} {described}{origin}")
      factors[module][match["factor"]] = np.asarray(value, np.float32)
      continue
    if ".lora_" in name:
      raise ValueError(f"load_peft: {weights_file} holds {key!r}, a kind of adapter weight rmlora_jax cannot load")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)  # older PEFT kept the wrapper's names
    if name not in paths:
      raise ValueError(f"load_peft: {weights_file} holds {key!r}, which is not a weight of {described}{origin}")
    path = paths[name]
    leaf = np.asarray(value, np.float32)
    leaf = torch_port.from_state(leaf, layout.sources[path][1])
    if leaf.shape != tuple(flat[path].shape):
      raise ValueError(f"load_peft: {weights_file} has {key!r} of shape {tuple(value.shape)}, but {described} has "
                       f"{layout.shapes[name]} there{origin}")
    trained[path] = jnp.asarray(leaf)
  if not factors:
    raise ValueError(f"load_peft: {weights_file} holds no {peft_type} adapter weights")
  if not (every_linear or config.get("layers_to_transform") or config.get("layers_pattern")):
    lacking = sorted(m for m in layout.linear if _targets(config, m) and m not in factors)
    if lacking:
      raise ValueError(f"load_peft: {config_file} targets {len(lacking)} modules that {weights_file} has no weights "
                       f"for, e.g. {lacking[0]!r}")

  read = _read_adalora if peft_type == "ADALORA" else _read_lora
  adapters, spec = read(config, factors, layout, flat, where=str(weights_file), origin=origin)
  return PeftAdapter(folder=folder, peft_type=peft_type, config=config, adapters=adapters, spec=spec,
                     trained=trained)


def _check_factor_shapes(module: str, got: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]],
                         *, where: str, origin: str) -> None:
  for name, shape in want.items():
    if name not in got:
      raise ValueError(f"load_peft: {where} lacks lora_{name} of {module!r}")
    if got[name].shape != shape:
      raise ValueError(f"load_peft: {where} has lora_{name} of {module!r} with shape {got[name].shape}, but this "
                       f"model needs {shape}: the adapter is for a model of another size{origin}")


def _read_lora(config, factors, layout, flat, *, where, origin):
  """LoRA factors by module -> our ``{"a", "b"}`` adapters (each module's PEFT scale folded into b) and spec."""
  r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
  spec = lora_lib.LoraSpec(rank=r, alpha=alpha if alpha else float(r), targets=(".*",))
  adapters = {}
  for module, got in factors.items():
    path = layout.linear[module]
    d_in, d_out = flat[path].shape
    r_m = int(_pattern_value(config.get("rank_pattern") or {}, module, r))
    alpha_m = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
    _check_factor_shapes(module, got, {"A": (r_m, d_in), "B": (d_out, r_m)}, where=where, origin=origin)
    if set(got) != {"A", "B"}:
      extra = sorted(set(got) - {"A", "B"})[0]
      raise ValueError(f"load_peft: {where} has lora_{extra} of {module!r} in a LoRA adapter")
    scale = alpha_m / (math.sqrt(r_m) if config.get("use_rslora") else r_m)
    adapters[path] = {"a": jnp.asarray(got["A"]), "b": jnp.asarray(got["B"] * np.float32(scale / spec.scale))}
  return adapters, dataclasses.replace(spec, targets=tuple(re.escape(p) for p in adapters))


def _read_adalora(config, factors, layout, flat, *, where, origin):
  """AdaLoRA factors by module -> ``{"p", "lam", "q"}`` at init_r (pruned triplets back as zeros) and spec."""
  r = int(config.get("init_r", 12))
  alpha = float(config.get("lora_alpha", 8))
  spec = lora_lib.LoraSpec(rank=r, alpha=alpha if alpha > 0 else float(r), targets=(".*",))
  masks = {re.sub(r"\.lora_E(\.[^.]+)?$", "", k): np.asarray(v, bool)
           for k, v in (config.get("rank_pattern") or {}).items()}
  adapters = {}
  for module, got in factors.items():
    path = layout.linear[module]
    d_in, d_out = flat[path].shape
    keep = masks.get(module, np.ones(r, bool))
    if keep.shape != (r,):
      raise ValueError(f"load_peft: rank_pattern of {module!r} has {keep.size} entries, init_r is {r}")
    k = int(keep.sum())
    _check_factor_shapes(module, got, {"A": (k, d_in), "E": (k, 1), "B": (d_out, k)}, where=where, origin=origin)
    q, p, lam = np.zeros((r, d_in), np.float32), np.zeros((d_out, r), np.float32), np.zeros(r, np.float32)
    q[keep], p[:, keep] = got["A"], got["B"]
    # PEFT scales by alpha / (init_r + 1e-5), we by alpha / init_r.
    lam[keep] = got["E"][:, 0] * np.float32(r / (r + ADALORA_EPS))
    adapters[path] = {"p": jnp.asarray(p), "lam": jnp.asarray(lam), "q": jnp.asarray(q)}
  return adapters, dataclasses.replace(spec, targets=tuple(re.escape(p) for p in adapters))


def start_from(loaded: PeftAdapter, method: methods_lib.MethodSettings) -> Callable[[Any], Any]:
  """A function that puts ``loaded``'s adapters and head into a fresh trainable tree of ``method``.

  For `rmlora_jax.trainer.train_and_evaluate`'s ``init_trainable``: the run
  then starts from the model PEFT builds from the folder. Each adapter's
  scale is folded into ``b`` (``lam``) so that the run's ``alpha / rank``
  reproduces it; adapters the folder lacks keep their fresh (zero-update)
  initialisation.

  Raises:
    ValueError: a PEFT type that cannot start this method (LoRA starts LoRA,
      R-, GM- and RM-LoRA; AdaLoRA starts AdaLoRA), or ranks that differ from
      the run's. Applying the function raises ValueError for an adapter or
      head leaf the run does not train, or of another shape.
  """
  family = methods_lib.get(method.name).family
  wanted = {"LORA": "lora", "ADALORA": "adalora"}[loaded.peft_type]
  where = f"the PEFT adapter {str(loaded.folder)!r}"
  if family != wanted:
    starts = sorted(n for n, e in methods_lib.METHODS.items() if e.family == wanted)
    raise ValueError(f"{where} is a {loaded.peft_type} adapter: it can start the methods {starts}, not "
                     f"{method.name!r}")
  rank = method.spec.rank
  ratio = loaded.spec.scale / method.spec.scale
  scaled = {}
  for path, ad in loaded.adapters.items():
    r = ad["a"].shape[0] if wanted == "lora" else ad["lam"].shape[0]
    if r != rank:
      raise ValueError(f"{where} has rank {r} at {path!r}, the run's adapters rank {rank}; start the run at rank {r}")
    name = "b" if wanted == "lora" else "lam"
    scaled[path] = {**ad, name: ad[name] * ratio}

  def replace(tree: Mapping[str, Any], new: Mapping[str, Any], what: str) -> dict[str, Any]:
    out = dict(tree)
    for path, value in new.items():
      if path not in out:
        raise ValueError(f"{where} has {what} {path!r}, which the run does not train; the run trains "
                         f"{sorted(out)[:4]}{' ...' if len(out) > 4 else ''}")
      old = out[path]
      if jax.tree.structure(old) != jax.tree.structure(value) or any(
          np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(value))):
        raise ValueError(f"{where}: its {what} {path!r} does not fit the run's")
      out[path] = jax.tree.map(lambda o, v: jnp.asarray(v, o.dtype), old, value)
    return out

  def init(trainable: Mapping[str, Any]) -> dict[str, Any]:
    adapters = stacking.unstack_adapters(trainable["adapters"])  # per layer, if stored stacked
    missing = sorted(set(adapters) - set(scaled))
    if missing:
      logging.warning("%s has no adapter for %d of the run's targets (e.g. %s): they start as usual",
                      where, len(missing), missing[0])
    adapters = stacking.restack_like(replace(adapters, scaled, "an adapter on"), trainable["adapters"])
    return {**trainable, "adapters": adapters,
            "head": replace(trainable["head"], loaded.trained, "the trained weight")}

  return init


# Moved to rmlora_jax.hf_layout; importable from here as before.
save_merged = hf_layout.save_merged
torch_layout = hf_layout.torch_layout
TorchLayout = hf_layout.TorchLayout
num_labels_of = hf_layout.num_labels_of
AUTO_CLASSES = hf_layout.AUTO_CLASSES
MODEL_WEIGHTS = hf_layout.MODEL_WEIGHTS
