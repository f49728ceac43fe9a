"""rmlora_jax: Regularized and Masked LoRA (and its family) as composable JAX functions.

Adapters are plain pytrees; training behaviour is optax transforms; every
function here is pure and jittable. See README.md for a tour.
"""

from rmlora_jax.analysis import (count_params, delta_report, effective_rank, factored_singular_values, ortho_loss,
                                 singular_values)
from rmlora_jax.adapters.family import Family
from rmlora_jax.adapters.lora import LoraSpec, init_lora, select_targets
from rmlora_jax.adapters.registry import (FAMILIES, adapter_product, attach, delta_factors, delta_weights, family_of,
                                         merge)
from rmlora_jax.low_rank import LowRankKernel, dense_apply, dense_group_apply
from rmlora_jax.masking import RandomDirectionMaskState, direction_mask, random_direction_mask
from rmlora_jax.penalty import gram_deviation, ortho_penalty
from rmlora_jax.quantize import QuantizeSpec, abstract_kernels, dequantize_base, quantize_base
from rmlora_jax.accounting import ParamCounts, adapter_param_counts, param_counts
from rmlora_jax.adapters.adalora import adalora_penalty, adalora_pruning, adalora_ranks, budget_ranks, init_adalora
from rmlora_jax.budget import BudgetPruningState, BudgetSchedule, budget_schedule, is_pruning_step
from rmlora_jax.adapters.lora2 import (Lora2Spec, init_lora2, lora2_penalty, lora2_pruning, lora2_ranks,
                                      lora2_released_penalty)
from rmlora_jax.adapters.sora import (SoraProximalState, init_sora, released_threshold, soft_threshold, sora_proximal,
                                     sora_ranks)

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Family",
    "BudgetPruningState",
    "BudgetSchedule",
    "Lora2Spec",
    "LoraSpec",
    "LowRankKernel",
    "ParamCounts",
    "QuantizeSpec",
    "RandomDirectionMaskState",
    "SoraProximalState",
    "abstract_kernels",
    "adalora_penalty",
    "adalora_pruning",
    "adalora_ranks",
    "budget_ranks",
    "adapter_param_counts",
    "adapter_product",
    "attach",
    "budget_schedule",
    "count_params",
    "delta_factors",
    "delta_report",
    "delta_weights",
    "dense_apply",
    "dense_group_apply",
    "dequantize_base",
    "direction_mask",
    "effective_rank",
    "factored_singular_values",
    "family_of",
    "gram_deviation",
    "init_adalora",
    "init_lora",
    "init_lora2",
    "init_sora",
    "is_pruning_step",
    "lora2_penalty",
    "lora2_released_penalty",
    "lora2_pruning",
    "lora2_ranks",
    "merge",
    "ortho_loss",
    "ortho_penalty",
    "param_counts",
    "quantize_base",
    "random_direction_mask",
    "select_targets",
    "singular_values",
    "released_threshold",
    "soft_threshold",
    "sora_proximal",
    "sora_ranks",
]
