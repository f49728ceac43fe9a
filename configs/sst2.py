"""GLUE SST2: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/sst2.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/sst2
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "sst2"
  config.sora.xi = 0.005
  return config
