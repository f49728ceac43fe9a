"""A finished run as a PEFT adapter folder or a merged Hugging Face model (`export_run`).

The run's base model is rebuilt from its saved config, its trained tree read
from its latest checkpoint; ``python -m experiments.export`` is the command.
A run over a quantised base (``config.model.quantize``) quantises the loaded
base again as in training: ``merged`` merges the updates into those kernels
dequantised; ``peft`` writes the adapters as they are, for the float base
or, for an nf4 run, the base loaded 4-bit by bitsandbytes with the settings
the note gives. Both say so: a warning, and ``quantization.json`` in the
folder.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from rmlora_jax import hf_layout
from rmlora_jax import paths as paths_lib
from rmlora_jax import peft_format
from rmlora_jax import quantize
from rmlora_jax import stacking
from rmlora_jax.adapters import adalora as adalora_lib
from rmlora_jax.adapters import base as base_lib
from rmlora_jax.data import glue as glue_data
from rmlora_jax.models import hub
from rmlora_jax.recipes import run
from rmlora_jax.recipes import settings as settings_lib
from rmlora_jax.recipes import vision

EXPORT_FORMATS = ("peft", "merged")
# config.task of the image experiments (configs/cifar100.py, cifar10_transfer.py, vit_pretrain.py).
VISION_TASKS = settings_lib.VISION_TASKS
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
  config = run.saved_config(workdir, defaults)
  head, num_labels = model_head(config)
  trainable, step = run.trained_state(workdir)
  out = pathlib.Path(out) if out else workdir / fmt
  if head == IMAGE_HEAD:
    params, processor, hf_config, new, default_targets = _image_model(
        config, workdir, num_labels or _classifier_outputs(trainable))
  else:
    _, params, processor, hf_config, report = run.load_model(config, head, num_labels)
    new, default_targets = report.missing, hub.default_lora_targets(hf_config)
  quantized = run.quantize_spec(config, hf_config, new)
  if quantized is not None:
    # The base the run trained over: quantised as in training; a merged
    # model gets it dequantised, a PEFT adapter (read for shapes) the float one.
    base = run.quantized_base(config, params, hf_config, new)
    note = _quantized_note(quantized, base, fmt, hf_config=hf_config, head=head)
    logging.warning("%s", note["note"])
    if fmt == "merged":
      params = quantize.dequantize_base(base)
  if "params" in trainable:
    if fmt == "peft":
      raise ValueError(f"{str(workdir)!r} is a full fine-tuning run: it has no adapter to write in PEFT's format; "
                       f"use --format=merged")
    # Every parameter, or only the classifier of a linear probe on frozen image features.
    trained = base_lib.with_head(params, paths_lib.flatten_with_paths(trainable["params"]))
    return peft_format.save_merged(out, params=trained, hf_config=hf_config, head=head, tokenizer=processor)
  settings = settings_lib.method_settings(config, default_targets=default_targets)
  if fmt == "merged":
    folder = peft_format.save_merged(out, params=params, hf_config=hf_config, head=head,
                                     adapters=trainable["adapters"], spec=settings.spec, trained=trainable["head"],
                                     tokenizer=processor)
    if quantized is not None:
      (pathlib.Path(folder) / "quantization.json").write_text(json.dumps(note, indent=2) + "\n")
    return folder
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
  folder = peft_format.save_peft(out, params=params, adapters=trainable["adapters"], spec=settings.spec,
                                 trained=trainable["head"], hf_config=hf_config, head=head,
                                 base_model_name_or_path=config.model.name_or_path, extra_config=extra)
  if quantized is not None:
    (pathlib.Path(folder) / "quantization.json").write_text(json.dumps(note, indent=2) + "\n")
  return folder


def _quantized_note(spec: quantize.QuantizeSpec, base: Any, fmt: str, *, hf_config: Any,
                    head: str) -> dict[str, Any]:
  """What an export of a run over a quantised base says about it: the format, the kernels, a sentence.

  For a PEFT export over an nf4 base in 64-value blocks it adds ``"bitsandbytes"``: the
  ``transformers.BitsAndBytesConfig`` fields under which transformers loads
  the base model with exactly the run's kernels (bitsandbytes' nf4 blocks
  are ours, tests/test_quantize_bnb.py), the float ones skipped.
  """
  base = stacking.unstack_layers(base)  # a scanned model's kernels by their layers' paths
  flat = quantize.flatten_kernels(base)
  kernels = sorted(p for p, x in flat.items() if quantize.is_quantized(x))
  scales = quantize.describe(flat[kernels[0]]).partition(", ")[2]
  note = {"format": spec.format, "scales": scales, "kernels": kernels}
  bits = None if fmt == "merged" else run.bitsandbytes_settings(spec, kernels, hf_config, head=head,
                                                                num_labels=hf_layout.num_labels_of(base, head))
  if bits is not None:  # for the PEFT adapter's base; a merged folder is not quantised again
    note["bitsandbytes"] = bits
  if fmt == "merged":
    note["note"] = (f"the run trained over a {spec.format}-quantised base ({scales}): its {len(kernels)} quantised "
                    f"kernels are written dequantised, with the updates merged into them (not the original float "
                    f"weights)")
  elif "bitsandbytes" in note:
    note["note"] = (f"the run trained over an nf4-quantised base ({scales}); the PEFT adapter applies to the float "
                    f"base model, which differs from it by the quantisation error, unless the base is loaded with "
                    f"transformers.BitsAndBytesConfig(**bitsandbytes) (this file's fields): its 4-bit weights "
                    f"dequantise to the run's kernels")
  else:
    note["note"] = (f"the run trained over a {spec.format}-quantised base ({scales}); the PEFT adapter applies to "
                    f"the float base model, which differs from it by the quantisation error")
  return note


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
  # The vision recipe builds the ViT (a checkpoint's or one from config.model.vit, the new
  # classifier seeded by config.seed) exactly as for training.
  import transformers  # pylint: disable=g-import-not-at-top

  model = vision.load_model(config, num_labels)
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
  return model.params, processor, hf_config, model.missing, vision.targets_and_head(config)[0]

