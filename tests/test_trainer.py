"""The task-generic trainer on a task of its own: results, exact resume, refusals, schedule."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmlora_jax as rl
from rmlora_jax import methods, partitioning, trainer

X = np.random.default_rng(0).normal(size=(96, 6)).astype(np.float32)
Y = (X @ np.linspace(-1, 1, 6)).astype(np.float32)


class Net(nn.Module):

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    h = nn.Dropout(0.1)(nn.Dense(16, name="hidden")(x), deterministic=deterministic)
    return nn.Dense(1, name="out")(h)[:, 0]


class Toy:
  """Regression on 64 training rows (8 batches of 8), 32 held out; optionally fails at one batch."""

  name, main_metric = "toy", "neg_mse"

  def __init__(self, fail_at=None):
    self.fail_at, self.served = fail_at, 0

  def num_train_batches(self, batch_size):
    return 64 // batch_size

  def train_batches(self, batch_size, *, seed, epoch, start):
    order = np.random.default_rng([seed, epoch]).permutation(64)
    for i in range(start, 64 // batch_size):
      self.served += 1
      if self.served == self.fail_at:
        raise RuntimeError("the machine went away")
      idx = order[i * batch_size:(i + 1) * batch_size]
      yield {"x": X[idx], "y": Y[idx]}

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["x"], deterministic=deterministic, rngs=rngs)

  def loss(self, outputs, batch):
    return jnp.mean((outputs - batch["y"]) ** 2)

  def predict(self, outputs, batch):
    return outputs

  def evaluate(self, predict, batch_size):
    pred = np.concatenate([predict({"x": X[i:i + batch_size], "y": Y[i:i + batch_size]})
                           for i in range(64, 96, batch_size)])
    return {"neg_mse": -float(np.mean((pred - Y[64:]) ** 2))}


PARAMS = Net().init(jax.random.key(0), X[:1])["params"]
METHOD = methods.MethodSettings(name="rm_lora", spec=rl.LoraSpec(rank=4, alpha=8.0, targets=("hidden/kernel",)),
                                train_patterns=("out/.*",), options=methods.RmOptions(num_directions=2))


def run(workdir, task=None, hooks=None, **overrides):
  settings = trainer.TrainerSettings(**{"batch_size": 8, "num_epochs": 3, "learning_rate": 1e-2,
                                        "checkpoint_every_steps": 5, "eval_every_steps": 8, "log_every_steps": 1,
                                        "progress": False, **overrides})
  return trainer.train_and_evaluate(task or Toy(), Net(), PARAMS, METHOD, settings, workdir, hooks=hooks)


def test_a_user_task_trains_and_reports(tmp_path):
  results = run(tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["final"] == results["final"] and saved["steps"] == 24
  assert [e["step"] for e in results["history"]["eval"]] == [8, 16, 24]
  assert results["best"] == max(results["history"]["eval"], key=lambda e: e["neg_mse"])
  evals = [e["neg_mse"] for e in results["history"]["eval"]]
  assert evals[0] < evals[1] < evals[2]  # it learns
  assert results["ranks"] == {"hidden/kernel": 4} and results["total_rank"] == {"initial": 4, "final": 4}
  # Trainable: a, b of the adapter (4 * (6 + 16)) and the head (16 + 1).
  assert results["trainable_params"] == 4 * (6 + 16) + 17
  assert (tmp_path / "curves.png").exists() and (tmp_path / "spectra.png").exists()


def test_a_crashed_run_resumes_to_the_same_numbers(tmp_path):
  straight = run(tmp_path / "straight")
  with pytest.raises(RuntimeError, match="went away"):
    run(tmp_path / "crashed", task=Toy(fail_at=13))  # after the checkpoint at step 10
  resumed = run(tmp_path / "crashed")
  assert resumed["history"]["eval"] == straight["history"]["eval"]
  assert resumed["history"]["train"] == straight["history"]["train"]


class ToyCompilesAhead(Toy):
  """Toy that also names its batch shapes ahead (`tasks.base.CompilesAhead`), recording where each run begins."""

  def __init__(self, fail_at=None):
    super().__init__(fail_at)
    self.asked = []

  def example_batches(self, batch_size, *, training, seed=0, epoch=0, start=0):
    self.asked.append(dict(training=training, seed=seed, epoch=epoch, start=start))
    return [{"x": X[:batch_size], "y": Y[:batch_size]}]


def test_shapes_compiled_ahead_are_those_of_where_a_resumed_run_begins(tmp_path):
  straight = run(tmp_path / "straight", seed=4)
  crashed = ToyCompilesAhead(fail_at=13)
  with pytest.raises(RuntimeError, match="went away"):
    run(tmp_path / "crashed", task=crashed, seed=4)
  again = ToyCompilesAhead()
  resumed = run(tmp_path / "crashed", task=again, seed=4)
  assert resumed["history"] == straight["history"]
  # 8 batches an epoch; the checkpoint at step 10 leaves the resumed run at batch 2 of epoch 1.
  assert [a for a in crashed.asked if a["training"]] == [dict(training=True, seed=4, epoch=0, start=0)]
  assert [a for a in again.asked if a["training"]] == [dict(training=True, seed=4, epoch=1, start=2)]


def test_hooks_run_in_order_their_history_survives_a_crash_and_at_end_writes_results(tmp_path):
  calls = []

  def hooks():
    def after_eval(step, trainable, metrics, history):
      calls.append(("eval", step))
      b = np.asarray(partitioning.gather(trainable)["adapters"]["hidden/kernel"]["b"])
      history.setdefault("b_norm", []).append({"step": step, "value": float(np.linalg.norm(b))})

    def at_end(results, trainable):
      calls.append(("end", results["steps"]))
      return {**results, "extra": float(np.linalg.norm(trainable["adapters"]["hidden/kernel"]["b"]))}

    return trainer.Hooks(after_step=lambda step, state, m: calls.append(("step", step)), after_eval=after_eval,
                         after_checkpoint=lambda step, state: calls.append(("checkpoint", step)), at_end=at_end)

  straight = run(tmp_path / "straight", hooks=hooks())
  # Step 8: evaluated, then the step hook; step 10: checkpointed, then the step hook.
  assert calls[calls.index(("eval", 8)) + 1] == ("step", 8)
  assert calls[calls.index(("checkpoint", 10)) + 1] == ("step", 10)
  assert [c for c in calls if c[0] != "step"] == [("checkpoint", 5), ("eval", 8), ("checkpoint", 10),
                                                 ("checkpoint", 15), ("eval", 16), ("checkpoint", 20),
                                                 ("eval", 24), ("checkpoint", 24), ("end", 24)]
  assert [c[1] for c in calls if c[0] == "step"] == list(range(1, 25))
  saved = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert saved["extra"] == straight["extra"] > 0
  assert [h["step"] for h in saved["history"]["b_norm"]] == [8, 16, 24]
  # What a hook put in the history is in the checkpoints: a crash after step 10 loses none of it.
  with pytest.raises(RuntimeError, match="went away"):
    run(tmp_path / "crashed", task=Toy(fail_at=13), hooks=hooks())
  calls.clear()
  resumed = run(tmp_path / "crashed", hooks=hooks())
  assert resumed["history"]["b_norm"] == straight["history"]["b_norm"]
  assert calls[0] == ("step", 11)  # resumed after the checkpoint at step 10


def test_resume_under_other_settings_is_refused(tmp_path):
  run(tmp_path, fingerprint={"lr": 1})
  with pytest.raises(ValueError, match=r"other settings \(lr: 1 -> 2\)"):
    run(tmp_path, fingerprint={"lr": 2})


def test_learning_rate_schedule_is_linear_warmup_then_decay():
  schedule = trainer.lr_schedule(1.0, 100, 0.1)
  want = {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}
  for step, value in want.items():
    np.testing.assert_allclose(float(schedule(step)), value, atol=1e-6, err_msg=str(step))
  np.testing.assert_allclose(float(trainer.lr_schedule(2.0, 10, 0.0)(5)), 1.0, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 0}, r"TrainerSettings.batch_size must be a positive integer, got 0"),
    ({"max_steps": 0}, r"TrainerSettings.max_steps must be -1 \(from num_epochs\) or positive, got 0"),
    ({"warmup_ratio": 1.5}, r"TrainerSettings.warmup_ratio must be in \[0, 1\], got 1.5"),
    ({"learning_rate": 0.0}, r"TrainerSettings.learning_rate must be positive, got 0.0"),
    ({"seed": -2}, r"TrainerSettings.seed must be a non-negative integer, got -2"),
])
def test_bad_trainer_settings_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer.TrainerSettings(**overrides)


class Linear(nn.Module):
  """The toy net without dropout: micro-batches and the whole batch see the same function."""

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    del deterministic
    return nn.Dense(1, name="out")(nn.tanh(nn.Dense(16, name="hidden")(x)))[:, 0]


ACCUMULATED = {
    "lora": None, "rm_lora": methods.RmOptions(num_directions=2),
    "adalora": methods.AdaLoraOptions(target_rank=2, t_init_ratio=0.1, t_final_ratio=0.3, delta_t=2),
    "sora": methods.SoraOptions(variant="released", xi=1e-3),
    "lora2": methods.Lora2Options(target_rank=2, t_init_ratio=0.1, t_final_ratio=0.3, delta_t=2),
}


@pytest.mark.parametrize("name", list(ACCUMULATED))
def test_k_micro_batches_make_the_same_step_as_one_batch_of_k_times_the_size(name, tmp_path):
  spec = (rl.Lora2Spec(k=2, r=4, alpha=8.0, targets=("hidden/kernel",)) if name == "lora2"
          else rl.LoraSpec(rank=4, alpha=8.0, targets=("hidden/kernel",)))
  method = methods.MethodSettings(name=name, spec=spec, train_patterns=("out/.*",), options=ACCUMULATED[name])
  params = Linear().init(jax.random.key(0), X[:1])["params"]
  common = dict(batch_size=8, num_epochs=3, learning_rate=1e-2, log_every_steps=1, eval_every_steps=4,
                checkpoint_every_steps=5, progress=False)
  whole = trainer.train_and_evaluate(Toy(), Linear(), params, method, trainer.TrainerSettings(**common),
                                     tmp_path / "whole")
  split = trainer.train_and_evaluate(Toy(), Linear(), params, method,
                                     trainer.TrainerSettings(accumulate_steps=4, **common), tmp_path / "split")
  assert split["steps"] == whole["steps"] == 24 and split["accumulate_steps"] == 4
  # The same optimizer steps: losses (the mean over a step's micro-batches), evaluations, adapters and ranks.
  for key in ("task_loss", "penalty"):
    np.testing.assert_allclose([h[key] for h in split["history"]["train"]],
                               [h[key] for h in whole["history"]["train"]], rtol=1e-6, atol=1e-6)
  assert [e["step"] for e in split["history"]["eval"]] == [4, 8, 12, 16, 20, 24]
  np.testing.assert_allclose([e["neg_mse"] for e in split["history"]["eval"]],
                             [e["neg_mse"] for e in whole["history"]["eval"]], rtol=1e-5)
  assert split["ranks"] == whole["ranks"]
  from rmlora_jax.recipes import run as run_lib  # pylint: disable=g-import-not-at-top
  got, want = run_lib.trained_state(tmp_path / "split")[0], run_lib.trained_state(tmp_path / "whole")[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
  # Killed in the middle of an optimizer step (micro-batch 26 of step 7), resumed from step 5's checkpoint.
  with pytest.raises(RuntimeError, match="went away"):
    trainer.train_and_evaluate(Toy(fail_at=26), Linear(), params, method,
                               trainer.TrainerSettings(accumulate_steps=4, **common), tmp_path / "crashed")
  resumed = trainer.train_and_evaluate(Toy(), Linear(), params, method,
                                       trainer.TrainerSettings(accumulate_steps=4, **common), tmp_path / "crashed")
  assert resumed["history"] == split["history"]
  with pytest.raises(ValueError, match=r"batch_size=8 is not a multiple of TrainerSettings.accumulate_steps=3"):
    trainer.TrainerSettings(accumulate_steps=3, **common)
