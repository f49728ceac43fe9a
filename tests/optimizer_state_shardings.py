"""Places every method's optimizer state on a 2x2x2 mesh of 8 fake CPU devices.

Run by tests/test_partitioning.py in a subprocess (a process's device count
is fixed once JAX starts)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.optimizer_state_shardings OUT.json

For each method it writes either ``{"error": message}`` or, for every leaf of
the state that ``jax.jit(tx.init, out_shardings=optimizer_shardings(...))``
built, ``[spec entries, shape of this device's shard, global shape]``.
"""

import json
import math
import sys

import jax
import jax.numpy as jnp

import rmlora_jax as rl
from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import paths as paths_lib

METHODS = ("full_ft", "lora", "rm_lora", "adalora", "lora2", "sora")
MESH = {"data": 2, "fsdp": 2, "model": 2}
# One column-parallel and one row-parallel kernel (their BERT rules) and a head.
SHAPES = {
    "encoder": {"layer_0": {"attention": {"query": {"kernel": (16, 32)}}, "output": {"kernel": (32, 16)}}},
    "classifier": {"kernel": (16, 4), "bias": (4,)},
}


def small_params():
  """The parameters of `SHAPES`, deterministic and nonzero."""
  return jax.tree.map(lambda shape: jnp.linspace(-1.0, 1.0, math.prod(shape), dtype=jnp.float32).reshape(shape),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def make_method(name: str):
  """The method ``name`` on `SHAPES`: rank-4 adapters on both kernels, the classifier trained."""
  targets = (r"encoder/.*/kernel",)
  spec = None if name == "full_ft" else (
      rl.Lora2Spec(k=8, r=4, alpha=8.0, targets=targets) if name == "lora2"
      else rl.LoraSpec(rank=4, alpha=8.0, targets=targets))
  options = {"rm_lora": methods_lib.RmOptions(num_directions=2),
             "adalora": methods_lib.AdaLoraOptions(target_rank=2),
             "lora2": methods_lib.Lora2Options(target_rank=2)}.get(name)
  return methods_lib.make_method(methods_lib.MethodSettings(
      name=name, spec=spec, train_patterns=(r"classifier/.*",), total_steps=100, options=options))


def run(name: str, mesh) -> dict:
  params = small_params()
  param_specs = partitioning.match_partition_rules(params, partitioning.rules_for("bert"))
  method = make_method(name)
  tx = method.optimizer(1e-3)
  trainable = method.init(jax.random.key(0), params)
  trainable_specs = partitioning.follow_specs(trainable, params, param_specs, where="trainable tree")
  trainable_shardings = partitioning.named_shardings(trainable, trainable_specs, mesh)
  trainable = partitioning.put_sharded(trainable, trainable_shardings)
  shardings = partitioning.optimizer_shardings(tx, jax.eval_shape(lambda: trainable), trainable_shardings, mesh)
  state = jax.jit(tx.init, out_shardings=shardings)(trainable)
  return {path: [[e if e is None or isinstance(e, str) else list(e) for e in x.sharding.spec],
                 list(x.addressable_shards[0].data.shape), list(x.shape)]
          for path, x in paths_lib.flatten_with_paths(state).items()}


def main(out: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  mesh = partitioning.make_mesh(MESH)
  results = {}
  for name in METHODS:
    try:
      results[name] = {"leaves": run(name, mesh)}
    except ValueError as e:
      results[name] = {"error": str(e)}
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1])
