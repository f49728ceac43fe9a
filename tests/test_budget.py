"""The budget-pruning wrapper passes extra update arguments on and keeps parameter-shaped state.

Its pruning itself is checked against a plain reference in tests/test_adalora.py
and tests/test_lora2.py; here a head-only gradient keeps the pruning out of
the way (no adapter update is changed before the first pruning step).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmlora_jax import paths as paths_lib
from rmlora_jax.budget import BudgetPruningState, BudgetSchedule, TripletFamily, budget_pruning

FAMILY = TripletFamily(name="Test", factors=frozenset({"p", "lam", "q"}), rank_axes={"p": 1, "q": 0})
SCHEDULE = BudgetSchedule(initial_rank=3, target_rank=2, total_steps=10, t_init=2, t_final=2, delta_t=2)


def tree():
  return {"adapters": {"enc/q": {"p": jnp.full((5, 3), 0.5), "lam": jnp.array([1.0, 2.0, 3.0]),
                                 "q": jnp.full((3, 4), -0.5)}},
          "head": jnp.array([1.0, -2.0])}


def grads():
  return jax.tree.map(lambda x: jnp.full(x.shape, 0.25), tree())


class Seen(NamedTuple):
  loss: jax.Array


def scale_by_loss() -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by the keyword ``loss`` of ``update``, and keeps the last one."""

  def update_fn(updates, state, params=None, *, loss, **extra_args):
    del state, params, extra_args
    return jax.tree.map(lambda u: loss * u, updates), Seen(jnp.asarray(loss, jnp.float32))

  return optax.GradientTransformationExtraArgs(lambda params: Seen(jnp.zeros(())), update_fn)


def test_extra_args_reach_the_inner_transformation():
  tx = budget_pruning(scale_by_loss(), SCHEDULE, FAMILY)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = tree()
  state = tx.init(params)
  updates, state = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))(grads(), state, params, 3.0)
  assert float(state.inner_state.loss) == 3.0
  np.testing.assert_allclose(updates["head"], [0.75, 0.75])
  np.testing.assert_allclose(updates["adapters"]["enc/q"]["q"], np.full((3, 4), 0.75))
  # Inside a chain, which hands its extra arguments to every member.
  chained = optax.chain(budget_pruning(scale_by_loss(), SCHEDULE, FAMILY), optax.scale(-1.0))
  updates, state = chained.update(grads(), chained.init(params), params, loss=2.0)
  assert float(state[0].inner_state.loss) == 2.0
  np.testing.assert_allclose(updates["head"], [-0.5, -0.5])


def test_reduce_on_plateau_gets_its_value():
  inner = optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau(accumulation_size=2))
  tx = budget_pruning(inner, SCHEDULE, FAMILY)
  params = tree()
  state = tx.init(params)
  _, state = tx.update(grads(), state, params, value=5.0)
  assert int(state.inner_state[1].count) == 1 and float(state.inner_state[1].avg_value) == 5.0
  # The second value completes the accumulation: the best value is the mean of the two.
  _, state = tx.update(grads(), state, params, value=7.0)
  assert int(state.inner_state[1].count) == 0 and float(state.inner_state[1].best_value) == 6.0


def test_plain_inner_transformation_ignores_extra_args():
  tx = budget_pruning(optax.sgd(0.1), SCHEDULE, FAMILY)
  params = tree()
  updates, _ = tx.update(grads(), tx.init(params), params, value=1.0)
  np.testing.assert_allclose(updates["head"], [-0.025, -0.025])


def test_statistics_and_keep_pattern_are_parameter_shaped():
  tx = budget_pruning(optax.adam(1e-3), SCHEDULE, FAMILY)
  params = tree()
  state = tx.init(params)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  marks = optax.tree_map_params(
      tx, lambda leaf, param: leaf if masked(leaf) else "param" if leaf.shape == param.shape else "other shape",
      state, params, transform_non_params=lambda _: "not a param", is_leaf=masked)
  adapter = "adapters/enc/q"
  want = {"count": "not a param",
          **{f"{field}/{adapter}/{f}": "param" for field in ("ipt_by_param", "unc_by_param") for f in ("lam", "p", "q")},
          f"keep_by_param/{adapter}/lam": "param",
          "inner_state/0/count": "not a param",
          **{f"inner_state/0/{m}/{p}": "param" for m in ("mu", "nu")
             for p in (f"{adapter}/lam", f"{adapter}/p", f"{adapter}/q", "head")}}
  assert paths_lib.flatten_with_paths(marks) == want
  # The head has no statistics: a masked node, not zeros.
  assert isinstance(state.ipt_by_param["head"], optax.MaskedNode)
  # By adapter, as before.
  assert set(state.ipt) == set(state.unc) == {adapter}
  assert set(state.ipt[adapter]) == {"lam", "p", "q"}
  assert state.keep[adapter].tolist() == [True, True, True]


def test_state_survives_jit_and_keeps_its_structure():
  tx = budget_pruning(optax.sgd(0.1), SCHEDULE, FAMILY)
  params = tree()
  state = tx.init(params)
  step = jax.jit(lambda s, p: tx.update(grads(), s, p))
  for _ in range(SCHEDULE.total_steps):
    updates, new_state = step(state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    params, state = optax.apply_updates(params, updates), new_state
  assert isinstance(state, BudgetPruningState) and int(state.count) == SCHEDULE.total_steps
  assert sum(state.keep["adapters/enc/q"].tolist()) == SCHEDULE.target_rank


def test_a_tree_without_leaves_initialises_but_cannot_update():
  tx = budget_pruning(optax.sgd(0.1), SCHEDULE, FAMILY)
  state = tx.init({})  # what optax.tree_map_params does, with its placeholder
  with pytest.raises(ValueError, match=r"Test pruning found no adapters with factors \['lam', 'p', 'q'\]"):
    tx.update({}, state, {})
  with pytest.raises(ValueError, match="no adapters"):
    tx.init({"w": jnp.ones(3)})
