"""BERT and RoBERTa encoders in Flax linen, numerically matching transformers.

One implementation serves both: RoBERTa differs only by its position ids
(counted from the config's ``pad_token_id + 1`` over the non-pad tokens), a
one-row token type table, and its classification head. The activation
(``hidden_act``, the exact erf GELU in released checkpoints) and LayerNorm
epsilon come from the config and padded keys get the float32 minimum as
attention logit, as in transformers' PyTorch ``BertModel``/``RobertaModel``.

Every matrix is a plain ``nn.Dense`` with a 2-D ``(d_in, d_out)`` kernel, so
LoRA adapters attach to it directly. Parameter paths ("/"-joined, what LoRA
targets are matched against)::

  embeddings/word_embeddings/embedding            (vocab, H)
  embeddings/position_embeddings/embedding        (max_positions, H)
  embeddings/token_type_embeddings/embedding      (type_vocab, H)
  embeddings/layer_norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value}/{kernel,bias}   (H, H)
  encoder/layer_{i}/attention/output/{kernel,bias}              (H, H)
  encoder/layer_{i}/attention/layer_norm/{scale,bias}
  encoder/layer_{i}/intermediate/{kernel,bias}                  (H, I)
  encoder/layer_{i}/output/{kernel,bias}                        (I, H)
  encoder/layer_{i}/output_layer_norm/{scale,bias}
  pooler/dense/{kernel,bias}                      (H, H), when there is a pooler
  classifier/{kernel,bias}                        BERT classification/regression
  classifier/dense/{kernel,bias}, classifier/out_proj/{kernel,bias}   RoBERTa
  qa_outputs/{kernel,bias}                        (H, 2), head "qa"

Heads follow transformers: BERT has a pooler for "base", "classification" and
"regression" (not "qa"); RoBERTa has one only for "base" (its classification
head reads the ``<s>`` token itself).

Example::

  module = Bert(arch=BertArch(...), head="classification", num_labels=2)
  out = module.apply({"params": params}, input_ids, attention_mask)
  out["logits"]  # (B, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import torch_port

MODEL_TYPES = ("bert", "roberta")
HEADS = torch_port.TEXT_HEADS

# Every attention and feed-forward matrix: the papers adapt all of them.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"encoder/layer_\d+/attention/(query|key|value|output)/kernel",
    r"encoder/layer_\d+/(intermediate|output)/kernel",
)

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertArch:
  """The architecture numbers of a BERT/RoBERTa encoder (from an HF config)."""

  # Rows of the word embedding table.
  vocab_size: int
  # Model width H.
  hidden_size: int
  # Number of transformer layers.
  num_layers: int
  # Attention heads; hidden_size must be a multiple of it.
  num_heads: int
  # Width I of the feed-forward layer.
  intermediate_size: int
  # Rows of the position table; the longest input is this minus position_offset.
  max_position_embeddings: int
  # Rows of the token type table (2 for BERT, 1 for RoBERTa checkpoints).
  type_vocab_size: int
  # LayerNorm epsilon (1e-12 for BERT, 1e-5 for RoBERTa).
  layer_norm_eps: float
  # Dropout after embeddings, attention output and feed-forward output.
  hidden_dropout: float
  # Dropout on the attention probabilities.
  attention_dropout: float
  # Dropout in the classification head.
  classifier_dropout: float
  # Token id of padding (the config's pad_token_id); RoBERTa's positions
  # count from pad_token_id + 1 over the tokens that are not padding.
  pad_token_id: int
  # Activation of the feed-forward layer (a `torch_port.ACTIVATIONS` name).
  hidden_act: str = "gelu"
  # Standard deviation of the normal init of matrices and embeddings.
  initializer_range: float = 0.02
  # True for RoBERTa: position ids from non-pad tokens, and RoBERTa's head.
  roberta: bool = False

  @property
  def position_offset(self) -> int:
    """The first position id a real token gets (0 for BERT, pad+1 for RoBERTa)."""
    return self.pad_token_id + 1 if self.roberta else 0

  @property
  def max_length(self) -> int:
    """The longest sequence the position table covers."""
    return self.max_position_embeddings - self.position_offset


def _dense(features: int, arch: BertArch, name: str, dtype: Any, param_dtype: Any) -> torch_port.Dense:
  # Takes a LowRankKernel too (rmlora_jax.attach): LoRA without merging.
  return torch_port.dense(features, init=torch_port.weight_init(arch.initializer_range),
                          dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(arch: BertArch, name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
  # One-pass variance, as this port has always computed it (see torch_port.layer_norm).
  return torch_port.layer_norm(arch.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                               name=name, fast_variance=True)


def _embed(num: int, arch: BertArch, name: str, dtype: Any, param_dtype: Any) -> nn.Embed:
  return torch_port.embed(num, arch.hidden_size, init=torch_port.weight_init(arch.initializer_range),
                          dtype=dtype, param_dtype=param_dtype, name=name)


class Embeddings(nn.Module):
  """Word + position + token type embeddings, LayerNorm, dropout."""

  arch: BertArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, input_ids: Array, position_ids: Array, token_type_ids: Array, deterministic: bool
  ) -> Array:
    """All inputs (B, T) int; returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    x = (
        _embed(a.vocab_size, a, "word_embeddings", dt, pdt)(input_ids)
        + _embed(a.max_position_embeddings, a, "position_embeddings", dt, pdt)(position_ids)
        + _embed(a.type_vocab_size, a, "token_type_embeddings", dt, pdt)(token_type_ids)
    )
    x = _layer_norm(a, "layer_norm", dt, pdt)(x)
    return torch_port.Dropout(a.hidden_dropout)(x, deterministic=deterministic)


class Attention(nn.Module):
  """Self-attention block: query/key/value/output kernels, residual, LayerNorm."""

  arch: BertArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, keep: Array, deterministic: bool) -> Array:
    """x: (B, T, H); keep: (B, 1, 1, T) bool padding mask; returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    b, t, h = x.shape
    n = a.num_heads
    d = h // n
    # Heads-first (B, N, T, D) with explicit transposes: on XLA CPU the two
    # batched matmuls then run about 3x faster than einsums over (B, T, N, D)
    # or jax.nn.dot_product_attention (measured at MiniLM shapes, docs/MODELS.md).
    heads = lambda y: y.reshape(b, t, n, d).transpose(0, 2, 1, 3)
    # One matmul for the three frozen kernels and one for their adapters'
    # right factors (low_rank.dense_group_apply); the parameters stay three Dense.
    init = torch_port.weight_init(a.initializer_range)
    q, k, v = map(heads, torch_port.dense_group(
        x, [torch_port.DenseParams(h, param_dtype=pdt, kernel_init=init, name=n) for n in ("query", "key", "value")],
        dt))
    # Scaling q (T*H values) is cheaper than scaling the logits (N*T*T).
    q = q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)
    logits = torch_port.mask_logits((q @ k.swapaxes(-1, -2)).astype(jnp.float32), keep)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    probs = torch_port.Dropout(a.attention_dropout)(probs, deterministic=deterministic)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, h)
    y = _dense(h, a, "output", dt, pdt)(ctx)
    y = torch_port.Dropout(a.hidden_dropout)(y, deterministic=deterministic)
    return _layer_norm(a, "layer_norm", dt, pdt)(x + y)


class Layer(nn.Module):
  """One post-LayerNorm transformer layer (attention, then feed-forward)."""

  arch: BertArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, keep: Array, deterministic: bool) -> Array:
    """x: (B, T, H); keep: (B, 1, 1, T); returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    x = Attention(a, dt, pdt, name="attention")(x, keep, deterministic)
    y = _dense(a.intermediate_size, a, "intermediate", dt, pdt)(x)
    y = torch_port.activation(a.hidden_act, where="hidden_act")(y)
    y = _dense(a.hidden_size, a, "output", dt, pdt)(y)
    y = torch_port.Dropout(a.hidden_dropout)(y, deterministic=deterministic)
    return _layer_norm(a, "output_layer_norm", dt, pdt)(x + y)


class Encoder(nn.Module):
  """The stack of layers, named ``layer_0`` ... ``layer_{L-1}``."""

  arch: BertArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, keep: Array, deterministic: bool) -> Array:
    """x: (B, T, H); keep: (B, 1, 1, T); returns (B, T, H)."""
    for i in range(self.arch.num_layers):
      x = Layer(self.arch, self.dtype, self.param_dtype, name=f"layer_{i}")(x, keep, deterministic)
    return x


class RobertaClassifier(nn.Module):
  """RoBERTa's sequence head: dropout, dense, tanh, dropout, out_proj on ``<s>``."""

  arch: BertArch
  num_labels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """x: (B, T, H); returns logits (B, num_labels)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    y = torch_port.Dropout(a.classifier_dropout)(x[:, 0], deterministic=deterministic)
    y = jnp.tanh(_dense(a.hidden_size, a, "dense", dt, pdt)(y))
    y = torch_port.Dropout(a.classifier_dropout)(y, deterministic=deterministic)
    return _dense(self.num_labels, a, "out_proj", dt, pdt)(y)


def has_pooler(arch: BertArch, head: str) -> bool:
  """Whether transformers' model for this head has a pooler (and so do we)."""
  return head == "base" if arch.roberta else head != "qa"


class Bert(nn.Module):
  """A BERT or RoBERTa encoder with an optional task head.

  Attributes:
    arch: the architecture numbers.
    head: "base", "classification", "regression" or "qa".
    num_labels: classes of the classification/regression head (1 for regression).
    dtype: the computation dtype (e.g. ``jnp.bfloat16``); softmax stays float32.
    param_dtype: the dtype parameters are created in.
  """

  arch: BertArch
  head: str = "base"
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      token_type_ids: Array | None = None,
      *,
      deterministic: bool = True,
  ) -> dict[str, Array]:
    """Encodes a batch of token ids.

    Args:
      input_ids: (B, T) int token ids.
      attention_mask: (B, T), 1 for real tokens and 0 for padding; all ones if None.
      token_type_ids: (B, T) segment ids; zeros if None.
      deterministic: False turns dropout on (pass ``rngs={"dropout": key}``).

    Returns:
      ``"last_hidden_state"`` (B, T, H); ``"pooler_output"`` (B, H) when the
      model has a pooler; ``"logits"`` (B, num_labels) for classification and
      regression; ``"start_logits"``, ``"end_logits"`` (B, T) for qa.
    """
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    torch_port.validate_head(self.head, self.num_labels, where="Bert", heads=HEADS)
    input_ids, attention_mask, token_type_ids = torch_port.text_inputs(
        input_ids, attention_mask, token_type_ids, where="Bert")
    b, t = input_ids.shape
    if t > a.max_length:
      raise ValueError(
          f"Bert: input_ids has sequence length {t}, longer than the position table allows "
          f"({a.max_length} = max_position_embeddings {a.max_position_embeddings} - offset "
          f"{a.position_offset}); truncate the inputs"
      )
    if a.roberta:
      # RoBERTa counts positions over non-pad tokens, starting at pad + 1
      # (transformers' create_position_ids_from_input_ids); pad tokens get pad.
      real = (input_ids != a.pad_token_id).astype(jnp.int32)
      position_ids = jnp.cumsum(real, axis=1) * real + a.pad_token_id
    else:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    keep = torch_port.padding_mask(attention_mask)

    x = Embeddings(a, dt, pdt, name="embeddings")(
        input_ids, position_ids, token_type_ids, deterministic
    )
    x = Encoder(a, dt, pdt, name="encoder")(x, keep, deterministic)
    out = {"last_hidden_state": x}
    init = torch_port.weight_init(a.initializer_range)
    if has_pooler(a, self.head):
      out["pooler_output"] = torch_port.Pooler(
          a.hidden_size, kernel_init=init, dtype=dt, param_dtype=pdt, name="pooler")(x)
    if self.head in ("classification", "regression"):
      if a.roberta:
        out["logits"] = RobertaClassifier(a, self.num_labels, dt, pdt, name="classifier")(
            x, deterministic
        )
      else:
        out["logits"] = torch_port.classifier_logits(
            out["pooler_output"], self.num_labels, init=init, dtype=dt, param_dtype=pdt,
            dropout=torch_port.Dropout(a.classifier_dropout), deterministic=deterministic)
    elif self.head == "qa":
      out.update(torch_port.span_logits(x, init=init, dtype=dt, param_dtype=pdt))
    return out


def arch_from_hf_config(hf_config: Any) -> BertArch:
  """Reads a transformers ``BertConfig``/``RobertaConfig`` (or its dict) into a `BertArch`.

  Raises:
    ValueError: the config's model_type is not bert/roberta, it uses a
      position embedding type or activation this module does not implement,
      hidden_size is not a multiple of num_attention_heads, a dropout
      probability is outside [0, 1], or a RoBERTa config has no pad_token_id.
  """
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  where = "bert config"
  model_type = get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{where}: model_type {model_type!r} is not one of {MODEL_TYPES}")
  pos_type = get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise ValueError(
        f"{where}: position_embedding_type {pos_type!r} is not supported (only 'absolute')"
    )
  hidden, heads, _ = torch_port.attention_sizes(hf_config, where=where)
  roberta = model_type == "roberta"
  pad = get("pad_token_id")
  if pad is None:
    if roberta:
      raise ValueError(
          f"{where}: RoBERTa's pad_token_id is None, but its position ids count from "
          "pad_token_id + 1; set it (released RoBERTa checkpoints use 1)"
      )
    pad = 0  # BERT's default; BERT itself never reads it.
  hidden_dropout = torch_port.dropout_rate(hf_config, "hidden_dropout_prob", default=0.1, where=where)
  return BertArch(
      vocab_size=int(get("vocab_size")),
      hidden_size=hidden,
      num_layers=int(get("num_hidden_layers")),
      num_heads=heads,
      intermediate_size=int(get("intermediate_size")),
      max_position_embeddings=int(get("max_position_embeddings", 512)),
      type_vocab_size=int(get("type_vocab_size", 2)),
      layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
      hidden_dropout=hidden_dropout,
      attention_dropout=torch_port.dropout_rate(
          hf_config, "attention_probs_dropout_prob", default=0.1, where=where),
      classifier_dropout=torch_port.dropout_rate(
          hf_config, "classifier_dropout", "hidden_dropout_prob", default=0.1, where=where),
      pad_token_id=int(pad),
      hidden_act=torch_port.config_activation(hf_config, "hidden_act", "gelu", where=where),
      initializer_range=float(get("initializer_range", 0.02)),
      roberta=roberta,
  )


def module_from_hf_config(
    hf_config: Any, *, head: str, num_labels: int, dtype: Any = jnp.float32
) -> nn.Module:
  """The `Bert` module for a transformers config, head and label count.

  Example::

    module = module_from_hf_config(AutoConfig.from_pretrained(folder),
                                   head="classification", num_labels=2)
  """
  torch_port.validate_head(head, num_labels, where="bert.module_from_hf_config", heads=HEADS)
  return Bert(arch=arch_from_hf_config(hf_config), head=head, num_labels=num_labels, dtype=dtype)


def params_from_state_dict(
    state: Mapping[str, np.ndarray], hf_config: Any, *, head: str
) -> tuple[dict, set[str]]:
  """Converts a transformers state dict to this module's nested params.

  Keys may carry the ``bert.``/``roberta.`` prefix (task models) or not (base
  models). Linear weights are transposed to Flax's ``(d_in, d_out)``.

  Args:
    state: HF weight name -> array.
    hf_config: the checkpoint's transformers config.
    head: the head the params are for; its weights are taken when present.

  Returns:
    (nested params holding every leaf found, set of the state keys used). Leaves
    the checkpoint lacks (typically the head) are simply absent.

  Raises:
    ValueError: ``head`` is not one of `HEADS`.
  """
  torch_port.validate_head(head, where="bert.params_from_state_dict", heads=HEADS)
  arch = arch_from_hf_config(hf_config)
  r = torch_port.StateReader(state, ("bert.", "roberta."))
  dense = lambda name, backbone=True: r.dense(name, required=False, backbone=backbone)
  norm = lambda name: r.layer_norm(name, required=False)
  embedding = lambda name: r.embedding(name, required=False)
  params: dict = {
      "embeddings": {
          "word_embeddings": embedding("embeddings.word_embeddings"),
          "position_embeddings": embedding("embeddings.position_embeddings"),
          "token_type_embeddings": embedding("embeddings.token_type_embeddings"),
          "layer_norm": norm("embeddings.LayerNorm"),
      },
      "encoder": {},
  }
  for i in range(arch.num_layers):
    p = f"encoder.layer.{i}."
    params["encoder"][f"layer_{i}"] = {
        "attention": {
            "query": dense(p + "attention.self.query"),
            "key": dense(p + "attention.self.key"),
            "value": dense(p + "attention.self.value"),
            "output": dense(p + "attention.output.dense"),
            "layer_norm": norm(p + "attention.output.LayerNorm"),
        },
        "intermediate": dense(p + "intermediate.dense"),
        "output": dense(p + "output.dense"),
        "output_layer_norm": norm(p + "output.LayerNorm"),
    }
  if has_pooler(arch, head):
    params["pooler"] = {"dense": dense("pooler.dense")}
  if head in ("classification", "regression"):
    if arch.roberta:
      params["classifier"] = {
          "dense": dense("classifier.dense", backbone=False),
          "out_proj": dense("classifier.out_proj", backbone=False),
      }
    else:
      params["classifier"] = dense("classifier", backbone=False)
  elif head == "qa":
    params["qa_outputs"] = dense("qa_outputs", backbone=False)
  return torch_port.drop_missing(params), r.used


def dummy_inputs(hf_config: Any, batch: int = 2, seq: int = 8) -> dict:
  """Keyword inputs of the right shapes and dtypes for ``init``/``eval_shape``."""
  del hf_config  # Every BERT/RoBERTa takes the same kind of input.
  return {
      "input_ids": jnp.ones((batch, seq), jnp.int32),
      "attention_mask": jnp.ones((batch, seq), jnp.int32),
      "token_type_ids": jnp.zeros((batch, seq), jnp.int32),
  }
