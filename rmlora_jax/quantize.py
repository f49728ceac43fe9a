"""QLoRA for every adapter family: the frozen base's kernels stored quantised through qwix.

`quantize_base(params, spec)` returns ``params`` with each kernel that a
`QuantizeSpec` selects replaced by a `qwix.QArray` (its quantised values and
scales), and everything else as it was. The models of `rmlora_jax.models`
take the result as it is: their Dense layers read kernels through
`rmlora_jax.low_rank.dense_apply` and `dense_group_apply`, which compute
through qwix (`qwix.dot_general`, `qwix.dequantize`) in the computation
dtype, and the adapter families' `attach` adds the low-rank branch in float
beside the quantised kernel, their `merge` merges the update into the
dequantised kernel. Adapters, heads and optimizer state never see a
quantised array.

Formats (`FORMATS`): ``"int8"``, ``"int4"`` (symmetric integers),
``"nf4"`` (QLoRA's 4-bit NormalFloat) and ``"fp8"`` (float8_e4m3fn). Scales
are symmetric absmax scales (qwix's ``"absmax"`` calibration): channel-wise
for int8 and fp8, one scale per output column (scale shape (1, d_out));
block-wise for nf4 and int4, one scale per 64 consecutive values of d_in in
each column (QLoRA's block size; scale shape (d_in / 64, d_out)).
``QuantizeSpec.block_size`` chooses another layout. Quantising is a pure
function of the float kernel, so a resumed run rebuilds the same base.

Example (a user's own loop)::

  qparams = quantize.quantize_base(params, quantize.QuantizeSpec(format="nf4"))
  adapters = rmlora_jax.init_lora(key, quantize.abstract_kernels(qparams), spec)
  loss = lambda ad: task_loss(module.apply({"params": rmlora_jax.attach(qparams, ad, spec)}, batch))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from rmlora_jax import low_rank
from rmlora_jax import paths as paths_lib
from rmlora_jax import stacking

# Format name -> qwix's qtype.
FORMATS: dict[str, Any] = {"int8": jnp.int8, "nf4": "nf4", "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}
# Values of d_in per scale when `QuantizeSpec.block_size` is -1; 0: channel-wise.
DEFAULT_BLOCK_SIZES: dict[str, int] = {"int8": 0, "fp8": 0, "nf4": 64, "int4": 64}
# Every Dense kernel of the transformer blocks of `rmlora_jax.models`' encoders
# (BERT, RoBERTa, DeBERTa-v2, ViT: encoder/layer_{i}/...) and decoders (Llama,
# Qwen2, Gemma: model/layers_{i}/...); embeddings, norms, poolers and heads are outside.
BLOCK_KERNELS: tuple[str, ...] = (r"(encoder/layer_\d+|model/layers_\d+)/.+/kernel",)


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a quantised kernel (a `qwix.QArray`)."""
  return low_rank.is_quantized(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeSpec:
  """Which frozen kernels to store quantised, and how.

  Example::

    QuantizeSpec(format="int8")  # every transformer-block kernel, channel-wise scales
    QuantizeSpec(format="nf4", targets=(r".*/(query|value)/kernel",), block_size=32)
  """

  # "int8", "nf4", "int4" or "fp8" (`FORMATS`).
  format: str
  # Regexes over "/"-paths; each must match a leaf, and each leaf matched (and
  # not excluded) must be a 2-D floating-point Dense kernel (d_in, d_out), a
  # leaf named "kernel" that the model reads through `low_rank.dense_apply`.
  targets: tuple[str, ...] = BLOCK_KERNELS
  # Regexes of paths kept in float although a target matches them (a trained head).
  exclude: tuple[str, ...] = ()
  # Values of d_in that share a scale (block-wise), 0: one scale per output
  # column (channel-wise), -1: the format's default (`DEFAULT_BLOCK_SIZES`).
  block_size: int = -1

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"QuantizeSpec.format must be one of {tuple(FORMATS)}, got {self.format!r}")
    for name in ("targets", "exclude"):
      value = getattr(self, name)
      if isinstance(value, str):
        raise ValueError(f"QuantizeSpec.{name} must be a tuple of regexes, got the string {value!r}; "
                         f"write ({value!r},)")
      object.__setattr__(self, name, tuple(value))
      paths_lib.compile_patterns(getattr(self, name), where=f"QuantizeSpec.{name}")
    if not self.targets:
      raise ValueError("QuantizeSpec.targets is empty: name at least one regex")
    if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < -1:
      raise ValueError(f"QuantizeSpec.block_size must be -1 (the format's default), 0 (channel-wise) or a "
                       f"positive integer, got {self.block_size!r}")

  @property
  def qtype(self) -> Any:
    """qwix's qtype of the format."""
    return FORMATS[self.format]

  @property
  def block(self) -> int:
    """The values of d_in per scale; 0: channel-wise."""
    return DEFAULT_BLOCK_SIZES[self.format] if self.block_size == -1 else self.block_size


@functools.partial(jax.jit, static_argnames=("qtype", "block"))
def quantize_kernel(kernel: jax.Array, *, qtype: Any, block: int) -> qwix.QArray:
  """One (d_in, d_out) kernel as a `qwix.QArray`: absmax scales per column, per ``block`` rows of it when > 0.

  A scanned model's stacked (L, d_in, d_out) kernel gets each layer's own
  scales, (L, 1 or d_in / block, d_out): layer i's slice is the QArray of
  its (d_in, d_out) kernel.
  """
  lead = kernel.ndim - 2
  return qwix.quantize(kernel, qtype, channelwise_axes=tuple(range(lead)) + (lead + 1,),
                       tiled_axes={lead: block} if block else None)


def flatten_kernels(tree: Any) -> dict[str, Any]:
  """`paths.flatten_with_paths` with each `qwix.QArray` one leaf at its kernel's path."""
  return paths_lib.flatten_with_paths(tree, is_leaf=is_quantized)


def map_kernels(fn, tree: Any) -> Any:
  """``jax.tree_util.tree_map_with_path(fn, tree)`` that hands each `qwix.QArray` to ``fn`` whole.

  ``fn(path, leaf)`` gets the "/"-path (a quantised kernel's is its kernel's).
  """
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(paths_lib.path_str(kp), x), tree,
                                          is_leaf=is_quantized)


def select(params: Any, spec: QuantizeSpec) -> list[str]:
  """The paths of the kernels ``spec`` quantises in ``params``, checked.

  Raises:
    ValueError: a target that matches nothing, a selected leaf that is not
      a 2-D floating-point kernel or is quantised already, a block size that
      does not divide its d_in, or nothing left once ``spec.exclude`` is applied.
  """
  flat = flatten_kernels(params)
  excluded = paths_lib.compile_patterns(spec.exclude, where="QuantizeSpec.exclude")
  # A scanned model's stacked kernel is matched by its layers' paths, and quantised whole or not at all.
  view = stacking.layer_view(flat)
  matched = set(paths_lib.match_paths(view, spec.targets, where="QuantizeSpec.targets"))
  matched = {p for p in matched if not any(rx.fullmatch(p) for rx in excluded)}
  chosen = []
  for path, leaf in flat.items():
    layers = stacking.layer_paths(path, np.shape(leaf))
    if layers and 0 < sum(p in matched for p in layers) < len(layers):
      raise ValueError(f"QuantizeSpec selects some layers of {path!r} but not all ({sorted(set(layers) & matched)[:3]}"
                       f" ...); the layers of a scanned model are stored stacked and quantised together")
    if path not in matched and not (layers and layers[0] in matched):
      continue
    if is_quantized(leaf):
      raise ValueError(f"QuantizeSpec.targets selects {path!r}, which is quantised already ({describe(leaf)}); "
                       f"quantise the float parameters once")
    shape = tuple(np.shape(leaf))[1:] if layers else tuple(np.shape(leaf))
    if path.rpartition("/")[2] != "kernel":
      raise ValueError(f"QuantizeSpec.targets selects {path!r} with shape {shape}, which is not a Dense kernel "
                       f"(a leaf named 'kernel'); only those are read through the quantised path "
                       f"(rmlora_jax.low_rank.dense_apply): narrow the pattern or add it to QuantizeSpec.exclude")
    if len(shape) != 2:
      raise ValueError(f"QuantizeSpec.targets selects {path!r} with shape {shape}, but only 2-D Dense kernels "
                       f"(d_in, d_out) are quantised; narrow the pattern or add it to QuantizeSpec.exclude")
    dtype = jnp.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
      raise ValueError(f"QuantizeSpec.targets selects {path!r} of dtype {dtype}; only float16, bfloat16, float32 "
                       f"or float64 kernels are quantised")
    if spec.block and shape[0] % spec.block:
      raise ValueError(f"QuantizeSpec.block_size={spec.block} ({spec.format}) does not divide d_in={shape[0]} of "
                       f"{path!r}; choose a divisor of it, or 0 for channel-wise scales")
    chosen.append(path)
  if not chosen:
    raise ValueError(f"QuantizeSpec.exclude={spec.exclude} leaves none of the kernels that QuantizeSpec.targets="
                     f"{spec.targets} selects")
  return chosen


def quantize_base(params: Any, spec: QuantizeSpec) -> Any:
  """``params`` with each kernel that ``spec`` selects stored as a `qwix.QArray`.

  Pure and deterministic: the same float params give the same bits. The
  result goes wherever the params went (``module.apply``, `rmlora_jax.attach`
  and `merge`, `rmlora_jax.trainer.train_and_evaluate`); leaves not selected
  are returned as they are (same objects).

  Args:
    params: a Flax parameter tree with float kernels.
    spec: which kernels, the format and the scale layout.

  Returns:
    The tree of the same structure, each selected (d_in, d_out) kernel a
    `qwix.QArray` whose ``qvalue`` has the kernel's shape and whose ``scale``
    (in the kernel's dtype) is (1, d_out) channel-wise, (d_in / block, d_out)
    block-wise.

  Raises:
    ValueError: as `select`.
  """
  chosen = frozenset(select(params, spec))
  return map_kernels(lambda path, w: quantize_kernel(w, qtype=spec.qtype, block=spec.block)
                     if path in chosen else w, params)


def dequantize_base(params: Any) -> Any:
  """``params`` with each `qwix.QArray` dequantised (`qwix.dequantize`, in its scale's dtype)."""
  return map_kernels(lambda _, w: qwix.dequantize(w) if is_quantized(w) else w, params)


def abstract_kernels(params: Any) -> Any:
  """``params`` with each `qwix.QArray` a `jax.ShapeDtypeStruct` of its kernel's shape and float dtype.

  What shape-reading code takes in place of a quantised tree: the adapter
  families' ``init_*`` (`rmlora_jax.select_targets`), `peft_format.load_peft`.
  """
  return map_kernels(lambda _, w: jax.ShapeDtypeStruct(w.shape, w.dtype) if is_quantized(w) else w, params)


def format_of(kernel: qwix.QArray) -> str:
  """The `FORMATS` name of a quantised kernel ("int8", "nf4", ...)."""
  names = {str(q if isinstance(q, str) else jnp.dtype(q)): name for name, q in FORMATS.items()}
  qtype = kernel.qtype if isinstance(kernel.qtype, str) else str(jnp.dtype(kernel.qtype))
  return names.get(qtype, qtype)


def block_of(kernel: qwix.QArray) -> int:
  """Values of d_in per scale of a quantised (d_in, d_out) kernel (or a stack of them); 0: channel-wise."""
  rows = kernel.scale.shape[-2]
  return 0 if rows == 1 else kernel.shape[-2] // rows


def describe(kernel: qwix.QArray) -> str:
  """``"nf4, block-wise scales (64 values of d_in per scale)"`` and the like."""
  block = block_of(kernel)
  scales = "channel-wise scales" if not block else f"block-wise scales ({block} values of d_in per scale)"
  return f"{format_of(kernel)}, {scales}"


def array_bytes(x: Any) -> int:
  """Bytes of one array stored at its dtype's bits (4-bit values packed two to a byte)."""
  return math.ceil(math.prod(np.shape(x)) * jax.dtypes.itemsize_bits(x.dtype) / 8)


def tree_bytes(tree: Any) -> int:
  """Bytes of a parameter tree, each `qwix.QArray` as its values, scales and zero points."""
  return sum(array_bytes(x) for x in jax.tree.leaves(tree))


def float_bytes(tree: Any) -> int:
  """Bytes of a parameter tree with each `qwix.QArray` counted as the float kernel it came from.

  qwix keeps the scales in the quantised kernel's dtype, so that is the
  kernel's size at the scale's dtype.
  """
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize if is_quantized(x) else array_bytes(x)
             for x in flatten_kernels(tree).values())


def footprint(frozen: Any, trainable: Any = None, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
  """What quantising saved: the frozen base's and all parameters' bytes before and after.

  Args:
    frozen: the frozen parameter tree, quantised kernels as `qwix.QArray`s.
    trainable: the trainable tree (adapters, head); its bytes count in the
      totals, the same before and after.
    exclude: paths of ``frozen`` that are not part of the base (a head whose
      trained copy is in ``trainable``).

  Returns:
    ``{"format", "scales", "kernels", "base_bytes_before", "base_bytes_after",
    "trainable_bytes", "param_bytes_before", "param_bytes_after"}``; 4-bit
    values count half a byte (as they are packed on accelerators; on CPU
    JAX keeps them a byte each).
  """
  exclude = frozenset(exclude)
  base = {p: x for p, x in flatten_kernels(frozen).items() if p not in exclude}
  quantized = [x for x in base.values() if is_quantized(x)]
  trained = tree_bytes(trainable) if trainable is not None else 0
  before, after = float_bytes(list(base.values())), tree_bytes(list(base.values()))
  return {
      "format": "/".join(sorted({format_of(x) for x in quantized})) or "none",
      "scales": "; ".join(sorted({describe(x).partition(", ")[2] for x in quantized})),
      "kernels": len(quantized),
      "base_bytes_before": before,
      "base_bytes_after": after,
      "trainable_bytes": trained,
      "param_bytes_before": before + trained,
      "param_bytes_after": after + trained,
  }


def has_quantized(params: Any) -> bool:
  """Whether any leaf of ``params`` is a quantised kernel."""
  return any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def for_quantized_base(method: Any) -> Any:
  """``method`` (a `rmlora_jax.methods.Method`) made to start from params with quantised kernels.

  Its ``init`` then sees each quantised kernel as its shape and float dtype
  (`abstract_kernels`), which is all that the adapter families' ``init_*``
  read; ``assemble`` takes the quantised frozen tree as it is. Methods that
  train the base weights themselves (full fine-tuning) are refused, as is a
  head pattern that would train a quantised kernel.

  Raises:
    ValueError: ``method`` adapts nothing, or trains a quantised kernel.
  """
  settings = method.settings
  if settings.spec is None:
    raise ValueError(f"method {settings.name!r} trains the base weights themselves, which cannot be quantised; "
                     f"quantise the base for an adapter method")
  heads = paths_lib.compile_patterns(settings.train_patterns, where="MethodSettings.train_patterns")

  def init(key, params, init=method.init):
    for path, leaf in flatten_kernels(params).items():
      if is_quantized(leaf):
        hit = next((rx.pattern for rx in heads if any(rx.fullmatch(f"{path}{part}")
                                                       for part in ("", "/qvalue", "/scale"))), None)
        if hit is not None:
          raise ValueError(f"MethodSettings.train_patterns {hit!r} trains {path!r}, which is quantised "
                           f"({describe(leaf)}); keep trained parameters out of the quantised base")
    return init(key, abstract_kernels(params))

  return dataclasses.replace(method, init=init)

