"""Fixtures for the multi-device tests: the experiment tests' tiny BERT and RTE, and a 1-layer BERT."""

import pytest

from tests.experiments.conftest import make_tiny_bert, tiny_bert, tiny_glue  # pylint: disable=unused-import


@pytest.fixture(scope="session")
def tiny_bert_one_layer(tmp_path_factory):
  """The tiny BERT with one layer: every partition rule applies, compiles are half as long."""
  return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_1"), num_hidden_layers=1)
