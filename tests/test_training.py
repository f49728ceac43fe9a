"""Checkpointer: what a checkpoint records is what was true at its step."""

import jax.numpy as jnp

from rmlora_jax import training


def test_record_is_a_snapshot_at_save_time(tmp_path):
  ckpt = training.Checkpointer(str(tmp_path / "ckpt"))
  state = training.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones((256, 256))}, {"m": jnp.zeros(3)})
  history = {"train": [{"step": 1, "loss": 1.0}]}
  for step in range(1, 4):
    ckpt.save(step, state, {"history": history})
    # The save is asynchronous: what the loop appends next must not leak in.
    history["train"].append({"step": step + 1, "loss": 0.5})
  ckpt.close()
  reopened = training.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  for step in (2, 3):
    steps = [h["step"] for h in reopened.record(step)["history"]["train"]]
    assert steps == list(range(1, step + 1)), (step, steps)
  reopened.close()
