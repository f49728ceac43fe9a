"""The helpers the Flax ports share: config reading, head checks, weight reading, masks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmlora_jax.models import torch_port


@pytest.mark.parametrize(
    "head,num_labels,heads,message",
    [
        ("tagging", 2, torch_port.HEADS, "m: head 'tagging' is not one of"),
        ("image_classification", 3, torch_port.TEXT_HEADS, "m: head 'image_classification' is not one of"),
        ("base", 0, torch_port.HEADS, "m: num_labels must be >= 1, got 0"),
        ("base", 2.0, torch_port.HEADS, "m: num_labels must be an integer, got 2.0"),
        ("classification", True, torch_port.HEADS, "m: num_labels must be an integer, got True"),
        ("classification", 1, torch_port.HEADS, "m: head 'classification' needs num_labels >= 2, got 1"),
        ("regression", 2, torch_port.HEADS, "m: head 'regression' needs num_labels=1, got 2"),
    ],
)
def test_validate_head_rejects(head, num_labels, heads, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    torch_port.validate_head(head, num_labels, where="m", heads=heads)


def test_validate_head_accepts_each_boundary_and_refuses_one_step_past_it():
  # (head, the smallest or only accepted count, a count one step past the boundary or None)
  cases = [("classification", np.int64(2), 1), ("regression", 1, 2), ("base", 1, 0), ("qa", 1, 0),
           ("image_classification", 1, 0), ("causal_lm", 1, 0)]
  for head, ok, bad in cases:
    assert torch_port.validate_head(head, ok, where="m") is None
    with pytest.raises(ValueError, match=rf"m: .*{bad}"):
      torch_port.validate_head(head, bad, where="m")
  assert torch_port.validate_head("qa", where="m", heads=torch_port.TEXT_HEADS) is None  # name only
  with pytest.raises(ValueError, match=r"head 'causal_lm' is not one of"):
    torch_port.validate_head("causal_lm", where="m", heads=torch_port.TEXT_HEADS)


def test_dropout_rate_falls_back_and_checks_the_range():
  config = {"hidden_dropout_prob": 0.2, "classifier_dropout": None}
  get = lambda *names, default=0.1: torch_port.dropout_rate(config, *names, default=default, where="c")
  assert get("classifier_dropout", "hidden_dropout_prob") == 0.2
  assert get("cls_dropout", default=0.3) == 0.3
  with pytest.raises(ValueError, match=re.escape("c: hidden_dropout_prob=1.5 is not a dropout probability")):
    torch_port.dropout_rate({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob", default=0.1, where="c")


def test_attention_sizes_and_activation():
  assert torch_port.attention_sizes({"hidden_size": 32, "num_attention_heads": 4}, where="c") == (32, 4, 8)
  explicit = {"hidden_size": 30, "num_attention_heads": 4, "head_dim": 16}
  assert torch_port.attention_sizes(explicit, where="c", head_size_field="head_dim") == (30, 4, 16)
  with pytest.raises(ValueError, match=re.escape("c: hidden_size=30 is not a multiple of num_attention_heads=4")):
    torch_port.attention_sizes(explicit, where="c")
  assert torch_port.config_activation({}, "hidden_act", "gelu", where="c") == "gelu"
  with pytest.raises(ValueError, match=re.escape("c hidden_act='mish' is not a supported activation")):
    torch_port.config_activation({"hidden_act": "mish"}, "hidden_act", "gelu", where="c")


def test_state_reader_prefixes_and_missing_leaves():
  w, b = np.arange(6.0).reshape(2, 3), np.ones(2)
  state = {"roberta.enc.weight": w, "roberta.enc.bias": b, "roberta.ln.gamma": b, "head.bias": b}
  r = torch_port.StateReader(state, ("bert.", "roberta."))
  assert r.prefix == "roberta."
  np.testing.assert_array_equal(r.dense("enc")["kernel"], w.T)
  assert set(r.layer_norm("ln", required=False)) == {"scale"}
  # A head whose weight is missing keeps the bias it has; absent modules are None.
  assert set(r.dense("head", required=False, backbone=False)) == {"bias"}
  assert r.embedding("emb", required=False) is None
  with pytest.raises(ValueError, match=re.escape("state dict has no weight 'roberta.ln.bias' or 'roberta.ln.beta'")):
    r.layer_norm("ln")
  assert r.used == set(state)
  tree = {"a": {"b": None, "c": {"d": None}}, "e": {"f": w}}
  assert torch_port.drop_missing(tree) == {"e": {"f": w}}


def test_padding_mask_and_mask_logits():
  mask = jnp.array([[1, 1, 0]])
  keys = torch_port.padding_mask(mask)
  assert keys.shape == (1, 1, 1, 3) and keys.dtype == jnp.bool_
  pairs = torch_port.padding_mask(mask, mask_queries=True)
  np.testing.assert_array_equal(pairs[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  for dtype in (jnp.float32, jnp.bfloat16):
    logits = jnp.full((1, 2, 3, 3), 0.5, dtype)
    masked = torch_port.mask_logits(logits, pairs)
    assert masked.dtype == dtype
    low = jnp.finfo(dtype).min
    np.testing.assert_array_equal(masked[0, 1], jnp.array([[0.5, 0.5, low], [0.5, 0.5, low], [low, low, low]], dtype))
    # Masked keys get no weight; a row masked entirely attends uniformly, as in PyTorch.
    probs = jax.nn.softmax(masked.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(probs[0, 0], [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [1 / 3] * 3], rtol=1e-6)


def test_text_inputs_fill_and_check():
  ids, mask, types = torch_port.text_inputs(np.ones((2, 5), np.int32), where="m")
  assert mask.shape == types.shape == (2, 5) and int(mask.sum()) == 10 and int(types.sum()) == 0
  with pytest.raises(ValueError, match=re.escape("m: token_type_ids has shape (2, 4), but input_ids has shape (2, 5)")):
    torch_port.text_inputs(ids, None, jnp.zeros((2, 4), jnp.int32), where="m")
  with pytest.raises(ValueError, match=re.escape("m: input_ids must be (batch, seq), got shape (5,)")):
    torch_port.text_inputs(ids[0], where="m")


def test_pooler_and_heads_param_layout():
  class Head(torch_port.nn.Module):
    @torch_port.nn.compact
    def __call__(self, x):
      init = torch_port.weight_init(0.02)
      pooled = torch_port.Pooler(4, kernel_init=init, act="tanh", name="pooler")(x)
      out = torch_port.span_logits(x, init=init, dtype=None)
      out["logits"] = torch_port.classifier_logits(pooled, 3, init=init, dtype=None)
      return out

  x = jnp.ones((2, 5, 4))
  variables = jax.eval_shape(Head().init, jax.random.key(0), x)
  shapes = jax.tree.map(lambda s: s.shape, variables["params"])
  assert shapes == {"pooler": {"dense": {"kernel": (4, 4), "bias": (4,)}},
                    "qa_outputs": {"kernel": (4, 2), "bias": (2,)},
                    "classifier": {"kernel": (4, 3), "bias": (3,)}}
  out = jax.eval_shape(Head().apply, variables, x)
  assert out["start_logits"].shape == out["end_logits"].shape == (2, 5)
  assert out["logits"].shape == (2, 3)
