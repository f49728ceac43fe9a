"""Partition rules cover every model's parameters; derived trees follow; bad meshes fail clearly."""

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import rmlora_jax as rl
from rmlora_jax import methods as methods_lib
from rmlora_jax import partitioning
from rmlora_jax import paths as paths_lib
from rmlora_jax.models import hub
from tests import optimizer_state_shardings as placed
from tests.models.test_deberta_v2 import C2P_ONLY, V2, V3
from tests.models.test_vit import SMALL

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            vocab_size=99, max_position_embeddings=64)
QUERY = "encoder/layer_0/attention/query/kernel"
OUTPUT = "encoder/layer_1/output/kernel"

CONFIGS = {
    "bert": lambda: transformers.BertConfig(**TINY),
    "roberta": lambda: transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1),
    "deberta-v3": lambda: transformers.DebertaV2Config(**V3),
    "deberta-v2": lambda: transformers.DebertaV2Config(**V2),  # embed_proj, conv, pos_key/pos_query
    "deberta-c2p": lambda: transformers.DebertaV2Config(**C2P_ONLY),
    "vit": lambda: transformers.ViTConfig(**SMALL),
}
HEADS = {"vit": ("base", "image_classification")}


def abstract_params(hf_config, head):
  arch = hub.architecture(hf_config.model_type)
  module = arch.module_from_hf_config(hf_config, head=head, num_labels={"regression": 1, "qa": 2}.get(head, 3))
  key = jax.random.key(0)
  return jax.eval_shape(module.init, {"params": key, "dropout": key}, **arch.dummy_inputs(hf_config))["params"]


def mesh(data=1, fsdp=1, model=1):
  return AbstractMesh((data, fsdp, model), partitioning.MESH_AXES)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rules_cover_every_parameter_of_every_model(name):
  hf_config = CONFIGS[name]()
  rules = partitioning.rules_for(hf_config.model_type)
  for head in HEADS.get(name, ("base", "classification", "regression", "qa")):
    params = abstract_params(hf_config, head)
    specs = paths_lib.flatten_with_paths(partitioning.match_partition_rules(params, rules))
    assert set(specs) == set(paths_lib.flatten_with_paths(params))
    assert specs[QUERY] == P("fsdp", "model")
    assert specs[OUTPUT] == P("model", "fsdp")


def test_uncovered_parameter_is_named():
  params = {"encoder": {"layer_0": {"attention": {"query": {"kernel": np.zeros((4, 4))}}},
                        "mystery": {"kernel": np.zeros((4, 4))}}}
  with pytest.raises(ValueError, match=r"no rule covers 1 parameter\(s\): encoder/mystery/kernel \(4, 4\)"):
    partitioning.match_partition_rules(params, partitioning.rules_for("bert"))


def test_unknown_model_type_and_oversized_spec_fail():
  with pytest.raises(ValueError, match=r"no partition rules for model_type 'gpt2'"):
    partitioning.rules_for("gpt2")
  with pytest.raises(ValueError, match=r"more entries than the parameter has dimensions"):
    partitioning.match_partition_rules({"w": np.zeros(3)}, [(r"w", P("fsdp", "model"))])


def test_axes_that_do_not_divide_a_dimension_are_dropped():
  m = mesh(2, 2, 4)
  assert partitioning.fit_spec(P("model", "fsdp"), (31, 32), m) == P(None, "fsdp")
  assert partitioning.fit_spec(P(("fsdp", "model"),), (4, 8), m) == P("fsdp")
  assert partitioning.fit_spec(P("fsdp", "model"), (32, 48), m) == P("fsdp", "model")


@pytest.mark.parametrize("family", ["lora", "adalora", "sora", "lora2"])
def test_adapters_and_optimizer_state_follow_their_kernel(family):
  params = abstract_params(CONFIGS["bert"](), "classification")
  specs = partitioning.match_partition_rules(params, partitioning.rules_for("bert"))
  targets = hub.default_lora_targets(CONFIGS["bert"]())
  spec = (rl.Lora2Spec(k=8, r=4, alpha=8.0, targets=targets) if family == "lora2"
          else rl.LoraSpec(rank=4, alpha=8.0, targets=targets))
  init = {"lora": rl.init_lora, "adalora": rl.init_adalora, "sora": rl.init_sora, "lora2": rl.init_lora2}[family]
  trainable = jax.eval_shape(lambda k: {"adapters": init(k, params, spec),
                                        "head": {"classifier/kernel": params["classifier"]["kernel"]}},
                             jax.random.key(0))
  follow = paths_lib.flatten_with_paths(
      partitioning.follow_specs(trainable, params, specs, where="trainable"))
  d_in_side, d_out_side = {"lora": ("a", "b"), "sora": ("a", "b"), "adalora": ("q", "p"), "lora2": ("V", "U")}[family]
  # q is column-parallel (d_in over fsdp, d_out over model), the FFN output row-parallel.
  assert follow[f"adapters/{QUERY}/{d_in_side}"] == P(None, "fsdp")
  assert follow[f"adapters/{QUERY}/{d_out_side}"] == P("model", None)
  assert follow[f"adapters/{OUTPUT}/{d_in_side}"] == P(None, "model")
  assert follow[f"adapters/{OUTPUT}/{d_out_side}"] == P("fsdp", None)
  assert follow["head/classifier/kernel"] == P("fsdp", None)


def test_leaf_that_follows_no_parameter_is_named():
  params = {"w": {"kernel": np.zeros((4, 6))}}
  specs = {"w": {"kernel": P("fsdp", "model")}}
  with pytest.raises(ValueError, match=r"follow no parameter: adapters/w/kernel/zeta \(2, 4\)"):
    partitioning.follow_specs({"adapters": {"w/kernel": {"zeta": np.zeros((2, 4))}}}, params, specs,
                              where="trainable tree")


def test_mesh_shape_fills_the_rest_and_checks_the_device_count():
  assert partitioning.mesh_shape({"data": -1, "fsdp": 2, "model": 2}, 8) == {"data": 2, "fsdp": 2, "model": 2}
  assert partitioning.mesh_shape({"data": 2}, 8) == {"data": 2, "fsdp": 1, "model": 1}
  with pytest.raises(ValueError, match=r"the mesh size 3 does not divide the 8 devices"):
    partitioning.mesh_shape({"data": 3, "fsdp": 1, "model": 1}, 8)
  with pytest.raises(ValueError, match=r"only one axis may be -1"):
    partitioning.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match=r"config.mesh.model must be -1 .* or a positive integer, got 0"):
    partitioning.mesh_shape({"model": 0}, 8)
  with pytest.raises(ValueError, match=r"unknown axes \['tensor'\]"):
    partitioning.mesh_shape({"tensor": 2}, 8)


def test_batch_must_divide_over_the_data_axes():
  partitioning.check_batch_size(8, mesh(2, 2, 2))
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the 4 batch shards .*data=2 x fsdp=2"):
    partitioning.check_batch_size(6, mesh(2, 2, 2))


# --------------------------------------------------------------------------- optimizer state

# Fields of optimizer states that hold a copy of the trainable tree: Adam's
# moments, momentum's trace, the budget pruning's statistics and keep-pattern.
MIRRORS = ("mu", "nu", "trace", "ipt_by_param", "unc_by_param", "keep_by_param")
OPTIMIZER_METHODS = ["full_ft", "lora", "rm_lora", "adalora", "lora2", "sora"]


def entries(spec):
  """A spec's entries without trailing Nones (``P("model")`` and ``P("model", None)`` agree)."""
  out = list(spec)
  while out and out[-1] is None:
    out.pop()
  return [e if e is None or isinstance(e, str) else list(e) for e in out]


def expected_state_specs(state, trainable_specs):
  """The reference: a leaf at ``.../<one of MIRRORS>/<trainable path>`` takes that path's spec, all else P().

  Returns:
    ``({state path: spec}, number of leaves that follow a trainable leaf)``.
  """
  specs = paths_lib.flatten_with_paths(trainable_specs)
  out, mirrored = {}, 0
  for path in paths_lib.flatten_with_paths(state):
    parts = path.split("/")
    hits = ["/".join(parts[i + 1:]) for i, part in enumerate(parts) if part in MIRRORS]
    hits = [h for h in hits if h in specs]
    out[path] = specs[hits[-1]] if hits else P()
    mirrored += bool(hits)
  return out, mirrored


def expected_mirror_count(name, trainable):
  """How many state leaves copy a trainable leaf, counted from each method's optimizer by hand."""
  n = len(jax.tree.leaves(trainable))
  adapters = len(trainable.get("adapters", {}))
  return {
      "full_ft": 2 * n, "lora": 2 * n, "rm_lora": 2 * n,  # AdamW's mu and nu
      # ... plus I and U of the 3 scored factors and the keep-pattern at lam, per adapter.
      "adalora": 2 * n + 7 * adapters, "lora2": 2 * n + 7 * adapters,
      "sora": 2 * (n - adapters),  # AdamW on all but the gates; the gates' SGD keeps no copy
  }[name]


def bert_method(name):
  cfg = CONFIGS["bert"]()
  targets = hub.default_lora_targets(cfg)
  spec = None if name == "full_ft" else (
      rl.Lora2Spec(k=8, r=4, alpha=8.0, targets=targets) if name == "lora2"
      else rl.LoraSpec(rank=4, alpha=8.0, targets=targets))
  options = {"rm_lora": methods_lib.RmOptions(num_directions=2), "adalora": methods_lib.AdaLoraOptions(target_rank=2),
             "lora2": methods_lib.Lora2Options(target_rank=2)}.get(name)
  return methods_lib.make_method(methods_lib.MethodSettings(
      name=name, spec=spec, train_patterns=(r"classifier/.*",), total_steps=100, options=options))


@pytest.mark.parametrize("name", OPTIMIZER_METHODS)
def test_optimizer_state_copies_of_a_parameter_follow_it_the_rest_is_replicated(name):
  params = abstract_params(CONFIGS["bert"](), "classification")
  param_specs = partitioning.match_partition_rules(params, partitioning.rules_for("bert"))
  method = bert_method(name)
  tx = method.optimizer(optax.linear_schedule(1e-3, 0.0, 100))
  trainable = jax.eval_shape(method.init, jax.random.key(0), params)
  m = mesh(2, 2, 2)
  # Fitted to the mesh: the word embeddings' 99 rows are not split over "model".
  trainable_shardings = partitioning.named_shardings(
      trainable, partitioning.follow_specs(trainable, params, param_specs, where="trainable"), m)
  got = partitioning.optimizer_shardings(tx, trainable, trainable_shardings, m)
  state = jax.eval_shape(tx.init, trainable)
  # The exact structure of the state (optax.MaskedNode included), as jit's out_shardings needs.
  assert jax.tree.structure(got) == jax.tree.structure(state)
  want, mirrored = expected_state_specs(state, jax.tree.map(lambda s: s.spec, trainable_shardings))
  assert mirrored == expected_mirror_count(name, trainable)
  got = paths_lib.flatten_with_paths(got)
  assert {p: entries(s.spec) for p, s in got.items()} == {p: entries(s) for p, s in want.items()}
  # An adapter's moment is split like its kernel's d_in; a step count is replicated.
  factor = {"full_ft": "params/" + QUERY, "adalora": f"adapters/{QUERY}/q", "lora2": f"adapters/{QUERY}/V"}.get(
      name, f"adapters/{QUERY}/a")
  assert [entries(s.spec) for p, s in got.items() if p.endswith("/mu/" + factor)] == [
      ["fsdp", "model"] if name == "full_ft" else [None, "fsdp"]]
  assert all(entries(s.spec) == [] for p, s in got.items() if p.endswith("count"))


def test_optimizer_state_of_another_shape_is_replicated_and_masked_parts_kept():
  tree = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32), "b": jax.ShapeDtypeStruct((16,), jnp.float32)}
  m = mesh(2, 2, 2)
  shardings = {"w": NamedSharding(m, P("fsdp", "model")), "b": NamedSharding(m, P("model"))}
  # Adafactor keeps parameter-shaped trees of factored moments: w's are (8,) and (16,) and
  # its full moment a (1,) dummy; b is not factored, so only its full moment is (16,).
  adafactor = optax.adafactor(1e-3, min_dim_size_to_factor=4)
  got = paths_lib.flatten_with_paths(partitioning.optimizer_shardings(adafactor, tree, shardings, m))
  assert {p: entries(s.spec) for p, s in got.items()} == {
      "0/count": [], "0/v_row/b": [], "0/v_row/w": [], "0/v_col/b": [], "0/v_col/w": [],
      "0/v/b": ["model"], "0/v/w": []}
  # optax.masked leaves a MaskedNode where b's moments would be; momentum's trace covers both.
  tx = optax.chain(optax.masked(optax.adam(1e-3), {"w": True, "b": False}), optax.sgd(0.1, momentum=0.9))
  out = partitioning.optimizer_shardings(tx, tree, shardings, m)
  assert jax.tree.structure(out) == jax.tree.structure(jax.eval_shape(tx.init, tree))
  assert isinstance(out[0].inner_state[0].mu["b"], optax.MaskedNode)
  assert {p: entries(s.spec) for p, s in paths_lib.flatten_with_paths(out).items()} == {
      "0/inner_state/0/count": [], "0/inner_state/0/mu/w": ["fsdp", "model"], "0/inner_state/0/nu/w": ["fsdp", "model"],
      "1/0/trace/b": ["model"], "1/0/trace/w": ["fsdp", "model"]}


def test_optimizer_shardings_must_match_the_trainable_tree():
  tree = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
  m = mesh(2, 2, 2)
  with pytest.raises(ValueError, match=r"optimizer_shardings: trainable_shardings must have the trainable tree's"):
    partitioning.optimizer_shardings(optax.adam(1e-3), tree, {"v": NamedSharding(m, P())}, m)


def _rejects_empty_trees(params):
  if not jax.tree.leaves(params):
    raise ValueError("no parameters")
  return optax.EmptyState()


def _regroups_by_path(params):
  return {p: jnp.zeros(np.shape(x)) for p, x in paths_lib.flatten_with_paths(params).items()}


@pytest.mark.parametrize("init", [_rejects_empty_trees, _regroups_by_path])
def test_a_state_tree_map_params_cannot_read_is_an_error(init):
  tree = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
  m = mesh(2, 2, 2)
  tx = optax.chain(optax.adam(1e-3), optax.GradientTransformation(init, lambda u, s, p=None: (u, s)))
  with pytest.raises(ValueError, match=r"optimizer_shardings: optax.tree_map_params could not find"):
    partitioning.optimizer_shardings(tx, tree, {"w": NamedSharding(m, P("fsdp"))}, m)


@pytest.fixture(scope="module")
def placed_on_8_devices(tmp_path_factory):
  """`tests.optimizer_state_shardings` run once with 8 fake CPU devices."""
  out = tmp_path_factory.mktemp("placed") / "states.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-m", "tests.optimizer_state_shardings", str(out)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("name", OPTIMIZER_METHODS)
def test_optimizer_state_is_placed_split_on_8_devices(name, placed_on_8_devices):
  result = placed_on_8_devices[name]
  if "error" in result:
    raise ValueError(result["error"])
  params = placed.small_params()
  param_specs = partitioning.match_partition_rules(params, partitioning.rules_for("bert"))
  method = placed.make_method(name)
  trainable = jax.eval_shape(method.init, jax.random.key(0), params)
  trainable_shardings = partitioning.named_shardings(
      trainable, partitioning.follow_specs(trainable, params, param_specs, where="trainable"), mesh(2, 2, 2))
  want, mirrored = expected_state_specs(jax.eval_shape(method.optimizer(1e-3).init, trainable),
                                        jax.tree.map(lambda s: s.spec, trainable_shardings))
  assert mirrored == expected_mirror_count(name, trainable)
  leaves = result["leaves"]
  assert {p: spec for p, (spec, _, _) in leaves.items()} == {p: entries(s) for p, s in want.items()}
  # Each device holds 1/2 of a dimension per mesh axis of its spec entry (every axis has size 2).
  for path, (spec, shard, shape) in leaves.items():
    spec = spec + [None] * (len(shape) - len(spec))
    assert shard == [n // 2 ** (0 if e is None else 1 if isinstance(e, str) else len(e)) for n, e in zip(shape, spec)], path
  assert any(shard != shape for _, shard, shape in leaves.values())


def test_column_shards_is_the_model_axis_of_the_mesh_being_traced_under():
  assert partitioning.column_shards() == 1
  mesh = jax.sharding.AbstractMesh((1, 2, 4), partitioning.MESH_AXES)
  with jax.sharding.use_abstract_mesh(mesh):
    assert partitioning.column_shards() == 4
  # The train and eval steps trace under their mesh: a model sees its shape.
  seen = []
  traced = partitioning.under_mesh(partitioning.make_mesh({"data": 1, "fsdp": 1, "model": 1}),
                                   lambda x: seen.append(jax.sharding.get_abstract_mesh().axis_names) or x)
  jax.jit(traced)(1.0)
  assert seen == [partitioning.MESH_AXES]
