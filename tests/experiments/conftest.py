"""Fixtures for the experiment tests: a tiny random BERT and a tiny GLUE folder on disk."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

WORDS = ("the a cat dog sat ran on mat park is not big small red blue tree house man woman "
         "saw ate food quickly slowly happy sad".split())


def set_overrides(config, overrides):
  """``config`` with each dotted key of ``overrides`` (``"rm.num_directions"``) set."""
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS, size=n))


def make_tiny_bert(folder, *, num_hidden_layers=2, hidden_size=32, intermediate_size=48):
  """Saves a BERT (hidden 32 unless asked) with random weights and a WordPiece vocab of WORDS in ``folder``."""
  import torch
  import transformers

  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS)
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                   num_attention_heads=4, intermediate_size=intermediate_size,
                                   max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
  """A 2-layer, hidden-32 BERT with random weights and a WordPiece vocab of WORDS."""
  return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def write_rte(folder, *, n_train, n_dev, seed=0):
  """An RTE folder in the official layout whose label depends on the words."""
  rng = np.random.default_rng(seed)
  (folder / "RTE").mkdir(parents=True)
  for name, n in (("train", n_train), ("dev", n_dev)):
    lines = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(n):
      a, b = _sentence(rng, rng.integers(3, 12)), _sentence(rng, rng.integers(2, 8))
      label = "entailment" if "cat" in a.split() else "not_entailment"
      lines.append(f"{i}\t{a}\t{b}\t{label}")
    (folder / "RTE" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
  return str(folder)


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory):
  return write_rte(tmp_path_factory.mktemp("glue"), n_train=48, n_dev=20)
