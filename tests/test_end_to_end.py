"""RM-LoRA on a toy problem: the whole API composed as a user would."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmlora_jax as rl


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="hidden")(x))
    return nn.Dense(1, name="out")(x)


def test_rm_lora_fits_a_regression_through_adapters():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)
  model = MLP()
  frozen = model.init(jax.random.key(0), x)["params"]
  # The target is the frozen net shifted by a fixed low-rank change of its hidden layer.
  shift = 0.5 * rng.normal(size=(8, 2)) @ rng.normal(size=(2, 32))
  target_params = jax.tree.map(lambda w: w, frozen)
  target_params["hidden"]["kernel"] = frozen["hidden"]["kernel"] + shift
  y = model.apply({"params": target_params}, x)

  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=(r"hidden/kernel",))
  adapters = rl.init_lora(jax.random.key(1), frozen, spec)
  tx = optax.chain(rl.random_direction_mask(2, seed=0), optax.adamw(3e-2), rl.random_direction_mask(2, seed=0))
  opt_state = tx.init(adapters)

  def loss_fn(ad):
    pred = model.apply({"params": rl.merge(frozen, ad, spec)}, x)
    return jnp.mean((pred - y) ** 2) + 1e-3 * rl.ortho_penalty(ad)

  @jax.jit
  def step(ad, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(ad)
    updates, opt_state = tx.update(grads, opt_state, ad)
    return optax.apply_updates(ad, updates), opt_state, loss

  losses = []
  for _ in range(300):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
  # The frozen weights were never touched, and the adapter learned a rank-2 change.
  delta = rl.delta_weights(adapters, spec)["hidden/kernel"]
  assert rl.effective_rank(delta, rtol=1e-2) >= 2
