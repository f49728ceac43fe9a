"""The orthogonality penalty (RM-LoRA Eq. 10) against NumPy and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmlora_jax as rl


def _adapters(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "l1/kernel": {"a": rng.normal(size=(3, 7)), "b": rng.normal(size=(5, 3))},
      "l2/kernel": {"a": rng.normal(size=(2, 4)), "b": rng.normal(size=(6, 2))},
      # l1's shapes again: factors of one shape share a batched Gram product.
      "l3/kernel": {"a": rng.normal(size=(3, 7)), "b": rng.normal(size=(5, 3))},
  }


def _numpy_terms(adapters):
  terms = []
  for ad in adapters.values():
    a, b = ad["a"], ad["b"]
    terms.append(np.linalg.norm(a @ a.T - np.eye(a.shape[0]), "fro"))
    terms.append(np.linalg.norm(b.T @ b - np.eye(b.shape[1]), "fro"))
  return np.array(terms)


def _as_jax(adapters):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_numpy(squared, reduction):
  np_ads = _adapters()
  terms = _numpy_terms(np_ads)
  if squared:
    terms = terms**2
  expected = terms.sum() if reduction == "sum" else terms.mean()
  got = jax.jit(lambda a: rl.ortho_penalty(a, squared=squared, reduction=reduction))(_as_jax(np_ads))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_large_factors_beside_small_ones_match_numpy(reduction):
  """Factors of `STACK_BELOW` elements or more get a Gram each; the small ones of one shape share one."""
  rng = np.random.default_rng(5)
  half = rl.penalty.STACK_BELOW // 2
  np_ads = dict(_adapters(5))
  for i in (4, 5):  # two large adapters of one shape, at the threshold and just above it
    np_ads[f"l{i}/kernel"] = {"a": 0.05 * rng.normal(size=(2, half)), "b": 0.05 * rng.normal(size=(half + 1, 2))}
  terms = _numpy_terms(np_ads) ** 2
  got = jax.jit(lambda a: rl.ortho_penalty(a, reduction=reduction))(_as_jax(np_ads))
  np.testing.assert_allclose(got, terms.sum() if reduction == "sum" else terms.mean(), rtol=1e-5)


def test_zero_for_orthonormal_factors():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(9, 4)))  # (9, 4) orthonormal columns
  ads = {"w": {"a": jnp.asarray(q.T[:4], jnp.float32), "b": jnp.asarray(q, jnp.float32)}}
  assert float(rl.ortho_penalty(ads)) < 1e-10


def test_lora_init_value():
  # At init b = 0, so ||b^T b - I||^2 = rank exactly.
  params = {"w": jnp.zeros((20, 10))}
  spec = rl.LoraSpec(rank=4, alpha=1.0, targets=("w",), init_std=0.0)
  ads = rl.init_lora(jax.random.key(0), params, spec)
  # a = 0 too (init_std 0): both terms are rank.
  np.testing.assert_allclose(rl.ortho_penalty(ads), 8.0)


@pytest.mark.parametrize("squared", [True, False])
def test_gradient_matches_finite_differences(squared):
  np_ads = _adapters(2)
  ads64 = jax.tree.map(lambda x: np.asarray(x, np.float64), np_ads)

  def f_np(flat_vec, treedef, shapes):
    leaves, i = [], 0
    for s in shapes:
      n = int(np.prod(s))
      leaves.append(flat_vec[i:i + n].reshape(s))
      i += n
    return float(np.sum(_numpy_terms(jax.tree.unflatten(treedef, leaves)) ** (2 if squared else 1)))

  leaves, treedef = jax.tree.flatten(ads64)
  shapes = [l.shape for l in leaves]
  vec = np.concatenate([l.ravel() for l in leaves])
  eps = 1e-6
  fd = np.array([(f_np(vec + eps * e, treedef, shapes) - f_np(vec - eps * e, treedef, shapes)) / (2 * eps)
                 for e in np.eye(vec.size)])
  g = jax.grad(lambda a: rl.ortho_penalty(a, squared=squared))(_as_jax(np_ads))
  got = np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(g)])
  np.testing.assert_allclose(got, fd, rtol=2e-3, atol=2e-3)


def test_bad_reduction_and_factors():
  with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\), got 'max'"):
    rl.ortho_penalty(_as_jax(_adapters()), reduction="max")
  with pytest.raises(ValueError, match=r"adapter at 'w' has factors \['lam', 'p', 'q'\]"):
    rl.ortho_penalty({"w": {"p": jnp.zeros((3, 2)), "lam": jnp.zeros(2), "q": jnp.zeros((2, 3))}})
