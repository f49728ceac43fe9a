"""SQuAD v1.1 extractive question answering: loading, windowed features, span decoding.

Two data sources give the same list of `QAExample`:

* a local file in the official SQuAD v1.1 JSON layout
  (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
  "question", "answers": [{"text", "answer_start"}]}]}]}]}``), read by
  `load_file`;
* the Hugging Face hub copy (``rajpurkar/squad``) through
  `datasets.load_dataset`, read by `load_hub`.

`build_features` tokenises (question, context) pairs the way transformers'
``run_qa.py`` does: the context is cut into windows of ``max_seq_len`` tokens
that overlap by ``doc_stride`` tokens, each window labelled with the token
span of the example's first answer (or the [CLS] index 0 where the window
does not hold it). `postprocess` turns a model's start/end logits over those
windows back into answer text per example; `rmlora_jax.metrics.squad_metrics`
scores it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from rmlora_jax.data import cache as cache_lib

HUB_NAME = "rajpurkar/squad"
# Bumped whenever the layout or meaning of cached feature files changes.
_CACHE_FORMAT = 1
# Examples per tokenizer call in `build_features` (bounds host memory).
_CHUNK_EXAMPLES = 2048
_FEATURE_FIELDS = (
    "input_ids", "attention_mask", "token_type_ids", "start_positions",
    "end_positions", "example_index", "offsets", "lengths",
)


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One SQuAD question about one paragraph, with its reference answers."""

  # The question id of the file ("56be4db0acb8001400a502ec").
  id: str
  # The title of the article the paragraph comes from.
  title: str
  # The paragraph the answer is extracted from.
  context: str
  # The question text as written in the file (`build_features` strips its leading whitespace).
  question: str
  # Reference answer texts (at least one in training files; SQuAD dev has ~3).
  answers: tuple[str, ...]
  # Character offset of each answer in `context`, one per answer.
  answer_starts: tuple[int, ...]


# --------------------------------------------------------------------------- loading


def load_file(path: str | os.PathLike, *, training: bool) -> list[QAExample]:
  """Reads a file in the official SQuAD v1.1 JSON layout.

  Args:
    path: the JSON file (``train-v1.1.json``, ``dev-v1.1.json`` or a subset).
    training: require at least one answer per question (needed for labels);
      with False, questions without answers load with ``answers == ()``.

  Returns:
    One `QAExample` per question, in file order (articles, paragraphs, questions).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not JSON or not in SQuAD layout, a question has no
      answers in a training file, or an answer's ``answer_start`` does not
      point at its text in the context; the message names the file and the
      question id.

  Example::

    examples = load_file("/data/squad/train-v1.1.json", training=True)
  """
  path = pathlib.Path(path)
  try:
    with open(path, encoding="utf-8") as f:
      root = json.load(f)
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not a JSON file ({err}); expected SQuAD v1.1 JSON") from err
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not UTF-8 text ({err}); expected SQuAD v1.1 JSON") from err
  if not isinstance(root, dict) or not isinstance(root.get("data"), list):
    raise ValueError(
        f"{path}: not in SQuAD layout: expected a JSON object with a \"data\" list of "
        f"articles, got {_describe(root)}"
    )
  examples = []
  for a, article in enumerate(root["data"]):
    where = f"{path}: data[{a}]"
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
      raise ValueError(
          f"{where}: not in SQuAD layout: expected an article object with a \"paragraphs\" "
          f"list, got {_describe(article)}"
      )
    title = article.get("title", "")
    if not isinstance(title, str):
      raise ValueError(f"{where}: \"title\" must be a string, got {title!r}")
    for p, paragraph in enumerate(article["paragraphs"]):
      where = f"{path}: data[{a}].paragraphs[{p}]"
      if (
          not isinstance(paragraph, dict)
          or not isinstance(paragraph.get("context"), str)
          or not isinstance(paragraph.get("qas"), list)
      ):
        raise ValueError(
            f"{where}: not in SQuAD layout: expected a paragraph object with a \"context\" "
            f"string and a \"qas\" list, got {_describe(paragraph)}"
        )
      context = paragraph["context"]
      for q, qa in enumerate(paragraph["qas"]):
        examples.append(_parse_question(qa, context, title, training, f"{where}.qas[{q}]"))
  return examples


def _describe(value: Any) -> str:
  """A short description of a JSON value for error messages."""
  if isinstance(value, dict):
    return f"an object with keys {sorted(value)[:8]}"
  return f"a {type(value).__name__}"


def _parse_question(qa: Any, context: str, title: str, training: bool, where: str) -> QAExample:
  """One entry of a paragraph's "qas" list -> `QAExample`, checking its answers."""
  if (
      not isinstance(qa, dict)
      or not isinstance(qa.get("id"), str)
      or not isinstance(qa.get("question"), str)
  ):
    raise ValueError(
        f"{where}: not in SQuAD layout: expected a question object with \"id\" and "
        f"\"question\" strings, got {_describe(qa)}"
    )
  qid = qa["id"]
  where = f"{where} (question id {qid!r})"
  raw_answers = qa.get("answers", [])
  if not isinstance(raw_answers, list):
    raise ValueError(f"{where}: \"answers\" must be a list, got {_describe(raw_answers)}")
  if training and not raw_answers:
    raise ValueError(
        f"{where}: question has no answers; every question of a training file needs at "
        f"least one (load evaluation files without answers with training=False)"
    )
  texts, starts = [], []
  for k, answer in enumerate(raw_answers):
    text = answer.get("text") if isinstance(answer, dict) else None
    start = answer.get("answer_start") if isinstance(answer, dict) else None
    if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
      raise ValueError(
          f"{where}: answers[{k}] must be an object with a \"text\" string and an integer "
          f"\"answer_start\", got {answer!r}"
      )
    found = context[start:start + len(text)] if start >= 0 else None
    if found != text:
      raise ValueError(
          f"{where}: answers[{k}] text {text!r} is not at answer_start {start} of the "
          f"context (found {found!r} there)"
      )
    texts.append(text)
    starts.append(start)
  return QAExample(
      id=qid, title=title, context=context, question=qa["question"],
      answers=tuple(texts), answer_starts=tuple(starts),
  )


def load_hub(split: str, hub_name: str = HUB_NAME) -> list[QAExample]:
  """Loads one split of SQuAD v1.1 from the Hugging Face hub (or its local cache).

  Args:
    split: "train" (87,599 questions) or "validation" (10,570).
    hub_name: the hub dataset, or a local folder laid out like it.

  Returns:
    One `QAExample` per row, in the dataset's order. Answers are checked
    against the context as in `load_file`; questions without answers are an
    error in "train".

  Raises:
    OSError: the hub cannot be reached and there is no cached copy.
    ValueError: an unknown split, missing columns, or an answer that does not
      match its context (the message names the question id).

  Example::

    train = load_hub("train")
  """
  import datasets  # Slow to import; only the hub path needs it.

  try:
    ds = datasets.load_dataset(hub_name, split=split)
  except OSError as err:  # ConnectionError offline, FileNotFoundError for unknown names.
    raise OSError(
        f"Could not load split {split!r} of the SQuAD hub dataset {hub_name!r} (no network "
        f"and no cached copy?): {err}. Use load_file with a local SQuAD v1.1 JSON file "
        f"instead, e.g. /work/shared/data/squad/train-v1.1-subset.json"
    ) from err
  except ValueError as err:  # datasets: 'Unknown split "..."'.
    raise ValueError(f"SQuAD hub dataset {hub_name!r}: cannot load split {split!r}: {err}") from err
  columns = ("id", "title", "context", "question", "answers")
  missing = [c for c in columns if c not in ds.column_names]
  if missing:
    raise ValueError(
        f"Hub dataset {hub_name!r} split {split!r} lacks columns {missing}; it has "
        f"{ds.column_names}"
    )
  where = f"hub dataset {hub_name!r} split {split!r}"
  training = split == "train"
  examples = []
  for row, (qid, title, context, question, answers) in enumerate(
      zip(*(ds[c] for c in columns))
  ):
    # The hub stores answers column-wise: {"text": [...], "answer_start": [...]}.
    qa = {
        "id": qid,
        "question": question,
        "answers": [
            {"text": t, "answer_start": s}
            for t, s in zip(answers["text"], answers["answer_start"], strict=True)
        ],
    }
    examples.append(_parse_question(qa, context, title, training, f"{where} row {row}"))
  return examples


def split_by_article(
    examples: Sequence[QAExample], num_dev_articles: int
) -> tuple[list[QAExample], list[QAExample]]:
  """``(train, dev)``: the last ``num_dev_articles`` articles become dev.

  Articles are told apart by title and ordered by where each title first
  appears, so no paragraph of a dev article is trained on. Both parts keep
  the examples' order.

  Raises:
    ValueError: ``num_dev_articles`` is not in ``1 .. articles - 1``.

  Example::

    train, dev = split_by_article(load_file(path, training=True), 4)
  """
  titles = list(dict.fromkeys(e.title for e in examples))
  n = len(titles)
  if (
      isinstance(num_dev_articles, bool)
      or not isinstance(num_dev_articles, (int, np.integer))
      or not 0 < num_dev_articles < n
  ):
    raise ValueError(
        f"split_by_article: num_dev_articles must be in 1..{n - 1} (the examples hold {n} "
        f"articles), got {num_dev_articles!r}"
    )
  dev_titles = set(titles[n - num_dev_articles:])
  train = [e for e in examples if e.title not in dev_titles]
  dev = [e for e in examples if e.title in dev_titles]
  return train, dev


# --------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class QAFeatures:
  """Tokenised windows ("features") of QA examples; one row per window."""

  # (F, L) int32 token ids, padded with the tokenizer's pad id to L = max_seq_len.
  input_ids: np.ndarray
  # (F, L) int32, 1 for real tokens.
  attention_mask: np.ndarray
  # (F, L) int32 segment ids (zeros when the tokenizer gives none).
  token_type_ids: np.ndarray
  # (F,) int32 token index of the first answer's start; 0 ([CLS]) when the window lacks it.
  start_positions: np.ndarray
  # (F,) int32 token index of the first answer's end (inclusive); 0 when the window lacks it.
  end_positions: np.ndarray
  # (F,) int32 index of each window's example in the examples list.
  example_index: np.ndarray
  # (F, L, 2) int32 character (start, end) of context tokens; (-1, -1) elsewhere.
  offsets: np.ndarray
  # (F,) int32 real (unpadded) tokens per window.
  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)


def build_features(
    examples: Sequence[QAExample],
    tokenizer: Any,
    *,
    max_seq_len: int = 384,
    doc_stride: int = 128,
    cache_dir: str | os.PathLike | None = None,
) -> QAFeatures:
  """Tokenises examples into overlapping windows with answer-span labels.

  Each example becomes ``[CLS] question [SEP] context-window [SEP]`` rows
  (the question with leading whitespace stripped, never truncated); a
  context too long for one row is cut into windows whose contexts overlap by
  ``doc_stride`` tokens. Labels come from the first answer: the indices of
  the first and last tokens that overlap its characters, or 0 and 0 when
  the window does not hold the whole answer (and for examples without
  answers).

  Args:
    examples: the questions, e.g. from `load_file`.
    tokenizer: a fast `transformers` tokenizer (offsets and overflowing
      windows need one).
    max_seq_len: L, tokens per row including special tokens and padding.
    doc_stride: context tokens shared by consecutive windows of one example.
    cache_dir: a folder for a ``.npz`` copy of the features, keyed by the
      tokenizer, ``max_seq_len``, ``doc_stride`` and the examples' content;
      a later call with the same key loads it instead of tokenising.

  Returns:
    The windows of all examples, example by example.

  Raises:
    ValueError: ``max_seq_len`` leaves no room for context after the longest
      question, or ``doc_stride`` is so large that windows cannot advance
      (both name the question id), or the tokenizer is not a fast one.

  Example::

    features = build_features(examples, tokenizer, max_seq_len=384, doc_stride=128)
  """
  for value, name, low in ((max_seq_len, "max_seq_len", 2), (doc_stride, "doc_stride", 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"build_features: {name} must be an integer >= {low}, got {value!r}")
  max_seq_len, doc_stride = int(max_seq_len), int(doc_stride)
  cache_path = None
  if cache_dir is not None:
    cache_path = cache_lib.entry(cache_dir, "squad-features", {
        "format": _CACHE_FORMAT,
        "tokenizer": cache_lib.tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
        "doc_stride": doc_stride,
        # Titles are left out: they do not change the features.
        "examples": cache_lib.texts_digest(
            [e.id, e.context, e.question, list(e.answers), list(e.answer_starts)] for e in examples),
    })
    cached = cache_lib.load(cache_path, _FEATURE_FIELDS)
    if cached is not None:
      return QAFeatures(**cached)
  features = _build(examples, tokenizer, max_seq_len, doc_stride)
  if cache_path is not None:
    # Compressed: padding and (-1, -1) offsets shrink 54 MB to ~1 MB for 7k questions.
    cache_lib.save(cache_path, {name: getattr(features, name) for name in _FEATURE_FIELDS})
  return features


def _build(
    examples: Sequence[QAExample], tokenizer: Any, max_seq_len: int, doc_stride: int
) -> QAFeatures:
  """`build_features` without the cache."""
  if not getattr(tokenizer, "is_fast", True):
    raise ValueError(
        f"build_features: tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not "
        f"a fast tokenizer; offsets and overflowing windows need one (use_fast=True)"
    )
  if not examples:
    return _empty_features(max_seq_len)
  questions = [e.question.lstrip() for e in examples]
  _check_lengths(examples, questions, tokenizer, max_seq_len, doc_stride)
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    raise ValueError(
        f"build_features: tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no "
        f"pad token; set tokenizer.pad_token first"
    )
  parts = []
  for begin in range(0, len(examples), _CHUNK_EXAMPLES):
    chunk = examples[begin:begin + _CHUNK_EXAMPLES]
    parts.append(_build_chunk(
        chunk, questions[begin:begin + _CHUNK_EXAMPLES], begin, tokenizer, max_seq_len,
        doc_stride, pad_id,
    ))
  return QAFeatures(**{
      name: np.concatenate([getattr(p, name) for p in parts]) for name in _FEATURE_FIELDS
  })


def _empty_features(max_seq_len: int) -> QAFeatures:
  rows = np.zeros((0, max_seq_len), np.int32)
  flat = np.zeros((0,), np.int32)
  return QAFeatures(
      input_ids=rows, attention_mask=rows, token_type_ids=rows, start_positions=flat,
      end_positions=flat, example_index=flat,
      offsets=np.zeros((0, max_seq_len, 2), np.int32), lengths=flat,
  )


def _check_lengths(
    examples: Sequence[QAExample],
    questions: list[str],
    tokenizer: Any,
    max_seq_len: int,
    doc_stride: int,
):
  """Fails early where the tokenizer would fail (or panic) mid-way.

  A window holds ``max_seq_len - question - special`` context tokens and the
  next one starts ``doc_stride`` tokens before its end, so the longest
  question must leave at least one context token and more than
  ``doc_stride`` of them.
  """
  ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
  lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
  longest = int(np.argmax(lengths))
  q_len = int(lengths[longest])
  special = int(tokenizer.num_special_tokens_to_add(pair=True))
  room = max_seq_len - q_len - special
  qid = examples[longest].id
  if room < 1:
    raise ValueError(
        f"build_features: max_seq_len {max_seq_len} leaves no room for context: question id "
        f"{qid!r} has {q_len} tokens, plus {special} special tokens; use max_seq_len > "
        f"{q_len + special}"
    )
  if doc_stride >= room:
    raise ValueError(
        f"build_features: doc_stride {doc_stride} must be below the {room} context tokens a "
        f"window holds (max_seq_len {max_seq_len} - {q_len} tokens of question id {qid!r} - "
        f"{special} special tokens), or windows could not advance"
    )


def _build_chunk(
    examples: Sequence[QAExample],
    questions: list[str],
    first_index: int,
    tokenizer: Any,
    max_seq_len: int,
    doc_stride: int,
    pad_id: int,
) -> QAFeatures:
  """Features of one chunk of examples (``first_index``: the chunk's first example)."""
  enc = tokenizer(
      questions,
      [e.context for e in examples],
      truncation="only_second",
      max_length=max_seq_len,
      stride=doc_stride,
      return_overflowing_tokens=True,
      return_offsets_mapping=True,
      padding="max_length",
  )
  input_ids = np.asarray(enc["input_ids"], np.int32)
  num, length = input_ids.shape
  assert length == max_seq_len, (input_ids.shape, max_seq_len)
  attention_mask = np.asarray(enc["attention_mask"], np.int32)
  if "token_type_ids" in enc:
    token_type_ids = np.asarray(enc["token_type_ids"], np.int32)
  else:
    token_type_ids = np.zeros_like(input_ids)
  local_index = np.asarray(enc["overflow_to_sample_mapping"], np.int32)
  # Sequence 1 (the context) per token; None (special, pad) and 0 (question) are not.
  is_context = np.array([enc.sequence_ids(i) for i in range(num)], dtype=object) == 1
  offsets = np.asarray(enc["offset_mapping"], np.int32).reshape(num, length, 2)
  offsets = np.where(is_context[..., None], offsets, -1).astype(np.int32)

  # Labels from each window's example's first answer, all windows at once.
  has_answer = np.array([bool(e.answers) for e in examples])[local_index]
  char_start = np.array([e.answer_starts[0] if e.answers else 0 for e in examples], np.int64)
  char_end = char_start + [len(e.answers[0]) if e.answers else 0 for e in examples]
  char_start, char_end = char_start[local_index, None], char_end[local_index, None]
  starts, ends = offsets[..., 0], offsets[..., 1]
  positions = np.arange(length)
  first_ctx = np.argmax(is_context, axis=1)
  last_ctx = length - 1 - np.argmax(is_context[:, ::-1], axis=1)
  rows = np.arange(num)
  contains = (
      has_answer
      & is_context.any(axis=1)
      & (starts[rows, first_ctx] <= char_start[:, 0])
      & (ends[rows, last_ctx] >= char_end[:, 0])
  )
  # The tokens that overlap the answer's characters: start at the first
  # context token ending after its first character, end at the last one
  # beginning before its end. For answers that begin and end on non-space
  # characters (SQuAD's almost always do) this is run_qa.py's span; an answer
  # with stray outer spaces does not pull in the neighbouring words.
  start_tok = np.min(np.where(is_context & (ends > char_start), positions, length), axis=1)
  end_tok = np.max(np.where(is_context & (starts < char_end), positions, -1), axis=1)
  contains &= start_tok <= end_tok  # False for an empty answer text.
  start_positions = np.where(contains, start_tok, 0).astype(np.int32)
  end_positions = np.where(contains, end_tok, 0).astype(np.int32)

  if np.any(input_ids[attention_mask == 0] != pad_id):
    raise ValueError(
        f"build_features: tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} padded "
        f"with an id other than its pad_token_id {pad_id}"
    )
  return QAFeatures(
      input_ids=input_ids,
      attention_mask=attention_mask,
      token_type_ids=token_type_ids,
      start_positions=start_positions,
      end_positions=end_positions,
      example_index=(local_index + first_index).astype(np.int32),
      offsets=offsets,
      lengths=attention_mask.sum(axis=1).astype(np.int32),
  )


# --------------------------------------------------------------------------- decoding


def postprocess(
    examples: Sequence[QAExample],
    features: QAFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, str]:
  """The best-scoring answer text of each example from per-window logits.

  In each window the ``n_best`` highest start and the ``n_best`` highest end
  logits are paired; a pair counts when both tokens are context tokens, the
  end is not before the start and the span has at most ``max_answer_len``
  tokens. Its score is ``start_logit + end_logit``; the best pair over all
  windows of an example gives the text ``context[offsets[start][0]:
  offsets[end][1]]``, or "" when no pair counts.

  Args:
    examples: the examples `build_features` was called with.
    features: its result.
    start_logits: (F, L) start scores per window and token.
    end_logits: (F, L) end scores.
    n_best: candidates per side and window.
    max_answer_len: the most tokens in an answer.

  Returns:
    ``{example id: predicted text}`` for every example.

  Example::

    predictions = postprocess(dev, features, start_logits, end_logits)
    metrics.squad_metrics(predictions, dev)
  """
  for value, name in ((n_best, "n_best"), (max_answer_len, "max_answer_len")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"postprocess: {name} must be a positive integer, got {value!r}")
  start_logits = np.asarray(start_logits, np.float32)
  end_logits = np.asarray(end_logits, np.float32)
  shape = features.input_ids.shape
  if start_logits.shape != shape or end_logits.shape != shape:
    raise ValueError(
        f"postprocess: start_logits and end_logits must have the features' shape {shape} "
        f"(windows, max_seq_len), got {start_logits.shape} and {end_logits.shape}"
    )
  index = np.asarray(features.example_index)
  if index.size and (index.min() < 0 or index.max() >= len(examples)):
    raise ValueError(
        f"postprocess: features point at examples up to index {int(index.max())}, but "
        f"{len(examples)} examples were given; pass the examples build_features saw"
    )
  num, length = shape
  k = min(int(n_best), length)
  # Top-k token indices per window, best first (stable: ties keep token order).
  top_start = np.argsort(-start_logits, axis=1, kind="stable")[:, :k]
  top_end = np.argsort(-end_logits, axis=1, kind="stable")[:, :k]
  rows = np.arange(num)[:, None]
  is_context = features.offsets[..., 0] >= 0
  s, e = top_start[:, :, None], top_end[:, None, :]  # (F, k, 1), (F, 1, k)
  valid = (
      is_context[rows, top_start][:, :, None]
      & is_context[rows, top_end][:, None, :]
      & (e >= s)
      & (e - s + 1 <= max_answer_len)
  )
  scores = start_logits[rows, top_start][:, :, None] + end_logits[rows, top_end][:, None, :]
  scores = np.where(valid, scores, -np.inf).reshape(num, k * k)
  best = np.argmax(scores, axis=1)
  best_score = scores[np.arange(num), best]
  best_start = top_start[np.arange(num), best // k]
  best_end = top_end[np.arange(num), best % k]

  predictions = {e.id: "" for e in examples}
  best_by_example = np.full(len(examples), -np.inf)
  for f in range(num):  # Python over windows, not tokens: cheap.
    i = index[f]
    if best_score[f] > best_by_example[i]:  # Strict: the earliest window wins ties.
      best_by_example[i] = best_score[f]
      context = examples[i].context
      predictions[examples[i].id] = context[
          features.offsets[f, best_start[f], 0]:features.offsets[f, best_end[f], 1]
      ]
  return predictions
