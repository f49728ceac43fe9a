"""An NNX model through the trainer: the same numbers as the same model written in linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rmlora_jax as rl
from rmlora_jax import methods, trainer
from rmlora_jax.recipes import run as run_lib
from rmlora_jax.adapters import base
from rmlora_jax.nnx_module import NnxModule
from tests.test_trainer import Toy


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    del deterministic
    return nn.Dense(1, name="out")(nn.tanh(nn.Dense(16, name="hidden")(x)))[:, 0]


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.hidden, self.out = nnx.Linear(6, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))[:, 0]


SETTINGS = {
    "lora": None, "rm_lora": methods.RmOptions(num_directions=2), "adalora": methods.AdaLoraOptions(target_rank=2, t_init_ratio=0.1, t_final_ratio=0.3, delta_t=2),
    "sora": methods.SoraOptions(variant="released", xi=1e-3), "lora2": None,
}


def _spec(name):
  if name == "lora2":
    return rl.Lora2Spec(k=2, r=4, alpha=8.0, targets=("hidden/kernel",))
  return rl.LoraSpec(rank=4, alpha=8.0, targets=("hidden/kernel",))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_nnx_and_linen_models_train_to_the_same_losses_and_adapters(name, tmp_path):
  module = NnxModule(NnxNet(nnx.Rngs(0)))
  params = module.params
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, LinenNet().init(jax.random.key(0), jnp.zeros((1, 6)))["params"])
  method = methods.MethodSettings(name=name, spec=_spec(name), train_patterns=("out/.*",), options=SETTINGS[name])
  settings = trainer.TrainerSettings(batch_size=8, num_epochs=2, learning_rate=1e-2, log_every_steps=1,
                                     eval_every_steps=8, checkpoint_every_steps=100, progress=False)
  got = trainer.train_and_evaluate(Toy(), module, params, method, settings, tmp_path / "nnx")
  want = trainer.train_and_evaluate(Toy(), LinenNet(), params, method, settings, tmp_path / "linen")
  losses = lambda r: np.asarray([h["loss"] for h in r["history"]["train"]])
  np.testing.assert_allclose(losses(got), losses(want), rtol=1e-6, atol=1e-6)
  assert losses(got)[-1] < losses(got)[0]
  ours, _ = run_lib.trained_state(tmp_path / "nnx")
  ref, _ = run_lib.trained_state(tmp_path / "linen")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ours, ref)
  # Merged back into an nnx.Module, it gives the trained model's outputs.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  merged = rl.merge(base.with_head(params, ours["head"]), ours["adapters"], method.spec)
  np.testing.assert_allclose(np.asarray(module.merge(merged)(x)),
                             np.asarray(LinenNet().apply({"params": merged}, x)), rtol=1e-6, atol=1e-6)


def test_errors_name_what_was_given():
  with pytest.raises(ValueError, match="NnxModule wraps an nnx.Module, got LinenNet"):
    NnxModule(LinenNet())


def test_a_crashed_nnx_run_resumes_to_the_same_numbers(tmp_path):
  module = NnxModule(NnxNet(nnx.Rngs(0)))
  method = methods.MethodSettings(name="rm_lora", spec=_spec("rm_lora"), train_patterns=("out/.*",),
                                  options=SETTINGS["rm_lora"])
  settings = trainer.TrainerSettings(batch_size=8, num_epochs=3, learning_rate=1e-2, log_every_steps=1,
                                     eval_every_steps=8, checkpoint_every_steps=5, progress=False)
  run = lambda workdir, task: trainer.train_and_evaluate(task, module, module.params, method, settings, workdir)
  straight = run(tmp_path / "straight", Toy())
  with pytest.raises(RuntimeError, match="went away"):
    run(tmp_path / "crashed", Toy(fail_at=13))  # after the checkpoint at step 10
  resumed = run(tmp_path / "crashed", Toy())
  assert resumed["history"] == straight["history"]
  jax.tree.map(np.testing.assert_array_equal, run_lib.trained_state(tmp_path / "crashed")[0],
               run_lib.trained_state(tmp_path / "straight")[0])
