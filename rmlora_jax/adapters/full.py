"""Full fine-tuning: every parameter trainable, nothing frozen; the family's upper anchor."""

from __future__ import annotations

from rmlora_jax.adapters import base


def build(settings: base.MethodSettings) -> base.Method:
  """Full fine-tuning with clipping and AdamW from ``settings``."""
  s = settings
  return base.Method(
      settings=s,
      init=lambda key, params: {"params": params},
      assemble=lambda trainable, frozen: trainable["params"],
      penalty=base.no_penalty,
      optimizer=lambda lr: base.settings_optimizer(s, lr),
      frozen=lambda params: {},
      adapters=lambda trainable: {},
  )
