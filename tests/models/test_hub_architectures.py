"""`load_pretrained` end to end for DeBERTa-v2 and ViT checkpoints saved by transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest
import torch
import transformers

import rmlora_jax as rl
from rmlora_jax.models import default_lora_targets, load_pretrained

TOL = 1e-4


def _perturb(model):
  # Random (not init-default) values everywhere, so a dropped or swapped
  # parameter cannot hide behind ones, zeros or near-uniform attention.
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def test_deberta_v3_classifier_through_loader(tmp_path):
  config = transformers.DebertaV2Config(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, relative_attention=True,
      pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
      norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
      type_vocab_size=0, num_labels=3)
  torch.manual_seed(0)
  ref = _perturb(transformers.DebertaV2ForSequenceClassification(config))
  ref.save_pretrained(tmp_path)
  module, params, tokenizer, hf_config, report = load_pretrained(
      tmp_path, head="classification", num_labels=3, return_report=True)
  assert tokenizer is None and hf_config.model_type == "deberta-v2"
  assert report.missing == () and report.unexpected == ()

  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, size=(3, 20)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 14:] = 0
  mask[2, 7:] = 0
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m))(params, ids, mask)
  np.testing.assert_allclose(np.asarray(out["logits"]), expected, atol=TOL, rtol=0)
  # The default LoRA targets select the six matrices of every layer.
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=default_lora_targets(hf_config))
  assert len(rl.init_lora(jax.random.key(0), params, spec)) == 6 * 2


def test_vit_image_classifier_through_loader(tmp_path):
  config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, num_labels=5)
  torch.manual_seed(0)
  ref = _perturb(transformers.ViTForImageClassification(config))
  ref.save_pretrained(tmp_path)
  module, params, processor, hf_config = load_pretrained(
      tmp_path, head="image_classification", num_labels=5)
  assert hf_config.model_type == "vit"
  pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = ref(pixel_values=torch.tensor(pixels)).logits.numpy()
  out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, pixels)
  np.testing.assert_allclose(np.asarray(out["logits"]), expected, atol=TOL, rtol=0)


def test_vit_head_without_checkpoint_weights_is_initialised(tmp_path):
  config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=37)
  torch.manual_seed(0)
  transformers.ViTModel(config).save_pretrained(tmp_path)
  _, params, _, _, report = load_pretrained(tmp_path, head="image_classification", num_labels=7,
                                            return_report=True)
  assert set(report.missing) == {"classifier/kernel", "classifier/bias"}
  assert params["classifier"]["kernel"].shape == (32, 7)
  with pytest.raises(ValueError, match="num_labels"):
    load_pretrained(tmp_path, head="image_classification", num_labels=0)
