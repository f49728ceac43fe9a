"""Plain-Python references for the adapter family tests (not a test module).

Written from the papers' equations, independently of the library: loops over
triplets, exact fractions for the schedule, SGD as the inner optimizer.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax


def ref_budget(t, *, initial, target, total, t_init, t_final):
  """b(t) of AdaLoRA's cubic schedule, floored, in exact arithmetic."""
  if t <= t_init:
    return initial
  if t > total - t_final:
    return target
  c = 1 - Fraction(t - t_init, total - t_final - t_init)
  return math.floor(target + (initial - target) * c**3)


def ref_is_pruning_step(t, *, total, t_init, t_final, delta_t):
  last = total - t_final
  return t_init < t <= last and (t % delta_t == 0 or t == last)


class RefPruner:
  """AdaLoRA / LoRA² pruning around SGD, one adapter dict of NumPy arrays at a time.

  ``slices`` maps each scored factor other than lam to a function
  ``(array, i) -> the i-th triplet's slice``.
  """

  def __init__(self, *, slices, initial_rank, target_rank, total, t_init, t_final, delta_t, beta1, beta2, lr):
    self.slices, self.lr = slices, lr
    self.initial_rank, self.target_rank = initial_rank, target_rank
    self.total, self.t_init, self.t_final, self.delta_t = total, t_init, t_final, delta_t
    self.beta1, self.beta2 = beta1, beta2
    self.ipt, self.unc, self.keep, self.t = {}, {}, {}, 0

  def step(self, adapters, grads, head, head_grad):
    """One training step; returns the new (adapters, head)."""
    self.t += 1
    t, last = self.t, self.total - self.t_final
    names = ("lam", *self.slices)
    if t <= last:
      for path, ad in adapters.items():
        for n in names:
          s = np.abs(ad[n].astype(np.float64) * grads[path][n])
          i_old = self.ipt.get((path, n), np.zeros_like(s))
          u_old = self.unc.get((path, n), np.zeros_like(s))
          i_new = self.beta1 * i_old + (1 - self.beta1) * s
          self.ipt[(path, n)] = i_new
          self.unc[(path, n)] = self.beta2 * u_old + (1 - self.beta2) * np.abs(s - i_new)
    new = {p: {n: ad[n] - self.lr * grads[p][n] for n in ad} for p, ad in adapters.items()}
    new_head = head - self.lr * head_grad
    if not self.keep:
      self.keep = {p: [True] * self.initial_rank for p in adapters}
    prune = ref_is_pruning_step(t, total=self.total, t_init=self.t_init, t_final=self.t_final, delta_t=self.delta_t)
    if prune:
      triplets = []
      for path in sorted(adapters):
        for i in range(self.initial_rank):
          score = (self.ipt[(path, "lam")] * self.unc[(path, "lam")])[i]
          for n, take in self.slices.items():
            score += np.mean(take(self.ipt[(path, n)] * self.unc[(path, n)], i))
          triplets.append((-score, len(triplets), path, i))
      b = ref_budget(t, initial=self.initial_rank * len(adapters), target=self.target_rank * len(adapters),
                     total=self.total, t_init=self.t_init, t_final=self.t_final)
      self.keep = {p: [False] * self.initial_rank for p in adapters}
      for _, _, path, i in sorted(triplets)[:b]:
        self.keep[path][i] = True
    if prune or t > last:
      for path in new:
        for i in range(self.initial_rank):
          if not self.keep[path][i]:
            new[path]["lam"][i] = 0.0
    return new, new_head


def random_like(tree, seed):
  """A tree of N(0, 1) arrays shaped like ``tree``, from ``seed``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), tree)


def toy_problem(seed=0, d_in=8, hidden=16, d_out=4, n=64):
  """Frozen two-layer params, inputs and targets from a perturbed teacher."""
  rng = np.random.default_rng(seed)
  params = {
      "dense_0": {"kernel": jnp.asarray(rng.standard_normal((d_in, hidden)) / np.sqrt(d_in), jnp.float32)},
      "dense_1": {"kernel": jnp.asarray(rng.standard_normal((hidden, d_out)) / np.sqrt(hidden), jnp.float32)},
  }
  teacher = jax.tree.map(lambda w: w + 0.5 * jnp.asarray(
      rng.standard_normal((w.shape[0], 2)) @ rng.standard_normal((2, w.shape[1])) / np.sqrt(w.shape[0]),
      jnp.float32), params)
  x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
  return params, x, mlp(teacher, x)


def mlp(params, x):
  return jnp.tanh(x @ params["dense_0"]["kernel"]) @ params["dense_1"]["kernel"]


def train(tx, adapters, merge_fn, params, x, y, steps, reg=lambda ad: 0.0):
  """Trains ``adapters`` with ``tx`` on the MSE of the merged MLP; returns (losses, adapters, state)."""

  def loss_fn(ad):
    return jnp.mean((mlp(merge_fn(params, ad), x) - y) ** 2)

  @jax.jit
  def step(ad, state):
    loss, grads = jax.value_and_grad(lambda a: loss_fn(a) + reg(a))(ad)
    updates, state = tx.update(grads, state, ad)
    return optax.apply_updates(ad, updates), state, loss_fn(ad)

  state = tx.init(adapters)
  losses = []
  for _ in range(steps):
    adapters, state, loss = step(adapters, state)
    losses.append(float(loss))
  return losses, adapters, state


def check_pruned_regression(init_fn, spec, pruning, penalty_fn, ranks_fn, *, initial_rank, target_rank, seed):
  """Trains a pruned family on the toy MLP; checks it learns and ends on the target budget."""
  from rmlora_jax import merge
  from rmlora_jax.budget import BudgetSchedule

  params, x, y = toy_problem(seed)
  ad = init_fn(jax.random.key(0), params, spec)
  schedule = BudgetSchedule(initial_rank=initial_rank, target_rank=target_rank, total_steps=200,
                            t_init=20, t_final=40, delta_t=5)
  losses, ad, state = train(pruning(optax.adam(2e-2), schedule), ad, lambda p, a: merge(p, a, spec),
                            params, x, y, 200, reg=lambda a: 0.1 * penalty_fn(a))
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
  assert sum(ranks_fn(ad).values()) == target_rank * len(ad)
  for path, a in ad.items():
    assert np.all(np.asarray(a["lam"])[~np.asarray(state.keep[path])] == 0.0)
