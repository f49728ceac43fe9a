"""GLUE MRPC: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/mrpc.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/mrpc
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "mrpc"
  config.num_epochs = 5
  config.sora.xi = 0.001
  return config
