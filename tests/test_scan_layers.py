"""Decoder layers under `nn.scan`: the same training as unrolled, for every method, adapters per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmlora_jax as rl
from experiments import plan
from rmlora_jax import methods, partitioning, quantize, stacking, training
from rmlora_jax import paths as paths_lib
from rmlora_jax import penalty as penalty_lib
from rmlora_jax.adapters import lora as lora_lib
from rmlora_jax.models import llama

# Three layers, the middle one with a sliding window shorter than the batch.
ARCH = llama.arch_from_hf_config(dict(
    model_type="qwen2", vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    use_sliding_window=True, sliding_window=3, layer_types=["full_attention", "sliding_attention", "full_attention"]))
STEPS, BATCH, SEQ = 8, 4, 9


def batches():
  """One right-padded batch, every step (so the loss must fall)."""
  rng = np.random.default_rng(0)
  mask = (np.arange(SEQ)[None] < rng.integers(4, SEQ + 1, BATCH)[:, None]).astype(np.int32)
  batch = {"input_ids": rng.integers(0, ARCH.vocab_size, (BATCH, SEQ)).astype(np.int32) * mask,
           "attention_mask": mask, "loss_mask": mask, "weights": np.ones(BATCH, np.float32)}
  return [batch] * STEPS


def settings(name):
  targets = llama.DEFAULT_LORA_TARGETS
  spec = {"full_ft": None, "lora2": rl.Lora2Spec(k=2, r=2, alpha=4.0, targets=targets)}.get(
      name, rl.LoraSpec(rank=4, alpha=8.0, targets=targets))
  # Budgets pruned from step 2 to 6, every step, so that pruning happens within the run.
  options = {"rm_lora": methods.RmOptions(num_directions=2), "gm_lora": methods.RmOptions(num_directions=2),
             "adalora": methods.AdaLoraOptions(t_init_ratio=0.25, t_final_ratio=0.25, delta_t=1, target_rank=2),
             "lora2": methods.Lora2Options(t_init_ratio=0.25, t_final_ratio=0.25, delta_t=1)}.get(name)
  return methods.MethodSettings(name=name, spec=spec, seed=3, total_steps=STEPS, adapter_apply="low_rank",
                                options=options)


def train(name, scan, params, split=False):
  module = llama.LlamaForCausalLM(arch=ARCH, scan_layers=scan)
  params = stacking.stack_layers(params) if scan else params
  method = methods.make_method(settings(name))
  tx = method.optimizer(1e-2)
  mesh = training.make_mesh()
  specs = partitioning.match_partition_rules(params, partitioning.rules_for("qwen2"))
  state, shardings = training.init_state(method, tx, params, key=jax.random.key(5), mesh=mesh, param_specs=specs)
  step = training.make_train_step(module, method, tx, plan.NextTokenTask(), seed=0, mesh=mesh,
                                  state_sharding=shardings, split=split)
  losses = []
  for batch in batches():
    state, metrics = step(state, params, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.trainable)


@pytest.fixture(scope="module")
def params():
  ids = jnp.zeros((1, SEQ), jnp.int32)
  return llama.LlamaForCausalLM(arch=ARCH).init(jax.random.key(0), ids)["params"]


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_scanned_training_equals_unrolled(name, params):
  # Unrolled with the one-program step; scanned with what the trainer runs, the
  # gradient and the update as two programs (`training.TrainStep`).
  unrolled_losses, unrolled = train(name, False, params)
  scanned_losses, scanned = train(name, True, params, split=True)
  assert unrolled_losses[-1] < unrolled_losses[0]  # it trained
  np.testing.assert_allclose(scanned_losses, unrolled_losses, rtol=1e-6, atol=1e-6)
  if name == "full_ft":
    scanned = stacking.unstack_layers(scanned)  # full fine-tuning trains the stacked weights themselves
  else:
    # One adapter per layer and matrix, at the unrolled paths, whatever the layout.
    adapters = methods.make_method(settings(name)).adapters(scanned)
    assert len(adapters) == 7 * ARCH.num_layers and all(p.startswith("model/layers_") for p in adapters)
    # Every family stores them stacked over the layers: one per matrix kind.
    assert len(scanned["adapters"]) == 7, sorted(scanned["adapters"])
    scanned = {**scanned, "adapters": adapters}
  flat_s, flat_u = paths_lib.flatten_with_paths(scanned), paths_lib.flatten_with_paths(unrolled)
  assert flat_s.keys() == flat_u.keys()
  for path in flat_u:
    np.testing.assert_allclose(flat_s[path], flat_u[path], rtol=1e-6, atol=1e-6, err_msg=path)


def test_stack_and_unstack_are_inverse_and_refuse_ragged_layers(params):
  stacked = stacking.stack_layers(params)
  assert "layers_0" not in stacked["model"] and stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 16, 24)
  np.testing.assert_array_equal(stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"][1],
                                params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"])
  back = stacking.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  ragged = {"layers_0": {"w": np.zeros(2)}, "layers_2": {"w": np.zeros(2)}}
  with pytest.raises(ValueError, match=r"numbered 0 \.\. L-1, got \[0, 2\]"):
    stacking.stack_layers(ragged)
  with pytest.raises(ValueError, match="layers_1 has shapes other than layers_0's"):
    stacking.stack_layers({"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.zeros(3)}})
  # An NNX list's entries (layers/0, layers/1) are not a stack.
  nnx_like = np.zeros((3, 2))
  assert stacking.layer_view({"layers/0/w": nnx_like}) == {"layers/0/w": nnx_like}


def test_stacked_partition_specs_lead_with_the_layer_axis(params):
  stacked = stacking.stack_layers(params)
  rules = partitioning.rules_for("qwen2")
  P = jax.sharding.PartitionSpec
  specs = paths_lib.flatten_with_paths(partitioning.match_partition_rules(stacked, rules))
  unrolled = paths_lib.flatten_with_paths(partitioning.match_partition_rules(params, rules))
  assert specs["model/layers/self_attn/q_proj/kernel"] == P(None, *unrolled["model/layers_0/self_attn/q_proj/kernel"])
  assert specs["model/layers/mlp/down_proj/kernel"] == P(None, "model", "fsdp")
  assert specs["model/embed_tokens/embedding"] == unrolled["model/embed_tokens/embedding"]


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_quantised_stack_holds_each_layers_own_quantisation(fmt, params):
  # Layer i of the quantised stack is the quantised kernel of layer i (same values, same scales).
  spec = quantize.QuantizeSpec(format=fmt, block_size=8 if fmt == "nf4" else -1)
  unrolled = quantize.quantize_base(params, spec)
  stacked = quantize.quantize_base(stacking.stack_layers(params), spec)
  for i in range(ARCH.num_layers):
    want = unrolled["model"][f"layers_{i}"]["mlp"]["down_proj"]["kernel"]
    got = stacked["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got.qvalue[i]).astype(np.float32), np.asarray(want.qvalue).astype(np.float32))
    np.testing.assert_array_equal(got.scale[i], want.scale)
  ids = np.asarray(batches()[0]["input_ids"])
  np.testing.assert_allclose(llama.LlamaForCausalLM(arch=ARCH, scan_layers=True).apply({"params": stacked}, ids),
                             llama.LlamaForCausalLM(arch=ARCH).apply({"params": unrolled}, ids), atol=1e-5)
  with pytest.raises(ValueError, match="some layers of 'model/layers/mlp/up_proj/kernel' but not all"):
    quantize.quantize_base(stacking.stack_layers(params),
                           quantize.QuantizeSpec(format="int8", targets=(r"model/layers_0/mlp/up_proj/kernel",)))


def test_adapters_on_some_layers_only_give_the_unrolled_logits(params):
  # Layer 1's down projection alone: attach stacks zeros for layers 0 and 2, merge adds nothing there.
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=(r"model/layers_1/mlp/down_proj/kernel",))
  stacked = stacking.stack_layers(params)
  adapters = rl.init_lora(jax.random.key(1), stacked, spec)
  assert list(adapters) == ["model/layers_1/mlp/down_proj/kernel"]
  adapters = jax.tree.map(lambda x: x + 0.3, adapters)  # b off zero, so the update shows
  ids = np.asarray(batches()[0]["input_ids"])
  unrolled = llama.LlamaForCausalLM(arch=ARCH).apply({"params": rl.merge(params, adapters, spec)}, ids)
  assert np.abs(unrolled - llama.LlamaForCausalLM(arch=ARCH).apply({"params": params}, ids)).max() > 1e-3
  scanned = llama.LlamaForCausalLM(arch=ARCH, scan_layers=True)
  for combine in (rl.attach, rl.merge):
    np.testing.assert_allclose(scanned.apply({"params": combine(stacked, adapters, spec)}, ids), unrolled, atol=1e-5)
  merged = rl.merge(stacked, adapters, spec)["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(merged[0], stacked["model"]["layers"]["mlp"]["down_proj"]["kernel"][0])


def test_adapters_stacked_over_layers_round_trip_and_keep_partial_stacks(params):
  stacked_params = stacking.stack_layers(params)
  lengths = lora_lib.stack_lengths(stacked_params)
  assert lengths["model/layers/self_attn/q_proj/kernel"] == ARCH.num_layers
  rng = np.random.default_rng(0)
  per_layer = {f"model/layers_{i}/self_attn/{m}_proj/kernel": {"a": rng.normal(size=(2, 16)),
                                                               "b": rng.normal(size=(8 if m == "k" else 16, 2))}
               for i in range(ARCH.num_layers) for m in ("q", "k")}
  del per_layer["model/layers_1/self_attn/k_proj/kernel"]  # k_proj not on every layer: kept per layer
  stacked = stacking.stack_adapters(per_layer, lengths)
  assert sorted(stacked) == ["model/layers/self_attn/q_proj/kernel", "model/layers_0/self_attn/k_proj/kernel",
                             "model/layers_2/self_attn/k_proj/kernel"]
  np.testing.assert_array_equal(stacked["model/layers/self_attn/q_proj/kernel"]["b"][2],
                                per_layer["model/layers_2/self_attn/q_proj/kernel"]["b"])
  back = stacking.unstack_adapters(stacked)
  assert back.keys() == per_layer.keys()
  jax.tree.map(np.testing.assert_array_equal, back, per_layer)
  again = stacking.restack_like(back, stacked)
  assert again.keys() == stacked.keys()
  jax.tree.map(np.testing.assert_array_equal, again, stacked)
  # A per-layer adapter under a module that is merely named "layers" is no stack.
  plain = {"layers/Dense_0/kernel": {"a": np.ones((2, 4)), "b": np.ones((3, 2))}}
  assert stacking.unstack_adapters(plain) == plain
  # A stacked factor is sharded as its stacked kernel: the layer axis first, replicated.
  specs = partitioning.match_partition_rules(stacked_params, partitioning.rules_for("qwen2"))
  flat_specs = paths_lib.flatten_with_paths(specs)
  shapes = {p: np.shape(x) for p, x in paths_lib.flatten_with_paths(stacked_params).items()}
  kernel = "model/layers/self_attn/q_proj/kernel"
  P = jax.sharding.PartitionSpec
  d_in_spec = tuple(flat_specs[kernel])[1]
  assert partitioning.follow_spec(f"adapters/{kernel}/a", (3, 2, 16), flat_specs, shapes) == P(None, None, d_in_spec)
  assert partitioning.follow_spec(f"adapters/{kernel}/a", (4, 2, 16), flat_specs, shapes) is None  # not 3 layers


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_penalty_of_a_stack_is_its_layers_penalties(reduction):
  rng = np.random.default_rng(1)
  a, b, other = rng.normal(size=(3, 4, 10)), rng.normal(size=(3, 12, 4)), rng.normal(size=(4, 10))
  def dev(x):  # ||x x^T - I||_F^2 in NumPy, rank on the first axis
    g = x @ x.T
    return np.sum((g - np.eye(len(g))) ** 2)
  terms = [dev(a[i]) for i in range(3)] + [dev(b[i].T) for i in range(3)] + [dev(other)]
  want = np.sum(terms) / (len(terms) if reduction == "mean" else 1)
  got = penalty_lib.gram_deviations([(jnp.asarray(a), 0), (jnp.asarray(b), 1), (jnp.asarray(other), 0)],
                           squared=True, reduction=reduction)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_a_stacks_masks_are_its_layers_draws():
  from rmlora_jax import masking  # pylint: disable=g-import-not-at-top
  rank, r_hat, layers = 6, 2, 3
  tree = {"adapters": {"model/layers/mlp/up_proj/kernel": {"a": jnp.ones((layers, rank, 5)),
                                                           "b": jnp.ones((layers, 7, rank))},
                       "model/layers_0/other/kernel": {"a": jnp.ones((rank, 5)), "b": jnp.ones((7, rank))}}}
  tx = masking.random_direction_mask(r_hat, seed=4, independent=True)
  state = tx.init(tree)
  for step in range(3):
    out, state = tx.update(tree, state)
    stack = out["adapters"]["model/layers/mlp/up_proj/kernel"]
    for i in range(layers):
      path = f"adapters/model/layers_{i}/mlp/up_proj/kernel"
      rows = masking.direction_mask(4, step, path, rank, r_hat, factor="a", independent=True)
      cols = masking.direction_mask(4, step, path, rank, r_hat, factor="b", independent=True)
      np.testing.assert_array_equal(stack["a"][i], np.broadcast_to(np.asarray(rows)[:, None], (rank, 5)))
      np.testing.assert_array_equal(stack["b"][i], np.broadcast_to(np.asarray(cols)[None, :], (7, rank)))
    alone = masking.direction_mask(4, step, "adapters/model/layers_0/other/kernel", rank, r_hat, factor="a",
                                   independent=True)
    np.testing.assert_array_equal(out["adapters"]["model/layers_0/other/kernel"]["a"][:, 0], alone)
