"""STS-B regression learns on real data.

A short real run: the embedded MiniLM, LoRA rank 8 on all six matrices, 60
steps of batch 32 on the shared STS-B training file with 500 held-out pairs
as the dev split (``data.dev_from_train``), max_seq_len 64, lr 1e-3.

What broke before: the regression head's bias started at 0 while the scores
average 2.7; fitting that mean through the adapters collapsed the [CLS]
features, and every prediction came out the same to 1e-3 (dev Pearson 0.05
to 0.25, in our runs and in PEFT's alike). The head's bias now starts at the
mean training score (``config.head_bias="label_mean"``).

Measured on this config (seed 0), dev Pearson: after 100 steps, ours 0.793
with the mean bias and -0.277 with ``head_bias="zero"``, PEFT's LoRA
(experiments.peft_glue, same split and settings) 0.727 and -0.160; after
the 60 steps this test runs, ours 0.703 and PEFT's 0.699 with the mean bias
(the commands below). The bound 0.66 sits 0.04 below our measured score, so
a change that costs this run a few points of Pearson fails it, and far
above the collapsed regime.

  F="--config.data.dir=../shared/data/glue --config.data.dev_from_train=500 --config.max_seq_len=64
     --config.max_steps=60 --config.progress=False --config.checkpoint_every_steps=1000"
  .venv/bin/python -m experiments.glue --config=configs/stsb.py:model=minilm,method=lora $F --config.workdir=/tmp/ours
  .venv/bin/python -m experiments.peft_glue --config=configs/stsb.py:model=minilm,method=lora $F --config.workdir=/tmp/peft
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from rmlora_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_GLUE = (ROOT / ".." / "shared" / "data" / "glue").resolve()


def _has_minilm():
  try:
    from rmlora_jax.models import hub
    hub.resolve_model_path("minilm-l6")
    return True
  except ValueError:
    return False


@pytest.mark.skipif(not (SHARED_GLUE / "STS-B" / "train.tsv").is_file() or not _has_minilm(),
                    reason="needs ../shared/data/glue/STS-B and the embedded MiniLM (scripts/setup.sh)")
def test_lora_learns_stsb_on_real_data(tmp_path):
  # The command line above, in a process of its own that compiles at XLA's default optimisation
  # level (the level the scores were measured at), not the suite's level 0 (tests/conftest.py).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
  env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", cli.CACHE_ENV: ""}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.glue", "--config=configs/stsb.py:model=minilm,method=lora",
       f"--config.data.dir={SHARED_GLUE}", "--config.data.dev_from_train=500", "--config.max_seq_len=64",
       "--config.max_steps=60", "--config.progress=False", "--config.checkpoint_every_steps=1000",
       f"--config.workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
  assert metrics["pearson"] > 0.66, metrics
