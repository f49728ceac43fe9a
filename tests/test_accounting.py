"""Trainable / inference parameter counts for every adapter family and full fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmlora_jax import LoraSpec, init_lora
from rmlora_jax.accounting import ParamCounts, adapter_param_counts, param_counts
from rmlora_jax.adapters.adalora import init_adalora
from rmlora_jax.adapters.lora2 import Lora2Spec, init_lora2
from rmlora_jax.adapters.sora import init_sora

# Two kernels: (d_in, d_out) = (10, 6) and (6, 4); d = 16 and 10.
PARAMS = {"l0": {"kernel": jnp.ones((10, 6)), "bias": jnp.ones((6,))}, "l1": {"kernel": jnp.ones((6, 4))}}
SPEC = LoraSpec(rank=3, alpha=3.0, targets=(r".*/kernel",))


def test_full_finetuning_counts_every_parameter():
  assert param_counts(PARAMS) == ParamCounts(60 + 6 + 24, 60 + 6 + 24)


def test_lora_counts():
  ad = init_lora(jax.random.key(0), PARAMS, SPEC)
  assert param_counts(ad) == ParamCounts(3 * 16 + 3 * 10, 3 * 16 + 3 * 10)


def test_adalora_counts_kept_triplets_at_inference():
  ad = init_adalora(jax.random.key(0), PARAMS, SPEC)
  ad["l0/kernel"]["lam"] = jnp.asarray([0.5, 0.0, -1.0])
  ad["l1/kernel"]["lam"] = jnp.asarray([0.0, 0.0, 2.0])
  assert param_counts(ad) == ParamCounts(3 * 17 + 3 * 11, 2 * 17 + 1 * 11)
  # with a trained head alongside, counted fully in both columns
  assert param_counts({"ad": ad, "head": jnp.ones((4, 2))}) == ParamCounts(3 * 17 + 3 * 11 + 8, 2 * 17 + 11 + 8)


def test_sora_counts_open_gates():
  ad = init_sora(jax.random.key(0), PARAMS, SPEC)
  ad["l1/kernel"]["g"] = jnp.asarray([0.0, 0.3, 0.0])
  assert param_counts(ad) == ParamCounts(3 * 17 + 3 * 11, 3 * 17 + 1 * 11)


def test_lora2_counts():
  spec = Lora2Spec(k=4, r=3, alpha=3.0, targets=(r".*/kernel",))
  ad = init_lora2(jax.random.key(0), PARAMS, spec)
  ad["l0/kernel"]["lam"] = jnp.asarray([1.0, 0.0, 1.0])
  # l1 keeps nothing (lam = 0 as at init): it needs nothing at inference.
  trainable = (4 * 16 + 3 * 9) + (4 * 10 + 3 * 9)
  assert param_counts(ad) == ParamCounts(trainable, 4 * 16 + 2 * 9)


def test_adalora_rank_12_pruned_to_8():
  """The issue's example: 12-rank triplets trained, 8 needed at inference."""
  lam = np.zeros(12, np.float32)
  lam[:8] = 1.0
  ad = {"p": jnp.ones((768, 12)), "lam": jnp.asarray(lam), "q": jnp.ones((12, 768))}
  assert adapter_param_counts(ad) == ParamCounts(12 * 1537, 8 * 1537)


def test_unknown_family_raises():
  with pytest.raises(ValueError, match=r"'mystery' has factors \['x'\], which match no known adapter family"):
    adapter_param_counts({"x": jnp.ones(2)}, path="mystery")
