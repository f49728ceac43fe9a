"""The LoRA family: adapters as plain pytrees, and LoRA, R-, GM- and RM-LoRA as methods.

An adapter for a frozen kernel ``W0`` of a Flax ``Dense`` layer (shape
``(d_in, d_out)``) is the dict ``{"a": (rank, d_in), "b": (d_out, rank)}``,
the layout of the paper and of PEFT. Its update, in the paper's orientation,
is ``dW = (alpha / rank) * b @ a`` with shape ``(d_out, d_in)``; the merged
Flax kernel is ``W0 + dW.T``.

A whole model's adapters are one flat dict from the adapted leaf's "/"-path to
its adapter, e.g. ``{"encoder/layer_0/attention/query/kernel": {"a": ..., "b": ...}}``.
Other adapter families (AdaLoRA, SoRA, LoRA²) use the same flat dict with
their own factor names; `delta_weights` and `merge` understand all of them
through `adapter_product`.

The methods (`build`): LoRA trains the adapters and the head; R-LoRA adds the
orthogonality penalty (`rmlora_jax.penalty`) to the loss, GM-LoRA masks all
but r_hat random directions of each adapter per step
(`rmlora_jax.masking`), RM-LoRA does both. `adapter_method` is the shared
frame the other families (AdaLoRA, SoRA, LoRA²) build theirs on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmlora_jax import masking
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty as penalty_lib
from rmlora_jax.adapters import base
from rmlora_jax.low_rank import LowRankKernel

Array = jax.Array
Adapter = Mapping[str, Array]
Adapters = Mapping[str, Adapter]


# The ways `init_lora` can draw the factor `a`.
A_INITS = ("gaussian", "kaiming_uniform")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
  """Where LoRA adapters go and how large they are.

  Registered as a static pytree node, so a spec may be passed straight into
  `jax.jit`-compiled functions.

  Example::

    spec = LoraSpec(rank=8, alpha=16.0, targets=(r".*/(query|value)/kernel",))
  """

  # Inner dimension R of b @ a; the most directions dW can span.
  rank: int
  # The update is scaled by alpha / rank, so alpha sets its size independently of rank.
  alpha: float
  # Regexes; a leaf is adapted when one of them re.fullmatch-es its "/"-path.
  targets: tuple[str, ...]
  # Standard deviation of the Gaussian that initialises `a` (b starts at zero).
  init_std: float = 0.02
  # How `a` is drawn: "gaussian", N(0, init_std^2) (the RM-LoRA paper's); or
  # "kaiming_uniform", U(-1/sqrt(d_in), 1/sqrt(d_in)), PyTorch's default for a
  # Linear layer and PEFT's for lora_A (init_std is then unused).
  init: str = "gaussian"

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraSpec.rank must be a positive integer, got {self.rank!r}")
    if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
      raise ValueError(f"LoraSpec.alpha must be a finite number, got {self.alpha!r}")
    if isinstance(self.targets, str):
      raise ValueError(
          f"LoraSpec.targets must be a tuple of regexes, got the string {self.targets!r}; "
          f"write ({self.targets!r},)"
      )
    targets = tuple(self.targets)
    if not targets:
      raise ValueError("LoraSpec.targets is empty: name at least one regex")
    paths_lib.compile_patterns(targets, where="LoraSpec.targets")
    object.__setattr__(self, "targets", targets)
    if not isinstance(self.init_std, (int, float)) or not self.init_std >= 0:
      raise ValueError(f"LoraSpec.init_std must be >= 0, got {self.init_std!r}")
    if self.init not in A_INITS:
      raise ValueError(f"LoraSpec.init must be one of {A_INITS}, got {self.init!r}")

  @property
  def scale(self) -> float:
    """The factor alpha / rank applied to every update."""
    return self.alpha / self.rank


def select_targets(
    params: Any, spec: LoraSpec, *, where: str = "LoraSpec.targets"
) -> dict[str, Any]:
  """The leaves of ``params`` that ``spec`` adapts, checked for shape.

  Args:
    params: a parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
    spec: the adapter specification.
    where: the setting named in error messages.

  Returns:
    ``{path: leaf}`` for each selected leaf, in tree order.

  Raises:
    ValueError: a pattern matches nothing, a selected leaf is not 2-D, or the
      rank exceeds ``min(d_in, d_out)`` of a selected leaf.
  """
  flat = paths_lib.flatten_with_paths(params)
  selected = paths_lib.match_paths(flat, spec.targets, where=where)
  out = {}
  for path in selected:
    leaf = flat[path]
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) != 2:
      raise ValueError(
          f"{where} selects {path!r} with shape {shape}, but only 2-D kernels "
          f"(d_in, d_out) can be adapted; narrow the pattern"
      )
    if spec.rank > min(shape):
      raise ValueError(
          f"LoraSpec.rank={spec.rank} exceeds min(d_in, d_out)={min(shape)} of "
          f"{path!r} (shape {shape})"
      )
    out[path] = leaf
  return out


def adapter_dtype(leaf: Any) -> jnp.dtype:
  """Adapters are kept in at least float32, even over bfloat16 weights."""
  return jnp.promote_types(leaf.dtype, jnp.float32)


def init_lora(key: Array, params: Any, spec: LoraSpec) -> dict[str, dict[str, Array]]:
  """Creates LoRA adapters for every leaf of ``params`` that ``spec`` targets.

  Args:
    key: a PRNG key; each adapter gets ``fold_in(key, hash(path))``, so adding
      a target does not change the others' initial values.
    params: the frozen parameter pytree (Flax ``Dense`` kernels are (d_in, d_out)).
    spec: the adapter specification.

  Returns:
    ``{path: {"a": (rank, d_in), "b": zeros (d_out, rank)}}``, ``a`` drawn as
    ``spec.init`` says: N(0, init_std^2), or U(-1/sqrt(d_in), 1/sqrt(d_in)).

  Example::

    adapters = init_lora(jax.random.key(0), params, spec)
  """
  adapters = {}
  for path, leaf in select_targets(params, spec).items():
    d_in, d_out = leaf.shape
    dtype = adapter_dtype(leaf)
    k = jax.random.fold_in(key, paths_lib.path_hash(path))
    if spec.init == "kaiming_uniform":
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(k, (spec.rank, d_in), dtype, -bound, bound)
    else:
      a = spec.init_std * jax.random.normal(k, (spec.rank, d_in), dtype)
    adapters[path] = {
        "a": a,
        "b": jnp.zeros((d_out, spec.rank), dtype),
    }
  return adapters


# Each adapter family registers how its factors multiply into an unscaled
# (d_out, d_in) update, keyed by its exact set of factor names, and how to
# write that update as left (d_out, r') @ right (r', d_in) for `attach`.
_PRODUCTS: dict[frozenset[str], Callable[[Adapter], Array]] = {}
_FACTORS: dict[frozenset[str], Callable[[Adapter], tuple[Array, Array]]] = {}


def register_adapter_kind(
    names: frozenset[str] | set[str],
    product: Callable[[Adapter], Array],
    factors: Callable[[Adapter], tuple[Array, Array]] | None = None,
) -> None:
  """Teaches `delta_weights`, `merge` and `attach` a new adapter family.

  Args:
    names: the exact keys of the family's adapter dicts, e.g. ``{"a", "b"}``.
    product: maps one adapter to its unscaled update of shape (d_out, d_in).
    factors: maps one adapter to ``(left, right)`` of shapes (d_out, r') and
      (r', d_in) with ``left @ right == product(adapter)`` and r' small; by
      default ``(product(adapter), identity)``, which `attach` then merges.
  """
  _PRODUCTS[frozenset(names)] = product
  if factors is not None:
    _FACTORS[frozenset(names)] = factors


def adapter_product(adapter: Adapter, *, path: str = "<adapter>") -> Array:
  """The unscaled update (d_out, d_in) of one adapter of any registered family."""
  names = frozenset(adapter)
  if names not in _PRODUCTS:
    known = ", ".join(sorted("{" + ", ".join(sorted(k)) + "}" for k in _PRODUCTS))
    raise ValueError(
        f"adapter at {path!r} has factors {sorted(names)}, which match no known "
        f"adapter family ({known})"
    )
  return _PRODUCTS[names](adapter)


register_adapter_kind({"a", "b"}, lambda ad: ad["b"] @ ad["a"], lambda ad: (ad["b"], ad["a"]))


def delta_weights(adapters: Adapters, spec: LoraSpec) -> dict[str, Array]:
  """The weight updates ``dW = (alpha / rank) * b @ a``, each (d_out, d_in).

  Works for every registered adapter family (LoRA, AdaLoRA, SoRA, LoRA²).
  """
  return {
      path: spec.scale * adapter_product(ad, path=path) for path, ad in adapters.items()
  }


def delta_factors(adapters: Adapters, spec: LoraSpec) -> dict[str, Array | tuple[Array, Array]]:
  """Each update as ``(left, right)`` with ``dW = left @ right`` (the scale in ``left``).

  What `rmlora_jax.delta_report` measures without forming dW; the same
  updates as `delta_weights`. A family registered without factors gives
  its dense dW instead.
  """
  out = {}
  for path, ad in adapters.items():
    factors = _FACTORS.get(frozenset(ad))
    if factors is None:
      out[path] = spec.scale * adapter_product(ad, path=path)
    else:
      left, right = factors(ad)
      out[path] = (spec.scale * left, right)
  return out


def _check_fits(flat: Mapping[str, Any], path: str, update_shape: tuple[int, ...], *, where: str) -> None:
  """Raises ValueError unless an update (d_out, d_in) fits the kernel at ``path``."""
  if path not in flat:
    raise ValueError(
        f"{where}: adapter path {path!r} is not a parameter path; adapters must "
        f"come from init_* on the same parameter tree"
    )
  w_shape = tuple(flat[path].shape)
  if w_shape != update_shape[::-1]:
    raise ValueError(
        f"{where}: adapter at {path!r} gives an update of shape (d_out, d_in)="
        f"{update_shape}, which does not fit the kernel of shape {w_shape}"
    )


def merge(params: Any, adapters: Adapters, spec: LoraSpec) -> Any:
  """Returns ``params`` with each adapted kernel replaced by ``W0 + dW.T``.

  Pure, jittable and differentiable with respect to ``adapters``; leaves
  without an adapter are returned as they are (same objects).

  Raises:
    ValueError: an adapter names a path that is not in ``params``, or its
      update's shape does not fit the kernel there.
  """
  deltas = delta_weights(adapters, spec)
  flat = paths_lib.flatten_with_paths(params)
  for path, d in deltas.items():
    _check_fits(flat, path, tuple(d.shape), where="merge")

  def merge_leaf(key_path, w):
    path = paths_lib.path_str(key_path)
    if path not in deltas:
      return w
    return (w + deltas[path].T).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(merge_leaf, params)


def attach(params: Any, adapters: Adapters, spec: LoraSpec) -> Any:
  """Like `merge`, but leaves each adapted kernel as a `LowRankKernel`.

  The forward pass of a model whose Dense layers use `dense_apply` is then
  numerically equal to its forward on ``merge(params, adapters, spec)`` (up
  to float rounding) and cheaper to differentiate. Families registered
  without factors are merged into a plain kernel here.

  Raises:
    ValueError: as `merge`.
  """
  flat = paths_lib.flatten_with_paths(params)
  kernels = {}
  for path, ad in adapters.items():
    factors = _FACTORS.get(frozenset(ad))
    if factors is not None:
      left, right = factors(ad)
      _check_fits(flat, path, (left.shape[0], right.shape[-1]), where="attach")
      kernels[path] = LowRankKernel(flat[path], spec.scale * left, right)
  merged = merge(params, {p: ad for p, ad in adapters.items() if p not in kernels}, spec)

  def leaf(key_path, w):
    return kernels.get(paths_lib.path_str(key_path), w)

  return jax.tree_util.tree_map_with_path(leaf, merged)


MASK_MODES = ("update", "gradient")
# How GM/RM-LoRA draw the directions of a's rows and b's columns: one shared
# set (the paper; the authors' ``--lora_type v1``) or two independent sets (``v2``).
MASK_SETS = ("shared", "independent")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RmOptions:
  """R-, GM- and RM-LoRA's settings (plain LoRA ignores them).

  The penalty's defaults are the RM-LoRA authors' code: plain Frobenius
  norms averaged over matrices; the paper's Eq. 10 is ``ortho_squared=True,
  ortho_reduction="sum"``. The masking defaults are the paper's Algorithm 1
  (unselected directions do not move); the authors' training loop is
  ``mask_mode="gradient", mask_start_step=1, mask_sets="independent"`` (the
  ``preset=authors`` of the configs), and ``emulate_frozen_head=True`` adds
  its zero gradient for the head.
  """

  # r_hat: directions updated per step and adapter (GM, RM); 1..rank.
  num_directions: int = 4
  # Weight of the orthogonality penalty (R, RM).
  ortho_weight: float = 0.1
  # Squared Frobenius norm (the paper) or plain (the authors' code).
  ortho_squared: bool = False
  # "sum" (the paper) or "mean" over terms (the authors' code).
  ortho_reduction: str = "mean"
  # "update": mask before and after the optimizer (unselected directions do
  # not move); "gradient": mask the gradient only, as the authors' code does.
  mask_mode: str = "update"
  # Steps between fresh direction draws.
  mask_period: int = 1
  # Optimizer steps before masking starts, all directions updated until then
  # (the authors' code: 1, it masks once global_step > 0).
  mask_start_step: int = 0
  # "shared": one index set for a's rows and b's columns; "independent": two
  # (the authors' --lora_type v1 and v2).
  mask_sets: str = "shared"
  # The authors' code zeroes the gradient of every trainable parameter that
  # is not a LoRA factor once masking starts, so the head moves only by
  # Adam's leftover momentum (an accident of their code, which the paper's
  # GM/RM rows ran with). True reproduces it, for every LoRA-family method
  # (LoRA and R-LoRA then update all directions, with the head zeroed alike).
  emulate_frozen_head: bool = False

  def __post_init__(self):
    if self.mask_mode not in MASK_MODES:
      raise ValueError(f"RmOptions.mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
    if self.mask_sets not in MASK_SETS:
      raise ValueError(f"RmOptions.mask_sets must be one of {MASK_SETS}, got {self.mask_sets!r}")
    if (isinstance(self.mask_start_step, bool) or not isinstance(self.mask_start_step, int)
        or self.mask_start_step < 0):
      raise ValueError(f"RmOptions.mask_start_step must be a non-negative integer, got {self.mask_start_step!r}")
    if not isinstance(self.emulate_frozen_head, bool):
      raise ValueError(f"RmOptions.emulate_frozen_head must be True or False, got {self.emulate_frozen_head!r}")
    penalty_lib.check_reduction(self.ortho_reduction, where="RmOptions.ortho_reduction")
    if not self.ortho_weight >= 0:
      raise ValueError(f"RmOptions.ortho_weight must be >= 0, got {self.ortho_weight!r}")
    if isinstance(self.mask_period, bool) or not isinstance(self.mask_period, int) or self.mask_period < 1:
      raise ValueError(f"RmOptions.mask_period must be a positive integer, got {self.mask_period!r}")


def adapter_method(
    settings: base.MethodSettings,
    *,
    init_adapters: Callable[[Array, Any, Any], Adapters],
    penalty: Callable[[Adapters], Array] | None = None,
    optimizer: Callable[[Any], optax.GradientTransformation] | None = None,
    ranks: Callable[[Adapters], Mapping[str, int]] | None = None,
) -> base.Method:
  """A method that trains ``{"adapters": ..., "head": ...}`` over frozen weights.

  Args:
    settings: the method's settings; ``settings.spec`` places the adapters.
    init_adapters: ``(key, params, spec) -> adapters`` of the family.
    penalty: ``adapters -> scalar`` added to the loss; None: none.
    optimizer: ``learning_rate -> GradientTransformation``; None: clipping
      and AdamW from ``settings``.
    ranks: ``adapters -> {path: rank now}``; None: every adapter at
      ``settings.spec.rank``.
  """
  s = settings
  if s.spec is None:
    raise ValueError(f"method {s.name!r} needs an adapter spec (MethodSettings.spec)")
  spec = s.spec
  combine = attach if s.adapter_apply == "low_rank" else merge

  def init(key, params):
    flat = paths_lib.flatten_with_paths(params)
    head = {p: flat[p] for p in base.head_paths(params, s.train_patterns)}
    return {"adapters": init_adapters(key, params, spec), "head": head}

  def assemble(trainable, frozen):
    return combine(base.with_head(frozen, trainable["head"]), trainable["adapters"], spec)

  full_rank = getattr(spec, "rank", None)
  return base.Method(
      settings=s,
      init=init,
      assemble=assemble,
      penalty=base.no_penalty if penalty is None else (lambda trainable: penalty(trainable["adapters"])),
      optimizer=optimizer or (lambda lr: base.settings_optimizer(s, lr)),
      frozen=lambda params: params,
      adapters=lambda trainable: trainable["adapters"],
      ranks=(lambda trainable: ranks(trainable["adapters"])) if ranks else
      (lambda trainable: {p: full_rank for p in trainable["adapters"]}),
  )


def build(settings: base.MethodSettings, *, ortho: bool, mask: bool) -> base.Method:
  """LoRA (neither), R-LoRA (``ortho``), GM-LoRA (``mask``) or RM-LoRA (both).

  R adds ``ortho_weight * ortho_penalty`` to the loss; GM draws r_hat
  directions per adapter and step and masks the clipped gradient before
  AdamW (and, with ``mask_mode="update"``, the update after it).
  ``emulate_frozen_head`` zeroes the head's clipped gradient from
  ``mask_start_step`` on, for all four (LoRA and R-LoRA keep every direction).
  """
  s = settings
  opts = s.with_options(RmOptions, method=s.name)
  if mask and not 1 <= opts.num_directions <= s.spec.rank:
    raise ValueError(f"RmOptions.num_directions={opts.num_directions} must be in 1..rank={s.spec.rank} "
                     f"for method {s.name!r}")
  penalty = None
  if ortho and opts.ortho_weight > 0:
    penalty = lambda ads: opts.ortho_weight * penalty_lib.ortho_penalty(
        ads, squared=opts.ortho_squared, reduction=opts.ortho_reduction)

  def optimizer(lr):
    if not (mask or opts.emulate_frozen_head):
      return base.settings_optimizer(s, lr)
    directions = lambda: masking.random_direction_mask(
        opts.num_directions if mask else s.spec.rank, seed=s.seed, period=opts.mask_period,
        start_step=opts.mask_start_step, independent=opts.mask_sets == "independent",
        zero_others=opts.emulate_frozen_head)
    tx = base.settings_optimizer(s, lr, between=(directions(),))  # clip, mask, AdamW
    return optax.chain(tx, directions()) if mask and opts.mask_mode == "update" else tx

  return adapter_method(s, init_adapters=init_lora, penalty=penalty, optimizer=optimizer)

