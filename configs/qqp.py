"""GLUE QQP: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/qqp.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/qqp
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "qqp"
  config.sora.xi = 0.005
  return config
