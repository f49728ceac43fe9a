"""The image-classification experiments from a config: CIFAR-100 (the paper's Figure 1), and offline stand-ins.

`train_and_evaluate(config, workdir)` is the run behind
``python -m experiments.vision``. It loads a ViT (a Hugging Face folder or
hub id, or, with an empty ``config.model.name_or_path``, a fresh one built
from ``config.model.vit``), the images (an ImageFolder root in
``config.data.dir``, else the hub copy ``config.data.hub_name``), keeps the
classes ``config.data.classes`` (empty: all), builds the task
(`rmlora_jax.tasks.vision`) and trains it with the shared trainer.

Adapters go where ``config.adapt`` says: ``"classifier"`` (the paper's: the
classification layer's kernel only; its W0 is the new, randomly initialised
head, frozen, and only dW = (alpha / R) B A trains) or ``"attention_mlp"``
(every attention and MLP kernel, the classifier trained beside them).
``config.lora.targets``, when set, overrides both. When only the classifier
trains and ``config.frozen_features`` is set, the backbone runs once over
``config.data.feature_views`` views of every image (cached on disk) and
training runs on those features (`vision.FeatureClassification`); there
``method="full_ft"`` trains the whole classifier (a linear probe, the
full-rank last layer), its dW = W - W0 analysed like an adapter's.
``config.model.quantize`` stores the backbone's block kernels quantised
(`rmlora_jax.recipes.run.quantized_base`) for runs whose steps read the
backbone; a frozen-features run refuses it.

Beyond the trainer's results.json, a run records:

* ``initial_metrics``: the evaluation before any training, i.e. the frozen
  random head alone (the floor of the transfer experiment);
* ``history.adapter``: at each evaluation (every epoch unless
  ``config.eval_every_steps`` says otherwise; only the end with
  ``config.analysis.per_epoch=False``) and per adapted matrix, rank(dW)
  (numerical rank, singular values above ``config.analysis.rank_rtol`` times
  the largest), ``||dW dW^T - I||_F^2`` and the singular values (also as
  TensorBoard scalars ``adapter/*``), recorded by the trainer's hooks;
* with ``config.save_model``, ``<workdir>/model``: the trained backbone as a
  Hugging Face folder (config.json, model.safetensors,
  preprocessor_config.json) that transformers' ``ViTModel`` and this
  library's loader read; the pre-training run of the offline transfer
  experiment writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmlora_jax import analysis
from rmlora_jax.recipes import run as run_lib
from rmlora_jax.recipes import settings as settings_lib
from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import paths as paths_lib
from rmlora_jax import quantize
from rmlora_jax import trainer
from rmlora_jax.adapters import base as adapters_base
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.adapters import registry
from rmlora_jax.data import cache as cache_lib
from rmlora_jax.data import images as images_lib
from rmlora_jax.models import hub
from rmlora_jax.models import vit
from rmlora_jax.tasks import vision

HEAD = "image_classification"
# config.adapt -> (adapter targets, parameters trained beside the adapters).
ADAPT = {
    "classifier": ((r"classifier/kernel",), ()),
    "attention_mlp": (vit.DEFAULT_LORA_TARGETS, (r"classifier/.*",)),
}
# The normalisation of transformers' ViTImageProcessor, for a model without a processor.
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A ViT with a classifier for the run's classes, and how its inputs are prepared."""

  module: Any
  params: Any
  hf_config: Any
  # The new (randomly initialised) parameters: the classifier, for a pre-trained backbone.
  missing: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # (height, width) of the model's input; images are resized to it.
  image_size: tuple[int, int]


def targets_and_head(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """``(adapter targets, head patterns)`` of ``config.adapt`` (``config.lora.targets`` overrides the targets)."""
  if config.adapt not in ADAPT:
    raise ValueError(f"config.adapt={config.adapt!r} must be one of {tuple(ADAPT)}")
  targets, head = ADAPT[config.adapt]
  return tuple(config.lora.targets) or targets, head


def validate(config: ml_collections.ConfigDict) -> None:
  """Every setting of an image run, checked before anything is loaded."""
  settings_lib.validate(config)
  targets, head = targets_and_head(config)
  fmt = settings_lib.quantize_format(config)
  if fmt and on_frozen_features(config, settings_lib.method_settings(config, default_targets=targets,
                                                                     head_patterns=head)):
    raise ValueError(f"config.model.quantize={fmt!r}: this run trains the classifier on features the backbone "
                     f"computes once (config.frozen_features=True), so no step reads the backbone; set "
                     f"config.frozen_features=False to train over a quantised backbone, or config.model.quantize=''")
  d = config.data
  if d.dir and not os.path.isdir(d.dir):
    raise ValueError(f"config.data.dir={d.dir!r} is not a directory (expected an ImageFolder root: "
                     f"{d.train_split}/<class>/*.jpg and {d.test_split}/<class>/*.jpg)")
  if isinstance(d.classes, str) or not all(isinstance(c, str) for c in d.classes):
    raise ValueError(f"config.data.classes must be a tuple of class names, got {d.classes!r}")
  settings_lib.check_positive_ints(config, ("data.feature_views",))
  if isinstance(d.crop_padding, bool) or not isinstance(d.crop_padding, int) or d.crop_padding < 0:
    raise ValueError(f"config.data.crop_padding must be a non-negative integer, got {d.crop_padding!r}")
  if not 0 < config.analysis.rank_rtol < 1:
    raise ValueError(f"config.analysis.rank_rtol must be in (0, 1), got {config.analysis.rank_rtol!r}")


def check_is_vit(name_or_path: str) -> None:
  """Raises a one-line ValueError unless ``name_or_path`` resolves to a folder of a ViT checkpoint."""
  try:
    folder = hub.resolve_model_path(name_or_path)
  except ValueError as e:
    raise ValueError(f"config.model.name_or_path={name_or_path!r} cannot be loaded: {e}") from e
  try:
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
  except (OSError, ValueError) as e:
    raise ValueError(f"config.model.name_or_path={name_or_path!r}: {folder / 'config.json'} is not "
                     f"readable JSON ({e})") from e
  if model_type not in vit.MODEL_TYPES:
    raise ValueError(f"config.model.name_or_path={name_or_path!r} is a {model_type!r} model, not a ViT "
                     f"(config.json model_type must be one of {vit.MODEL_TYPES})")


def scratch_config(config: ml_collections.ConfigDict) -> Any:
  """The transformers ``ViTConfig`` of ``config.model.vit`` (a model trained from scratch)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.ViTConfig(**config.model.vit.to_dict())


def load_model(config: ml_collections.ConfigDict, num_labels: int) -> LoadedModel:
  """The ViT of ``config.model`` with a ``num_labels``-way classifier (new, seeded by ``config.seed``).

  Raises:
    ValueError: a model that cannot be found or is not a ViT.
  """
  dtype = jnp.dtype(config.model.dtype)
  if not config.model.name_or_path:
    hf_config = scratch_config(config)
    module = vit.module_from_hf_config(hf_config, head=HEAD, num_labels=num_labels, dtype=dtype)
    init = jax.jit(lambda key: module.init(key, **vit.dummy_inputs(hf_config, batch=1))["params"])
    params = jax.tree.map(np.asarray, init(jax.random.key(config.seed)))
    missing = tuple(paths_lib.flatten_with_paths(params))
    mean, std = tuple(config.data.mean), tuple(config.data.std)
  else:
    check_is_vit(config.model.name_or_path)
    module, params, processor, hf_config, report = run_lib.load_model(config, HEAD, num_labels)
    missing = report.missing
    mean = tuple(getattr(processor, "image_mean", None) or config.data.mean)
    std = tuple(getattr(processor, "image_std", None) or config.data.std)
  s = vit.ViTSettings.from_hf(hf_config)
  return LoadedModel(module=module, params=params, hf_config=hf_config, missing=tuple(missing),
                     mean=tuple(float(m) for m in mean), std=tuple(float(v) for v in std),
                     image_size=tuple(s.image_size))


def load_splits(config: ml_collections.ConfigDict, image_size: tuple[int, int]):
  """``(train, test)`` `images.ImageSplit`s of the configured classes, at ``image_size``."""
  d = config.data
  if d.dir:
    load = lambda split: images_lib.load_image_folder(d.dir, split, image_size=image_size, classes=d.classes)
  else:
    load = lambda split: images_lib.load_hub(d.hub_name, split, image_size=image_size, classes=d.classes)
  train, test = load(d.train_split), load(d.test_split)
  if train.class_names != test.class_names:
    raise ValueError(f"config.data: the {d.train_split!r} split has classes {list(train.class_names)} but "
                     f"{d.test_split!r} has {list(test.class_names)}; give config.data.classes")
  if train.num_classes < 2:
    raise ValueError(f"config.data.classes={list(train.class_names)}: need at least two classes")
  return train, test


def trains_classifier_only(settings: methods_lib.MethodSettings, adapt: str) -> bool:
  """Whether every trained parameter and adapter of ``settings`` lives in ``classifier/``.

  Full fine-tuning counts as such with ``adapt="classifier"``: on frozen
  features it trains the whole classifier, the full-rank last layer (a linear probe).
  """
  if not methods_lib.get(settings.name).adapts:
    return adapt == "classifier"
  patterns = tuple(settings.spec.targets) + tuple(settings.train_patterns)
  return all(p.startswith("classifier/") for p in patterns)


def on_frozen_features(config: ml_collections.ConfigDict, settings: methods_lib.MethodSettings) -> bool:
  """Whether the run trains on features the backbone computes once (``config.frozen_features``, classifier only)."""
  return bool(config.frozen_features) and trains_classifier_only(settings, config.adapt)


def _cache_key(config: ml_collections.ConfigDict, model: LoadedModel, split: str) -> str:
  d = config.data
  source = {"dir": os.path.abspath(d.dir) if d.dir else None, "hub": None if d.dir else d.hub_name}
  weights = None
  if config.model.name_or_path:
    folder = hub.resolve_model_path(config.model.name_or_path)
    weights = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.glob("*.safetensors"))]
  key = {"model": config.model.name_or_path, "weights": weights, "dtype": config.model.dtype,
         # A model built from scratch depends on the seed; a loaded backbone does not.
         "seed": None if config.model.name_or_path else config.seed, "split": split, "classes": list(d.classes),
         "views": d.feature_views, "feature_seed": d.feature_seed, "crop": d.crop_padding, "flip": d.flip,
         "mean": model.mean, "std": model.std, **source}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(config, model: LoadedModel, split: str, images: images_lib.ImageSplit,
                    views: int) -> vision.FeatureSplit:
  """`vision.extract_features` of a split, read from or written to the feature cache."""
  file = cache_lib.folder(config.data.cache_dir, "vision_features") / f"{_cache_key(config, model, split)}_{views}.npz"
  cached = cache_lib.load(file, ("features", "labels"))
  if cached is not None and np.array_equal(cached["labels"], images.labels):
    return vision.FeatureSplit(cached["features"], cached["labels"])
  features = vision.extract_features(model.module, model.params, images, views=views,
                                     seed=config.data.feature_seed, mean=model.mean, std=model.std,
                                     crop_padding=config.data.crop_padding, flip=config.data.flip)
  cache_lib.save(file, {"features": features.features, "labels": features.labels}, compress=False)
  return features


def build_task(config: ml_collections.ConfigDict, model: LoadedModel, train, test, *, features: bool):
  """The task: `vision.FeatureClassification` on cached features, else `vision.ImageClassification`."""
  if features:
    return vision.FeatureClassification(
        name=config.task, train=cached_features(config, model, config.data.train_split, train,
                                                config.data.feature_views + 1),
        evals={"test": cached_features(config, model, config.data.test_split, test, 1)})
  return vision.ImageClassification(name=config.task, train=train, evals={"test": test}, mean=model.mean,
                                    std=model.std, crop_padding=config.data.crop_padding, flip=config.data.flip)


def evaluate_params(task: Any, module: Any, params: Any, batch_size: int) -> dict[str, float]:
  """``task.evaluate`` of fixed ``params`` (no training): the frozen random head's floor."""
  step = jax.jit(lambda p, b: task.predict(task.forward(module, p, b, deterministic=True, rngs=None), b))
  return task.evaluate(lambda batch: step(params, batch), batch_size)


def adapter_measures(adapters: Any, spec: Any, rtol: float) -> dict[str, Any]:
  """rank(dW), ``||dW dW^T - I||_F^2`` and the singular values of every adapter (host arrays)."""
  report = analysis.delta_report(registry.delta_factors(adapters, spec), rtol=rtol, spectra=True)
  return report["per_matrix"]


def _write_adapter_scalars(workdir: pathlib.Path, history: list[dict[str, Any]]) -> None:
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

  writer = SummaryWriter(str(workdir / "tensorboard"), filename_suffix=".adapter")
  for entry in history:
    for path, m in entry.items():
      if path == "step":
        continue
      tag = re.sub(r"/kernel$", "", path)
      writer.add_scalar(f"adapter/{tag}/effective_rank", m["effective_rank"], entry["step"])
      writer.add_scalar(f"adapter/{tag}/ortho_loss", m["ortho_loss"], entry["step"])
      for i, v in enumerate(m["singular_values"][:16]):
        writer.add_scalar(f"adapter/{tag}/singular_value_{i}", v, entry["step"])
  writer.close()


def save_backbone(folder: pathlib.Path, params: Any, model: LoadedModel) -> pathlib.Path:
  """Writes the ViT backbone of ``params`` as a Hugging Face ``ViTModel`` folder, with its image processor.

  The classifier is dropped; ``ViTModel``'s pooler, which image
  classification never uses, is written freshly initialised so that the
  folder loads with no missing weights.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  from rmlora_jax import peft_format  # pylint: disable=g-import-not-at-top

  hf_config = model.hf_config
  base_module = vit.module_from_hf_config(hf_config, head="base", num_labels=2)
  fresh = jax.jit(lambda key: base_module.init(key, **vit.dummy_inputs(hf_config, batch=1))["params"])(
      jax.random.key(0))
  backbone = {k: v for k, v in params.items() if k != "classifier"}
  backbone["pooler"] = jax.tree.map(np.asarray, fresh["pooler"])
  peft_format.save_merged(folder, params=backbone, hf_config=hf_config, head="base")
  h, w = model.image_size
  transformers.ViTImageProcessor(do_resize=True, size={"height": h, "width": w}, image_mean=list(model.mean),
                                 image_std=list(model.std)).save_pretrained(folder)
  return folder


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Runs (or resumes) one image-classification run and returns its results dict."""
  validate(config)
  mesh = run_lib.start(config)
  workdir = run_lib.resolve_workdir(config, workdir, task=config.task)
  num_classes = len(config.data.classes) or None
  if num_classes is None:  # every class of the source: count them before building the classifier
    d = config.data
    num_classes = (len(images_lib.list_image_folder(d.dir, d.train_split)) if d.dir else
                   len(_hub_class_names(d.hub_name, d.train_split)))
  with jax.default_device(partitioning.host_device()):
    model = load_model(config, num_classes)
  targets, head = targets_and_head(config)
  method = settings_lib.method_settings(config, default_targets=targets, head_patterns=head)
  if method.spec is not None:
    with settings_lib.config_errors():  # a rank larger than the layer allows, a target matching nothing
      lora_lib.select_targets(model.params, method.spec, where="config.lora.targets")
  train, test = load_splits(config, model.image_size)
  features = on_frozen_features(config, method)
  task = build_task(config, model, train, test, features=features)
  module, params = model.module, model.params
  fmt = settings_lib.quantize_format(config)  # never with features (validate)
  if features:
    module = vision.LinearHead(num_classes, dtype=jnp.dtype(config.model.dtype))
    params = {"classifier": params["classifier"]}
  elif fmt:
    with jax.default_device(partitioning.host_device()):
      params = run_lib.quantized_base(config, params, model.hf_config, model.missing)
  param_specs = partitioning.match_partition_rules(params, partitioning.rules_for("vit"),
                                                   where="partition rules of vit") if not features else None
  settings = settings_lib.trainer_settings(config)
  spec = None if method.spec is None else methods_lib.make_method(method).settings.spec
  rtol = config.analysis.rank_rtol
  summary = {**settings_lib.summary(config), "classes": list(train.class_names), "train_images": len(train),
             "test_images": len(test), "frozen_features": features, "adapt": config.adapt,
             "rank_rtol": rtol}
  if config.score_initial:
    summary["initial_metrics"] = evaluate_params(task, module, params, settings.batch_size)

  def after_eval(step, trainable, metrics, history):
    # Kept in the trainer's history, so a resumed run keeps the epochs before it.
    adapters = jax.tree.map(np.asarray, partitioning.gather(trainable["adapters"]))
    history.setdefault("adapter", []).append({"step": int(step), **adapter_measures(adapters, spec, rtol)})

  def at_end(results, trainable):
    if spec is not None:
      adapters = jax.tree.map(np.asarray, trainable["adapters"])
      # One factored SVD of each update gives the last history entry, the
      # spectra and results["adapters"] (its measures without the spectra).
      report = analysis.delta_report(registry.delta_factors(adapters, spec), rtol=rtol, spectra=True)
      history = results["history"].setdefault("adapter", [])
      if not history or history[-1]["step"] != results["steps"]:
        history.append({"step": results["steps"], **report["per_matrix"]})
      results["adapter_spectra"] = {p: m["singular_values"] for p, m in report["per_matrix"].items()}
      results["adapters"] = {"summary": report["summary"],
                             "per_matrix": {p: {k: v for k, v in m.items() if k != "singular_values"}
                                            for p, m in report["per_matrix"].items()}}
    elif features:  # full_ft of the classifier alone: dW = W - W0, of full rank
      dw = np.asarray(trainable["params"]["classifier"]["kernel"] - params["classifier"]["kernel"]).T
      results["adapters"] = analysis.delta_report({"classifier/kernel": dw}, rtol=rtol)
      results["adapter_spectra"] = {"classifier/kernel": [float(v) for v in analysis.singular_values(dw)]}
    if config.save_model:
      # Over a quantised base the adapters trained against its dequantised kernels: merged into those.
      base = quantize.dequantize_base(params) if fmt else model.params
      trained = _merged_params(base, trainable, method)
      results["model_folder"] = str(save_backbone(workdir / "model", trained, model))
    if spec is not None and jax.process_index() == 0:
      _write_adapter_scalars(workdir, results["history"]["adapter"])
    return results

  per_epoch = config.analysis.per_epoch and spec is not None
  hooks = trainer.Hooks(after_eval=after_eval if per_epoch else None, at_end=at_end)
  with settings_lib.config_errors():
    return trainer.train_and_evaluate(task, module, params, method, settings, workdir, mesh=mesh,
                                      param_specs=param_specs, extra_results=summary, hooks=hooks)


def _merged_params(params: Any, trainable: Any, method: methods_lib.MethodSettings) -> Any:
  """The whole trained model: full fine-tuning's params, or W0 with the head and adapters merged in."""
  if "params" in trainable:
    return jax.tree.map(np.asarray, trainable["params"])
  merged = registry.merge(adapters_base.with_head(params, trainable["head"]), trainable["adapters"], method.spec)
  return jax.tree.map(np.asarray, merged)


def _hub_class_names(name: str, split: str) -> tuple[str, ...]:
  try:
    import datasets  # pylint: disable=g-import-not-at-top
    features = datasets.load_dataset_builder(name).info.features
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"hub dataset {name!r} cannot be read ({type(e).__name__}: {e}); offline, give an "
                     f"ImageFolder root as config.data.dir") from e
  key = next((k for k in ("fine_label", "label") if k in features), None)
  if key is None:
    raise ValueError(f"hub dataset {name!r} ({split}) has no fine_label or label column")
  return tuple(features[key].names)
