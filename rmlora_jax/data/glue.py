"""GLUE tasks: loading, tokenising and length-bucketed batching on the host.

Two data sources give the same `TextSplit`:

* a local folder in the official GLUE download layout
  (``<data_dir>/RTE/train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv`` and
  ``dev_mismatched.tsv``), read by splitting lines on tabs (GLUE text holds
  quotes, so no csv quoting);
* the Hugging Face hub copy (``nyu-mll/glue``) through `datasets.load_dataset`.

Label ids follow the hub's ``ClassLabel`` order in both, so a model trained on
one source is scored correctly on the other.

`tokenize_split` gives a `TokenizedSplit`, which `rmlora_jax.data.batching`
turns into length-bucketed batches (its names are importable from here too).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rmlora_jax.data import cache as cache_lib
# The batching names, importable from here as before.
from rmlora_jax.data.batching import (CHUNK_BATCHES, TokenizedSplit, batch_max_lengths,  # noqa: F401
                                      batch_plan, batches, bucket_for, bucket_lengths, fit_buckets,
                                      num_batches, padding_fraction)

HUB_NAME = "nyu-mll/glue"
# Environment variable naming a folder in the official GLUE layout.
GLUE_DIR_ENV = "GLUE_DIR"
# Bumped whenever the layout or meaning of cached token files changes.
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlueTask:
  """What differs between GLUE tasks: columns, labels, files and metrics.

  Example::

    task = get_task("rte")
    task.num_labels, task.eval_splits  # 2, ("validation",)
  """

  # Short lower-case name, also the hub config name ("rte", "sst2", ...).
  name: str
  # Classes of the classifier head; 1 for the regression task STS-B.
  num_labels: int
  # Folder of the task in the official GLUE download ("RTE", "SST-2", ...).
  dir_name: str
  # TSV columns holding text_a (and text_b for pair tasks).
  tsv_text_columns: tuple[str, ...]
  # TSV column holding the label.
  tsv_label_column: str
  # Hub columns holding text_a (and text_b); the hub's label column is "label".
  hub_text_columns: tuple[str, ...]
  # The splits with public labels used for evaluation, named as on the hub.
  eval_splits: tuple[str, ...] = ("validation",)
  # The metric a run is judged by (a key of `rmlora_jax.metrics.glue_metrics`).
  main_metric: str = "accuracy"
  # Every metric reported for the task, main one included.
  metrics: tuple[str, ...] = ("accuracy",)
  # Hub split name -> TSV file name inside `dir_name`.
  files: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"}, hash=False
  )
  # Column names of headerless files (CoLA); None: the first line is the header.
  tsv_fieldnames: tuple[str, ...] | None = None
  # Label strings as written in the TSV files, position = class id; None: float score.
  tsv_labels: tuple[str, ...] | None = ("0", "1")
  # Human-readable class names in the hub's ClassLabel order (for reports).
  label_names: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "files", types.MappingProxyType(dict(self.files)))
    # Internal consistency of the registry below, not user input.
    assert self.main_metric in self.metrics, self
    assert set(self.files) == {"train", *self.eval_splits}, self
    assert len(self.tsv_text_columns) == len(self.hub_text_columns) in (1, 2), self
    assert (self.tsv_labels is None) == (self.num_labels == 1), self
    assert self.tsv_labels is None or len(self.tsv_labels) == self.num_labels, self

  @property
  def is_regression(self) -> bool:
    """True for STS-B, whose label is a similarity score in [0, 5]."""
    return self.num_labels == 1

  @property
  def is_pair(self) -> bool:
    """True when each example is a pair of texts (text_b is not None)."""
    return len(self.hub_text_columns) == 2

  @property
  def splits(self) -> tuple[str, ...]:
    """Every split with public labels: "train" and the eval splits."""
    return ("train",) + self.eval_splits


_NLI = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            name="cola", num_labels=2, dir_name="CoLA", main_metric="mcc",
            metrics=("mcc", "accuracy"),
            tsv_fieldnames=("source", "label", "original_label", "sentence"),
            tsv_text_columns=("sentence",), tsv_label_column="label",
            hub_text_columns=("sentence",), label_names=("unacceptable", "acceptable"),
        ),
        GlueTask(
            name="sst2", num_labels=2, dir_name="SST-2",
            tsv_text_columns=("sentence",), tsv_label_column="label",
            hub_text_columns=("sentence",), label_names=("negative", "positive"),
        ),
        GlueTask(
            name="mrpc", num_labels=2, dir_name="MRPC", metrics=("accuracy", "f1"),
            tsv_text_columns=("#1 String", "#2 String"), tsv_label_column="Quality",
            hub_text_columns=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
        ),
        GlueTask(
            name="stsb", num_labels=1, dir_name="STS-B", main_metric="pearson",
            metrics=("pearson", "spearman"),
            tsv_text_columns=("sentence1", "sentence2"), tsv_label_column="score",
            tsv_labels=None, hub_text_columns=("sentence1", "sentence2"),
        ),
        GlueTask(
            name="qqp", num_labels=2, dir_name="QQP", metrics=("accuracy", "f1"),
            tsv_text_columns=("question1", "question2"), tsv_label_column="is_duplicate",
            hub_text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
        ),
        GlueTask(
            name="qnli", num_labels=2, dir_name="QNLI",
            tsv_text_columns=("question", "sentence"), tsv_label_column="label",
            tsv_labels=_NLI, hub_text_columns=("question", "sentence"), label_names=_NLI,
        ),
        GlueTask(
            name="mnli", num_labels=3, dir_name="MNLI",
            eval_splits=("validation_matched", "validation_mismatched"),
            files={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
            },
            tsv_text_columns=("sentence1", "sentence2"), tsv_label_column="gold_label",
            tsv_labels=("entailment", "neutral", "contradiction"),
            hub_text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
        ),
        GlueTask(
            name="wnli", num_labels=2, dir_name="WNLI",
            tsv_text_columns=("sentence1", "sentence2"), tsv_label_column="label",
            hub_text_columns=("sentence1", "sentence2"),
            label_names=("not_entailment", "entailment"),
        ),
        GlueTask(
            name="rte", num_labels=2, dir_name="RTE",
            tsv_text_columns=("sentence1", "sentence2"), tsv_label_column="label",
            tsv_labels=_NLI, hub_text_columns=("sentence1", "sentence2"), label_names=_NLI,
        ),
    )
}


def get_task(name: str | GlueTask) -> GlueTask:
  """The `GlueTask` called ``name`` (case-insensitive; "SST-2" works too).

  Raises:
    ValueError: ``name`` is not a GLUE task; the message lists the known ones.
  """
  if isinstance(name, GlueTask):
    return name
  key = _normalise(str(name))
  if key not in TASKS:
    raise ValueError(f"Unknown GLUE task {name!r}; known tasks: {sorted(TASKS)}")
  return TASKS[key]


def _normalise(name: str) -> str:
  """"SST-2", "sst_2", "Sst2" -> "sst2": how task and folder names are compared."""
  return name.lower().replace("-", "").replace("_", "")


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """The raw columns of one split of one task."""

  # First (or only) text of each example.
  text_a: list[str]
  # Second text of pair tasks; None for single-sentence tasks (CoLA, SST-2).
  text_b: list[str] | None
  # Class ids (int32) or, for STS-B, float32 scores; one per example.
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.text_a)


def select(split: TextSplit, indices: Sequence[int] | np.ndarray) -> TextSplit:
  """The examples of ``split`` at ``indices``, in that order."""
  indices = np.asarray(indices, np.int64)
  return TextSplit(
      text_a=[split.text_a[i] for i in indices],
      text_b=None if split.text_b is None else [split.text_b[i] for i in indices],
      labels=split.labels[indices],
  )


def split_off(split: TextSplit, count: int, *, seed: int) -> tuple[TextSplit, TextSplit]:
  """``(rest, held_out)``: ``count`` examples drawn by ``seed``, held out of ``split``.

  For tasks whose dev file is missing or kept aside (the shared STS-B copy has
  only ``train.tsv``): the held-out part becomes the evaluation split. Both
  parts keep file order, so the split is a pure function of (file, count, seed).

  Raises:
    ValueError: ``count`` is not in ``1 .. len(split) - 1``.
  """
  n = len(split)
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count < n:
    raise ValueError(f"split_off: count must be in 1..{n - 1} (the split has {n} examples), got {count!r}")
  held = np.zeros(n, bool)
  held[np.random.default_rng(seed).permutation(n)[:count]] = True
  return select(split, np.flatnonzero(~held)), select(split, np.flatnonzero(held))


def resolve_data_source(data_dir: str | None) -> str | None:
  """Where to read GLUE from: ``data_dir``, else ``$GLUE_DIR``, else None (the hub)."""
  if data_dir:
    return str(data_dir)
  return os.environ.get(GLUE_DIR_ENV) or None


def load_split(
    task: str | GlueTask,
    split: str,
    data_dir: str | None = None,
    *,
    hub_name: str = HUB_NAME,
) -> TextSplit:
  """Loads one split of a GLUE task from local TSV files or from the hub.

  Args:
    task: a task name ("rte") or `GlueTask`.
    split: "train" or one of ``task.eval_splits`` ("validation"; MNLI
      "validation_matched" / "validation_mismatched").
    data_dir: a folder in the official GLUE layout (``<data_dir>/RTE/dev.tsv``)
      or the task's own folder; None falls back to ``$GLUE_DIR`` and then to
      the hub (see `resolve_data_source`).
    hub_name: the hub dataset (or a local folder laid out like it) used when
      there is no local folder.

  Returns:
    The split's texts and labels in file order.

  Raises:
    ValueError: unknown task or split, or a malformed file (path and 1-based
      line number in the message).
    FileNotFoundError: the local folder or file does not exist.
    OSError: the hub copy cannot be reached and is not cached.

  Example::

    dev = load_split("rte", "validation", "/data/glue")
  """
  task = get_task(task)
  if split not in task.splits:
    raise ValueError(
        f"Unknown split {split!r} for GLUE task {task.name!r}; expected one of "
        f"{list(task.splits)} (test labels are not public)"
    )
  source = resolve_data_source(data_dir)
  if source is None:
    return _load_hub(task, split, hub_name)
  return _load_tsv(task, split, _task_file(task, split, pathlib.Path(source)))


def _task_file(task: GlueTask, split: str, data_dir: pathlib.Path) -> pathlib.Path:
  """``<data_dir>/<TASK>/<file>``, accepting the task folder itself and case variants."""
  file_name = task.files[split]
  expected = data_dir / task.dir_name / file_name
  if not data_dir.is_dir():
    raise FileNotFoundError(
        f"GLUE data folder {str(data_dir)!r} does not exist; expected the official "
        f"layout, e.g. {str(expected)!r}"
    )
  if _normalise(data_dir.name) == task.name:
    folder = data_dir
  else:
    matches = sorted(
        p for p in data_dir.iterdir() if p.is_dir() and _normalise(p.name) == task.name
    )
    if matches:
      folder = matches[0]
    elif (data_dir / file_name).is_file():
      folder = data_dir  # Already the task folder, under another name.
    else:
      raise FileNotFoundError(
          f"No folder for GLUE task {task.name!r} in {str(data_dir)!r}; expected the "
          f"official layout, e.g. {str(expected)!r}"
      )
  path = folder / file_name
  if not path.is_file():
    raise FileNotFoundError(
        f"GLUE file {str(path)!r} does not exist; split {split!r} of {task.name!r} "
        f"is read from {file_name!r}"
    )
  return path


def _load_tsv(task: GlueTask, split: str, path: pathlib.Path) -> TextSplit:
  """Parses one official GLUE TSV file (tab-split lines, no quoting)."""
  # utf-8-sig drops MRPC's byte-order mark; split on "\n" only, since
  # str.splitlines would also break on separators that may occur inside text.
  try:
    lines = path.read_text(encoding="utf-8-sig").split("\n")
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not UTF-8 text ({err}); expected an official GLUE TSV file") from err
  if lines and lines[-1] == "":
    lines.pop()  # The trailing newline (CoLA's dev file has none).
  first_row = 1
  header = task.tsv_fieldnames
  if header is None:
    if not lines:
      raise ValueError(f"{path}: empty file; expected a header line")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    first_row = 2
  columns = {}
  for name in task.tsv_text_columns + (task.tsv_label_column,):
    if name not in header:
      raise ValueError(
          f"{path}:1: header has no column {name!r} needed for split {split!r} of "
          f"{task.name!r}; found {list(header)}"
      )
    columns[name] = header.index(name)
  label_ids = {s: i for i, s in enumerate(task.tsv_labels or ())}

  texts = [[] for _ in task.tsv_text_columns]
  labels = []
  for line_no, line in enumerate(lines[first_row - 1:], start=first_row):
    fields = line.rstrip("\r").split("\t")
    if len(fields) != len(header):
      raise ValueError(
          f"{path}:{line_no}: expected {len(header)} tab-separated columns "
          f"({list(header)}), got {len(fields)}"
      )
    for column, out in zip(task.tsv_text_columns, texts):
      out.append(fields[columns[column]])
    raw = fields[columns[task.tsv_label_column]]
    labels.append(_parse_label(task, raw, label_ids, f"{path}:{line_no}"))
  dtype = np.float32 if task.is_regression else np.int32
  return TextSplit(
      text_a=texts[0],
      text_b=texts[1] if task.is_pair else None,
      labels=np.asarray(labels, dtype=dtype),
  )


def _parse_label(task: GlueTask, raw: str, label_ids: Mapping[str, int], where: str):
  """A TSV label string -> class id, or a float score for STS-B."""
  if task.is_regression:
    try:
      score = float(raw)
    except ValueError:
      score = float("nan")
    if not 0.0 <= score <= 5.0:
      raise ValueError(f"{where}: {task.tsv_label_column} {raw!r} is not a number in [0, 5]")
    return score
  if raw not in label_ids:
    raise ValueError(
        f"{where}: {task.tsv_label_column} {raw!r} is not one of {list(label_ids)}"
    )
  return label_ids[raw]


def _load_hub(task: GlueTask, split: str, hub_name: str) -> TextSplit:
  """One split through `datasets.load_dataset(hub_name, task.name)`."""
  import datasets  # Slow to import; only the hub path needs it.

  try:
    ds = datasets.load_dataset(hub_name, task.name, split=split)
  except OSError as err:  # ConnectionError offline, FileNotFoundError for unknown names.
    raise OSError(
        f"Could not load GLUE task {task.name!r} split {split!r} from the hub dataset "
        f"{hub_name!r} (no network and no cached copy?): {err}. Pass config.data.dir "
        f"or set {GLUE_DIR_ENV} to a folder in the official GLUE layout, e.g. "
        f"<dir>/{task.dir_name}/{task.files[split]}"
    ) from err
  missing = [c for c in task.hub_text_columns + ("label",) if c not in ds.column_names]
  if missing:
    raise ValueError(
        f"Hub dataset {hub_name!r} config {task.name!r} split {split!r} lacks columns "
        f"{missing}; it has {ds.column_names}"
    )
  dtype = np.float32 if task.is_regression else np.int32
  labels = np.asarray(ds["label"], dtype=dtype)
  if not task.is_regression and labels.size and (
      labels.min() < 0 or labels.max() >= task.num_labels
  ):
    raise ValueError(
        f"Hub dataset {hub_name!r} config {task.name!r} split {split!r} has labels "
        f"outside [0, {task.num_labels}): {sorted(set(labels.tolist()))[:10]}"
    )
  texts = [list(ds[c]) for c in task.hub_text_columns]
  return TextSplit(
      text_a=texts[0], text_b=texts[1] if task.is_pair else None, labels=labels
  )



def tokenize_split(
    split: TextSplit, tokenizer: Any, max_seq_len: int, *, chunk_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
) -> TokenizedSplit:
  """Tokenises a split with a transformers tokenizer, truncating but not padding.

  Args:
    split: the texts (pairs are encoded as ``tokenizer(text_a, text_b)``).
    tokenizer: a `transformers` tokenizer (fast ones are much quicker).
    max_seq_len: the most tokens per example, special tokens included.
    chunk_size: examples per tokenizer call (bounds host memory).
    cache_dir: a folder for a ``.npz`` copy of the ids, keyed by the
      tokenizer's definition, ``max_seq_len`` and the texts
      (`rmlora_jax.data.cache`); a later call with the same key loads it
      instead of tokenising (SST-2's 67k sentences: 7.6 s to tokenise).

  Returns:
    The ids of every example, in the split's order.
  """
  if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
    raise ValueError(f"tokenize_split: max_seq_len must be an integer >= 2, got {max_seq_len!r}")
  if cache_dir is None or not len(split):
    return _tokenize(split, tokenizer, max_seq_len, chunk_size)
  path = cache_lib.entry(cache_dir, "glue-tokens", {
      "format": _CACHE_FORMAT, "tokenizer": cache_lib.tokenizer_fingerprint(tokenizer),
      "max_seq_len": max_seq_len, "texts": cache_lib.texts_digest(split.text_a, split.text_b)})
  stored = cache_lib.load(path, ("input_ids", "token_type_ids", "lengths"))
  if stored is not None and len(stored["lengths"]) == len(split):
    cuts = np.cumsum(stored["lengths"])[:-1]
    return TokenizedSplit(np.split(stored["input_ids"], cuts), np.split(stored["token_type_ids"], cuts),
                          np.asarray(split.labels))
  out = _tokenize(split, tokenizer, max_seq_len, chunk_size)
  cache_lib.save(path, {"input_ids": np.concatenate(out.input_ids),
                        "token_type_ids": np.concatenate(out.token_type_ids), "lengths": out.lengths()})
  return out


def _tokenize(split: TextSplit, tokenizer: Any, max_seq_len: int, chunk_size: int) -> TokenizedSplit:
  """`tokenize_split` without the cache."""
  input_ids, token_type_ids = [], []
  for start in range(0, len(split), chunk_size):
    args = [split.text_a[start:start + chunk_size]]
    if split.text_b is not None:
      args.append(split.text_b[start:start + chunk_size])
    enc = tokenizer(*args, truncation=True, max_length=max_seq_len, padding=False)
    ids = [np.asarray(x, np.int32) for x in enc["input_ids"]]
    types = enc.get("token_type_ids")
    input_ids += ids
    if types is None:
      token_type_ids += [np.zeros_like(x) for x in ids]
    else:
      token_type_ids += [np.asarray(x, np.int32) for x in types]
  return TokenizedSplit(input_ids, token_type_ids, np.asarray(split.labels))
