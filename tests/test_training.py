"""Checkpointer: what a checkpoint records is what was true at its step; AheadOfTime: steps compiled per shape."""

import concurrent.futures
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmlora_jax import budget
from rmlora_jax import partitioning
from rmlora_jax import training
from rmlora_jax.adapters import adalora


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


def test_per_layer_adapters_of_a_scanned_model_are_restored_stacked_with_their_optimizer_state(tmp_path):
  # A checkpoint of two layers' AdaLoRA adapters stored per layer (as before they were stacked), with
  # AdamW's moments and the budget's statistics: restored into the stacked layout, each stacked leaf
  # is the layers' saved values stacked in layer order.
  rng = np.random.default_rng(0)
  per_layer = {f"model/layers_{i}/k": {"p": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                                       "lam": jnp.asarray(rng.normal(size=2), jnp.float32),
                                       "q": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)} for i in range(2)}
  trainable = {"adapters": per_layer, "head": {"w": jnp.ones(3)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), adalora.adalora_pruning(optax.adamw(0.1), budget.BudgetSchedule(
      initial_rank=2, target_rank=1, total_steps=10, t_init=0, t_final=1, delta_t=1)))
  state = training.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), trainable)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)  # moments and statistics off zero
  state = training.TrainState(jnp.ones((), jnp.int32), optax.apply_updates(trainable, updates), opt_state)
  ckpt = training.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state, {"history": {"train": [1]}})
  ckpt.wait()

  stacked_trainable = {"adapters": {"model/layers/k": {"p": jnp.zeros((2, 3, 2)), "lam": jnp.zeros((2, 2)),
                                                       "q": jnp.zeros((2, 2, 4))}}, "head": {"w": jnp.zeros(3)}}
  like = training.TrainState(jnp.zeros((), jnp.int32), stacked_trainable, tx.init(stacked_trainable))
  restored, record = ckpt.restore(1, training.abstract_like(like))
  assert record["history"] == {"train": [1]} and int(restored.step) == 1
  inner = state.opt_state[1]
  adam = inner.inner_state[0]
  got_inner = restored.opt_state[1]
  pairs = [(restored.trainable["adapters"], state.trainable["adapters"]),
           (got_inner.inner_state[0].mu["adapters"], adam.mu["adapters"]),
           (got_inner.inner_state[0].nu["adapters"], adam.nu["adapters"]),
           (got_inner.ipt_by_param["adapters"], inner.ipt_by_param["adapters"]),
           (got_inner.unc_by_param["adapters"], inner.unc_by_param["adapters"])]
  for got, saved in pairs:
    for name in ("p", "lam", "q"):
      want = np.stack([np.asarray(saved[f"model/layers_{i}/k"][name]) for i in range(2)])
      np.testing.assert_array_equal(got["model/layers/k"][name], want)
  np.testing.assert_array_equal(got_inner.keep_by_param["adapters"]["model/layers/k"]["lam"],
                                np.stack([inner.keep_by_param["adapters"][f"model/layers_{i}/k"]["lam"] for i in range(2)]))
  np.testing.assert_array_equal(restored.trainable["head"]["w"], state.trainable["head"]["w"])
  assert int(got_inner.count) == int(inner.count) == 1

  # Entries that are neither the run's nor its layers': refused, naming them.
  other = training.TrainState(jnp.zeros((), jnp.int32), {"adapters": {"model/other/k": {"a": jnp.ones((2, 3))}}}, ())
  with pytest.raises(ValueError, match=r"checkpoint of step 1 in .* laid out otherwise than this run's \(entries "
                                       r".*trainable\.adapters\.model/other/k.* differ\).*new workdir"):
    ckpt.restore(1, training.abstract_like(other))
  ckpt.close()


def _counting_step(mesh):
  """A jitted (state, frozen, batch) step that counts its traces; state is donated as the train step's."""
  traces = []

  def step(state, frozen, batch):
    traces.append(batch["x"].shape)
    return state + frozen * jnp.sum(batch["x"] * batch["w"][:, None]), jnp.mean(batch["x"], axis=1)

  rep, data = training.replicated(mesh), training.data_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, rep, data), out_shardings=(rep, data), donate_argnums=(0,)), traces


def _batch(rows, length, value):
  return {"x": np.full((rows, length), value, np.float32), "w": np.ones(rows, np.float32)}


def test_ahead_of_time_traces_each_shape_once_and_equals_jit():
  mesh = training.make_mesh(1)
  jitted, traces = _counting_step(mesh)
  plain, _ = _counting_step(mesh)
  frozen = jax.device_put(jnp.float32(2.0), training.replicated(mesh))
  state = jax.device_put(jnp.float32(0.0), training.replicated(mesh))
  expected = jax.device_put(jnp.float32(0.0), training.replicated(mesh))
  step = training.AheadOfTime(jitted, state, frozen, mesh=mesh)
  step.prepare([_batch(4, 8, 0), _batch(4, 16, 0), _batch(4, 8, 1)])  # The third repeats the first's shape.
  for length, value in ((16, 1.0), (8, 2.0), (16, 3.0), (24, 0.5)):  # 24 was never prepared.
    batch = partitioning.put_batch(_batch(4, length, value), mesh)
    state, out = step(state, frozen, batch)
    expected, want = plain(expected, frozen, batch)
    np.testing.assert_array_equal(out, want)
    assert float(state) == float(expected)
  assert sorted(traces) == [(4, 8), (4, 16), (4, 24)]
  step.close()


@pytest.mark.parametrize("built_weak", [False, True])
def test_ahead_of_time_built_from_shapes_alone(built_weak):
  # Built from jax.ShapeDtypeStructs (training.abstract_state), as the trainer
  # does while the state is still being made. Types that match: the prepared
  # executable runs (no trace at the call). A weak type that does not: it
  # falls back to the jitted step, which compiles for what it is given.
  mesh = training.make_mesh(1)
  rep = training.replicated(mesh)
  jitted, traces = _counting_step(mesh)
  plain, _ = _counting_step(mesh)
  state = jax.device_put(jnp.float32(1.0), rep)
  frozen = jax.device_put(jnp.float32(2.0), rep)
  abstract = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep, weak_type=built_weak)
  step = training.AheadOfTime(jitted, abstract, frozen, mesh=mesh)
  step.prepare([_batch(4, 8, 0)])
  concurrent.futures.wait(step.pending())
  assert traces == [(4, 8)]
  expected = jax.device_put(jnp.float32(1.0), rep)
  for value in (1.0, 2.0):
    batch = partitioning.put_batch(_batch(4, 8, value), mesh)
    state, out = step(state, frozen, batch)
    expected, want = plain(expected, frozen, batch)
    np.testing.assert_array_equal(out, want)
    assert float(state) == float(expected)
  assert traces == ([(4, 8), (4, 8)] if built_weak else [(4, 8)])
  step.close()


def test_ahead_of_time_after_close_and_with_a_failing_shape():
  mesh = training.make_mesh(1)
  rep = training.replicated(mesh)

  def step(state, frozen, batch):
    if batch["x"].shape[1] == 5:
      raise ValueError("no step for length 5")
    return state + jnp.sum(batch["x"]), state

  jitted = jax.jit(step, in_shardings=(rep, rep, training.data_sharded(mesh)), donate_argnums=(0,))
  state, frozen = jax.device_put(jnp.float32(0.0), rep), jax.device_put(jnp.float32(0.0), rep)
  aot = training.AheadOfTime(jitted, state, frozen, mesh=mesh)
  aot.prepare([_batch(2, 5, 0)])
  with pytest.raises(ValueError, match="no step for length 5"):  # Raised where the step is called.
    aot(state, frozen, partitioning.put_batch(_batch(2, 5, 1), mesh))
  aot.prepare([_batch(2, 6, 0), _batch(2, 7, 0)])
  aot.close()  # Shapes not begun are dropped; calls still compile them on the spot.
  state, _ = aot(state, frozen, partitioning.put_batch(_batch(2, 7, 1), mesh))
  assert float(state) == 14.0


def test_ahead_of_time_close_waits_for_the_compile_running():
  """A process must not exit while XLA compiles on the daemon thread (it aborts): close() waits for it."""
  mesh = training.make_mesh(1)
  rep = training.replicated(mesh)
  started = threading.Event()

  def step(state, frozen, batch):
    started.set()  # traced on the background thread
    time.sleep(0.5)  # a compile that is still running when close() is called
    return state + jnp.sum(batch["x"]), state

  jitted = jax.jit(step, in_shardings=(rep, rep, training.data_sharded(mesh)))
  state, frozen = jax.device_put(jnp.float32(0.0), rep), jax.device_put(jnp.float32(0.0), rep)
  aot = training.AheadOfTime(jitted, state, frozen, mesh=mesh)
  aot.prepare([_batch(2, 3, 0), _batch(2, 4, 0)])
  assert started.wait(10)
  aot.close()
  threads = [t for t in threading.enumerate() if t.name == "rmlora-compile"]
  assert not threads, threads  # joined: the running compile finished, the queued one was dropped


def test_ahead_of_time_after_another_begins_once_its_shapes_are_built():
  mesh = training.make_mesh(1)
  rep = training.replicated(mesh)
  order = []

  def recording(name):
    def step(state, frozen, batch):
      order.append((name, batch["x"].shape[1]))  # traced on a background thread
      time.sleep(0.2)
      return state + jnp.sum(batch["x"]), state
    return jax.jit(step, in_shardings=(rep, rep, training.data_sharded(mesh)))

  state, frozen = jax.device_put(jnp.float32(0.0), rep), jax.device_put(jnp.float32(0.0), rep)
  first = training.AheadOfTime(recording("train"), state, frozen, mesh=mesh)
  second = training.AheadOfTime(recording("eval"), state, frozen, mesh=mesh)
  first.prepare([_batch(2, 3, 0), _batch(2, 4, 0)])
  second.prepare([_batch(2, 5, 0), _batch(2, 6, 0)], after=first)
  concurrent.futures.wait(second.pending())
  assert order == [("train", 3), ("train", 4), ("eval", 5), ("eval", 6)]
  state, _ = second(state, frozen, partitioning.put_batch(_batch(2, 6, 1), mesh))
  assert float(state) == 12.0 and len(order) == 4  # the prepared executable, not a new trace
  first.close()
  second.close()


def test_ahead_of_time_builds_a_split_steps_update_once():
  # A TrainStep: the gradient program is built per shape, the update program
  # once for them all; the results are those of calling the TrainStep itself.
  mesh = training.make_mesh(1)
  rep, data = training.replicated(mesh), training.data_sharded(mesh)

  def make():
    traces = {"grad": [], "apply": 0}

    def grad(state, frozen, batch):
      traces["grad"].append(batch["x"].shape)
      return frozen * jnp.sum(batch["x"] * batch["w"][:, None]), {"loss": jnp.mean(batch["x"])}

    def apply(state, grads, losses):
      traces["apply"] += 1
      return state + grads, {"loss": losses["loss"], "state": state}

    return training.TrainStep(jax.jit(grad, in_shardings=(rep, rep, data), out_shardings=(rep, rep)),
                              jax.jit(apply, in_shardings=(rep, rep, rep), out_shardings=(rep, rep),
                                      donate_argnums=(0,))), traces

  state, frozen = jax.device_put(jnp.float32(0.0), rep), jax.device_put(jnp.float32(2.0), rep)
  expected = jax.device_put(jnp.float32(0.0), rep)
  split, traces = make()
  step, (plain, _) = training.AheadOfTime(split, state, frozen, mesh=mesh), make()
  step.prepare([_batch(4, 8, 0), _batch(4, 16, 0)])
  concurrent.futures.wait(step.pending())
  assert traces == {"grad": [(4, 8), (4, 16)], "apply": 1}
  for length, value in ((16, 1.0), (8, 2.0), (24, 0.5)):  # 24 was never prepared
    batch = partitioning.put_batch(_batch(4, length, value), mesh)
    state, out = step(state, frozen, batch)
    expected, want = plain(expected, frozen, batch)
    assert float(out["loss"]) == float(want["loss"]) and float(state) == float(expected)
  assert traces == {"grad": [(4, 8), (4, 16), (4, 24)], "apply": 1}
  step.close()

  # Nothing prepared: the update program is built at the first call, for its outputs.
  split, traces = make()
  step = training.AheadOfTime(split, state, frozen, mesh=mesh)
  state, out = step(state, frozen, partitioning.put_batch(_batch(4, 8, 1.0), mesh))
  assert traces == {"grad": [(4, 8)], "apply": 1} and float(state) == float(expected) + 2 * 4 * 8
  step.close()
