"""Flax encoders (BERT/RoBERTa, DeBERTa-v2, ViT) and decoders (Llama, Qwen2, Gemma) from Hugging Face checkpoints.

Example::

  from rmlora_jax.models import load_pretrained
  module, params, tokenizer, config = load_pretrained(
      "minilm-l6", head="classification", num_labels=2)
"""

from rmlora_jax.models.hub import (
    LoadReport,
    default_lora_targets,
    embedded_model_path,
    load_pretrained,
    resolve_model_path,
    smollm2_path,
)

__all__ = [
    "LoadReport",
    "default_lora_targets",
    "embedded_model_path",
    "load_pretrained",
    "resolve_model_path",
    "smollm2_path",
]
