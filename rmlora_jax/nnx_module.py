"""A Flax NNX model as the linen-style module the trainer, the tasks and the adapter functions take.

This library's functions work on parameter pytrees keyed by "/"-paths; an
NNX model's parameters are the same kind of tree once split
(``nnx.split``; ``State.to_pure_dict()``), with the same paths a linen
model of the same structure has (``layers/0/attention/query/kernel``).
`NnxModule` wraps a model so that ``module.apply({"params": tree}, *args)``
runs it with the given parameters, which is what `trainer.train_and_evaluate`
and the tasks call, and `NnxModule.merge` puts trained (or merged) parameters
back into an ``nnx.Module`` for inference.

Example (RM-LoRA through the trainer, then back to an NNX model)::

  module = NnxModule(model)                       # any nnx.Module
  results = trainer.train_and_evaluate(task, module, module.params, settings, trainer_settings, workdir)
  trainable, _ = rmlora_jax.recipes.run.trained_state(workdir)
  model = module.merge(rl.merge(with_head(module.params, trainable["head"]), trainable["adapters"], spec))
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


class NnxModule:
  """``apply({"params": tree}, *args, deterministic=, rngs=, **kwargs)`` for an ``nnx.Module``.

  The parameters are the model's ``nnx.Param`` variables as a plain nested
  dict (`params`); everything else it holds (batch statistics, RNG state) is
  kept as it was when wrapped. ``deterministic`` switches the model to
  ``eval()`` or ``train()`` mode, and ``rngs={"dropout": key}`` reseeds its
  dropout stream for the call (a model built with ``nnx.Rngs(dropout=...)``).
  Holds no arrays of its own beyond that snapshot, so it can be closed over by
  `jax.jit`.
  """

  def __init__(self, model: nnx.Module):
    if not isinstance(model, nnx.Module):
      raise ValueError(f"NnxModule wraps an nnx.Module, got {type(model).__name__}")
    self.graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    self.params = params.to_pure_dict()

  def merge(self, params: Any) -> nnx.Module:
    """An ``nnx.Module`` with ``params`` (a tree of `params`' structure) as its parameters."""
    state = jax.tree.map(lambda x: x, self._abstract)  # a fresh State: replace_by_pure_dict writes in place
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, self._rest)

  def apply(self, variables: dict[str, Any], *args: Any, deterministic: bool | None = None,
            rngs: dict[str, jax.Array] | None = None, **kwargs: Any) -> Any:
    """Runs the model with ``variables["params"]``; see the class docstring."""
    model = self.merge(variables["params"])
    if deterministic is not None:
      model.eval() if deterministic else model.train()
    if rngs and "dropout" in rngs and not deterministic:
      nnx.reseed(model, dropout=rngs["dropout"])
    return model(*args, **kwargs)
