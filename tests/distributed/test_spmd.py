"""Sharded runs agree with one device: 8 fake CPU devices, and two processes over gloo.

Each case runs in subprocesses (a process's device count is fixed once JAX
starts), bounded by timeouts, and never leaves a process behind.
"""

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rmlora_jax.recipes import glue as glue_task
from tests.experiments.test_glue import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Unoptimised XLA code generation halves the compile times that dominate
# these tiny runs; every run compared within one test uses the same flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"
MESHES = ("1x1x1", "8x1x1", "2x2x2", "1x4x2")


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def test_meshes_give_the_single_device_loss_curve_and_adapters(tiny_bert_one_layer, tmp_path):
  out = tmp_path / "steps.npz"
  proc = subprocess.run([sys.executable, "-m", "tests.distributed.sharded_steps", tiny_bert_one_layer, str(out)],
                        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=420)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  got = np.load(out)
  for method in ("lora", "rm_lora"):
    ref = {k.split("/", 2)[2]: got[k] for k in got.files if k.startswith(f"{method}/1x1x1/")}
    moved = {mesh: int(got[f"{method}/{mesh}/group_collectives"]) for mesh in MESHES}
    # Q/K/V share one matmul; under tensor parallelism each device must keep its
    # own columns of the three kernels (and of their adapters' left factors),
    # not trade them: laid out end to end, the 1x4x2 mesh's step moved them
    # with 12 all-to-alls and permutes.
    assert moved == dict.fromkeys(MESHES, 0), moved
    del ref["group_collectives"]
    assert ref["losses"].shape == (3,) and len(ref) == 2 + 6 * 2 + 2  # losses, preds, 6 adapters, the head
    for mesh in MESHES[1:]:
      for name, want in ref.items():
        have = got[f"{method}/{mesh}/{name}"]
        np.testing.assert_allclose(have, want, atol=1e-5, rtol=0, err_msg=f"{method} mesh {mesh}: {name}")


# One sharded_steps run on the 1x4x2 mesh with the model blind to its "model"
# axis (column_shards() == 1), so the grouped Q/K/V columns are laid out end to
# end; prints the step's count from sharded_steps.group_collectives.
_END_TO_END = ("import sys\n"
               "from rmlora_jax import partitioning\n"
               "from tests.distributed import sharded_steps\n"
               "partitioning.column_shards = lambda: 1\n"
               "print('group_collectives', sharded_steps.run(sys.argv[1], 'rm_lora', (1, 4, 2))[-1])\n")


def test_group_collective_counter_finds_the_end_to_end_layouts_collectives(tiny_bert_one_layer):
  # The counter behind the zeros above, on the same step and mesh with the
  # group laid out end to end: each device must trade kernel columns, and the
  # counter sees it. Without this the zeros could mean it matches nothing.
  proc = subprocess.run([sys.executable, "-c", _END_TO_END, tiny_bert_one_layer], cwd=ROOT, env=_env(8),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  moved = int(proc.stdout.split("group_collectives")[-1])
  assert moved > 0, proc.stdout[-2000:]


def _free_port():
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flags(config):
  keys = ("model.name_or_path", "data.dir", "workdir", "batch_size", "max_seq_len", "num_epochs",
          "max_steps", "log_every_steps", "checkpoint_every_steps", "progress", "lora.rank",
          "rm.num_directions", "method", "data.num_buckets", "mesh.data", "mesh.fsdp", "mesh.model")
  out = [f"--config={ROOT}/configs/rte.py"]
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    out.append(f"--config.{key}={node}")
  return out


def run_pair(config, log_dir, *, timeout=240):
  """Runs the GLUE entry point as processes 0 and 1 of one job on 127.0.0.1."""
  port = _free_port()
  env = _env(2)
  env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  logs = [open(log_dir / f"process_{i}.log", "w") for i in range(2)]
  procs = []
  try:
    for i in range(2):
      cmd = [sys.executable, "-m", "experiments.glue", *_flags(config),
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
  tails = "\n".join(f"--- process {i} ---\n" + (log_dir / f"process_{i}.log").read_text()[-3000:] for i in range(2))
  assert [p.returncode for p in procs] == [0, 0], tails


def test_two_processes_match_one_and_resume_in_a_new_pair(tiny_bert_one_layer, tiny_glue, tmp_path):
  tiny_bert = tiny_bert_one_layer
  # Mesh fsdp=2 x model=2 over 2 processes of 2 devices: each process feeds
  # half of every batch, and each kernel is split across both processes.
  pair = tiny_config(tiny_bert, tiny_glue, tmp_path / "pair", method="rm_lora")
  pair.mesh.data, pair.mesh.fsdp, pair.mesh.model = 1, -1, 2
  (tmp_path / "pair").mkdir()
  run_pair(pair, tmp_path)
  got = json.loads((tmp_path / "pair" / "results.json").read_text())
  # Only process 0 writes results, scalars and plots.
  assert len(list((tmp_path / "pair" / "tensorboard").iterdir())) == 1
  assert (tmp_path / "pair" / "spectra.png").exists()

  single = tiny_config(tiny_bert, tiny_glue, tmp_path / "single", method="rm_lora")
  want = glue_task.train_and_evaluate(single, single.workdir)
  assert got["steps"] == want["steps"] == 6
  assert got["metrics"].keys() == want["metrics"].keys()
  for key, value in want["metrics"].items():
    assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
  for a, b in zip(got["history"]["train"], want["history"]["train"], strict=True):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["step"] == b["step"]
  assert got["adapters"]["summary"]["mean_ortho_loss"] == pytest.approx(
      want["adapters"]["summary"]["mean_ortho_loss"], rel=1e-4)

  # A new pair restores the pair's step-4 checkpoint and finishes identically.
  checkpoints = tmp_path / "pair" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["4", "6"]
  shutil.rmtree(checkpoints / "6")
  (tmp_path / "pair" / "results.json").unlink()
  run_pair(pair, tmp_path)
  resumed = json.loads((tmp_path / "pair" / "results.json").read_text())
  assert resumed["metrics"] == got["metrics"]
  assert resumed["history"]["train"] == got["history"]["train"]
  assert resumed["adapters"]["per_matrix"] == got["adapters"]["per_matrix"]


# The GLUE entry point, stopped by an exception from a trainer hook right after
# step $STOP_AT (the trainer waits for that step's checkpoint before it exits).
_STOPPING = ("import os, runpy, sys\n"
             "from rmlora_jax import trainer\n"
             "run, stop = trainer.train_and_evaluate, int(os.environ.get('STOP_AT', '0'))\n"
             "def after_step(step, state, metrics):\n"
             "  if step == stop: raise SystemExit(3)\n"
             "trainer.train_and_evaluate = lambda *a, **k: run(*a, **{**k, 'hooks': trainer.Hooks(after_step=after_step)})\n"
             "sys.argv[0] = 'experiments.glue'\n"
             "runpy.run_module('experiments.glue', run_name='__main__')\n")


def _run_glue(config, devices, log, stop_at=0):
  env = dict(_env(devices), STOP_AT=str(stop_at))
  proc = subprocess.run([sys.executable, "-c", _STOPPING, *_flags(config)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  log.write_text(proc.stdout + proc.stderr)
  assert proc.returncode == (3 if stop_at else 0), proc.stderr[-4000:]


def test_a_run_checkpointed_on_one_mesh_resumes_on_another(tiny_bert_one_layer, tiny_glue, tmp_path):
  """8 devices as 1x8x1 (weights split 8 ways), resumed on 4 devices as 2x2x1, then back on 8: as if never moved."""
  def config(workdir, data, fsdp):
    c = tiny_config(tiny_bert_one_layer, tiny_glue, workdir, method="rm_lora", max_steps=8)
    c.mesh.data, c.mesh.fsdp, c.mesh.model = data, fsdp, 1
    return c

  _run_glue(config(tmp_path / "straight", 1, -1), 8, tmp_path / "straight.log")
  straight = json.loads((tmp_path / "straight" / "results.json").read_text())
  moved_dir = tmp_path / "moved"
  _run_glue(config(moved_dir, 1, -1), 8, tmp_path / "to_4.log", stop_at=4)
  _run_glue(config(moved_dir, 2, 2), 4, tmp_path / "to_6.log", stop_at=6)
  assert "resumed from step 4" in (tmp_path / "to_6.log").read_text()
  _run_glue(config(moved_dir, 1, -1), 8, tmp_path / "to_8.log")
  assert "resumed from step 6" in (tmp_path / "to_8.log").read_text()
  moved = json.loads((moved_dir / "results.json").read_text())
  assert moved["steps"] == straight["steps"] == 8
  for a, b in zip(moved["history"]["train"], straight["history"]["train"], strict=True):
    assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
  for key, value in straight["metrics"].items():
    assert moved["metrics"][key] == pytest.approx(value, abs=1e-6), key
  for path, stats in straight["adapters"]["per_matrix"].items():
    assert moved["adapters"]["per_matrix"][path]["frobenius_norm"] == pytest.approx(stats["frobenius_norm"], rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": 2}, r"the mesh size 2 does not divide the 1 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"only one axis may be -1"),
    ({"mesh.model": 0}, r"config.mesh.model must be -1 \(the rest of the devices\) or a positive integer"),
])
def test_bad_mesh_fails_before_loading_anything(overrides, message, tmp_path):
  # The model path does not exist: the mesh error must come first.
  config = tiny_config("/nonexistent/model", str(tmp_path), tmp_path / "w", **overrides)
  with pytest.raises(ValueError, match=message):
    glue_task.train_and_evaluate(config, config.workdir)
