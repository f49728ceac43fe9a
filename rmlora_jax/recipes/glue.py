"""The GLUE experiment from a config: one task among several for the shared trainer.

`train_and_evaluate(config, workdir)` is the whole run behind
``python -m experiments.glue``: it checks the config before loading or
compiling anything, loads the encoder (`rmlora_jax.models.hub`) and the
task's data (`rmlora_jax.data.glue`), builds a `TextClassification` task and
the method's settings, and hands them to `rmlora_jax.trainer`, which
resumes, trains, evaluates and writes results.json, scalars and plots.

It runs on one device or many, in one process or several (``config.mesh``,
``config.distributed``; docs/SCALING.md).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmlora_jax.recipes import run as run_lib
from rmlora_jax.recipes import settings as settings_lib
from rmlora_jax import paths as paths_lib
from rmlora_jax import trainer
from rmlora_jax.data import cache as cache_lib
from rmlora_jax.data import batching
from rmlora_jax.data import glue
from rmlora_jax.models import hub
from rmlora_jax.tasks import classification

# Trained alongside the adapters whatever the model: its classifier, plus every
# parameter the checkpoint lacked (a new pooler, for DeBERTa).
HEAD_PATTERNS = (r"classifier/.*",)


def validate(config: ml_collections.ConfigDict) -> glue.GlueTask:
  """Every setting of a GLUE run, checked before anything is loaded; the task's description."""
  settings_lib.validate(config)
  task = glue.get_task(config.task)
  data_dir = glue.resolve_data_source(config.data.dir)
  if data_dir is not None and not os.path.isdir(data_dir):
    source = "config.data.dir" if config.data.dir else "$GLUE_DIR"
    raise ValueError(f"{source}={data_dir!r} is not a directory (expected the GLUE layout, e.g. RTE/train.tsv)")
  if config.head_bias not in ("label_mean", "zero"):
    raise ValueError(f"config.head_bias must be 'label_mean' or 'zero', got {config.head_bias!r}")
  settings_lib.check_positive_ints(config, ("data.num_buckets", "data.bucket_multiple"))
  if config.data.bucketing not in ("fit", "geometric"):
    raise ValueError(f"config.data.bucketing must be 'fit' or 'geometric', got {config.data.bucketing!r}")
  return task


def load_data(config: ml_collections.ConfigDict, task: glue.GlueTask, tokenizer: Any):
  """Tokenised training split (optionally a seeded subset) and eval splits.

  With ``config.data.dev_from_train > 0`` that many training examples (drawn
  by ``config.data.subset_seed``) are held out and become the evaluation
  split instead of the task's dev file, which is then never read.
  """
  data_dir = glue.resolve_data_source(config.data.dir)
  load = lambda split: glue.load_split(task, split, data_dir, hub_name=config.data.hub_name)
  train_text = load("train")
  if config.data.dev_from_train > 0:
    if config.data.dev_from_train >= len(train_text):
      raise ValueError(f"config.data.dev_from_train={config.data.dev_from_train} must be below the "
                       f"{len(train_text)} examples of {task.name}'s training split")
    train_text, dev_text = glue.split_off(train_text, config.data.dev_from_train, seed=config.data.subset_seed)
    eval_text = {task.eval_splits[0]: dev_text}
  else:
    eval_text = {s: load(s) for s in task.eval_splits}
  if config.data.train_subset > 0:
    order = np.random.default_rng(config.data.subset_seed).permutation(len(train_text.labels))
    train_text = glue.select(train_text, np.sort(order[: config.data.train_subset]))
  cache_dir = cache_lib.folder(config.data.cache_dir, "glue_tokens")
  train = glue.tokenize_split(train_text, tokenizer, config.max_seq_len, cache_dir=cache_dir)
  evals = {s: glue.tokenize_split(t, tokenizer, config.max_seq_len, cache_dir=cache_dir) for s, t in eval_text.items()}
  return train, evals


def set_output_bias(params: Any, value: float, new_paths: tuple[str, ...]) -> Any:
  """``params`` with the bias of the newly initialised one-output head set to ``value``.

  STS-B's scores average about 2.7. From a zero bias, AdamW moves the bias
  by about the learning rate per step, so the fastest way to fit the mean is
  to push every example's pooled features the same way, which collapses the
  [CLS] representation (predictions constant to 1e-3 within 100 steps, in
  our runs and in PEFT's on the same seeds; docs/RESULTS.md). Starting the
  bias at the mean training score leaves nothing to collapse for.
  """
  flat = paths_lib.flatten_with_paths(params)
  candidates = [p for p in new_paths if p.endswith("bias") and tuple(flat[p].shape) == (1,)]
  if len(candidates) != 1:
    raise ValueError(f"config.head_bias='label_mean' needs exactly one new one-output bias in the model, "
                     f"found {candidates} among the newly initialised {list(new_paths)}; set config.head_bias='zero'")
  return jax.tree_util.tree_map_with_path(
      lambda kp, w: jnp.full_like(w, value) if paths_lib.path_str(kp) == candidates[0] else w, params)


def buckets_for(config: ml_collections.ConfigDict, train: batching.TokenizedSplit,
                evals: dict[str, batching.TokenizedSplit]) -> tuple[int, ...]:
  """The padded lengths of the run's batches (``config.data.bucketing``).

  "fit": the ``num_buckets`` multiples of ``bucket_multiple`` that pad this
  data's batches least (`batching.fit_buckets` over the first epoch's training
  batches and the evaluation batches); "geometric": halvings up to
  ``max_seq_len`` (`batching.bucket_lengths`), whatever the data.
  """
  if config.data.bucketing == "geometric":
    return batching.bucket_lengths(config.max_seq_len, config.data.num_buckets)
  longest = [batching.batch_max_lengths(train.lengths(), config.batch_size, seed=config.seed, shuffle=True)]
  longest += [batching.batch_max_lengths(split.lengths(), config.batch_size, shuffle=False) for split in evals.values()]
  return batching.fit_buckets(np.concatenate(longest), config.data.num_buckets, multiple=config.data.bucket_multiple,
                          max_len=config.max_seq_len)


def pad_id(tokenizer: Any) -> int:
  """The tokenizer's padding id (0 for BERT, 1 for RoBERTa); 0 when it has none."""
  value = getattr(tokenizer, "pad_token_id", None)
  return 0 if value is None else int(value)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Runs (or resumes) one GLUE fine-tuning run and returns its results dict."""
  spec = validate(config)
  mesh = run_lib.start(config)
  workdir = run_lib.resolve_workdir(config, workdir, task=config.task)
  head = "regression" if spec.is_regression else "classification"
  module, params, tokenizer, hf_config, report, param_specs = run_lib.load_sharded_model(config, head, spec.num_labels)
  train, evals = load_data(config, spec, tokenizer)
  if spec.is_regression and config.head_bias == "label_mean":
    params = set_output_bias(params, float(np.mean(train.labels)), report.missing)
  task = classification.TextClassification(
      spec=spec, train=train, evals=evals, pad_id=pad_id(tokenizer), buckets=buckets_for(config, train, evals))
  head_patterns = HEAD_PATTERNS + tuple(re.escape(p) for p in report.missing)
  method = settings_lib.method_settings(config, default_targets=hub.default_lora_targets(hf_config),
                                      head_patterns=head_patterns)
  init_trainable = run_lib.initial_trainable(config, params, hf_config, head, method)
  with settings_lib.config_errors():
    return trainer.train_and_evaluate(task, module, params, method, settings_lib.trainer_settings(config), workdir,
                                      mesh=mesh, param_specs=param_specs, extra_results=settings_lib.summary(config),
                                      init_trainable=init_trainable)
