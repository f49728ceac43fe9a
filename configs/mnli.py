"""GLUE MNLI: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/mnli.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/mnli
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "mnli"
  config.sora.xi = 0.005
  return config
