"""Meshes, partition rules and shardings: data, FSDP and tensor parallelism on JAX's SPMD.

A run's devices form one `jax.sharding.Mesh` with three named axes:

* ``"data"``: plain data parallelism; the batch is split over it, weights are
  replicated along it.
* ``"fsdp"``: the batch is split over it too, and so are the weights (each
  kernel's non-model dimension), which XLA all-gathers for the forward pass.
* ``"model"``: tensor parallelism (Megatron layout): column-parallel query,
  key, value and intermediate kernels, row-parallel attention output and
  output kernels; the batch is replicated along it.

Which dimension of a parameter goes on which axis is a list of partition
rules, ``(regex, PartitionSpec)`` pairs over the "/"-joined parameter paths;
the first rule that ``re.fullmatch``es a path wins and a path that no rule
covers is an error. A dimension that an axis does not divide (a vocabulary of
30522 rows over 4 devices) is replicated along that axis instead.

A quantised kernel (a `qwix.QArray`, `rmlora_jax.quantize`) takes its
kernel's rule: its values the rule's spec, its scales (and zero points) the
same spec with the axes along which they have one entry left out (a
channel-wise scale (1, d_out) keeps only d_out's axis), so each device holds
the scales of the values it holds, or the whole scale where an axis does not
divide it (`fit_spec`).

Everything derived from the parameters follows them (`follow_specs`): a LoRA
``a`` (rank, d_in) takes its kernel's d_in sharding, ``b`` (d_out, rank) its
d_out sharding, the other families' factors likewise. Each optimizer state
leaf that copies a trainable leaf (Adam's moments) takes that leaf's
sharding, found through `optax.tree_map_params`, and the rest of the state
is replicated (`optimizer_shardings`).

Example::

  mesh = make_mesh({"data": -1, "fsdp": 2, "model": 1})
  specs = match_partition_rules(params, rules_for("bert"))
  params = put_sharded(params, named_shardings(params, specs, mesh))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmlora_jax import paths as paths_lib
from rmlora_jax import quantize
from rmlora_jax import stacking

MESH_AXES = ("data", "fsdp", "model")
# The batch dimension is split over these axes together.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, P]]

# Shared by BERT/RoBERTa, DeBERTa-v2 and ViT (see docs/MODELS.md for the paths).
# Kernels are Flax (d_in, d_out).
ENCODER_RULES: tuple[tuple[str, P], ...] = (
    # Column-parallel: d_out over "model", d_in over "fsdp".
    (r"encoder/layer_\d+/attention/(query|key|value|pos_query|pos_key)/kernel", P("fsdp", "model")),
    (r"encoder/layer_\d+/attention/(query|key|value|pos_query|pos_key)/bias", P("model")),
    (r"encoder/layer_\d+/intermediate/kernel", P("fsdp", "model")),
    (r"encoder/layer_\d+/intermediate/bias", P("model")),
    # Row-parallel: d_in over "model" (the sum over it is one all-reduce).
    (r"encoder/layer_\d+/(attention/output|output)/kernel", P("model", "fsdp")),
    (r"encoder/layer_\d+/(attention/output|output)/bias", P()),
    # Every LayerNorm: small, replicated.
    (r"(.*/)?\w*layer_?norm\w*/(scale|bias)", P()),
    # Embedding tables (rows, hidden): rows over "model", hidden over "fsdp".
    (r"embeddings/\w+_embeddings/embedding", P("model", "fsdp")),
    # Heads: pooler, classifiers (BERT's, RoBERTa's dense + out_proj), QA.
    (r"(pooler|classifier|qa_outputs)(/\w+)?/kernel", P("fsdp", None)),
    (r"(pooler|classifier|qa_outputs)(/\w+)?/bias", P()),
)

DEBERTA_V2_RULES = ENCODER_RULES + (
    (r"embeddings/embed_proj/kernel", P(None, "fsdp")),
    (r"encoder/rel_embeddings/embedding", P(None, "fsdp")),
    (r"encoder/conv/conv/kernel", P(None, "fsdp", "model")),
    (r"encoder/conv/conv/bias", P("model")),
)

VIT_RULES = ENCODER_RULES + (
    (r"embeddings/cls_token", P()),
    (r"embeddings/position_embeddings", P(None, None, "fsdp")),
    (r"embeddings/patch_embeddings/kernel", P(None, None, None, "fsdp")),
    (r"embeddings/patch_embeddings/bias", P()),
)

# Llama-family decoders (rmlora_jax/models/llama.py: Llama, SmolLM2, Qwen2).
# The same Megatron layout: q/k/v and gate/up column-parallel, o and down
# row-parallel. With grouped-query attention, "model" must divide the key/value
# width for k/v to be split (else they are replicated along it, see fit_spec).
DECODER_RULES: tuple[tuple[str, P], ...] = (
    (r"model/layers_\d+/self_attn/(q|k|v)_proj/kernel", P("fsdp", "model")),
    (r"model/layers_\d+/self_attn/(q|k|v)_proj/bias", P("model")),
    (r"model/layers_\d+/mlp/(gate|up)_proj/kernel", P("fsdp", "model")),
    (r"model/layers_\d+/mlp/(gate|up)_proj/bias", P("model")),
    (r"model/layers_\d+/(self_attn/o_proj|mlp/down_proj)/kernel", P("model", "fsdp")),
    (r"model/layers_\d+/(self_attn/o_proj|mlp/down_proj)/bias", P()),
    # RMSNorm scales: small, replicated.
    (r"model/(layers_\d+/\w+layernorm|norm)/scale", P()),
    # The embedding (vocab, H) and the untied head (H, vocab): vocabulary over "model".
    (r"model/embed_tokens/embedding", P("model", "fsdp")),
    (r"lm_head/kernel", P("fsdp", "model")),
)

# Gemma 2 and Gemma 3 (rmlora_jax/models/gemma.py): the decoder layout, whose
# layernorm rule already takes Gemma's pre/post_feedforward_layernorm, plus
# Gemma 3's per-head query and key norms (D,): replicated.
GEMMA_RULES = DECODER_RULES + (
    (r"model/layers_\d+/self_attn/(q|k)_norm/scale", P()),
)

# By Hugging Face ``model_type``.
PARTITION_RULES: dict[str, tuple[tuple[str, P], ...]] = {
    "bert": ENCODER_RULES,
    "roberta": ENCODER_RULES,
    "deberta-v2": DEBERTA_V2_RULES,
    "vit": VIT_RULES,
    "llama": DECODER_RULES,
    "qwen2": DECODER_RULES,
    "gemma2": GEMMA_RULES,
    "gemma3_text": GEMMA_RULES,
}

# Adapter factors by name: which dimension of the base kernel (d_in, d_out)
# each of their dimensions runs along ("in", "out"), or None for a rank-sized one.
FACTOR_LAYOUTS: dict[str, tuple[str | None, ...]] = {
    "a": (None, "in"), "b": ("out", None),              # LoRA, SoRA
    "q": (None, "in"), "p": ("out", None),              # AdaLoRA
    "V": (None, "in"), "U": ("out", None),              # LoRA²
    "u": (None, None), "v": (None, None),
    "lam": (None,), "g": (None,),                       # singular values, gates
}


def rules_for(model_type: str) -> tuple[tuple[str, P], ...]:
  """The partition rules of a Hugging Face ``model_type`` ("bert", "deberta-v2", ...)."""
  if model_type not in PARTITION_RULES:
    raise ValueError(
        f"no partition rules for model_type {model_type!r}; known: {sorted(PARTITION_RULES)}"
    )
  return PARTITION_RULES[model_type]


# --------------------------------------------------------------------------- meshes


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves the mesh axis sizes, ``-1`` taking the rest of ``num_devices``.

  Args:
    axes: size per axis of `MESH_AXES` (missing axes are 1); at most one -1.
    num_devices: the devices available.

  Returns:
    ``{axis: size}`` in `MESH_AXES` order; the product divides ``num_devices``.

  Raises:
    ValueError: an unknown axis, a size that is not -1 or positive, two -1s,
      or a mesh whose size does not divide the device count.
  """
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
  sizes = {a: axes.get(a, 1) for a in MESH_AXES}
  for a, n in sizes.items():
    if isinstance(n, bool) or not isinstance(n, int) or not (n == -1 or n >= 1):
      raise ValueError(f"config.mesh.{a} must be -1 (the rest of the devices) or a positive integer, got {n!r}")
  rest = [a for a, n in sizes.items() if n == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {rest}")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if num_devices % fixed:
    raise ValueError(
        f"config.mesh={sizes}: the mesh size {fixed} does not divide the {num_devices} devices"
    )
  if rest:
    sizes[rest[0]] = num_devices // fixed
  return sizes


def make_mesh(axes: Mapping[str, int] | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``("data", "fsdp", "model")`` mesh from ``config.mesh``-style sizes.

  With one process the mesh may use the first ``size`` of the devices (size
  dividing their count); across processes it must use all of them.

  Example::

    make_mesh({"data": -1, "model": 2})  # 8 devices: data 4, fsdp 1, model 2
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(dict(axes or {"data": -1}), len(devices))
  size = math.prod(sizes.values())
  if jax.process_count() > 1 and size != len(devices):
    raise ValueError(
        f"config.mesh={sizes} uses {size} of the {len(devices)} devices of {jax.process_count()} "
        f"processes; across processes the mesh must use every device (set one axis to -1)"
    )
  shape = tuple(sizes.values())
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices[:size])


def column_shards() -> int:
  """How many devices split a column-parallel kernel's d_out in the step being traced.

  The size of the ``"model"`` axis of the abstract mesh that
  `rmlora_jax.training`'s steps trace under (``jax.sharding.use_abstract_mesh``);
  1 outside one. The models read it to lay grouped projections out so that no
  kernel moves between devices (`rmlora_jax.low_rank.dense_group_apply`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get("model", 1)


def under_mesh(mesh: Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` traced under ``mesh``'s abstract mesh, so the models see its shape (`column_shards`)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  """The same whole value on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, replicated over "model"."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into: the product of the data axes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the data axes."""
  n = batch_shards(mesh)
  if batch_size % n:
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
    raise ValueError(
        f"config.batch_size={batch_size} is not divisible by the {n} batch shards of the mesh ({axes})"
    )


# --------------------------------------------------------------------------- rules


def match_partition_rules(params: Any, rules: Rules, *, where: str = "partition rules") -> Any:
  """The `PartitionSpec` of every leaf of ``params``: the first rule whose regex fullmatches.

  Args:
    params: a parameter pytree (arrays or `jax.ShapeDtypeStruct`s; quantised
      kernels as `qwix.QArray`s).
    rules: ``(regex, PartitionSpec)`` pairs, tried in order.
    where: names the rules in error messages.

  Returns:
    A pytree of ``params``' structure holding PartitionSpecs; a `qwix.QArray`
    becomes one holding its values' and scales' specs (`quantized_specs`).
    A scanned model's stacked leaf (``model/layers/...``, `rmlora_jax.stacking`)
    takes the rule of its layer 0 (``model/layers_0/...``) with an unsplit
    leading layer axis, so the unrolled rules serve both layouts.

  Raises:
    ValueError: a parameter no rule covers (all such paths are listed), or a
      spec with more entries than its parameter has dimensions.
  """
  compiled = [(rx, spec) for rx, (_, spec) in zip(paths_lib.compile_patterns([r for r, _ in rules], where=where), rules)]
  uncovered = []

  def rule_for(path, shape):
    for rx, spec in compiled:
      if rx.fullmatch(path):
        if len(spec) > len(shape):
          raise ValueError(
              f"{where}: rule {rx.pattern!r} gives {path!r} (shape {shape}) "
              f"the spec {spec}, which has more entries than the parameter has dimensions"
          )
        return spec
    return None

  def spec_of(key_path, leaf):
    path, shape = paths_lib.path_str(key_path), tuple(np.shape(leaf))
    layer0 = stacking.layer_path(path, 0)
    if layer0 is not None:
      # A scanned model's stacked leaf: layer 0's rule, the layer axis unsplit.
      spec = rule_for(layer0, shape[1:])
      spec = None if spec is None else P(None, *spec)
    else:
      spec = rule_for(path, shape)
    if spec is None:
      uncovered.append(f"{path} {shape}")
      return P()
    return spec

  def leaf_spec(key_path, leaf):
    if quantize.is_quantized(leaf):
      return quantized_specs(leaf, spec_of(key_path, leaf.qvalue))
    return spec_of(key_path, leaf)

  specs = jax.tree_util.tree_map_with_path(leaf_spec, params, is_leaf=quantize.is_quantized)
  if uncovered:
    raise ValueError(
        f"{where}: no rule covers {len(uncovered)} parameter(s): {', '.join(uncovered[:10])}"
        + (" ..." if len(uncovered) > 10 else "") + "; add a (regex, PartitionSpec) rule for them"
    )
  return specs


def quantized_specs(kernel: Any, spec: P) -> Any:
  """The specs of a `qwix.QArray`'s arrays from its kernel's ``spec``, as a QArray of specs.

  The values take ``spec``; the scales (and zero points) take it without
  the axes along which they have a single entry, so a channel-wise scale
  (1, d_out) is split as d_out is, a block-wise one (d_in / block, d_out)
  as the kernel is (`fit_spec` replicates it along an axis that does not
  divide its length).
  """
  entries = tuple(spec) + (None,) * (len(kernel.shape) - len(spec))

  def follow(x):
    return None if x is None else P(*(e if n > 1 else None for e, n in zip(entries, np.shape(x))))

  return dataclasses.replace(kernel, qvalue=spec, scale=follow(kernel.scale), zero_point=follow(kernel.zero_point))


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` without the mesh axes that do not divide their dimension (replicated there instead)."""
  entries = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    kept, size = [], 1
    for axis in _axes(entry):
      if dim % (size * mesh.shape[axis]) == 0:
        kept.append(axis)
        size *= mesh.shape[axis]
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def named_shardings(tree: Any, specs: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s for ``tree``'s leaves from ``specs``, fitted to their shapes (see `fit_spec`)."""
  dropped = []

  def one(key_path, leaf, spec):
    fitted = fit_spec(spec, np.shape(leaf), mesh)
    if sum(len(_axes(e)) for e in fitted) < sum(len(_axes(e)) for e in spec):
      dropped.append(f"{paths_lib.path_str(key_path)} {tuple(np.shape(leaf))}: {spec} -> {fitted}")
    return NamedSharding(mesh, fitted)

  out = jax.tree_util.tree_map_with_path(one, tree, specs)
  if dropped:
    logging.info("partitioning: axes that do not divide a dimension were replicated: %s", "; ".join(dropped))
  return out


def follow_spec(path: str, shape: Sequence[int], param_specs: Mapping[str, P],
                param_shapes: Mapping[str, tuple[int, ...]]) -> P | None:
  """The spec of a leaf derived from a parameter, or None when it derives from none.

  A leaf follows parameter ``w`` when a suffix of its path (whole "/"-parts)
  is ``w``'s path and its shape is ``w``'s (a head copy, a full fine-tuning
  param, Adam's moments of either), or when the suffix is ``w``'s path plus
  an adapter factor name of `FACTOR_LAYOUTS` with matching d_in / d_out (an
  adapter factor or its moments). A factor stacked over a scanned model's
  layers (one more leading axis, at the stacked kernel's path) follows the
  stacked kernel, the layer axis first.
  """
  parts = path.split("/")
  shape = tuple(shape)
  for i in range(len(parts)):
    suffix = "/".join(parts[i:])
    if param_shapes.get(suffix) == shape:
      return param_specs[suffix]
    parent, factor = "/".join(parts[i:-1]), parts[-1]
    layout = FACTOR_LAYOUTS.get(factor)
    if parent not in param_shapes or layout is None:
      continue
    kernel, spec, lead, own = param_shapes[parent], tuple(param_specs[parent]), (), shape
    if len(kernel) == 3 and len(own) == len(layout) + 1 and own[0] == kernel[0]:  # stacked over layers
      spec = spec + (None,) * (3 - len(spec))
      kernel, spec, lead, own = kernel[1:], spec[1:], spec[:1], own[1:]
    if len(layout) == len(own) and len(kernel) == 2:
      base = spec + (None,) * (2 - len(spec))
      dims = {"in": (kernel[0], base[0]), "out": (kernel[1], base[1])}
      if all(role is None or dims[role][0] == n for role, n in zip(layout, own)):
        return P(*lead, *(None if role is None else dims[role][1] for role in layout))
  return None


def follow_specs(tree: Any, params: Any, param_specs: Any, *, where: str) -> Any:
  """PartitionSpecs for a trainable tree derived from ``params`` (adapters, a head, full_ft's copy).

  It goes by names and shapes (an adapter's factors by `FACTOR_LAYOUTS`); an
  optimizer state follows the trainable tree through `optimizer_shardings`,
  which asks optax which parts of the state mirror it.

  Args:
    tree: the derived pytree (arrays or `jax.ShapeDtypeStruct`s).
    params: the parameter pytree ``param_specs`` was matched on.
    param_specs: `match_partition_rules(params, ...)`.
    where: names the tree in error messages.

  Raises:
    ValueError: a leaf that follows no parameter.
  """
  # A quantised kernel counts as its kernel: its path, its shape, its values' spec.
  specs = {p: s.qvalue if quantize.is_quantized(s) else s for p, s in quantize.flatten_kernels(param_specs).items()}
  shapes = {p: tuple(np.shape(x)) for p, x in quantize.flatten_kernels(params).items()}
  # Per-layer adapters of a scanned model sit at its layers' paths: each layer of a stack counts as a
  # parameter (adapters stored stacked follow the stacked kernel, in `follow_spec`).
  for path, shape in list(shapes.items()):
    for layer in stacking.layer_paths(path, shape):
      specs[layer], shapes[layer] = P(*tuple(specs[path])[1:]), shape[1:]
  orphans = []

  def one(key_path, leaf):
    path = paths_lib.path_str(key_path)
    spec = follow_spec(path, np.shape(leaf), specs, shapes)
    if spec is None:
      orphans.append(f"{path} {tuple(np.shape(leaf))}")
      return P()
    return spec

  out = jax.tree_util.tree_map_with_path(one, tree)
  if orphans:
    raise ValueError(
        f"{where}: {len(orphans)} leaf/leaves follow no parameter: {', '.join(orphans[:10])}; "
        f"adapter factors must be named in partitioning.FACTOR_LAYOUTS"
    )
  return out


def optimizer_shardings(
    tx: optax.GradientTransformation, abstract_trainable: Any, trainable_shardings: Any, mesh: Mesh
) -> Any:
  """Shardings of ``tx``'s state: each copy of a parameter follows it, the rest is replicated.

  `optax.tree_map_params` finds the parts of the state that ``tx.init``
  builds from the parameter tree (Adam's moments, the pruning statistics of
  `rmlora_jax.budget`); each of their leaves takes its parameter's sharding
  when it has that parameter's shape. Every other leaf (step counts,
  schedule states, a parameter-shaped leaf of another shape such as
  Adafactor's factored moments) is replicated. `optax.MaskedNode`s (the parts
  `optax.masked` and `optax.partition` leave out) are kept, so the result has
  the state's exact structure.

  The transforms in ``tx`` must accept a tree without leaves in ``init``
  (`optax.tree_map_params` calls it on a placeholder).

  Args:
    tx: the optimizer.
    abstract_trainable: the trainable tree (arrays or `jax.ShapeDtypeStruct`s).
    trainable_shardings: its shardings, a tree of the same structure.
    mesh: the mesh of the replicated leaves.

  Returns:
    A tree of `NamedSharding`s of the structure of ``tx.init(abstract_trainable)``.

  Raises:
    ValueError: ``trainable_shardings`` does not have the trainable tree's
      structure, or a transform's ``init`` rejects the placeholder.

  Example::

    opt_shardings = optimizer_shardings(tx, abstract.trainable, trainable_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  """
  want, got = jax.tree.structure(abstract_trainable), jax.tree.structure(trainable_shardings)
  if want != got:
    raise ValueError(
        f"optimizer_shardings: trainable_shardings must have the trainable tree's structure "
        f"{want}, got {got}"
    )
  rep = replicated(mesh)

  def follow(leaf, param, sharding):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    return sharding if np.shape(leaf) == np.shape(param) else rep

  state = jax.eval_shape(tx.init, abstract_trainable)
  try:
    return optax.tree_map_params(tx, follow, state, abstract_trainable, trainable_shardings,
                                 transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  except ValueError as e:
    raise ValueError(
        f"optimizer_shardings: optax.tree_map_params could not find the parameter-shaped parts of the "
        f"optimizer state ({e}); every transform's init must accept a tree without leaves and build "
        f"its parameter-shaped state by mapping over the tree it is given"
    ) from e


# --------------------------------------------------------------------------- placement


def put_sharded(tree: Any, shardings: Any) -> Any:
  """Places host values onto ``shardings``, each device receiving only its own slice.

  Works across processes: every process passes the same host values and
  transfers only the slices of its own devices.
  """
  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def host_device() -> jax.Device:
  """This process's first CPU device: where checkpoints are read before being sharded."""
  return jax.local_devices(backend="cpu")[0]


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A global batch (the same numpy dict on every process) as arrays split over the data axes.

  Each process hands over only the rows its own devices hold, through
  `jax.make_array_from_process_local_data`.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    rows = process_rows(sharding, v.shape)
    out[k] = jax.make_array_from_process_local_data(sharding, v[rows], v.shape)
  return out


def process_rows(sharding: NamedSharding, shape: Sequence[int]) -> slice:
  """The rows of a batch-sharded array of ``shape`` that this process's devices hold."""
  index = sharding.addressable_devices_indices_map(tuple(shape))
  spans = [s[0].indices(shape[0])[:2] for s in index.values()]
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  covered = set().union(*(range(a, b) for a, b in spans))
  assert len(covered) == stop - start, f"this process's rows are not contiguous: {sorted(spans)}"
  return slice(start, stop)


def gather(tree: Any) -> Any:
  """Numpy copies of (possibly sharded, multi-process) arrays, whole on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)
