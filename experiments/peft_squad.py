r"""PEFT's LoRA on PyTorch on SQuAD: the same model, windows, post-processing and metric as experiments.squad.

  python -m experiments.peft_squad --config=configs/squad.py:model=minilm,method=lora \
      --config.data.dir=../shared/data/squad --config.workdir=runs/squad_peft_lora

Writes results.json in experiments.squad's layout with method ``peft_lora``
(`rmlora_jax.peft_anchor`). Needs torch and peft.
"""

from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.recipes import run as run_lib
from rmlora_jax.models import hub
from rmlora_jax.recipes import squad

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def run(config, workdir: str) -> dict:
  """Trains PEFT LoRA on SQuAD and returns the results dict (also written to workdir)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  train_file, dev_file = squad.validate(config)
  workdir = run_lib.resolve_workdir(config, workdir, task="squad", method=run_lib.peft_anchor_method(config))
  folder = hub.resolve_model_path(config.model.name_or_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  task = squad.build_task(config, tokenizer, train_file, dev_file)
  quantized = run_lib.anchor_model_kwargs(config, "qa", 2)  # nf4: bitsandbytes' 4-bit base
  torch.manual_seed(config.seed)
  model = transformers.AutoModelForQuestionAnswering.from_pretrained(folder, **quantized)
  return run_lib.run_peft_anchor(task, model, config, workdir)


if __name__ == "__main__":
  cli.run(cli.config_main(run, _CONFIG, quiet=False))
