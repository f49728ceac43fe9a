"""GM-LoRA's random direction masking (Algorithm 1 of the RM-LoRA paper).

At each step, each adapter keeps ``num_directions`` (the paper's r_hat) of its
``rank`` directions: rows ``i in S`` of ``a`` and columns ``i in S`` of ``b``;
every other entry of its gradient (or update) is zeroed. ``S`` is drawn afresh
per step and per adapter.

The draw is a pure function of ``(seed, step // period, adapter path)``: two
transforms built with the same seed select the same directions at the same
step, every host and device agrees without communication, and a run resumed
from a checkpoint repeats the masks of the run it continues.

How masking composes with an adaptive optimizer matters:

* ``optax.chain(mask, optax.adamw(lr), mask)`` (the paper's partial update):
  the first mask keeps unselected gradients out of Adam's moments, the second
  zeroes whatever momentum and weight decay would add, so unselected
  directions stay exactly where they are.
* ``optax.chain(mask, optax.adamw(lr))`` (the authors' released code, which
  masks gradients once after clipping): Adam's momentum from earlier steps and
  decoupled weight decay still move directions that are masked this step.

Three further options reproduce the rest of the authors' training step:
``start_step=1`` (their loop masks only once ``global_step > 0``),
``independent=True`` (their ``--lora_type v2``: the rows of ``a`` and the
columns of ``b`` get index sets drawn independently; ``v1`` shares one, the
default here) and ``zero_others=True`` (their mask is zero for every
parameter that is not a LoRA factor, so a classifier head trained alongside
gets no gradient once masking starts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmlora_jax import paths as paths_lib
from rmlora_jax import stacking

Array = jax.Array


class RandomDirectionMaskState(NamedTuple):
  """State of `random_direction_mask`: the number of updates seen."""

  count: Array  # int32 scalar


def adapter_pairs(tree: Any) -> dict[str, int]:
  """Finds the ``{"a", "b"}`` adapter pairs in ``tree``.

  A scanned model's adapters stored stacked (`rmlora_jax.stacking.stack_adapters`:
  ``a`` (layers, rank, d_in), ``b`` (layers, d_out, rank) at a path such as
  ``.../layers/mlp/up_proj/kernel``) are one pair at that path; their masks
  are drawn per layer, as for the layer's own pair (``.../layers_3/...``).

  Returns:
    ``{pair path: rank}``, where the pair path is the "/"-path of the dict that
    holds ``a`` and ``b`` within ``tree``.

  Raises:
    ValueError: a pair whose shapes disagree on the rank.
  """
  return {path: rank for path, (rank, _) in _pairs(tree).items()}


def _pairs(tree: Any) -> dict[str, tuple[int, int]]:
  """``{pair path: (rank, layers)}``; ``layers`` is 0 for a 2-D pair, else its stack's length."""
  leaves = paths_lib.flatten_with_paths(tree)
  pairs = {}
  for parent, names in paths_lib.find_adapters(tree, ("a", "b"), exact=False).items():
    a, b = leaves[names["a"]], leaves[names["b"]]
    ndim = getattr(a, "ndim", 0)
    stacked = ndim == 3 and getattr(b, "ndim", 0) == 3 and stacking.is_stacked_path(parent)
    if not stacked and (ndim != 2 or getattr(b, "ndim", 0) != 2):
      continue
    if stacked and a.shape[0] != b.shape[0]:
      raise ValueError(f"adapter {parent!r}: a has shape {tuple(a.shape)} and b has shape {tuple(b.shape)}; "
                       f"a stack's factors must have one length (the layer count) first")
    if a.shape[-2] != b.shape[-1]:
      raise ValueError(
          f"adapter {parent!r}: a has shape {tuple(a.shape)} and b has shape "
          f"{tuple(b.shape)}; a is (rank, d_in) and b is (d_out, rank), so "
          f"a.shape[0] must equal b.shape[1]"
      )
    if stacked:
      pairs[parent] = (int(a.shape[1]), int(a.shape[0]))
    else:
      pairs[parent] = (int(a.shape[0]), 0)
  return pairs


def direction_mask(
    seed: int,
    step: Array | int,
    path: str,
    rank: int,
    num_directions: int,
    period: int = 1,
    *,
    path_hash: Array | int | None = None,
    factor: str = "a",
    independent: bool = False,
) -> Array:
  """The (rank,) 0/1 float32 mask of directions that ``path`` updates at ``step``.

  Exactly ``num_directions`` distinct indices, uniform over ``range(rank)``,
  a function of ``(seed, step // period, path)`` only. Jittable in ``step``;
  ``path_hash`` (``paths.path_hash(path)``, possibly traced) replaces ``path``
  when given, so the draw can be vmapped over adapters.

  ``factor`` ("a": the rows of ``a``; "b": the columns of ``b``) matters only
  with ``independent=True``, when ``b`` gets a set drawn independently of
  ``a``'s; otherwise both factors share one set.
  """
  if factor not in ("a", "b"):
    raise ValueError(f"direction_mask: factor must be 'a' or 'b', got {factor!r}")
  key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.int32) // period)
  key = jax.random.fold_in(key, paths_lib.path_hash(path) if path_hash is None else path_hash)
  if independent and factor == "b":
    key = jax.random.fold_in(key, 1)  # a second stream; a's (and the shared) draw is unchanged
  # The num_directions largest of rank i.i.d. random words: a uniform subset.
  # (jax.random.choice without replacement draws the same law through a
  # shuffle; this is a third of its compile time, which counts at dozens of
  # adapters and two masks a step.)
  _, chosen = jax.lax.top_k(jax.random.bits(key, (rank,)), num_directions)
  return jnp.any(chosen[:, None] == jnp.arange(rank)[None, :], axis=0).astype(jnp.float32)


def _all_masks(seed, step, pairs: dict[str, tuple[int, int]], num_directions: int, period: int,
               independent: bool = False) -> dict[str, tuple[Array, Array]]:
  """``{path: (mask of a's rows, mask of b's columns)}`` by `direction_mask`, one vmapped draw per rank.

  Equal to calling `direction_mask` per path (random functions are
  vmap-invariant in their keys), but compiles to a handful of ops instead of
  a few per adapter, which matters with dozens of adapters and two masks a step.
  A stacked pair (``pairs[path] = (rank, layers)`` with ``layers > 0``) gets
  (layers, rank) masks, row ``i`` drawn for its layer ``i``'s path.
  """
  by_rank: dict[int, list[str]] = {}
  for path, (rank, _) in pairs.items():
    by_rank.setdefault(rank, []).append(path)
  masks = {}
  for rank, paths in by_rank.items():
    rows_of = [[stacking.layer_path(p, i) for i in range(pairs[p][1])] if pairs[p][1] else [p] for p in paths]
    hashes = jnp.asarray([paths_lib.path_hash(q) for qs in rows_of for q in qs], jnp.uint32)
    draw = lambda h, factor, rank=rank: direction_mask(seed, step, "", rank, num_directions, period, path_hash=h,
                                                       factor=factor, independent=independent)
    rows = jax.vmap(lambda h: draw(h, "a"))(hashes)
    cols = jax.vmap(lambda h: draw(h, "b"))(hashes) if independent else rows
    start = 0
    for path, qs in zip(paths, rows_of):
      if pairs[path][1]:
        masks[path] = (rows[start:start + len(qs)], cols[start:start + len(qs)])
      else:
        masks[path] = (rows[start], cols[start])
      start += len(qs)
  return masks


def _unfused_on_cpu(count: Array, draw: Callable[[Array], Any]) -> Any:
  """``draw(count)``; on CPU computed in a conditional, so that XLA stores it before use.

  Every adapter's mask is a row of one shared draw. XLA:CPU would fuse each
  row's slice into the update that reads it, making every adapter's update
  a kernel of its own, and compiling those was most of what the masks added
  to a step's compile time (docs/BENCHMARKS.md).
  A conditional's outputs are buffers, so same-shaped factors share one
  kernel. (An optimisation barrier would not do: XLA:CPU drops barriers
  before fusing. A ``count`` known at compile time folds the conditional
  away.) Other platforms draw directly: a conditional on a GPU reads its
  predicate back to the host.
  """
  if not isinstance(count, jax.core.Tracer):
    return draw(count)  # Called eagerly: nothing is fused, and a conditional would compile on every call.

  def on_cpu(count):
    # Always true (counts start at 0 and `optax.safe_increment` saturates),
    # but only at run time, so XLA keeps the conditional.
    return jax.lax.cond(count >= 0, draw, lambda c: jax.tree.map(jnp.zeros_like, jax.eval_shape(draw, c)), count)

  return jax.lax.platform_dependent(count, cpu=on_cpu, default=draw)


def _check(pairs: dict[str, tuple[int, int]], num_directions: int) -> None:
  if not pairs:
    raise ValueError(
        "random_direction_mask found no adapter pairs (dicts with 2-D 'a' and 'b', or 3-D stacked over layers) "
        "in the tree it was given; pass the adapters (and any head) it should mask"
    )
  for path, (rank, _) in pairs.items():
    if not 1 <= num_directions <= rank:
      raise ValueError(
          f"random_direction_mask: num_directions={num_directions} must be in "
          f"1..rank, but adapter {path!r} has rank {rank}"
      )


def random_direction_mask(
    num_directions: int,
    *,
    seed: int = 0,
    period: int = 1,
    start_step: int = 0,
    independent: bool = False,
    zero_others: bool = False,
) -> optax.GradientTransformation:
  """Keeps ``num_directions`` random directions of each adapter, zeroes the rest.

  For every ``{"a", "b"}`` pair in the tree, rows ``i in S`` of ``a`` and
  columns ``i in S`` of ``b`` pass; ``S`` holds ``num_directions`` distinct
  indices drawn uniformly from ``range(rank)``, independently per adapter and
  per step, from ``(seed, step // period, pair path)`` alone. Leaves outside
  adapter pairs (a classifier head trained alongside, say) pass unchanged.

  Args:
    num_directions: r_hat, directions updated per step, in 1..rank.
    seed: the masks' seed; equal seeds give equal masks at equal steps.
    period: draw a new set every ``period`` steps (1: every step).
    start_step: updates before this one pass whole (the RM-LoRA authors' code
      masks from its second optimizer step on: ``start_step=1``).
    independent: draw ``b``'s columns independently of ``a``'s rows (the
      authors' ``--lora_type v2``) instead of one shared set (``v1``).
    zero_others: from ``start_step`` on, zero every leaf outside the adapter
      pairs (the authors' code, whose mask is zero for all but the LoRA
      factors: a head trained alongside then moves only by Adam's momentum).

  Returns:
    An `optax.GradientTransformation` whose state counts updates.

  Example (the paper's partial update; unselected directions do not move)::

    tx = optax.chain(random_direction_mask(4, seed=0),
                     optax.adamw(1e-3),
                     random_direction_mask(4, seed=0))
  """
  if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
    raise ValueError(
        f"random_direction_mask: num_directions must be a positive integer, got {num_directions!r}"
    )
  if isinstance(period, bool) or not isinstance(period, int) or period < 1:
    raise ValueError(f"random_direction_mask: period must be a positive integer, got {period!r}")
  if not isinstance(seed, int):
    raise ValueError(f"random_direction_mask: seed must be an integer, got {seed!r}")
  if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
    raise ValueError(f"random_direction_mask: start_step must be a non-negative integer, got {start_step!r}")

  def init_fn(params):
    # An empty tree is `optax.tree_map_params`' stand-in when it reads the
    # state's layout; the real tree is checked here and at every update.
    if jax.tree.leaves(params):
      _check(_pairs(params), num_directions)
    return RandomDirectionMaskState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    pairs = _pairs(updates)
    _check(pairs, num_directions)
    masks = _unfused_on_cpu(state.count, lambda count: _all_masks(
        seed, count, pairs, num_directions, period, independent))
    # Before start_step every update passes whole: a mask of ones.
    started = state.count >= start_step

    def apply(key_path, u):
      parent, _, name = paths_lib.path_str(key_path).rpartition("/")
      if parent not in masks or name not in ("a", "b"):
        return jnp.where(started, jnp.zeros_like(u), u) if zero_others else u
      m = masks[parent][0 if name == "a" else 1]
      if start_step:
        m = jnp.where(started, m, jnp.ones_like(m))
      m = m.astype(u.dtype)
      return u * (m[..., :, None] if name == "a" else m[..., None, :])

    updates = jax.tree_util.tree_map_with_path(apply, updates)
    return updates, RandomDirectionMaskState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
