"""Helpers shared by the Flax ports of transformers' PyTorch encoders.

Reading a Hugging Face config (an object or a plain dict), naming activation
functions the way transformers' ``ACT2FN`` does, checking a head against its
number of labels, and turning PyTorch weights into Flax leaves: a
``nn.Linear`` weight (d_out, d_in) becomes a ``Dense`` kernel (d_in, d_out),
a ``LayerNorm`` weight becomes ``scale``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax import low_rank
from rmlora_jax import paths as paths_lib

# transformers' ACT2FN names -> JAX functions. "gelu" is the exact (erf) GELU;
# the tanh approximations go by several names there.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


def activation(name: str, *, where: str) -> Callable[[jax.Array], jax.Array]:
  """The JAX function for a transformers activation name such as ``"gelu"``.

  Raises:
    ValueError: the name is not one of `ACTIVATIONS`; ``where`` names the
      config field it came from.
  """
  if name not in ACTIVATIONS:
    raise ValueError(f"{where}={name!r} is not a supported activation; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def config_get(hf_config: Any, name: str, default: Any = None) -> Any:
  """Field ``name`` of a transformers config object or of a config dict."""
  if isinstance(hf_config, Mapping):
    value = hf_config.get(name, default)
  else:
    value = getattr(hf_config, name, default)
  return default if value is None else value


def check_head(head: str, num_labels: int, rules: Mapping[str, tuple[Callable[[int], bool], str]], *, model: str) -> None:
  """Checks that ``head`` is known and ``num_labels`` suits it.

  Args:
    head: the requested head, e.g. ``"classification"``.
    num_labels: the number of outputs the head is built with.
    rules: ``{head: (accepts(num_labels), what it needs in words)}``.
    model: the model name used in messages.

  Raises:
    ValueError: unknown head, or a ``num_labels`` the head cannot take.
  """
  if head not in rules:
    raise ValueError(f"head={head!r} is not a {model} head; choose one of {sorted(rules)}")
  accepts, needs = rules[head]
  if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or not accepts(num_labels):
    raise ValueError(f"{model} head={head!r} needs num_labels {needs}, got num_labels={num_labels!r}")


class StateReader:
  """Looks up PyTorch weights by name, converting them and recording use.

  Backbone names are tried with and without ``prefix`` (``"deberta."``,
  ``"vit."``); each lookup takes several candidate names so that older and
  newer transformers spellings both load.
  """

  def __init__(self, state: Mapping[str, Any], prefix: str):
    self.state = state
    self.prefix = prefix if any(k.startswith(prefix) for k in state) else ""
    self.used: set[str] = set()

  def get(self, *names: str, required: bool = True, backbone: bool = True) -> np.ndarray | None:
    """The first of ``names`` in the state (prefixed when ``backbone``)."""
    for name in names:
      key = self.prefix + name if backbone else name
      if key in self.state:
        self.used.add(key)
        return np.asarray(self.state[key])
    if required:
      shown = [self.prefix + n if backbone else n for n in names]
      raise ValueError(f"state dict has no weight {' or '.join(map(repr, shown))}")
    return None

  def dense(self, *names: str, required: bool = True, backbone: bool = True) -> dict[str, np.ndarray] | None:
    """``{"kernel": W.T, "bias": b}`` of a ``nn.Linear`` (bias only if stored)."""
    weight = self.get(*(n + ".weight" for n in names), required=required, backbone=backbone)
    if weight is None:
      return None
    out = {"kernel": weight.T}
    bias = self.get(*(n + ".bias" for n in names), required=False, backbone=backbone)
    if bias is not None:
      out["bias"] = bias
    return out

  def layer_norm(self, *names: str, required: bool = True) -> dict[str, np.ndarray] | None:
    """``{"scale", "bias"}`` of a ``LayerNorm`` (also the old gamma/beta names)."""
    scale = self.get(*(n + s for n in names for s in (".weight", ".gamma")), required=required)
    if scale is None:
      return None
    bias = self.get(*(n + s for n in names for s in (".bias", ".beta")))
    return {"scale": scale, "bias": bias}

  def embedding(self, *names: str) -> dict[str, np.ndarray]:
    """``{"embedding": W}`` of a ``nn.Embedding``."""
    return {"embedding": self.get(*(n + ".weight" for n in names))}


def check_shapes(params: Any, expected: Any, *, model: str) -> None:
  """Checks converted weights against the shapes the Flax module declares.

  Every leaf of ``expected`` must be present in ``params`` with the same
  shape; ``params`` may hold extra leaves (heads), which are not checked here.

  Raises:
    ValueError: a leaf is missing or has the wrong shape, named by its path.
  """
  got = paths_lib.flatten_with_paths(params)
  for path, leaf in paths_lib.flatten_with_paths(expected).items():
    if path not in got:
      raise ValueError(f"{model}: converted weights lack {path!r} (shape {tuple(leaf.shape)})")
    if tuple(got[path].shape) != tuple(leaf.shape):
      raise ValueError(
          f"{model}: weight for {path!r} has shape {tuple(got[path].shape)}, "
          f"but the config implies {tuple(leaf.shape)}"
      )


def pair(value: int | Iterable[int], *, where: str) -> tuple[int, int]:
  """``(h, w)`` from an int or a length-2 sequence (image and patch sizes)."""
  if isinstance(value, (int, np.integer)):
    return int(value), int(value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"{where} must be an int or (height, width), got {value!r}")
  return value


class Dense(nn.Module):
  """``nn.Dense`` (same parameters, same numbers) that also takes a low-rank kernel.

  When the params hold a `rmlora_jax.low_rank.LowRankKernel` at ``kernel`` (what
  `rmlora_jax.adapters.lora.attach` builds), the layer computes
  ``x @ w0 + (x @ right.T) @ left.T`` instead of ``x @ kernel``.
  """

  # Output width d_out.
  features: int
  use_bias: bool = True
  # Computation dtype; None: promoted from the inputs and parameters, as nn.Dense.
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """(..., d_in) -> (..., features)."""
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    dtype = self.dtype or jnp.result_type(inputs, kernel.dtype, *(() if bias is None else (bias,)))
    y = low_rank.dense_apply(inputs, kernel, dtype)
    if bias is not None:
      y = y + jnp.asarray(bias, dtype)
    return y


class DenseParams(nn.Module):
  """Declares a `Dense` layer's parameters (same names and inits) and returns them.

  For layers that apply several projections of one input together
  (`rmlora_jax.low_rank.dense_group_apply`): the parameter tree, and so every
  checkpoint, LoRA target and partition rule, stays that of separate `Dense`s.
  """

  features: int
  use_bias: bool = True
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, d_in: int) -> tuple[Any, jax.Array | None]:
    """``(kernel, bias)``; the kernel may be a `LowRankKernel`, the bias None."""
    kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    return kernel, bias


def dense_group(inputs: jax.Array, layers: Iterable[DenseParams], dtype: Any = None) -> list[jax.Array]:
  """Applies several `DenseParams` layers to the same ``inputs``, as `Dense` would each.

  ``dtype``: the computation dtype; None promotes inputs and parameters, as `Dense` does.
  """
  params = [layer(jnp.shape(inputs)[-1]) for layer in layers]
  biases = [b for _, b in params if b is not None]
  dtype = dtype or jnp.result_type(inputs, *(k.dtype for k, _ in params), *biases)
  outs = low_rank.dense_group_apply(inputs, [k for k, _ in params], dtype)
  return [y if b is None else y + jnp.asarray(b, dtype) for y, (_, b) in zip(outs, params)]


class Dropout(nn.Module):
  """Inverted dropout like ``nn.Dropout``, its mask from 16-bit Threefry bits.

  ``nn.Dropout`` draws 32 bits per element with the key's own generator. On
  XLA CPU that was a quarter of a MiniLM train step (the attention
  probabilities' masks are B*heads*T*T elements per layer). Here the key's
  data seeds XLA's RngBitGenerator with the Threefry algorithm, 16 bits per
  element: about 6x faster there than the default Philox at 32 bits
  (docs/BENCHMARKS.md). An element is kept when its bits fall below
  ``round(keep_prob * 2**16)``, so the keep probability is exact to 2**-17
  (0.1 dropout keeps 0.899994 instead of 0.9). Still a pure function of the key.
  """

  # Probability of zeroing an element.
  rate: float
  # Axes along which the mask is shared (as nn.Dropout).
  broadcast_dims: tuple[int, ...] = ()
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
    """Zeroes each element with probability ``rate`` and scales the rest by 1 / (1 - rate)."""
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    shape = tuple(1 if i in self.broadcast_dims else n for i, n in enumerate(inputs.shape))
    keep_prob = 1.0 - self.rate
    keep = keep_mask(self.make_rng(self.rng_collection), shape, keep_prob)
    return jnp.where(keep, inputs / jnp.asarray(keep_prob, inputs.dtype), jnp.zeros((), inputs.dtype))


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
  """A boolean mask, True with probability ``keep_prob`` (to 2**-17), a pure function of ``key``."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = jnp.ravel(data).astype(jnp.uint32)
  # RngBitGenerator's Threefry takes a 128-bit state: widen a 64-bit key.
  if data.shape[0] < 4:
    data = jnp.concatenate([data, data ^ np.uint32(0x9E3779B9)])[:4]
  _, bits = jax.lax.rng_bit_generator(data[:4], shape, dtype=jnp.uint16,
                                      algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
  threshold = np.uint16(min(round(keep_prob * 2.0**16), 2**16 - 1))
  return bits < threshold


def dense(features: int, *, init: Callable, dtype: Any, name: str, use_bias: bool = True,
          param_dtype: Any = jnp.float32) -> Dense:
  """A named `Dense` with 2-D kernel (d_in, d_out), as every projection here is."""
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
               kernel_init=init, name=name)


def layer_norm(epsilon: float, *, dtype: Any, name: str) -> nn.LayerNorm:
  """A LayerNorm computing the variance as PyTorch does (two-pass, not E[x²] - E[x]²)."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


def split_heads(y: jax.Array, num_heads: int) -> jax.Array:
  """(..., T, heads * d) -> (..., heads, T, d): heads become a batch dim."""
  y = y.reshape(y.shape[:-1] + (num_heads, -1))
  return jnp.swapaxes(y, -2, -3)


def attend(scores: jax.Array, values: jax.Array, dropout: nn.Dropout, deterministic: bool) -> jax.Array:
  """Softmax over keys (in float32), dropout, then the weighted sum of values.

  Args:
    scores: (B, heads, Tq, Tk) attention logits, masked already.
    values: (B, heads, Tk, d).
    dropout: the attention-probability dropout module.
    deterministic: disables the dropout.

  Returns:
    (B, Tq, heads * d), heads merged back as in PyTorch's ``view``.
  """
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(values.dtype)
  probs = dropout(probs, deterministic=deterministic)
  context = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, values), 1, 2)
  return context.reshape(context.shape[:2] + (-1,))
