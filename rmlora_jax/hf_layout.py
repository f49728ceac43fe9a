"""Our models' parameters under the names of the transformers model with the same head.

`torch_layout` inverts an architecture's weight converter
(`rmlora_jax.models.torch_port.state_dict_sources`) into a `TorchLayout`:
each Flax path's state dict key and axes, the transformers model's shapes and
linear modules. `save_merged` writes a model, ``dW`` merged into ``W0``, as a
folder ``AutoModelFor*.from_pretrained`` loads; `rmlora_jax.peft_format`
builds PEFT adapter folders on the same layout.

Needs torch and transformers (the transformers model is built on the meta
device, for its names and shapes only).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from rmlora_jax import paths as paths_lib
from rmlora_jax import stacking
from rmlora_jax.adapters import base
from rmlora_jax.adapters import registry
from rmlora_jax.models import hub
from rmlora_jax.models import torch_port

MODEL_WEIGHTS = "model.safetensors"
# Our heads -> the transformers auto class.
AUTO_CLASSES = {"base": "AutoModel", "classification": "AutoModelForSequenceClassification",
                "regression": "AutoModelForSequenceClassification", "qa": "AutoModelForQuestionAnswering",
                "image_classification": "AutoModelForImageClassification", "causal_lm": "AutoModelForCausalLM"}
# Heads whose classifier has num_labels outputs.
CLASSIFIER_HEADS = ("classification", "regression", "image_classification")


@dataclasses.dataclass(frozen=True)
class TorchLayout:
  """Our model's parameters under their names in the transformers model with the same head."""

  # The transformers class, e.g. "BertForSequenceClassification".
  model_class: str
  # Its config: the checkpoint's, with num_labels and architectures set.
  hf_config: Any
  # flax path -> (state dict key, axes): the leaf is the entry with its axes permuted
  # (`torch_port.from_state`; None: as is, (1, 0): a Linear weight's kernel).
  sources: Mapping[str, tuple[str, tuple[int, ...] | None]]
  # Every entry of the transformers model's state dict and its shape.
  shapes: Mapping[str, tuple[int, ...]]
  # Every module name of the transformers model.
  modules: tuple[str, ...]
  # Each ``nn.Linear`` module's name -> the flax path of its kernel.
  linear: Mapping[str, str]
  # State dict key -> the name ``save_pretrained`` writes it under, where they
  # differ (transformers 5 renames some modules in memory, e.g. ViT's q_proj,
  # and writes the checkpoint's names back).
  saved_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # State dict keys that are another entry's parameter again (a tied LM head,
  # ``lm_head.weight`` = the embedding): ``save_pretrained`` leaves them out and
  # ``from_pretrained`` ties them back.
  tied: frozenset[str] = frozenset()

  @property
  def paths(self) -> dict[str, str]:
    """state dict key -> flax path."""
    return {key: path for path, (key, _) in self.sources.items()}

  def kernel_module(self, path: str, *, where: str) -> str:
    """The name of the ``nn.Linear`` whose weight is the kernel at ``path``."""
    key, _ = self.sources.get(path, ("", None))
    module = key.removesuffix(".weight")
    if self.linear.get(module) != path:
      raise ValueError(f"{where}: {path!r} is not the kernel of a linear layer of {self.model_class}")
    return module


def torch_layout(hf_config: Any, *, head: str, num_labels: int) -> TorchLayout:
  """Names and shapes of the transformers model of ``hf_config`` with ``head``, and our paths for them.

  Args:
    hf_config: the checkpoint's transformers config (as `hub.load_pretrained` returns).
    head: "base", "classification", "regression", "qa", "image_classification" (ViT) or
      "causal_lm" (the decoders).
    num_labels: outputs of a classification or regression head.

  Raises:
    ValueError: a head without a transformers auto class, or an unsupported model type.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  if head not in AUTO_CLASSES:
    raise ValueError(f"torch_layout: head {head!r} has no transformers model; one of {tuple(AUTO_CLASSES)}")
  arch = hub.architecture(hf_config.model_type)
  cfg = copy.deepcopy(hf_config)
  if head in CLASSIFIER_HEADS:
    cfg.num_labels = num_labels  # keeps the config's id2label when it has num_labels entries
    if head == "regression":
      cfg.problem_type = "regression"
  with torch.device("meta"):
    model = getattr(transformers, AUTO_CLASSES[head]).from_config(cfg)
  cfg.architectures = [type(model).__name__]
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  sources = torch_port.state_dict_sources(lambda state: arch.params_from_state_dict(state, cfg, head=head)[0],
                                          shapes)
  linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
  tied = _tied_output_embedding(model)
  linear = {key.removesuffix(".weight"): path for path, (key, _) in sources.items()
            if key.endswith(".weight") and key.removesuffix(".weight") in linear_names}
  return TorchLayout(model_class=type(model).__name__, hf_config=cfg, sources=sources, shapes=shapes,
                     modules=tuple(n for n, _ in model.named_modules() if n), linear=linear,
                     saved_names=_saved_names(model), tied=tied)


def _tied_output_embedding(model: Any) -> frozenset[str]:
  """``{"lm_head.weight"}`` (the output embedding's name) when it is the input embedding again, else empty."""
  out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
  inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
  if out is None or inp is None or out.weight is not inp.weight:
    return frozenset()
  return frozenset(f"{name}.weight" for name, module in model.named_modules() if module is out)


def _saved_names(model: Any) -> dict[str, str]:
  """State dict key -> the key transformers' ``save_pretrained`` writes, for the keys it renames.

  transformers 5 maps checkpoint names to its in-memory ones on loading and
  back on saving (``revert_weight_conversion``); writing the checkpoint's
  names keeps a merged folder readable by older transformers. Empty where
  the version has no such mapping, or the mapping does more than rename.
  """
  import torch  # pylint: disable=g-import-not-at-top
  try:
    from transformers.core_model_loading import revert_weight_conversion  # pylint: disable=g-import-not-at-top
  except ImportError:  # transformers 4: the names in memory are the checkpoint's
    return {}
  state = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
  owners = {id(v): k for k, v in state.items()}
  reverted = revert_weight_conversion(model, dict(state))
  names = {owners[id(v)]: k for k, v in reverted.items() if id(v) in owners}
  if len(names) != len(state):  # a converter that splits or fuses tensors: keep the in-memory names
    return {}
  return {k: v for k, v in names.items() if k != v}


def num_labels_of(params: Any, head: str) -> int:
  """The outputs of ``params``' classification head (1 for regression, 2 otherwise unused)."""
  if head == "regression":
    return 1
  if head not in ("classification", "image_classification"):
    return 2
  flat = paths_lib.flatten_with_paths(params)
  for path in ("classifier/out_proj/kernel", "classifier/kernel"):
    if path in flat:
      return int(flat[path].shape[-1])
  raise ValueError("num_labels_of: params have no classifier/kernel or classifier/out_proj/kernel")


def to_torch(value: Any, axes: tuple[int, ...] | None) -> np.ndarray:
  """``value`` as a float32 array in PyTorch's layout (``axes`` permuted; None: as is)."""
  return np.ascontiguousarray(torch_port.to_state(np.asarray(value, np.float32), axes))


def save_merged(
    folder: str | os.PathLike,
    *,
    params: Any,
    hf_config: Any,
    head: str,
    adapters: Mapping[str, Mapping[str, Any]] | None = None,
    spec: Any = None,
    trained: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> pathlib.Path:
  """Writes the model with ``dW`` merged into ``W0`` as a Hugging Face folder.

  ``AutoModelForSequenceClassification`` (``AutoModelForQuestionAnswering``
  for head "qa", ``AutoModelForImageClassification`` for a ViT's
  "image_classification", ``AutoModelForCausalLM`` for a decoder's "causal_lm",
  ``AutoModel`` for "base") ``.from_pretrained(folder)``
  loads it with no missing or unexpected weights.

  Args:
    folder: created if needed; gets ``config.json``, ``model.safetensors``
      and, with ``tokenizer``, the tokenizer's (or image processor's) files.
    params: the base parameters (or every parameter, for full fine-tuning).
    hf_config: the base checkpoint's transformers config.
    head: the head ``params`` were built with.
    adapters, spec: adapters of any family, merged (`registry.merge`); None: none.
    trained: ``{path: value}`` trained beside the adapters (the head).
    tokenizer: a tokenizer or image processor, saved with ``save_pretrained`` when given.

  Returns:
    ``folder``.

  Raises:
    ValueError: the transformers model has a weight ``params`` do not
      provide, or of another shape.
  """
  folder = pathlib.Path(folder)
  layout = torch_layout(hf_config, head=head, num_labels=num_labels_of(params, head))
  full = base.with_head(params, dict(trained or {}))
  if adapters:
    full = registry.merge(full, adapters, spec)
  full = stacking.unstack_layers(full)  # a scanned model's layers, each under its own name
  flat = paths_lib.flatten_with_paths(full)
  paths = layout.paths
  state = {}
  for key, shape in layout.shapes.items():
    if key in layout.tied:  # the tied LM head: transformers ties it to the embedding on loading
      continue
    if key not in paths or paths[key] not in flat:
      raise ValueError(f"save_merged: {layout.model_class} has weight {key!r}, which these params do not provide")
    value = to_torch(flat[paths[key]], layout.sources[paths[key]][1])
    if value.shape != shape:
      raise ValueError(f"save_merged: {paths[key]!r} gives {key!r} the shape {value.shape}, "
                       f"{layout.model_class} needs {shape}")
    state[layout.saved_names.get(key, key)] = value
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder.mkdir(parents=True, exist_ok=True)
  save_file(state, str(folder / MODEL_WEIGHTS), metadata={"format": "pt"})
  layout.hf_config.save_pretrained(folder)
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
  return folder
