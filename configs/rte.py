"""GLUE RTE: the RM-LoRA paper's Table 3 settings.

  python -m experiments.glue --config=configs/rte.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/rte
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "rte"
  config.sora.xi = 0.005
  config.lora2.ortho_weight = 0.3
  config.adalora.ortho_weight = 0.3  # the AdaLoRA authors' RTE and STS-B scripts
  return config
