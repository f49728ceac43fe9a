"""PEFT's LoRA or AdaLoRA on PyTorch, trained on one of our tasks: the anchors our results are compared with.

`train_peft_lora` takes a task (`rmlora_jax.tasks`), the transformers model
for it, and the run's `rmlora_jax.trainer.TrainerSettings`; it wraps the
model with PEFT's LoRA on the same matrices our default targets select,
trains it on the task's own batches (cut to their longest row, as PEFT's
usual collator pads) with AdamW, gradient clipping and a linear warm-up and
decay, evaluates with the task's own metric, and writes results.json in
the trainer's layout with method ``peft_lora``.

Given `PeftAdaLora` settings it trains PEFT's AdaLoRA instead (method
``peft_adalora``), the way PEFT's documentation drives it: the
orthogonality term PEFT adds to a model's own loss is added to the task's
loss here (PEFT's formula: the mean over factors of ``||P^T P - I||_F``
and ``||Q Q^T - I||_F``, not squared), and
``update_and_allocate(step)`` runs after each optimizer step, on the
clipped gradients. Needs torch and peft.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from rmlora_jax import analysis
from rmlora_jax import trainer as trainer_lib
from rmlora_jax.tasks import causal_lm
from rmlora_jax.tasks import classification
from rmlora_jax.tasks import qa

# PEFT's names, per model type, of the matrices `default_lora_targets` selects
# in each layer (Q, K, V, attention output, intermediate, output).
PEFT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
_TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


class PeftAdaLora(NamedTuple):
  """PEFT ``AdaLoraConfig`` fields (steps, not ratios); ``total_step`` is the run's."""

  init_r: int
  target_r: int
  tinit: int
  tfinal: int
  delta_t: int
  beta1: float
  beta2: float
  orth_reg_weight: float


def _adalora_orthogonality(model: Any) -> Any:
  """PEFT's AdaLoRA regulariser (`AdaLoraModel.forward`): mean of ``||A A^T - I||_F``, ``||B^T B - I||_F``."""
  import torch  # pylint: disable=g-import-not-at-top

  terms = []
  for name, p in model.named_parameters():
    if p.requires_grad and ("lora_A" in name or "lora_B" in name):
      gram = p @ p.T if "lora_A" in name else p.T @ p
      terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype)))
  return torch.stack(terms).mean()


def _task_functions(task: Any) -> tuple[str, list[str], Callable, Callable]:
  """PEFT's task type, the head modules to train, and the task's loss and predictions in torch."""
  import torch  # pylint: disable=g-import-not-at-top

  def weighted(per_example, batch):
    w = torch.tensor(batch["weights"])
    return (w * per_example).sum() / w.sum().clamp(min=1.0)

  if isinstance(task, classification.TextClassification):
    regression = task.spec.is_regression

    def loss(out, batch):
      labels = torch.tensor(batch["labels"])
      if regression:
        return weighted((out.logits[:, 0] - labels.float()) ** 2, batch)
      return weighted(torch.nn.functional.cross_entropy(out.logits, labels.long(), reduction="none"), batch)

    def predict(out):
      logits = out.logits.float().numpy()
      return logits[:, 0] if regression else logits.argmax(-1)

    return "SEQ_CLS", ["classifier"], loss, predict
  if isinstance(task, qa.ExtractiveQA):

    def loss(out, batch):
      ce = lambda logits, pos: torch.nn.functional.cross_entropy(
          logits, torch.tensor(batch[pos]).long(), reduction="none")
      return weighted(0.5 * (ce(out.start_logits, "start_positions") + ce(out.end_logits, "end_positions")), batch)

    def predict(out):
      return {"start_logits": out.start_logits.float().numpy(), "end_logits": out.end_logits.float().numpy()}

    return "QUESTION_ANS", ["qa_outputs"], loss, predict
  if isinstance(task, causal_lm.InstructionTuning):

    def loss(out, batch):
      # The mean cross-entropy over the batch's response tokens (causal_lm.response_loss).
      ids = torch.tensor(batch["input_ids"][:, :out.logits.shape[1]]).long()
      counted = torch.tensor(batch["loss_mask"][:, 1:out.logits.shape[1]]).float() * torch.tensor(batch["weights"])[:, None]
      ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
      return (ce * counted).sum() / counted.sum().clamp(min=1.0)

    return "CAUSAL_LM", None, loss, None  # evaluation generates (_generator)
  raise ValueError("the PEFT anchor knows TextClassification, ExtractiveQA and InstructionTuning tasks, not "
                   f"{type(task).__name__}")


def _generator(task: causal_lm.InstructionTuning, model: Any) -> Callable[[Any], np.ndarray]:
  """``batch -> (B, max_new_tokens)`` new tokens of transformers' ``generate`` on the task's left-padded prompts."""
  import torch  # pylint: disable=g-import-not-at-top

  def predict(batch):
    longest = int(batch["attention_mask"].sum(1).max())
    ids = torch.tensor(np.asarray(batch["input_ids"][:, -longest:]), dtype=torch.long)
    mask = torch.tensor(np.asarray(batch["attention_mask"][:, -longest:]), dtype=torch.long)
    sample = task.temperature > 0
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=task.max_new_tokens,
                           do_sample=sample, temperature=task.temperature if sample else None,
                           top_p=task.top_p if sample else None, top_k=None,
                           eos_token_id=list(task.eos_token_ids), pad_token_id=task.pad_token_id)
    new = np.full((ids.shape[0], task.max_new_tokens), task.pad_token_id, np.int32)
    produced = out[:, longest:].numpy()
    new[:, :produced.shape[1]] = produced
    return new

  return predict


def train_peft_lora(
    task: Any,
    model: Any,
    settings: trainer_lib.TrainerSettings,
    workdir: str | pathlib.Path,
    *,
    rank: int,
    alpha: float,
    weight_decay: float,
    max_grad_norm: float,
    extra_results: Mapping[str, Any] | None = None,
    adalora: PeftAdaLora | None = None,
) -> dict[str, Any]:
  """Trains PEFT LoRA of ``rank`` and ``alpha`` on ``model`` (a transformers model for ``task``).

  Seed torch (``torch.manual_seed``) before building ``model``; the adapters'
  initialisation continues that stream. With ``adalora`` it trains PEFT's
  AdaLoRA with those settings (``rank`` is then unused; scaling is
  ``alpha / init_r``, as PEFT's).

  Plain LoRA's adapters are saved as PEFT folders before and after training,
  ``workdir/initial_adapter`` and ``workdir/adapter``: with
  ``config.init_adapters`` set to the first, our trainer starts from PEFT's
  initialisation (``tests/experiments/test_sft.py`` compares the two step by
  step for SFT; for GLUE and SQuAD the folder holds PEFT's new head too,
  untested as a starting point), and the second scores PEFT's result
  through our evaluation.

  Returns the results dict, also written to ``workdir/results.json``.
  """
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model_type = model.config.model_type
  if model_type not in PEFT_TARGETS:
    raise ValueError(f"the PEFT anchor has target names for {sorted(PEFT_TARGETS)}, not model_type {model_type!r}")
  task_type, head, loss_fn, predict_out = _task_functions(task)
  # The LoRA factors are drawn from torch's global generator: the caller seeds
  # it (torch.manual_seed) before building the model, so head and adapters
  # come from one seeded stream.
  steps_per_epoch = task.num_train_batches(settings.batch_size)
  total = settings.total_steps(steps_per_epoch)
  common = dict(lora_alpha=alpha, lora_dropout=0.0, target_modules=PEFT_TARGETS[model_type],
                modules_to_save=head, task_type=task_type)
  if adalora is None:
    peft_config = peft.LoraConfig(r=rank, **common)
  else:
    peft_config = peft.AdaLoraConfig(
        init_r=adalora.init_r, target_r=adalora.target_r, tinit=adalora.tinit, tfinal=adalora.tfinal,
        deltaT=adalora.delta_t, beta1=adalora.beta1, beta2=adalora.beta2,
        orth_reg_weight=adalora.orth_reg_weight, total_step=total, **common)
  model = peft.get_peft_model(model, peft_config)
  workdir = pathlib.Path(workdir)
  if adalora is None:
    model.save_pretrained(workdir / "initial_adapter")
  trainable = [p for p in model.parameters() if p.requires_grad]
  fields = [k for k in _TOKEN_FIELDS if k != "token_type_ids" or task_type != "CAUSAL_LM"]
  # PEFT 0.21's PeftModelForQuestionAnswering.forward takes token_type_ids but
  # does not hand them to the model, which then sees segment 0 everywhere
  # (measured: its logits equal transformers' with token_type_ids left out).
  # Calling the wrapped transformers model, LoRA layers in place, gives PEFT's
  # LoRA the inputs our side gets.
  forward = model.base_model.model if task_type == "QUESTION_ANS" else model
  opt = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=weight_decay)
  sched = transformers.get_linear_schedule_with_warmup(opt, int(round(settings.warmup_ratio * total)), total)
  eval_every = settings.eval_every_steps if settings.eval_every_steps > 0 else steps_per_epoch

  def inputs(batch):
    longest = int(batch["attention_mask"].sum(1).max())
    return {k: torch.tensor(np.asarray(batch[k][:, :longest]), dtype=torch.long) for k in fields}

  if task_type == "CAUSAL_LM":
    predict = _generator(task, model)
  else:

    def predict(batch):
      with torch.no_grad():
        out = predict_out(forward(**inputs(batch)))
      return out

  def evaluate():
    model.eval()
    try:
      return task.evaluate(predict, settings.batch_size)
    finally:
      model.train()

  history: dict[str, list] = {"train": [], "eval": []}
  start = time.perf_counter()
  model.train()
  for step in range(total):
    epoch, index = divmod(step, steps_per_epoch)
    if index == 0:
      batches = task.train_batches(settings.batch_size, seed=settings.seed, epoch=epoch, start=0)
    batch = next(batches)
    task_loss = loss_fn(forward(**inputs(batch)), batch)
    penalty = adalora.orth_reg_weight * _adalora_orthogonality(model) if adalora else torch.zeros(())
    loss = task_loss + penalty
    loss.backward()
    if max_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    opt.step()
    if adalora is not None:
      model.base_model.update_and_allocate(step)
    sched.step()
    opt.zero_grad()
    done = step + 1
    if done % settings.log_every_steps == 0 or done == total:
      history["train"].append({"step": done, "loss": float(loss.detach()), "task_loss": float(task_loss.detach()),
                               "penalty": float(penalty.detach())})
    if done % eval_every == 0 or done == total:
      history["eval"].append({"step": done, **evaluate()})
      print(f"step {done}/{total} eval " + " ".join(f"{k} {v:.4f}" for k, v in history["eval"][-1].items()
                                                  if k != "step"), flush=True)
  train_time = time.perf_counter() - start

  deltas, ranks = {}, {}
  n_inference = 0
  for name, module in model.named_modules():
    if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
      with torch.no_grad():
        deltas[name] = module.get_delta_weight("default").numpy()
      if adalora is not None:  # a pruned triplet is a zero in lora_E
        ranks[name] = int(torch.count_nonzero(module.lora_E["default"]))
        n_inference += ranks[name] * (module.in_features + module.out_features + 1)
  n_trainable = int(sum(p.numel() for p in trainable))
  n_head = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and "lora_" not in n)
  n_inference = n_trainable if adalora is None else int(n_inference + n_head)
  initial = rank if adalora is None else adalora.init_r
  evals = history["eval"]
  results = {
      "task": task.name, "method": "peft_lora" if adalora is None else "peft_adalora", "seed": settings.seed,
      "metrics": {k: v for k, v in evals[-1].items() if k != "step"}, "main_metric": task.main_metric,
      "final": dict(evals[-1]), "best": dict(max(evals, key=lambda h: h[task.main_metric])),
      "trainable_params": n_trainable, "inference_params": n_inference,
      "total_rank": {"initial": initial * len(deltas),
                     "final": sum(ranks.values()) if adalora is not None else rank * len(deltas)},
      "steps": total, "train_time_s": round(train_time, 2), "learning_rate": settings.learning_rate,
      "adapters": analysis.delta_report(deltas), "history": history, **(extra_results or {}),
  }
  if adalora is None:
    model.save_pretrained(workdir / "adapter")
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  return results
