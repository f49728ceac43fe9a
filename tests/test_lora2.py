"""LoRA²: adapters, the three orthogonality penalties, the cheap score and pruning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.family_reference import RefPruner, check_pruned_regression, random_like
from rmlora_jax import attach, delta_weights, merge
from rmlora_jax.budget import BudgetSchedule
from rmlora_jax.adapters.lora2 import (Lora2Options, Lora2Spec, init_lora2, lora2_penalty, lora2_pruning, lora2_ranks,
                                      lora2_released_penalty)

PARAMS = {"a": {"kernel": jnp.ones((9, 7))}, "b": {"kernel": jnp.ones((7, 8))}, "c": jnp.ones((3,))}
SPEC = Lora2Spec(k=5, r=3, alpha=6.0, targets=(r"[ab]/kernel",))


def _random_adapters(seed=0):
  return jax.tree.map(jnp.asarray, random_like(init_lora2(jax.random.key(seed), PARAMS, SPEC), seed))


def test_init_shapes_and_values():
  ad = init_lora2(jax.random.key(0), PARAMS, SPEC)
  a = ad["a/kernel"]
  chex.assert_shape([a["U"], a["u"], a["lam"], a["v"], a["V"]], [(7, 5), (5, 3), (3,), (3, 5), (5, 9)])
  assert np.all(np.asarray(a["lam"]) == 0)
  assert np.allclose(delta_weights(ad, SPEC)["a/kernel"], 0)
  for n in ("U", "u", "v", "V"):
    assert 0.005 < float(jnp.std(a[n])) < 0.04


def test_delta_weights_and_merge_match_numpy():
  ad = _random_adapters()
  deltas = delta_weights(ad, SPEC)
  merged = merge(PARAMS, ad, SPEC)
  for path, a in ad.items():
    f = {n: np.asarray(x, np.float64) for n, x in a.items()}
    ref = 6.0 / 3 * f["U"] @ f["u"] @ np.diag(f["lam"]) @ f["v"] @ f["V"]
    np.testing.assert_allclose(deltas[path], ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(merged[path.split("/")[0]]["kernel"], 1.0 + ref.T, rtol=1e-4, atol=1e-6)


def _ref_penalty(ad, terms, squared):
  out = []
  for a in ad.values():
    f = {n: np.asarray(x, np.float64) for n, x in a.items()}
    pairs = {"UV": (f["U"], f["V"]), "uv": (f["u"], f["v"]), "PQ": (f["U"] @ f["u"], f["v"] @ f["V"])}
    for t in terms:
      x, y = pairs[t]
      for g in (x.T @ x, y @ y.T):
        sq = np.sum((g - np.eye(len(g))) ** 2)
        out.append(sq if squared else np.sqrt(sq))
  return out


@pytest.mark.parametrize("terms", [("UV", "uv", "PQ"), ("UV",), ("uv", "PQ"), ()])
@pytest.mark.parametrize("squared, reduction", [(True, "sum"), (False, "mean")])
def test_penalty_terms_match_numpy(terms, squared, reduction):
  ad = _random_adapters(1)
  ref = _ref_penalty(ad, terms, squared)
  ref = (np.sum(ref) if reduction == "sum" else np.mean(ref)) if ref else 0.0
  got = lora2_penalty(ad, terms=terms, squared=squared, reduction=reduction)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


# Three kernels of one shape: their adapters share batched products in the
# penalty and in `attach` (Family.batch_factored).
SHARED = {"a": {"kernel": jnp.ones((9, 7))}, "a2": {"kernel": jnp.zeros((9, 7))}, "a3": {"kernel": jnp.ones((9, 7))},
          "b": {"kernel": jnp.ones((7, 8))}}
SHARED_SPEC = Lora2Spec(k=2, r=3, alpha=6.0, targets=(r"(a\d?|b)/kernel",))


def test_adapters_of_one_shape_give_numpys_penalty_and_low_rank_kernels():
  ad = jax.tree.map(jnp.asarray, random_like(init_lora2(jax.random.key(4), SHARED, SHARED_SPEC), 4))
  np.testing.assert_allclose(lora2_penalty(ad), np.sum(_ref_penalty(ad, ("UV", "uv", "PQ"), True)), rtol=1e-5)
  np.testing.assert_allclose(lora2_penalty(ad, terms=("PQ",), squared=False, reduction="mean"),
                             np.mean(_ref_penalty(ad, ("PQ",), False)), rtol=1e-5)
  attached = attach(SHARED, ad, SHARED_SPEC)
  for path, a in ad.items():
    f = {n: np.asarray(x, np.float64) for n, x in a.items()}
    kernel = attached[path.split("/")[0]]["kernel"]
    np.testing.assert_allclose(np.asarray(kernel.left) @ np.asarray(kernel.right),
                               6.0 / 3 * f["U"] @ f["u"] @ np.diag(f["lam"]) @ f["v"] @ f["V"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(kernel.w0, SHARED[path.split("/")[0]]["kernel"])


def test_released_penalty_is_four_k_by_k_grams_in_numpy():
  """The released code's compute_orth_regu, written in NumPy: lora_A = V, lora_B = v, lora_aa = u, lora_bb = U."""
  ad = _random_adapters(2)
  terms = []
  for a in ad.values():
    f = {n: np.asarray(x, np.float64) for n, x in a.items()}
    for g in (f["V"] @ f["V"].T, f["v"].T @ f["v"], f["u"] @ f["u"].T, f["U"].T @ f["U"]):
      assert g.shape == (SPEC.k, SPEC.k)
      terms.append(np.linalg.norm(g - np.eye(SPEC.k)))
  np.testing.assert_allclose(lora2_released_penalty(ad), np.mean(terms), rtol=1e-5)
  np.testing.assert_allclose(lora2_released_penalty(ad, squared=True, reduction="sum"),
                             np.sum(np.square(terms)), rtol=1e-5)


def test_paper_penalty_at_k_below_r_has_a_floor_the_released_one_has_not():
  """At k = 1, r = 6 the paper's (u, v) Grams are 6 x 6 of rank 1: each term is at least sqrt(5)."""
  spec = Lora2Spec(k=1, r=6, alpha=6.0, targets=(r"[ab]/kernel",))
  ad = init_lora2(jax.random.key(0), PARAMS, spec)
  for a in ad.values():  # the best a rank-one Gram can do: a unit vector (G - I has r - 1 unit eigenvalues)
    for n in ("U", "u", "v", "V"):
      a[n] = a[n] / jnp.linalg.norm(a[n])
  uv = lora2_penalty(ad, terms=("uv",), squared=False, reduction="mean")
  np.testing.assert_allclose(uv, np.sqrt(5.0), rtol=1e-5)
  np.testing.assert_allclose(lora2_released_penalty(ad), 0.0, atol=1e-5)


def test_bad_settings_raise():
  with pytest.raises(ValueError, match=r"Lora2Options.variant must be one of \('paper', 'released'\), got 'code'"):
    Lora2Options(variant="code")
  with pytest.raises(ValueError, match="Lora2Spec.k"):
    Lora2Spec(k=0, r=1, alpha=1.0, targets=("x",))
  with pytest.raises(ValueError, match="Lora2Spec.alpha"):
    Lora2Spec(k=3, r=2, alpha=float("nan"), targets=("x",))
  with pytest.raises(ValueError, match="Lora2Spec.k=8 exceeds"):
    init_lora2(jax.random.key(0), PARAMS, Lora2Spec(k=8, r=2, alpha=1.0, targets=("a/kernel",)))
  with pytest.raises(ValueError, match="Lora2Spec.targets"):
    init_lora2(jax.random.key(0), PARAMS, Lora2Spec(k=2, r=2, alpha=1.0, targets=("nothing",)))
  with pytest.raises(ValueError, match="'uV'"):
    lora2_penalty(_random_adapters(), terms=("uV",))


def test_pruning_step_under_jit_matches_reference_and_skips_U_V():
  kw = dict(initial_rank=3, target_rank=1, total_steps=10, t_init=1, t_final=3, delta_t=2, beta1=0.85, beta2=0.85)
  lr = 0.05
  tx = lora2_pruning(optax.sgd(lr), BudgetSchedule(**kw))
  ad = _random_adapters(2)
  state = tx.init(ad)
  assert set(state.ipt["a/kernel"]) == {"lam", "u", "v"}  # U and V are never scored
  step = jax.jit(lambda a, s, g: (lambda u, s2: (optax.apply_updates(a, u), s2))(*tx.update(g, s, a)))
  ref = RefPruner(slices={"u": lambda x, i: x[:, i], "v": lambda x, i: x[i, :]}, total=10, lr=lr,
                  **{k: v for k, v in kw.items() if k != "total_steps"})
  ref_ad = jax.tree.map(np.asarray, ad)
  for t in range(1, 13):
    grads = jax.tree.map(jnp.asarray, random_like(ad, 50 + t))
    ad, state = step(ad, state, grads)
    ref_ad, _ = ref.step(ref_ad, jax.tree.map(np.asarray, grads), np.zeros(1), np.zeros(1))
    chex.assert_trees_all_close(ad, ref_ad, rtol=1e-5, atol=1e-6)
    assert {p: k.tolist() for p, k in state.keep.items()} == ref.keep, t
  assert sum(lora2_ranks(ad).values()) == 2


def test_toy_regression_learns_and_reaches_target_budget():
  spec = Lora2Spec(k=4, r=3, alpha=3.0, targets=(r"dense_.*/kernel",))
  check_pruned_regression(init_lora2, spec, lora2_pruning, lora2_penalty, lora2_ranks,
                          initial_rank=3, target_rank=2, seed=1)


def test_headline_setting_k1_r8_counts_and_trains():
  """The paper's LoRA² (k = 1) beside r = 8: k (d_in + d_out) + r (2k + 1) parameters per matrix."""
  from rmlora_jax import accounting
  params = {"w": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(12, 10)), jnp.float32)}}
  spec = Lora2Spec(k=1, r=8, alpha=8.0, targets=(r"w/kernel",))
  ad = init_lora2(jax.random.key(0), params, spec)["w/kernel"]
  chex.assert_shape([ad["U"], ad["u"], ad["lam"], ad["v"], ad["V"]], [(10, 1), (1, 8), (8,), (8, 1), (1, 12)])
  counts = accounting.adapter_param_counts(ad)
  assert counts.trainable == 1 * (12 + 10) + 8 * (2 * 1 + 1) == 46
  # Training moves the loss; dW = U u diag(lam) v V has rank at most k = 1.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 12)), jnp.float32)
  y = x @ jnp.asarray(np.random.default_rng(2).normal(size=(12, 10)), jnp.float32) * 0.1
  adapters = {"w/kernel": ad}
  loss = lambda a: jnp.mean((x @ merge(params, a, spec)["w"]["kernel"] - x @ params["w"]["kernel"] - y) ** 2)
  tx = optax.adam(1e-2)
  state = tx.init(adapters)
  first = float(loss(adapters))
  for _ in range(100):
    grads = jax.grad(loss)(adapters)
    updates, state = tx.update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  assert float(loss(adapters)) < 0.8 * first
  dw = np.asarray(delta_weights(adapters, spec)["w/kernel"])
  assert np.linalg.matrix_rank(dw, tol=1e-6 * np.abs(dw).max()) == 1



def test_adapters_stacked_over_layers_give_each_layers_update_and_counts():
  # A scanned model's three layers: factors with the layer axis first, one layer's lam all zero.
  rng = np.random.default_rng(4)
  L, d_in, d_out, k, r = 3, 9, 7, 5, 3
  ad = {n: rng.standard_normal(s).astype(np.float32)
        for n, s in {"U": (L, d_out, k), "u": (L, k, r), "v": (L, r, k), "V": (L, k, d_in)}.items()}
  ad["lam"] = np.array([[0.5, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, -1.0, 3.0]], np.float32)
  params = {"model": {"layers": {"w": {"kernel": jnp.zeros((L, d_in, d_out))}}}}
  spec = Lora2Spec(k=k, r=r, alpha=6.0, targets=(r"model/layers_\d+/w/kernel",))
  stacked = {"model/layers/w/kernel": jax.tree.map(jnp.asarray, ad)}
  merged = merge(params, stacked, spec)["model"]["layers"]["w"]["kernel"]
  f = {n: x.astype(np.float64) for n, x in ad.items()}
  for i in range(L):
    ref = 6.0 / 3 * f["U"][i] @ f["u"][i] @ np.diag(f["lam"][i]) @ f["v"][i] @ f["V"][i]
    np.testing.assert_allclose(merged[i], ref.T, rtol=1e-4, atol=1e-5)
  from rmlora_jax import accounting
  counts = accounting.adapter_param_counts(stacked["model/layers/w/kernel"])
  outer = k * (d_in + d_out)
  assert counts.trainable == L * (outer + r * (2 * k + 1))
  assert counts.inference == (outer + 2 * (2 * k + 1)) + 0 + (outer + 3 * (2 * k + 1))
  assert lora2_ranks(stacked) == {"model/layers_0/w/kernel": 2, "model/layers_1/w/kernel": 0,
                                  "model/layers_2/w/kernel": 3}
