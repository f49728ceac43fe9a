"""The method registry: every family builds from typed settings; RM-LoRA is LoRA + penalty + mask."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmlora_jax as rl
from rmlora_jax import methods

PARAMS = {
    "layer": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(12, 10)), jnp.float32),
              "bias": jnp.zeros((10,), jnp.float32)},
    "head": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(10, 3)), jnp.float32)},
}
SPEC = rl.LoraSpec(rank=4, alpha=8.0, targets=(r"layer/kernel",))


def settings(name, **kwargs):
  spec = None if name == "full_ft" else (
      rl.Lora2Spec(k=4, r=4, alpha=8.0, targets=SPEC.targets) if name == "lora2" else SPEC)
  return methods.MethodSettings(name=name, spec=spec, train_patterns=(r"head/.*",), total_steps=20, **kwargs)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_registered_method_builds_trains_and_reports_ranks(name):
  method = methods.make_method(settings(name))
  trainable = method.init(jax.random.key(0), PARAMS)
  tx = method.optimizer(1e-2)
  state = tx.init(trainable)
  x = jnp.ones((5, 12))

  def loss(tr):
    p = method.assemble(tr, method.frozen(PARAMS))
    return jnp.sum((x @ p["layer"]["kernel"] @ p["head"]["kernel"] - 1.0) ** 2) + method.penalty(tr)

  grads = jax.grad(loss)(trainable)
  updates, _ = tx.update(grads, state, trainable)
  moved = optax.apply_updates(trainable, updates)
  assert float(loss(moved)) < float(loss(trainable))
  if name == "full_ft":
    assert method.adapters(trainable) == {} and method.frozen(PARAMS) == {}
  else:
    assert list(method.adapters(trainable)) == ["layer/kernel"]
    assert list(trainable["head"]) == ["head/kernel"]
    assert method.ranks(moved) == {"layer/kernel": 4}  # AdaLoRA's lam starts at 0: ranks after a step


def test_penalties_follow_the_composition():
  adapters = {"layer/kernel": {"a": jnp.asarray(np.random.default_rng(2).normal(size=(4, 12)), jnp.float32),
                               "b": jnp.asarray(np.random.default_rng(3).normal(size=(10, 4)), jnp.float32)}}
  trainable = {"adapters": adapters, "head": {}}
  a, b = (np.asarray(adapters["layer/kernel"][k], np.float64) for k in ("a", "b"))
  # The authors' form (the default options): plain Frobenius norms averaged over the two terms.
  plain = (np.linalg.norm(a @ a.T - np.eye(4)) + np.linalg.norm(b.T @ b - np.eye(4))) / 2
  squared_sum = np.linalg.norm(a @ a.T - np.eye(4)) ** 2 + np.linalg.norm(b.T @ b - np.eye(4)) ** 2
  opts = methods.RmOptions(ortho_weight=0.3)
  for name, want in (("lora", 0.0), ("gm_lora", 0.0), ("r_lora", 0.3 * plain), ("rm_lora", 0.3 * plain)):
    got = methods.make_method(settings(name, options=opts)).penalty(trainable)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=name)
  paper = methods.RmOptions(ortho_weight=0.3, ortho_squared=True, ortho_reduction="sum")
  np.testing.assert_allclose(float(methods.make_method(settings("rm_lora", options=paper)).penalty(trainable)),
                             0.3 * squared_sum, rtol=1e-5)


@pytest.mark.parametrize("name, moving", [("lora", 4), ("r_lora", 4), ("gm_lora", 2), ("rm_lora", 2)])
def test_masked_methods_move_r_hat_directions_per_step(name, moving):
  method = methods.make_method(settings(name, options=methods.RmOptions(num_directions=2)))
  trainable = method.init(jax.random.key(0), PARAMS)
  trainable["adapters"]["layer/kernel"]["b"] = jnp.ones((10, 4))
  tx = method.optimizer(1e-2)
  state = tx.init(trainable)
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, state = tx.update(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    rows = np.any(np.asarray(updates["adapters"]["layer/kernel"]["a"]) != 0, axis=1)
    cols = np.any(np.asarray(updates["adapters"]["layer/kernel"]["b"]) != 0, axis=0)
    assert rows.sum() == moving and np.array_equal(rows, cols)
    assert np.all(np.asarray(updates["head"]["head/kernel"]) != 0)  # the head is never masked


def test_settings_errors_name_the_value_and_the_place():
  with pytest.raises(ValueError, match=r"MethodSettings.name='dora' is unknown; choose one of \('full_ft'"):
    methods.make_method(settings("lora").__class__(name="dora", spec=SPEC))
  with pytest.raises(ValueError, match=r"method 'lora' needs an adapter spec"):
    methods.make_method(methods.MethodSettings(name="lora"))
  with pytest.raises(ValueError, match=r"method 'sora' takes options of type SoraOptions, got RmOptions"):
    methods.make_method(settings("sora", options=methods.RmOptions()))
  with pytest.raises(ValueError, match=r"RmOptions.num_directions=5 must be in 1..rank=4"):
    methods.make_method(settings("rm_lora", options=methods.RmOptions(num_directions=5)))
  with pytest.raises(ValueError, match=r"RmOptions.mask_mode must be one of"):
    methods.RmOptions(mask_mode="both")
  with pytest.raises(ValueError, match=r"RmOptions.mask_sets must be one of \('shared', 'independent'\), got 'v2'"):
    methods.RmOptions(mask_sets="v2")
  with pytest.raises(ValueError, match=r"RmOptions.mask_start_step must be a non-negative integer, got -1"):
    methods.RmOptions(mask_start_step=-1)
  with pytest.raises(ValueError, match=r"RmOptions.emulate_frozen_head must be True or False, got 1"):
    methods.RmOptions(emulate_frozen_head=1)
  with pytest.raises(ValueError, match=r"AdaLoraOptions.t_init_ratio must be in \[0, 1\], got 1.5"):
    methods.AdaLoraOptions(t_init_ratio=1.5)
  assert methods.AdaLoraOptions().schedule(16, 100).target_rank == 8  # unset: the papers' 2R -> R
  with pytest.raises(ValueError, match=r"AdaLoraOptions.target_rank=6 must be in 1..4"):
    methods.make_method(settings("adalora", options=methods.AdaLoraOptions(target_rank=6)))
  with pytest.raises(ValueError, match=r"MethodSettings.adapter_apply must be one of"):
    settings("lora", adapter_apply="fused")


def test_low_rank_and_merge_assemble_the_same_model():
  trainable = methods.make_method(settings("lora")).init(jax.random.key(0), PARAMS)
  trainable["adapters"]["layer/kernel"]["b"] = jnp.asarray(np.random.default_rng(4).normal(size=(10, 4)), jnp.float32)
  merged = methods.make_method(settings("lora", adapter_apply="merge")).assemble(trainable, PARAMS)
  low = methods.make_method(settings("lora", adapter_apply="low_rank")).assemble(trainable, PARAMS)
  assert isinstance(low["layer"]["kernel"], rl.LowRankKernel)
  a, b = (np.asarray(trainable["adapters"]["layer/kernel"][k]) for k in ("a", "b"))
  want = np.asarray(PARAMS["layer"]["kernel"]) + (8.0 / 4) * (b @ a).T  # W0 + dW^T, dW = (alpha/r) b a
  np.testing.assert_allclose(np.asarray(merged["layer"]["kernel"]), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(low["layer"]["kernel"].merged()), want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(merged["head"], low["head"])


def test_registry_entries_are_what_the_trainer_and_configs_read():
  assert set(methods.METHODS) == {"full_ft", "lora", "r_lora", "gm_lora", "rm_lora", "adalora", "sora", "lora2"}
  assert {m.family for m in methods.METHODS.values()} == {"full", "lora", "adalora", "sora", "lora2"}
  assert [n for n, m in methods.METHODS.items() if not m.adapts] == ["full_ft"]
  assert dataclasses.is_dataclass(methods.METHODS["rm_lora"])


@pytest.mark.parametrize("name", ["adalora", "lora2"])
def test_budget_methods_score_the_clipped_gradient(name):
  """As PEFT: importance after clipping. First step: I = (1 - beta1) |theta * clip(g)|."""
  method = methods.make_method(settings(name, max_grad_norm=1e-3))
  trainable = method.init(jax.random.key(0), PARAMS)
  trainable = jax.tree.map(lambda x: x + 0.5, trainable)  # lam != 0, so every factor has a sensitivity
  tx = method.optimizer(1e-2)
  state = tx.init(trainable)
  grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), trainable)
  _, state = tx.update(grads, state, trainable)
  pruning = [s for s in state if hasattr(s, "ipt_by_param")]
  assert len(pruning) == 1
  leaves = jax.tree.leaves(grads)
  scale = 1e-3 / np.sqrt(sum(float(np.sum(np.asarray(g) ** 2)) for g in leaves))  # clip_by_global_norm's factor
  ad = trainable["adapters"]["layer/kernel"]
  for factor, ipt in pruning[0].ipt["adapters/layer/kernel"].items():
    want = (1 - 0.85) * np.abs(np.asarray(ad[factor]) * 3.0 * scale)
    np.testing.assert_allclose(np.asarray(ipt), want, rtol=1e-4, err_msg=factor)
