"""SoRA: gated adapters, soft-thresholding after the optimizer, remaining ranks."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.family_reference import random_like, toy_problem, train
from rmlora_jax import LoraSpec, delta_weights, init_lora, merge
from rmlora_jax.masking import adapter_pairs
from rmlora_jax.adapters.sora import init_sora, released_threshold, soft_threshold, sora_proximal, sora_ranks

PARAMS = {"x": {"kernel": jnp.ones((6, 5))}, "y": {"kernel": jnp.ones((5, 4))}}
SPEC = LoraSpec(rank=3, alpha=6.0, targets=(r".*/kernel",))


def test_init_is_lora_with_unit_gates():
  ad = init_sora(jax.random.key(0), PARAMS, SPEC)
  base = init_lora(jax.random.key(0), PARAMS, SPEC)
  for path, a in ad.items():
    np.testing.assert_array_equal(a["a"], base[path]["a"])
    np.testing.assert_array_equal(a["b"], 0)
    np.testing.assert_array_equal(a["g"], np.ones(3))
  assert adapter_pairs(ad) == {"x/kernel": 3, "y/kernel": 3}


def test_delta_weights_and_merge_match_numpy():
  ad = jax.tree.map(jnp.asarray, random_like(init_sora(jax.random.key(0), PARAMS, SPEC), 1))
  merged = merge(PARAMS, ad, SPEC)
  for path, a in ad.items():
    f = {n: np.asarray(x, np.float64) for n, x in a.items()}
    ref = 2.0 * f["b"] @ np.diag(f["g"]) @ f["a"]
    np.testing.assert_allclose(delta_weights(ad, SPEC)[path], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[path.split("/")[0]]["kernel"], 1.0 + ref.T, rtol=1e-5, atol=1e-6)


def test_soft_threshold_matches_numpy():
  x = np.linspace(-2, 2, 41).astype(np.float32)
  ref = np.where(np.abs(x) > 0.5, x - 0.5 * np.sign(x), 0.0)
  np.testing.assert_allclose(soft_threshold(jnp.asarray(x), 0.5), ref, atol=1e-7)


def released_numpy(p, lam):
  """SoRA's released SparseAdamW.step after its Adam update: three in-place edits, in this order."""
  p = np.array(p, copy=True)
  p[p > lam] -= lam
  p[p < -lam] += lam
  p[np.abs(p) < lam] = 0.0
  return p


def test_released_threshold_is_the_released_optimizers_three_edits():
  lam = np.float32(0.25)
  # Around each edge: 0, lam, 2 lam, and the windows between them, both signs.
  edges = np.array([0.0, 0.1, 0.2499, 0.25, 0.2501, 0.3, 0.4999, 0.5, 0.5001, 0.75, 2.0], np.float32)
  x = np.concatenate([edges, -edges, np.random.default_rng(0).normal(size=200).astype(np.float32)])
  want = released_numpy(x, lam)
  np.testing.assert_array_equal(np.asarray(released_threshold(jnp.asarray(x), lam)), want)
  # What that amounts to: zero for |x| < 2 lam (|x| = lam exactly is kept), x - sign(x) lam above.
  inside = (np.abs(x) < 2 * lam) & (np.abs(x) != lam)
  assert np.all(want[inside] == 0) and np.all(want[np.abs(x) == lam] == x[np.abs(x) == lam])
  np.testing.assert_allclose(want[np.abs(x) >= 2 * lam], (x - np.sign(x) * lam)[np.abs(x) >= 2 * lam], atol=1e-7)
  # The soft threshold of the paper zeroes only |x| <= lam.
  assert np.count_nonzero(np.asarray(soft_threshold(jnp.asarray(edges), lam))) > np.count_nonzero(want[:11])
  with pytest.raises(ValueError, match=r"rule must be one of \('soft', 'released'\), got 'hard'"):
    sora_proximal(0.1, rule="hard")


def test_step_under_jit_matches_reference():
  """Adam then the proximal step, against Adam and soft-thresholding written in NumPy."""
  lr, xi, b1, b2, eps = 0.1, 0.03, 0.9, 0.999, 1e-8
  tx = optax.chain(optax.adam(lr, b1=b1, b2=b2, eps=eps), sora_proximal(lambda t: xi * (1 + t)))
  ad = jax.tree.map(jnp.asarray, random_like(init_sora(jax.random.key(0), PARAMS, SPEC), 2))
  tree = {"ad": ad, "head": jnp.ones((2,))}
  state = tx.init(tree)
  step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  for t in range(1, 6):
    grads = jax.tree.map(jnp.asarray, random_like(tree, t))
    tree, state = step(tree, state, grads)
    g_np = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    m = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, g_np)
    v = jax.tree.map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, g_np)
    ref = jax.tree.map(lambda p, m_, v_: p - lr * (m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + eps), ref, m, v)
    for a in ref["ad"].values():
      g = a["g"]
      a["g"] = np.sign(g) * np.maximum(np.abs(g) - xi * t, 0.0)
    chex.assert_trees_all_close(tree, ref, rtol=1e-4, atol=1e-5)
  for path, a in tree["ad"].items():  # pruned exactly where the reference is
    np.testing.assert_array_equal(np.asarray(a["g"]) == 0.0, ref["ad"][path]["g"] == 0.0)
  assert any(np.any(a["g"] == 0.0) for a in ref["ad"].values())
  assert sora_ranks(tree["ad"]) == {p: int(np.count_nonzero(a["g"])) for p, a in ref["ad"].items()}


def test_large_threshold_prunes_every_gate_exactly():
  ad = init_sora(jax.random.key(0), PARAMS, SPEC)
  tx = optax.chain(optax.sgd(0.1), sora_proximal(0.4))
  state = tx.init(ad)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, ad), state, ad)
    ad = optax.apply_updates(ad, updates)
  assert sora_ranks(ad) == {"x/kernel": 0, "y/kernel": 0}
  assert all(np.all(np.asarray(a["g"]) == 0.0) for a in ad.values())


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="threshold xi must be >= 0, got -0.1"):
    sora_proximal(-0.1)
  with pytest.raises(ValueError, match="threshold xi"):
    sora_proximal(lambda t: -1.0)
  tx = sora_proximal(0.1)
  with pytest.raises(ValueError, match="no SoRA adapters"):
    tx.init({"w": jnp.ones(3)})
  ad = init_sora(jax.random.key(0), PARAMS, SPEC)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(ad, tx.init(ad))


def test_toy_regression_learns_and_prunes():
  params, x, y = toy_problem(2)
  spec = LoraSpec(rank=4, alpha=4.0, targets=(r"dense_.*/kernel",))
  ad = init_sora(jax.random.key(0), params, spec)
  # The paper's recipe: a proximal gradient (SGD) step on the gates, Adam for a and b.
  labels = lambda t: {p: {n: ("gate" if n == "g" else "rest") for n in a} for p, a in t.items()}
  tx = optax.chain(optax.partition({"gate": optax.sgd(0.3), "rest": optax.adam(2e-2)}, labels),
                   sora_proximal(0.02))
  losses, ad, _ = train(tx, ad, lambda p, a: merge(p, a, spec), params, x, y, 150)
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
  ranks = sora_ranks(ad)
  assert all(0 <= r <= 4 for r in ranks.values())
  assert sum(ranks.values()) < 8  # the L1 proximal step has closed some gates


def test_released_variant_draws_gates_trains_them_with_adam_and_thresholds_by_xi():
  """SoRA's released code: g ~ N(0, 1); Adam on the gates; then its threshold rule with xi itself."""
  from rmlora_jax import methods
  import rmlora_jax as rl
  params = {"w": {"kernel": jnp.ones((6, 5))}}
  spec = rl.LoraSpec(rank=4, alpha=4.0, targets=(r"w/kernel",))
  s = methods.MethodSettings(name="sora", spec=spec, total_steps=10,
                             options=methods.SoraOptions(variant="released", xi=0.3))
  method = methods.make_method(s)
  trainable = method.init(jax.random.key(0), params)
  g0 = np.asarray(trainable["adapters"]["w/kernel"]["g"])
  assert not np.allclose(g0, 1.0) and 0.2 < np.std(g0) < 3.0  # drawn, not ones
  tx = method.optimizer(0.1)
  state = tx.init(trainable)
  grads = jax.tree.map(jnp.zeros_like, trainable)
  grads["adapters"]["w/kernel"]["g"] = jnp.asarray([1.0, -1.0, 0.0, 2.0])
  updates, _ = tx.update(grads, state, trainable)
  g1 = np.asarray(optax.apply_updates(trainable, updates)["adapters"]["w/kernel"]["g"])
  # Adam's first bias-corrected step moves each gate by lr * sign(grad) (0 where the grad is 0).
  adam = g0 - 0.1 * np.sign([1.0, -1.0, 0.0, 2.0])
  want = released_numpy(adam.astype(np.float32), np.float32(0.3))
  np.testing.assert_allclose(g1, want, rtol=1e-4, atol=1e-6)
  # The paper's variant starts at ones and would threshold by lr * xi = 0.03 after an SGD step.
  paper = methods.make_method(dataclasses.replace(s, options=methods.SoraOptions(xi=0.3)))
  assert np.all(np.asarray(paper.init(jax.random.key(0), params)["adapters"]["w/kernel"]["g"]) == 1.0)
