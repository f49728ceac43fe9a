"""Parameter counts and the paper's Table 4 measures against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmlora_jax as rl


def test_count_params():
  tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), {"c": jnp.zeros((2, 2, 2))}]}
  assert rl.count_params(tree) == 12 + 5 + 8
  assert rl.count_params(jax.eval_shape(lambda: tree)) == 25
  assert rl.count_params({}) == 0


def test_effective_rank_of_constructed_matrices():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  v, _ = np.linalg.qr(rng.normal(size=(9, 9)))
  s = np.zeros((12, 9))
  s[np.arange(5), np.arange(5)] = [3.0, 2.0, 1.0, 0.5, 1e-6]
  m = u @ s @ v.T
  assert rl.effective_rank(m) == 4          # 1e-6 / 3 is below the default rtol
  assert rl.effective_rank(m, rtol=1e-8) == 5
  assert rl.effective_rank(np.zeros((3, 4))) == 0
  assert rl.effective_rank(jnp.asarray(m, jnp.float32)) == 4


def test_ortho_loss_matches_definition_and_spectrum():
  rng = np.random.default_rng(1)
  d = rng.normal(size=(6, 10))
  expected = np.linalg.norm(d @ d.T - np.eye(6), "fro") ** 2
  assert rl.ortho_loss(d) == pytest.approx(expected, rel=1e-12)
  # Through the spectrum: sum over the d_out eigenvalues of (sigma^2 - 1)^2.
  sv = np.linalg.svd(d, compute_uv=False)
  assert rl.ortho_loss(d) == pytest.approx(np.sum((sv**2 - 1) ** 2), rel=1e-9)
  q, _ = np.linalg.qr(rng.normal(size=(10, 6)))
  assert rl.ortho_loss(q.T) == pytest.approx(0.0, abs=1e-20)


def test_ortho_loss_of_an_orthonormal_lora_pair_is_set_by_the_scale():
  # What R-LoRA's penalty drives A and B to: orthonormal rows of A and columns
  # of B. Then dW = (alpha / rank) B A has `rank` singular values alpha / rank,
  # so ||dW dW^T - I||^2 = rank ((alpha / rank)^2 - 1)^2 + (d_out - rank).
  rng = np.random.default_rng(2)
  d_in, d_out, rank = 24, 16, 4
  a = np.linalg.qr(rng.normal(size=(d_in, rank)))[0].T  # (rank, d_in), orthonormal rows
  b = np.linalg.qr(rng.normal(size=(d_out, rank)))[0]  # (d_out, rank), orthonormal columns
  for alpha in (4.0, 16.0):
    spec = rl.LoraSpec(rank=rank, alpha=alpha, targets=("w",))
    dw = rl.delta_weights({"w": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}, spec)["w"]
    scale = alpha / rank
    expected = rank * (scale**2 - 1) ** 2 + (d_out - rank)
    assert rl.ortho_loss(np.asarray(dw, np.float64)) == pytest.approx(expected, rel=1e-4)


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"effective_rank expects a 2-D matrix, got shape \(3,\)"):
    rl.effective_rank(np.zeros(3))
  with pytest.raises(ValueError, match="rtol must be > 0"):
    rl.effective_rank(np.eye(2), rtol=0.0)
  with pytest.raises(ValueError, match="ortho_loss expects a 2-D"):
    rl.ortho_loss(np.zeros((2, 2, 2)))


def test_delta_report_summarises_numpy_measures():
  rng = np.random.default_rng(2)
  deltas = {"x": rng.normal(size=(5, 3)) @ rng.normal(size=(3, 7)), "y": rng.normal(size=(4, 6))}
  report = rl.delta_report(deltas)
  ranks = {"x": np.linalg.matrix_rank(deltas["x"]), "y": np.linalg.matrix_rank(deltas["y"])}
  for path, d in deltas.items():
    assert report["per_matrix"][path]["effective_rank"] == ranks[path]
    expected = np.linalg.norm(d @ d.T - np.eye(d.shape[0])) ** 2
    assert report["per_matrix"][path]["ortho_loss"] == pytest.approx(expected)
  s = report["summary"]
  assert s["num_adapted"] == 2 and s["min_effective_rank"] == 3
  assert s["mean_effective_rank"] == pytest.approx(3.5)
  assert rl.delta_report({}) == {"summary": {}, "per_matrix": {}}


@pytest.mark.parametrize("d_out, r, d_in", [(12, 3, 20), (20, 3, 12), (4, 6, 9), (9, 6, 4)])
def test_factored_singular_values_are_those_of_the_product(d_out, r, d_in):
  rng = np.random.default_rng(3)
  left, right = rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))
  expected = np.linalg.svd(left @ right, compute_uv=False)  # min(d_out, d_in) values
  got = rl.factored_singular_values(left, right)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
  d = left @ right
  measures = rl.delta_report({"x": (left, right)})["per_matrix"]["x"]
  assert measures["ortho_loss"] == pytest.approx(np.linalg.norm(d @ d.T - np.eye(d_out)) ** 2, rel=1e-10)
  assert measures["effective_rank"] == np.linalg.matrix_rank(d) == min(d_out, r, d_in)
  # A rank-deficient left factor (a pruned or gated-off direction) and B = 0 at init.
  left[:, 0] = 0.0
  np.testing.assert_allclose(rl.factored_singular_values(left, right),
                             np.linalg.svd(left @ right, compute_uv=False), rtol=1e-10, atol=1e-10)
  np.testing.assert_array_equal(rl.factored_singular_values(np.zeros((d_out, r)), right), 0.0)
  with pytest.raises(ValueError, match=r"left \(12, 3\) and right \(2, 5\) do not multiply"):
    rl.factored_singular_values(np.zeros((12, 3)), np.zeros((2, 5)))


# One adapter of each registered family (factor names as in rmlora_jax.adapters.*),
# random non-zero factors of a (d_out, d_in) = (10, 14) update.
def _family_adapters(rng):
  n = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "lora/kernel": {"a": n(4, 14), "b": n(10, 4)},
      "adalora/kernel": {"p": n(10, 4), "lam": jnp.asarray([1.5, 0.0, -0.7, 0.2], jnp.float32), "q": n(4, 14)},
      "sora/kernel": {"a": n(4, 14), "b": n(10, 4), "g": jnp.asarray([0.0, 1.0, 0.3, 0.0], jnp.float32)},
      "lora2/kernel": {"U": n(10, 2), "u": n(2, 3), "lam": n(3), "v": n(3, 2), "V": n(2, 14)},
      "zero/kernel": {"a": n(4, 14), "b": jnp.zeros((10, 4), jnp.float32)},  # LoRA at its start
  }


def test_delta_report_from_factors_equals_the_numpy_measures_of_the_dense_update():
  adapters = _family_adapters(np.random.default_rng(4))
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=("kernel",))
  factors = rl.delta_factors(adapters, spec)
  dense = rl.delta_weights(adapters, spec)
  report = rl.delta_report(factors)
  for path, (left, right) in factors.items():
    np.testing.assert_allclose(np.asarray(left) @ np.asarray(right), dense[path], rtol=1e-5, atol=1e-6)
    # Independent reference: the definitions on the dense dW, in NumPy float64.
    d = np.asarray(dense[path], np.float64)
    sv = np.linalg.svd(d, compute_uv=False)
    rank = int(np.sum(sv > 1e-3 * sv[0])) if sv[0] > 0 else 0
    assert report["per_matrix"][path]["effective_rank"] == rank, path
    expected = np.linalg.norm(d @ d.T - np.eye(10)) ** 2
    assert report["per_matrix"][path]["ortho_loss"] == pytest.approx(expected, rel=1e-5), path
    assert report["per_matrix"][path]["frobenius_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-5), path
    rms = np.sqrt(np.mean(sv[:rank] ** 2)) if rank else 0.0
    assert report["per_matrix"][path]["singular_value_rms"] == pytest.approx(rms, rel=1e-5), path
  norms = [np.linalg.norm(np.asarray(d, np.float64)) for d in dense.values()]
  assert report["summary"]["mean_frobenius_norm"] == pytest.approx(np.mean(norms), rel=1e-5)
  # spectra=True: the singular values, NumPy's of the dense dW, for factors and dense updates alike.
  for deltas in (factors, dense):
    with_spectra = rl.delta_report(deltas, spectra=True)["per_matrix"]
    for path, d in dense.items():
      np.testing.assert_allclose(with_spectra[path]["singular_values"],
                                 np.linalg.svd(np.asarray(d, np.float64), compute_uv=False), rtol=1e-5, atol=1e-6)
      assert {k: v for k, v in with_spectra[path].items() if k != "singular_values"} == \
          rl.delta_report(deltas)["per_matrix"][path]
  assert report["per_matrix"]["sora/kernel"]["effective_rank"] == 2  # two gates closed
  assert report["per_matrix"]["adalora/kernel"]["effective_rank"] == 3  # one singular value pruned
  assert report["per_matrix"]["zero/kernel"] == {"effective_rank": 0, "ortho_loss": 10.0, "frobenius_norm": 0.0,
                                                 "singular_value_rms": 0.0}
