"""Instruction tuning of a decoder LLM: next-token loss on response tokens, scored by generation.

`InstructionTuning` is a `rmlora_jax.tasks.base.Task` over
`rmlora_jax.data.sft.SftFeatures`. Training batches are right-padded to the
smallest length bucket that fits; the loss is the mean next-token
cross-entropy over the response tokens of the batch (prompt and padding
tokens are not predicted). Evaluation generates an answer for each held-out
prompt (left-padded, KV cache, greedy or sampled; `rmlora_jax.models.llama.generate`)
inside the trainer's jitted eval step and scores its first line against the
references with the official SQuAD v1.1 exact match and F1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmlora_jax import metrics as metrics_lib
from rmlora_jax.data import batching
from rmlora_jax.data import sft
from rmlora_jax.models import llama
from rmlora_jax.tasks import base


def response_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting each response token from the tokens before it.

  Position ``t`` of ``logits`` predicts token ``t + 1``; it counts where
  ``loss_mask[t + 1]`` is 1 and its row's weight is nonzero. The mean is over
  those tokens of the whole batch (transformers' and PEFT's convention for
  causal-LM labels), 0 when there are none.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                       input_ids[:, 1:].astype(jnp.int32))
  counted = loss_mask[:, 1:].astype(jnp.float32) * weights[:, None]
  return jnp.sum(ce * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def answer_text(generated: str) -> str:
  """The answer in a generated response: its first non-empty line, stripped."""
  for line in generated.strip().splitlines():
    if line.strip():
      return line.strip()
  return ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstructionTuning:
  """Supervised fine-tuning on prompt/response pairs, evaluated by generated answers.

  Example::

    task = InstructionTuning(train=sft.tokenize(train, tok, max_seq_len=384),
                             eval=sft.tokenize(dev, tok, max_seq_len=384), buckets=(128, 256, 384),
                             decode=tok.decode, eos_token_ids=(tok.eos_token_id,), pad_token_id=0)
  """

  # Training rows (None: a task that only evaluates).
  train: sft.SftFeatures | None
  # Held-out rows: their prompts are generated from, their references score it.
  eval: sft.SftFeatures
  # Padded lengths of training batches and of evaluation prompts.
  buckets: tuple[int, ...]
  # Token ids -> text (the tokenizer's ``decode``).
  decode: Callable[[Sequence[int]], str]
  # Generation stops at any of these.
  eos_token_ids: tuple[int, ...]
  pad_token_id: int
  # Tokens generated per answer at most.
  max_new_tokens: int = 32
  # 0: greedy; > 0 samples at this temperature (nucleus top_p), seeded by seed.
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  name: str = "sft"
  main_metric: str = "f1"

  def __post_init__(self):
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"InstructionTuning.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
    if len(self.eval) == 0:
      raise ValueError("InstructionTuning.eval holds no examples (all longer than max_seq_len, or none given)")

  def num_train_batches(self, batch_size: int) -> int:
    if self.train is None:
      raise ValueError(f"task {self.name!r} was built without training rows (InstructionTuning.train)")
    return batching.num_batches(len(self.train), batch_size, drop_remainder=False)

  def _width(self, longest: int) -> int:
    return batching.bucket_for(longest, sorted({*self.buckets, self.train_width}))

  @property
  def train_width(self) -> int:
    return (self.train if self.train is not None else self.eval).input_ids.shape[1]

  def train_batches(self, batch_size: int, *, seed: int, epoch: int, start: int) -> Iterator[base.Batch]:
    f = self.train
    for idx in batching.batch_plan(f.lengths, batch_size, seed=seed, epoch=epoch, shuffle=True)[start:]:
      real = len(idx)
      idx = np.concatenate([idx, np.full(batch_size - real, idx[0], idx.dtype)])
      width = self._width(int(f.lengths[idx].max()))
      ids = f.input_ids[idx, :width]
      weights = np.zeros(batch_size, np.float32)
      weights[:real] = 1.0
      yield {"input_ids": ids, "attention_mask": (np.arange(width)[None] < f.lengths[idx, None]).astype(np.int32),
             "loss_mask": f.loss_mask[idx, :width], "weights": weights}

  def forward(self, module, params, batch, *, deterministic, rngs):
    return module.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                        deterministic=deterministic, rngs=rngs)

  def loss(self, outputs, batch) -> jax.Array:
    return response_loss(outputs, batch["input_ids"], batch["loss_mask"], batch["weights"])

  def predict(self, outputs, batch):
    """Greedy next tokens (teacher-forced); evaluation itself generates (`generate`)."""
    return jnp.argmax(outputs, axis=-1).astype(jnp.int32)

  def generate(self, module, params, batch) -> jax.Array:
    """The answer tokens (B, max_new_tokens) for a batch of left-padded prompts (traced in the eval step)."""
    return llama.generate(module, params, batch["input_ids"], batch["attention_mask"],
                          max_new_tokens=self.max_new_tokens, eos_token_id=list(self.eos_token_ids),
                          pad_token_id=self.pad_token_id, temperature=self.temperature, top_p=self.top_p,
                          seed=self.seed)

  def prompt_batches(self, batch_size: int) -> Iterator[base.Batch]:
    """The evaluation prompts, left-padded to a bucket, ``batch_size`` rows (fill rows at weight 0)."""
    f = self.eval
    for idx in batching.batch_plan(f.prompt_lengths, batch_size, seed=0, epoch=0, shuffle=False):
      real = len(idx)
      idx = np.concatenate([idx, np.full(batch_size - real, idx[0], idx.dtype)])
      width = self._width(int(f.prompt_lengths[idx].max()))
      ids = np.full((batch_size, width), self.pad_token_id, np.int32)
      mask = np.zeros((batch_size, width), np.int32)
      for row, i in enumerate(idx):
        n = f.prompt_lengths[i]
        ids[row, width - n:] = f.input_ids[i, :n]
        mask[row, width - n:] = 1
      weights = np.zeros(batch_size, np.float32)
      weights[:real] = 1.0
      yield {"input_ids": ids, "attention_mask": mask, "weights": weights, "index": idx.astype(np.int32)}

  def answers(self, predict: Callable[[base.Batch], Any], batch_size: int) -> dict[str, str]:
    """Example id -> the generated answer (first line of the decoded tokens before an end token)."""
    predictions, batches = base.run_predictions(predict, self.prompt_batches(batch_size))
    out = {}
    for tokens, batch in zip(predictions, batches):
      for row in np.flatnonzero(batch["weights"] > 0):
        seq = list(tokens[row])
        for k, t in enumerate(seq):
          if t in self.eos_token_ids:
            seq = seq[:k]
            break
        out[self.eval.examples[batch["index"][row]].id] = answer_text(self.decode(seq))
    return out

  def evaluate(self, predict: Callable[[base.Batch], Any], batch_size: int) -> dict[str, float]:
    """Exact match and F1 (0-100, official v1.1 normalisation) of the generated answers."""
    answers = self.answers(predict, batch_size)
    em = [metrics_lib.exact_match(answers[e.id], e.references) for e in self.eval.examples]
    f1 = [metrics_lib.token_f1(answers[e.id], e.references) for e in self.eval.examples]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}
