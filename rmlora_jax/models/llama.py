"""Llama-family decoders (Llama 2/3, SmolLM2, Qwen2) in Flax linen, matching transformers.

One module serves both model types: Qwen2 is Llama with biases on the query,
key and value projections (and none on the output projection or the MLP),
and optionally sliding-window attention on its upper layers (off by default,
as in transformers' ``Qwen2Config``). Everything else is shared: RoPE (plain,
"linear" or Llama 3.1's "llama3" frequency scaling), grouped-query attention,
RMSNorm computed in float32, the SwiGLU MLP, and an LM head that is either its
own matrix or the embedding table (``tie_word_embeddings``).

Every matrix is a `torch_port.Dense`-style 2-D ``(d_in, d_out)`` kernel, so LoRA
adapters attach without merging (`rmlora_jax.low_rank`). Parameter paths
("/"-joined, what LoRA targets and partition rules match)::

  model/embed_tokens/embedding                       (vocab, H)
  model/layers_{i}/input_layernorm/scale             (H,)
  model/layers_{i}/self_attn/q_proj/{kernel,bias}    (H, heads * D)
  model/layers_{i}/self_attn/{k,v}_proj/{kernel,bias}  (H, kv_heads * D)
  model/layers_{i}/self_attn/o_proj/{kernel,bias}    (heads * D, H)
  model/layers_{i}/post_attention_layernorm/scale    (H,)
  model/layers_{i}/mlp/{gate,up}_proj/{kernel,bias}  (H, I)
  model/layers_{i}/mlp/down_proj/{kernel,bias}       (I, H)
  model/norm/scale                                   (H,)
  lm_head/kernel                                     (H, vocab), untied models only

(biases only where the config has them). The KV cache of `generate` is the
flax ``"cache"`` collection: ``index`` and ``mask`` at the top, and
``model/layers_{i}/self_attn/{key,value}`` (B, S, kv_heads, D).

Example::

  module = module_from_hf_config(hf_config, head="causal_lm", num_labels=1)
  logits = module.apply({"params": params}, input_ids, attention_mask)  # (B, T, vocab)
  new_tokens = generate(module, params, input_ids, attention_mask, max_new_tokens=16)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import decoder
from rmlora_jax.models import generate as generate_lib
from rmlora_jax.models import torch_port

MODEL_TYPES = ("llama", "qwen2")
HEADS = ("causal_lm",)

# Every attention and MLP matrix of every layer: 7 per layer.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"model/layers_\d+/self_attn/(q|k|v|o)_proj/kernel",
    r"model/layers_\d+/mlp/(gate|up|down)_proj/kernel",
)


Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaArch:
  """The architecture numbers of a Llama-family decoder (from an HF config)."""

  # Rows of the embedding table and width of the logits.
  vocab_size: int
  # Model width H.
  hidden_size: int
  # Number of decoder layers.
  num_layers: int
  # Query heads.
  num_heads: int
  # Key/value heads; num_heads is a multiple of it (grouped-query attention).
  num_kv_heads: int
  # Width D of one head (hidden_size // num_heads unless the config sets head_dim).
  head_dim: int
  # Width I of the MLP.
  intermediate_size: int
  # decoder.RMSNorm epsilon.
  rms_norm_eps: float
  # RoPE base wavelength.
  rope_theta: float
  # One of `decoder.ROPE_TYPES`.
  rope_type: str = "default"
  # "linear" and "llama3": frequencies divided by it (the long-wave ones for llama3).
  rope_factor: float = 1.0
  # "llama3": wavelengths above original_max_positions / low_freq_factor are scaled fully.
  rope_low_freq_factor: float = 1.0
  # "llama3": wavelengths below original_max_positions / high_freq_factor are kept.
  rope_high_freq_factor: float = 4.0
  # "llama3": the pretraining context length the factors refer to.
  rope_original_max_positions: int = 8192
  # Biases on the query, key and value projections (Qwen2; Llama's attention_bias).
  qkv_bias: bool = False
  # Bias on the attention output projection (Llama's attention_bias; never Qwen2).
  o_bias: bool = False
  # Biases on the MLP projections (Llama's mlp_bias).
  mlp_bias: bool = False
  # The LM head is the embedding table (no lm_head/kernel).
  tie_word_embeddings: bool = False
  # MLP activation (a `torch_port.ACTIVATIONS` name; "silu" in every release).
  hidden_act: str = "silu"
  # Per layer: the sliding attention window, or None for full causal attention; () all full.
  attention_windows: tuple[int | None, ...] = ()
  # Dropout on the attention probabilities (0 in released checkpoints).
  attention_dropout: float = 0.0
  # Standard deviation of the normal init of matrices and embeddings.
  initializer_range: float = 0.02

  def window(self, layer: int) -> int | None:
    """The sliding window of ``layer``, or None for full attention."""
    return self.attention_windows[layer] if self.attention_windows else None


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  arch: LlamaArch
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, position_ids: Array, slots: decoder.Slots, *, decode: bool,
               deterministic: bool, window: Any = decoder.OWN_LAYER) -> Array:
    """x: (B, T, H); position_ids: (B, T); returns (B, T, H).

    ``window``: this layer's sliding window (None: full attention; an int
    array under `nn.scan`); by default the arch's for ``self.layer``.
    """
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    window = a.window(self.layer) if window is decoder.OWN_LAYER else window
    b, t, _ = x.shape
    n, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    # One matmul for the three frozen kernels and one for their adapters'
    # right factors (low_rank.dense_group_apply); the parameters stay three Dense.
    q, k, v = torch_port.dense_group(x, [
        decoder.dense_params(n * d, a, "q_proj", a.qkv_bias, pdt),
        decoder.dense_params(kv * d, a, "k_proj", a.qkv_bias, pdt),
        decoder.dense_params(kv * d, a, "v_proj", a.qkv_bias, pdt),
    ], dt)
    inv_freq = decoder.rope_inv_freq(a)
    q = decoder.apply_rope(q.reshape(b, t, n, d), position_ids, inv_freq)
    k = decoder.apply_rope(k.reshape(b, t, kv, d), position_ids, inv_freq)
    ctx = decoder.grouped_attention(self, q, k, v.reshape(b, t, kv, d), slots, scale=d**-0.5,
                            window=window, dropout_rate=a.attention_dropout, decode=decode,
                            deterministic=deterministic, dtype=dt)
    return decoder.dense_layer(a.hidden_size, a, "o_proj", a.o_bias, dt, pdt)(ctx)


class Mlp(nn.Module):
  """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

  arch: LlamaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, T, H) -> (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    gate, up = torch_port.dense_group(x, [
        decoder.dense_params(a.intermediate_size, a, "gate_proj", a.mlp_bias, pdt),
        decoder.dense_params(a.intermediate_size, a, "up_proj", a.mlp_bias, pdt),
    ], dt)
    y = torch_port.activation(a.hidden_act, where="hidden_act")(gate) * up
    return decoder.dense_layer(a.hidden_size, a, "down_proj", a.mlp_bias, dt, pdt)(y)


class DecoderLayer(nn.Module):
  """One pre-norm layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  arch: LlamaArch
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, position_ids: Array, slots: decoder.Slots, *, decode: bool,
               deterministic: bool, window: Any = decoder.OWN_LAYER) -> Array:
    """x: (B, T, H); returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    y = decoder.RMSNorm(a.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
    x = x + Attention(a, self.layer, dt, pdt, name="self_attn")(
        y, position_ids, slots, decode=decode, deterministic=deterministic, window=window)
    y = decoder.RMSNorm(a.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
    return x + Mlp(a, dt, pdt, name="mlp")(y)


class _PositionalLayer(DecoderLayer):
  """`DecoderLayer` taking ``decode`` and ``deterministic`` positionally, so `nn.remat` can hold them static."""

  def __call__(self, x: Array, position_ids: Array, slots: decoder.Slots, decode: bool,  # pytype: disable=signature-mismatch
               deterministic: bool) -> Array:
    return super().__call__(x, position_ids, slots, decode=decode, deterministic=deterministic)


class _ScanStep(DecoderLayer):
  """`DecoderLayer` as an `nn.scan` body: ``(x, window, ...) -> (x, None)``, the window scanned over."""

  # As `LlamaModel.activation_sharding`, applied to each layer's output.
  activation_sharding: Any = None

  def __call__(self, x: Array, window: Any, position_ids: Array, slots: decoder.Slots,  # pytype: disable=signature-mismatch
               decode: bool, deterministic: bool) -> tuple[Array, None]:
    x = super().__call__(x, position_ids, slots, decode=decode, deterministic=deterministic, window=window)
    return decoder.constrain(x, self.activation_sharding), None


# What a rematerialised layer keeps for the backward pass: "full" only its
# input (everything else recomputed), "dots" also its matmul outputs.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_saveable}
# Counting ``self`` as 0: decode (4) and deterministic (5) are Python bools.
_REMAT_LAYERS = {name: nn.remat(_PositionalLayer, static_argnums=(4, 5), policy=policy)
                 for name, policy in REMAT_POLICIES.items()}
# The scan bodies, plain and rematerialised: decode (5) and deterministic (6) static.
_SCAN_STEPS = {None: _ScanStep, **{name: nn.remat(_ScanStep, static_argnums=(5, 6), policy=policy)
                                   for name, policy in REMAT_POLICIES.items()}}


class LlamaModel(nn.Module):
  """Embedding, the layers (``layers_0`` ...), the final norm: (B, T) ids -> (B, T, H)."""

  arch: LlamaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Rematerialise each decoder layer: keep only its input for the backward
  # pass and recompute the rest. Same parameters and paths.
  remat: bool = False
  # What a rematerialised layer keeps (`REMAT_POLICIES`): "full" or "dots".
  remat_policy: str = "full"
  # A sharding (or PartitionSpec, under a mesh context) the hidden states
  # (B, T, H) are constrained to between layers; None: left to XLA.
  activation_sharding: Any = None
  # Run the layers as one `nn.scan` over stacked parameters (``layers``,
  # `rmlora_jax.stacking`) instead of ``layers_0`` ...: compiled once.
  scan_layers: bool = False

  def setup(self):
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    # nn.Embed as torch_port.embed builds it; setup names it by the attribute.
    self.embed_tokens = nn.Embed(a.vocab_size, a.hidden_size,
                                 embedding_init=torch_port.weight_init(a.initializer_range),
                                 dtype=dt, param_dtype=pdt)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"LlamaModel.remat_policy must be one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}")
    if self.scan_layers:
      step = _SCAN_STEPS[self.remat_policy if self.remat else None]
      self.layers = decoder.scanned(step, a.num_layers)(a, -1, dt, pdt, self.activation_sharding)
    else:
      # A list attribute: flax names its entries layers_0, layers_1, ...
      layer = _REMAT_LAYERS[self.remat_policy] if self.remat else DecoderLayer
      self.layers = [layer(a, i, dt, pdt) for i in range(a.num_layers)]
    self.norm = decoder.RMSNorm(a.rms_norm_eps, dt, pdt)

  def __call__(self, input_ids: Array, position_ids: Array, slots: decoder.Slots, *, decode: bool,
               deterministic: bool) -> Array:
    """Returns the final-normed hidden states (B, T, H)."""
    x = self._constrain(self.embed_tokens(input_ids))
    if self.scan_layers:  # each layer's output constrained in the scan
      x, _ = self.layers(x, decoder.layer_windows(self.arch), position_ids, slots, decode, deterministic)
      return self._constrain(self.norm(x))
    for layer in self.layers:
      if self.remat:
        x = layer(x, position_ids, slots, decode, deterministic)
      else:
        x = layer(x, position_ids, slots, decode=decode, deterministic=deterministic)
      x = self._constrain(x)
    return self._constrain(self.norm(x))

  def _constrain(self, x: Array) -> Array:
    return decoder.constrain(x, self.activation_sharding)

  def attend(self, x: Array) -> Array:
    """``x @ embedding.T``: the tied LM head."""
    return self.embed_tokens.attend(x)


class LlamaForCausalLM(nn.Module):
  """A Llama-family decoder with its LM head: token ids -> next-token logits.

  Attributes:
    arch: the architecture numbers.
    dtype: the computation dtype (e.g. ``jnp.bfloat16``); norms and softmax
      statistics stay float32, and the logits are returned in float32.
    param_dtype: the dtype parameters are created in.
    remat: rematerialise each decoder layer in the backward pass (`nn.remat`):
      activation memory of one layer plus each layer's input, for a second
      forward pass of the layers; the same parameters and results.
    remat_policy: with ``remat``, "full" (keep each layer's input only) or
      "dots" (also its matmul outputs, `jax.checkpoint_policies.dots_saveable`:
      more memory, less recomputation).
    activation_sharding: None, or the sharding of the hidden states (B, T, H)
      between layers (e.g. batch over the data axes,
      ``NamedSharding(mesh, P(("data", "fsdp")))``), so that XLA's sharding
      propagation cannot trade the batch split for the kernels' fsdp split of
      H; a `PartitionSpec` needs a mesh context. The same results.
    scan_layers: run the layers as one `nn.scan` over parameters stacked on
      a leading layer axis (``model/layers/...``; `rmlora_jax.stacking`), so
      the layer is compiled once whatever the depth; the same results.
  """

  arch: LlamaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = "full"
  activation_sharding: Any = None
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
      attention_mask: (B, T), 1 for real tokens and 0 for padding (left or
        right); all ones if None.
      position_ids: (B, T); None counts the real tokens (``cumsum(mask) - 1``,
        continuing after those in the cache), so a left-padded row gets the
        positions it would have unpadded.
      deterministic: False turns attention dropout on (``rngs={"dropout": key}``).
      decode: use and extend the KV cache (``mutable=["cache"]``; see
        `init_cache`): the tokens are written after those already cached and
        attend to them too. A call without a cache creates one as long as
        ``input_ids``.

    Returns:
      (B, T, vocab) float32 logits.
    """
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    input_ids, position_ids, slots = decoder.decoder_inputs(self, input_ids, attention_mask, position_ids,
                                                    decode=decode, where="LlamaForCausalLM")
    model = LlamaModel(a, dt, pdt, remat=self.remat, remat_policy=self.remat_policy,
                       activation_sharding=self.activation_sharding, scan_layers=self.scan_layers, name="model")
    x = model(input_ids, position_ids, slots, decode=decode, deterministic=deterministic)
    if a.tie_word_embeddings:
      logits = model.attend(x)
    else:
      logits = decoder.dense_layer(a.vocab_size, a, "lm_head", False, dt, pdt)(x)
    return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- transformers configs and weights


def _attention_windows(hf_config: Any, num_layers: int) -> tuple[int | None, ...]:
  """Per-layer sliding windows: Qwen2's ``layer_types`` (or its older fields), Llama none."""
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  window = get("sliding_window") if get("use_sliding_window", False) else None
  if window is None:
    return ()
  types = get("layer_types") or [
      "sliding_attention" if i >= int(get("max_window_layers", 0)) else "full_attention"
      for i in range(num_layers)]
  windows = tuple(int(window) if kind == "sliding_attention" else None for kind in types)
  return windows if any(w is not None for w in windows) else ()


def arch_from_hf_config(hf_config: Any) -> LlamaArch:
  """Reads a transformers ``LlamaConfig``/``Qwen2Config`` (or its dict) into a `LlamaArch`.

  Raises:
    ValueError: the model_type is not llama/qwen2, the heads do not group
      (num_attention_heads not a multiple of num_key_value_heads), or a RoPE
      variant or activation this module does not implement.
  """
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  where = "llama config"
  model_type = get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{where}: model_type {model_type!r} is not one of {MODEL_TYPES}")
  hidden, heads, kv_heads, head_dim = decoder.attention_heads(hf_config, where=where)
  num_layers = int(get("num_hidden_layers"))
  qwen2 = model_type == "qwen2"
  attention_bias = bool(get("attention_bias", False))
  return LlamaArch(
      vocab_size=int(get("vocab_size")),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      intermediate_size=int(get("intermediate_size")),
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      qkv_bias=qwen2 or attention_bias,
      o_bias=not qwen2 and attention_bias,
      mlp_bias=not qwen2 and bool(get("mlp_bias", False)),
      tie_word_embeddings=bool(get("tie_word_embeddings", False)),
      hidden_act=torch_port.config_activation(hf_config, "hidden_act", "silu", where=where),
      attention_windows=_attention_windows(hf_config, num_layers) if qwen2 else (),
      attention_dropout=torch_port.dropout_rate(hf_config, "attention_dropout", default=0.0, where=where),
      initializer_range=float(get("initializer_range", 0.02)),
      **decoder.rope_settings(hf_config, where=where),
  )


def module_from_hf_config(
    hf_config: Any, *, head: str = "causal_lm", num_labels: int = 1, dtype: Any = jnp.float32
) -> nn.Module:
  """The `LlamaForCausalLM` for a transformers config (``num_labels`` is ignored).

  Example::

    module = module_from_hf_config(AutoConfig.from_pretrained(folder), head="causal_lm")
  """
  torch_port.validate_head(head, num_labels, where="llama.module_from_hf_config", heads=HEADS)
  return LlamaForCausalLM(arch=arch_from_hf_config(hf_config), dtype=dtype)


def params_from_state_dict(
    state: Mapping[str, np.ndarray], hf_config: Any, *, head: str = "causal_lm"
) -> tuple[dict, set[str]]:
  """Converts a transformers ``*ForCausalLM`` (or base model) state dict to this module's params.

  Linear weights are transposed to Flax's ``(d_in, d_out)``. A tied model's
  ``lm_head.weight``, when stored, is the embedding again: it is marked used
  and not copied.

  Returns:
    (nested params holding every leaf found, set of the state keys used).

  Raises:
    ValueError: ``head`` is not one of `HEADS`.
  """
  torch_port.validate_head(head, where="llama.params_from_state_dict", heads=HEADS)
  return decoder.decoder_params_from_state_dict(state, arch_from_hf_config(hf_config),
                                        layer_norms=("input_layernorm", "post_attention_layernorm"))


# The pieces shared with Gemma and the generation loop live in
# `rmlora_jax.models.decoder` and `rmlora_jax.models.generate`.
dummy_inputs = decoder.dummy_inputs
generate = generate_lib.generate
init_cache = generate_lib.init_cache
