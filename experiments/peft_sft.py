r"""PEFT's LoRA on PyTorch, on the same model, data and settings as experiments.sft.

The anchor for the SFT results: our ``lora`` should match it within seed
noise. Needs torch and peft.

  python -m experiments.peft_sft --config=configs/sft.py:method=lora \
      --config.data.dir=../shared/data/squad --config.workdir=runs/sft_peft_lora

It reads the same config (data, chat template, rank, alpha, learning rate,
batch size, steps, warm-up, weight decay, clipping, max_seq_len, generation
settings, seed), trains PEFT's LoRA (``task_type="CAUSAL_LM"``) on the
task's own batches with the same response-only loss, generates the held-out
answers with transformers' ``generate`` and scores them as experiments.sft
does; results.json has method ``peft_lora`` (`rmlora_jax.peft_anchor`).
"""

from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.recipes import run as run_lib
from rmlora_jax.models import hub
from rmlora_jax.recipes import sft

# Defined when run as a program (below), not on import: tests import several
# entry points in one process, and their --config flags would clash.
_CONFIG = None


def run(config, workdir: str) -> dict:
  """Trains PEFT's LoRA on the SFT task and returns the results dict (also written to workdir)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  sft.validate(config)
  workdir = run_lib.resolve_workdir(config, workdir, task="sft", method=run_lib.peft_anchor_method(config))
  train, dev, _ = sft.load_examples(config)
  folder = hub.resolve_model_path(config.model.name_or_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  task = sft.build_task(config, tokenizer, train, dev)
  quantized = run_lib.anchor_model_kwargs(config, "causal_lm", 1)  # nf4: bitsandbytes' 4-bit base
  torch.manual_seed(config.seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, **{"dtype": torch.float32, **quantized})
  return run_lib.run_peft_anchor(task, model, config, workdir)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  cli.run(cli.config_main(run, _CONFIG, quiet=False))
