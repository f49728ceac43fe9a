"""Fixtures for the model tests: tiny random transformers checkpoints on disk."""

import os

# Set before transformers/huggingface_hub are imported: the tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
import transformers

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=99,
    max_position_embeddings=64,
)


def _tiny_config(model_type: str, **overrides):
  """A small random-weights transformers config of ``model_type``."""
  if model_type == "bert":
    return transformers.BertConfig(**{**TINY, **overrides})
  if model_type == "roberta":
    # As real RoBERTa checkpoints: one token type, pad id 1, positions from 2.
    return transformers.RobertaConfig(
        **{**TINY, "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-5, **overrides}
    )
  raise ValueError(model_type)


def _save_hf_model(cls, config, folder, *, safe: bool = True, seed: int = 0):
  """Builds ``cls(config)`` with seeded random weights, saves it, returns it in eval mode."""
  torch.manual_seed(seed)
  model = cls(config).eval()
  # Random (not init-default) LayerNorm and bias values, so a swapped or
  # dropped parameter cannot hide behind ones and zeros.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  if safe:
    model.save_pretrained(folder)
  else:
    # transformers 5 always writes safetensors; write the legacy .bin layout by hand.
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
  return model


def _make_batch(config, *, batch: int = 3, seq: int = 11, seed: int = 0) -> dict:
  """Random token ids with right padding on some rows, as numpy int32 arrays."""
  rng = np.random.default_rng(seed)
  pad = config.pad_token_id
  ids = rng.integers(3, config.vocab_size, size=(batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  lengths = [seq, seq - 4, 2][:batch]
  for row, n in enumerate(lengths):
    ids[row, n:] = pad
    mask[row, n:] = 0
  types = rng.integers(0, config.type_vocab_size, size=(batch, seq)).astype(np.int32)
  types[mask == 0] = 0
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
  """A saved tiny ``BertForSequenceClassification`` (3 labels), safetensors."""
  folder = tmp_path_factory.mktemp("tiny_bert_cls")
  _save_hf_model(
      transformers.BertForSequenceClassification, _tiny_config("bert", num_labels=3), folder
  )
  return folder


# The helpers as fixtures, so test modules need not import this file.
@pytest.fixture(scope="session")
def tiny_config():
  """`_tiny_config`: ``tiny_config(model_type, **overrides)``."""
  return _tiny_config


@pytest.fixture(scope="session")
def save_hf_model():
  """`_save_hf_model`: ``save_hf_model(cls, config, folder, *, safe=True)``."""
  return _save_hf_model


@pytest.fixture(scope="session")
def make_batch():
  """`_make_batch`: ``make_batch(config, *, batch=3, seq=11)``."""
  return _make_batch
