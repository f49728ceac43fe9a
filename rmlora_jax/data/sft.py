"""Prompt/response data for supervised fine-tuning of decoder LLMs.

Examples come from local JSON or JSONL files of ``{"prompt": ..., "response":
...}`` records (optionally ``"answers"``: reference answers for exact match
and F1, and ``"id"``), from a `datasets` hub copy with named fields, or from
SQuAD questions (`from_squad`: the paragraph and question as the prompt, the
first answer as the response). `tokenize` renders each pair with the
tokenizer's chat template (or a plain ``prompt\\nresponse<eos>`` layout for
models without one) and marks the response tokens, the only ones the loss
counts.

Example::

  examples = from_squad(squad.load_file("train-v1.1-subset.json", training=True))
  features = tokenize(examples, tokenizer, max_seq_len=384)
  features.input_ids[0][features.loss_mask[0] > 0]  # the response and end-of-turn tokens
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from rmlora_jax.data import squad


@dataclasses.dataclass(frozen=True)
class SftExample:
  """One prompt and the response the model should learn to give."""

  # A unique name (the SQuAD question id, or "<file>:<line>").
  id: str
  prompt: str
  response: str
  # Reference answers for exact match and F1 (default: the response alone).
  answers: tuple[str, ...] = ()

  @property
  def references(self) -> tuple[str, ...]:
    """The answers generation is scored against."""
    return self.answers or (self.response,)


SQUAD_INSTRUCTION = "Answer the question with a short phrase copied from the passage."


def squad_prompt(context: str, question: str) -> str:
  """The prompt of a SQuAD question: an instruction, the passage, the question."""
  return f"{SQUAD_INSTRUCTION}\n\nPassage: {context.strip()}\n\nQuestion: {question.strip()}"


def from_squad(examples: Sequence[squad.QAExample]) -> list[SftExample]:
  """SQuAD questions as prompt/response pairs: the first answer is the response, all are references."""
  return [SftExample(id=e.id, prompt=squad_prompt(e.context, e.question), response=e.answers[0],
                     answers=tuple(e.answers)) for e in examples if e.answers]


def _record(record: Any, where: str, fields: tuple[str, str]) -> SftExample:
  prompt_field, response_field = fields
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected an object with {prompt_field!r} and {response_field!r}, "
                     f"got {type(record).__name__}")
  missing = [f for f in fields if not isinstance(record.get(f), str)]
  if missing:
    raise ValueError(f"{where}: no string field {missing[0]!r} (fields: {sorted(record)})")
  answers = record.get("answers", ())
  if isinstance(answers, str):
    answers = (answers,)
  if not all(isinstance(a, str) for a in answers):
    raise ValueError(f"{where}: 'answers' must be a string or a list of strings, got {answers!r}")
  return SftExample(id=str(record.get("id", where)), prompt=record[prompt_field], response=record[response_field],
                    answers=tuple(answers))


def load_file(path: str | pathlib.Path, *, prompt_field: str = "prompt",
              response_field: str = "response") -> list[SftExample]:
  """Examples of a ``.jsonl`` file (one record per line) or a ``.json`` file (a list of records).

  Raises:
    ValueError: a missing file, invalid JSON (with its line), or a record
      without the two string fields.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"{str(path)!r} is not a file (expected JSON or JSONL prompt/response records)")
  fields = (prompt_field, response_field)
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".jsonl":
    out = []
    for i, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        out.append(_record(record, f"{path}:{i}", fields))
    return out
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if isinstance(records, dict) and isinstance(records.get("data"), list):
    records = records["data"]
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a list of records (or {{\"data\": [...]}}), got {type(records).__name__}")
  return [_record(r, f"{path}[{i}]", fields) for i, r in enumerate(records)]


def load_hub(name: str, split: str, *, prompt_field: str = "prompt", response_field: str = "response",
             data_dir: str | None = None) -> list[SftExample]:
  """Examples of a `datasets` copy (a hub id, or a local folder in the hub layout)."""
  import datasets  # pylint: disable=g-import-not-at-top

  ds = datasets.load_dataset(name, data_dir=data_dir, split=split)
  return [_record(dict(r), f"{name}[{split}][{i}]", (prompt_field, response_field)) for i, r in enumerate(ds)]


@dataclasses.dataclass(frozen=True)
class SftFeatures:
  """Tokenized examples, right-padded to ``max_seq_len``.

  ``loss_mask[i, t]`` is 1 where token ``t`` of row ``i`` belongs to the
  response (its end-of-turn tokens included): the tokens the loss predicts.
  ``prompt_lengths[i]`` tokens open row ``i`` and are what generation is
  given.
  """

  input_ids: np.ndarray  # (N, L) int32
  loss_mask: np.ndarray  # (N, L) int32
  lengths: np.ndarray  # (N,) real tokens per row
  prompt_lengths: np.ndarray  # (N,)
  examples: tuple[SftExample, ...]  # the rows' examples, in order
  dropped: int  # examples left out for being longer than max_seq_len

  def __len__(self) -> int:
    return len(self.lengths)


def render(tokenizer: Any, example: SftExample, *, chat_template: bool) -> tuple[list[int], list[int]]:
  """``(prompt ids, full ids)`` of one example; the full ids start with the prompt's.

  With ``chat_template`` the prompt is the user turn plus the assistant
  header (``add_generation_prompt``) and the full text adds the response's
  turn; otherwise ``prompt + "\\n"`` and ``prompt + "\\n" + response + eos``.

  Raises:
    ValueError: no chat template on the tokenizer, or one whose prompt is not
      a prefix of the rendered conversation.
  """
  encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  if chat_template:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("the tokenizer has no chat template; set config.chat_template=False for the plain "
                       "'prompt\\nresponse<eos>' layout")
    user = [{"role": "user", "content": example.prompt}]
    prompt = encode(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
    full = encode(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": example.response}],
                                                tokenize=False))
  else:
    prompt = encode(example.prompt + "\n")
    full = prompt + encode(example.response) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
  if full[:len(prompt)] != prompt or len(full) <= len(prompt):
    raise ValueError(f"example {example.id!r}: the prompt's tokens are not a prefix of the conversation's "
                     "under this chat template; train with config.chat_template=False")
  return prompt, full


def tokenize(examples: Sequence[SftExample], tokenizer: Any, *, max_seq_len: int,
             chat_template: bool = True) -> SftFeatures:
  """`SftFeatures` of ``examples``; those longer than ``max_seq_len`` tokens are dropped (and counted)."""
  rows, kept = [], []
  for e in examples:
    prompt, full = render(tokenizer, e, chat_template=chat_template)
    if len(full) <= max_seq_len:
      rows.append((prompt, full))
      kept.append(e)
  dropped = len(examples) - len(kept)
  if dropped:
    logging.warning("sft.tokenize: %d of %d examples are longer than max_seq_len=%d tokens and were left out",
                    dropped, len(examples), max_seq_len)
  n = len(rows)
  input_ids = np.zeros((n, max_seq_len), np.int32)
  loss_mask = np.zeros((n, max_seq_len), np.int32)
  lengths = np.zeros(n, np.int32)
  prompt_lengths = np.zeros(n, np.int32)
  for i, (prompt, full) in enumerate(rows):
    input_ids[i, :len(full)] = full
    loss_mask[i, len(prompt):len(full)] = 1
    lengths[i], prompt_lengths[i] = len(full), len(prompt)
  return SftFeatures(input_ids=input_ids, loss_mask=loss_mask, lengths=lengths, prompt_lengths=prompt_lengths,
                     examples=tuple(kept), dropped=dropped)
