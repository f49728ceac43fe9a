r"""Instruction-tunes a decoder LLM with one of the LoRA-family methods.

  python -m experiments.sft --config=configs/sft.py:method=rm_lora \
      --config.data.dir=../shared/data/squad --config.workdir=runs/sft_rm_lora

Writes results.json (``metrics.exact_match``, ``metrics.f1`` of generated
answers on held-out prompts; ``base``: the untuned model's), TensorBoard
scalars and plots to the workdir; the same workdir again resumes.
"""

from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.recipes import sft

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  cli.run(cli.config_main(sft.train_and_evaluate, _CONFIG))
