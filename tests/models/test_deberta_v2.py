"""DeBERTa-v2/v3 in Flax against transformers' PyTorch models on the same weights."""

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
from rmlora_jax.models import deberta_v2

TOL = 1e-4

# v3 style: log buckets, shared attention keys, normed relative embeddings.
V3 = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    relative_attention=True,
    pos_att_type=["p2c", "c2p"],
    position_buckets=16,
    max_relative_positions=-1,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    position_biased_input=False,
    type_vocab_size=0,
)
# v2 style without buckets or sharing, clipped distances, absolute positions,
# token types, a narrower embedding and the convolution after layer 0.
V2 = dict(
    V3,
    pos_att_type="c2p|p2c",
    position_buckets=-1,
    max_relative_positions=6,
    norm_rel_ebd="none",
    share_att_key=False,
    position_biased_input=True,
    type_vocab_size=2,
    embedding_size=24,
    conv_kernel_size=3,
    hidden_act="gelu_new",
)
# Only content-to-position, and plain absolute-position attention.
C2P_ONLY = dict(V2, pos_att_type=["c2p"], conv_kernel_size=0, embedding_size=32)
# (transformers keeps an unused encoder.LayerNorm when norm_rel_ebd is set without
# relative attention, so it is left off here to keep "every weight used" exact.)
NO_RELATIVE = dict(
    V3, relative_attention=False, position_biased_input=True, pos_att_type=None, norm_rel_ebd="none"
)

TORCH_CLASSES = {
    "base": transformers.DebertaV2Model,
    "classification": transformers.DebertaV2ForSequenceClassification,
    "regression": transformers.DebertaV2ForSequenceClassification,
    "qa": transformers.DebertaV2ForQuestionAnswering,
}
NUM_LABELS = {"base": 2, "classification": 3, "regression": 1, "qa": 2}


def torch_model(config_kwargs, head, tmp_path, seed=0):
  """A random PyTorch model in eval mode and its weights read back from disk."""
  torch.manual_seed(seed)
  config = transformers.DebertaV2Config(**config_kwargs, num_labels=NUM_LABELS[head])
  model = TORCH_CLASSES[head](config).eval()
  # transformers' init (std 0.02) leaves attention nearly uniform, which would
  # hide errors in the position terms; larger weights make every term count.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path / f"deberta_{head}"
  model.save_pretrained(folder)
  return model, config, load_file(folder / "model.safetensors")


def batch(seed=0, b=3, t=20, vocab=99, type_vocab=0):
  """Token ids with right padding in two of the rows."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (b, t))
  lengths = np.array([t, t - 7, 5])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
  ids = ids * mask
  types = rng.integers(0, max(type_vocab, 1), (b, t)) * mask
  return ids, mask, types


def run_both(config_kwargs, head, tmp_path):
  model, config, state = torch_model(config_kwargs, head, tmp_path)
  ids, mask, types = batch(type_vocab=config.type_vocab_size)
  with torch.no_grad():
    ref = model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
    )
  module = deberta_v2.module_from_hf_config(config, head=head, num_labels=NUM_LABELS[head])
  params, used = deberta_v2.params_from_state_dict(state, config, head=head)
  apply = jax.jit(lambda p, i, m, tt: module.apply({"params": p}, i, m, tt))
  out = apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  return ref, out, mask, state, used


@pytest.mark.parametrize(
    "config_kwargs,head",
    [
        (V3, "base"),
        (V3, "classification"),
        (V3, "regression"),
        (V3, "qa"),
        (V2, "base"),
        (V2, "classification"),
        (C2P_ONLY, "base"),
        (NO_RELATIVE, "classification"),
    ],
    ids=["v3-base", "v3-cls", "v3-reg", "v3-qa", "v2-base", "v2-cls", "c2p-base", "norel-cls"],
)
def test_matches_transformers(config_kwargs, head, tmp_path):
  ref, out, mask, state, used = run_both(config_kwargs, head, tmp_path)
  valid = mask.astype(bool)
  hidden_ref = ref.last_hidden_state.numpy() if head == "base" else None
  if hidden_ref is not None:
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"])[valid], hidden_ref[valid], atol=TOL, rtol=0)
  if head in ("classification", "regression"):
    assert out["logits"].shape == (3, NUM_LABELS[head])
    np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(), atol=TOL, rtol=0)
  if head == "qa":
    for name in ("start_logits", "end_logits"):
      np.testing.assert_allclose(
          np.asarray(out[name])[valid], getattr(ref, name).numpy()[valid], atol=TOL, rtol=0
      )
  # Every stored weight was read (no silently ignored tensors).
  assert used == set(state)


def test_distances_reach_log_buckets():
  """The test length (20) spans exact, logarithmic and clipped distances."""
  settings = deberta_v2.DebertaV2Settings.from_hf(transformers.DebertaV2Config(**V3))
  relative = deberta_v2.relative_positions(20, settings)
  assert np.abs(relative).max() > settings.position_buckets // 2
  assert np.array_equal(relative, -relative.T)


def random_params(module, inputs, seed=0):
  """Random parameters of the module's shapes, without compiling its init."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), **inputs)["params"]
  return jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(s.dtype), shapes)


def test_base_checkpoint_into_head_leaves_head_missing(tmp_path):
  _, config, state = torch_model(V3, "base", tmp_path)
  inputs = deberta_v2.dummy_inputs(config)
  for head, names in (("classification", {"pooler", "classifier"}), ("qa", {"qa_outputs"})):
    module = deberta_v2.module_from_hf_config(config, head=head, num_labels=NUM_LABELS[head])
    params, _ = deberta_v2.params_from_state_dict(state, config, head=head)
    init = random_params(module, inputs)
    assert set(init) - set(params) == names
    # The caller fills the head from init; then the forward runs.
    out = jax.jit(module.apply)({"params": {**init, **params}}, **inputs)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_checkpoint_head_keys_with_prefix_or_without(tmp_path):
  _, config, state = torch_model(V3, "classification", tmp_path)
  bare = {k.removeprefix("deberta."): v for k, v in state.items()}
  with_prefix, _ = deberta_v2.params_from_state_dict(state, config, head="classification")
  without, used = deberta_v2.params_from_state_dict(bare, config, head="classification")
  jax.tree.map(np.testing.assert_array_equal, with_prefix, without)
  assert used == set(bare)


def test_eval_shape_and_lora_targets():
  config = transformers.DebertaV2Config(**V3, num_labels=4)
  module = deberta_v2.module_from_hf_config(config, head="classification", num_labels=4)
  inputs = deberta_v2.dummy_inputs(config, batch=5, seq=11)
  variables = jax.eval_shape(module.init, jax.random.key(0), **inputs)
  out = jax.eval_shape(lambda v: module.apply(v, **inputs), variables)
  assert out["last_hidden_state"].shape == (5, 11, 32)
  assert out["pooler_output"].shape == (5, 32)
  assert out["logits"].shape == (5, 4)
  flat = paths_lib.flatten_with_paths(variables["params"])
  targets = paths_lib.match_paths(flat, deberta_v2.DEFAULT_LORA_TARGETS, where="DEFAULT_LORA_TARGETS")
  assert len(targets) == 6 * V3["num_hidden_layers"]
  assert all(len(flat[p].shape) == 2 for p in targets)
  assert "encoder/layer_1/attention/query/kernel" in targets


def test_dropout_active_only_when_not_deterministic():
  config = transformers.DebertaV2Config(**V3)
  module = deberta_v2.module_from_hf_config(config, head="classification", num_labels=2)
  inputs = deberta_v2.dummy_inputs(config)
  params = random_params(module, inputs)
  apply = jax.jit(module.apply, static_argnames="deterministic")
  det = apply({"params": params}, **inputs)["logits"]
  assert np.array_equal(det, apply({"params": params}, **inputs)["logits"])
  drop = [
      apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(k, impl="rbg")})["logits"]
      for k in (1, 2)
  ]
  assert not np.allclose(drop[0], det) and not np.allclose(drop[0], drop[1])


def test_bad_inputs_raise():
  config = transformers.DebertaV2Config(**NO_RELATIVE)
  with pytest.raises(ValueError, match="needs num_labels >= 2, got 1"):
    deberta_v2.module_from_hf_config(config, head="classification", num_labels=1)
  with pytest.raises(ValueError, match="needs num_labels=1, got 3"):
    deberta_v2.module_from_hf_config(config, head="regression", num_labels=3)
  with pytest.raises(ValueError, match="head 'tagging' is not one of"):
    deberta_v2.module_from_hf_config(config, head="tagging", num_labels=2)
  module = deberta_v2.module_from_hf_config(config, head="base", num_labels=2)
  variables = jax.eval_shape(module.init, jax.random.key(0), **deberta_v2.dummy_inputs(config))
  # The checks run while tracing, so abstract parameters suffice.
  with pytest.raises(ValueError, match="length 65 exceeds.*max_position_embeddings=64"):
    jax.eval_shape(module.apply, variables, jnp.ones((1, 65), jnp.int32))
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\)"):
    jax.eval_shape(module.apply, variables, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="pos_att_type"):
    deberta_v2.DebertaV2Settings.from_hf(dict(V3, pos_att_type=["p2p"]))


def test_state_dict_errors_name_the_weight(tmp_path):
  _, config, state = torch_model(V3, "base", tmp_path)
  missing = {k: v for k, v in state.items() if "layer.1.intermediate.dense.weight" not in k}
  with pytest.raises(ValueError, match="encoder.layer.1.intermediate.dense.weight"):
    deberta_v2.params_from_state_dict(missing, config, head="base")
  wrong = dict(state, **{"encoder.rel_embeddings.weight": np.zeros((8, 32), np.float32)})
  with pytest.raises(ValueError, match=r"encoder/rel_embeddings/embedding.*\(8, 32\).*\(32, 32\)"):
    deberta_v2.params_from_state_dict(wrong, config, head="base")
