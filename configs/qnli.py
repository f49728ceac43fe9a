"""GLUE QNLI: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/qnli.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/qnli
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "qnli"
  config.sora.xi = 0.0001
  return config
