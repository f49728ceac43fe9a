"""Helpers shared by the Flax ports of transformers' PyTorch encoders.

BERT/RoBERTa, DeBERTa-v2 and ViT build on these: reading a Hugging Face
config (an object or a plain dict) into sizes, dropout rates and activation
names; checking a task head against its number of labels; the layers every
port uses (`Dense`, `Dropout`, LayerNorm, embeddings), the padding mask of the
attention logits, the pooler, and the classification and question-answering
heads; and turning PyTorch weights into Flax leaves: a ``nn.Linear`` weight
(d_out, d_in) becomes a ``Dense`` kernel (d_in, d_out), a ``LayerNorm``
weight becomes ``scale``. The architecture modules import these, never each
other or the loader (`rmlora_jax.models.hub`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmlora_jax import low_rank
from rmlora_jax import partitioning
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


def config_activation(hf_config: Any, name: str, default: str, *, where: str) -> str:
  """Config field ``name``, an activation name that `activation` knows.

  Example::

    hidden_act = config_activation(hf_config, "hidden_act", "gelu", where="ViT config")

  Raises:
    ValueError: the name is not one of `ACTIVATIONS`; the message names
      ``where`` and the field.
  """
  value = config_get(hf_config, name, default)
  activation(value, where=f"{where} {name}")
  return value


def dropout_rate(hf_config: Any, *names: str, default: float, where: str) -> float:
  """The first of config fields ``names`` that is set (not None), as a probability.

  Later names are fallbacks, as transformers reads them: BERT's classifier
  dropout is ``dropout_rate(cfg, "classifier_dropout", "hidden_dropout_prob",
  default=0.1, where="bert config")``. ``default`` applies when none is set
  (a config dict without the fields).

  Raises:
    ValueError: the value is not in [0, 1]; the message names the field.
  """
  name, value = names[-1], default
  for candidate in names:
    if config_get(hf_config, candidate) is not None:
      name, value = candidate, config_get(hf_config, candidate)
      break
  rate = float(value)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"{where}: {name}={value!r} is not a dropout probability in [0, 1]")
  return rate


def attention_sizes(hf_config: Any, *, where: str, head_size_field: str | None = None) -> tuple[int, int, int]:
  """``(hidden_size, num_attention_heads, head size)`` of an encoder config.

  Args:
    hf_config: a transformers config or its dict.
    where: names the config in messages, e.g. ``"ViT config"``.
    head_size_field: the field that may set the head size explicitly
      (DeBERTa's ``attention_head_size``, ViT's ``head_dim``); when it is
      absent or None the head size is ``hidden_size // num_attention_heads``.

  Raises:
    ValueError: the head size is implied and the heads do not divide hidden_size.
  """
  hidden = int(config_get(hf_config, "hidden_size"))
  heads = int(config_get(hf_config, "num_attention_heads"))
  head_size = config_get(hf_config, head_size_field) if head_size_field else None
  if head_size is None:
    if hidden % heads:
      raise ValueError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_size = hidden // heads
  return hidden, heads, int(head_size)


# Every task head the ports build; each architecture takes a subset (its ``HEADS``).
# "causal_lm": a decoder's next-token logits (`rmlora_jax.models.llama`).
HEADS = ("base", "classification", "regression", "qa", "image_classification", "causal_lm")
# The heads of the text encoders (BERT/RoBERTa, DeBERTa-v2).
TEXT_HEADS = ("base", "classification", "regression", "qa")


def validate_head(head: str, num_labels: int | None = None, *, where: str,
                  heads: Sequence[str] = HEADS) -> None:
  """Checks a head name and its label count.

  "classification" needs num_labels >= 2 and "regression" exactly 1; the other
  heads take any num_labels >= 1 and ignore it ("qa" always has two outputs,
  start and end; "causal_lm" one per vocabulary entry; "base" has none).

  Args:
    head: the requested head, e.g. ``"classification"``.
    num_labels: the outputs the head is built with; None checks the name only
      (for weight converters, which do not know it).
    where: the caller, named in messages.
    heads: the heads the caller builds (a subset of `HEADS`).

  Raises:
    ValueError: ``head`` is not one of ``heads``, ``num_labels`` is no integer
      or < 1, regression with ``num_labels != 1``, or classification with
      ``num_labels < 2``.
  """
  if head not in heads:
    raise ValueError(f"{where}: head {head!r} is not one of {tuple(heads)}")
  if num_labels is None:
    return
  if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)):
    raise ValueError(f"{where}: num_labels must be an integer, got {num_labels!r}")
  if num_labels < 1:
    raise ValueError(f"{where}: num_labels must be >= 1, got {num_labels}")
  if head == "regression" and num_labels != 1:
    raise ValueError(f"{where}: head 'regression' needs num_labels=1, got {num_labels}")
  if head == "classification" and num_labels < 2:
    raise ValueError(
        f"{where}: head 'classification' needs num_labels >= 2, got {num_labels} "
        "(use head='regression' for one output)"
    )


class StateReader:
  """Looks up PyTorch weights by name, converting them and recording use.

  Backbone names are tried with the model prefix (``"bert."``,
  ``"deberta."``, ``"vit."``) when the state has keys with it, else bare;
  head names (``backbone=False``) are always bare. Each lookup takes several
  candidate names so that older and newer transformers spellings both load.
  With ``required=False`` a missing weight is None and each leaf is read on
  its own, so a converter can leave what the state lacks for the caller to
  initialise (`drop_missing` removes the Nones).
  """

  def __init__(self, state: Mapping[str, Any], prefix: str | Sequence[str]):
    """``prefix``: the backbone's key prefix, or several; the first the state uses wins."""
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    self.state = state
    self.prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
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
    bias = self.get(*(n + ".bias" for n in names), required=False, backbone=backbone)
    return _present(kernel=None if weight is None else weight.T, bias=bias)

  def layer_norm(self, *names: str, required: bool = True) -> dict[str, np.ndarray] | None:
    """``{"scale", "bias"}`` of a ``LayerNorm`` (also the old gamma/beta names)."""
    scale = self.get(*(n + s for n in names for s in (".weight", ".gamma")), required=required)
    bias = self.get(*(n + s for n in names for s in (".bias", ".beta")), required=required)
    return _present(scale=scale, bias=bias)

  def embedding(self, *names: str, required: bool = True) -> dict[str, np.ndarray] | None:
    """``{"embedding": W}`` of a ``nn.Embedding``."""
    return _present(embedding=self.get(*(n + ".weight" for n in names), required=required))


def _present(**leaves: np.ndarray | None) -> dict[str, np.ndarray] | None:
  """The leaves that are not None, or None when there are none."""
  present = {k: v for k, v in leaves.items() if v is not None}
  return present or None


def drop_missing(tree: Mapping[str, Any]) -> dict:
  """A nested dict without its None leaves and the dicts left empty by that.

  Converters build the whole layout and let `StateReader` answer None for
  what the state lacks; this leaves only the weights found.
  """
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      value = drop_missing(value)
    if value is not None and not (isinstance(value, dict) and not value):
      out[key] = value
  return out


def state_dict_sources(
    convert: Callable[[Mapping[str, np.ndarray]], Any], shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[str, tuple[int, ...] | None]]:
  """Which state dict entry each Flax leaf of a converter comes from: its inverse.

  Runs ``convert`` (a port's ``params_from_state_dict``) on a state of
  tagged arrays of the given shapes, one tag per key, and reads the tags back
  from the leaves. So writing weights in transformers' names (PEFT adapters,
  merged exports) follows the same mapping as reading them, rather than a
  second table.

  Args:
    convert: ``state -> nested params``; it may only select entries and
      permute their axes (``.T``, ``np.transpose``), as `StateReader` does.
    shapes: every entry of the PyTorch state dict and its shape.

  Returns:
    ``{flax path: (state dict key, axes)}``: the leaf is
    ``np.transpose(entry, axes)`` (`from_state`), or the entry as is when
    ``axes`` is None. A ``Linear`` weight's ``Dense`` kernel has ``(1, 0)``, a
    ``Conv2d`` weight (out, in, kh, kw)'s Flax kernel (kh, kw, in, out) has
    ``(2, 3, 1, 0)``.

  Raises:
    AssertionError: a leaf is not one entry with its axes permuted.
  """
  keys = list(shapes)
  state = {}
  for i, key in enumerate(keys):
    shape = tuple(int(n) for n in shapes[key])
    if len(shape) <= 2:
      # Value i everywhere, i + 0.5 past the first row: a transpose is seen even
      # on square matrices. Broadcast views: no memory however large the entry.
      marker = np.full(shape[:1] + (1,) * max(len(shape) - 1, 0), float(i))
      if shape and shape[0] > 1:
        marker[1:] += 0.5
      state[key] = np.broadcast_to(marker, shape)
    else:
      # Convolution kernels (small): i plus 2^-(k + 2) past the first slice of each axis k.
      marker = np.full(shape, float(i))
      for k, n in enumerate(shape):
        if n > 1:
          marker[(slice(None),) * k + (slice(1, None),)] += 2.0 ** -(k + 2)
      state[key] = marker
  out = {}
  for path, leaf in paths_lib.flatten_with_paths(convert(state)).items():
    leaf = np.asarray(leaf)
    index = int(np.floor(leaf.flat[0])) if leaf.size else -1
    assert leaf.dtype == np.float64 and 0 <= index < len(keys), f"{path!r} is not read from one state entry"
    shape = tuple(int(n) for n in shapes[keys[index]])
    if leaf.ndim <= 2:
      if leaf.ndim < 2 or leaf.shape != shape[::-1]:
        transposed = False
      elif leaf.shape != shape:
        transposed = True
      else:  # square: the first row of the entry must still be first
        transposed = shape[0] > 1 and leaf[(1,) + (0,) * (leaf.ndim - 1)] == index
      assert leaf.shape == (shape[::-1] if transposed else shape), f"{path!r} reshapes {keys[index]!r}"
      out[path] = (keys[index], (1, 0) if transposed else None)
      continue
    # Leaf axis j comes from the entry axis whose tag its second slice carries.
    axes = []
    for j in range(leaf.ndim):
      if leaf.shape[j] == 1:
        axes.append(None)
        continue
      tag = leaf[(0,) * j + (1,) + (0,) * (leaf.ndim - j - 1)] - index
      axes.append(int(round(-np.log2(tag))) - 2)
    ones = iter(k for k, n in enumerate(shape) if n == 1 and k not in axes)
    axes = tuple(next(ones) if a is None else a for a in axes)
    assert sorted(axes) == list(range(len(shape))) and np.array_equal(
        leaf, np.transpose(state[keys[index]], axes)), f"{path!r} is not a permutation of {keys[index]!r}"
    out[path] = (keys[index], None if axes == tuple(range(len(shape))) else axes)
  return out


def from_state(entry: Any, axes: tuple[int, ...] | None) -> np.ndarray:
  """A state dict entry as the Flax leaf of `state_dict_sources`' ``axes``."""
  entry = np.asarray(entry)
  return entry if axes is None else np.transpose(entry, axes)


def to_state(leaf: Any, axes: tuple[int, ...] | None) -> np.ndarray:
  """A Flax leaf as its state dict entry (the inverse of `from_state`)."""
  leaf = np.asarray(leaf)
  return leaf if axes is None else np.transpose(leaf, np.argsort(axes))


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
  `rmlora_jax.attach` builds), the layer computes
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
  Under a mesh with a tensor-parallel axis (`partitioning.column_shards`) the
  group's columns are laid out so that each device keeps its own.
  """
  params = [layer(jnp.shape(inputs)[-1]) for layer in layers]
  biases = [b for _, b in params if b is not None]
  dtype = dtype or jnp.result_type(inputs, *(k.dtype for k, _ in params), *biases)
  outs = low_rank.dense_group_apply(inputs, [k for k, _ in params], dtype,
                                   shards=partitioning.column_shards())
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


def weight_init(initializer_range: float, *, truncated: bool = False) -> Callable:
  """transformers' init of matrices and embeddings: normal with std ``initializer_range``.

  ``truncated``: flax's truncated normal at two standard deviations, for the
  models whose PyTorch init is ``trunc_normal_`` (ViT). Only the params a
  checkpoint lacks (a new head) keep this init.
  """
  if truncated:
    return nn.initializers.truncated_normal(initializer_range)
  return nn.initializers.normal(initializer_range)


def layer_norm(epsilon: float, *, dtype: Any, name: str, param_dtype: Any = jnp.float32,
               fast_variance: bool = False) -> nn.LayerNorm:
  """A LayerNorm computing the variance as PyTorch does (two-pass, not E[x²] - E[x]²).

  ``fast_variance``: flax's one-pass E[x²] - E[x]² instead, which the BERT port
  has always used (its parity tests and benchmarks were measured with it).
  """
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=fast_variance, name=name)


def embed(num: int, features: int, *, init: Callable, dtype: Any, name: str,
          param_dtype: Any = jnp.float32) -> nn.Embed:
  """A named ``nn.Embed`` table (num, features), as a PyTorch ``nn.Embedding``."""
  return nn.Embed(num, features, embedding_init=init, dtype=dtype, param_dtype=param_dtype,
                  name=name)


def text_inputs(
    input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None, *, where: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks a text encoder's inputs and fills the optional ones.

  Args:
    input_ids: (B, T) token ids.
    attention_mask: (B, T), 1 for real tokens and 0 for padding; all ones if None.
    token_type_ids: (B, T) segment ids; zeros if None.
    where: the model, named in messages.

  Returns:
    ``(input_ids, attention_mask, token_type_ids)`` as (B, T) arrays.

  Raises:
    ValueError: input_ids is not 2-D, or a mask or type array of another shape.
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"{where}: input_ids must be (batch, seq), got shape {input_ids.shape}")
  b, t = input_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  if token_type_ids is None:
    token_type_ids = jnp.zeros((b, t), jnp.int32)
  for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
    if jnp.shape(arr) != (b, t):
      raise ValueError(f"{where}: {name} has shape {jnp.shape(arr)}, but input_ids has shape {(b, t)}")
  return input_ids, jnp.asarray(attention_mask), jnp.asarray(token_type_ids)


def padding_mask(attention_mask: jax.Array, *, mask_queries: bool = False) -> jax.Array:
  """Which query-key pairs of a padded batch may attend, for `mask_logits`.

  Args:
    attention_mask: (B, T), nonzero for real tokens.
    mask_queries: also mask the rows of padded queries (DeBERTa masks the
      query-key pair; such a row then attends uniformly, as in PyTorch).

  Returns:
    (B, 1, 1, T) bool, or (B, 1, T, T) with ``mask_queries``; broadcasts
    against (B, heads, T, T) logits.
  """
  real = jnp.asarray(attention_mask) > 0
  keep = real[:, None, None, :]
  if mask_queries:
    keep = keep & real[:, None, :, None]
  return keep


def mask_logits(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """Attention ``logits`` where ``keep`` (see `padding_mask`), else the dtype's minimum.

  The softmax turns the minimum into a zero weight, as transformers' masks do
  (a row masked entirely attends uniformly). Where, not an added bias: the
  same values, computed in the logits' dtype.
  """
  return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


class Pooler(nn.Module):
  """The pooled output ``act(Dense(dropout(x[:, 0])))`` of the first token.

  BERT's and ViT's pooler (tanh, no dropout) and DeBERTa's ``ContextPooler``
  (dropout first, the config's activation). Parameters: ``dense/{kernel,bias}``.
  """

  # Output width (pooler_hidden_size / pooler_output_size, usually hidden_size).
  features: int
  kernel_init: Callable
  # An `ACTIVATIONS` name.
  act: str = "tanh"
  # Dropout on the first token before the Dense (DeBERTa's pooler_dropout).
  dropout_rate: float = 0.0
  # The dropout module: `Dropout`, or nn.Dropout where a port draws flax's masks.
  dropout_type: Callable[..., nn.Module] = Dropout
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """(B, T, H) -> (B, features)."""
    first = self.dropout_type(self.dropout_rate)(x[:, 0], deterministic=deterministic)
    pooled = dense(self.features, init=self.kernel_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="dense")(first)
    return activation(self.act, where="pooler act")(pooled)


def classifier_logits(pooled: jax.Array, num_labels: int, *, init: Callable, dtype: Any,
                      param_dtype: Any = jnp.float32, dropout: nn.Module | None = None,
                      deterministic: bool = True) -> jax.Array:
  """Sequence or image classification (and regression): ``classifier(dropout(pooled))``.

  Call it inside the model's compact method: the Dense is its ``classifier``.

  Args:
    pooled: (B, H), the pooled output or the first token.
    num_labels: outputs of the head.
    init: the kernel init.
    dtype, param_dtype: of the Dense.
    dropout: the dropout module applied first (the config's classifier
      dropout); None for none (ViT).
    deterministic: disables the dropout.

  Returns:
    (B, num_labels) logits.
  """
  if dropout is not None:
    pooled = dropout(pooled, deterministic=deterministic)
  return dense(num_labels, init=init, dtype=dtype, param_dtype=param_dtype, name="classifier")(pooled)


def span_logits(x: jax.Array, *, init: Callable, dtype: Any,
                param_dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Extractive question answering: the (H, 2) ``qa_outputs`` Dense on every token.

  Call it inside the model's compact method.

  Returns:
    ``{"start_logits": (B, T), "end_logits": (B, T)}``.
  """
  span = dense(2, init=init, dtype=dtype, param_dtype=param_dtype, name="qa_outputs")(x)
  return {"start_logits": span[..., 0], "end_logits": span[..., 1]}


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
