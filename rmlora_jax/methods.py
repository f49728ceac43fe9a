"""The fine-tuning methods by name, and what a method is built from.

`METHODS` (listed in `rmlora_jax.adapters.registry`) maps each name to its
family and builder:

* ``full_ft`` (`adapters.full`): everything is trainable.
* ``lora``, ``r_lora``, ``gm_lora``, ``rm_lora`` (`adapters.lora`): adapters
  and head trainable, base weights frozen; R adds the orthogonality penalty,
  GM the random direction mask, RM both (`lora.RmOptions`).
* ``adalora`` (`adapters.adalora`), ``lora2`` (`adapters.lora2`): SVD-form
  (two-plane) adapters, their penalties and importance pruning to a budget.
* ``sora`` (`adapters.sora`): gated adapters, the gates on SGD plus a proximal L1 step.

Example::

  method = make_method(MethodSettings(name="rm_lora", spec=spec, options=RmOptions(num_directions=4)))
  trainable = method.init(key, params)
"""

from __future__ import annotations

from rmlora_jax.adapters.adalora import AdaLoraOptions
from rmlora_jax.adapters.base import (ADAPTER_APPLY, Method, MethodSettings, base_optimizer, head_paths,
                                      no_penalty, with_head)
from rmlora_jax.adapters.lora import MASK_MODES, RmOptions
from rmlora_jax.adapters.lora2 import Lora2Options
from rmlora_jax.adapters.registry import FAMILIES, METHODS, MethodEntry, check_available, get, make_method
from rmlora_jax.adapters.sora import SoraOptions

__all__ = [
    "ADAPTER_APPLY", "FAMILIES", "MASK_MODES", "METHODS", "AdaLoraOptions", "Lora2Options", "Method", "MethodEntry",
    "MethodSettings", "RmOptions", "SoraOptions", "base_optimizer", "check_available", "get", "head_paths",
    "make_method", "no_penalty", "with_head",
]
