"""Gemma 2 / Gemma 3 text decoders in Flax against transformers' PyTorch models on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import rmlora_jax as rl
from rmlora_jax import partitioning
from rmlora_jax import paths as paths_lib
from rmlora_jax.models import default_lora_targets, gemma, load_pretrained

TOL = 1e-4
# head_dim * heads (64) differs from hidden_size (32), as in real Gemmas.
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4, head_dim=16,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# id -> (transformers class, config). Both have sliding and full layers and a
# window shorter than the 11-token batches.
CASES = {
    # Untied with attention biases; weights large enough (std 0.2) that both
    # soft-caps bite and the attention is far from uniform. Layers: S, F.
    "gemma2-untied-softcap": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **TINY, num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0, tie_word_embeddings=False,
        attention_bias=True, initializer_range=0.2)),
    # Tied, one key/value head, q/k norms, and two RoPEs far apart (the global
    # one linearly scaled): swapping them changes the logits. Layers: S, F, S, F.
    "gemma3-tied-two-ropes": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **TINY, num_hidden_layers=4, num_key_value_heads=1, sliding_window=3, sliding_window_pattern=2,
        query_pre_attn_scalar=16, initializer_range=0.05,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


@pytest.fixture(scope="module")
def checkpoints(save_decoders):
  """case -> (torch model, load_pretrained's 5-tuple, jitted apply), from a saved random checkpoint."""
  out = {}
  # Gemma's norms start at zero (scale 1 + w): the fixture moves them off it.
  for case, (folder, model) in save_decoders(CASES).items():
    loaded = load_pretrained(folder, head="causal_lm", return_report=True)
    out[case] = model, loaded, jax.jit(loaded[0].apply)
  return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, checkpoints, decoder_batch, torch_logits):
  torch_model, (module, params, _, config, report), apply = checkpoints[case]
  assert report.missing == () and report.unexpected == ()
  assert ("lm_head" in params) != config.tie_word_embeddings
  arch = module.arch
  assert None in arch.attention_windows and any(w is not None for w in arch.attention_windows)
  for left in (False, True):
    ids, mask = decoder_batch(left=left)
    ours = apply({"params": params}, ids, mask)
    assert ours.dtype == jnp.float32 and ours.shape == (3, 11, TINY["vocab_size"])
    real = mask.astype(bool)
    ref = torch_logits(torch_model, ids, mask)[real]
    # Measured 1.6e-6 (gemma2) and 7e-7 (gemma3) on logits up to ~2 and ~1.
    np.testing.assert_allclose(np.asarray(ours)[real], ref, atol=TOL, rtol=0, err_msg=f"left={left}")
    if arch.final_logit_softcap is not None:
      assert np.abs(ref).max() > 0.5 * arch.final_logit_softcap  # the cap is not a no-op here


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_equals_transformers(case, checkpoints, decoder_batch):
  torch_model, (module, params, *_), _ = checkpoints[case]
  ids, mask = decoder_batch(left=True)
  new = 10
  with torch.no_grad():
    ref = torch_model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=new,
        do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
  ours = np.asarray(gemma.generate(module, params, ids, mask, max_new_tokens=new))
  np.testing.assert_array_equal(ours, ref)
  # An end token that row 0 produces midway (same compiled loop): each row is
  # the above up to its first end token, then padding, as transformers does
  # (test_llama checks that rule against transformers itself).
  eos = int(ref[0, 3])
  ended = np.cumsum(ref == eos, axis=1) - (ref == eos) > 0
  ours = np.asarray(gemma.generate(module, params, ids, mask, max_new_tokens=new, eos_token_id=eos))
  np.testing.assert_array_equal(ours, np.where(ended, 0, ref))


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_layers_match_transformers(case, checkpoints, decoder_batch, torch_logits):
  # The layers as one scan: each layer's window and RoPE are scanned over with its weights.
  torch_model, (*_, report), _ = checkpoints[case]
  module, params, *_ = load_pretrained(report.folder, head="causal_lm", scan_layers=True)
  assert "layers" in params["model"] and "layers_0" not in params["model"]
  ids, mask = decoder_batch(left=True)
  real = mask.astype(bool)
  ours = jax.jit(module.apply)({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(ours)[real], torch_logits(torch_model, ids, mask)[real], atol=TOL, rtol=0)
  with torch.no_grad():
    ref = torch_model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=6,
        do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(gemma.generate(module, params, ids, mask, max_new_tokens=6), ref)


@pytest.mark.parametrize("case", list(CASES))
def test_partition_rules_cover_every_param(case, checkpoints):
  _, (_, params, _, config, _), _ = checkpoints[case]
  # Raises if any parameter (the four norms per layer, q/k norms) has no rule.
  specs = paths_lib.flatten_with_paths(
      partitioning.match_partition_rules(params, partitioning.rules_for(config.model_type)))
  P = jax.sharding.PartitionSpec
  assert specs["model/layers_0/self_attn/k_proj/kernel"] == P("fsdp", "model")
  assert specs["model/layers_1/mlp/down_proj/kernel"] == P("model", "fsdp")
  assert specs["model/layers_1/pre_feedforward_layernorm/scale"] == P()
  assert specs["model/norm/scale"] == P()
  if config.model_type == "gemma3_text":
    assert specs["model/layers_0/self_attn/q_norm/scale"] == P()


@pytest.mark.parametrize("case", list(CASES))
def test_lora_targets_every_attention_and_mlp_matrix(case, checkpoints, decoder_batch):
  _, (module, params, _, config, _), _ = checkpoints[case]
  assert default_lora_targets(config) == gemma.DEFAULT_LORA_TARGETS == default_lora_targets(module)
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=default_lora_targets(config))
  targets = rl.select_targets(params, spec)
  projections = {p for p in paths_lib.flatten_with_paths(params)
                 if p.endswith("_proj/kernel") and p.startswith("model/layers_")}
  assert set(targets) == projections and len(targets) == 7 * config.num_hidden_layers
  # The kernels take the unmerged low-rank form (traced only, not compiled).
  zeros = {p: {"a": np.zeros((2, w.shape[0]), np.float32), "b": np.zeros((w.shape[1], 2), np.float32)}
           for p, w in targets.items()}
  attached = rl.attach(params, zeros, spec)
  assert isinstance(attached["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], rl.LowRankKernel)
  ids, mask = decoder_batch(left=True)
  out = jax.eval_shape(module.apply, {"params": attached}, ids, mask)
  assert out.shape == (3, 11, TINY["vocab_size"])


def test_gemma3_older_config_layout_reads_the_same():
  """A pre-transformers-5 config.json (rope_theta, rope_local_base_freq, rope_scaling at the top)."""
  new = gemma.arch_from_hf_config(CASES["gemma3-tied-two-ropes"][1])
  old = gemma.arch_from_hf_config({
      **TINY, "model_type": "gemma3_text", "num_hidden_layers": 4, "num_key_value_heads": 1,
      "sliding_window": 3, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
      "initializer_range": 0.05, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
      "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
  assert old == new
  assert (new.global_rope.rope_type, new.local_rope.rope_theta) == ("linear", 1e4)
  assert new.attention_windows == (3, None, 3, None)


GEMMA2 = {**TINY, "model_type": "gemma2", "num_hidden_layers": 2, "num_key_value_heads": 2}


@pytest.mark.parametrize("overrides,message", [
    ({"use_bidirectional_attention": True}, r"gemma2 config: use_bidirectional_attention=True is not supported"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]},
     r"layer_types\[1\]='chunked_attention' is not supported"),
    ({"layer_types": ["full_attention"]}, r"layer_types has 1 entries, but num_hidden_layers=2"),
    ({"sliding_window": None}, r"sliding_window=None must be a positive integer"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, r"rope type 'yarn' is not supported"),
    ({"attn_logit_softcapping": 0.0}, r"attn_logit_softcapping=0.0 must be positive"),
    ({"hidden_activation": "swiglu"}, r"hidden_activation='swiglu' is not a supported activation"),
    ({"model_type": "gemma"}, r"model_type 'gemma' is not one of \('gemma2', 'gemma3_text'\)"),
])
def test_unsupported_settings_are_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    gemma.arch_from_hf_config({**GEMMA2, **overrides})


def test_config_defaults_follow_transformers():
  # Gemma 2: soft-caps 50 / 30 unless null; Gemma 3: no attention cap (transformers never applies it).
  arch = gemma.arch_from_hf_config(GEMMA2)
  assert (arch.attn_logit_softcap, arch.final_logit_softcap) == (50.0, 30.0)
  assert arch.attention_windows == (4096, None) and arch.tie_word_embeddings
  arch = gemma.arch_from_hf_config({**GEMMA2, "final_logit_softcapping": None})
  assert arch.final_logit_softcap is None
  arch = gemma.arch_from_hf_config({**GEMMA2, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0,
                                    "num_hidden_layers": 6})
  assert arch.attn_logit_softcap is None and arch.final_logit_softcap is None and arch.qk_norm
  assert arch.attention_windows == (4096,) * 5 + (None,)
  assert (arch.global_rope.rope_theta, arch.local_rope.rope_theta) == (1e6, 1e4)
