r"""PEFT's LoRA on PyTorch, on the same model, data and settings as experiments.glue.

The sanity anchor for the results table: our ``lora`` should match it within
seed noise. Needs torch and peft (both in requirements.txt).

  python -m experiments.peft_glue --config=configs/rte.py:model=minilm,method=lora \
      --config.data.dir=../shared/data/glue --config.workdir=runs/rte_peft_lora

It reads the same config (task, rank, alpha, learning rate, batch size,
epochs, warm-up, weight decay, clipping, max_seq_len, seed) and writes
``results.json`` in the same layout with method ``peft_lora``. Batches are
padded to their longest example (PEFT's usual collator), in a seeded order.
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rmlora_jax import analysis
from rmlora_jax import cli
from rmlora_jax import experiment
from rmlora_jax.data import glue
from rmlora_jax.models import hub
from rmlora_jax.tasks import classification
from rmlora_jax.tasks import glue as glue_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])

# PEFT's names for the six matrices our default targets select in a BERT layer.
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def run(config, workdir: str) -> dict:
  """Trains PEFT LoRA and returns the results dict (also written to workdir)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top

  task = glue_task.validate(config)
  workdir = experiment.resolve_workdir(config, workdir, task=config.task, method="peft_lora")
  torch.manual_seed(config.seed)
  folder = hub.resolve_model_path(config.model.name_or_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  train, evals = glue_task.load_data(config, task, tokenizer)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      folder, num_labels=task.num_labels)
  if task.is_regression and config.head_bias == "label_mean":  # as experiments.glue does
    with torch.no_grad():
      model.classifier.bias.fill_(float(np.mean(train.labels)))
  lora_config = peft.LoraConfig(
      r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=0.0,
      target_modules=PEFT_TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS")
  model = peft.get_peft_model(model, lora_config)
  trainable = [p for p in model.parameters() if p.requires_grad]
  n_trainable = int(sum(p.numel() for p in trainable))

  steps_per_epoch = glue.num_batches(len(train), config.batch_size, drop_remainder=False)
  total = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_epochs
  lr = experiment.learning_rate(config)
  opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=config.optim.weight_decay)
  warmup = int(round(config.optim.warmup_ratio * total))
  sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)

  def to_torch(batch):
    longest = int(batch["attention_mask"].sum(1).max())
    return {k: torch.tensor(np.asarray(batch[k][:, :longest]), dtype=torch.long)
            for k in ("input_ids", "attention_mask", "token_type_ids")}

  history = {"train": [], "eval": []}
  buckets = (config.max_seq_len,)
  start = time.perf_counter()
  step = 0
  model.train()
  for epoch in range(config.num_epochs):
    for batch in glue.batches(train, config.batch_size, seed=config.seed, epoch=epoch,
                              shuffle=True, buckets=buckets):
      if step == total:
        break
      out = model(**to_torch(batch))
      w = torch.tensor(batch["weights"])
      labels = torch.tensor(batch["labels"])
      if task.is_regression:
        per = (out.logits[:, 0] - labels.float()) ** 2
      else:
        per = torch.nn.functional.cross_entropy(out.logits, labels.long(), reduction="none")
      loss = (w * per).sum() / w.sum().clamp(min=1.0)
      loss.backward()
      if config.optim.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, config.optim.max_grad_norm)
      opt.step()
      sched.step()
      opt.zero_grad()
      step += 1
      if step % config.log_every_steps == 0:
        history["train"].append({"step": step, "loss": float(loss), "task_loss": float(loss), "penalty": 0.0})
        logging.warning("step %d/%d loss %.4f", step, total, float(loss))
    history["eval"].append({"step": step, **_evaluate(model, evals, task, config, to_torch)})
    logging.warning("epoch %d dev %s", epoch, history["eval"][-1])
    if step == total:  # max_steps ended the run inside this epoch
      break
  train_time = time.perf_counter() - start

  scale = config.lora.alpha / config.lora.rank
  deltas = {}
  for name, module in model.named_modules():
    if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
      a = module.lora_A["default"].weight.detach().numpy()
      b = module.lora_B["default"].weight.detach().numpy()
      deltas[name] = scale * b @ a
  results = {
      "task": task.name, "method": "peft_lora", "seed": config.seed, "model": config.model.name_or_path,
      "metrics": {k: v for k, v in history["eval"][-1].items() if k != "step"},
      "main_metric": task.main_metric, "final": dict(history["eval"][-1]),
      "best": dict(max(history["eval"], key=lambda h: h[task.main_metric])),
      "trainable_params": n_trainable, "inference_params": n_trainable,
      "steps": step, "train_time_s": round(train_time, 2), "learning_rate": lr,
      "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha},
      "adapters": analysis.delta_report(deltas),
      "history": history,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  return results


def _evaluate(model, evals, task, config, to_torch) -> dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top

  def predict(batch):
    with torch.no_grad():
      logits = model(**to_torch(batch)).logits.float().numpy()
    return logits[:, 0] if task.is_regression else logits.argmax(-1)

  model.eval()
  scorer = classification.TextClassification(spec=task, evals=evals, buckets=(config.max_seq_len,))
  out = scorer.evaluate(predict, config.batch_size)
  model.train()
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, _CONFIG.value.workdir)


if __name__ == "__main__":
  cli.run(main)
