r"""Writes a finished run as a PEFT adapter folder or as a merged Hugging Face model.

  python -m experiments.export --workdir=runs/rte_lora --format=peft --out=runs/rte_lora/peft
  python -m experiments.export --workdir=runs/rte_lora --format=merged --out=runs/rte_lora/merged

``--format=peft``: ``adapter_config.json`` and ``adapter_model.safetensors``
(adapters and trained head), for ``PeftModel.from_pretrained`` on the
transformers model of the run's base model, or ``--config.init_adapters`` of
another run. ``--format=merged``: ``config.json``, ``model.safetensors`` and
the tokenizer, ``dW`` merged in, for ``AutoModelForSequenceClassification``
(``AutoModelForQuestionAnswering`` for SQuAD, ``AutoModelForCausalLM`` for
SFT) ``.from_pretrained``.
"""

from absl import flags
from absl import logging

from configs import base
from rmlora_jax import cli
from rmlora_jax.recipes import export as export_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (its results.json and checkpoints).")
_FORMAT = flags.DEFINE_enum("format", "peft", list(export_lib.EXPORT_FORMATS),
                            "peft: a PEFT adapter folder; merged: a Hugging Face model folder.")
_OUT = flags.DEFINE_string("out", "", "The folder to write; empty: <workdir>/<format>.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {list(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  out = export_lib.export_run(_WORKDIR.value, fmt=_FORMAT.value, out=_OUT.value or None, defaults=base.get_config())
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
