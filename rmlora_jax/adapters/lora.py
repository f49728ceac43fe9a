"""The LoRA family: adapters as plain pytrees, and LoRA, R-, GM- and RM-LoRA as methods.

An adapter for a frozen kernel ``W0`` of a Flax ``Dense`` layer (shape
``(d_in, d_out)``) is the dict ``{"a": (rank, d_in), "b": (d_out, rank)}``,
the layout of the paper and of PEFT. Its update, in the paper's orientation,
is ``dW = (alpha / rank) * b @ a`` with shape ``(d_out, d_in)``; the merged
Flax kernel is ``W0 + dW.T``.

A whole model's adapters are one flat dict from the adapted leaf's "/"-path to
its adapter, e.g. ``{"encoder/layer_0/attention/query/kernel": {"a": ..., "b": ...}}``.
Other adapter families (AdaLoRA, SoRA, LoRA²) use the same flat dict with
their own factor names; this module's `merge`, `attach` and `delta_weights`
take LoRA adapters, `rmlora_jax.merge` and the rest (`adapters.registry`)
those of every family. ``FAMILY`` describes the family.

The methods (`build`): LoRA trains the adapters and the head; R-LoRA adds the
orthogonality penalty (`rmlora_jax.penalty`) to the loss, GM-LoRA masks all
but r_hat random directions of each adapter per step
(`rmlora_jax.masking`), RM-LoRA does both. `adapter_method` is the shared
frame the other families (AdaLoRA, SoRA, LoRA²) build theirs on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import masking
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty as penalty_lib
from rmlora_jax import quantize
from rmlora_jax import stacking
from rmlora_jax.adapters import base
from rmlora_jax.adapters import family as family_lib

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
  # A scanned model's stacked kernels are matched, and adapted, layer by layer.
  flat = stacking.layer_view(paths_lib.flatten_with_paths(params))
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


def delta_weights(adapters: Adapters, spec: LoraSpec) -> dict[str, Array]:
  """The weight updates ``dW = (alpha / rank) * b @ a`` of LoRA adapters, each (d_out, d_in).

  `rmlora_jax.delta_weights` takes the adapters of every family.
  """
  return family_lib.delta_weights(adapters, spec, (FAMILY,))


def delta_factors(adapters: Adapters, spec: LoraSpec) -> dict[str, tuple[Array, Array]]:
  """Each LoRA update as ``(left, right) = (scale * b, a)``; `rmlora_jax.delta_factors` takes every family."""
  return family_lib.delta_factors(adapters, spec, (FAMILY,))


def merge(params: Any, adapters: Adapters, spec: LoraSpec) -> Any:
  """``params`` with each kernel adapted by LoRA replaced by ``W0 + dW.T``.

  Pure, jittable and differentiable with respect to ``adapters``;
  `rmlora_jax.merge` takes the adapters of every family.

  Raises:
    ValueError: an adapter that is not LoRA's, names a path that is not in
      ``params``, or whose update does not fit the kernel there.
  """
  return family_lib.merge(params, adapters, spec, (FAMILY,))


def attach(params: Any, adapters: Adapters, spec: LoraSpec) -> Any:
  """Like `merge`, but leaves each adapted kernel as a `LowRankKernel`; `rmlora_jax.attach` takes every family."""
  return family_lib.attach(params, adapters, spec, (FAMILY,))


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


def stack_lengths(params: Any) -> dict[str, int]:
  """``{stacked kernel path: layer count}`` of a scanned model's ``params`` (a quantised kernel counts as its kernel)."""
  return {path: int(np.shape(leaf)[0]) for path, leaf in quantize.flatten_kernels(params).items()
          if len(np.shape(leaf)) == 3 and stacking.is_stacked_path(path)}


def adapter_method(
    settings: base.MethodSettings,
    *,
    family: family_lib.Family,
    init_adapters: Callable[[Array, Any, Any], Adapters],
    penalty: Callable[[Adapters], Array] | None = None,
    optimizer: Callable[[Any], optax.GradientTransformation] | None = None,
    ranks: Callable[[Adapters], Mapping[str, int]] | None = None,
    stack_layers: bool = False,
) -> base.Method:
  """A method that trains ``{"adapters": ..., "head": ...}`` over frozen weights.

  Args:
    settings: the method's settings; ``settings.spec`` places the adapters.
    family: the adapters' family (how they merge into the kernels).
    init_adapters: ``(key, params, spec) -> adapters`` of the family.
    penalty: ``adapters -> scalar`` added to the loss; None: none.
    optimizer: ``learning_rate -> GradientTransformation``; None: clipping
      and AdamW from ``settings``.
    ranks: ``adapters -> {path: rank now}``; None: every adapter at
      ``settings.spec.rank``.
    stack_layers: on a scanned model, keep the adapters of each stacked
      kernel's layers as one adapter stacked over the layers
      (`stacking.stack_adapters`), which ``penalty`` and ``optimizer`` must
      accept; ``Method.adapters`` still gives them per layer.
  """
  s = settings
  if s.spec is None:
    raise ValueError(f"method {s.name!r} needs an adapter spec (MethodSettings.spec)")
  spec = s.spec
  combine = family_lib.attach if s.adapter_apply == "low_rank" else family_lib.merge

  def init(key, params):
    flat = paths_lib.flatten_with_paths(params)
    head = {p: flat[p] for p in base.head_paths(params, s.train_patterns)}
    adapters = init_adapters(key, params, spec)
    if stack_layers:
      adapters = stacking.stack_adapters(adapters, stack_lengths(params))
    return {"adapters": adapters, "head": head}

  per_layer = stacking.unstack_adapters if stack_layers else (lambda adapters: adapters)

  def assemble(trainable, frozen):
    return combine(base.with_head(frozen, trainable["head"]), trainable["adapters"], spec, (family,))

  full_rank = getattr(spec, "rank", None)
  return base.Method(
      settings=s,
      init=init,
      assemble=assemble,
      penalty=base.no_penalty if penalty is None else (lambda trainable: penalty(trainable["adapters"])),
      optimizer=optimizer or (lambda lr: base.settings_optimizer(s, lr)),
      frozen=lambda params: params,
      adapters=lambda trainable: per_layer(trainable["adapters"]),
      ranks=(lambda trainable: ranks(per_layer(trainable["adapters"]))) if ranks else
      (lambda trainable: {p: full_rank for p in per_layer(trainable["adapters"])}),
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

  # On a scanned model, one adapter per matrix kind, stacked over the layers:
  # the masks and the penalty are drawn and taken per layer all the same.
  return adapter_method(s, family=FAMILY, init_adapters=init_lora, penalty=penalty, optimizer=optimizer,
                        stack_layers=True)


def _counts(ad: Adapter) -> tuple[int, int]:
  *layers, r, d_in = ad["a"].shape  # (layers, r, d_in) when stacked over a scanned model's layers
  n = math.prod(layers) * r * (d_in + ad["b"].shape[-2])
  return n, n


FAMILY = family_lib.Family(
    name="lora", factors=frozenset({"a", "b"}), product=lambda ad: ad["b"] @ ad["a"],
    factored=lambda ad: (ad["b"], ad["a"]), counts=_counts, options=RmOptions, config_section="rm",
    peft_type="LORA",
    methods={"lora": functools.partial(build, ortho=False, mask=False),
             "r_lora": functools.partial(build, ortho=True, mask=False),
             "gm_lora": functools.partial(build, ortho=False, mask=True),
             "rm_lora": functools.partial(build, ortho=True, mask=True)},
)

