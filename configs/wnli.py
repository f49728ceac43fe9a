"""GLUE WNLI: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/wnli.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/wnli
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "wnli"
  config.num_epochs = 5
  config.sora.xi = 0.01
  return config
