r"""Fine-tunes an encoder on a GLUE task with one of the LoRA-family methods.

  python -m experiments.glue --config=configs/rte.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.workdir=runs/rte_rm_lora

Starting again with the same workdir resumes from its latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.tasks import glue

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; keep the terminal to the progress bar,
    # evaluations and warnings unless --verbosity asks for more.
    logging.set_verbosity(logging.WARNING)
  glue.train_and_evaluate(_CONFIG.value, _CONFIG.value.workdir)


if __name__ == "__main__":
  cli.run(main)
