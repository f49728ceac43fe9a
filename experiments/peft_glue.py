r"""PEFT's LoRA or AdaLoRA on PyTorch, on the same model, data and settings as experiments.glue.

The sanity anchors for the results table: our ``lora`` and ``adalora``
should match them within seed noise. Needs torch and peft (both in
requirements.txt).

  python -m experiments.peft_glue --config=configs/rte.py:model=minilm,method=lora \
      --config.data.dir=../shared/data/glue --config.workdir=runs/rte_peft_lora
  python -m experiments.peft_glue --config=configs/rte.py:model=minilm,method=adalora \
      --config.data.dir=../shared/data/glue --config.workdir=runs/rte_peft_adalora

It reads the same config (task, rank, alpha, learning rate, batch size,
epochs, warm-up, weight decay, clipping, max_seq_len, seed) and writes
``results.json`` in the same layout with method ``peft_lora`` or
``peft_adalora`` (`rmlora_jax.peft_anchor`); AdaLoRA gets our AdaLoRA's budget
(2R -> R unless ``adalora.*`` says otherwise) and schedule.
"""

from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli
from rmlora_jax.recipes import run as run_lib
from rmlora_jax.models import hub
from rmlora_jax.tasks import classification
from rmlora_jax.recipes import glue as glue_task

# Defined when run as a program (below), not on import: tests import several
# entry points in one process, and their --config flags would clash.
_CONFIG = None


def run(config, workdir: str) -> dict:
  """Trains PEFT's LoRA or AdaLoRA (``config.method``) and returns the results dict (also written to workdir)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  spec = glue_task.validate(config)
  workdir = run_lib.resolve_workdir(config, workdir, task=config.task, method=run_lib.peft_anchor_method(config))
  folder = hub.resolve_model_path(config.model.name_or_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  train, evals = glue_task.load_data(config, spec, tokenizer)
  head = "regression" if spec.is_regression else "classification"
  quantized = run_lib.anchor_model_kwargs(config, head, spec.num_labels)  # nf4: bitsandbytes' 4-bit base
  torch.manual_seed(config.seed)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=spec.num_labels,
                                                                          **quantized)
  if spec.is_regression and config.head_bias == "label_mean":  # as experiments.glue does
    with torch.no_grad():
      model.classifier.bias.fill_(float(np.mean(train.labels)))
  task = classification.TextClassification(spec=spec, train=train, evals=evals, buckets=(config.max_seq_len,),
                                           pad_id=glue_task.pad_id(tokenizer))
  return run_lib.run_peft_anchor(task, model, config, workdir)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  cli.run(cli.config_main(run, _CONFIG, quiet=False))
