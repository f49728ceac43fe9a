"""ViT encoders in Flax linen, loading Hugging Face weights.

Matches transformers' ``ViTModel`` and ``ViTForImageClassification``
numerically: non-overlapping patches embedded by a strided convolution, a
learned CLS token and position table, pre-LayerNorm layers, a final
LayerNorm, and either the tanh pooler on the CLS token (``head="base"``) or a
linear classifier on the final-normed CLS token (``"image_classification"``).
Inputs are ``pixel_values`` in transformers' (B, C, H, W) layout.

Parameter paths (``L`` layers)::

  embeddings/cls_token                                  (1, 1, hidden)
  embeddings/position_embeddings                        (1, 1 + patches, hidden)
  embeddings/patch_embeddings/{kernel,bias}             kernel (ph, pw, C, hidden)
  encoder/layer_{i}/layernorm_before/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/layernorm_after/{scale,bias}
  encoder/layer_{i}/intermediate/{kernel,bias}
  encoder/layer_{i}/output/{kernel,bias}
  layernorm/{scale,bias}
  pooler/dense/{kernel,bias}                            head "base"
  classifier/{kernel,bias}                              head "image_classification"

They correspond to transformers' checkpoint names ``vit.embeddings.*``,
``vit.encoder.layer.{i}.attention.attention.{query,key,value}``,
``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``,
``vit.layernorm``, ``vit.pooler.dense`` and ``classifier`` (and to the newer
in-memory names ``layers.{i}.attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``).

Example::

  module = module_from_hf_config(hf_config, head="image_classification", num_labels=10)
  params, used = params_from_state_dict(state, hf_config, head="image_classification")
  logits = module.apply({"params": params}, pixel_values)["logits"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import torch_port

MODEL_TYPES = ("vit",)
HEADS = ("base", "image_classification")

# Query, key, value, attention output, intermediate and output kernels of every layer.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"encoder/layer_\d+/attention/(query|key|value|output)/kernel",
    r"encoder/layer_\d+/(intermediate|output)/kernel",
)

@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTSettings:
  """The parts of a transformers ``ViTConfig`` the forward pass reads (hashable)."""

  hidden_size: int
  num_layers: int
  num_heads: int
  head_size: int
  intermediate_size: int
  hidden_act: str
  hidden_dropout: float
  attention_dropout: float
  layer_norm_eps: float
  initializer_range: float
  image_size: tuple[int, int]
  patch_size: tuple[int, int]
  num_channels: int
  qkv_bias: bool
  pooler_output_size: int
  pooler_act: str

  @property
  def num_patches(self) -> int:
    return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

  @classmethod
  def from_hf(cls, hf_config: Any) -> ViTSettings:
    """Reads a ``ViTConfig`` (or its dict), filling transformers' defaults.

    Raises:
      ValueError: heads that do not divide the hidden size, a patch size that
        does not divide the image, an unsupported activation, or a dropout
        probability outside [0, 1].
    """
    where = "ViT config"
    get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
    hidden, heads, head_size = torch_port.attention_sizes(hf_config, where=where, head_size_field="head_dim")
    image = torch_port.pair(get("image_size", 224), where="ViT config image_size")
    patch = torch_port.pair(get("patch_size", 16), where="ViT config patch_size")
    if image[0] % patch[0] or image[1] % patch[1]:
      raise ValueError(f"ViT config: patch_size={patch} does not tile image_size={image}")
    return cls(
        hidden_size=hidden,
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        head_size=head_size,
        intermediate_size=int(get("intermediate_size")),
        hidden_act=torch_port.config_activation(hf_config, "hidden_act", "gelu", where=where),
        hidden_dropout=torch_port.dropout_rate(hf_config, "hidden_dropout_prob", default=0.0, where=where),
        attention_dropout=torch_port.dropout_rate(
            hf_config, "attention_probs_dropout_prob", default=0.0, where=where),
        layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
        initializer_range=float(get("initializer_range", 0.02)),
        image_size=image,
        patch_size=patch,
        num_channels=int(get("num_channels", 3)),
        qkv_bias=bool(get("qkv_bias", True)),
        pooler_output_size=int(get("pooler_output_size", hidden)),
        pooler_act=torch_port.config_activation(hf_config, "pooler_act", "tanh", where=where),
    )


def _init(settings: ViTSettings) -> Callable:
  # transformers initialises ViT with trunc_normal_.
  return torch_port.weight_init(settings.initializer_range, truncated=True)


def _dense(features: int, settings: ViTSettings, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return torch_port.dense(features, init=_init(settings), dtype=dtype, name=name, use_bias=use_bias)


def _layer_norm(settings: ViTSettings, dtype: Any, name: str) -> nn.LayerNorm:
  return torch_port.layer_norm(settings.layer_norm_eps, dtype=dtype, name=name)


class _Embeddings(nn.Module):
  settings: ViTSettings
  dtype: Any

  @nn.compact
  def __call__(self, images, deterministic):
    s = self.settings
    init = _init(s)
    patches = nn.Conv(
        s.hidden_size,
        s.patch_size,
        strides=s.patch_size,
        padding="VALID",
        dtype=self.dtype,
        kernel_init=init,
        name="patch_embeddings",
    )(images)  # (B, H / ph, W / pw, hidden), patches in row-major order as in PyTorch.
    patches = patches.reshape(patches.shape[0], -1, s.hidden_size)
    cls = self.param("cls_token", init, (1, 1, s.hidden_size))
    positions = self.param("position_embeddings", init, (1, 1 + s.num_patches, s.hidden_size))
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, s.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1) + positions.astype(patches.dtype)
    return nn.Dropout(s.hidden_dropout)(x, deterministic=deterministic)


class _Attention(nn.Module):
  settings: ViTSettings
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    s = self.settings
    n, d = s.num_heads, s.head_size

    heads = lambda y: torch_port.split_heads(y, n)
    q = heads(_dense(n * d, s, self.dtype, "query", use_bias=s.qkv_bias)(x))
    k = heads(_dense(n * d, s, self.dtype, "key", use_bias=s.qkv_bias)(x))
    v = heads(_dense(n * d, s, self.dtype, "value", use_bias=s.qkv_bias)(x))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    context = torch_port.attend(scores, v, nn.Dropout(s.attention_dropout), deterministic)
    return _dense(s.hidden_size, s, self.dtype, "output")(context)


class _Layer(nn.Module):
  settings: ViTSettings
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    s = self.settings
    h = _layer_norm(s, self.dtype, "layernorm_before")(x)
    h = _Attention(s, self.dtype, name="attention")(h, deterministic)
    x = x + nn.Dropout(s.hidden_dropout)(h, deterministic=deterministic)
    h = _layer_norm(s, self.dtype, "layernorm_after")(x)
    h = _dense(s.intermediate_size, s, self.dtype, "intermediate")(h)
    h = torch_port.activation(s.hidden_act, where="hidden_act")(h)
    h = _dense(s.hidden_size, s, self.dtype, "output")(h)
    return x + nn.Dropout(s.hidden_dropout)(h, deterministic=deterministic)


class _Encoder(nn.Module):
  settings: ViTSettings
  dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    for i in range(self.settings.num_layers):
      x = _Layer(self.settings, self.dtype, name=f"layer_{i}")(x, deterministic)
    return x


class ViT(nn.Module):
  """A ViT encoder with an optional image-classification head.

  Attributes:
    settings: the architecture, from `ViTSettings.from_hf`.
    head: "base" (with the tanh pooler) or "image_classification".
    num_labels: classes of the classifier (ignored for "base").
    dtype: the computation dtype (parameters stay float32).
  """

  settings: ViTSettings
  head: str = "base"
  num_labels: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    """Encodes ``pixel_values`` (B, C, H, W); returns a dict of outputs (see module doc)."""
    s = self.settings
    expected = (s.num_channels,) + s.image_size
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(
          f"ViT pixel_values must be (batch, {s.num_channels}, {s.image_size[0]}, {s.image_size[1]}) "
          f"(channels, height, width from the config), got shape {tuple(pixel_values.shape)}"
      )
    images = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NCHW -> NHWC
    x = _Embeddings(s, self.dtype, name="embeddings")(images, deterministic)
    x = _Encoder(s, self.dtype, name="encoder")(x, deterministic)
    x = _layer_norm(s, self.dtype, "layernorm")(x)
    out = {"last_hidden_state": x}
    if self.head == "base":
      out["pooler_output"] = torch_port.Pooler(
          s.pooler_output_size, kernel_init=_init(s), act=s.pooler_act, dtype=self.dtype, name="pooler")(x)
    elif self.head == "image_classification":
      # No dropout before the classifier in transformers' ViTForImageClassification.
      out["logits"] = torch_port.classifier_logits(x[:, 0], self.num_labels, init=_init(s), dtype=self.dtype)
    return out


def module_from_hf_config(hf_config: Any, *, head: str, num_labels: int, dtype: Any = jnp.float32) -> ViT:
  """Builds the Flax module for a transformers ``ViTConfig``.

  Args:
    hf_config: a ``ViTConfig`` or its dict.
    head: "base" or "image_classification" (num_labels >= 1).
    num_labels: classes of the classifier.
    dtype: computation dtype.

  Raises:
    ValueError: unknown head, or num_labels that does not suit it
      (`torch_port.validate_head`).
  """
  torch_port.validate_head(head, num_labels, where="vit.module_from_hf_config", heads=HEADS)
  return ViT(ViTSettings.from_hf(hf_config), head=head, num_labels=int(num_labels), dtype=dtype)


def dummy_inputs(hf_config: Any, batch: int = 2, seq: int = 8) -> dict[str, jax.Array]:
  """``{"pixel_values": zeros (batch, C, H, W)}`` at the config's image size; ``seq`` is unused."""
  del seq
  s = ViTSettings.from_hf(hf_config)
  return {"pixel_values": jnp.zeros((batch, s.num_channels) + s.image_size, jnp.float32)}


def params_from_state_dict(
    state: Mapping[str, np.ndarray], hf_config: Any, *, head: str
) -> tuple[dict, set[str]]:
  """Converts transformers ViT weights to this module's parameters.

  Args:
    state: weight name -> array, with or without the ``vit.`` prefix, in the
      checkpoint spelling (``encoder.layer.{i}.attention.attention.query``) or
      the newer in-memory one (``layers.{i}.attention.q_proj``).
    hf_config: the matching ``ViTConfig`` (or dict).
    head: "base" reads ``pooler.dense.*``, "image_classification" reads
      ``classifier.*``; when the state lacks them they are left out for the
      caller to initialise.

  Returns:
    ``(params, used)``: the nested parameter dict of numpy arrays and the set
    of state keys it was built from.

  Raises:
    ValueError: an unknown head, or a backbone weight that is missing or
      whose shape does not fit the config.
  """
  torch_port.validate_head(head, where="vit.params_from_state_dict", heads=HEADS)
  s = ViTSettings.from_hf(hf_config)
  r = torch_port.StateReader(state, "vit.")

  # PyTorch Conv2d weight (out, in, kh, kw) -> Flax HWIO (kh, kw, in, out).
  patch = r.dense("embeddings.patch_embeddings.projection")
  patch["kernel"] = np.transpose(patch["kernel"], (1, 0, 2, 3))
  embeddings = {
      "cls_token": r.get("embeddings.cls_token"),
      "position_embeddings": r.get("embeddings.position_embeddings"),
      "patch_embeddings": patch,
  }
  encoder = {}
  for i in range(s.num_layers):
    old, new = f"encoder.layer.{i}.", f"layers.{i}."
    encoder[f"layer_{i}"] = {
        "layernorm_before": r.layer_norm(old + "layernorm_before", new + "layernorm_before"),
        "attention": {
            "query": r.dense(old + "attention.attention.query", new + "attention.q_proj"),
            "key": r.dense(old + "attention.attention.key", new + "attention.k_proj"),
            "value": r.dense(old + "attention.attention.value", new + "attention.v_proj"),
            "output": r.dense(old + "attention.output.dense", new + "attention.o_proj"),
        },
        "layernorm_after": r.layer_norm(old + "layernorm_after", new + "layernorm_after"),
        "intermediate": r.dense(old + "intermediate.dense", new + "mlp.fc1"),
        "output": r.dense(old + "output.dense", new + "mlp.fc2"),
    }
  params = {"embeddings": embeddings, "encoder": encoder, "layernorm": r.layer_norm("layernorm")}

  # The backbone alone (a head name that adds nothing), since the pooler is optional.
  expected = jax.eval_shape(
      lambda: ViT(s, head="none").init(jax.random.key(0), **dummy_inputs(hf_config, batch=1))
  )["params"]
  torch_port.check_shapes(params, expected, model="ViT")

  # The pooler is part of the backbone ("vit.pooler.dense"), the classifier is not.
  if head == "base":
    params["pooler"] = {"dense": r.dense("pooler.dense", required=False)}
  else:
    params["classifier"] = r.dense("classifier", required=False, backbone=False)
  return torch_port.drop_missing(params), r.used
