r"""Fine-tunes a ViT on image classification with one of the LoRA-family methods.

  python -m experiments.vision --config=configs/cifar100.py:method=rm_lora --config.lora.rank=32

Offline (docs/VISION.md): configs/vit_pretrain.py, then configs/cifar10_transfer.py.
Writes results.json (``metrics.accuracy``; per epoch train/test accuracy and
loss, the generalisation gap, rank(dW), its orthogonality loss and spectrum),
TensorBoard scalars and plots to the workdir; the same workdir again resumes.
"""

from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.recipes import vision as cifar

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  cli.run(cli.config_main(cifar.train_and_evaluate, _CONFIG))
