"""The image experiment end to end on tiny ViTs and synthetic images: pre-training, its HF folder, transfer."""

import json
import pathlib

import numpy as np
import pytest

from configs import cifar10_transfer, vit_pretrain
from rmlora_jax.recipes import vision as cifar
from tests.data.test_images import write_folder
from tests.experiments.conftest import set_overrides

TINY_VIT = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=24)
CLASSES = ("a", "b", "c", "d", "e", "f")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return str(write_folder(tmp_path_factory.mktemp("images"), classes=CLASSES, per_class=6))


def tiny(config, folder, workdir, **overrides):
  config.data.dir = folder
  config.data.cache_dir = str(workdir) + "_cache"
  config.workdir = str(workdir)
  config.batch_size = 8
  config.num_epochs = 2
  config.log_every_steps = 1
  config.progress = False
  return set_overrides(config, overrides)


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory):
  """A tiny ViT trained from scratch on classes a, b, c, saved as an HF folder."""
  config = tiny(vit_pretrain.get_config(), folder, tmp_path_factory.mktemp("pre") / "run",
                **{"data.classes": CLASSES[:3], **{f"model.vit.{k}": v for k, v in TINY_VIT.items()}})
  results = cifar.train_and_evaluate(config, config.workdir)
  return config, results


def test_pretraining_trains_every_weight_and_saves_a_folder_transformers_loads(pretrained, folder):
  import torch
  import transformers
  from rmlora_jax.models import hub
  config, results = pretrained
  saved = json.loads((pathlib.Path(config.workdir) / "results.json").read_text())
  assert saved["method"] == "full_ft" and saved["classes"] == ["a", "b", "c"]
  assert saved["train_images"] == 18 and saved["test_images"] == 18 and not saved["frozen_features"]
  assert {"accuracy", "loss", "train_accuracy", "train_loss", "generalization_gap"} <= set(saved["metrics"])
  assert len(saved["history"]["eval"]) == 2  # one evaluation per epoch
  folder_out = results["model_folder"]
  model, info = transformers.ViTModel.from_pretrained(folder_out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  processor = transformers.AutoImageProcessor.from_pretrained(folder_out)
  assert processor.size == {"height": 8, "width": 8}
  # Our loader reads it back; the backbones agree with transformers' on the same pixels.
  module, params, _, hf_config = hub.load_pretrained(folder_out, head="base")
  x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
  ours = np.asarray(module.apply({"params": params}, x)["last_hidden_state"])
  with torch.no_grad():
    theirs = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # And the folder is the trained model: the run's checkpoint gives transformers' features (the patch
  # kernel once came back with its height and width swapped, which a read-back alone cannot see).
  from rmlora_jax.recipes import run as run_lib
  from rmlora_jax.models import vit
  trainable, _ = run_lib.trained_state(config.workdir)
  trained = vit.module_from_hf_config(hf_config, head="image_classification", num_labels=3)
  ours = np.asarray(trained.apply({"params": trainable["params"]}, x)["last_hidden_state"])
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "rm_lora"])
def test_transfer_adapts_the_classifier_only_on_unseen_classes_and_records_table4(method, pretrained, folder,
                                                                                   tmp_path):
  config = tiny(cifar10_transfer.get_config(f"method={method}"), folder, tmp_path / "run",
                **{"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:],
                   "lora.rank": 2, "rm.num_directions": 1, "data.feature_views": 2})
  results = cifar.train_and_evaluate(config, config.workdir)
  assert results["classes"] == ["d", "e", "f"] and results["frozen_features"]
  assert results["trainable_params"] == 2 * (16 + 3)  # A (2, 16) and B (3, 2): the head itself is frozen
  assert results["adapters"]["per_matrix"].keys() == {"classifier/kernel"}
  assert 0 < results["adapters"]["per_matrix"]["classifier/kernel"]["effective_rank"] <= 2
  adapter = results["history"]["adapter"]
  assert [h["step"] for h in adapter] == [3, 6]  # 18 images, batch 8: 3 steps an epoch
  assert len(adapter[-1]["classifier/kernel"]["singular_values"]) == 3
  assert set(results["initial_metrics"]) == set(results["metrics"])
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["history"]["adapter"] == adapter and "accuracy" in saved["metrics"]


def test_attention_mlp_adapters_train_on_pixels_with_the_classifier_beside(pretrained, folder, tmp_path):
  config = tiny(cifar10_transfer.get_config("method=r_lora"), folder, tmp_path / "run",
                **{"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:],
                   "adapt": "attention_mlp", "lora.rank": 2, "num_epochs": 1, "analysis.per_epoch": False})
  results = cifar.train_and_evaluate(config, config.workdir)
  assert not results["frozen_features"] and results["steps"] == 3
  adapted = set(results["adapters"]["per_matrix"])
  assert len(adapted) == 6 and all(p.startswith("encoder/layer_0/") for p in adapted)
  # Six rank-2 adapters on 16 x 16 (four) and 16 x 24 (two) kernels, plus the trained 16 x 3 classifier.
  assert results["trainable_params"] == 4 * 2 * 32 + 2 * 2 * 40 + 16 * 3 + 3
  assert len(results["history"]["adapter"]) == 1


def test_adapters_train_over_an_int8_backbone_scored_as_over_its_dequantised_kernels(pretrained, folder, tmp_path):
  from rmlora_jax import quantize
  from rmlora_jax.recipes import run as run_lib
  overrides = {"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:],
               "adapt": "attention_mlp", "lora.rank": 2, "rm.num_directions": 1, "num_epochs": 1,
               "analysis.per_epoch": False, "model.quantize": "int8", "save_model": True}
  config = tiny(cifar10_transfer.get_config("method=rm_lora"), folder, tmp_path / "run", **overrides)
  results = cifar.train_and_evaluate(config, config.workdir)
  q = results["quantize"]
  assert q["format"] == "int8" and q["kernels"] == 6  # the block's six kernels; the classifier stays float
  # Six float32 kernels, 16 x 16 (four), 16 x 24 and 24 x 16, become int8 values and one float32 scale per
  # output column (16 each, 24 for 16 x 24).
  floats = 4 * (4 * 16 * 16 + 2 * 16 * 24)
  assert q["base_bytes_before"] - q["base_bytes_after"] == floats - (floats // 4 + 4 * (5 * 16 + 24))
  # The untrained model over the int8 backbone scores as the float model whose kernels are the dequantised values.
  model = cifar.load_model(config, 3)
  train, test = cifar.load_splits(config, model.image_size)
  task = cifar.build_task(config, model, train, test, features=False)
  dequantised = quantize.dequantize_base(run_lib.quantized_base(config, model.params, model.hf_config, model.missing))
  assert not np.array_equal(dequantised["encoder"]["layer_0"]["intermediate"]["kernel"],
                            model.params["encoder"]["layer_0"]["intermediate"]["kernel"])
  want = cifar.evaluate_params(task, model.module, dequantised, 8)
  for k, v in want.items():
    assert results["initial_metrics"][k] == pytest.approx(v, abs=1e-5), k
  # The saved model merges the adapters into the dequantised kernels.
  trainable, _ = run_lib.trained_state(config.workdir)
  from rmlora_jax.models import hub
  import rmlora_jax as rl
  _, saved, _, _ = hub.load_pretrained(results["model_folder"], head="base")
  spec = rl.LoraSpec(rank=2, alpha=config.lora.alpha, targets=tuple(trainable["adapters"]))
  merged = rl.merge(dequantised, trainable["adapters"], spec)
  np.testing.assert_allclose(saved["encoder"]["layer_0"]["intermediate"]["kernel"],
                             merged["encoder"]["layer_0"]["intermediate"]["kernel"], atol=1e-6)
  # So does the export, with a note saying so.
  from rmlora_jax.recipes import export as export_lib
  exported = export_lib.export_run(config.workdir, fmt="merged")
  note = json.loads((exported / "quantization.json").read_text())
  assert note["format"] == "int8" and len(note["kernels"]) == 6 and "dequantised" in note["note"]
  _, saved, _, _ = hub.load_pretrained(str(exported), head="base")
  np.testing.assert_allclose(saved["encoder"]["layer_0"]["attention"]["query"]["kernel"],
                             merged["encoder"]["layer_0"]["attention"]["query"]["kernel"], atol=1e-6)
  with pytest.raises(ValueError, match=r"config.model.quantize='int8': this run trains the classifier on features"):
    features = tiny(cifar10_transfer.get_config("method=lora"), folder, tmp_path / "feat",
                    **{"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:],
                       "lora.rank": 2, "model.quantize": "int8"})
    cifar.train_and_evaluate(features, features.workdir)


def test_full_ft_of_the_classifier_on_frozen_features_is_a_linear_probe_with_a_full_rank_delta(
    pretrained, folder, tmp_path):
  config = tiny(cifar10_transfer.get_config("method=full_ft"), folder, tmp_path / "run",
                **{"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:],
                   "data.feature_views": 1})
  results = cifar.train_and_evaluate(config, config.workdir)
  assert results["frozen_features"] and results["trainable_params"] == 16 * 3 + 3
  assert results["adapters"]["per_matrix"]["classifier/kernel"]["effective_rank"] == 3


def test_feature_task_matches_the_pixel_task_on_the_same_model(pretrained, folder, tmp_path):
  config = tiny(cifar10_transfer.get_config(), folder, tmp_path / "run",
                **{"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:]})
  model = cifar.load_model(config, 3)
  train, test = cifar.load_splits(config, model.image_size)
  pixels = cifar.build_task(config, model, train, test, features=False)
  features = cifar.build_task(config, model, train, test, features=True)
  from rmlora_jax.tasks import vision
  head = vision.LinearHead(3)
  a = cifar.evaluate_params(pixels, model.module, model.params, 8)
  b = cifar.evaluate_params(features, head, {"classifier": model.params["classifier"]}, 8)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k] == pytest.approx(b[k], abs=1e-5), k
  # Batches are a pure function of (seed, epoch): a resumed epoch sees the same data.
  whole = list(pixels.train_batches(8, seed=1, epoch=2, start=0))
  rest = list(pixels.train_batches(8, seed=1, epoch=2, start=1))
  for x, y in zip(whole[1:], rest):
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_bad_model_folder_and_too_large_rank_are_one_line_errors(pretrained, folder, tmp_path):
  import transformers
  bert = tmp_path / "bert"
  transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16).save_pretrained(bert)
  config = tiny(cifar10_transfer.get_config(), folder, tmp_path / "run",
                **{"model.name_or_path": str(bert), "data.classes": CLASSES[3:]})
  with pytest.raises(ValueError, match=r"is a 'bert' model, not a ViT"):
    cifar.train_and_evaluate(config, config.workdir)
  config = tiny(cifar10_transfer.get_config(), folder, tmp_path / "run2",
                **{"model.name_or_path": pretrained[1]["model_folder"], "data.classes": CLASSES[3:],
                   "lora.rank": 4, "rm.num_directions": 1})
  with pytest.raises(ValueError, match=r"config.lora.rank=4 exceeds min\(d_in, d_out\)=3 of 'classifier/kernel'"):
    cifar.train_and_evaluate(config, config.workdir)


def test_report_writes_the_table4_and_figure1_analogues_between_the_markers(tmp_path, monkeypatch):
  from experiments import vision_report
  evals = [{"step": 3 * (e + 1), "accuracy": 0.5 + 0.1 * e, "loss": 1.0 - 0.1 * e, "train_accuracy": 0.6,
            "train_loss": 0.9, "generalization_gap": 0.1 - 0.1 * e} for e in range(2)]
  for method in ("lora", "rm_lora"):
    for seed in (0, 1):
      run = tmp_path / "runs" / f"transfer_{method}_r2_s{seed}"
      run.mkdir(parents=True)
      run.joinpath("results.json").write_text(json.dumps({
          "seed": seed, "metrics": evals[-1], "initial_metrics": {"accuracy": 0.2}, "history": {"eval": evals},
          "adapters": {"summary": {"mean_effective_rank": 2.0, "mean_ortho_loss": 3.0 + seed}}}))
  doc = tmp_path / "VISION.md"
  doc.write_text(f"intro\n{vision_report.BEGIN}\nold\n{vision_report.END}\ntail\n")
  from absl import flags
  flags.FLAGS(["report", f"--runs={tmp_path / 'runs'}", f"--doc={doc}", f"--figure={tmp_path / 'fig.png'}",
               f"--pretrain={tmp_path / 'none'}"])
  vision_report.main([])
  text = doc.read_text()
  assert text.startswith("intro\n") and text.endswith("tail\n") and "old" not in text
  assert "| RM-LoRA | 2 | 2 | 2.0 ± 0.0 | 3.50 ± 0.71 | 60.0 ± 0.0 |" in text
  assert (tmp_path / "fig.png").stat().st_size > 10_000
