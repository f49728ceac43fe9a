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
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import torch_port

MODEL_TYPES = ("llama", "qwen2")
HEADS = ("causal_lm",)

# Every attention and MLP matrix of every layer: 7 per layer.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"model/layers_\d+/self_attn/(q|k|v|o)_proj/kernel",
    r"model/layers_\d+/mlp/(gate|up|down)_proj/kernel",
)

# The RoPE variants implemented (transformers' ``rope_type``).
ROPE_TYPES = ("default", "linear", "llama3")

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
  # RMSNorm epsilon.
  rms_norm_eps: float
  # RoPE base wavelength.
  rope_theta: float
  # One of `ROPE_TYPES`.
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


def rope_inv_freq(arch: LlamaArch) -> np.ndarray:
  """RoPE's inverse frequencies (D / 2,) float32, as transformers' rope init computes them."""
  d = arch.head_dim
  inv_freq = (1.0 / (np.float32(arch.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
  inv_freq = inv_freq.astype(np.float32)
  if arch.rope_type == "linear":
    return (inv_freq / np.float32(arch.rope_factor)).astype(np.float32)
  if arch.rope_type == "llama3":
    # transformers' _compute_llama3_parameters: long wavelengths are divided
    # by the factor, short ones kept, the band between interpolated.
    factor, low, high = (np.float32(v) for v in (arch.rope_factor, arch.rope_low_freq_factor,
                                                 arch.rope_high_freq_factor))
    old = np.float32(arch.rope_original_max_positions)
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x: Array, position_ids: Array, inv_freq: np.ndarray) -> Array:
  """Rotates ``x`` (B, T, heads, D) by its positions (B, T), transformers' half-split layout."""
  freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  """``scale * x / sqrt(mean(x²) + eps)``, the statistics in float32 (LlamaRMSNorm)."""

  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(..., H) -> (..., H) in ``dtype``."""
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


def dense_params(features: int, arch: Any, name: str, use_bias: bool,
                 param_dtype: Any) -> torch_port.DenseParams:
  """A projection's parameters for `torch_port.dense_group`, normal-initialised as ``arch`` says.

  Shared with `rmlora_jax.models.gemma`: ``arch`` is a `LlamaArch` or a
  ``GemmaArch``, of which only ``initializer_range`` is read.
  """
  return torch_port.DenseParams(features, use_bias=use_bias, param_dtype=param_dtype,
                                kernel_init=torch_port.weight_init(arch.initializer_range), name=name)


def dense_layer(features: int, arch: Any, name: str, use_bias: bool, dtype: Any,
                param_dtype: Any) -> torch_port.Dense:
  """A projection to ``features`` (a `torch_port.Dense`), initialised as `dense_params` is."""
  # Takes a LowRankKernel too (rmlora_jax.attach): LoRA without merging.
  return torch_port.dense(features, init=torch_port.weight_init(arch.initializer_range), dtype=dtype,
                          param_dtype=param_dtype, use_bias=use_bias, name=name)


# A pytree, so that it can cross `nn.remat` (jax.checkpoint) into a layer.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """Where a call's tokens sit among the keys it attends to (a chunk of a cache, or all).

  Built by `decoder_inputs`; every layer's `grouped_attention` reads it.
  """

  # (T, S) query slot minus key slot: causal where >= 0.
  distance: Array
  # (B, S) bool: the key slot holds a real token.
  key_real: Array
  # Slot the call's first token is written to (0 without a cache).
  start: Array | int


def softcap(x: Array, cap: float | None) -> Array:
  """``cap * tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when cap is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def grouped_attention(
    module: nn.Module,
    q: Array,
    k: Array,
    v: Array,
    slots: Slots,
    *,
    scale: float,
    window: int | None,
    dropout_rate: float,
    decode: bool,
    deterministic: bool,
    dtype: Any,
    logit_softcap: float | None = None,
) -> Array:
  """Causal grouped-query attention, through the KV cache when decoding: the core of `Attention`.

  Shared by the Llama and Gemma attention modules; it runs inside the
  calling module's compact method, so the cache variables (``key``,
  ``value``) and the dropout submodule are that module's.

  Args:
    module: the attention module calling it, from its ``nn.compact`` method.
    q: (B, T, heads, D) queries, RoPE applied.
    k: (B, T, kv_heads, D) keys, RoPE applied.
    v: (B, T, kv_heads, D) values.
    slots: where the tokens sit among the keys (`decoder_inputs`).
    scale: the queries are multiplied by it (``D ** -0.5`` for Llama).
    window: the sliding window of this layer, or None for full causal attention.
    dropout_rate: dropout on the attention probabilities.
    decode: write ``k`` and ``v`` to the cache at ``slots.start`` and attend
      to every cached slot (the init pass creates the cache).
    deterministic: False turns the dropout on.
    dtype: the computation dtype; the logits and softmax are float32.
    logit_softcap: the attention logits become ``cap * tanh(logits / cap)``
      before masking (Gemma 2); None: no capping.

  Returns:
    (B, T, heads * D): the context, before the output projection.
  """
  b, t, n, d = q.shape
  kv = k.shape[2]
  if decode:
    # The flax idiom for caches: the init pass creates them (length = its
    # input's), later passes write their keys and values at `start`.
    cached = module.has_variable("cache", "key")
    cache_k = module.variable("cache", "key", jnp.zeros, (b, t, kv, d), k.dtype)
    cache_v = module.variable("cache", "value", jnp.zeros, (b, t, kv, d), v.dtype)
    if cached:
      at = (0, slots.start, 0, 0)
      cache_k.value = jax.lax.dynamic_update_slice(cache_k.value, k.astype(cache_k.value.dtype), at)
      cache_v.value = jax.lax.dynamic_update_slice(cache_v.value, v.astype(cache_v.value.dtype), at)
      k, v = cache_k.value.astype(dtype), cache_v.value.astype(dtype)

  keep = (slots.distance >= 0)[None] & slots.key_real[:, None, :]
  if window is not None:
    # transformers' sliding_window_overlay: key slot > query slot - window.
    keep = keep & (slots.distance < window)[None]
  # Query heads grouped by the key/value head they share: head h reads kv head h // (n // kv).
  q = q.reshape(b, t, kv, n // kv, d) * jnp.asarray(scale, dtype)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
  # Capped before masking, as transformers: the mask's minimum stays the minimum.
  logits = softcap(logits, logit_softcap)
  logits = torch_port.mask_logits(logits, keep[:, None, None])
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  probs = torch_port.Dropout(dropout_rate)(probs, deterministic=deterministic)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n * d)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  arch: LlamaArch
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, position_ids: Array, slots: Slots, *, decode: bool,
               deterministic: bool) -> Array:
    """x: (B, T, H); position_ids: (B, T); returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    b, t, _ = x.shape
    n, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    # One matmul for the three frozen kernels and one for their adapters'
    # right factors (low_rank.dense_group_apply); the parameters stay three Dense.
    q, k, v = torch_port.dense_group(x, [
        dense_params(n * d, a, "q_proj", a.qkv_bias, pdt),
        dense_params(kv * d, a, "k_proj", a.qkv_bias, pdt),
        dense_params(kv * d, a, "v_proj", a.qkv_bias, pdt),
    ], dt)
    inv_freq = rope_inv_freq(a)
    q = apply_rope(q.reshape(b, t, n, d), position_ids, inv_freq)
    k = apply_rope(k.reshape(b, t, kv, d), position_ids, inv_freq)
    ctx = grouped_attention(self, q, k, v.reshape(b, t, kv, d), slots, scale=d**-0.5,
                            window=a.window(self.layer), dropout_rate=a.attention_dropout, decode=decode,
                            deterministic=deterministic, dtype=dt)
    return dense_layer(a.hidden_size, a, "o_proj", a.o_bias, dt, pdt)(ctx)


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
        dense_params(a.intermediate_size, a, "gate_proj", a.mlp_bias, pdt),
        dense_params(a.intermediate_size, a, "up_proj", a.mlp_bias, pdt),
    ], dt)
    y = torch_port.activation(a.hidden_act, where="hidden_act")(gate) * up
    return dense_layer(a.hidden_size, a, "down_proj", a.mlp_bias, dt, pdt)(y)


class DecoderLayer(nn.Module):
  """One pre-norm layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  arch: LlamaArch
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, position_ids: Array, slots: Slots, *, decode: bool,
               deterministic: bool) -> Array:
    """x: (B, T, H); returns (B, T, H)."""
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    y = RMSNorm(a.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
    x = x + Attention(a, self.layer, dt, pdt, name="self_attn")(
        y, position_ids, slots, decode=decode, deterministic=deterministic)
    y = RMSNorm(a.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
    return x + Mlp(a, dt, pdt, name="mlp")(y)


class _PositionalLayer(DecoderLayer):
  """`DecoderLayer` taking ``decode`` and ``deterministic`` positionally, so `nn.remat` can hold them static."""

  def __call__(self, x: Array, position_ids: Array, slots: Slots, decode: bool,  # pytype: disable=signature-mismatch
               deterministic: bool) -> Array:
    return super().__call__(x, position_ids, slots, decode=decode, deterministic=deterministic)


# Counting ``self`` as 0: decode (4) and deterministic (5) are Python bools.
_RematLayer = nn.remat(_PositionalLayer, static_argnums=(4, 5))


class LlamaModel(nn.Module):
  """Embedding, the layers (``layers_0`` ...), the final norm: (B, T) ids -> (B, T, H)."""

  arch: LlamaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Rematerialise each decoder layer: keep only its input for the backward
  # pass and recompute the rest. Same parameters and paths.
  remat: bool = False
  # A sharding (or PartitionSpec, under a mesh context) the hidden states
  # (B, T, H) are constrained to between layers; None: left to XLA.
  activation_sharding: Any = None

  def setup(self):
    a, dt, pdt = self.arch, self.dtype, self.param_dtype
    # nn.Embed as torch_port.embed builds it; setup names it by the attribute.
    self.embed_tokens = nn.Embed(a.vocab_size, a.hidden_size,
                                 embedding_init=torch_port.weight_init(a.initializer_range),
                                 dtype=dt, param_dtype=pdt)
    # A list attribute: flax names its entries layers_0, layers_1, ...
    self.layers = [(_RematLayer if self.remat else DecoderLayer)(a, i, dt, pdt) for i in range(a.num_layers)]
    self.norm = RMSNorm(a.rms_norm_eps, dt, pdt)

  def __call__(self, input_ids: Array, position_ids: Array, slots: Slots, *, decode: bool,
               deterministic: bool) -> Array:
    """Returns the final-normed hidden states (B, T, H)."""
    x = self._constrain(self.embed_tokens(input_ids))
    for layer in self.layers:
      if self.remat:
        x = layer(x, position_ids, slots, decode, deterministic)
      else:
        x = layer(x, position_ids, slots, decode=decode, deterministic=deterministic)
      x = self._constrain(x)
    return self._constrain(self.norm(x))

  def _constrain(self, x: Array) -> Array:
    if self.activation_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.activation_sharding)

  def attend(self, x: Array) -> Array:
    """``x @ embedding.T``: the tied LM head."""
    return self.embed_tokens.attend(x)


def decoder_inputs(
    module: nn.Module,
    input_ids: Array,
    attention_mask: Array | None,
    position_ids: Array | None,
    *,
    decode: bool,
    where: str,
) -> tuple[Array, Array, Slots]:
  """Checks a decoder call's inputs, fills its positions and advances its KV cache.

  The setup shared by `LlamaForCausalLM` and `rmlora_jax.models.gemma.GemmaForCausalLM`:
  with ``decode``, the calling module's ``"cache"`` collection holds ``index``
  (the next free slot) and ``mask`` (B, S) (which slots hold real tokens);
  this call's tokens are written after those already there.

  Args:
    module: the decoder calling it, from its ``nn.compact`` method.
    input_ids: (B, T) int token ids.
    attention_mask: (B, T), 1 for real tokens and 0 for padding; all ones if None.
    position_ids: (B, T); None counts the real tokens (``cumsum(mask) - 1``,
      continuing after those in the cache).
    decode: use and extend the cache (the init pass creates one as long as
      ``input_ids``).
    where: the decoder, named in messages.

  Returns:
    ``(input_ids, position_ids, slots)``.

  Raises:
    ValueError: input_ids is not 2-D, or a mask or positions of another shape.
  """
  input_ids, attention_mask, _ = torch_port.text_inputs(input_ids, attention_mask, where=where)
  b, t = input_ids.shape
  chunk_mask = (attention_mask > 0).astype(jnp.int32)
  start, prior, key_mask = 0, jnp.zeros((b,), jnp.int32), chunk_mask
  if decode:
    cached = module.has_variable("cache", "index")
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    slot_mask = module.variable("cache", "mask", jnp.zeros, (b, t), jnp.int32)
    if cached:
      start = index.value
      prior = jnp.sum(slot_mask.value, axis=1)
      slot_mask.value = jax.lax.dynamic_update_slice(slot_mask.value, chunk_mask, (0, start))
      index.value = start + t
      key_mask = slot_mask.value
  if position_ids is None:
    position_ids = jnp.maximum(prior[:, None] + jnp.cumsum(chunk_mask, axis=1) - 1, 0)
  elif jnp.shape(position_ids) != (b, t):
    raise ValueError(f"{where}: position_ids has shape {jnp.shape(position_ids)}, "
                     f"but input_ids has shape {(b, t)}")
  slots = Slots(
      distance=(start + jnp.arange(t))[:, None] - jnp.arange(key_mask.shape[1])[None, :],
      key_real=key_mask > 0,
      start=start,
  )
  return input_ids, position_ids, slots


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
    activation_sharding: None, or the sharding of the hidden states (B, T, H)
      between layers (e.g. batch over the data axes,
      ``NamedSharding(mesh, P(("data", "fsdp")))``), so that XLA's sharding
      propagation cannot trade the batch split for the kernels' fsdp split of
      H; a `PartitionSpec` needs a mesh context. The same results.
  """

  arch: LlamaArch
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  activation_sharding: Any = None

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
    input_ids, position_ids, slots = decoder_inputs(self, input_ids, attention_mask, position_ids,
                                                    decode=decode, where="LlamaForCausalLM")
    model = LlamaModel(a, dt, pdt, remat=self.remat, activation_sharding=self.activation_sharding, name="model")
    x = model(input_ids, position_ids, slots, decode=decode, deterministic=deterministic)
    if a.tie_word_embeddings:
      logits = model.attend(x)
    else:
      logits = dense_layer(a.vocab_size, a, "lm_head", False, dt, pdt)(x)
    return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- generation


def init_cache(module: LlamaForCausalLM, batch_size: int, max_length: int) -> Any:
  """An empty KV cache (the ``"cache"`` collection) for ``max_length`` tokens per row.

  Shapes come from `jax.eval_shape` of the module's init, so nothing but the
  zeros is computed.
  """
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(functools.partial(module.init, decode=True), jax.random.key(0), ids)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _pick(logits: Array, key: Array, temperature: Array, top_p: Array, *, sample: bool,
          nucleus: bool) -> Array:
  """The next token of each row: the argmax, or a (nucleus) sample at ``temperature``."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if nucleus:
    # transformers' TopPLogitsWarper: keep the most likely tokens whose mass
    # before them is below top_p (the most likely one always).
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# Only what changes shapes or code is static: another end token, temperature
# or seed reuses the compiled loop.
@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "sample", "nucleus"))
def _generate(module, params, input_ids, attention_mask, key, eos, pad_token_id, temperature, top_p, *,
              max_new_tokens, sample, nucleus):
  pick = functools.partial(_pick, temperature=temperature, top_p=top_p, sample=sample, nucleus=nucleus)
  b, t = input_ids.shape
  cache = init_cache(module, b, t + max_new_tokens)
  step_fn = lambda cache, ids, mask: module.apply(
      {"params": params, "cache": cache}, ids, mask, decode=True, mutable=["cache"])
  logits, variables = step_fn(cache, input_ids, attention_mask)
  token = pick(logits[:, -1], jax.random.fold_in(key, 0))
  out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(state):
    step, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, done, out, cache = state
    logits, variables = step_fn(cache, token[:, None], jnp.ones((b, 1), jnp.int32))
    nxt = pick(logits[:, 0], jax.random.fold_in(key, step))
    # As transformers: a finished row gets padding.
    nxt = jnp.where(done, pad_token_id, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
    return step + 1, nxt, done | jnp.isin(nxt, eos), out, variables["cache"]

  state = (jnp.asarray(1, jnp.int32), token, done, out, variables["cache"])
  return jax.lax.while_loop(cond, body, state)[3]


def generate(
    module: LlamaForCausalLM,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | Array = 0,
) -> Array:
  """Continues a left-padded batch of prompts, greedily or by sampling, jitted.

  A prefill writes the prompts to a KV cache of ``T + max_new_tokens`` slots;
  a ``jax.lax.while_loop`` then feeds one token per step until every row has
  produced an end token or ``max_new_tokens`` tokens. Greedy decoding equals
  transformers' ``generate(do_sample=False)``. Params may hold
  `rmlora_jax.low_rank.LowRankKernel` kernels (adapters attached unmerged).

  Args:
    module: the decoder.
    params: its params.
    input_ids: (B, T) prompt ids, padded on the left.
    attention_mask: (B, T), 1 for real tokens; all ones if None.
    max_new_tokens: tokens to produce per row (a static shape).
    eos_token_id: the end token or tokens; None runs every row to the end.
    pad_token_id: what a row gets after its end token.
    temperature: 0 for greedy decoding; otherwise logits are divided by it
      and the next token is sampled.
    top_p: when sampling, only the most likely tokens holding this much
      probability are drawn from (nucleus sampling); 1 keeps all.
    seed: an int or a key; step ``i`` samples with ``fold_in(key, i)``.

  Returns:
    (B, max_new_tokens) int32: the new tokens only, ``pad_token_id`` after a
    row's end token.

  Raises:
    ValueError: a negative temperature, top_p outside (0, 1],
      max_new_tokens < 1, or right padding (a prompt whose last token is padding).
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not temperature >= 0.0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  try:
    right_padded = not np.all(np.asarray(attention_mask)[:, -1] > 0)
  except jax.errors.TracerArrayConversionError:  # called under jit: cannot check
    right_padded = False
  if right_padded:
    raise ValueError("generate: the prompts must be padded on the left (tokenizer.padding_side = "
                     "'left'), but some row's last token is padding")
  # No end token: -1, which no token equals (one shape for both cases).
  eos = jnp.atleast_1d(jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32))
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  return _generate(module, params, input_ids, attention_mask, key, eos, jnp.int32(pad_token_id),
                   jnp.float32(temperature or 1.0), jnp.float32(top_p), max_new_tokens=max_new_tokens,
                   sample=temperature > 0, nucleus=top_p < 1.0)


# --------------------------------------------------------------------------- transformers configs and weights


def rope_settings(hf_config: Any, *, where: str) -> dict[str, Any]:
  """The RoPE fields of `LlamaArch` from ``rope_parameters`` (transformers 5) or ``rope_scaling``.

  Also reads each of Gemma's RoPEs (`rmlora_jax.models.gemma`).

  Args:
    hf_config: a transformers config or its dict.
    where: the config, named in messages.

  Returns:
    ``rope_type`` and ``rope_theta``, and the scaling fields the type uses
    (``rope_factor``, ``rope_low_freq_factor``, ...), as `LlamaArch` names them.

  Raises:
    ValueError: a rope type not in `ROPE_TYPES`, per-layer-type parameters,
      or a partial_rotary_factor other than 1.
  """
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  rope = dict(get("rope_parameters") or get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{where}: rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
  if "full_attention" in rope or "sliding_attention" in rope:
    raise ValueError(f"{where}: per-layer-type rope parameters are not supported")
  out = {"rope_type": rope_type,
         "rope_theta": float(rope.get("rope_theta") or get("rope_theta", 10000.0))}
  if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    out["rope_low_freq_factor"] = float(rope["low_freq_factor"])
    out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
    out["rope_original_max_positions"] = int(
        rope.get("original_max_position_embeddings") or get("max_position_embeddings"))
  return out


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


def attention_heads(hf_config: Any, *, where: str) -> tuple[int, int, int, int]:
  """``(hidden_size, num_heads, num_kv_heads, head_dim)`` of a config, checked to group.

  Also reads Gemma's (`rmlora_jax.models.gemma`). ``head_dim`` is the
  config's, or ``hidden_size // num_attention_heads`` when it has none.

  Args:
    hf_config: a transformers config or its dict.
    where: the config, named in messages.

  Raises:
    ValueError: num_attention_heads not a multiple of num_key_value_heads,
      or no head_dim and hidden_size not a multiple of num_attention_heads.
  """
  get = lambda name, default=None: torch_port.config_get(hf_config, name, default)
  hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
  kv_heads = int(get("num_key_value_heads", heads))
  if heads % kv_heads:
    raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
  head_dim = get("head_dim")
  if head_dim is None:
    if hidden % heads:
      raise ValueError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = hidden // heads
  return hidden, heads, kv_heads, int(head_dim)


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
  hidden, heads, kv_heads, head_dim = attention_heads(hf_config, where=where)
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
      **rope_settings(hf_config, where=where),
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
  return decoder_params_from_state_dict(state, arch_from_hf_config(hf_config),
                                        layer_norms=("input_layernorm", "post_attention_layernorm"))


def decoder_params_from_state_dict(
    state: Mapping[str, np.ndarray],
    arch: Any,
    *,
    layer_norms: Sequence[str],
    attention_norms: Sequence[str] = (),
) -> tuple[dict, set[str]]:
  """The body of `params_from_state_dict`, shared with `rmlora_jax.models.gemma`.

  Reads the layout both families share (embedding, final norm, each layer's
  attention and MLP projections, the LM head) plus the norms named.

  Args:
    state: a transformers ``*ForCausalLM`` or base-model state dict.
    arch: a `LlamaArch` or ``GemmaArch``; its ``num_layers`` and
      ``tie_word_embeddings`` are read.
    layer_norms: the norms of each layer (``layers_{i}/{name}/scale``).
    attention_norms: norms inside the attention (``self_attn/{name}/scale``).

  Returns:
    (nested params holding every leaf found, set of the state keys used).
  """
  r = torch_port.StateReader(state, "model.")
  dense = lambda name: r.dense(name, required=False)
  norm = lambda name: {"scale": r.get(name + ".weight", required=False)}
  model: dict = {"embed_tokens": r.embedding("embed_tokens", required=False), "norm": norm("norm")}
  for i in range(arch.num_layers):
    p = f"layers.{i}."
    attn = {name: dense(p + "self_attn." + name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    attn.update({name: norm(p + "self_attn." + name) for name in attention_norms})
    layer = {name: norm(p + name) for name in layer_norms}
    layer["self_attn"] = attn
    layer["mlp"] = {name: dense(p + "mlp." + name) for name in ("gate_proj", "up_proj", "down_proj")}
    model[f"layers_{i}"] = layer
  params = {"model": model}
  lm_head = r.dense("lm_head", required=False, backbone=False)
  if not arch.tie_word_embeddings:
    params["lm_head"] = lm_head
  return torch_port.drop_missing(params), r.used


def dummy_inputs(hf_config: Any, batch: int = 2, seq: int = 8) -> dict:
  """Keyword inputs of the right shapes and dtypes for ``init``/``eval_shape``."""
  del hf_config  # Every decoder takes the same kind of input.
  return {"input_ids": jnp.ones((batch, seq), jnp.int32), "attention_mask": jnp.ones((batch, seq), jnp.int32)}
