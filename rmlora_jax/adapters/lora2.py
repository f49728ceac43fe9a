"""LoRA² (Zhang, Xiong et al. 2024): two LoRA planes around a pruned diagonal.

An adapter for a kernel of shape (d_in, d_out) is
``{"U": (d_out, k), "u": (k, r), "lam": (r,), "v": (r, k), "V": (k, d_in)}``
with ``dW = (alpha / r) * (U u) diag(lam) (v V)`` (the authors' code scales by
alpha / r). ``P = U u`` and ``Q = v V`` play AdaLoRA's ``p`` and ``q``. The
penalty `lora2_penalty` pushes the pairs (U, V), (u, v) and (P, Q) towards
orthogonality; `lora2_pruning` prunes ``lam`` under AdaLoRA's budget with a
cheaper score that reads only ``lam``, ``u`` and ``v`` (the large U and V are
skipped, the paper's ~98.5% saving).

Example::

  spec = Lora2Spec(k=16, r=8, alpha=8.0, targets=(r".*/kernel",))
  adapters = init_lora2(jax.random.key(0), params, spec)
  tx = lora2_pruning(optax.adamw(1e-3), BudgetSchedule(initial_rank=8, ...))
  loss = task_loss + 0.1 * lora2_penalty(adapters)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import budget as budget_lib
from rmlora_jax.adapters import adalora
from rmlora_jax.adapters import base
from rmlora_jax.adapters import family as family_lib
from rmlora_jax.adapters import lora
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty

Array = jax.Array

LORA2_FACTORS = frozenset({"U", "u", "lam", "v", "V"})
LORA2 = budget_lib.TripletFamily(name="LoRA²", factors=LORA2_FACTORS, rank_axes={"u": 1, "v": 0})
# The penalty's factor pairs (paper Section 3.1); its ablation (Table 3) drops some.
LORA2_PENALTY_TERMS = ("UV", "uv", "PQ")



@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class Lora2Spec:
  """Where LoRA² adapters go and how large they are.

  Usable wherever `delta_weights` and `merge` take a spec (it has ``scale``).

  Example::

    spec = Lora2Spec(k=16, r=8, alpha=8.0, targets=(r".*/(query|value)/kernel",))
  """

  # Width of the outer plane: U is (d_out, k), V is (k, d_in); 1..min(d_in, d_out).
  k: int
  # Number of singular values lam (the prunable rank); u is (k, r), v is (r, k).
  # r may exceed k: the paper's headline setting is k = 1, r = 8 (k d + r (2k + 1)
  # parameters per matrix), where dW's rank is at most k and lam still weighs
  # r directions of the inner plane.
  r: int
  # The update is scaled by alpha / r.
  alpha: float
  # Regexes; a leaf is adapted when one of them re.fullmatch-es its "/"-path.
  targets: tuple[str, ...]
  # Standard deviation of the Gaussians that initialise U, u, v and V (lam starts at 0).
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("k", "r"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"Lora2Spec.{name} must be a positive integer, got {v!r}")
    try:
      base = self.as_lora_spec()
    except ValueError as e:
      raise ValueError(str(e).replace("LoraSpec.", "Lora2Spec.")) from None
    object.__setattr__(self, "targets", base.targets)

  def as_lora_spec(self) -> lora.LoraSpec:
    """The equivalent `LoraSpec` over the inner rank r (same targets, scale)."""
    return lora.LoraSpec(rank=self.r, alpha=self.alpha, targets=self.targets, init_std=self.init_std)

  @property
  def scale(self) -> float:
    """The factor alpha / r applied to every update."""
    return self.alpha / self.r

  @property
  def rank(self) -> int:
    """The rank pruning starts from (r), as `LoraSpec.rank` is LoRA's."""
    return self.r


def init_lora2(key: Array, params: Any, spec: Lora2Spec) -> dict[str, dict[str, Array]]:
  """Creates LoRA² adapters for every leaf of ``params`` that ``spec`` targets.

  Args:
    key: a PRNG key; adapter ``path`` uses ``fold_in(key, hash(path))``, split
      four ways for U, u, v and V.
    params: the frozen parameter pytree (Flax kernels are (d_in, d_out)).
    spec: the adapter settings.

  Returns:
    ``{path: {"U": (d_out, k), "u": (k, r), "lam": zeros (r,), "v": (r, k),
    "V": (k, d_in)}}``, the matrices ~ N(0, init_std^2).

  Raises:
    ValueError: k exceeds min(d_in, d_out) of a targeted kernel.
  """
  adapters = {}
  for path, leaf in lora.select_targets(params, spec.as_lora_spec(), where="Lora2Spec.targets").items():
    d_in, d_out = leaf.shape
    if spec.k > min(d_in, d_out):
      raise ValueError(
          f"Lora2Spec.k={spec.k} exceeds min(d_in, d_out)={min(d_in, d_out)} of {path!r}"
      )
    dtype = lora.adapter_dtype(leaf)
    keys = jax.random.split(jax.random.fold_in(key, paths_lib.path_hash(path)), 4)
    shapes = {"U": (d_out, spec.k), "u": (spec.k, spec.r), "v": (spec.r, spec.k), "V": (spec.k, d_in)}
    ad = {n: spec.init_std * jax.random.normal(kk, s, dtype) for kk, (n, s) in zip(keys, shapes.items())}
    ad["lam"] = jnp.zeros((spec.r,), dtype)
    adapters[path] = ad
  return adapters


def lora2_penalty(
    adapters: Mapping[str, Mapping[str, Array]],
    *,
    terms: tuple[str, ...] = LORA2_PENALTY_TERMS,
    squared: bool = True,
    reduction: str = "sum",
) -> Array:
  """LoRA²'s orthogonality regularisers ``R(U, V) + R(u, v) + R(P, Q)``.

  ``R(X, Y) = ||X^T X - I||_F^2 + ||Y Y^T - I||_F^2``, Grams over the rank
  dimension, with ``P = U u`` (d_out, r) and ``Q = v V`` (r, d_in).

  Args:
    adapters: ``{path: LoRA² adapter}`` as made by `init_lora2`.
    terms: which pairs to include, a subset of ``("UV", "uv", "PQ")`` (the
      paper's Table 3 ablation switches them).
    squared: squared Frobenius norms (the paper) or plain ones.
    reduction: ``"sum"`` over all matrix terms, or ``"mean"`` over the
      2 x len(terms) x (number of adapters) of them.

  Returns:
    A scalar, differentiable with respect to ``adapters``.
  """
  penalty.check_reduction(reduction)
  terms = tuple(terms)
  for t in terms:
    if t not in LORA2_PENALTY_TERMS:
      raise ValueError(f"lora2_penalty: terms has {t!r}; each must be one of {LORA2_PENALTY_TERMS}")
  out = []
  for path, ad in adapters.items():
    if frozenset(ad) != LORA2_FACTORS:
      raise ValueError(
          f"lora2_penalty: adapter at {path!r} has factors {sorted(ad)}; expected {sorted(LORA2_FACTORS)}"
      )
    pairs = {"UV": (ad["U"], ad["V"]), "uv": (ad["u"], ad["v"])}
    for t in terms:
      if t != "PQ":
        x, y = pairs[t]
        out += [(x, 1), (y, 0)]
  if "PQ" in terms:
    out += _planes(adapters)
  return penalty.gram_deviations(out, squared=squared, reduction=reduction)


def _planes(adapters: Mapping[str, Mapping[str, Array]]) -> list[tuple[Array, int]]:
  """``[(P, 1), (Q, 0)]`` of every adapter, ``P = U u`` and ``Q = v V``, as stacks by shape.

  Adapters whose factors have the same shapes and dtype share one batched
  product: a model's dozens of adapters trace a few matmuls rather than
  two each (less to compile).
  """
  groups: dict[tuple, list[Mapping[str, Array]]] = {}
  for ad in adapters.values():
    key = tuple((n, jnp.shape(ad[n]), jnp.result_type(ad[n])) for n in ("U", "u", "v", "V"))
    groups.setdefault(key, []).append(ad)
  out = []
  for ads in groups.values():
    if jnp.ndim(ads[0]["U"]) == 3 or len(ads) == 1:  # a stack over layers already, or alone
      out += [(x, axis) for ad in ads for x, axis in ((ad["U"] @ ad["u"], 1), (ad["v"] @ ad["V"], 0))]
      continue
    stack = lambda name: jnp.stack([ad[name] for ad in ads])
    out += [(jnp.matmul(stack("U"), stack("u")), 1), (jnp.matmul(stack("v"), stack("V")), 0)]
  return out


def lora2_released_penalty(
    adapters: Mapping[str, Mapping[str, Array]], *, squared: bool = False, reduction: str = "mean"
) -> Array:
  """The orthogonality terms of LoRA²'s released code: k x k Gram matrices of all four factors.

  ``||U^T U - I_k|| + ||u u^T - I_k|| + ||v^T v - I_k|| + ||V V^T - I_k||``
  per adapter (its ``compute_orth_regu``; the (P, Q) product it forms is
  never added). The paper's `lora2_penalty` takes the Grams of ``u`` and
  ``v`` over r instead, (r x r), which at k < r cannot fall below
  ``sqrt(r - k)`` per term: a Gram of rank k has at least r - k unit
  deviations from the identity.

  Args:
    adapters: ``{path: LoRA² adapter}`` as made by `init_lora2`.
    squared: squared Frobenius norms, or plain ones (the released code).
    reduction: ``"mean"`` over the 4 x (number of adapters) terms (the
      released code) or ``"sum"``.
  """
  penalty.check_reduction(reduction)
  out = []
  for path, ad in adapters.items():
    if frozenset(ad) != LORA2_FACTORS:
      raise ValueError(
          f"lora2_released_penalty: adapter at {path!r} has factors {sorted(ad)}; expected {sorted(LORA2_FACTORS)}"
      )
    out += [(ad["U"], 1), (ad["u"], 0), (ad["v"], 1), (ad["V"], 0)]
  return penalty.gram_deviations(out, squared=squared, reduction=reduction)


def lora2_pruning(
    inner: optax.GradientTransformation, schedule: budget_lib.BudgetSchedule
) -> optax.GradientTransformation:
  """LoRA²'s training transform: ``inner`` plus its cheap importance and pruning.

  Triplet i scores ``score(lam_i) + mean_j score(u_ji) + mean_j score(v_ij)``
  (the i-th column of u and row of v; U and V are not scored). Budget,
  phases and pruning are AdaLoRA's (`rmlora_jax.budget.budget_pruning`).

  Args:
    inner: the optimizer that produces the updates.
    schedule: the budget; ``schedule.initial_rank`` must equal ``Lora2Spec.r``.

  Returns:
    An `optax.GradientTransformation`; call ``update(grads, state, params)``.
  """
  return budget_lib.budget_pruning(inner, schedule, LORA2)


def lora2_ranks(adapters: Any) -> dict[str, int]:
  """``{path: number of nonzero lam entries}`` for each LoRA² adapter."""
  return budget_lib.nonzero_ranks(adapters, LORA2_FACTORS, "lam")


LORA2_VARIANTS = ("paper", "released")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lora2Options(adalora.BudgetOptions):
  """LoRA²'s settings: AdaLoRA's budget, the authors' penalty weight; k and r are the spec's.

  ``variant="paper"``: the penalty of the paper's Section 3.1 over (U, V),
  (u, v) and (P, Q), Grams over the rank r (`lora2_penalty`).
  ``variant="released"``: the released code's k x k Grams of U, u, v and V
  (`lora2_released_penalty`); that code fixes k = 8 (``Lora2Spec(k=8, r=8)``
  with ``target_rank=2`` reproduces its GLUE setting).
  """

  # The authors' code: 0.1 (0.3 for RTE and STS-B).
  ortho_weight: float = 0.1
  # "paper" or "released" (the penalty's Gram matrices; see above).
  variant: str = "paper"

  def __post_init__(self):
    super().__post_init__()
    if self.variant not in LORA2_VARIANTS:
      raise ValueError(f"Lora2Options.variant must be one of {LORA2_VARIANTS}, got {self.variant!r}")


def build(settings: base.MethodSettings) -> base.Method:
  """LoRA²: two-plane adapters, the dual orthogonality penalty, cheap-score budget pruning."""
  s = settings
  opts = s.with_options(Lora2Options, method=s.name)
  if not isinstance(s.spec, Lora2Spec):
    raise ValueError(f"method {s.name!r} needs a Lora2Spec, got {type(s.spec).__name__}")
  pen = lora2_released_penalty if opts.variant == "released" else lora2_penalty
  return adalora.budget_method(s, opts, family=FAMILY, initial_rank=s.spec.r, init_adapters=init_lora2, penalty=pen,
                               pruning=lora2_pruning, ranks=lora2_ranks)


def _counts(ad) -> tuple[int, int]:
  """k d + r (2k + 1) trained; k d + kept (2k + 1) at inference, 0 when nothing is kept.

  An adapter stacked over a scanned model's layers counts as its layers' adapters.
  """
  *_, d_out, k = ad["U"].shape
  d_in = ad["V"].shape[-1]
  lams = np.reshape(np.asarray(ad["lam"]), (-1, np.shape(ad["lam"])[-1]))  # (layers, r)
  outer = k * (d_in + d_out)
  trained = lams.shape[0] * (outer + lams.shape[1] * (2 * k + 1))
  kept = [family_lib.nonzero(lam) for lam in lams]
  return trained, sum(outer + n * (2 * k + 1) for n in kept if n)


FAMILY = family_lib.Family(
    name="lora2", factors=LORA2_FACTORS,
    product=lambda ad: (ad["U"] @ (ad["u"] * ad["lam"][..., None, :])) @ (ad["v"] @ ad["V"]),
    factored=lambda ad: (ad["U"] @ (ad["u"] * ad["lam"][..., None, :]), ad["v"] @ ad["V"]), batch_factored=True, counts=_counts,
    gate="lam",
    options=Lora2Options, config_section="lora2", methods={"lora2": build},
)

