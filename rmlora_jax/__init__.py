"""rmlora_jax: Regularized and Masked LoRA (and its family) as composable JAX functions.

Adapters are plain pytrees; training behaviour is optax transforms; every
function here is pure and jittable. See README.md for a tour.
"""

from rmlora_jax.analysis import count_params, effective_rank, ortho_loss, singular_values
from rmlora_jax.lora import (
    LoraSpec,
    adapter_product,
    delta_weights,
    init_lora,
    merge,
    register_adapter_kind,
    select_targets,
)
from rmlora_jax.masking import RandomDirectionMaskState, direction_mask, random_direction_mask
from rmlora_jax.penalty import gram_deviation, ortho_penalty

__version__ = "0.1.0"

__all__ = [
    "LoraSpec",
    "RandomDirectionMaskState",
    "adapter_product",
    "count_params",
    "delta_weights",
    "direction_mask",
    "effective_rank",
    "gram_deviation",
    "init_lora",
    "merge",
    "ortho_loss",
    "ortho_penalty",
    "random_direction_mask",
    "register_adapter_kind",
    "select_targets",
    "singular_values",
]
