r"""Offline stand-in, step 2: last-layer LoRA of the pre-trained stand-in on the other five CIFAR-10 classes.

  python -m experiments.vision --config=configs/cifar10_transfer.py:method=rm_lora \
      --config.model.name_or_path=runs/vit_pretrain/model \
      --config.data.dir=../shared/data/cifar10 --config.lora.rank=4 --config.workdir=runs/transfer_rm_lora_r4

The classes (dog, frog, horse, ship, truck) were never seen in pre-training
(configs/vit_pretrain.py). The new five-way classifier's W0 is random and
frozen; only dW = (alpha / R) B A trains. With five classes dW is 5 x 192, so
its rank is at most 5: sweep R in 2..5 (scripts/vision_runs.sh).
"""

from configs import cifar100
from configs import vit_pretrain


def get_config(arg=None):
  config = cifar100.get_config(arg)
  config.task = "cifar10_transfer"
  config.model.name_or_path = base_model(arg)
  config.data.classes = vit_pretrain.TRANSFER_CLASSES
  config.data.hub_name = "uoft-cs/cifar10"
  config.num_epochs = 15
  config.batch_size = 64
  config.learning_rate = 1e-2  # at 1e-3 dW (from B = 0) is still under-fitted after 15 epochs (docs/VISION.md)
  config.lora.rank = 4
  config.lora.alpha = 8.0
  config.rm.num_directions = 2  # r_hat; the sweep uses ceil(R / 2)
  return config


def base_model(arg):
  """``model=`` of the config argument, else the pre-training run's default output folder."""
  from configs import base  # pylint: disable=g-import-not-at-top
  return base.parse_arg(arg).get("model", "runs/vit_pretrain/model")
