r"""Offline stand-in, step 1: a small ViT trained from scratch on five CIFAR-10 classes.

  python -m experiments.vision --config=configs/vit_pretrain.py \
      --config.data.dir=../shared/data/cifar10 --config.workdir=runs/vit_pretrain

No pre-trained ViT exists offline, so this builds one: patch 4 on 32x32
images, 4 layers, hidden 192, fully fine-tuned (method full_ft) on
airplane, automobile, bird, cat and deer (config.data.classes), and saves the
backbone to ``<workdir>/model`` as a Hugging Face folder (config.json,
model.safetensors, preprocessor_config.json) for configs/cifar10_transfer.py.
"""

from configs import cifar100

# The split of CIFAR-10's ten classes: pre-training sees these, transfer the other five.
PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TRANSFER_CLASSES = ("dog", "frog", "horse", "ship", "truck")


def get_config(arg=None):
  config = cifar100.get_config(arg)
  config.task = "vit_pretrain"
  config.method = "full_ft"
  config.model.name_or_path = ""  # built from config.model.vit
  config.data.classes = PRETRAIN_CLASSES
  config.data.hub_name = "uoft-cs/cifar10"
  config.save_model = True
  config.frozen_features = False  # full_ft here trains the whole ViT, not a linear probe
  config.score_initial = False
  config.num_epochs = 8
  config.batch_size = 64
  config.learning_rate = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.warmup_ratio = 0.1
  config.checkpoint_every_steps = 200
  return config
