"""SoRA (Ding et al. 2023): LoRA with a gate per rank, sparsified by a proximal step.

An adapter for a kernel of shape (d_in, d_out) is
``{"a": (r, d_in), "b": (d_out, r), "g": (r,)}`` with
``dW = (alpha / r) * b @ diag(g) @ a``. The gates start at one (a and b as
LoRA's, so dW = 0 at init). After each optimizer update the gates take the
proximal step of an L1 penalty, soft-thresholding
``g <- sign(g) max(|g| - xi, 0)``; gates that reach zero are pruned ranks.

The paper's threshold is ``eta_t * lambda`` (learning rate times the L1
weight); here ``xi`` is that product, a constant or an `optax.Schedule` of
the step, which also gives the paper's sparsifying scheduler (a rising xi).

Example (gates and the rest may also get different optimizers through
`optax.partition`)::

  adapters = init_sora(jax.random.key(0), params, LoraSpec(rank=8, alpha=16.0, targets=...))
  tx = optax.chain(optax.adamw(1e-3), sora_proximal(1e-4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmlora_jax import budget as budget_lib
from rmlora_jax.adapters import base
from rmlora_jax.adapters import family as family_lib
from rmlora_jax.adapters import lora
from rmlora_jax import paths as paths_lib

Array = jax.Array

SORA_FACTORS = frozenset({"a", "b", "g"})



GATE_INITS = ("ones", "normal")


def init_sora(key: Array, params: Any, spec: lora.LoraSpec, *, gate_init: str = "ones") -> dict[str, dict[str, Array]]:
  """Creates SoRA adapters for every leaf of ``params`` that ``spec`` targets.

  Args:
    key: a PRNG key; adapter ``path`` uses ``fold_in(key, hash(path))``, so
      ``a`` equals `init_lora`'s for the same key (the gates draw from a key
      folded once more).
    params: the frozen parameter pytree (Flax kernels are (d_in, d_out)).
    spec: ``spec.rank`` is the maximum rank r.
    gate_init: "ones", or "normal" (N(0, 1), the released code's ``torch.randn``).

  Returns:
    ``{path: {"a": (r, d_in) ~ N(0, init_std^2), "b": zeros (d_out, r), "g": (r,)}}``.
  """
  if gate_init not in GATE_INITS:
    raise ValueError(f"init_sora: gate_init must be one of {GATE_INITS}, got {gate_init!r}")
  adapters = lora.init_lora(key, params, spec)
  for path, ad in adapters.items():
    if gate_init == "ones":
      ad["g"] = jnp.ones((spec.rank,), ad["a"].dtype)
    else:
      k = jax.random.fold_in(jax.random.fold_in(key, paths_lib.path_hash(path)), 1)
      ad["g"] = jax.random.normal(k, (spec.rank,), ad["a"].dtype)
  return adapters


def soft_threshold(x: Array, xi: Array | float) -> Array:
  """``sign(x) * max(|x| - xi, 0)``, the proximal map of ``xi * ||x||_1``."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - xi, 0.0)


def released_threshold(x: Array, xi: Array | float) -> Array:
  """The threshold of SoRA's released optimizer (``SparseAdamW.step``), three in-place edits in order.

  Entries above ``xi`` are lowered by ``xi``, then entries below ``-xi``
  raised by ``xi``, then entries with ``|x| < xi`` set to zero. The last edit
  also sees the entries the first two moved into ``(-xi, xi)``, so in effect
  ``|x| < 2 xi`` becomes zero (except ``|x| = xi`` exactly, which is kept)
  and larger entries shrink by ``xi``: not the soft threshold of the paper.
  """
  x = jnp.where(x > xi, x - xi, x)
  x = jnp.where(x < -xi, x + xi, x)
  return jnp.where(jnp.abs(x) < xi, jnp.zeros_like(x), x)


THRESHOLDS = {"soft": soft_threshold, "released": released_threshold}


class SoraProximalState(NamedTuple):
  """State of `sora_proximal`: the number of updates seen (the schedule's step)."""

  count: Array  # int32 scalar


def sora_proximal(xi: float | optax.Schedule, *, rule: str = "soft") -> optax.GradientTransformation:
  """Soft-thresholds SoRA gates after the optimizer's update.

  Place it last in a chain: for each SoRA adapter's gate, the update ``u``
  becomes ``soft_threshold(g + u, xi) - g``, so `optax.apply_updates` lands
  on the thresholded gate (exactly 0 where pruned). Other leaves pass
  unchanged.

  Args:
    xi: the threshold (>= 0), or a schedule ``step -> xi >= 0`` with step
      counted from 0 at the first update (checked at step 0 only).
    rule: "soft" (`soft_threshold`, the paper's proximal step) or "released"
      (`released_threshold`, what SoRA's released optimizer computes).

  Returns:
    An `optax.GradientTransformation`; call ``update(updates, state, params)``.

  Raises:
    ValueError: a negative threshold (a constant, or a schedule's at step 0).

  Example::

    tx = optax.chain(optax.adamw(1e-3), sora_proximal(optax.linear_schedule(0.0, 1e-3, 1000)))
  """
  first = xi(0) if callable(xi) else xi
  if not isinstance(first, (int, float, jax.Array)) or not float(first) >= 0:
    raise ValueError(f"sora_proximal: the threshold xi must be >= 0, got {first!r} at step 0")
  if rule not in THRESHOLDS:
    raise ValueError(f"sora_proximal: rule must be one of {tuple(THRESHOLDS)}, got {rule!r}")
  threshold_fn = THRESHOLDS[rule]

  def require_adapters(tree):
    if not paths_lib.find_adapters(tree, SORA_FACTORS):
      raise ValueError(
          "sora_proximal found no SoRA adapters (dicts with 'a', 'b', 'g') in the tree it "
          "was given; pass the adapters (and any head) it should train"
      )

  def init_fn(params):
    # An empty tree is `optax.tree_map_params`' stand-in when it reads the
    # state's layout; a real tree is checked here and at every update.
    if jax.tree.leaves(params):
      require_adapters(params)
    return SoraProximalState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("sora_proximal needs params: call tx.update(updates, state, params)")
    require_adapters(params)
    threshold = xi(state.count) if callable(xi) else xi
    gates = gate_paths(params)

    def prox(key_path, u, g):
      if paths_lib.path_str(key_path) not in gates:
        return u
      return (threshold_fn(g + u, threshold) - g).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(prox, updates, params)
    return updates, SoraProximalState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def sora_ranks(adapters: Any) -> dict[str, int]:
  """``{path: number of nonzero gates}``: each SoRA adapter's remaining rank."""
  return budget_lib.nonzero_ranks(adapters, SORA_FACTORS, "g")


def gate_paths(tree: Any) -> set[str]:
  """The "/"-paths of every SoRA gate ``g`` in ``tree`` (adapters found by their factors)."""
  return {names["g"] for names in paths_lib.find_adapters(tree, SORA_FACTORS).values()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoraOptions:
  """SoRA's settings; the maximum rank is ``MethodSettings.spec.rank``.

  ``variant="paper"``: the gates start at one and take the proximal gradient
  step of the paper, plain SGD then soft-thresholding by ``eta_t * xi``.
  ``variant="released"``: what SoRA's released code does (its
  ``SparseAdamW``): gates drawn from N(0, 1), trained by Adam (bias
  corrected, no weight decay), then thresholded by ``xi`` itself every step
  with that optimizer's rule (`released_threshold`: zero below about
  ``2 xi``, shrunk by ``xi`` above). At a learning rate of 1e-3 the paper's
  threshold is a thousand times smaller, which is why only the released
  variant prunes much in practice.
  """

  # lambda (paper) or the per-step threshold (released): the L1 weight of the gates.
  xi: float = 0.005
  # Learning rate of the gates' optimizer; <= 0: the run's learning rate (schedule).
  gate_lr: float = -1.0
  # "paper" or "released" (see above).
  variant: str = "paper"

  def __post_init__(self):
    if not self.xi >= 0:
      raise ValueError(f"SoraOptions.xi must be >= 0, got {self.xi!r}")
    if self.variant not in ("paper", "released"):
      raise ValueError(f"SoraOptions.variant must be 'paper' or 'released', got {self.variant!r}")


def build(settings: base.MethodSettings) -> base.Method:
  """SoRA: gated LoRA adapters; the gates take their own optimizer and a proximal L1 step, the rest AdamW.

  With the paper's variant the proximal threshold per step is the gate
  learning rate times the sparsity weight lambda (``SoraOptions.xi``), as in
  proximal gradient; with the released code's, ``xi`` (see `SoraOptions`).
  """
  s = settings
  opts = s.with_options(SoraOptions, method=s.name)
  released = opts.variant == "released"

  def optimizer(lr):
    gate_lr = lr if opts.gate_lr <= 0 else opts.gate_lr
    lam = opts.xi
    if released:
      xi, gate_tx = lam, optax.adam(gate_lr)
    else:
      xi = (lambda step: lam * gate_lr(step)) if callable(gate_lr) else lam * gate_lr
      gate_tx = optax.sgd(gate_lr)

    def labels(tree):
      gates = gate_paths(tree)
      return jax.tree_util.tree_map_with_path(
          lambda kp, _: "gate" if paths_lib.path_str(kp) in gates else "rest", tree)

    return optax.chain(optax.partition({"gate": gate_tx, "rest": base.settings_optimizer(s, lr)}, labels),
                       sora_proximal(xi, rule="released" if released else "soft"))

  init = lambda key, params, spec: init_sora(key, params, spec, gate_init="normal" if released else "ones")
  # On a scanned model, stacked over the layers: the proximal step is elementwise.
  return lora.adapter_method(s, family=FAMILY, init_adapters=init, optimizer=optimizer, ranks=sora_ranks,
                             stack_layers=True)


FAMILY = family_lib.Family(
    name="sora", factors=SORA_FACTORS, product=lambda ad: (ad["b"] * ad["g"][..., None, :]) @ ad["a"],
    factored=lambda ad: (ad["b"] * ad["g"][..., None, :], ad["a"]), counts=family_lib.gated_counts("g", "a", "b"),
    gate="g", options=SoraOptions, config_section="sora", methods={"sora": build},
)

