r"""Fine-tunes an encoder on a GLUE task with one of the LoRA-family methods.

  python -m experiments.glue --config=configs/rte.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/rte_rm_lora

Starting again with the same workdir resumes from its latest checkpoint.
"""

from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.recipes import glue

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  cli.run(cli.config_main(glue.train_and_evaluate, _CONFIG))
