"""Partition rules cover every model's parameters; derived trees follow; bad meshes fail clearly."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import optax
import pytest
import transformers
from jax.sharding import AbstractMesh, PartitionSpec as P

import rmlora_jax as rl
from rmlora_jax import partitioning
from rmlora_jax import paths as paths_lib
from rmlora_jax.models import hub
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
      partitioning.follow_specs(trainable, params, specs, strict=True, where="trainable"))
  d_in_side, d_out_side = {"lora": ("a", "b"), "sora": ("a", "b"), "adalora": ("q", "p"), "lora2": ("V", "U")}[family]
  # q is column-parallel (d_in over fsdp, d_out over model), the FFN output row-parallel.
  assert follow[f"adapters/{QUERY}/{d_in_side}"] == P(None, "fsdp")
  assert follow[f"adapters/{QUERY}/{d_out_side}"] == P("model", None)
  assert follow[f"adapters/{OUTPUT}/{d_in_side}"] == P(None, "model")
  assert follow[f"adapters/{OUTPUT}/{d_out_side}"] == P("fsdp", None)
  assert follow["head/classifier/kernel"] == P("fsdp", None)
  opt_state = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init, trainable)
  opt = paths_lib.flatten_with_paths(
      partitioning.follow_specs(opt_state, params, specs, strict=False, where="optimizer state"))
  mu = {p: s for p, s in opt.items() if "/mu/" in p}
  assert mu and all(s == follow[p.split("/mu/", 1)[1]] for p, s in mu.items())
  assert all(s == P() for p, s in opt.items() if p.endswith("count"))


def test_leaf_that_follows_no_parameter_is_named():
  params = {"w": {"kernel": np.zeros((4, 6))}}
  specs = {"w": {"kernel": P("fsdp", "model")}}
  with pytest.raises(ValueError, match=r"follow no parameter: adapters/w/kernel/zeta \(2, 4\)"):
    partitioning.follow_specs({"adapters": {"w/kernel": {"zeta": np.zeros((2, 4))}}}, params, specs,
                              strict=True, where="trainable tree")


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
