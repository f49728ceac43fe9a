"""Subprocess body of the mesh-equivalence test: a few train steps on several meshes.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.distributed.sharded_steps MODEL_DIR OUT.npz

For LoRA and RM-LoRA on the tiny BERT in MODEL_DIR and each mesh of `MESHES`
it builds the sharded state, runs `STEPS` jitted train steps and one eval
step on fixed batches, checks that every array is sharded as the partition
rules say, and saves the losses, predictions and final trainable trees, and
how many collectives the compiled step spends on grouped projections.
"""

import os
import re
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import rmlora_jax as rl
from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import paths as paths_lib
from rmlora_jax import training
from rmlora_jax.data import glue
from rmlora_jax.models import hub
from rmlora_jax.tasks import classification

# (data, fsdp, model); the first is the single-device reference.
MESHES = ((1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2))
METHODS = ("lora", "rm_lora")
STEPS = 3
BATCH, SEQ = 8, 16
QUERY = "encoder/layer_0/attention/query/kernel"


def batches(vocab_size):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS + 1):
    ids = rng.integers(5, vocab_size, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[::2, SEQ // 2:] = 0
    out.append({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                "labels": rng.integers(0, 2, BATCH).astype(np.int32), "weights": np.ones(BATCH, np.float32)})
  return out


def check_sharded_as_rules(tree, specs, mesh, where):
  """Every leaf's sharding is its rule's spec (fitted to the shape)."""
  for (path, leaf), spec in zip(paths_lib.flatten_with_paths(tree).items(), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, P))):
    want = NamedSharding(mesh, partitioning.fit_spec(spec, leaf.shape, mesh))
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (where, path, leaf.sharding, want)


def run(model_dir, method_name, shape):
  mesh = partitioning.make_mesh(dict(zip(partitioning.MESH_AXES, shape)))
  with jax.default_device(partitioning.host_device()):
    module, params, _, hf_config = hub.load_pretrained(model_dir, head="classification", num_labels=2)
  param_specs = partitioning.match_partition_rules(params, partitioning.rules_for(hf_config.model_type))
  params = partitioning.put_sharded(params, partitioning.named_shardings(params, param_specs, mesh))
  settings = methods_lib.MethodSettings(
      name=method_name, spec=rl.LoraSpec(rank=4, alpha=8.0, targets=hub.default_lora_targets(hf_config)),
      train_patterns=(r"classifier/.*",), options=methods_lib.RmOptions(num_directions=2, ortho_weight=0.1), seed=0)
  method = methods_lib.make_method(settings)
  tx = method.optimizer(1e-2)
  state, state_sh = training.init_state(method, tx, params, key=jax.random.key(0), mesh=mesh,
                                        param_specs=param_specs)
  frozen = method.frozen(params)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  task = classification.TextClassification(spec=glue.get_task("sst2"), buckets=(SEQ,))
  step = training.make_train_step(module, method, tx, task, seed=0, mesh=mesh,
                                  state_sharding=state_sh, frozen_sharding=frozen_sh)
  evaluate = training.make_eval_step(module, method, task, mesh=mesh,
                                     trainable_sharding=state_sh.trainable, frozen_sharding=frozen_sh)
  data = batches(hf_config.vocab_size)
  compiled = step.lower(state, frozen, partitioning.put_batch(data[0], mesh)).compile()
  losses = []
  for b in data[:STEPS]:
    state, m = compiled(state, frozen, partitioning.put_batch(b, mesh))
    losses.append(float(m["loss"]))
  # The eval step does not depend on the method: check it once, to save compiles.
  preds = (np.asarray(evaluate(state.trainable, frozen, partitioning.put_batch(data[-1], mesh)))
           if method_name == "lora" else np.zeros(0))

  # The compiled step hands back (and so keeps) everything where the rules put it.
  check_sharded_as_rules(frozen, param_specs, mesh, "frozen")
  for path, sh in paths_lib.flatten_with_paths(state_sh).items():
    leaf = paths_lib.flatten_with_paths(state)[path]
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (path, leaf.sharding, sh)
  fsdp, model = mesh.shape["fsdp"], mesh.shape["model"]
  # Spot checks against the layout written out: q is column-parallel, its
  # adapter's a (rank, d_in) splits d_in over fsdp and b (d_out, rank) d_out
  # over model, Adam's moments alike.
  adapter = state.trainable["adapters"][QUERY]
  assert frozen["encoder"]["layer_0"]["attention"]["query"]["kernel"].addressable_shards[0].data.shape == (
      32 // fsdp, 32 // model)
  assert adapter["a"].addressable_shards[0].data.shape == (4, 32 // fsdp)
  assert adapter["b"].addressable_shards[0].data.shape == (32 // model, 4)
  mu = [x for p, x in paths_lib.flatten_with_paths(state.opt_state).items() if p.endswith(f"mu/adapters/{QUERY}/b")]
  assert mu and mu[0].sharding.is_equivalent_to(adapter["b"].sharding, 2)
  return losses, preds, partitioning.gather(state.trainable), group_collectives(compiled.as_text())


def group_collectives(hlo):
  """Collectives XLA put on BERT's grouped Q/K/V projections (one matmul for the three).

  Column-parallel kernels concatenated end to end move between devices each
  step; laid out shard-major (`low_rank.dense_group_apply`) they need none.
  Counts the ops XLA attributes to the group's concatenations, splits,
  slices and the reshapes of the shard-major layout.
  """
  pattern = re.compile(r"(all-to-all|collective-permute|all-gather)(-start)?\(.*op_name=\"[^\"]*attention/"
                       r"(concatenate|split|slice|reshape|transpose)")
  return sum(1 for line in hlo.splitlines() if pattern.search(line))


def main(model_dir, out):
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for method_name in METHODS:
    for shape in MESHES:
      losses, preds, trainable, moved = run(model_dir, method_name, shape)
      key = f"{method_name}/{'x'.join(map(str, shape))}"
      results[f"{key}/losses"] = np.asarray(losses)
      results[f"{key}/group_collectives"] = np.asarray(moved)
      results[f"{key}/preds"] = preds
      for path, leaf in paths_lib.flatten_with_paths(trainable).items():
        results[f"{key}/trainable/{path}"] = np.asarray(leaf)
      print(key, losses, flush=True)
  np.savez(out, **results)


if __name__ == "__main__":
  main(*sys.argv[1:])
