"""DeBERTa-v2 and DeBERTa-v3 encoders in Flax linen, loading Hugging Face weights.

Matches transformers' ``DebertaV2Model``, ``DebertaV2ForSequenceClassification``
and ``DebertaV2ForQuestionAnswering`` numerically (same weights, same inputs).
Disentangled attention adds to the content score ``q_i . k_j`` a
content-to-position term ``q_i . pk[d(i, j)]`` ("c2p") and a position-to-content
term ``k_j . pq[d(j, i)]`` ("p2c"), where ``pk``/``pq`` project the relative
embedding table and ``d`` turns the relative distance ``i - j`` into a row of
that table (log buckets when ``position_buckets > 0``, as in v3); all three are
divided by ``sqrt(head_size * (1 + number of terms))``.

Parameter paths (``L`` layers; optional parts in brackets)::

  embeddings/word_embeddings/embedding              (vocab, E)
  [embeddings/position_embeddings/embedding]        if position_biased_input
  [embeddings/token_type_embeddings/embedding]      if type_vocab_size > 0
  [embeddings/embed_proj/kernel]                    if embedding_size != hidden
  embeddings/layer_norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  [encoder/layer_{i}/attention/{pos_key,pos_query}/{kernel,bias}]  without share_att_key
  encoder/layer_{i}/attention/layer_norm/{scale,bias}
  encoder/layer_{i}/intermediate/{kernel,bias}
  encoder/layer_{i}/output/{kernel,bias}
  encoder/layer_{i}/output_layer_norm/{scale,bias}
  [encoder/rel_embeddings/embedding]                (2 * span, hidden) if relative_attention
  [encoder/rel_layer_norm/{scale,bias}]             if "layer_norm" in norm_rel_ebd
  [encoder/conv/conv/{kernel,bias}, encoder/conv/layer_norm/{scale,bias}]  if conv_kernel_size > 0
  pooler/dense/{kernel,bias}, classifier/{kernel,bias}   heads "classification", "regression"
  qa_outputs/{kernel,bias}                               head "qa"

They correspond to transformers' ``deberta.embeddings.*``,
``deberta.encoder.layer.{i}.attention.self.{query,key,value}_proj``,
``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``,
``deberta.encoder.rel_embeddings``, ``deberta.encoder.LayerNorm``,
``pooler.dense``, ``classifier`` and ``qa_outputs``.

Example::

  module = module_from_hf_config(hf_config, head="classification", num_labels=3)
  params, used = params_from_state_dict(state, hf_config, head="classification")
  out = module.apply({"params": params}, input_ids, attention_mask)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import torch_port

MODEL_TYPES = ("deberta-v2",)
HEADS = torch_port.TEXT_HEADS

# Query, key, value, attention output, intermediate and output kernels of every
# layer: what LoRA, AdaLoRA and their kin adapt in DeBERTa.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"encoder/layer_\d+/attention/(query|key|value|output)/kernel",
    r"encoder/layer_\d+/(intermediate|output)/kernel",
)

@dataclasses.dataclass(frozen=True, kw_only=True)
class DebertaV2Settings:
  """The parts of a transformers ``DebertaV2Config`` the forward pass reads.

  Hashable, so a module holding it is a static jit argument. Build it with
  `DebertaV2Settings.from_hf`.
  """

  vocab_size: int
  hidden_size: int
  # Width of the token embeddings; projected to hidden_size when it differs.
  embedding_size: int
  num_layers: int
  num_heads: int
  head_size: int
  intermediate_size: int
  hidden_act: str
  hidden_dropout: float
  attention_dropout: float
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  initializer_range: float
  relative_attention: bool
  # Half the number of rows of the relative embedding table (att_span in transformers).
  position_span: int
  # > 0: relative distances go into log buckets (v3); otherwise they are clipped.
  position_buckets: int
  # Largest distance the buckets are spread over (max_relative_positions).
  max_relative_positions: int
  position_biased_input: bool
  # Subset of ("c2p", "p2c") in the config's order.
  pos_att_type: tuple[str, ...]
  share_att_key: bool
  norm_rel_layer_norm: bool
  pooler_hidden_size: int
  pooler_hidden_act: str
  pooler_dropout: float
  cls_dropout: float
  conv_kernel_size: int
  conv_groups: int
  conv_act: str

  @classmethod
  def from_hf(cls, hf_config: Any) -> DebertaV2Settings:
    """Reads a ``DebertaV2Config`` (or its dict), filling transformers' defaults.

    Raises:
      ValueError: an unknown ``pos_att_type`` entry, a hidden size that the
        heads do not divide, an unsupported activation, or a dropout
        probability outside [0, 1].
    """
    where = "DeBERTa config"
    get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
    hidden, heads, head_size = torch_port.attention_sizes(
        hf_config, where=where, head_size_field="attention_head_size")
    pos_att_type = get("pos_att_type", [])
    if isinstance(pos_att_type, str):
      pos_att_type = [t.strip() for t in pos_att_type.lower().split("|") if t.strip()]
    pos_att_type = tuple(pos_att_type)
    unknown = [t for t in pos_att_type if t not in ("c2p", "p2c")]
    if unknown:
      raise ValueError(f"DeBERTa config: pos_att_type={list(pos_att_type)} has unknown entries {unknown}")
    max_pos = int(get("max_position_embeddings", 512))
    max_rel = int(get("max_relative_positions", -1))
    if max_rel < 1:
      max_rel = max_pos
    buckets = int(get("position_buckets", -1))
    norm_rel = [t.strip() for t in str(get("norm_rel_ebd", "none")).lower().split("|")]
    dropout = lambda *names, default: torch_port.dropout_rate(hf_config, *names, default=default, where=where)
    activation = lambda name, default: torch_port.config_activation(hf_config, name, default, where=where)
    return cls(
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        embedding_size=int(get("embedding_size", hidden)),
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        head_size=head_size,
        intermediate_size=int(get("intermediate_size")),
        hidden_act=activation("hidden_act", "gelu"),
        hidden_dropout=dropout("hidden_dropout_prob", default=0.1),
        attention_dropout=dropout("attention_probs_dropout_prob", default=0.1),
        max_position_embeddings=max_pos,
        type_vocab_size=int(get("type_vocab_size", 0)),
        layer_norm_eps=float(get("layer_norm_eps", 1e-7)),
        initializer_range=float(get("initializer_range", 0.02)),
        relative_attention=bool(get("relative_attention", False)),
        position_span=buckets if buckets > 0 else max_rel,
        position_buckets=buckets,
        max_relative_positions=max_rel,
        position_biased_input=bool(get("position_biased_input", True)),
        pos_att_type=pos_att_type,
        share_att_key=bool(get("share_att_key", False)),
        norm_rel_layer_norm="layer_norm" in norm_rel,
        pooler_hidden_size=int(get("pooler_hidden_size", hidden)),
        pooler_hidden_act=activation("pooler_hidden_act", "gelu"),
        pooler_dropout=dropout("pooler_dropout", default=0.0),
        cls_dropout=dropout("cls_dropout", "hidden_dropout_prob", default=0.1),
        conv_kernel_size=int(get("conv_kernel_size", 0)),
        conv_groups=int(get("conv_groups", 1)),
        conv_act=activation("conv_act", "tanh"),
    )


def log_bucket_positions(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
  """DeBERTa-v3's log buckets: exact within ``bucket_size // 2``, logarithmic beyond.

  Computed in float32 as transformers does, so that ``ceil`` rounds alike.
  """
  mid = bucket_size // 2
  sign = np.sign(relative)
  inside = (relative < mid) & (relative > -mid)
  abs_pos = np.where(inside, mid - 1, np.abs(relative)).astype(np.float32)
  ratio = np.log(abs_pos / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
  log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
  return np.where(abs_pos <= mid, relative, log_pos * sign).astype(np.int32)


def relative_positions(length: int, settings: DebertaV2Settings) -> np.ndarray:
  """``(length, length)`` relative distances ``i - j`` (bucketed when configured)."""
  ids = np.arange(length, dtype=np.int64)
  relative = ids[:, None] - ids[None, :]
  if settings.position_buckets > 0 and settings.max_relative_positions > 0:
    return log_bucket_positions(relative, settings.position_buckets, settings.max_relative_positions)
  return relative.astype(np.int32)


def _dense(features: int, settings: DebertaV2Settings, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  init = torch_port.weight_init(settings.initializer_range)
  return torch_port.dense(features, init=init, dtype=dtype, name=name, use_bias=use_bias)


def _layer_norm(settings: DebertaV2Settings, dtype: Any, name: str) -> nn.LayerNorm:
  return torch_port.layer_norm(settings.layer_norm_eps, dtype=dtype, name=name)


class _Embeddings(nn.Module):
  settings: DebertaV2Settings
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids, mask, deterministic):
    s = self.settings
    embed = lambda num, name: torch_port.embed(
        num, s.embedding_size, init=torch_port.weight_init(s.initializer_range), dtype=self.dtype, name=name)
    x = embed(s.vocab_size, "word_embeddings")(input_ids)
    if s.position_biased_input:
      positions = jnp.arange(input_ids.shape[1])
      x = x + embed(s.max_position_embeddings, "position_embeddings")(positions)[None]
    if s.type_vocab_size > 0:
      x = x + embed(s.type_vocab_size, "token_type_embeddings")(token_type_ids)
    if s.embedding_size != s.hidden_size:
      x = _dense(s.hidden_size, s, self.dtype, "embed_proj", use_bias=False)(x)
    x = _layer_norm(s, self.dtype, "layer_norm")(x)
    x = x * mask[..., None].astype(x.dtype)
    return nn.Dropout(s.hidden_dropout)(x, deterministic=deterministic)


class _DisentangledAttention(nn.Module):
  settings: DebertaV2Settings
  dtype: Any

  @nn.compact
  def __call__(self, x, keep, rel_table, relative, deterministic):
    s = self.settings
    n, d = s.num_heads, s.head_size
    query = _dense(n * d, s, self.dtype, "query")
    key = _dense(n * d, s, self.dtype, "key")
    value = _dense(n * d, s, self.dtype, "value")

    heads = lambda y: torch_port.split_heads(y, n)
    q, k, v = heads(query(x)), heads(key(x)), heads(value(x))
    scale = math.sqrt(d * (1 + len(s.pos_att_type)))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / scale

    if s.relative_attention:
      rel_table = nn.Dropout(s.hidden_dropout)(rel_table, deterministic=deterministic)
      span = s.position_span
      length = x.shape[1]
      rows = np.arange(length)[:, None]
      if "c2p" in s.pos_att_type:
        pos_key = key if s.share_att_key else _dense(n * d, s, self.dtype, "pos_key")
        pk = heads(pos_key(rel_table))  # (n, 2*span, d)
        c2p = jnp.einsum("bhqd,hrd->bhqr", q, pk)
        index = np.clip(relative + span, 0, 2 * span - 1)
        scores = scores + c2p[:, :, rows, index] / scale
      if "p2c" in s.pos_att_type:
        pos_query = query if s.share_att_key else _dense(n * d, s, self.dtype, "pos_query")
        pq = heads(pos_query(rel_table))
        p2c = jnp.einsum("bhkd,hrd->bhkr", k, pq)
        # Key j reads row d(j, i) = clip(-(j - i) + span) of its projection.
        index = np.clip(-relative + span, 0, 2 * span - 1)
        scores = scores + jnp.swapaxes(p2c[:, :, rows, index], -1, -2) / scale

    scores = torch_port.mask_logits(scores, keep)
    context = torch_port.attend(scores, v, nn.Dropout(s.attention_dropout), deterministic)
    out = _dense(s.hidden_size, s, self.dtype, "output")(context)
    out = nn.Dropout(s.hidden_dropout)(out, deterministic=deterministic)
    return _layer_norm(s, self.dtype, "layer_norm")(out + x)


class _Layer(nn.Module):
  settings: DebertaV2Settings
  dtype: Any

  @nn.compact
  def __call__(self, x, keep, rel_table, relative, deterministic):
    s = self.settings
    x = _DisentangledAttention(s, self.dtype, name="attention")(x, keep, rel_table, relative, deterministic)
    h = _dense(s.intermediate_size, s, self.dtype, "intermediate")(x)
    h = torch_port.activation(s.hidden_act, where="hidden_act")(h)
    h = _dense(s.hidden_size, s, self.dtype, "output")(h)
    h = nn.Dropout(s.hidden_dropout)(h, deterministic=deterministic)
    return _layer_norm(s, self.dtype, "output_layer_norm")(h + x)


class _ConvLayer(nn.Module):
  """The 1-D convolution DeBERTa-v2 (xlarge, xxlarge) adds after the first layer."""

  settings: DebertaV2Settings
  dtype: Any

  @nn.compact
  def __call__(self, embedded, layer_out, mask, deterministic):
    s = self.settings
    pad = (s.conv_kernel_size - 1) // 2
    out = nn.Conv(
        s.hidden_size,
        (s.conv_kernel_size,),
        padding=[(pad, pad)],
        feature_group_count=s.conv_groups,
        dtype=self.dtype,
        name="conv",
    )(embedded)
    keep = mask[..., None].astype(out.dtype)
    out = torch_port.activation(s.conv_act, where="conv_act")(
        nn.Dropout(s.hidden_dropout)(out * keep, deterministic=deterministic)
    )
    return _layer_norm(s, self.dtype, "layer_norm")(layer_out + out) * keep


class _Encoder(nn.Module):
  settings: DebertaV2Settings
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, deterministic):
    s = self.settings
    length = x.shape[1]
    keep = torch_port.padding_mask(mask, mask_queries=True)
    rel_table = relative = None
    if s.relative_attention:
      rel_table = torch_port.embed(
          2 * s.position_span, s.hidden_size, init=torch_port.weight_init(s.initializer_range),
          dtype=self.dtype, name="rel_embeddings",
      )(jnp.arange(2 * s.position_span))
      if s.norm_rel_layer_norm:
        rel_table = _layer_norm(s, self.dtype, "rel_layer_norm")(rel_table)
      relative = relative_positions(length, s)
    embedded = x
    for i in range(s.num_layers):
      x = _Layer(s, self.dtype, name=f"layer_{i}")(x, keep, rel_table, relative, deterministic)
      if i == 0 and s.conv_kernel_size > 0:
        x = _ConvLayer(s, self.dtype, name="conv")(embedded, x, mask, deterministic)
    return x


class DebertaV2(nn.Module):
  """A DeBERTa-v2/v3 encoder with an optional task head.

  Attributes:
    settings: the architecture, from `DebertaV2Settings.from_hf`.
    head: "base", "classification", "regression" or "qa".
    num_labels: outputs of the head (ignored for "base").
    dtype: the computation dtype (parameters stay float32).
  """

  settings: DebertaV2Settings
  head: str = "base"
  num_labels: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
  ) -> dict[str, jax.Array]:
    """Encodes ``input_ids`` (B, T); returns a dict of outputs (see module doc)."""
    s = self.settings
    input_ids, attention_mask, token_type_ids = torch_port.text_inputs(
        input_ids, attention_mask, token_type_ids, where="DeBERTa")
    length = input_ids.shape[1]
    if s.position_biased_input and length > s.max_position_embeddings:
      raise ValueError(
          f"DeBERTa input length {length} exceeds the position table "
          f"(config max_position_embeddings={s.max_position_embeddings})"
      )

    x = _Embeddings(s, self.dtype, name="embeddings")(input_ids, token_type_ids, attention_mask, deterministic)
    x = _Encoder(s, self.dtype, name="encoder")(x, attention_mask, deterministic)
    out = {"last_hidden_state": x}
    init = torch_port.weight_init(s.initializer_range)
    if self.head in ("classification", "regression"):
      # transformers' ContextPooler; this port draws its dropout masks with nn.Dropout.
      out["pooler_output"] = torch_port.Pooler(
          s.pooler_hidden_size, kernel_init=init, act=s.pooler_hidden_act,
          dropout_rate=s.pooler_dropout, dropout_type=nn.Dropout, dtype=self.dtype, name="pooler",
      )(x, deterministic)
      out["logits"] = torch_port.classifier_logits(
          out["pooler_output"], self.num_labels, init=init, dtype=self.dtype,
          dropout=nn.Dropout(s.cls_dropout), deterministic=deterministic)
    elif self.head == "qa":
      out.update(torch_port.span_logits(x, init=init, dtype=self.dtype))
    return out


def module_from_hf_config(hf_config: Any, *, head: str, num_labels: int, dtype: Any = jnp.float32) -> DebertaV2:
  """Builds the Flax module for a transformers ``DebertaV2Config``.

  Args:
    hf_config: a ``DebertaV2Config`` or its dict.
    head: "base", "classification" (num_labels >= 2), "regression"
      (num_labels == 1) or "qa" (two outputs whatever num_labels).
    num_labels: outputs of the head.
    dtype: computation dtype.

  Raises:
    ValueError: unknown head, or num_labels that does not suit it
      (`torch_port.validate_head`).
  """
  torch_port.validate_head(head, num_labels, where="deberta_v2.module_from_hf_config", heads=HEADS)
  return DebertaV2(DebertaV2Settings.from_hf(hf_config), head=head, num_labels=int(num_labels), dtype=dtype)


def dummy_inputs(hf_config: Any, batch: int = 2, seq: int = 8) -> dict[str, jax.Array]:
  """Keyword arguments for ``module.init`` / ``jax.eval_shape``."""
  del hf_config
  return {
      "input_ids": jnp.zeros((batch, seq), jnp.int32),
      "attention_mask": jnp.ones((batch, seq), jnp.int32),
  }


def params_from_state_dict(
    state: Mapping[str, np.ndarray], hf_config: Any, *, head: str
) -> tuple[dict, set[str]]:
  """Converts transformers DeBERTa-v2 weights to this module's parameters.

  Args:
    state: weight name -> array, with or without the ``deberta.`` prefix, as
      ``safetensors.numpy.load_file`` returns.
    hf_config: the matching ``DebertaV2Config`` (or dict).
    head: the head to read (``pooler.*``/``classifier.*`` or ``qa_outputs.*``);
      head weights the state lacks are left out for the caller to initialise.

  Returns:
    ``(params, used)``: the nested parameter dict of numpy arrays and the set
    of state keys it was built from.

  Raises:
    ValueError: an unknown head, or a backbone weight that is missing or
      whose shape does not fit the config.
  """
  torch_port.validate_head(head, where="deberta_v2.params_from_state_dict", heads=HEADS)
  s = DebertaV2Settings.from_hf(hf_config)
  r = torch_port.StateReader(state, "deberta.")

  embeddings = {"word_embeddings": r.embedding("embeddings.word_embeddings")}
  if s.position_biased_input:
    embeddings["position_embeddings"] = r.embedding("embeddings.position_embeddings")
  if s.type_vocab_size > 0:
    embeddings["token_type_embeddings"] = r.embedding("embeddings.token_type_embeddings")
  if s.embedding_size != s.hidden_size:
    embeddings["embed_proj"] = r.dense("embeddings.embed_proj")
  embeddings["layer_norm"] = r.layer_norm("embeddings.LayerNorm")

  encoder = {}
  for i in range(s.num_layers):
    p = f"encoder.layer.{i}."
    attention = {
        "query": r.dense(p + "attention.self.query_proj"),
        "key": r.dense(p + "attention.self.key_proj"),
        "value": r.dense(p + "attention.self.value_proj"),
        "output": r.dense(p + "attention.output.dense"),
        "layer_norm": r.layer_norm(p + "attention.output.LayerNorm"),
    }
    if s.relative_attention and not s.share_att_key:
      if "c2p" in s.pos_att_type:
        attention["pos_key"] = r.dense(p + "attention.self.pos_key_proj")
      if "p2c" in s.pos_att_type:
        attention["pos_query"] = r.dense(p + "attention.self.pos_query_proj")
    encoder[f"layer_{i}"] = {
        "attention": attention,
        "intermediate": r.dense(p + "intermediate.dense"),
        "output": r.dense(p + "output.dense"),
        "output_layer_norm": r.layer_norm(p + "output.LayerNorm"),
    }
  if s.relative_attention:
    encoder["rel_embeddings"] = r.embedding("encoder.rel_embeddings")
    if s.norm_rel_layer_norm:
      encoder["rel_layer_norm"] = r.layer_norm("encoder.LayerNorm")
  if s.conv_kernel_size > 0:
    # PyTorch Conv1d weight (out, in / groups, k) -> Flax (k, in / groups, out).
    conv = r.dense("encoder.conv.conv")  # .T already reverses all three axes.
    encoder["conv"] = {"conv": conv, "layer_norm": r.layer_norm("encoder.conv.LayerNorm")}
  params = {"embeddings": embeddings, "encoder": encoder}

  expected = jax.eval_shape(
      lambda: DebertaV2(s).init(jax.random.key(0), **dummy_inputs(hf_config, 1, 2))
  )["params"]
  torch_port.check_shapes(params, expected, model="DeBERTa-v2")

  # Head weights sit outside the backbone ("pooler.dense", not "deberta.pooler.dense").
  if head in ("classification", "regression"):
    params["pooler"] = {"dense": r.dense("pooler.dense", required=False, backbone=False)}
    params["classifier"] = r.dense("classifier", required=False, backbone=False)
  elif head == "qa":
    params["qa_outputs"] = r.dense("qa_outputs", required=False, backbone=False)
  return torch_port.drop_missing(params), r.used
