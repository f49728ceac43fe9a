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


def _save_decoders(tmp_path_factory, cases) -> dict:
  """Saves a seeded random checkpoint per case: ``{case: (cls, config)}`` -> ``{case: (folder, torch model)}``.

  Norms and biases are moved off their init values (ones or zeros), so a
  swapped or dropped one cannot hide.
  """
  out = {}
  for case, (cls, config) in cases.items():
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
          p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(case)
    model.save_pretrained(folder)
    out[case] = folder, model
  return out


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


def _decoder_batch(*, left: bool, batch: int = 3, seq: int = 11, seed: int = 0,
                   vocab_size: int = TINY["vocab_size"], pad_token_id: int = 0):
  """Random ids (B, T) and a mask padding rows 1 and 2 on the left or the right."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(batch, seq)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, n in enumerate([seq, seq - 4, 2][:batch]):
    if left:
      mask[row, : seq - n] = 0
    else:
      mask[row, n:] = 0
  ids[mask == 0] = pad_token_id
  return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
  """A transformers causal LM's logits (B, T, vocab) for numpy ids and mask."""
  # transformers' forward counts positions from the first slot; with left
  # padding its generate() passes cumsum(mask) - 1, which is our default.
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.numpy()


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
def save_decoders(tmp_path_factory):
  """`_save_decoders`: ``save_decoders({case: (cls, config)}) -> {case: (folder, torch model)}``."""
  return lambda cases: _save_decoders(tmp_path_factory, cases)


@pytest.fixture(scope="session")
def make_batch():
  """`_make_batch`: ``make_batch(config, *, batch=3, seq=11)``."""
  return _make_batch


@pytest.fixture(scope="session")
def decoder_batch():
  """`_decoder_batch`: ``decoder_batch(*, left, batch=3, seq=11) -> (ids, mask)``, vocabulary 99, pad id 0."""
  return _decoder_batch


@pytest.fixture(scope="session")
def torch_logits():
  """`_torch_logits`: ``torch_logits(torch_model, ids, mask) -> (B, T, vocab) logits``."""
  return _torch_logits
