"""The instruction-tuning (SFT) experiment from a config: a decoder LLM on the shared trainer.

`train_and_evaluate(config, workdir)` is the run behind
``python -m experiments.sft``. Data, in order of precedence:

* ``config.data.train_file`` (and ``config.data.dev_file``): local JSON or
  JSONL prompt/response records (`rmlora_jax.data.sft.load_file`);
* ``config.data.dir``: a SQuAD v1.1 folder (``train-v1.1.json`` or the
  offline ``train-v1.1-subset.json``), its questions turned into
  prompt/response pairs (`rmlora_jax.data.sft.from_squad`);
* ``config.data.hub_name``: a `datasets` copy with ``train`` and
  ``validation`` splits and the named prompt/response fields.

Without a dev file (or with a SQuAD folder), the last
``config.data.dev_articles`` SQuAD articles, or the last
``config.data.dev_examples`` records, are held out for evaluation. With
``config.eval_base`` the untuned model is scored on them first
(``results["base"]``), so a run shows what the tuning bought.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from rmlora_jax.recipes import run as run_lib
from rmlora_jax.recipes import settings as settings_lib
from rmlora_jax import trainer
from rmlora_jax.data import sft
from rmlora_jax.data import squad
from rmlora_jax.models import hub
from rmlora_jax.tasks import causal_lm
from rmlora_jax.recipes import squad as squad_task


def _subset(examples: list, n: int, rng: np.random.Generator) -> list:
  return [examples[i] for i in np.sort(rng.permutation(len(examples))[:n])] if n > 0 else examples


def load_examples(config: ml_collections.ConfigDict) -> tuple[list[sft.SftExample], list[sft.SftExample], str]:
  """``(train, eval, source)`` examples from the config (module docstring), subsets applied.

  Raises:
    ValueError: a named file or folder that does not exist, a dev file
      without a training file, or no data source at all.
  """
  d = config.data
  fields = dict(prompt_field=d.prompt_field, response_field=d.response_field)
  if d.dev_file and not d.train_file:
    raise ValueError(f"config.data.dev_file={d.dev_file!r} needs config.data.train_file too")
  if d.train_file:
    for name in ("train_file", "dev_file"):
      value = d[name]
      if value and not os.path.isfile(value):
        raise ValueError(f"config.data.{name}={value!r} is not a file (expected JSON or JSONL prompt/response "
                         "records)")
    train = sft.load_file(d.train_file, **fields)
    if d.dev_file:
      dev = sft.load_file(d.dev_file, **fields)
    else:
      if not 0 < d.dev_examples < len(train):
        raise ValueError(f"config.data.dev_examples={d.dev_examples} must be in 1..{len(train) - 1} "
                         f"({d.train_file} has {len(train)} records) when there is no config.data.dev_file")
      train, dev = train[:-d.dev_examples], train[-d.dev_examples:]
    source = d.train_file
  elif d.dir:
    train_file, _ = squad_task.folder_files(d.dir)
    qa_train, qa_dev = squad.split_by_article(squad.load_file(train_file, training=True), d.dev_articles)
    train, dev = sft.from_squad(qa_train), sft.from_squad(qa_dev)
    source = train_file
  elif d.hub_name:
    train = sft.load_hub(d.hub_name, "train", **fields)
    dev = sft.load_hub(d.hub_name, "validation", **fields)
    source = d.hub_name
  else:
    raise ValueError("no data: set config.data.train_file (JSON/JSONL prompt/response records), "
                     "config.data.dir (a SQuAD v1.1 folder) or config.data.hub_name")
  rng = np.random.default_rng(d.subset_seed)
  return _subset(train, d.train_subset, rng), _subset(dev, d.eval_subset, rng), source


def validate(config: ml_collections.ConfigDict) -> None:
  """Every setting of an SFT run, checked before anything is loaded."""
  settings_lib.validate(config)
  settings_lib.check_positive_ints(config, ("max_new_tokens", "data.dev_articles"))
  if not config.temperature >= 0:
    raise ValueError(f"config.temperature must be >= 0 (0: greedy), got {config.temperature!r}")
  if not 0 < config.top_p <= 1:
    raise ValueError(f"config.top_p must be in (0, 1], got {config.top_p!r}")
  if config.data.dir and not config.data.train_file:
    squad_task.folder_files(config.data.dir)


def build_task(config: ml_collections.ConfigDict, tokenizer: Any, train: list[sft.SftExample],
               dev: list[sft.SftExample]) -> causal_lm.InstructionTuning:
  """The `causal_lm.InstructionTuning` task of tokenized examples."""
  tok = lambda examples: sft.tokenize(examples, tokenizer, max_seq_len=config.max_seq_len,
                                      chat_template=config.chat_template)
  eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  if config.chat_template:  # the end of the assistant's turn, e.g. <|im_end|>
    eos |= {t for t in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<end_of_turn>", "<|eot_id|>"])
            if t is not None and t != tokenizer.unk_token_id}
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
  buckets = tuple(sorted({min(config.max_seq_len, b) for b in config.data.buckets} | {config.max_seq_len}))
  return causal_lm.InstructionTuning(
      train=tok(train), eval=tok(dev), buckets=buckets, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
      eos_token_ids=tuple(sorted(eos)), pad_token_id=int(pad), max_new_tokens=config.max_new_tokens,
      temperature=config.temperature, top_p=config.top_p, seed=config.seed)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Runs (or resumes) one SFT run and returns its results dict."""
  validate(config)
  mesh = run_lib.start(config)
  train, dev, source = load_examples(config)
  workdir = run_lib.resolve_workdir(config, workdir, task="sft")
  module, params, tokenizer, hf_config, _, param_specs = run_lib.load_sharded_model(config, "causal_lm", 1)
  task = build_task(config, tokenizer, train, dev)
  method = settings_lib.method_settings(config, default_targets=hub.default_lora_targets(hf_config))
  summary = {**settings_lib.summary(config), "data": source, "train_examples": len(task.train),
             "eval_examples": len(task.eval), "dropped_long": {"train": task.train.dropped, "eval": task.eval.dropped}}
  results_file = os.path.join(workdir, "results.json")
  if config.eval_base and not os.path.exists(results_file):
    # The untuned model on the same prompts, once (a resumed run keeps the first figure).
    base_file = os.path.join(workdir, "base_metrics.json")
    if os.path.exists(base_file):
      with open(base_file, encoding="utf-8") as f:
        summary["base"] = json.load(f)
    else:
      summary["base"] = evaluate_params(task, module, params, config.batch_size)
      if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(base_file, "w", encoding="utf-8") as f:
          json.dump(summary["base"], f)
  init_trainable = run_lib.initial_trainable(config, params, hf_config, "causal_lm", method)
  with settings_lib.config_errors():
    return trainer.train_and_evaluate(task, module, params, method, settings_lib.trainer_settings(config), workdir,
                                      mesh=mesh, param_specs=param_specs, extra_results=summary,
                                      init_trainable=init_trainable)


def evaluate_params(task: causal_lm.InstructionTuning, module: Any, params: Any, batch_size: int) -> dict[str, float]:
  """``task.evaluate`` of a model's own params (no adapters), with the time it took."""
  generate = jax.jit(lambda p, batch: task.generate(module, p, batch))
  start = time.perf_counter()
  metrics = task.evaluate(lambda batch: generate(params, batch), batch_size)
  return {**metrics, "eval_time_s": round(time.perf_counter() - start, 2)}
