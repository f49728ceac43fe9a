"""What the decoders of `rmlora_jax.models` (`llama`, `gemma`) share.

RoPE (`rope_inv_freq`, `apply_rope`, `rope_settings`), RMSNorm, the
projections (`dense_params`, `dense_layer`), grouped-query attention over a
KV cache (`Slots`, `grouped_attention`, `decoder_inputs`), Gemma 2's
`softcap`, reading head counts (`attention_heads`) and a transformers
decoder's state dict (`decoder_params_from_state_dict`). An ``arch`` here is a
`llama.LlamaArch` or a `gemma.GemmaArch`: the fields each function reads are
named in its docstring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax.models import torch_port

# The RoPE variants implemented (transformers' ``rope_type``).
ROPE_TYPES = ("default", "linear", "llama3")

Array = jax.Array



def rope_inv_freq(arch: Any) -> np.ndarray:
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



def rms_normalise(x: Array, epsilon: float) -> Array:
  """``x / sqrt(mean(x²) + epsilon)`` over the last axis, in float32 (both RMSNorms' core)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + epsilon)


class RMSNorm(nn.Module):
  """``scale * x / sqrt(mean(x²) + eps)``, the statistics in float32 (LlamaRMSNorm)."""

  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(..., H) -> (..., H) in ``dtype``."""
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return jnp.asarray(scale, self.dtype) * rms_normalise(x, self.epsilon).astype(self.dtype)



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


def constrain(x: Array, sharding: Any) -> Array:
  """``x`` constrained to ``sharding`` (`jax.lax.with_sharding_constraint`); as it is when None."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# A layer's settings by default: its arch's for its index (`window(layer)`...); a scan passes them in.
OWN_LAYER = object()
# What a scanned layer gets for "no window": no key is this far back.
_NO_WINDOW = np.iinfo(np.int32).max


def layer_windows(arch: Any) -> Array | None:
  """Each layer's sliding window as an int32 (L,) array to scan over; None when every layer attends fully."""
  windows = [arch.window(i) for i in range(arch.num_layers)]
  if all(w is None for w in windows):
    return None
  return jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)


def scanned(step: type[nn.Module], num_layers: int) -> type[nn.Module]:
  """``step`` (a ``(x, per_layer, *broadcast) -> (x, None)`` layer) as one `nn.scan` over ``num_layers``.

  Parameters and the KV cache get a leading layer axis (`rmlora_jax.stacking`),
  each layer its own init and dropout keys; ``per_layer`` is scanned over,
  the position ids, slots, ``decode`` and ``deterministic`` are broadcast.
  """
  return nn.scan(step, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=num_layers)


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
