"""The SQuAD entry point end to end on a tiny random BERT and a tiny SQuAD file; the PEFT anchor beside it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import squad as squad_config
from rmlora_jax.recipes import squad as squad_task
from tests.experiments.conftest import WORDS, set_overrides


def write_squad(path, *, articles=4, paragraphs=3, questions=3, seed=0):
  """Official v1.1 layout; each answer is a word of its context, found by its character offset."""
  rng = np.random.default_rng(seed)
  data = []
  for a in range(articles):
    paras = []
    for p in range(paragraphs):
      context = " ".join(rng.choice(WORDS, size=int(rng.integers(12, 70))))
      words = context.split()
      qas = []
      for q in range(questions):
        i = int(rng.integers(len(words)))
        start = len(" ".join(words[:i])) + (1 if i else 0)
        qas.append({"id": f"a{a}p{p}q{q}", "question": " ".join(rng.choice(WORDS, size=4)),
                    "answers": [{"text": words[i], "answer_start": start}] * 2})
      paras.append({"context": context, "qas": qas})
    data.append({"title": f"article_{a}", "paragraphs": paras})
  path.write_text(json.dumps({"version": "1.1", "data": data}))
  return str(path)


def tiny_config(model, train_file, workdir, **overrides):
  config = squad_config.get_config()
  config.model.name_or_path = model
  config.data.train_file = train_file
  config.data.dev_articles = 1
  config.data.buckets = (32,)
  config.data.cache_dir = str(workdir) + "_cache"
  config.workdir = str(workdir)
  config.max_seq_len = 48
  config.doc_stride = 16
  config.batch_size = 8
  config.num_epochs = 1
  config.max_steps = 6
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.progress = False
  config.lora.rank = 4
  config.rm.num_directions = 2
  return set_overrides(config, overrides)


@pytest.mark.parametrize("method", ["rm_lora", "adalora"])
def test_squad_runs_every_family_and_reports_exact_match_and_f1(method, tiny_bert, tmp_path):
  config = tiny_config(tiny_bert, write_squad(tmp_path / "train.json"), tmp_path / "run", method=method)
  results = squad_task.train_and_evaluate(config, config.workdir)
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["task"] == "squad" and saved["method"] == method and saved["steps"] == 6
  assert set(saved["metrics"]) == {"exact_match", "f1"} and saved["main_metric"] == "f1"
  assert 0.0 <= results["metrics"]["exact_match"] <= results["metrics"]["f1"] <= 100.0
  # The last of four articles is held out: 9 questions; contexts longer than a window make several.
  assert saved["eval_questions"] == 9 and saved["train_questions"] == 27
  assert saved["train_windows"] > saved["train_questions"]  # contexts up to 70 words, windows of 48 tokens


def test_squad_batches_resume_mid_epoch_and_evaluation_sees_every_window(tiny_bert, tmp_path):
  import transformers
  config = tiny_config(tiny_bert, write_squad(tmp_path / "train.json"), tmp_path / "run")
  train_file, dev_file = squad_task.validate(config)
  task = squad_task.build_task(config, transformers.AutoTokenizer.from_pretrained(tiny_bert), train_file, dev_file)
  whole = list(task.train_batches(8, seed=3, epoch=1, start=0))
  rest = list(task.train_batches(8, seed=3, epoch=1, start=2))
  assert len(rest) == len(whole) - 2
  for a, b in zip(whole[2:], rest):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  seen = np.concatenate([b["index"][b["weights"] > 0] for b in whole])
  assert sorted(seen) == list(range(len(task.train)))  # every window once per epoch
  # Evaluation scatters each batch's logits back to its windows: a predictor that
  # returns the window number everywhere must come back row by row.
  start, _ = task.logits(lambda b: {"start_logits": np.repeat(b["index"][:, None], b["input_ids"].shape[1], 1)
                                    .astype(np.float32), "end_logits": np.zeros(b["input_ids"].shape, np.float32)}, 8)
  rows = np.arange(len(task.eval_features))
  assert np.all(start[rows, 0] == rows)


@pytest.mark.parametrize("overrides, message", [
    ({"doc_stride": 48}, r"config.doc_stride=48 must be below config.max_seq_len=48"),
    ({"data.train_file": "/nowhere.json"}, r"config.data.train_file='/nowhere.json' is not a file"),
    ({"data.dev_articles": 0}, r"config.data.dev_articles must be a positive integer"),
    ({"method": "dora"}, r"config.method='dora' is unknown"),
])
def test_bad_squad_config_fails_before_loading_anything(overrides, message, tmp_path):
  config = tiny_config("/nonexistent/model", write_squad(tmp_path / "t.json"), tmp_path / "w", **overrides)
  with pytest.raises(ValueError, match=message):
    squad_task.train_and_evaluate(config, config.workdir)


def test_peft_anchor_trains_on_the_same_windows(tiny_bert, tmp_path):
  config = tiny_config(tiny_bert, write_squad(tmp_path / "train.json"), tmp_path / "peft", method="lora")
  proc = subprocess.run([sys.executable, "-m", "experiments.peft_squad", "--config=configs/squad.py",
                         f"--config.model.name_or_path={tiny_bert}", f"--config.data.train_file={config.data.train_file}",
                         "--config.data.dev_articles=1", "--config.data.buckets=(32,)",
                         f"--config.data.cache_dir={config.data.cache_dir}", f"--config.workdir={config.workdir}",
                         "--config.max_seq_len=48", "--config.doc_stride=16", "--config.batch_size=8",
                         "--config.max_steps=4", "--config.log_every_steps=1", "--config.lora.rank=4",
                         "--config.method=lora"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((tmp_path / "peft" / "results.json").read_text())
  assert saved["method"] == "peft_lora" and saved["task"] == "squad" and saved["steps"] == 4
  assert set(saved["metrics"]) == {"exact_match", "f1"}
  # PEFT's trainable count: LoRA on six matrices of two layers plus the (32, 2) qa_outputs head.
  assert saved["trainable_params"] == 2 * 4 * (4 * (32 + 32) + (32 + 48) + (48 + 32)) + 32 * 2 + 2


def test_qa_loss_ignores_padding_positions():
  """The loss is the NumPy cross-entropy over each row's real tokens, whatever the bucket's padding."""
  from rmlora_jax.tasks import qa  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  lengths = np.array([5, 9, 3])
  width = 12
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  logits = {side: rng.normal(size=(3, width)).astype(np.float32) * 3 for side in ("start", "end")}
  # Pad positions get large logits: counted, they would dominate the softmax.
  for side in logits:
    logits[side][mask == 0] = 20.0
  starts, ends = np.array([0, 4, 2]), np.array([1, 8, 2])
  weights = np.array([1.0, 1.0, 0.0], np.float32)  # the last row is a filler

  def ce(x, n, label):
    x = x[:n].astype(np.float64)
    return np.log(np.exp(x - x.max()).sum()) + x.max() - x[label]

  per_row = [0.5 * (ce(logits["start"][i], lengths[i], starts[i]) + ce(logits["end"][i], lengths[i], ends[i]))
             for i in range(3)]
  expected = (weights * per_row).sum() / weights.sum()
  task = qa.ExtractiveQA(train=None, eval_examples=(), eval_features=None, buckets=(width,))
  batch = {"attention_mask": mask, "start_positions": starts, "end_positions": ends, "weights": weights}
  got = task.loss({f"{k}_logits": v for k, v in logits.items()}, batch)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Four more pad columns (another bucket) change nothing.
  wider = {f"{k}_logits": np.pad(v, ((0, 0), (0, 4)), constant_values=50.0) for k, v in logits.items()}
  batch_wide = dict(batch, attention_mask=np.pad(mask, ((0, 0), (0, 4))))
  np.testing.assert_allclose(float(task.loss(wider, batch_wide)), expected, rtol=1e-5)
