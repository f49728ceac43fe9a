"""LoRA specification, initialisation, updates and merging against NumPy."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmlora_jax as rl
from rmlora_jax import low_rank


def _params():
  rng = np.random.default_rng(0)
  return {
      "encoder": {
          "layer_0": {
              "query": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                        "bias": jnp.zeros(5)},
              "value": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
          },
          "norm": {"scale": jnp.ones(6)},
      },
      "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
  }


SPEC = rl.LoraSpec(rank=3, alpha=6.0, targets=(r"encoder/.*/(query|value)/kernel",))


def test_init_shapes_layout_and_statistics():
  params = _params()
  spec = rl.LoraSpec(rank=3, alpha=6.0, targets=SPEC.targets, init_std=0.5)
  adapters = rl.init_lora(jax.random.key(0), params, spec)
  assert set(adapters) == {"encoder/layer_0/query/kernel", "encoder/layer_0/value/kernel"}
  q = adapters["encoder/layer_0/query/kernel"]
  assert q["a"].shape == (3, 6) and q["b"].shape == (5, 3)
  assert adapters["encoder/layer_0/value/kernel"]["b"].shape == (4, 3)
  np.testing.assert_array_equal(q["b"], 0.0)
  # Each adapter gets its own key: the two `a`s differ.
  a_v = adapters["encoder/layer_0/value/kernel"]["a"]
  assert not np.allclose(q["a"], a_v)
  # The std of `a` is init_std (loose: 36 samples over both adapters).
  big = rl.init_lora(jax.random.key(1), {"w": jnp.zeros((400, 300))},
                     rl.LoraSpec(rank=50, alpha=1.0, targets=("w",), init_std=0.5))
  assert abs(float(jnp.std(big["w"]["a"])) - 0.5) < 0.01
  assert abs(float(jnp.mean(big["w"]["a"]))) < 0.01


def test_kaiming_uniform_init_is_pytorch_linear_default():
  # PyTorch's Linear (and PEFT's lora_A) use kaiming_uniform_(a=sqrt(5)):
  # bound = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)).
  d_in, rank = 384, 64
  bound = np.sqrt(2.0 / (1.0 + 5.0)) * np.sqrt(3.0 / d_in)
  spec = rl.LoraSpec(rank=rank, alpha=1.0, targets=("w",), init="kaiming_uniform", init_std=7.0)
  a = np.asarray(rl.init_lora(jax.random.key(2), {"w": jnp.zeros((d_in, 96))}, spec)["w"]["a"])
  assert a.shape == (rank, d_in)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.99 * bound  # fills the interval (24,576 draws)
  assert abs(a.std() - bound / np.sqrt(3.0)) < 0.01 * bound  # uniform, not init_std's Gaussian
  with pytest.raises(ValueError, match="init must be one of"):
    rl.LoraSpec(rank=1, alpha=1.0, targets=("w",), init="xavier")


def test_init_is_a_function_of_key_and_path():
  params = _params()
  a1 = rl.init_lora(jax.random.key(0), params, SPEC)
  a2 = rl.init_lora(jax.random.key(0), params, SPEC)
  chex.assert_trees_all_equal(a1, a2)
  # Adding a target leaves the other adapters' initial values as they were.
  wider = rl.LoraSpec(rank=3, alpha=6.0, targets=SPEC.targets + ("head/kernel",))
  a3 = rl.init_lora(jax.random.key(0), params, wider)
  chex.assert_trees_all_equal(a3["encoder/layer_0/query/kernel"], a1["encoder/layer_0/query/kernel"])
  a4 = rl.init_lora(jax.random.key(1), params, SPEC)
  assert not np.allclose(a4["encoder/layer_0/query/kernel"]["a"], a1["encoder/layer_0/query/kernel"]["a"])


def test_init_works_on_shapes_only():
  shapes = jax.eval_shape(_params)
  out = jax.eval_shape(lambda: rl.init_lora(jax.random.key(0), shapes, SPEC))
  assert out["encoder/layer_0/query/kernel"]["a"].shape == (3, 6)


def _random_adapters(params, spec, seed=0):
  rng = np.random.default_rng(seed)
  ads = rl.init_lora(jax.random.key(0), params, spec)
  return {p: {"a": jnp.asarray(rng.normal(size=ad["a"].shape), jnp.float32),
              "b": jnp.asarray(rng.normal(size=ad["b"].shape), jnp.float32)}
          for p, ad in ads.items()}


def test_delta_and_merge_match_numpy():
  params = _params()
  adapters = _random_adapters(params, SPEC)
  deltas = rl.delta_weights(adapters, SPEC)
  merged = jax.jit(rl.merge)(params, adapters, SPEC)
  for path, ad in adapters.items():
    a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
    expected = (6.0 / 3) * b @ a
    np.testing.assert_allclose(deltas[path], expected, rtol=1e-5, atol=1e-5)
    node = merged["encoder"]["layer_0"][path.split("/")[2]]["kernel"]
    w0 = params["encoder"]["layer_0"][path.split("/")[2]]["kernel"]
    np.testing.assert_allclose(node, np.asarray(w0) + expected.T, rtol=1e-5, atol=1e-5)
  # Leaves without adapters are untouched.
  chex.assert_trees_all_equal(merged["head"], params["head"])
  chex.assert_trees_all_equal(merged["encoder"]["norm"], params["encoder"]["norm"])
  chex.assert_trees_all_equal(merged["encoder"]["layer_0"]["query"]["bias"],
                              params["encoder"]["layer_0"]["query"]["bias"])


def test_merge_gradient_matches_closed_form():
  # d/d a of sum(x @ (W0 + s (b a)^T)) = s * b^T 1 (x^T 1)^T ... checked numerically against NumPy.
  params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)}
  spec = rl.LoraSpec(rank=2, alpha=3.0, targets=("w",))
  ads = _random_adapters(params, spec, seed=2)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)), jnp.float32)

  def f(a):
    return jnp.sum(x @ rl.merge(params, a, spec)["w"])

  g = jax.grad(f)(ads)
  s = 3.0 / 2
  xs = np.asarray(x, np.float64).sum(0)           # (d_in,)
  ones = np.ones(3)                                 # (d_out,)
  a, b = np.asarray(ads["w"]["a"], np.float64), np.asarray(ads["w"]["b"], np.float64)
  # f = s * xs^T (b a)^T ones = s * ones^T b a xs
  np.testing.assert_allclose(g["w"]["a"], s * np.outer(b.T @ ones, xs), rtol=1e-4)
  np.testing.assert_allclose(g["w"]["b"], s * np.outer(ones, a @ xs), rtol=1e-4)


def test_merged_model_equals_base_model_at_init():
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  spec = rl.LoraSpec(rank=2, alpha=8.0, targets=(r"layers_\d+/kernel",))
  adapters = rl.init_lora(jax.random.key(1), params, spec)
  assert len(adapters) == 2
  base = model.apply({"params": params}, x)
  merged = model.apply({"params": rl.merge(params, adapters, spec)}, x)
  np.testing.assert_array_equal(base, merged)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match=r"LoraSpec.rank must be a positive integer"):
    rl.LoraSpec(rank=rank, alpha=1.0, targets=("w",))


def test_rank_larger_than_matrix():
  with pytest.raises(ValueError, match=r"rank=5 exceeds min\(d_in, d_out\)=4 of 'encoder/layer_0/value/kernel'"):
    rl.init_lora(jax.random.key(0), _params(), rl.LoraSpec(rank=5, alpha=1.0, targets=SPEC.targets))


def test_pattern_matching_nothing_names_pattern_and_paths():
  spec = rl.LoraSpec(rank=2, alpha=1.0, targets=(r".*/query/kernel", r".*/qkv/kernel"))
  with pytest.raises(ValueError, match=r"pattern '\.\*/qkv/kernel' matches no parameter path.*'encoder/layer_0/query/kernel'"):
    rl.init_lora(jax.random.key(0), _params(), spec)


def test_pattern_must_fully_match():
  # "query" alone is a substring of the path but not a full match.
  with pytest.raises(ValueError, match=r"pattern 'query' matches no parameter path"):
    rl.init_lora(jax.random.key(0), _params(), rl.LoraSpec(rank=2, alpha=1.0, targets=("query",)))


def test_non_2d_leaf():
  spec = rl.LoraSpec(rank=1, alpha=1.0, targets=(r"encoder/layer_0/query/.*",))
  with pytest.raises(ValueError, match=r"'encoder/layer_0/query/bias' with shape \(5,\).*only 2-D"):
    rl.init_lora(jax.random.key(0), _params(), spec)


def test_bad_spec_fields():
  with pytest.raises(ValueError, match="targets must be a tuple"):
    rl.LoraSpec(rank=1, alpha=1.0, targets="w")
  with pytest.raises(ValueError, match="invalid regex"):
    rl.LoraSpec(rank=1, alpha=1.0, targets=("(",))
  with pytest.raises(ValueError, match="targets is empty"):
    rl.LoraSpec(rank=1, alpha=1.0, targets=())
  with pytest.raises(ValueError, match="alpha must be a finite number"):
    rl.LoraSpec(rank=1, alpha=float("nan"), targets=("w",))
  with pytest.raises(ValueError, match="init_std must be >= 0"):
    rl.LoraSpec(rank=1, alpha=1.0, targets=("w",), init_std=-0.1)


def test_merge_rejects_misfit_adapters():
  params = _params()
  adapters = rl.init_lora(jax.random.key(0), params, SPEC)
  wrong = dict(adapters)
  wrong["encoder/layer_0/query/kernel"] = {"a": jnp.zeros((3, 7)), "b": jnp.zeros((5, 3))}
  with pytest.raises(ValueError, match=r"'encoder/layer_0/query/kernel'.*\(5, 7\).*\(6, 5\)"):
    rl.merge(params, wrong, SPEC)
  stray = dict(adapters)
  stray["encoder/layer_9/query/kernel"] = adapters["encoder/layer_0/query/kernel"]
  with pytest.raises(ValueError, match=r"'encoder/layer_9/query/kernel' is not a parameter path"):
    rl.merge(params, stray, SPEC)
  with pytest.raises(ValueError, match=r"factors \['a', 'c'\].*match no known"):
    rl.merge(params, {"head/kernel": {"a": jnp.zeros((1, 4)), "c": jnp.zeros(1)}}, SPEC)


def test_spec_passes_through_jit_as_static():
  traces = []

  @jax.jit
  def f(params, adapters, spec):
    traces.append(1)
    return rl.merge(params, adapters, spec)

  params = _params()
  adapters = rl.init_lora(jax.random.key(0), params, SPEC)
  f(params, adapters, SPEC)
  f(params, adapters, SPEC)
  assert len(traces) == 1


@pytest.mark.parametrize("family", ["lora", "adalora", "sora", "lora2"])
def test_attach_low_rank_path_equals_merge(family):
  """x W0 + (x right^T) left^T through attach == x (W0 + dW^T), values and gradients."""
  from rmlora_jax.adapters import adalora, lora2, sora
  from tests.family_reference import random_like

  rng = np.random.default_rng(0)
  params = {"enc": {"kernel": jnp.asarray(rng.normal(size=(9, 7)), jnp.float32)},
            "other": jnp.ones((3,))}
  targets = (r"enc/kernel",)
  spec = (lora2.Lora2Spec(k=4, r=3, alpha=6.0, targets=targets) if family == "lora2"
          else rl.LoraSpec(rank=4, alpha=6.0, targets=targets))
  init = {"lora": rl.init_lora, "adalora": adalora.init_adalora, "sora": sora.init_sora,
          "lora2": lora2.init_lora2}[family]
  ads = jax.tree.map(jnp.asarray, random_like(init(jax.random.key(0), params, spec), 1))
  x = jnp.asarray(rng.normal(size=(2, 5, 9)), jnp.float32)

  attached = rl.attach(params, ads, spec)
  kernel = attached["enc"]["kernel"]
  assert isinstance(kernel, rl.LowRankKernel) and kernel.shape == (9, 7)
  assert attached["other"] is params["other"]
  merged = rl.merge(params, ads, spec)
  chex.assert_trees_all_close(kernel.merged(), merged["enc"]["kernel"], rtol=1e-5, atol=1e-5)

  def loss(a, combine):
    y = rl.dense_apply(x, combine(params, a, spec)["enc"]["kernel"])
    return jnp.sum(jnp.sin(y))

  low, g_low = jax.value_and_grad(loss)(ads, rl.attach)
  ref, g_ref = jax.value_and_grad(loss)(ads, rl.merge)
  np.testing.assert_allclose(low, ref, rtol=1e-5)
  chex.assert_trees_all_close(g_low, g_ref, rtol=1e-4, atol=1e-4)


def test_attach_rejects_a_misfit_adapter():
  params = {"w": jnp.ones((4, 3))}
  ads = {"w": {"a": jnp.ones((2, 3)), "b": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match=r"attach: adapter at 'w' gives an update"):
    rl.attach(params, ads, rl.LoraSpec(rank=2, alpha=1.0, targets=("w",)))


def _low_plain_low_group(seed, x_shape, widths, ranks):
  """Random inputs and a group [low-rank, plain, low-rank], with each output computed in NumPy."""
  rng = np.random.default_rng(seed)
  d_in = x_shape[-1]
  x = rng.normal(size=x_shape).astype(np.float32)
  w = [rng.normal(size=(d_in, d)).astype(np.float32) for d in widths]
  left = [rng.normal(size=(d, r)).astype(np.float32) for d, r in zip(widths[::2], ranks)]
  right = [rng.normal(size=(r, d_in)).astype(np.float32) for r in ranks]
  kernels = [rl.LowRankKernel(jnp.asarray(w[0]), jnp.asarray(left[0]), jnp.asarray(right[0])),
             jnp.asarray(w[1]),
             rl.LowRankKernel(jnp.asarray(w[2]), jnp.asarray(left[1]), jnp.asarray(right[1]))]
  expected = [x @ (w[0] + (left[0] @ right[0]).T), x @ w[1], x @ (w[2] + (left[1] @ right[1]).T)]
  return rng, x, w, left, right, kernels, expected


def test_dense_group_apply_equals_each_merged_kernel_in_numpy():
  _, x, w, left, right, kernels, expected = _low_plain_low_group(0, (2, 5, 6), (4, 3, 4), (2, 3))
  outs = rl.dense_group_apply(jnp.asarray(x), kernels)
  assert [o.shape for o in outs] == [(2, 5, 4), (2, 5, 3), (2, 5, 4)]
  for got, want in zip(outs, expected):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Gradients reach every factor as plain autodiff through the merged kernels
  # sends them (no custom VJP on that side).
  loss = lambda ks: sum(jnp.sum(o ** 2) for o in rl.dense_group_apply(jnp.asarray(x), ks))
  merged = lambda k: k.w0 + (k.left @ k.right).T if isinstance(k, rl.LowRankKernel) else k
  loss_merged = lambda ks: sum(jnp.sum((jnp.asarray(x) @ merged(k)) ** 2) for k in ks)
  chex.assert_trees_all_close(jax.grad(loss)(kernels), jax.grad(loss_merged)(kernels), rtol=1e-4, atol=1e-3)
  # In bfloat16 too, and for a group with no plain kernel.
  bf16 = [jax.tree.map(lambda a: a.astype(jnp.bfloat16), k) for k in (kernels[0], kernels[2])]
  outs = rl.dense_group_apply(jnp.asarray(x, jnp.bfloat16), bf16)
  assert all(o.dtype == jnp.bfloat16 for o in outs)
  for got, want in zip(outs, (expected[0], expected[2])):
    # bf16 keeps 8 significant bits: observed here at most 0.04 + 1.5% of |want|.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1.5e-2, atol=0.06)
  with pytest.raises(ValueError, match="disagree on the rank"):
    rl.dense_group_apply(jnp.asarray(x), [rl.LowRankKernel(jnp.asarray(w[0]), jnp.asarray(left[0]),
                                                           jnp.asarray(right[1]))])


@pytest.mark.parametrize("shards", [2, 3])
def test_dense_group_apply_shard_major_layout_gives_the_same_outputs_and_gradients(shards):
  # shards=2 divides every width and lays the group out shard-major; 3 does
  # not divide 4 and falls back to the end-to-end layout. Both must be exact.
  rng, x, _, left, right, kernels, expected = _low_plain_low_group(1, (3, 6), (4, 2, 6), (2, 3))
  outs = rl.dense_group_apply(jnp.asarray(x), kernels, shards=shards)
  for got, want in zip(outs, expected, strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  weights = [rng.normal(size=e.shape).astype(np.float32) for e in expected]
  loss = lambda ks: sum(jnp.sum(o * c)
                       for o, c in zip(rl.dense_group_apply(jnp.asarray(x), ks, shards=shards), weights))
  # d/d left_i of sum(c * x (w + (left right).T)) = c.T x right.T; d/d right_i = left.T c.T x.
  grads = jax.grad(loss)(kernels)
  for k, (i, c) in zip((0, 2), ((0, weights[0]), (1, weights[2]))):
    np.testing.assert_allclose(np.asarray(grads[k].left), c.T @ x @ right[i].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[k].right), left[i].T @ c.T @ x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grads[1]), x.T @ weights[1], rtol=1e-4, atol=1e-4)


def test_shard_major_columns_interleave_each_kernels_shards():
  # [a | b] over 2 shards: shard 0 holds a's and b's first halves, in that order.
  a, b = np.arange(8).reshape(2, 4), 100 + np.arange(4).reshape(2, 2)
  joined = low_rank._concat_columns([jnp.asarray(a), jnp.asarray(b)], 2)
  np.testing.assert_array_equal(np.asarray(joined), np.concatenate([a[:, :2], b[:, :1], a[:, 2:], b[:, 1:]], axis=1))
  back = low_rank._split_columns(joined, [4, 2], 2)
  np.testing.assert_array_equal(np.asarray(back[0]), a)
  np.testing.assert_array_equal(np.asarray(back[1]), b)


def test_dense_group_apply_treats_a_rank_zero_update_as_no_update():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 4)).astype(np.float32)
  w = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(2)]
  left, right = rng.normal(size=(2, 2)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
  kernels = [rl.LowRankKernel(jnp.asarray(w[0]), jnp.zeros((2, 0)), jnp.zeros((0, 4))),
             rl.LowRankKernel(jnp.asarray(w[1]), jnp.asarray(left), jnp.asarray(right))]
  outs = rl.dense_group_apply(jnp.asarray(x), kernels)
  np.testing.assert_allclose(np.asarray(outs[0]), x @ w[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(outs[1]), x @ (w[1] + (left @ right).T), rtol=1e-5, atol=1e-5)


def test_dense_group_apply_rejects_a_bad_shard_count():
  with pytest.raises(ValueError, match=r"shards must be a positive integer, got 0"):
    rl.dense_group_apply(jnp.ones((2, 4)), [jnp.ones((4, 2)), jnp.ones((4, 2))], shards=0)
