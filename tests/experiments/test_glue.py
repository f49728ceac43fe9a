"""The GLUE entry point end to end on a tiny random BERT and a tiny RTE folder."""

import itertools
import json
import pathlib
import subprocess
import sys
import threading

import chex
import jax
import numpy as np
import pytest

from configs import rte
from tests.experiments.conftest import WORDS, set_overrides
from rmlora_jax.recipes import settings as settings_lib
from rmlora_jax import training
from rmlora_jax.data import batching
from rmlora_jax.data import glue as glue_data
from rmlora_jax.recipes import glue as glue_task
from rmlora_jax.tasks import classification

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(model, data_dir, workdir, arg=None, **overrides):
  config = rte.get_config(arg)
  config.model.name_or_path = model
  config.data.dir = data_dir
  config.workdir = str(workdir)
  config.batch_size = 8
  config.max_seq_len = 32
  config.num_epochs = 1
  config.max_steps = 6
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.progress = False
  config.lora.rank = 4
  config.rm.num_directions = 2
  config.data.num_buckets = 1  # one padded shape: one compilation per step function
  return set_overrides(config, overrides)


def lora_param_count(d_model, d_ff, layers, rank):
  """r (d_in + d_out) for q, k, v, attention output, intermediate and output, per layer."""
  attention = 4 * rank * (d_model + d_model)
  ffn = 2 * rank * (d_model + d_ff)
  return layers * (attention + ffn)


@pytest.mark.parametrize("method", ["full_ft", "lora", "r_lora", "gm_lora", "rm_lora", "adalora", "sora", "lora2"])
def test_every_method_runs_end_to_end(method, tiny_bert, tiny_glue, tmp_path):
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method=method)
  results = glue_task.train_and_evaluate(config, config.workdir)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["metrics"] == results["metrics"]
  assert saved["task"] == "rte" and saved["method"] == method and saved["steps"] == 6
  assert 0.0 <= saved["metrics"]["accuracy"] <= 1.0
  head = 32 * 2 + 2  # classifier kernel and bias; hidden 32, two labels
  if method == "full_ft":
    assert saved["adapters"]["per_matrix"] == {}
    vocab, h, ff, pos = 5 + len(WORDS), 32, 48, 64
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h
    bert = (vocab + pos + 2) * h + 2 * h + 2 * layer + (h * h + h)
    assert saved["trainable_params"] == saved["inference_params"] == bert + head
  elif method in ("adalora", "sora", "lora2"):
    assert saved["adapters"]["summary"]["num_adapted"] == 12
    assert saved["inference_params"] <= saved["trainable_params"]
  else:
    assert saved["trainable_params"] == lora_param_count(32, 48, 2, 4) + head
    assert saved["adapters"]["summary"]["num_adapted"] == 12
    for stats in saved["adapters"]["per_matrix"].values():
      assert 1 <= stats["effective_rank"] <= 4
    assert (tmp_path / "spectra.png").stat().st_size > 0
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert any((tmp_path / "tensorboard").iterdir())
  # The penalty is in the loss exactly for the regularised methods.
  penalties = [h["penalty"] for h in saved["history"]["train"]]
  assert (max(penalties) > 0) == (method in ("r_lora", "rm_lora", "adalora", "lora2"))


def test_gradient_accumulation_runs_the_glue_experiment(tiny_bert, tiny_glue, tmp_path):
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method="rm_lora", **{"optim.accumulate_steps": 2})
  results = glue_task.train_and_evaluate(config, config.workdir)
  assert results["steps"] == 6 and results["accumulate_steps"] == 2
  assert [h["step"] for h in results["history"]["train"]] == [1, 2, 3, 4, 5, 6]


def test_rm_lora_moves_only_selected_directions(tiny_bert, tiny_glue, tmp_path):
  # One step of the real experiment: with masks before and after AdamW, the
  # unselected rows of every `a` keep their initial values.
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method="rm_lora", max_steps=1,
                       checkpoint_every_steps=1)
  glue_task.train_and_evaluate(config, config.workdir)
  restored = _final_trainable(tmp_path, 1)
  import rmlora_jax as rl
  from rmlora_jax.models import hub
  _, params, _, hf_config = hub.load_pretrained(tiny_bert, head="classification", num_labels=2)
  spec = rl.LoraSpec(rank=4, alpha=config.lora.alpha, targets=hub.default_lora_targets(hf_config))
  init = rl.init_lora(training.stream_key(config.seed, training.INIT_STREAM), params, spec)
  for path, ad in restored["adapters"].items():
    sel = np.asarray(rl.direction_mask(config.seed, 0, f"adapters/{path}", 4, 2)).astype(bool)
    np.testing.assert_array_equal(np.asarray(ad["a"])[~sel], np.asarray(init[path]["a"])[~sel])
    assert np.all(np.asarray(ad["a"])[sel] != np.asarray(init[path]["a"])[sel])


def test_authors_preset_in_every_task_config_and_in_results(tiny_bert, tiny_glue, tmp_path):
  from configs import cifar100, cola, squad, sft  # pylint: disable=g-import-not-at-top
  for module in (rte, cola, squad, sft, cifar100):
    c = module.get_config("method=gm_lora,preset=authors")
    assert c.preset == "authors" and c.method == "gm_lora"
    assert (c.rm.mask_mode, c.rm.mask_start_step, c.rm.mask_sets) == ("gradient", 1, "independent")
    assert (c.optim.warmup_ratio, c.optim.weight_decay, c.rm.emulate_frozen_head) == (0.0, 0.0, False)
  plain = rte.get_config()
  assert plain.preset == "" and (plain.rm.mask_mode, plain.rm.mask_start_step, plain.rm.mask_sets) == (
      "update", 0, "shared")
  assert (plain.optim.warmup_ratio, plain.optim.weight_decay) == (0.06, 0.01)
  with pytest.raises(ValueError, match=r"unknown preset 'author'; choose one of \('authors',\)"):
    rte.get_config("preset=author")
  # One real step: recorded in results.json, and no mask on the first step, so
  # every column of every b moved (under the default only r_hat of them do).
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, "method=rm_lora,preset=authors", max_steps=1,
                       checkpoint_every_steps=1)
  glue_task.train_and_evaluate(config, config.workdir)
  assert json.loads((tmp_path / "results.json").read_text())["preset"] == "authors"
  for path, ad in _final_trainable(tmp_path, 1)["adapters"].items():
    assert np.all(np.any(np.asarray(ad["b"]) != 0, axis=0)), path


def _final_trainable(workdir, step):
  ckpt = training.Checkpointer(str(pathlib.Path(workdir) / "checkpoints"))
  mngr = ckpt._mngr  # the raw orbax manager restores without a target structure
  import orbax.checkpoint as ocp
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  state = out.state
  return state["trainable"] if isinstance(state, dict) else state[1]


def test_sigkilled_run_resumes_to_identical_results(tiny_bert, tiny_glue, tmp_path):
  straight = tiny_config(tiny_bert, tiny_glue, tmp_path / "straight", method="rm_lora", max_steps=10)
  expected = glue_task.train_and_evaluate(straight, straight.workdir)

  killed_dir = tmp_path / "killed"
  args = [f"--config={ROOT}/configs/rte.py",
          f"--config.model.name_or_path={tiny_bert}", f"--config.data.dir={tiny_glue}",
          f"--config.workdir={killed_dir}", "--config.batch_size=8", "--config.max_seq_len=32",
          "--config.num_epochs=1", "--config.max_steps=10", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2", "--config.progress=False", "--config.lora.rank=4",
          "--config.rm.num_directions=2", "--config.method=rm_lora", "--config.data.num_buckets=1"]
  # The real entry point, with a trainer hook that dies like a killed job
  # right after step 7 (an asynchronous checkpoint save may be left half-written).
  driver = ("import os, runpy, signal, sys\n"
            "from rmlora_jax import trainer\n"
            "run = trainer.train_and_evaluate\n"
            "def kill(step, state, metrics):\n"
            "  if step == 7: os.kill(os.getpid(), signal.SIGKILL)\n"
            "trainer.train_and_evaluate = lambda *a, **k: run(*a, **{**k, 'hooks': trainer.Hooks(after_step=kill)})\n"
            "sys.argv[0] = 'experiments.glue'\n"
            "runpy.run_module('experiments.glue', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", driver, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert not (killed_dir / "results.json").exists()
  steps = sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) <= 7

  resumed_config = tiny_config(tiny_bert, tiny_glue, killed_dir, method="rm_lora", max_steps=10)
  resumed = glue_task.train_and_evaluate(resumed_config, resumed_config.workdir)
  assert resumed["metrics"] == expected["metrics"]
  assert [h["loss"] for h in resumed["history"]["train"]] == [h["loss"] for h in expected["history"]["train"]]
  chex.assert_trees_all_equal(_final_trainable(killed_dir, 10), _final_trainable(tmp_path / "straight", 10))


@pytest.mark.parametrize("overrides, message", [
    ({"method": "dora"}, r"config.method='dora' is unknown; choose one of \('full_ft', 'lora'"),
    ({"task": "squad"}, r"squad"),
    ({"method": "rm_lora", "rm.num_directions": 9}, r"rm.num_directions=9 must be in 1..config.lora.rank=4"),
    ({"data.dir": "/nonexistent/glue"}, r"config.data.dir='/nonexistent/glue' is not a directory"),
    ({"batch_size": 0}, r"config.batch_size must be a positive integer"),
    ({"rm.mask_mode": "both"}, r"mask_mode must be one of"),
    ({"rm.mask_period": 0}, r"config.rm.mask_period must be a positive integer"),
    ({"optim.accumulate_steps": 3}, r"config.batch_size=8 is not a multiple of config.optim.accumulate_steps=3"),
    ({"rm.mask_sets": "v2"}, r"config.rm.mask_sets must be one of \('shared', 'independent'\), got 'v2'"),
    ({"rm.mask_start_step": -1}, r"config.rm.mask_start_step must be a non-negative integer"),
    ({"lora.apply": "lowrank"}, r"config.lora.apply must be one of"),
    ({"rm.ortho_reduction": "avg"}, r"config.rm.ortho_reduction must be one of"),
    ({"rm.ortho_weight": -1.0}, r"config.rm.ortho_weight must be >= 0"),
    ({"optim.warmup_ratio": 2.0}, r"warmup_ratio must be in \[0, 1\]"),
    ({"lora.targets": ("[bad",)}, r"config.lora.targets: invalid regex"),
    ({"lora.init": "xavier"}, r"config.lora.init must be one of \('gaussian', 'kaiming_uniform'\), got 'xavier'"),
    ({"method": "adalora", "lora.init": "kaiming_uniform"}, r"config.lora.init='kaiming_uniform' applies to"),
    ({"method": "adalora", "adalora.target_rank": 99}, r"target_rank=99 must be in 1..config.adalora.init_rank=8"),
    ({"keep_checkpoints": 0}, r"config.keep_checkpoints must be a positive integer"),
    ({"seed": -1}, r"config.seed must be a non-negative integer"),
    ({"data.bucketing": "exact"}, r"config.data.bucketing must be 'fit' or 'geometric', got 'exact'"),
    ({"data.bucket_multiple": 0}, r"config.data.bucket_multiple must be a positive integer"),
])
def test_bad_config_fails_before_loading_anything(overrides, message, tmp_path):
  # The model path does not exist: a config error must be raised before it is looked at.
  config = tiny_config("/nonexistent/model", str(tmp_path), tmp_path / "w", **overrides)
  with pytest.raises(ValueError, match=message):
    glue_task.train_and_evaluate(config, config.workdir)


def test_fitted_buckets_hold_every_batch_and_pad_less_than_halvings():
  rng = np.random.default_rng(0)
  def split(n):
    lengths = np.minimum(rng.geometric(0.08, n) + 3, 128)
    return glue_data.TokenizedSplit([np.ones(k, np.int32) for k in lengths], [np.zeros(k, np.int32) for k in lengths],
                                    np.zeros(n, np.int32))
  train, dev = split(700), split(150)
  config = lambda how: tiny_config("unused", "unused", "unused", batch_size=16, max_seq_len=128,
                                   **{"data.num_buckets": 4, "data.bucketing": how})
  halvings = glue_task.buckets_for(config("geometric"), train, {"dev": dev})
  assert halvings == (16, 32, 64, 128)
  fitted = glue_task.buckets_for(config("fit"), train, {"dev": dev})
  assert len(fitted) <= 4 and all(b % 4 == 0 or b == 128 for b in fitted)
  def padded(buckets, data, **kw):
    return sum(b["input_ids"].size for b in glue_data.batches(data, 16, buckets=buckets, **kw))
  for epoch in range(3):  # Later epochs' batches fit too (the longest example is in every epoch).
    kw = dict(seed=0, epoch=epoch, shuffle=True)
    assert padded(fitted, train, **kw) < padded(halvings, train, **kw)
  assert padded(fitted, dev, seed=0, epoch=0, shuffle=False) <= padded(halvings, dev, seed=0, epoch=0, shuffle=False)


@pytest.mark.parametrize("seed,epoch,start", [(0, 0, 0), (3, 0, 5), (1, 2, 30)])
def test_shapes_compiled_ahead_come_in_the_order_the_run_first_needs_them(seed, epoch, start):
  # The background compile thread builds them in this order: the first step
  # must wait for one shape only, and each later new shape is the next built.
  rng = np.random.default_rng(seed)
  def split(n):
    lengths = np.minimum(rng.geometric(0.08, n) + 3, 128)
    return glue_data.TokenizedSplit([np.ones(k, np.int32) for k in lengths], [np.zeros(k, np.int32) for k in lengths],
                                    np.zeros(n, np.int32))
  task = classification.TextClassification(spec=glue_data.get_task("sst2"), train=split(700),
                                           evals={"dev": split(150), "other": split(90)},
                                           buckets=(8, 12, 16, 24, 32, 48, 64, 128))
  def first_seen(batches):
    return list(dict.fromkeys(b["input_ids"].shape[1] for b in batches))
  run = first_seen(itertools.chain(task.train_batches(16, seed=seed, epoch=epoch, start=start),
                                   task.train_batches(16, seed=seed, epoch=epoch + 1, start=0)))
  ahead = [b["input_ids"].shape for b in task.example_batches(16, training=True, seed=seed, epoch=epoch, start=start)]
  assert len(run) >= 4 and [s[1] for s in ahead[:len(run)]] == run and all(s[0] == 16 for s in ahead)
  epoch0 = first_seen(task.train_batches(16, seed=seed, epoch=0, start=0))
  assert set(s[1] for s in ahead) == set(run) | set(epoch0) and len(ahead) == len(set(s[1] for s in ahead))
  # Evaluation goes through the splits in turn, each in its fixed order.
  evals = [b for sp in task.evals.values()
           for b in batching.batches(sp, 32, seed=0, epoch=0, shuffle=False, buckets=task.buckets)]
  assert [b["input_ids"].shape[1] for b in task.example_batches(32, training=False)] == first_seen(evals)


def test_resuming_with_other_settings_is_refused(tiny_bert, tiny_glue, tmp_path):
  first = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=2)
  glue_task.train_and_evaluate(first, first.workdir)
  changed = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=2, seed=1, **{"lora.rank": 2})
  with pytest.raises(ValueError, match=r"other settings \(lora.rank: 4 -> 2, seed: 0 -> 1\)"):
    glue_task.train_and_evaluate(changed, changed.workdir)
  # The steps began compiling before the refusal; nothing is left compiling behind it.
  assert not [t for t in threading.enumerate() if t.name == "rmlora-compile"]
  # Where and how it reports may change: this resumes (and finds the run finished).
  again = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=2, log_every_steps=2)
  assert glue_task.train_and_evaluate(again, again.workdir)["steps"] == 2


def test_poisoned_batch_is_skipped_and_counted(tiny_bert, tiny_glue, tmp_path, monkeypatch):
  # Step 3's batch gets a label that makes its loss nan: that one update is
  # skipped, the run goes on and its parameters stay finite.
  real_batches = batching.batches
  counter = {"n": 0}

  def poisoned(*args, **kwargs):
    for batch in real_batches(*args, **kwargs):
      if kwargs.get("shuffle"):
        counter["n"] += 1
        if counter["n"] == 3:
          batch = {**batch, "weights": batch["weights"] * np.float32("nan")}
      yield batch

  monkeypatch.setattr(batching, "batches", poisoned)
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=6)
  results = glue_task.train_and_evaluate(config, config.workdir)
  assert results["nonfinite_steps"] == 1
  losses = [h["loss"] for h in results["history"]["train"]]
  assert np.isnan(losses[2]) and np.all(np.isfinite(np.delete(losses, 2)))
  final = _final_trainable(tmp_path, 6)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(final))


def test_diverging_run_stops_with_a_resumable_checkpoint(tiny_bert, tiny_glue, tmp_path):
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=12, learning_rate=1e30,
                       **{"optim.max_grad_norm": 0.0, "optim.max_nonfinite_steps": 3})
  with pytest.raises(ValueError, match=r"3 steps in a row up to step \d+ had a non-finite loss or gradient "
                                       r"\(config.optim.max_nonfinite_steps=3\); the last checkpoint \(step \d+\) is intact"):
    glue_task.train_and_evaluate(config, config.workdir)
  assert not (tmp_path / "results.json").exists()
  ckpt = training.Checkpointer(str(tmp_path / "checkpoints"))
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest is not None and latest < 12
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(_final_trainable(tmp_path, latest)))


def test_failed_checkpoint_save_is_a_clear_error_and_leaves_no_half_checkpoint(tiny_bert, tiny_glue, tmp_path,
                                                                                monkeypatch):
  import errno
  import orbax.checkpoint as ocp
  real_save = ocp.JsonCheckpointHandler.async_save
  calls = {"n": 0}

  async def disk_full(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:  # the second checkpoint (step 4): the disk is full
      raise OSError(errno.ENOSPC, "No space left on device")
    return await real_save(self, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full)
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=6)
  with pytest.raises(training.CheckpointError,
                     match=r"saving .* failed \(OSError: \[Errno 28\] No space left on device\); the last "
                           r"complete checkpoint is step 2: free space"):
    glue_task.train_and_evaluate(config, config.workdir)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", real_save)
  committed = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert committed == ["2"]
  # The same command resumes from step 2 and ends as an uninterrupted run.
  resumed = glue_task.train_and_evaluate(config, config.workdir)
  straight = tiny_config(tiny_bert, tiny_glue, tmp_path / "straight", method="lora", max_steps=6)
  assert resumed["metrics"] == glue_task.train_and_evaluate(straight, straight.workdir)["metrics"]


def test_adalora_budget_is_2r_to_r_unless_set(tmp_path):
  config = tiny_config("unused", str(tmp_path), tmp_path, method="adalora", **{"lora.rank": 8})
  settings = settings_lib.method_settings(config, default_targets=(".*kernel",))
  assert (settings.spec.rank, settings.options.target_rank) == (16, 8)
  # The AdaLoRA authors' scripts: alpha / r = 8 over the initial rank, weight 0.1, window 12% / 44%.
  assert settings.spec.alpha == 8 * 16 and settings.spec.scale == 8.0
  assert (settings.options.ortho_weight, settings.options.t_init_ratio, settings.options.t_final_ratio) == (
      0.3, 0.12, 0.44)  # RTE's weight
  config.adalora.init_rank, config.adalora.target_rank = 12, 6
  settings = settings_lib.method_settings(config, default_targets=(".*kernel",))
  assert (settings.spec.rank, settings.options.target_rank, settings.spec.alpha) == (12, 6, 96.0)
  config.adalora.alpha_over_rank = -1.0  # the LoRA family's alpha, as before
  assert settings_lib.method_settings(config, default_targets=(".*kernel",)).spec.alpha == config.lora.alpha
  config.method = "lora"  # the ratio is AdaLoRA's alone
  config.adalora.alpha_over_rank = 8.0
  assert settings_lib.method_settings(config, default_targets=(".*kernel",)).spec.alpha == config.lora.alpha
  from configs import rte, stsb, sst2  # pylint: disable=g-import-not-at-top
  assert [m.get_config().adalora.ortho_weight for m in (rte, stsb, sst2)] == [0.3, 0.3, 0.1]


def test_results_report_best_and_final_evaluations(tiny_bert, tiny_glue, tmp_path):
  config = tiny_config(tiny_bert, tiny_glue, tmp_path, method="lora", max_steps=6, eval_every_steps=2)
  results = glue_task.train_and_evaluate(config, config.workdir)
  evals = results["history"]["eval"]
  assert [e["step"] for e in evals] == [2, 4, 6]
  assert results["final"] == evals[-1] and results["metrics"]["accuracy"] == evals[-1]["accuracy"]
  assert results["best"]["accuracy"] == max(e["accuracy"] for e in evals)
  assert results["best"] in evals


def test_peft_adalora_anchor_prunes_to_the_budget_ours_does(tiny_bert, tiny_glue, tmp_path):
  """PEFT's AdaLoRA and ours, one config: the same parameter budget, both pruned from 2R to R."""
  from experiments import peft_glue  # pylint: disable=g-import-not-at-top

  overrides = {"method": "adalora", "max_steps": 30, "lora.rank": 2, "adalora.delta_t": 2,
               "checkpoint_every_steps": 30}
  peft_config = tiny_config(tiny_bert, tiny_glue, tmp_path / "peft", **overrides)
  peft = peft_glue.run(peft_config, peft_config.workdir)
  ours_config = tiny_config(tiny_bert, tiny_glue, tmp_path / "ours", **overrides)
  ours = glue_task.train_and_evaluate(ours_config, ours_config.workdir)
  assert peft["method"] == "peft_adalora" and ours["method"] == "adalora"
  head = 32 * 2 + 2
  # r (d_in + d_out + 1) per triplet adapter at the initial rank 2R = 4.
  per_rank = 4 * (32 + 32 + 1) + (32 + 48 + 1) + (48 + 32 + 1)
  assert peft["trainable_params"] == ours["trainable_params"] == 2 * 4 * per_rank + head
  # 12 adapters start at 4 and end at the budget R = 2 on average: 24 triplets.
  for r in (peft, ours):
    assert r["total_rank"] == {"initial": 48, "final": 24}
    assert head < r["inference_params"] < r["trainable_params"]
  assert min(h["penalty"] for h in peft["history"]["train"]) > 0
  # The anchor's own check of PEFT's regulariser: its recorded penalty is the weight
  # (RTE's 0.3) x the mean plain Frobenius deviation, near sqrt(r) for small factors.
  w = peft_config.adalora.ortho_weight
  assert w == 0.3 and w * np.sqrt(4) * 0.8 < peft["history"]["train"][0]["penalty"] < w * np.sqrt(4) * 1.01
  assert peft["lora"]["alpha"] == ours["lora"]["alpha"] == 8 * 4  # alpha / r = 8 on both sides
