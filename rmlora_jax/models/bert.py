"""BERT and RoBERTa encoders in Flax linen, numerically matching transformers.

One implementation serves both: RoBERTa differs only by its position ids
(counted from ``pad_token_id + 1`` over the non-pad tokens), a one-row token
type table, and its classification head. GELU is the exact erf form, LayerNorm
epsilon comes from the config and padding is an additive large negative on the
attention logits, as in transformers' PyTorch ``BertModel``/``RobertaModel``.

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
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import hub, torch_port

MODEL_TYPES = ("bert", "roberta")

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
  # Token id of padding; RoBERTa's positions count from pad_token_id + 1.
  pad_token_id: int
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
  # Takes a LowRankKernel too (rmlora_jax.adapters.lora.attach): LoRA without merging.
  return torch_port.dense(features, init=nn.initializers.normal(arch.initializer_range),
                          dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(arch: BertArch, name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=arch.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


def _embed(num: int, arch: BertArch, name: str, dtype: Any, param_dtype: Any) -> nn.Embed:
  return nn.Embed(
      num,
      arch.hidden_size,
      embedding_init=nn.initializers.normal(arch.initializer_range),
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
  )


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
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    """x: (B, T, H); bias: (B, 1, 1, T) float32 additive mask; returns (B, T, H)."""
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
    init = nn.initializers.normal(a.initializer_range)
    q, k, v = map(heads, torch_port.dense_group(
        x, [torch_port.DenseParams(h, param_dtype=pdt, kernel_init=init, name=n) for n in ("query", "key", "value")],
        dt))
    # Scaling q (T*H values) is cheaper than scaling the logits (N*T*T).
    q = q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)
    logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) + bias
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
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    """x: (B, T, H); bias: (B, 1, 1, T); returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    x = Attention(a, dt, pdt, name="attention")(x, bias, deterministic)
    y = _dense(a.intermediate_size, a, "intermediate", dt, pdt)(x)
    y = jax.nn.gelu(y, approximate=False)
    y = _dense(a.hidden_size, a, "output", dt, pdt)(y)
    y = torch_port.Dropout(a.hidden_dropout)(y, deterministic=deterministic)
    return _layer_norm(a, "output_layer_norm", dt, pdt)(x + y)


class Encoder(nn.Module):
  """The stack of layers, named ``layer_0`` ... ``layer_{L-1}``."""

  arch: BertArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    """x: (B, T, H); bias: (B, 1, 1, T); returns (B, T, H)."""
    for i in range(self.arch.num_layers):
      x = Layer(self.arch, self.dtype, self.param_dtype, name=f"layer_{i}")(x, bias, deterministic)
    return x


class Pooler(nn.Module):
  """tanh(Dense(first token)), BERT's pooled output."""

  arch: BertArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, T, H); returns (B, H)."""
    a = self.arch
    return jnp.tanh(_dense(a.hidden_size, a, "dense", self.dtype, self.param_dtype)(x[:, 0]))


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
    hub.validate_head(self.head, self.num_labels, where="Bert")
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"Bert: input_ids must be (batch, seq), got shape {input_ids.shape}")
    b, t = input_ids.shape
    if t > a.max_length:
      raise ValueError(
          f"Bert: input_ids has sequence length {t}, longer than the position table allows "
          f"({a.max_length} = max_position_embeddings {a.max_position_embeddings} - offset "
          f"{a.position_offset}); truncate the inputs"
      )
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
      if jnp.shape(arr) != (b, t):
        raise ValueError(
            f"Bert: {name} has shape {jnp.shape(arr)}, but input_ids has shape {(b, t)}"
        )
    if a.roberta:
      # RoBERTa counts positions over non-pad tokens, starting at pad + 1.
      real = (input_ids != a.pad_token_id).astype(jnp.int32)
      position_ids = jnp.cumsum(real, axis=1) * real + a.pad_token_id
    else:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bias = jnp.where(
        jnp.asarray(attention_mask)[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min
    ).astype(jnp.float32)

    x = Embeddings(a, dt, pdt, name="embeddings")(
        input_ids, position_ids, token_type_ids, deterministic
    )
    x = Encoder(a, dt, pdt, name="encoder")(x, bias, deterministic)
    out = {"last_hidden_state": x}
    if has_pooler(a, self.head):
      out["pooler_output"] = Pooler(a, dt, pdt, name="pooler")(x)
    if self.head in ("classification", "regression"):
      if a.roberta:
        out["logits"] = RobertaClassifier(a, self.num_labels, dt, pdt, name="classifier")(
            x, deterministic
        )
      else:
        y = torch_port.Dropout(a.classifier_dropout)(out["pooler_output"], deterministic=deterministic)
        out["logits"] = _dense(self.num_labels, a, "classifier", dt, pdt)(y)
    elif self.head == "qa":
      span = _dense(2, a, "qa_outputs", dt, pdt)(x)
      out["start_logits"], out["end_logits"] = span[..., 0], span[..., 1]
    return out


def arch_from_hf_config(hf_config: Any) -> BertArch:
  """Reads a transformers ``BertConfig``/``RobertaConfig`` into a `BertArch`.

  Raises:
    ValueError: the config's model_type is not bert/roberta, it uses a
      position embedding type or activation this module does not implement,
      or hidden_size is not a multiple of num_attention_heads.
  """
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in MODEL_TYPES:
    raise ValueError(f"bert: config model_type {model_type!r} is not one of {MODEL_TYPES}")
  pos_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
  if pos_type != "absolute":
    raise ValueError(
        f"bert: config position_embedding_type {pos_type!r} is not supported (only 'absolute')"
    )
  act = getattr(hf_config, "hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"bert: config hidden_act {act!r} is not supported (only exact 'gelu')")
  if hf_config.hidden_size % hf_config.num_attention_heads:
    raise ValueError(
        f"bert: config hidden_size {hf_config.hidden_size} is not a multiple of "
        f"num_attention_heads {hf_config.num_attention_heads}"
    )
  classifier_dropout = getattr(hf_config, "classifier_dropout", None)
  pad = hf_config.pad_token_id
  return BertArch(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=hf_config.num_attention_heads,
      intermediate_size=hf_config.intermediate_size,
      max_position_embeddings=hf_config.max_position_embeddings,
      type_vocab_size=hf_config.type_vocab_size,
      layer_norm_eps=float(hf_config.layer_norm_eps),
      hidden_dropout=float(hf_config.hidden_dropout_prob),
      attention_dropout=float(hf_config.attention_probs_dropout_prob),
      classifier_dropout=float(
          hf_config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
      ),
      pad_token_id=0 if pad is None else int(pad),
      initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
      roberta=model_type == "roberta",
  )


def module_from_hf_config(
    hf_config: Any, *, head: str, num_labels: int, dtype: Any = jnp.float32
) -> nn.Module:
  """The `Bert` module for a transformers config, head and label count.

  Example::

    module = module_from_hf_config(AutoConfig.from_pretrained(folder),
                                   head="classification", num_labels=2)
  """
  hub.validate_head(head, num_labels, where="bert.module_from_hf_config")
  if head == "image_classification":
    raise ValueError("bert.module_from_hf_config: head 'image_classification' is for vision "
                     "models; text encoders take 'classification', 'regression', 'qa' or 'base'")
  return Bert(arch=arch_from_hf_config(hf_config), head=head, num_labels=num_labels, dtype=dtype)


def _weight_table(arch: BertArch, head: str) -> list[tuple[str, tuple[str, ...], str]]:
  """(HF module name without model prefix, our module path, kind) per module."""
  table = [
      ("embeddings.word_embeddings", ("embeddings", "word_embeddings"), "embed"),
      ("embeddings.position_embeddings", ("embeddings", "position_embeddings"), "embed"),
      ("embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings"), "embed"),
      ("embeddings.LayerNorm", ("embeddings", "layer_norm"), "norm"),
  ]
  for i in range(arch.num_layers):
    hf, ours = f"encoder.layer.{i}.", ("encoder", f"layer_{i}")
    table += [
        (hf + "attention.self.query", (*ours, "attention", "query"), "dense"),
        (hf + "attention.self.key", (*ours, "attention", "key"), "dense"),
        (hf + "attention.self.value", (*ours, "attention", "value"), "dense"),
        (hf + "attention.output.dense", (*ours, "attention", "output"), "dense"),
        (hf + "attention.output.LayerNorm", (*ours, "attention", "layer_norm"), "norm"),
        (hf + "intermediate.dense", (*ours, "intermediate"), "dense"),
        (hf + "output.dense", (*ours, "output"), "dense"),
        (hf + "output.LayerNorm", (*ours, "output_layer_norm"), "norm"),
    ]
  if has_pooler(arch, head):
    table.append(("pooler.dense", ("pooler", "dense"), "dense"))
  if head in ("classification", "regression"):
    if arch.roberta:
      table += [
          ("classifier.dense", ("classifier", "dense"), "dense"),
          ("classifier.out_proj", ("classifier", "out_proj"), "dense"),
      ]
    else:
      table.append(("classifier", ("classifier",), "dense"))
  elif head == "qa":
    table.append(("qa_outputs", ("qa_outputs",), "dense"))
  return table


# (our leaf name, HF suffixes tried in order, transpose) per kind of module;
# gamma/beta are the names of checkpoints saved by old transformers versions.
_LEAVES = {
    "embed": (("embedding", ("weight",), False),),
    "dense": (("kernel", ("weight",), True), ("bias", ("bias",), False)),
    "norm": (("scale", ("weight", "gamma"), False), ("bias", ("bias", "beta"), False)),
}


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
  """
  arch = arch_from_hf_config(hf_config)
  prefix = re.compile(r"^(bert|roberta)\.")
  by_name: dict[str, str] = {}
  for key in state:
    name = prefix.sub("", key)
    # An unprefixed key wins over a prefixed duplicate.
    if name not in by_name or name == key:
      by_name[name] = key
  params: dict = {}
  used: set[str] = set()
  for hf_module, path, kind in _weight_table(arch, head):
    for leaf, suffixes, transpose in _LEAVES[kind]:
      names = [f"{hf_module}.{s}" for s in suffixes if f"{hf_module}.{s}" in by_name]
      if not names:
        continue
      key = by_name[names[0]]
      value = np.asarray(state[key])
      node = params
      for part in path:
        node = node.setdefault(part, {})
      node[leaf] = value.T if transpose else value
      used.add(key)
  return params, used


def dummy_inputs(hf_config: Any, batch: int = 2, seq: int = 8) -> dict:
  """Keyword inputs of the right shapes and dtypes for ``init``/``eval_shape``."""
  del hf_config  # Every BERT/RoBERTa takes the same kind of input.
  return {
      "input_ids": jnp.ones((batch, seq), jnp.int32),
      "attention_mask": jnp.ones((batch, seq), jnp.int32),
      "token_type_ids": jnp.zeros((batch, seq), jnp.int32),
  }
