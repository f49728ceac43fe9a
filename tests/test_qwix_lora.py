"""qwix LoRA parameters under this library's transforms, against NumPy on qwix's own factors."""

import numpy as np
import optax
import pytest

qwix = pytest.importorskip("qwix")

import jax
import jax.numpy as jnp
from flax import nnx

import rmlora_jax as rl
from rmlora_jax import qwix_lora

RANK, ALPHA = 4, 8.0


class Net(nnx.Module):
  """Two Linear layers and an einsum layer (contracting 8 into heads 2 x 3)."""

  def __init__(self, rngs):
    self.up = nnx.Linear(6, 8, rngs=rngs)
    self.heads = nnx.Einsum("bd,dhk->bhk", (8, 2, 3), rngs=rngs)
    self.out = nnx.Linear(6, 1, rngs=rngs)

  def __call__(self, x):
    h = self.heads(jax.nn.tanh(self.up(x)))
    return self.out(h.reshape(h.shape[0], -1))[:, 0]


def lora_model(seed=0):
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(16, 6)), jnp.float32)
  model = qwix.apply_lora_to_model(Net(nnx.Rngs(seed)), qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA),
                                   x, rngs=nnx.Rngs(seed + 1))
  # B starts at zero in qwix as in the paper; give it values so every factor has a gradient.
  state = nnx.state(model, nnx.LoRAParam)
  rng = np.random.default_rng(seed + 2)
  nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype), state))
  return model, x


def test_the_view_is_qwix_factors_transposed_and_its_delta_is_qwix_update():
  model, x = lora_model()
  state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  adapters = qwix_lora.as_adapters(state)
  assert set(adapters) == {"up/kernel", "heads/kernel", "out/kernel"}
  assert adapters["heads/kernel"]["a"].shape == (RANK, 8) and adapters["heads/kernel"]["b"].shape == (6, RANK)
  np.testing.assert_array_equal(adapters["up/kernel"]["a"], np.asarray(state["up"]["kernel_lora_a"]).T)
  # The view's dW merged into plain kernels (the einsum's (8, 2, 3) kernel as
  # its (8, 6) matrix) gives the qwix model's outputs.
  spec = rl.LoraSpec(rank=RANK, alpha=ALPHA, targets=(".*",))
  deltas = rl.delta_weights(adapters, spec)
  plain = Net(nnx.Rngs(0))
  for name in ("up", "heads", "out"):
    kernel = getattr(plain, name).kernel
    kernel.value = kernel.value + np.asarray(deltas[f"{name}/kernel"]).T.reshape(kernel.value.shape)
  np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(Net(nnx.Rngs(0))(x)) - np.asarray(model(x))).max() > 1e-2  # the adapters matter
  # Written back unchanged (a round trip), and a changed view lands in qwix's layout.
  back = qwix_lora.from_adapters(adapters, state)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  doubled = {p: {"a": 2 * ad["a"], "b": ad["b"]} for p, ad in adapters.items()}
  np.testing.assert_array_equal(qwix_lora.from_adapters(doubled, state)["heads"]["kernel_lora_a"],
                                2 * np.asarray(state["heads"]["kernel_lora_a"]))


def test_penalty_and_effective_rank_on_qwix_factors_equal_numpy():
  model, _ = lora_model(1)
  state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  # Make one update rank-deficient: a zero column of lora_a drops a direction.
  state["up"]["kernel_lora_a"] = state["up"]["kernel_lora_a"].at[:, 1].set(0.0)
  adapters = qwix_lora.as_adapters(state)
  terms = []
  for name in ("up", "heads", "out"):
    a = np.asarray(state[name]["kernel_lora_a"], np.float64)
    b = np.asarray(state[name]["kernel_lora_b"], np.float64).reshape(RANK, -1)  # the einsum's (rank, 2, 3)
    terms += [np.sum((a.T @ a - np.eye(RANK)) ** 2), np.sum((b @ b.T - np.eye(RANK)) ** 2)]
  np.testing.assert_allclose(rl.ortho_penalty(adapters), np.sum(terms), rtol=1e-5)
  spec = rl.LoraSpec(rank=RANK, alpha=ALPHA, targets=(".*",))
  deltas = rl.delta_weights(adapters, spec)
  for name in ("up", "heads", "out"):
    # The dense matrix of x -> lora_b(lora_a(x)) * alpha / rank, from qwix's factors.
    dense = (np.asarray(state[name]["kernel_lora_a"]) @ np.asarray(state[name]["kernel_lora_b"]).reshape(RANK, -1)
             * ALPHA / RANK)
    assert rl.effective_rank(deltas[f"{name}/kernel"]) == np.linalg.matrix_rank(dense, tol=1e-3 * np.abs(
        np.linalg.svd(dense, compute_uv=False)).max())
  assert rl.effective_rank(deltas["up/kernel"]) == RANK - 1


def test_one_masked_step_in_nnx_optimizer_moves_exactly_r_hat_directions():
  model, x = lora_model(2)
  y = jnp.sin(x).sum(-1)
  mask = lambda: rl.random_direction_mask(2, seed=7)
  optimizer = nnx.Optimizer(model, qwix_lora.in_adapter_layout(optax.chain(mask(), optax.adamw(1e-2), mask())),
                            wrt=nnx.LoRAParam)
  before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.LoRAParam)))

  def loss_fn(model):
    penalty = rl.ortho_penalty(qwix_lora.as_adapters(nnx.state(model, nnx.LoRAParam)))
    return jnp.mean((model(x) - y) ** 2) + 0.01 * penalty

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  after = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.LoRAParam)))
  frozen = nnx.as_pure(nnx.state(model, nnx.Param))
  for name in ("up", "heads", "out"):
    sel = np.asarray(rl.direction_mask(7, 0, f"adapters/{name}/kernel", RANK, 2)).astype(bool)
    a0, a1 = before[name]["kernel_lora_a"], after[name]["kernel_lora_a"]  # (d_in, rank): directions are columns
    b0, b1 = before[name]["kernel_lora_b"], after[name]["kernel_lora_b"]  # (rank, d_out): directions are rows
    np.testing.assert_array_equal(a1[:, ~sel], a0[:, ~sel])
    np.testing.assert_array_equal(b1[~sel], b0[~sel])
    assert np.all(a1[:, sel] != a0[:, sel]) and np.all(b1[sel] != b0[sel])
  assert "kernel" in frozen["up"]  # the base weights were never the optimizer's


def test_batch_axes_are_one_adapter_each_and_errors_name_the_weight():
  rng = np.random.default_rng(3)
  tree = {"moe": {"w_lora_a": jnp.asarray(rng.normal(size=(3, 5, 2))), "w_lora_b": jnp.asarray(rng.normal(size=(3, 2, 4)))}}
  adapters = qwix_lora.as_adapters(tree)
  assert set(adapters) == {"moe/w/0", "moe/w/1", "moe/w/2"}
  np.testing.assert_array_equal(adapters["moe/w/2"]["b"], np.asarray(tree["moe"]["w_lora_b"][2]).T)
  jax.tree.map(np.testing.assert_array_equal, qwix_lora.from_adapters(adapters, tree), tree)
  with pytest.raises(ValueError, match=r"'moe/w' has only its lora_a factor"):
    qwix_lora.as_adapters({"moe": {"w_lora_a": tree["moe"]["w_lora_a"]}})
  with pytest.raises(ValueError, match=r"found no qwix LoRA factors"):
    qwix_lora.as_adapters({"w": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match=r"no adapter 'moe/w/1'"):
    qwix_lora.from_adapters({"moe/w/0": adapters["moe/w/0"]}, tree)
