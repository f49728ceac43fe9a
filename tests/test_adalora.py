"""AdaLoRA: adapters, penalty, budget schedule, importance and pruning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.family_reference import RefPruner, check_pruned_regression, random_like, ref_budget, ref_is_pruning_step
from rmlora_jax import LoraSpec, delta_weights, merge
from rmlora_jax.adapters.adalora import adalora_penalty, adalora_pruning, adalora_ranks, init_adalora
from rmlora_jax.budget import (
    BudgetSchedule,
    budget_schedule,
    global_keep_mask,
    is_pruning_step,
    triplet_scores,
    update_importance,
)

PARAMS = {
    "enc": {"q": {"kernel": jnp.ones((6, 5))}, "v": {"kernel": jnp.ones((5, 7))}},
    "head": {"kernel": jnp.ones((7, 2))},
}
SPEC = LoraSpec(rank=4, alpha=8.0, targets=(r"enc/.*/kernel",))


def _random_adapters(seed=0):
  ad = init_adalora(jax.random.key(seed), PARAMS, SPEC)
  return jax.tree.map(jnp.asarray, random_like(ad, seed))


def test_init_shapes_and_values():
  ad = init_adalora(jax.random.key(0), PARAMS, SPEC)
  assert set(ad) == {"enc/q/kernel", "enc/v/kernel"}
  chex.assert_shape([ad["enc/q/kernel"]["p"], ad["enc/q/kernel"]["lam"], ad["enc/q/kernel"]["q"]],
                    [(5, 4), (4,), (4, 6)])
  assert np.all(np.asarray(ad["enc/v/kernel"]["lam"]) == 0)
  big = init_adalora(jax.random.key(1), {"w": jnp.ones((400, 300))}, LoraSpec(rank=8, alpha=8.0, targets=("w",)))
  assert abs(float(jnp.std(big["w"]["p"])) - 0.02) < 2e-3
  assert abs(float(jnp.std(big["w"]["q"])) - 0.02) < 2e-3
  assert not np.allclose(big["w"]["p"][:8, :8], big["w"]["q"][:8, :8])


def test_delta_weights_and_merge_match_numpy():
  ad = _random_adapters()
  deltas = delta_weights(ad, SPEC)
  merged = merge(PARAMS, ad, SPEC)
  for path, a in ad.items():
    p, lam, q = (np.asarray(a[n], np.float64) for n in ("p", "lam", "q"))
    ref = SPEC.alpha / SPEC.rank * p @ np.diag(lam) @ q
    np.testing.assert_allclose(deltas[path], ref, rtol=1e-5, atol=1e-6)
    w = merged["enc"][path.split("/")[1]]["kernel"]
    np.testing.assert_allclose(w, 1.0 + ref.T, rtol=1e-5, atol=1e-6)
  assert merged["head"]["kernel"] is PARAMS["head"]["kernel"]


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_penalty_matches_numpy(squared, reduction):
  ad = _random_adapters(1)
  terms = []
  for a in ad.values():
    p, q = np.asarray(a["p"], np.float64), np.asarray(a["q"], np.float64)
    for g in (p.T @ p, q @ q.T):
      sq = np.sum((g - np.eye(4)) ** 2)
      terms.append(sq if squared else np.sqrt(sq))
  ref = np.sum(terms) if reduction == "sum" else np.mean(terms)
  got = adalora_penalty(ad, squared=squared, reduction=reduction)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  grads = jax.grad(lambda a: adalora_penalty(a, squared=squared, reduction=reduction))(ad)
  assert np.all(np.asarray(grads["enc/q/kernel"]["lam"]) == 0)


def test_penalty_rejects_other_families():
  with pytest.raises(ValueError, match="adalora_penalty.*'a', 'b'"):
    adalora_penalty({"x": {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2))}})


SCHEDULES = [
    dict(initial_rank=12, target_rank=8, total_steps=100, t_init=10, t_final=20, delta_t=5),
    dict(initial_rank=6, target_rank=1, total_steps=37, t_init=0, t_final=0, delta_t=3),
    dict(initial_rank=3, target_rank=3, total_steps=9, t_init=4, t_final=4, delta_t=1),
]


@pytest.mark.parametrize("kw", SCHEDULES)
def test_budget_schedule_matches_reference(kw):
  s = BudgetSchedule(**kw)
  steps = np.arange(0, kw["total_steps"] + 5)
  n = 3
  ref = [ref_budget(int(t), initial=kw["initial_rank"] * n, target=kw["target_rank"] * n,
                    total=kw["total_steps"], t_init=kw["t_init"], t_final=kw["t_final"]) for t in steps]
  np.testing.assert_array_equal(budget_schedule(s, steps, n), ref)
  np.testing.assert_array_equal(jax.jit(lambda t: budget_schedule(s, t, n))(jnp.asarray(steps)), ref)
  assert budget_schedule(s, 1, n) == (ref[1])
  ref_mask = [ref_is_pruning_step(int(t), total=kw["total_steps"], t_init=kw["t_init"],
                                  t_final=kw["t_final"], delta_t=kw["delta_t"]) for t in steps]
  np.testing.assert_array_equal(is_pruning_step(s, steps), ref_mask)
  np.testing.assert_array_equal(jax.jit(lambda t: is_pruning_step(s, t))(jnp.asarray(steps)), ref_mask)


def test_budget_schedule_is_monotone_with_peft_endpoints():
  s = BudgetSchedule(initial_rank=12, target_rank=8, total_steps=1000, t_init=100, t_final=200, delta_t=10)
  b = budget_schedule(s, np.arange(1, 1001), num_adapters=5)
  assert b[0] == 60 and b[99] == 60 and b[-1] == 40 and b[800 - 1] == 40
  assert np.all(np.diff(b) <= 0)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(initial_rank=4, target_rank=5), "target_rank"),
        (dict(t_init=50, t_final=50), "t_init \\+ t_final"),
        (dict(t_init=60, t_final=50), "t_init \\+ t_final"),
        (dict(delta_t=0), "delta_t"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=0.0), "beta2"),
        (dict(t_final=-1), "t_final"),
        (dict(initial_rank=0), "initial_rank"),
    ],
)
def test_schedule_rejects_bad_settings(kw, field):
  base = dict(initial_rank=4, target_rank=2, total_steps=100, t_init=10, t_final=10, delta_t=1)
  with pytest.raises(ValueError, match=f"BudgetSchedule.*{field}"):
    BudgetSchedule(**{**base, **kw})


def test_importance_and_scores_match_numpy():
  rng = np.random.default_rng(0)
  shapes = {"p": (5, 3), "lam": (3,), "q": (3, 6)}
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
  ipt = {n: rng.random(s).astype(np.float32) for n, s in shapes.items()}
  unc = {n: rng.random(s).astype(np.float32) for n, s in shapes.items()}
  grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
  new_i, new_u = update_importance(ipt, unc, params, grads, beta1=0.8, beta2=0.7)
  for n in shapes:
    s = np.abs(params[n] * grads[n])
    i_ref = 0.8 * ipt[n] + 0.2 * s
    np.testing.assert_allclose(new_i[n], i_ref, rtol=1e-6)
    np.testing.assert_allclose(new_u[n], 0.7 * unc[n] + 0.3 * np.abs(s - i_ref), rtol=1e-5, atol=1e-7)
  sc = {n: np.asarray(new_i[n]) * np.asarray(new_u[n]) for n in shapes}
  ref = [sc["lam"][i] + sc["q"][i, :].mean() + sc["p"][:, i].mean() for i in range(3)]
  np.testing.assert_allclose(triplet_scores(new_i, new_u, {"p": 1, "q": 0}), ref, rtol=1e-5)


def test_global_keep_mask_keeps_exactly_budget_with_ties():
  scores = {"b": jnp.asarray([0.5, 0.0, 0.9]), "a": jnp.asarray([0.0, 0.5, 0.1])}
  keep = global_keep_mask(scores, 3)
  assert keep["a"].tolist() == [False, True, False]  # a's 0.5 precedes b's 0.5
  assert keep["b"].tolist() == [True, False, True]
  zeros = global_keep_mask({"a": jnp.zeros(4), "b": jnp.zeros(4)}, jnp.asarray(5))
  assert int(sum(k.sum() for k in zeros.values())) == 5


def test_a_stacked_adapter_ranks_as_its_layers_at_their_unrolled_paths():
  # Twelve layers stacked (a scanned model) beside a plain adapter, scores with many ties: the kept
  # set is the unrolled model's, ties going by the layers' own paths in sorted order
  # (model/layers_10 before model/layers_2), then by index.
  rng = np.random.default_rng(0)
  stacked = rng.choice([0.0, 0.5, 1.0], (12, 3)).astype(np.float32)
  plain = rng.choice([0.0, 0.5, 1.0], 3).astype(np.float32)
  budget = 17
  keep = global_keep_mask({"model/layers/mlp/kernel": jnp.asarray(stacked), "model/norm_proj/kernel": jnp.asarray(plain)},
                          budget)
  entries = [(-stacked[i, j], f"model/layers_{i}/mlp/kernel", j) for i in range(12) for j in range(3)]
  entries += [(-plain[j], "model/norm_proj/kernel", j) for j in range(3)]
  kept = set(e[1:] for e in sorted(entries)[:budget])
  want = np.array([[(f"model/layers_{i}/mlp/kernel", j) in kept for j in range(3)] for i in range(12)])
  assert keep["model/layers/mlp/kernel"].shape == (12, 3)
  np.testing.assert_array_equal(keep["model/layers/mlp/kernel"], want)
  np.testing.assert_array_equal(keep["model/norm_proj/kernel"], [("model/norm_proj/kernel", j) in kept for j in range(3)])
  with pytest.raises(ValueError, match=r"scores at 'enc/q' have shape \(2, 3\)"):
    global_keep_mask({"enc/q": jnp.zeros((2, 3))}, 1)  # two rows, but not at a stacked path


def test_pruning_step_under_jit_matches_reference():
  kw = dict(initial_rank=4, target_rank=2, total_steps=12, t_init=2, t_final=3, delta_t=2, beta1=0.8, beta2=0.9)
  schedule = BudgetSchedule(**kw)
  lr = 0.05
  tx = adalora_pruning(optax.sgd(lr), schedule)
  ad = _random_adapters(3)
  tree = {"adapters": ad, "head": jnp.ones((3,))}
  state = tx.init(tree)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(tree, state, grads):
    updates, state = tx.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state

  ref = RefPruner(slices={"p": lambda x, i: x[:, i], "q": lambda x, i: x[i, :]}, total=12, lr=lr,
                  **{k: v for k, v in kw.items() if k != "total_steps"})
  ref_ad = jax.tree.map(np.asarray, ad)
  ref_head = np.ones((3,), np.float32)
  for t in range(1, 15):
    grads = jax.tree.map(jnp.asarray, random_like(tree, 100 + t))
    tree, state = step(tree, state, grads)
    g_np = jax.tree.map(np.asarray, grads)
    ref_ad, ref_head = ref.step(ref_ad, g_np["adapters"], ref_head, g_np["head"])
    chex.assert_trees_all_close(tree["adapters"], ref_ad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tree["head"], ref_head, rtol=1e-6)
    for path in ad:
      assert state.keep["adapters/" + path].tolist() == ref.keep[path], (t, path)
  ranks = adalora_ranks(tree["adapters"])
  assert sum(ranks.values()) == 2 * 2
  for path, a in tree["adapters"].items():
    assert np.all(np.asarray(a["lam"])[~np.asarray(state.keep["adapters/" + path])] == 0.0)


def test_update_requires_params_and_matching_rank():
  schedule = BudgetSchedule(initial_rank=3, target_rank=2, total_steps=10, t_init=1, t_final=1)
  tx = adalora_pruning(optax.sgd(0.1), schedule)
  ad = _random_adapters()
  with pytest.raises(ValueError, match="initial_rank=3"):
    tx.init(ad)
  with pytest.raises(ValueError, match="no adapters"):
    tx.init({"w": jnp.ones(3)})
  ok = adalora_pruning(optax.sgd(0.1), BudgetSchedule(initial_rank=4, target_rank=2, total_steps=10, t_init=1, t_final=1))
  with pytest.raises(ValueError, match="needs params"):
    ok.update(ad, ok.init(ad))


def test_toy_regression_learns_and_reaches_target_budget():
  spec = LoraSpec(rank=4, alpha=4.0, targets=(r"dense_.*/kernel",))
  check_pruned_regression(init_adalora, spec, adalora_pruning, adalora_penalty, adalora_ranks,
                          initial_rank=4, target_rank=2, seed=0)


def test_budget_ranks_follow_the_papers_2r_to_r_unless_set():
  from rmlora_jax.adapters.adalora import budget_ranks
  # RM-LoRA Table 2: AdaLoRA "16 / 8" beside LoRA R = 8, "8 / 4" beside R = 4.
  assert budget_ranks(8) == (16, 8) and budget_ranks(4) == (8, 4)
  assert budget_ranks(8, 12, 6) == (12, 6)
  assert budget_ranks(8, 12) == (12, 8) and budget_ranks(8, -1, 3) == (16, 3)
