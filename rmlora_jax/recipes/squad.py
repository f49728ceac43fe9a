"""The SQuAD v1.1 experiment from a config: extractive QA on the shared trainer.

`train_and_evaluate(config, workdir)` is the run behind
``python -m experiments.squad``. Data, in order of precedence:

* ``config.data.train_file`` (and ``config.data.dev_file``): local files in
  the official JSON layout;
* ``config.data.dir``: a folder holding ``train-v1.1.json`` (or the offline
  ``train-v1.1-subset.json``) and, optionally, ``dev-v1.1.json``;
* neither: the hub copy (``rajpurkar/squad`` through `datasets`).

Without a dev file, the last ``config.data.dev_articles`` articles of the
training file are held out for evaluation (whole articles, so no context is
seen in training).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import ml_collections
import numpy as np

from rmlora_jax.recipes import run as run_lib
from rmlora_jax.recipes import settings as settings_lib
from rmlora_jax import trainer
from rmlora_jax.data import cache as cache_lib
from rmlora_jax.data import squad
from rmlora_jax.models import hub
from rmlora_jax.tasks import qa

HEAD_PATTERNS = (r"qa_outputs/.*",)
TRAIN_FILES = ("train-v1.1.json", "train-v1.1-subset.json")
DEV_FILE = "dev-v1.1.json"


def data_files(config: ml_collections.ConfigDict) -> tuple[str | None, str | None]:
  """``(train file, dev file)`` from the config; ``(None, None)``: the hub copy.

  Raises:
    ValueError: a named file or folder that does not exist, a dev file
      without a training file, or a folder without a training file.
  """
  d = config.data
  train, dev = d.train_file or None, d.dev_file or None
  for name, value in (("config.data.train_file", train), ("config.data.dev_file", dev)):
    if value is not None and not os.path.isfile(value):
      raise ValueError(f"{name}={value!r} is not a file (expected SQuAD v1.1 JSON)")
  if dev and not train:
    raise ValueError(f"config.data.dev_file={dev!r} needs config.data.train_file too")
  if train or not d.dir:
    return train, dev
  return folder_files(d.dir)


def folder_files(data_dir: str) -> tuple[str, str | None]:
  """``(train file, dev file or None)`` of a SQuAD folder (``config.data.dir``).

  Raises:
    ValueError: not a folder, or one holding none of `TRAIN_FILES`.
  """
  folder = pathlib.Path(data_dir)
  if not folder.is_dir():
    raise ValueError(f"config.data.dir={data_dir!r} is not a directory (expected {' or '.join(TRAIN_FILES)} in it)")
  found = [folder / f for f in TRAIN_FILES if (folder / f).is_file()]
  if not found:
    raise ValueError(f"config.data.dir={data_dir!r} holds none of {TRAIN_FILES}; or give config.data.train_file")
  return str(found[0]), str(folder / DEV_FILE) if (folder / DEV_FILE).is_file() else None


def validate(config: ml_collections.ConfigDict) -> tuple[str | None, str | None]:
  """Every setting of a SQuAD run, checked before anything is loaded; the data files."""
  settings_lib.validate(config)
  settings_lib.check_positive_ints(config, ("doc_stride", "n_best", "max_answer_len", "data.dev_articles"))
  if config.doc_stride >= config.max_seq_len:
    raise ValueError(f"config.doc_stride={config.doc_stride} must be below config.max_seq_len={config.max_seq_len}")
  return data_files(config)


def load_examples(config: ml_collections.ConfigDict, train_file: str | None, dev_file: str | None):
  """Training and evaluation questions (optionally seeded subsets) as `squad.QAExample` lists."""
  if train_file is None:
    train, dev = squad.load_hub("train", config.data.hub_name), squad.load_hub("validation", config.data.hub_name)
  elif dev_file is None:
    train, dev = squad.split_by_article(squad.load_file(train_file, training=True), config.data.dev_articles)
  else:
    train, dev = squad.load_file(train_file, training=True), squad.load_file(dev_file, training=False)
  rng = np.random.default_rng(config.data.subset_seed)
  if config.data.train_subset > 0:
    train = [train[i] for i in np.sort(rng.permutation(len(train))[: config.data.train_subset])]
  if config.data.eval_subset > 0:
    dev = [dev[i] for i in np.sort(rng.permutation(len(dev))[: config.data.eval_subset])]
  return train, dev


def build_task(config: ml_collections.ConfigDict, tokenizer: Any, train_file: str | None,
               dev_file: str | None) -> qa.ExtractiveQA:
  """The `qa.ExtractiveQA` task: examples, windows (cached between runs), buckets."""
  train, dev = load_examples(config, train_file, dev_file)
  def features(examples):
    f = squad.build_features(examples, tokenizer, max_seq_len=config.max_seq_len, doc_stride=config.doc_stride,
                             cache_dir=cache_lib.folder(config.data.cache_dir, "squad_features"))
    # Without segment ids every token is segment 0, as for a model never
    # trained on sentence pairs (the embedded sentence-transformers MiniLM).
    return f if config.data.segment_ids else dataclasses.replace(f, token_type_ids=np.zeros_like(f.token_type_ids))

  buckets = tuple(sorted({min(config.max_seq_len, b) for b in config.data.buckets} | {config.max_seq_len}))
  return qa.ExtractiveQA(train=features(train), eval_examples=dev, eval_features=features(dev), buckets=buckets,
                         n_best=config.n_best, max_answer_len=config.max_answer_len)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Runs (or resumes) one SQuAD fine-tuning run and returns its results dict."""
  train_file, dev_file = validate(config)
  mesh = run_lib.start(config)
  workdir = run_lib.resolve_workdir(config, workdir, task="squad")
  module, params, tokenizer, hf_config, report, param_specs = run_lib.load_sharded_model(config, "qa", 2)
  task = build_task(config, tokenizer, train_file, dev_file)
  method = settings_lib.method_settings(config, default_targets=hub.default_lora_targets(hf_config),
                                      head_patterns=HEAD_PATTERNS + tuple(re.escape(p) for p in report.missing))
  summary = {**settings_lib.summary(config), "train_questions": int(len(np.unique(task.train.example_index))),
             "eval_questions": len(task.eval_examples), "train_windows": len(task.train),
             "eval_windows": len(task.eval_features)}
  init_trainable = run_lib.initial_trainable(config, params, hf_config, "qa", method)
  with settings_lib.config_errors():
    return trainer.train_and_evaluate(task, module, params, method, settings_lib.trainer_settings(config), workdir,
                                      mesh=mesh, param_specs=param_specs, extra_results=summary,
                                      init_trainable=init_trainable)
