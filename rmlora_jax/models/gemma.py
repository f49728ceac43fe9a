"""Gemma 2 and Gemma 3 (text) decoders in Flax linen, matching transformers.

The two generations share one module; what sets them apart is read from the
config into `GemmaArch`:

* Both: embeddings multiplied by ``sqrt(hidden_size)`` (the factor cast to
  the compute dtype first, as transformers does), RMSNorms that scale by
  ``1 + weight`` in float32, a GELU-tanh gated MLP, four norms per layer
  (around the attention and around the MLP), the attention scale
  ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``, an
  explicit ``head_dim``, sliding-window attention on the layers that
  ``layer_types`` marks ``"sliding_attention"``, and a tied LM head.
* Gemma 2 (``model_type="gemma2"``): tanh soft-capping of the attention
  logits (``attn_logit_softcapping``) and of the final logits
  (``final_logit_softcapping``); one RoPE for every layer.
* Gemma 3 (``model_type="gemma3_text"``, transformers' ``Gemma3ForCausalLM``):
  an RMSNorm over the head dimension of the queries and keys (``q_norm``,
  ``k_norm``) before RoPE, and two RoPEs: the local base
  (``rope_local_base_freq``, ``rope_parameters["sliding_attention"]``) on
  sliding layers, the global ``rope_theta`` with its scaling
  (``rope_parameters["full_attention"]``) on full layers. As in transformers,
  ``attn_logit_softcapping`` is not applied, ``final_logit_softcapping`` is.

Every matrix is a 2-D ``(d_in, d_out)`` kernel, so LoRA adapters attach
without merging. Parameter paths ("/"-joined)::

  model/embed_tokens/embedding                            (vocab, H)
  model/layers_{i}/input_layernorm/scale                  (H,)
  model/layers_{i}/self_attn/q_proj/{kernel,bias}         (H, heads * D)
  model/layers_{i}/self_attn/{k,v}_proj/{kernel,bias}     (H, kv_heads * D)
  model/layers_{i}/self_attn/{q,k}_norm/scale             (D,), Gemma 3 only
  model/layers_{i}/self_attn/o_proj/{kernel,bias}         (heads * D, H)
  model/layers_{i}/post_attention_layernorm/scale         (H,)
  model/layers_{i}/pre_feedforward_layernorm/scale        (H,)
  model/layers_{i}/mlp/{gate,up}_proj/kernel              (H, I)
  model/layers_{i}/mlp/down_proj/kernel                   (I, H)
  model/layers_{i}/post_feedforward_layernorm/scale       (H,)
  model/norm/scale                                        (H,)
  lm_head/kernel                                          (H, vocab), untied models only

(attention biases only with ``attention_bias``). A norm's ``scale`` is the
checkpoint's weight ``w`` itself; the norm multiplies by ``1 + w``.

The module's call and its KV cache (the flax ``"cache"`` collection) are
those of `rmlora_jax.models.llama.LlamaForCausalLM`, so `generate_lib.generate` and
`generate_lib.init_cache` serve it unchanged (re-exported here as `generate` and
`init_cache`).

Example::

  module = module_from_hf_config(hf_config, head="causal_lm")
  logits = module.apply({"params": params}, input_ids, attention_mask)  # (B, T, vocab)
  new_tokens = generate(module, params, input_ids, attention_mask, max_new_tokens=16)
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

from rmlora_jax.models import decoder
from rmlora_jax.models import generate as generate_lib
from rmlora_jax.models import llama
from rmlora_jax.models import torch_port

MODEL_TYPES = ("gemma2", "gemma3_text")
HEADS = ("causal_lm",)

# Every attention and MLP matrix of every layer (7 per layer), as for Llama.
DEFAULT_LORA_TARGETS: tuple[str, ...] = llama.DEFAULT_LORA_TARGETS

# The layer kinds of transformers' ``layer_types``.
LAYER_TYPES = ("sliding_attention", "full_attention")

# The decoder contract is Llama's: same call, same cache layout.
generate = generate_lib.generate
init_cache = generate_lib.init_cache

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rope:
  """One RoPE's settings; the field names are those `decoder.rope_inv_freq` reads."""

  # Width D of one head (the rotated width).
  head_dim: int
  # Base wavelength.
  rope_theta: float
  # One of `decoder.ROPE_TYPES`.
  rope_type: str = "default"
  # "linear" and "llama3": frequencies divided by it.
  rope_factor: float = 1.0
  # "llama3" only (see `llama.LlamaArch`).
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaArch:
  """The architecture numbers of a Gemma 2 / Gemma 3 text decoder (from an HF config)."""

  # Rows of the embedding table and width of the logits.
  vocab_size: int
  # Model width H.
  hidden_size: int
  # Number of decoder layers.
  num_layers: int
  # Query heads.
  num_heads: int
  # Key/value heads; num_heads is a multiple of it.
  num_kv_heads: int
  # Width D of one head (the config's head_dim; heads * D need not equal H).
  head_dim: int
  # Width I of the MLP.
  intermediate_size: int
  # RMSNorm epsilon (every norm, q_norm and k_norm included).
  rms_norm_eps: float
  # The attention logits are multiplied by query_pre_attn_scalar ** -0.5.
  query_pre_attn_scalar: float
  # Per layer: the sliding window, or None for full causal attention.
  attention_windows: tuple[int | None, ...]
  # RoPE of the full-attention layers.
  global_rope: Rope
  # RoPE of the sliding-window layers (Gemma 2: the same as global_rope).
  local_rope: Rope
  # Attention logits become cap * tanh(logits / cap); None: no capping.
  attn_logit_softcap: float | None = None
  # Final logits become cap * tanh(logits / cap); None: no capping.
  final_logit_softcap: float | None = None
  # RMSNorm over the head dimension of queries and keys before RoPE (Gemma 3).
  qk_norm: bool = False
  # Biases on the four attention projections (attention_bias; never in releases).
  attention_bias: bool = False
  # The LM head is the embedding table (no lm_head/kernel).
  tie_word_embeddings: bool = True
  # MLP activation (a `torch_port.ACTIVATIONS` name).
  hidden_act: str = "gelu_pytorch_tanh"
  # Dropout on the attention probabilities (0 in released checkpoints).
  attention_dropout: float = 0.0
  # Standard deviation of the normal init of matrices and embeddings.
  initializer_range: float = 0.02

  def window(self, layer: int) -> int | None:
    """The sliding window of ``layer``, or None for full attention."""
    return self.attention_windows[layer]

  def rope(self, layer: int) -> Rope:
    """The RoPE of ``layer``: the local one on sliding layers."""
    return self.global_rope if self.window(layer) is None else self.local_rope


class RMSNorm(decoder.RMSNorm):
  """Gemma's RMSNorm: ``x / sqrt(mean(x²) + eps) * (1 + scale)``, all in float32.

  Llama's fields (`decoder.RMSNorm`); unlike Llama's, the product is taken in
  float32 before the cast to ``dtype`` (transformers' Gemma2RMSNorm), and
  ``scale`` starts at zero.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(..., N) -> (..., N) in ``dtype``, normalised over the last axis."""
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    normed = decoder.rms_normalise(x, self.epsilon)
    return (normed * (1.0 + jnp.asarray(scale, jnp.float32))).astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with Gemma's scale, soft-cap, q/k norms and a KV cache."""

  arch: GemmaArch
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, position_ids: Array, slots: decoder.Slots, *, decode: bool,
               deterministic: bool, per_layer: Any = decoder.OWN_LAYER) -> Array:
    """x: (B, T, H); position_ids: (B, T); returns (B, T, H).

    ``per_layer``: ``(window, inv_freq)`` of this layer (arrays under
    `nn.scan`, `layer_settings`); by default the arch's for ``self.layer``.
    """
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    if per_layer is decoder.OWN_LAYER:
      per_layer = a.window(self.layer), decoder.rope_inv_freq(a.rope(self.layer))
    window, inv_freq = per_layer
    b, t, _ = x.shape
    n, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    q, k, v = torch_port.dense_group(x, [
        decoder.dense_params(n * d, a, "q_proj", a.attention_bias, pdt),
        decoder.dense_params(kv * d, a, "k_proj", a.attention_bias, pdt),
        decoder.dense_params(kv * d, a, "v_proj", a.attention_bias, pdt),
    ], dt)
    q, k, v = q.reshape(b, t, n, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
    if a.qk_norm:
      q = RMSNorm(a.rms_norm_eps, dt, pdt, name="q_norm")(q)
      k = RMSNorm(a.rms_norm_eps, dt, pdt, name="k_norm")(k)
    q = decoder.apply_rope(q, position_ids, inv_freq)
    k = decoder.apply_rope(k, position_ids, inv_freq)
    # llama.Attention's cache, masks and grouped heads, with Gemma's scale and soft-cap.
    ctx = decoder.grouped_attention(self, q, k, v, slots, scale=a.query_pre_attn_scalar**-0.5,
                                  window=window, dropout_rate=a.attention_dropout,
                                  decode=decode, deterministic=deterministic, dtype=dt,
                                  logit_softcap=a.attn_logit_softcap)
    return decoder.dense_layer(a.hidden_size, a, "o_proj", a.attention_bias, dt, pdt)(ctx)


class Mlp(nn.Module):
  """Gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``, GELU-tanh in releases."""

  arch: GemmaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, T, H) -> (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    gate, up = torch_port.dense_group(x, [
        decoder.dense_params(a.intermediate_size, a, "gate_proj", False, pdt),
        decoder.dense_params(a.intermediate_size, a, "up_proj", False, pdt),
    ], dt)
    y = torch_port.activation(a.hidden_act, where="hidden_activation")(gate) * up
    return decoder.dense_layer(a.hidden_size, a, "down_proj", False, dt, pdt)(y)


class DecoderLayer(nn.Module):
  """One sandwich-norm layer: ``x + norm(attn(norm(x)))``, then ``x + norm(mlp(norm(x)))``."""

  arch: GemmaArch
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, position_ids: Array, slots: decoder.Slots, *, decode: bool,
               deterministic: bool, per_layer: Any = decoder.OWN_LAYER) -> Array:
    """x: (B, T, H); returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    norm = lambda name: RMSNorm(a.rms_norm_eps, dt, pdt, name=name)
    y = norm("input_layernorm")(x)
    y = Attention(a, self.layer, dt, pdt, name="self_attn")(
        y, position_ids, slots, decode=decode, deterministic=deterministic, per_layer=per_layer)
    x = x + norm("post_attention_layernorm")(y)
    y = Mlp(a, dt, pdt, name="mlp")(norm("pre_feedforward_layernorm")(x))
    return x + norm("post_feedforward_layernorm")(y)


class _ScanStep(DecoderLayer):
  """`DecoderLayer` as an `nn.scan` body: ``(x, (window, inv_freq), ...) -> (x, None)``."""

  def __call__(self, x: Array, per_layer: Any, position_ids: Array, slots: decoder.Slots,  # pytype: disable=signature-mismatch
               decode: bool, deterministic: bool) -> tuple[Array, None]:
    return super().__call__(x, position_ids, slots, decode=decode, deterministic=deterministic,
                            per_layer=per_layer), None


def layer_settings(arch: GemmaArch) -> tuple[Array | None, Array]:
  """Each layer's ``(window, inv_freq)`` stacked for the scan: (L,) int32 or None, (L, D / 2)."""
  inv_freqs = jnp.asarray(np.stack([decoder.rope_inv_freq(arch.rope(i)) for i in range(arch.num_layers)]))
  return decoder.layer_windows(arch), inv_freqs


class GemmaModel(nn.Module):
  """Scaled embedding, the layers (``layers_0`` ...), the final norm: (B, T) ids -> (B, T, H)."""

  arch: GemmaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # One `nn.scan` over stacked layer parameters (``layers``), as `llama.LlamaModel`'s.
  scan_layers: bool = False

  def setup(self):
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    self.embed_tokens = nn.Embed(a.vocab_size, a.hidden_size,
                                 embedding_init=torch_port.weight_init(a.initializer_range),
                                 dtype=dt, param_dtype=pdt)
    if self.scan_layers:
      self.layers = decoder.scanned(_ScanStep, a.num_layers)(a, -1, dt, pdt)
    else:
      self.layers = [DecoderLayer(a, i, dt, pdt) for i in range(a.num_layers)]
    self.norm = RMSNorm(a.rms_norm_eps, dt, pdt)

  def __call__(self, input_ids: Array, position_ids: Array, slots: decoder.Slots, *, decode: bool,
               deterministic: bool) -> Array:
    """Returns the final-normed hidden states (B, T, H)."""
    # The normaliser is rounded to the compute dtype first, as transformers
    # does (sqrt(3072) is 55.5 in bfloat16, and the checkpoints expect that).
    normalizer = jnp.asarray(np.float32(math.sqrt(self.arch.hidden_size)), self.dtype)
    x = self.embed_tokens(input_ids) * normalizer
    if self.scan_layers:
      x, _ = self.layers(x, layer_settings(self.arch), position_ids, slots, decode, deterministic)
      return self.norm(x)
    for layer in self.layers:
      x = layer(x, position_ids, slots, decode=decode, deterministic=deterministic)
    return self.norm(x)

  def attend(self, x: Array) -> Array:
    """``x @ embedding.T``: the tied LM head (unscaled)."""
    return self.embed_tokens.attend(x)


class GemmaForCausalLM(nn.Module):
  """A Gemma 2 / Gemma 3 text decoder with its LM head: token ids -> next-token logits.

  Called exactly as `llama.LlamaForCausalLM` (same arguments, same cache), so
  `generate` works on it.

  Attributes:
    arch: the architecture numbers.
    dtype: the computation dtype (e.g. ``jnp.bfloat16``); norms, softmax
      statistics and the final soft-cap are float32, and so are the logits.
    param_dtype: the dtype parameters are created in.
    scan_layers: one `nn.scan` over layer parameters stacked on a leading
      axis (``model/layers/...``; `rmlora_jax.stacking`); the same results.
  """

  arch: GemmaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      position_ids: Array | None = None,
      *,
      deterministic: bool = True,
      decode: bool = False,
  ) -> Array:
    """Next-token logits of a batch of token ids.

    Args:
      input_ids: (B, T) int token ids.
      attention_mask: (B, T), 1 for real tokens and 0 for padding; all ones if None.
      position_ids: (B, T); None counts the real tokens (``cumsum(mask) - 1``,
        continuing after those in the cache).
      deterministic: False turns attention dropout on (``rngs={"dropout": key}``).
      decode: use and extend the KV cache (``mutable=["cache"]``; see
        `init_cache`). A call without a cache creates one as long as ``input_ids``.

    Returns:
      (B, T, vocab) float32 logits, soft-capped where the config says so.
    """
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    # The cache layout of llama.LlamaForCausalLM, so generate_lib.generate serves this module.
    input_ids, position_ids, slots = decoder.decoder_inputs(self, input_ids, attention_mask, position_ids,
                                                          decode=decode, where="GemmaForCausalLM")
    model = GemmaModel(a, dt, pdt, scan_layers=self.scan_layers, name="model")
    x = model(input_ids, position_ids, slots, decode=decode, deterministic=deterministic)
    if a.tie_word_embeddings:
      logits = model.attend(x)
    else:
      logits = decoder.dense_layer(a.vocab_size, a, "lm_head", False, dt, pdt)(x)
    return decoder.softcap(logits.astype(jnp.float32), a.final_logit_softcap)


# --------------------------------------------------------------------------- transformers configs and weights


def _field(hf_config: Any, name: str, default: Any) -> Any:
  """Field ``name``, ``default`` only when absent: an explicit None stays None.

  (`torch_port.config_get` maps None to the default, but Gemma 2's soft-caps
  default to numbers and null in config.json turns them off.)
  """
  if isinstance(hf_config, Mapping):
    return hf_config.get(name, default)
  return getattr(hf_config, name, default)


def _rope(settings: Mapping[str, Any], where: str, head_dim: int, max_positions: Any) -> Rope:
  """A `Rope` from one rope-parameters dict, read and checked by llama's reader."""
  fields = decoder.rope_settings(
      {"rope_parameters": dict(settings), "max_position_embeddings": max_positions}, where=where)
  return Rope(head_dim=head_dim, **fields)


def _ropes(hf_config: Any, model_type: str, head_dim: int, where: str) -> tuple[Rope, Rope]:
  """``(global_rope, local_rope)`` from ``rope_parameters`` (transformers 5) or the older fields."""
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  max_positions = get("max_position_embeddings")
  params = dict(get("rope_parameters") or {})
  if model_type == "gemma2":
    if "full_attention" in params or "sliding_attention" in params:
      raise ValueError(f"{where}: per-layer-type rope_parameters are not supported for gemma2")
    settings = params or {**dict(get("rope_scaling") or {}), "rope_theta": get("rope_theta", 10000.0)}
    rope = _rope(settings, f"{where} rope_parameters", head_dim, max_positions)
    return rope, rope
  if "full_attention" in params or "sliding_attention" in params:
    full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
  else:
    # The pre-transformers-5 layout (most config.json files on the Hub): the
    # global theta and scaling at the top, the local base beside them.
    full = {**dict(get("rope_scaling") or {}), **params}
    full.setdefault("rope_theta", get("rope_theta", 1_000_000.0))
    sliding = {"rope_type": "default", "rope_theta": get("rope_local_base_freq", 10_000.0)}
  full = {"rope_theta": 1_000_000.0, **full}
  sliding = {"rope_theta": 10_000.0, **sliding}
  return (_rope(full, f"{where} rope_parameters['full_attention']", head_dim, max_positions),
          _rope(sliding, f"{where} rope_parameters['sliding_attention']", head_dim, max_positions))


def _attention_windows(hf_config: Any, model_type: str, num_layers: int,
                       where: str) -> tuple[int | None, ...]:
  """Per-layer sliding windows from ``layer_types`` (or transformers' default pattern)."""
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  types = get("layer_types")
  if types is None:
    # transformers' defaults: every other layer (Gemma 2), five of every six (Gemma 3).
    period = 2 if model_type == "gemma2" else int(get("sliding_window_pattern", 6))
    types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
  types = list(types)
  if len(types) != num_layers:
    raise ValueError(f"{where}: layer_types has {len(types)} entries, but num_hidden_layers={num_layers}")
  for i, kind in enumerate(types):
    if kind not in LAYER_TYPES:
      raise ValueError(f"{where}: layer_types[{i}]={kind!r} is not supported; supported: {LAYER_TYPES}")
  window = _field(hf_config, "sliding_window", 4096)
  if "sliding_attention" in types and (window is None or int(window) < 1):
    raise ValueError(f"{where}: sliding_window={window!r} must be a positive integer, as layer_types "
                     "has sliding_attention layers")
  return tuple(int(window) if kind == "sliding_attention" else None for kind in types)


def _cap(hf_config: Any, name: str, default: float | None, where: str) -> float | None:
  value = _field(hf_config, name, default)
  if value is None:
    return None
  if not float(value) > 0:
    raise ValueError(f"{where}: {name}={value!r} must be positive or None")
  return float(value)


def arch_from_hf_config(hf_config: Any) -> GemmaArch:
  """Reads a transformers ``Gemma2Config``/``Gemma3TextConfig`` (or its dict) into a `GemmaArch`.

  Raises:
    ValueError: the model_type is not gemma2/gemma3_text, the heads do not
      group, a layer type, RoPE variant or activation this module does not
      implement, ``use_bidirectional_attention``, or a non-positive soft-cap
      or sliding window. The message names the config field and its value.
  """
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  model_type = get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"gemma config: model_type {model_type!r} is not one of {MODEL_TYPES}")
  where = f"{model_type} config"
  if get("use_bidirectional_attention", False):
    raise ValueError(f"{where}: use_bidirectional_attention=True is not supported (causal attention only)")
  hidden, heads, kv_heads, head_dim = decoder.attention_heads(hf_config, where=where)
  num_layers = int(get("num_hidden_layers"))
  gemma2 = model_type == "gemma2"
  global_rope, local_rope = _ropes(hf_config, model_type, head_dim, where)
  return GemmaArch(
      vocab_size=int(get("vocab_size")),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      intermediate_size=int(get("intermediate_size")),
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      query_pre_attn_scalar=float(get("query_pre_attn_scalar", 256)),
      attention_windows=_attention_windows(hf_config, model_type, num_layers, where),
      global_rope=global_rope,
      local_rope=local_rope,
      # Gemma3Attention never passes its softcap to the attention function,
      # so transformers ignores attn_logit_softcapping there; so do we.
      attn_logit_softcap=_cap(hf_config, "attn_logit_softcapping", 50.0, where) if gemma2 else None,
      final_logit_softcap=_cap(hf_config, "final_logit_softcapping", 30.0 if gemma2 else None, where),
      qk_norm=not gemma2,
      attention_bias=bool(get("attention_bias", False)),
      tie_word_embeddings=bool(get("tie_word_embeddings", True)),
      hidden_act=torch_port.config_activation(hf_config, "hidden_activation", "gelu_pytorch_tanh",
                                              where=where),
      attention_dropout=torch_port.dropout_rate(hf_config, "attention_dropout", default=0.0, where=where),
      initializer_range=float(get("initializer_range", 0.02)),
  )


def module_from_hf_config(
    hf_config: Any, *, head: str = "causal_lm", num_labels: int = 1, dtype: Any = jnp.float32
) -> nn.Module:
  """The `GemmaForCausalLM` for a transformers config (``num_labels`` is ignored).

  Example::

    module = module_from_hf_config(AutoConfig.from_pretrained(folder), head="causal_lm")
  """
  torch_port.validate_head(head, num_labels, where="gemma.module_from_hf_config", heads=HEADS)
  return GemmaForCausalLM(arch=arch_from_hf_config(hf_config), dtype=dtype)


def params_from_state_dict(
    state: Mapping[str, np.ndarray], hf_config: Any, *, head: str = "causal_lm"
) -> tuple[dict, set[str]]:
  """Converts a transformers ``Gemma2ForCausalLM``/``Gemma3ForCausalLM`` state dict to params.

  Linear weights are transposed to Flax's ``(d_in, d_out)``; norm weights are
  copied as they are (the module adds the one). A tied model's stored
  ``lm_head.weight`` is the embedding again: marked used, not copied.

  Returns:
    (nested params holding every leaf found, set of the state keys used).

  Raises:
    ValueError: ``head`` is not one of `HEADS`.
  """
  torch_port.validate_head(head, where="gemma.params_from_state_dict", heads=HEADS)
  arch = arch_from_hf_config(hf_config)
  return decoder.decoder_params_from_state_dict(
      state, arch,
      layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm"),
      attention_norms=("q_norm", "k_norm") if arch.qk_norm else ())


def dummy_inputs(hf_config: Any, batch: int = 2, seq: int = 8) -> dict:
  """Keyword inputs of the right shapes and dtypes for ``init``/``eval_shape``."""
  return decoder.dummy_inputs(hf_config, batch, seq)
