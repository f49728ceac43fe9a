"""BERT/RoBERTa in Flax against transformers' PyTorch models on the same weights."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rmlora_jax import paths as paths_lib
from rmlora_jax.models import bert, load_pretrained

TOL = 1e-4

# (id, model_type, transformers class, head, num_labels, safetensors?)
CASES = [
    ("bert-base", "bert", transformers.BertModel, "base", 2, True),
    ("bert-cls", "bert", transformers.BertForSequenceClassification, "classification", 3, True),
    ("bert-reg", "bert", transformers.BertForSequenceClassification, "regression", 1, True),
    ("bert-qa-bin", "bert", transformers.BertForQuestionAnswering, "qa", 2, False),
    ("roberta-base", "roberta", transformers.RobertaModel, "base", 2, True),
    ("roberta-cls", "roberta", transformers.RobertaForSequenceClassification, "classification", 2, True),
    ("roberta-reg-bin", "roberta", transformers.RobertaForSequenceClassification, "regression", 1, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(case, tmp_path, tiny_config, save_hf_model, make_batch):
  _, model_type, cls, head, num_labels, safe = case
  config = tiny_config(model_type, num_labels=num_labels)
  torch_model = save_hf_model(cls, config, tmp_path, safe=safe)
  module, params, _, _, report = load_pretrained(
      tmp_path, head=head, num_labels=num_labels, return_report=True
  )
  assert report.missing == ()
  assert report.weight_files == (("model.safetensors",) if safe else ("pytorch_model.bin",))

  batch = make_batch(config)
  ours = jax.jit(module.apply)({"params": params}, **batch)
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
  base = getattr(torch_model, "base_model", torch_model)
  with torch.no_grad():
    ref_base = base(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})

  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(
      np.asarray(ours["last_hidden_state"])[real],
      ref_base.last_hidden_state.numpy()[real],
      atol=TOL, rtol=0,
  )
  if ref_base.pooler_output is not None:
    np.testing.assert_allclose(ours["pooler_output"], ref_base.pooler_output.numpy(), atol=TOL, rtol=0)
  else:
    assert "pooler_output" not in ours
  if head in ("classification", "regression"):
    assert ours["logits"].shape == (3, num_labels)
    np.testing.assert_allclose(ours["logits"], ref.logits.numpy(), atol=TOL, rtol=0)
  if head == "qa":
    # Logits at padded positions depend on padded hidden states; compare real ones.
    for name in ("start_logits", "end_logits"):
      np.testing.assert_allclose(
          np.asarray(ours[name])[real], getattr(ref, name).numpy()[real], atol=TOL, rtol=0
      )
  if head == "base":
    assert set(ours) == {"last_hidden_state", "pooler_output"}


def _roberta_batch(config, *, seed=0):
  """Token ids padded with ``config.pad_token_id``: right padding, left padding, none.

  Real ids avoid the pad id, as a tokenizer's do; RoBERTa numbers the real
  tokens from ``pad_token_id + 1`` wherever the padding sits.
  """
  rng = np.random.default_rng(seed)
  pad = config.pad_token_id
  ids = rng.integers(pad + 1, config.vocab_size, size=(3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 6:] = 0  # right padding
  mask[1, :3] = 0  # left padding: positions still start at pad + 1 on the first real token
  ids[mask == 0] = pad
  return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pad_token_id", [1, 4])
@pytest.mark.parametrize(
    "cls,head,num_labels",
    [(transformers.RobertaModel, "base", 2),
     (transformers.RobertaForSequenceClassification, "classification", 3)],
    ids=["base", "cls"],
)
def test_roberta_positions_follow_the_config_pad_token_id(
    cls, head, num_labels, pad_token_id, tmp_path, tiny_config, save_hf_model
):
  """Position ids come from the config's pad_token_id, not from a fixed 0 (or 1)."""
  config = tiny_config("roberta", num_labels=num_labels, pad_token_id=pad_token_id)
  torch_model = save_hf_model(cls, config, tmp_path)
  module, params, _, _ = load_pretrained(tmp_path, head=head, num_labels=num_labels)
  assert module.arch.pad_token_id == pad_token_id
  assert module.arch.max_length == config.max_position_embeddings - pad_token_id - 1

  batch = _roberta_batch(config)
  ours = jax.jit(module.apply)({"params": params}, **batch)
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
  real = batch["attention_mask"].astype(bool)
  if head == "base":
    np.testing.assert_allclose(np.asarray(ours["last_hidden_state"])[real],
                               ref.last_hidden_state.numpy()[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours["pooler_output"], ref.pooler_output.numpy(), atol=TOL, rtol=0)
  else:
    np.testing.assert_allclose(ours["logits"], ref.logits.numpy(), atol=TOL, rtol=0)


def test_roberta_without_pad_token_id_raises(tiny_config):
  with pytest.raises(ValueError, match="RoBERTa's pad_token_id is None"):
    bert.arch_from_hf_config(tiny_config("roberta", pad_token_id=None))


def _tiny_module(tiny_config, model_type="bert", head="classification", num_labels=2, **kw):
  config = tiny_config(model_type, num_hidden_layers=kw.pop("num_hidden_layers", 2))
  module = bert.module_from_hf_config(config, head=head, num_labels=num_labels, **kw)
  return config, module


def _init(module, config):
  return jax.jit(module.init)(jax.random.key(0), **bert.dummy_inputs(config))["params"]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_param_shapes_match_transformers(model_type, tiny_config):
  config, module = _tiny_module(tiny_config, model_type, head="base")
  shapes = jax.eval_shape(lambda: _init(module, config))
  flat = {p: s.shape for p, s in paths_lib.flatten_with_paths(shapes).items()}
  # Every HF weight has a counterpart of the same (Linear: transposed) shape.
  state = transformers.AutoModel.from_config(config).state_dict()
  state = {k: v.numpy() for k, v in state.items() if not k.endswith("position_ids")}
  converted, used = bert.params_from_state_dict(state, config, head="base")
  assert used == set(state)
  for path, value in paths_lib.flatten_with_paths(converted).items():
    assert flat[path] == value.shape, path
  assert set(flat) == set(paths_lib.flatten_with_paths(converted))


def test_param_paths_and_lora_targets(tiny_config):
  config, module = _tiny_module(tiny_config, "bert", head="qa")
  paths = list(paths_lib.flatten_with_paths(jax.eval_shape(lambda: _init(module, config))))
  assert "embeddings/word_embeddings/embedding" in paths
  assert "encoder/layer_1/attention/layer_norm/scale" in paths
  assert "encoder/layer_0/output_layer_norm/bias" in paths
  assert "qa_outputs/kernel" in paths and not any(p.startswith("pooler") for p in paths)
  targets = paths_lib.match_paths(paths, bert.DEFAULT_LORA_TARGETS, where="test")
  expected = {
      f"encoder/layer_{i}/{m}/kernel"
      for i in range(config.num_hidden_layers)
      for m in ("attention/query", "attention/key", "attention/value", "attention/output",
                "intermediate", "output")
  }
  assert set(targets) == expected


@pytest.mark.parametrize("head,num_labels", [("classification", 5), ("regression", 1), ("qa", 2)])
def test_output_shapes(head, num_labels, tiny_config):
  config, module = _tiny_module(tiny_config, "roberta", head=head, num_labels=num_labels)
  params = jax.eval_shape(lambda: _init(module, config))
  out = jax.eval_shape(module.apply, {"params": params}, **bert.dummy_inputs(config, 4, 16))
  assert out["last_hidden_state"].shape == (4, 16, 32)
  if head == "qa":
    assert out["start_logits"].shape == out["end_logits"].shape == (4, 16)
  else:
    assert out["logits"].shape == (4, num_labels)


def test_dropout(tiny_config, make_batch):
  config, module = _tiny_module(tiny_config, "bert", head="classification", num_hidden_layers=1)
  params = _init(module, config)
  batch = make_batch(config)
  train = jax.jit(functools.partial(module.apply, deterministic=False))
  run = lambda key: train(
      {"params": params}, **batch, rngs={"dropout": jax.random.key(key)}
  )["logits"]
  eval_logits = jax.jit(module.apply)({"params": params}, **batch)["logits"]
  assert not np.allclose(run(1), eval_logits, atol=1e-4)
  assert not np.allclose(run(1), run(2), atol=1e-4)
  np.testing.assert_array_equal(run(1), run(1))


def test_bfloat16_compute_close_to_transformers(tmp_path, tiny_config, save_hf_model, make_batch):
  config = tiny_config("bert")
  torch_model = save_hf_model(transformers.BertModel, config, tmp_path)
  module, params, _, _ = load_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  batch = make_batch(config, batch=2)
  out = module.apply({"params": params}, **batch)["last_hidden_state"]
  assert out.dtype == jnp.bfloat16
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
  real = batch["attention_mask"].astype(bool)
  err = np.abs(np.asarray(out, np.float32)[real] - ref.last_hidden_state.numpy()[real])
  # LayerNorm outputs are O(1) (at most 3.3 here); bf16 keeps ~3 significant
  # digits: the largest error observed on this batch is 0.028.
  assert err.max() < 0.05, err.max()


@pytest.mark.parametrize("model_type,max_len", [("bert", 64), ("roberta", 62)])
def test_too_long_input_raises(model_type, max_len, tiny_config):
  config, module = _tiny_module(tiny_config, model_type)
  params = jax.eval_shape(lambda: _init(module, config))
  ok = bert.dummy_inputs(config, 1, max_len)
  jax.eval_shape(module.apply, {"params": params}, **ok)
  too_long = bert.dummy_inputs(config, 1, max_len + 1)
  with pytest.raises(ValueError, match=rf"sequence length {max_len + 1}.*\({max_len} = "):
    jax.eval_shape(module.apply, {"params": params}, **too_long)


def test_bad_inputs_raise(tiny_config):
  config, module = _tiny_module(tiny_config, "bert")
  params = jax.eval_shape(lambda: _init(module, config))
  ids = jnp.ones((2, 8), jnp.int32)
  with pytest.raises(ValueError, match=re.escape("attention_mask has shape (2, 7)")):
    jax.eval_shape(module.apply, {"params": params}, ids, jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match=re.escape("input_ids must be (batch, seq), got shape (8,)")):
    jax.eval_shape(module.apply, {"params": params}, ids[0])


@pytest.mark.parametrize(
    "head,num_labels,message",
    [
        ("tagging", 2, "head 'tagging' is not one of"),
        ("classification", 0, "num_labels must be >= 1, got 0"),
        ("classification", 1, "'classification' needs num_labels >= 2, got 1"),
        ("regression", 2, "'regression' needs num_labels=1, got 2"),
    ],
)
def test_bad_head_raises(head, num_labels, message, tiny_config):
  with pytest.raises(ValueError, match=re.escape(message)):
    bert.module_from_hf_config(tiny_config("bert"), head=head, num_labels=num_labels)


def test_unsupported_config_raises(tiny_config):
  with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
    bert.module_from_hf_config(
        tiny_config("bert", position_embedding_type="relative_key"), head="base", num_labels=2
    )


def test_low_rank_apply_equals_merge(tiny_config, make_batch):
  """LoRA through LowRankKernel-aware Dense layers gives merge's logits and gradients."""
  import rmlora_jax as rl
  from rmlora_jax import methods as methods_lib
  from tests.family_reference import random_like

  config, module = _tiny_module(tiny_config, "bert", head="classification")
  params = _init(module, config)
  batch = {k: jnp.asarray(v) for k, v in make_batch(config).items()}
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=bert.DEFAULT_LORA_TARGETS)
  methods = {
      apply: methods_lib.make_method(methods_lib.MethodSettings(
          name="lora", spec=spec, train_patterns=(r"classifier/.*",), adapter_apply=apply))
      for apply in ("merge", "low_rank")
  }
  trainable = methods["merge"].init(jax.random.key(0), params)
  trainable["adapters"] = jax.tree.map(
      lambda x: 0.05 * jnp.asarray(x), random_like(trainable["adapters"], 1))

  def loss(tr, method, key):
    logits = module.apply({"params": method.assemble(tr, params)}, **batch, deterministic=False,
                          rngs={"dropout": key})["logits"]
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  for key in (jax.random.key(3), jax.random.key(4, impl="rbg")):
    low, g_low = jax.jit(jax.value_and_grad(lambda t: loss(t, methods["low_rank"], key)))(trainable)
    ref, g_ref = jax.jit(jax.value_and_grad(lambda t: loss(t, methods["merge"], key)))(trainable)
    np.testing.assert_allclose(low, ref, rtol=1e-5)
    for path, g in paths_lib.flatten_with_paths(g_ref).items():
      np.testing.assert_allclose(paths_lib.flatten_with_paths(g_low)[path], g, rtol=1e-4, atol=1e-5,
                                 err_msg=path)


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0), jax.random.key(0, impl="rbg")])
def test_dropout_keeps_the_right_share(key):
  from rmlora_jax.models import torch_port

  x = jnp.ones((200, 500))
  drop = torch_port.Dropout(0.1)
  y = drop.apply({}, x, deterministic=False, rngs={"dropout": key})
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - 0.9) < 0.005
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  np.testing.assert_array_equal(y, drop.apply({}, x, deterministic=False, rngs={"dropout": key}))
  assert drop.apply({}, x, deterministic=True) is x
