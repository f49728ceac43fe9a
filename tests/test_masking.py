"""Random direction masking (Algorithm 1) as an optax transform."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmlora_jax as rl
from rmlora_jax import masking


def _tree(rank=6):
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "adapters": {
          "enc/q/kernel": {"a": f(rank, 5), "b": f(4, rank)},
          "enc/v/kernel": {"a": f(rank, 5), "b": f(3, rank)},
      },
      "head": {"kernel": f(4, 2), "bias": f(2)},
  }


def _selected_rows(a_update):
  """Indices i whose row of the `a` update is nonzero."""
  return set(np.flatnonzero(np.any(np.asarray(a_update) != 0, axis=1)).tolist())


def test_keeps_exactly_r_hat_rows_and_matching_columns():
  tree = _tree()
  tx = rl.random_direction_mask(2, seed=3)
  state = tx.init(tree)
  grads = jax.tree.map(jnp.ones_like, tree)
  update = jax.jit(tx.update)
  for _ in range(5):
    out, state = update(grads, state)
    for path, ad in out["adapters"].items():
      rows = _selected_rows(ad["a"])
      cols = set(np.flatnonzero(np.any(np.asarray(ad["b"]) != 0, axis=0)).tolist())
      assert len(rows) == 2, path
      assert rows == cols, path
      # Kept entries are passed unchanged, the rest exactly zero.
      m = np.zeros(6)
      m[list(rows)] = 1
      np.testing.assert_array_equal(ad["a"], np.ones((6, 5)) * m[:, None])
      np.testing.assert_array_equal(ad["b"], np.ones(ad["b"].shape) * m[None, :])
    # The head is not an adapter pair: untouched.
    chex.assert_trees_all_equal(out["head"], grads["head"])
  assert int(state.count) == 5


def test_draw_depends_only_on_seed_step_and_path():
  tree = _tree()
  grads = jax.tree.map(jnp.ones_like, tree)

  def masks(seed, steps, period=1):
    tx = rl.random_direction_mask(3, seed=seed, period=period)
    state = tx.init(tree)
    seen = []
    for _ in range(steps):
      out, state = tx.update(grads, state)
      seen.append({p: frozenset(_selected_rows(ad["a"])) for p, ad in out["adapters"].items()})
    return seen

  first, second = masks(7, 12), masks(7, 12)
  assert first == second                      # same seed: same masks, step by step
  assert first != masks(8, 12)                # another seed: other masks
  # Per adapter and per step: the two adapters do not share one draw throughout,
  # and the draw changes over steps.
  assert any(m["enc/q/kernel"] != m["enc/v/kernel"] for m in first)
  assert len({m["enc/q/kernel"] for m in first}) > 1
  # A public function gives the same sets (resuming needs only seed and step).
  for step, m in enumerate(first):
    for path, rows in m.items():
      mask = rl.direction_mask(7, step, f"adapters/{path}", 6, 3)
      assert frozenset(np.flatnonzero(np.asarray(mask)).tolist()) == rows
  # period: the draw is held for `period` steps.
  held = masks(7, 6, period=3)
  assert held[0] == held[1] == held[2] and held[3] == held[4] == held[5]
  assert held[0] == first[0] and held[3] == first[1]


def test_directions_are_uniform():
  # Over many steps each of the rank directions is picked about r_hat/rank of the time.
  counts = np.zeros(8)
  draw = jax.jit(lambda s: rl.direction_mask(0, s, "w", 8, 2))
  for step in range(800):
    counts += np.asarray(draw(step))
  expected = 800 * 2 / 8
  # Binomial std is about 12; a 5-sigma band keeps this deterministic test meaningful.
  assert np.all(np.abs(counts - expected) < 60), counts
  # And the set as a whole: each of the 6 pairs of 4 directions about 1/6 of the time.
  draw = jax.jit(jax.vmap(lambda s: rl.direction_mask(0, s, "w", 4, 2)))
  sets = np.asarray(draw(jnp.arange(1200)))
  assert np.all(sets.sum(1) == 2)
  _, per_pair = np.unique(sets, axis=0, return_counts=True)
  assert len(per_pair) == 6 and np.all(np.abs(per_pair - 200) < 65), per_pair  # std about 13


def _adamw_chain(before_and_after, wd=0.1):
  inner = optax.adamw(1e-2, weight_decay=wd)
  if before_and_after:
    return optax.chain(rl.random_direction_mask(2, seed=1), inner, rl.random_direction_mask(2, seed=1))
  return optax.chain(rl.random_direction_mask(2, seed=1), inner)


def test_mask_around_adamw_freezes_unselected_directions():
  params = _tree()
  tx = _adamw_chain(True)
  state = tx.init(params)

  def loss(p):
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for t in range(4):
    new, state = step(params, state)
    for path, ad in params["adapters"].items():
      sel = np.asarray(rl.direction_mask(1, t, f"adapters/{path}", 6, 2)).astype(bool)
      na, nb = new["adapters"][path]["a"], new["adapters"][path]["b"]
      np.testing.assert_array_equal(np.asarray(na)[~sel], np.asarray(ad["a"])[~sel])
      np.testing.assert_array_equal(np.asarray(nb)[:, ~sel], np.asarray(ad["b"])[:, ~sel])
      assert np.all(np.asarray(na)[sel] != np.asarray(ad["a"])[sel])
      assert np.all(np.asarray(nb)[:, sel] != np.asarray(ad["b"])[:, sel])
    # The head always trains.
    assert np.all(np.asarray(new["head"]["kernel"]) != np.asarray(params["head"]["kernel"]))
    params = new


def test_mask_before_adamw_only_lets_momentum_and_decay_move_masked_directions():
  """The authors' variant: masked gradients, but Adam's state and weight decay still act.

  Three steps against AdamW written in NumPy on the masked gradient: every
  entry of ``a`` must match, and directions unselected at a step still move.
  """
  params = _tree()
  tx = _adamw_chain(False)
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
  a = np.asarray(params["adapters"]["enc/q/kernel"]["a"], np.float64)
  m, v = np.zeros_like(a), np.zeros_like(a)
  moved_unselected = 0
  for t in range(3):
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    sel = np.asarray(rl.direction_mask(1, t, "adapters/enc/q/kernel", 6, 2))
    grad = np.ones_like(a) * sel[:, None]
    m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
    m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    new_a = a - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * a)
    got = np.asarray(params["adapters"]["enc/q/kernel"]["a"])
    np.testing.assert_allclose(got, new_a, rtol=1e-5, atol=1e-7)
    moved_unselected += int(np.sum(np.any(new_a[sel == 0] != a[sel == 0], axis=1)))
    a = new_a
  assert moved_unselected == 3 * 4  # every unselected row moved at every step (decay at least)


def _rows(u):
  return frozenset(np.flatnonzero(np.any(np.asarray(u) != 0, axis=1)).tolist())


def _cols(u):
  return frozenset(np.flatnonzero(np.any(np.asarray(u) != 0, axis=0)).tolist())


def test_authors_options_start_step_independent_sets_and_zeroed_head():
  """start_step, independent and zero_others, against the authors' loop written as set arithmetic."""
  tree = _tree()
  grads = jax.tree.map(jnp.ones_like, tree)
  tx = rl.random_direction_mask(2, seed=5, start_step=2, independent=True, zero_others=True)
  update = jax.jit(tx.update)
  state = tx.init(tree)
  differ = 0
  for t in range(40):
    out, state = update(grads, state)
    for path, ad in out["adapters"].items():
      if t < 2:  # before start_step everything passes whole, the head included
        chex.assert_trees_all_equal(ad, grads["adapters"][path])
        continue
      rows, cols = _rows(ad["a"]), _cols(ad["b"])
      assert len(rows) == len(cols) == 2
      want = [frozenset(np.flatnonzero(np.asarray(rl.direction_mask(
          5, t, f"adapters/{path}", 6, 2, factor=f, independent=True))).tolist()) for f in "ab"]
      assert (rows, cols) == tuple(want)
      differ += rows != cols
    if t < 2:
      chex.assert_trees_all_equal(out["head"], grads["head"])
    else:
      chex.assert_trees_all_equal(out["head"], jax.tree.map(jnp.zeros_like, grads["head"]))
  # Two independent uniform 2-of-6 sets coincide with probability 1/15: over
  # 76 adapter-steps they must differ most of the time.
  assert differ > 50
  # Shared sets (the default) are a's draw for both factors, as before the option existed.
  for t in range(5):
    a = rl.direction_mask(5, t, "adapters/enc/q/kernel", 6, 2)
    np.testing.assert_array_equal(rl.direction_mask(5, t, "adapters/enc/q/kernel", 6, 2, factor="b"), a)
    np.testing.assert_array_equal(
        rl.direction_mask(5, t, "adapters/enc/q/kernel", 6, 2, factor="a", independent=True), a)


def test_b_sets_drawn_independently_are_uniform_and_unrelated_to_a():
  draw = jax.jit(jax.vmap(lambda s: jnp.stack([rl.direction_mask(0, s, "w", 4, 2, factor=f, independent=True)
                                               for f in "ab"])))
  both = np.asarray(draw(jnp.arange(1800)))  # (steps, factor, rank)
  # The joint law of (a's set, b's set) is uniform over the 6 x 6 pairs: 50 each, std about 7.
  _, counts = np.unique(both.reshape(1800, 8), axis=0, return_counts=True)
  assert len(counts) == 36 and np.all(np.abs(counts - 50) < 30), counts


def test_bad_num_directions_names_adapter():
  with pytest.raises(ValueError, match=r"num_directions=7 must be in 1..rank, but adapter 'adapters/enc/q/kernel' has rank 6"):
    rl.random_direction_mask(7).init(_tree())
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match="num_directions must be a positive integer"):
      rl.random_direction_mask(bad)
  with pytest.raises(ValueError, match="period must be a positive integer"):
    rl.random_direction_mask(1, period=0)
  with pytest.raises(ValueError, match="start_step must be a non-negative integer, got -1"):
    rl.random_direction_mask(1, start_step=-1)
  with pytest.raises(ValueError, match="factor must be 'a' or 'b', got 'c'"):
    rl.direction_mask(0, 0, "w", 4, 2, factor="c")
  with pytest.raises(ValueError, match="found no adapter pairs"):
    rl.random_direction_mask(1).init({"head": {"kernel": jnp.zeros((2, 2))}})
  with pytest.raises(ValueError, match=r"a.shape\[0\] must equal b.shape\[1\]"):
    rl.random_direction_mask(1).init({"w": {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 2))}})


def test_no_retrace_across_steps():
  tree = _tree()
  tx = rl.random_direction_mask(2)
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = tx.init(tree)
  for _ in range(3):
    _, state = update(tree, state)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion decision")
def test_masks_reach_updates_as_buffers_on_cpu(monkeypatch):
  # All adapters' masks come from one draw. If XLA:CPU fuses a row's slice of
  # it into each adapter's update, every update is a kernel of its own and
  # compile time grows with the number of adapters (docs/BENCHMARKS.md).
  n, rank, width = 6, 4, 16
  tree = {"adapters": {f"layer_{i}": {"a": jnp.ones((rank, width)), "b": jnp.ones((width, rank))}
                       for i in range(n)}}

  def fused_updates_reading_the_draw():
    tx = optax.chain(rl.random_direction_mask(2, seed=0), optax.adamw(1e-3), rl.random_direction_mask(2, seed=0))

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    hlo = jax.jit(step).lower(tree, tx.init(tree), tree).compile().as_text()
    factor = rf"\[({rank},{width}|{width},{rank})\]"
    return [c for c in hlo.split("\n\n")
            if re.search(rf"\[{n},{rank}\]\{{1,0\}} parameter\(", c) and re.search(factor, c)]

  assert not fused_updates_reading_the_draw()
  # The detector itself: with the draw used directly, every update reads it.
  with monkeypatch.context() as m:
    m.setattr(masking, "_unfused_on_cpu", lambda count, draw: draw(count))
    assert len(fused_updates_reading_the_draw()) >= n
  # And the masks are still each adapter's own.
  tx = rl.random_direction_mask(2, seed=0)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, tree), tx.init(tree))
  for i in range(n):
    sel = np.asarray(rl.direction_mask(0, 0, f"adapters/layer_{i}", rank, 2)).astype(bool)
    assert _selected_rows(updates["adapters"][f"layer_{i}"]["a"]) == set(np.flatnonzero(sel).tolist())
