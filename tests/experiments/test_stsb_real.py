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
     --config.max_steps=60 --config.progress=False"
  .venv/bin/python -m experiments.glue --config=configs/stsb.py:model=minilm,method=lora $F --config.workdir=/tmp/ours
  .venv/bin/python -m experiments.peft_glue --config=configs/stsb.py:model=minilm,method=lora $F --config.workdir=/tmp/peft
"""

import pathlib

import pytest

from configs import stsb
from rmlora_jax.recipes import glue as glue_task

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_GLUE = (ROOT / ".." / "shared" / "data" / "glue").resolve()


def _has_minilm():
  try:
    from rmlora_jax.models import hub
    hub.resolve_model_path("minilm-l6")
    return True
  except ValueError:
    return False


def stsb_config(workdir, **overrides):
  config = stsb.get_config("model=minilm,method=lora")
  config.data.dir = str(SHARED_GLUE)
  config.data.dev_from_train = 500
  config.workdir = str(workdir)
  config.max_seq_len = 64
  config.max_steps = 60
  config.progress = False
  config.checkpoint_every_steps = 1000
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.skipif(not (SHARED_GLUE / "STS-B" / "train.tsv").is_file() or not _has_minilm(),
                    reason="needs ../shared/data/glue/STS-B and the embedded MiniLM (scripts/setup.sh)")
def test_lora_learns_stsb_on_real_data(tmp_path):
  results = glue_task.train_and_evaluate(stsb_config(tmp_path), str(tmp_path))
  assert results["metrics"]["pearson"] > 0.66, results["metrics"]
