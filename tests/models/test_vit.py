"""ViT in Flax against transformers' PyTorch models on the same weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from rmlora_jax import paths as paths_lib
from rmlora_jax.models import vit

TOL = 1e-4
SMALL = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    num_channels=3,
)
# Rectangular images and patches catch a swapped height/width in the patch kernel.
RECT = dict(SMALL, image_size=(32, 24), patch_size=(8, 4), qkv_bias=False, hidden_act="gelu_new")


def torch_model(config_kwargs, head, tmp_path, num_labels=5):
  torch.manual_seed(0)
  config = transformers.ViTConfig(**config_kwargs, num_labels=num_labels)
  cls = transformers.ViTModel if head == "base" else transformers.ViTForImageClassification
  model = cls(config).eval()
  # Larger than transformers' init (std 0.02), so that attention is far from uniform.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path / f"vit_{head}"
  model.save_pretrained(folder)
  return model, config, load_file(folder / "model.safetensors")


def pixels(config, b=2, seed=0):
  h, w = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
  return np.random.default_rng(seed).normal(size=(b, config.num_channels, h, w)).astype(np.float32)


@pytest.mark.parametrize(
    "config_kwargs,head",
    [(SMALL, "base"), (SMALL, "image_classification"), (RECT, "base")],
    ids=["base", "cls", "rect-base"],
)
def test_matches_transformers(config_kwargs, head, tmp_path):
  model, config, state = torch_model(config_kwargs, head, tmp_path)
  x = pixels(config)
  with torch.no_grad():
    ref = model(pixel_values=torch.tensor(x))
  module = vit.module_from_hf_config(config, head=head, num_labels=5)
  params, used = vit.params_from_state_dict(state, config, head=head)
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
  if head == "base":
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"]), ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out["pooler_output"]), ref.pooler_output.numpy(), atol=TOL, rtol=0)
  else:
    assert out["logits"].shape == (2, 5)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(), atol=TOL, rtol=0)
  assert used == set(state)


def test_in_memory_names_load_like_checkpoint_names(tmp_path):
  """``model.state_dict()`` in transformers 5 uses q_proj/mlp.fc1 names."""
  model, config, state = torch_model(SMALL, "base", tmp_path)
  live = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(".q_proj." in k for k in live)
  from_disk, _ = vit.params_from_state_dict(state, config, head="base")
  from_live, used = vit.params_from_state_dict(live, config, head="base")
  jax.tree.map(np.testing.assert_array_equal, from_disk, from_live)
  assert used == set(live)


def test_classifier_checkpoint_into_base_lacks_only_pooler(tmp_path):
  _, config, state = torch_model(SMALL, "image_classification", tmp_path)
  params, used = vit.params_from_state_dict(state, config, head="base")
  module = vit.module_from_hf_config(config, head="base", num_labels=5)
  shapes = jax.eval_shape(module.init, jax.random.key(0), **vit.dummy_inputs(config))["params"]
  assert set(shapes) - set(params) == {"pooler"}
  assert set(state) - used == {"classifier.weight", "classifier.bias"}


def test_eval_shape_dropout_and_lora_targets():
  config = transformers.ViTConfig(**SMALL, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  module = vit.module_from_hf_config(config, head="image_classification", num_labels=7)
  inputs = vit.dummy_inputs(config, batch=3)
  assert inputs["pixel_values"].shape == (3, 3, 32, 32)
  variables = jax.eval_shape(module.init, jax.random.key(0), **inputs)
  out = jax.eval_shape(lambda v: module.apply(v, **inputs), variables)
  assert out["last_hidden_state"].shape == (3, 17, 32)
  assert out["logits"].shape == (3, 7)
  flat = paths_lib.flatten_with_paths(variables["params"])
  targets = paths_lib.match_paths(flat, vit.DEFAULT_LORA_TARGETS, where="DEFAULT_LORA_TARGETS")
  assert len(targets) == 6 * SMALL["num_hidden_layers"]
  assert all(len(flat[p].shape) == 2 for p in targets)

  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(s.dtype), variables["params"])
  x = {"pixel_values": jnp.asarray(pixels(config, b=3))}
  apply = jax.jit(module.apply, static_argnames="deterministic")
  det = apply({"params": params}, **x)["logits"]
  drop = apply({"params": params}, **x, deterministic=False, rngs={"dropout": jax.random.key(1, impl="rbg")})["logits"]
  assert not np.allclose(det, drop)


def test_bad_inputs_raise():
  config = transformers.ViTConfig(**SMALL)
  with pytest.raises(ValueError, match="head 'regression' is not one of"):
    vit.module_from_hf_config(config, head="regression", num_labels=1)
  with pytest.raises(ValueError, match="num_labels must be >= 1, got 0"):
    vit.module_from_hf_config(config, head="image_classification", num_labels=0)
  with pytest.raises(ValueError, match=r"patch_size=\(5, 5\) does not tile image_size=\(32, 32\)"):
    vit.ViTSettings.from_hf(dict(SMALL, patch_size=5))
  module = vit.module_from_hf_config(config, head="base", num_labels=2)
  variables = jax.eval_shape(module.init, jax.random.key(0), **vit.dummy_inputs(config))
  with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\).*got shape \(2, 3, 48, 48\)"):
    jax.eval_shape(module.apply, variables, jnp.zeros((2, 3, 48, 48)))
  with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, 3\)"):
    jax.eval_shape(module.apply, variables, jnp.zeros((2, 32, 32, 3)))
