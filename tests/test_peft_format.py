"""PEFT adapter folders and merged exports, checked by transformers' and PEFT's own PyTorch logits.

PEFT loads adapters with ``strict=False``: a folder that looks right can load
nothing. So every export here is loaded by ``PeftModel.from_pretrained`` (or
``from_pretrained`` of the merged folder), PEFT's own load report is read
back, and its logits are compared with ours on the same inputs; the other
way, adapters PEFT made in PyTorch are loaded into our model.
"""

import json
import os
import warnings
from unittest import mock

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import rmlora_jax as rl
from rmlora_jax import methods
from rmlora_jax import paths
from rmlora_jax import peft_format
from rmlora_jax.adapters import base
from rmlora_jax.models import hub
from rmlora_jax.models import torch_port

TOL = 1e-4
PAIRS = [("A man is playing a guitar on stage.", "Someone performs music."),
         ("The cat sat on the mat.", "A dog is barking loudly at the mailman."),
         ("It rains.", "The weather is dry and sunny today."),
         ("Stocks fell sharply on Monday.", "Markets went down.")]


def randomize(key, tree, scale):
  """Every leaf replaced by ``scale`` * N(0, 1), one key per leaf."""
  flat = paths.flatten_with_paths(tree)
  new = {p: scale * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(v)) for i, (p, v) in enumerate(flat.items())}
  return jax.tree_util.tree_map_with_path(lambda kp, _: new[paths.path_str(kp)], tree)


def test_state_dict_sources_inverts_a_converter_and_sees_transposes_of_square_matrices():
  shapes = {"w": (3, 3), "v": (3, 3), "e": (5, 2), "s": (4,), "one": (1, 1), "conv": (6, 3, 4, 4), "pos": (1, 5, 6)}
  # A Conv2d weight (out, in, kh, kw) as a Flax kernel (kh, kw, in, out), as the ViT port reads it.
  convert = lambda st: {"k": {"kernel": st["w"].T}, "emb": st["v"], "x": st["e"].T, "b": st["s"], "o": st["one"],
                        "c": np.transpose(st["conv"].T, (1, 0, 2, 3)), "p": st["pos"]}
  sources = torch_port.state_dict_sources(convert, shapes)
  assert sources == {"b": ("s", None), "emb": ("v", None), "k/kernel": ("w", (1, 0)), "o": ("one", None),
                     "x": ("e", (1, 0)), "c": ("conv", (2, 3, 1, 0)), "p": ("pos", None)}
  weight = np.random.default_rng(0).normal(size=shapes["conv"])
  kernel = convert({**{k: np.zeros(v) for k, v in shapes.items()}, "conv": weight})["c"]
  np.testing.assert_array_equal(torch_port.from_state(weight, sources["c"][1]), kernel)
  np.testing.assert_array_equal(torch_port.to_state(kernel, sources["c"][1]), weight)


def torch_inputs(batch):
  return {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}


def peft_logits(model, folder, batch):
  """``PeftModel.from_pretrained(model, folder)``'s logits, after checking PEFT loaded every adapter and head weight."""
  # from_pretrained loads with strict=False and drops load_adapter's report (it warns only of missing
  # adapter keys): record the report and check that nothing was left out on either side.
  reports = []
  load_adapter = peft.PeftModel.load_adapter

  def recording(self, *args, **kwargs):
    reports.append(load_adapter(self, *args, **kwargs))
    return reports[-1]

  with warnings.catch_warnings(record=True) as caught, mock.patch.object(peft.PeftModel, "load_adapter", recording):
    warnings.simplefilter("always")
    wrapped = peft.PeftModel.from_pretrained(model, str(folder)).eval()
  assert not [w for w in caught if "missing adapter keys" in str(w.message)]
  (report,) = reports
  assert not report.unexpected_keys and not report.missing_keys, report
  # Every adapter and head parameter PEFT made has a value from the file.
  saved = set(peft.utils.load_peft_weights(str(folder), device="cpu"))
  made = {k for k in wrapped.state_dict() if ".lora_" in k or ".modules_to_save." in k}
  assert len(made) == len(saved), (sorted(made - saved)[:4], sorted(saved)[:4])
  with torch.no_grad():
    return wrapped(**torch_inputs(batch)).logits.numpy()


@pytest.fixture(scope="module")
def minilm():
  """The embedded MiniLM with a 2-label head, real sentence pairs, and a jitted forward of any params."""
  module, params, tokenizer, hf_config = hub.load_pretrained("minilm-l6", head="classification", num_labels=2)
  batch = {k: np.asarray(v, np.int32) for k, v in
           tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="np").items()}
  forward = jax.jit(lambda p: module.apply({"params": p}, batch["input_ids"], attention_mask=batch["attention_mask"],
                                           token_type_ids=batch["token_type_ids"])["logits"])
  head = randomize(jax.random.key(7), {p: v for p, v in paths.flatten_with_paths(params).items()
                                       if p.startswith("classifier/")}, 0.3)
  return dict(params=params, hf_config=hf_config, batch=batch, forward=forward, head=head,
              folder=hub.embedded_model_path(), base_logits=np.asarray(forward(params)))


def torch_minilm(minilm):
  return transformers.AutoModelForSequenceClassification.from_pretrained(minilm["folder"], num_labels=2).eval()


def ours(minilm, adapters, spec, head):
  return np.asarray(minilm["forward"](rl.merge(base.with_head(minilm["params"], head), adapters, spec)))


def lora_adapters(params, spec, *, seed=0, scale=0.05):
  adapters = rl.init_lora(jax.random.key(seed), params, spec)
  return {p: {"a": ad["a"], "b": scale * jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i), ad["b"].shape)}
          for i, (p, ad) in enumerate(adapters.items())}


def test_lora_export_loads_in_peft_with_our_logits(minilm, tmp_path):
  spec = rl.LoraSpec(rank=8, alpha=32.0, targets=hub.default_lora_targets(minilm["hf_config"]))
  adapters = lora_adapters(minilm["params"], spec)
  expected = ours(minilm, adapters, spec, minilm["head"])
  assert np.abs(expected - minilm["base_logits"]).max() > 0.05  # the adapters and head matter
  peft_format.save_peft(tmp_path, params=minilm["params"], adapters=adapters, spec=spec, trained=minilm["head"],
                        hf_config=minilm["hf_config"], head="classification", base_model_name_or_path="minilm-l6")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
  assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (8, 32, ["classifier"])
  # "dense" alone would also take the pooler, which is not adapted.
  assert config["target_modules"] == ["intermediate.dense", "key", "output.dense", "query", "value"]
  state = load_file(tmp_path / "adapter_model.safetensors")
  assert state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (8, 384)
  assert state["base_model.model.bert.encoder.layer.5.intermediate.dense.lora_B.weight"].shape == (1536, 8)
  assert state["base_model.model.classifier.weight"].shape == (2, 384)  # PyTorch's (out, in)
  assert len(state) == 6 * 6 * 2 + 2
  np.testing.assert_allclose(peft_logits(torch_minilm(minilm), tmp_path, minilm["batch"]), expected, atol=TOL, rtol=0)

  # Back into ours, and as the start of a run at another alpha: the same model.
  loaded = peft_format.load_peft(tmp_path, minilm["params"], minilm["hf_config"], head="classification")
  np.testing.assert_allclose(ours(minilm, loaded.adapters, loaded.spec, loaded.trained), expected, atol=TOL, rtol=0)
  run_spec = rl.LoraSpec(rank=8, alpha=8.0, targets=spec.targets)
  settings = methods.MethodSettings(name="rm_lora", spec=run_spec, train_patterns=("classifier/.*",))
  method = methods.make_method(settings)
  trainable = peft_format.start_from(loaded, settings)(method.init(jax.random.key(3), minilm["params"]))
  started = np.asarray(minilm["forward"](method.assemble(trainable, method.frozen(minilm["params"]))))
  np.testing.assert_allclose(started, expected, atol=TOL, rtol=0)
  with pytest.raises(ValueError, match=r"has rank 8 at .*, the run's adapters rank 4"):
    peft_format.start_from(loaded, methods.MethodSettings(name="lora", spec=rl.LoraSpec(rank=4, alpha=8.0,
                                                                                          targets=spec.targets)))
  with pytest.raises(ValueError, match=r"is a LORA adapter: it can start the methods \['gm_lora', 'lora', 'r_lora', "
                                       r"'rm_lora'\], not 'adalora'"):
    peft_format.start_from(loaded, methods.MethodSettings(name="adalora", spec=spec))


def test_adapter_made_by_peft_loads_into_ours(minilm, tmp_path):
  model = torch_minilm(minilm)
  config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                           rank_pattern={"value": 2}, alpha_pattern={"intermediate.dense": 3}, use_rslora=True)
  wrapped = peft.get_peft_model(model, config)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in wrapped.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.copy_(0.1 * torch.randn_like(p))
  wrapped.eval()
  with torch.no_grad():
    expected = wrapped(**torch_inputs(minilm["batch"])).logits.numpy()
  wrapped.save_pretrained(tmp_path)
  loaded = peft_format.load_peft(tmp_path, minilm["params"], minilm["hf_config"], head="classification")
  assert len(loaded.adapters) == 3 * 6 and set(loaded.trained) == {"classifier/kernel", "classifier/bias"}
  assert loaded.adapters["encoder/layer_2/attention/value/kernel"]["a"].shape == (2, 384)
  got = ours(minilm, loaded.adapters, loaded.spec, loaded.trained)
  assert np.abs(got - minilm["base_logits"]).max() > 0.05
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_adalora_both_ways(minilm, tmp_path):
  # Ours -> PEFT's AdaLoRA, some singular values pruned (rank_pattern, sliced tensors).
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=(r"encoder/layer_\d+/attention/(query|value)/kernel",))
  adapters = rl.init_adalora(jax.random.key(0), minilm["params"], spec)
  adapters = {p: {**ad, "lam": jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (4,)) * jnp.array([1., 0., 1., 1.])}
              for i, (p, ad) in enumerate(adapters.items())}
  adapters["encoder/layer_0/attention/query/kernel"]["lam"] = jnp.zeros(4)  # rank 0
  expected = ours(minilm, adapters, spec, minilm["head"])
  peft_format.save_peft(tmp_path / "ours", params=minilm["params"], adapters=adapters, spec=spec,
                        trained=minilm["head"], hf_config=minilm["hf_config"], head="classification",
                        extra_config={"total_step": 100, "target_r": 2})
  config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
  assert config["rank_pattern"]["bert.encoder.layer.1.attention.self.value.lora_E"] == [True, False, True, True]
  state = load_file(tmp_path / "ours" / "adapter_model.safetensors")
  assert state["base_model.model.bert.encoder.layer.1.attention.self.value.lora_E"].shape == (3, 1)
  assert state["base_model.model.bert.encoder.layer.1.attention.self.value.lora_A"].shape == (3, 384)
  np.testing.assert_allclose(peft_logits(torch_minilm(minilm), tmp_path / "ours", minilm["batch"]), expected,
                             atol=TOL, rtol=0)

  # PEFT's AdaLoRA -> ours, with the rank pattern PEFT's pruning leaves.
  wrapped = peft.get_peft_model(torch_minilm(minilm), peft.AdaLoraConfig(
      task_type="SEQ_CLS", init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["key", "output.dense"]))
  torch.manual_seed(0)
  pattern = {}
  with torch.no_grad():
    for name, p in wrapped.named_parameters():
      if "lora_E" in name or "lora_B" in name or "modules_to_save" in name:
        p.copy_(0.3 * torch.randn_like(p))
      if "lora_E" in name:
        keep = torch.rand(4) > 0.4
        p.mul_(keep[:, None].float())
        pattern[name.removeprefix("base_model.model.").replace(".default", "")] = keep.tolist()
  wrapped.peft_config["default"].rank_pattern = pattern
  wrapped.eval()
  with torch.no_grad():
    expected = wrapped(**torch_inputs(minilm["batch"])).logits.numpy()
  wrapped.save_pretrained(tmp_path / "peft")
  loaded = peft_format.load_peft(tmp_path / "peft", minilm["params"], minilm["hf_config"], head="classification")
  assert loaded.peft_type == "ADALORA" and len(loaded.adapters) == 3 * 6
  np.testing.assert_allclose(ours(minilm, loaded.adapters, loaded.spec, loaded.trained), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["sora", "lora2"])
def test_sora_and_lora2_export_as_lora_of_their_active_rank(minilm, family, tmp_path):
  targets = (r"encoder/layer_\d+/(attention/(key|output)|output)/kernel",)
  key = jax.random.key(0)
  if family == "sora":
    spec = rl.LoraSpec(rank=6, alpha=16.0, targets=targets)
    adapters = {p: {**ad, "b": 0.05 * jax.random.normal(jax.random.fold_in(key, i), ad["b"].shape),
                    "g": jnp.array([1.5, 0., -0.7, 0., 0., 2.]) if i % 2 else jnp.array([1., 0.3, 0., 0., 0., 0.])}
                for i, (p, ad) in enumerate(rl.init_sora(key, minilm["params"], spec).items())}
    active = {0: 2, 1: 3}
  else:
    spec = rl.Lora2Spec(k=3, r=4, alpha=8.0, targets=targets)
    adapters = {}
    for i, (p, ad) in enumerate(rl.init_lora2(key, minilm["params"], spec).items()):
      new = randomize(jax.random.fold_in(key, i), {n: ad[n] for n in ("U", "u", "v", "V")}, 1.0)
      adapters[p] = {"U": 0.1 * new["U"], "u": 0.5 * new["u"], "v": 0.5 * new["v"], "V": 0.1 * new["V"],
                     "lam": jnp.array([1., 0., 3., 2.]) if i % 2 else jnp.array([0., 0., 0., 1.])}
    active = {0: 1, 1: 3}
  expected = ours(minilm, adapters, spec, minilm["head"])
  assert np.abs(expected - minilm["base_logits"]).max() > 0.01
  peft_format.save_peft(tmp_path, params=minilm["params"], adapters=adapters, spec=spec, trained=minilm["head"],
                        hf_config=minilm["hf_config"], head="classification")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == active[0]
  assert set(config["rank_pattern"].values()) == {active[1]} and config["alpha_pattern"] == config["rank_pattern"]
  np.testing.assert_allclose(peft_logits(torch_minilm(minilm), tmp_path, minilm["batch"]), expected, atol=TOL, rtol=0)


def test_merged_export_loads_with_no_missing_or_unexpected_weights(minilm, tmp_path):
  spec = rl.LoraSpec(rank=8, alpha=32.0, targets=hub.default_lora_targets(minilm["hf_config"]))
  adapters = lora_adapters(minilm["params"], spec, seed=5)
  expected = ours(minilm, adapters, spec, minilm["head"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm["folder"])
  peft_format.save_merged(tmp_path, params=minilm["params"], hf_config=minilm["hf_config"], head="classification",
                          adapters=adapters, spec=spec, trained=minilm["head"], tokenizer=tokenizer)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
  assert type(model).__name__ == "BertForSequenceClassification"
  assert not any(info.values()), info
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert reloaded(*PAIRS[0])["input_ids"] == tokenizer(*PAIRS[0])["input_ids"]
  with torch.no_grad():
    got = model.eval()(**torch_inputs(minilm["batch"])).logits.numpy()
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)


def tiny_config(model_type, **overrides):
  if model_type == "bert":
    return transformers.BertConfig(**TINY, **overrides)
  if model_type == "roberta":
    return transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5, **overrides)
  return transformers.DebertaV2Config(**TINY, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                                      max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                                      position_biased_input=False, type_vocab_size=0, **overrides)


def tiny_checkpoint(folder, model_type, cls=transformers.AutoModelForSequenceClassification, **overrides):
  """A random ``cls`` of ``model_type`` saved in ``folder`` (values away from init defaults); its batch."""
  torch.manual_seed(0)
  model = cls.from_config(tiny_config(model_type, **overrides))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(folder)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, size=(3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  mask[2, 5:] = 0
  pad = model.config.pad_token_id or 0
  ids[mask == 0] = pad
  return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "deberta-v2"])
def test_every_encoder_both_ways_and_merged(model_type, tmp_path):
  batch = tiny_checkpoint(tmp_path / "base", model_type, num_labels=3)
  module, params, _, hf_config = hub.load_pretrained(tmp_path / "base", head="classification", num_labels=3)
  forward = jax.jit(lambda p: module.apply({"params": p}, batch["input_ids"], attention_mask=batch["attention_mask"])["logits"])
  load_torch = lambda: transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=hub.default_lora_targets(hf_config))
  adapters = lora_adapters(params, spec, scale=0.2)
  head = randomize(jax.random.key(2), {p: v for p, v in paths.flatten_with_paths(params).items()
                                       if p.startswith("classifier/")}, 0.3)
  expected = np.asarray(forward(rl.merge(base.with_head(params, head), adapters, spec)))
  assert np.abs(expected - np.asarray(forward(params))).max() > 0.05

  peft_format.save_peft(tmp_path / "ours", params=params, adapters=adapters, spec=spec, trained=head,
                        hf_config=hf_config, head="classification")
  np.testing.assert_allclose(peft_logits(load_torch(), tmp_path / "ours", batch), expected, atol=TOL, rtol=0)

  peft_format.save_merged(tmp_path / "merged", params=params, hf_config=hf_config, head="classification",
                          adapters=adapters, spec=spec, trained=head)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged",
                                                                                output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    np.testing.assert_allclose(model.eval()(**torch_inputs(batch)).logits.numpy(), expected, atol=TOL, rtol=0)

  # PEFT's "all-linear" adapts every linear layer, the pooler's too.
  wrapped = peft.get_peft_model(load_torch(), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                              target_modules="all-linear"))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in wrapped.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.copy_(0.2 * torch.randn_like(p))
    expected = wrapped.eval()(**torch_inputs(batch)).logits.numpy()
  wrapped.save_pretrained(tmp_path / "peft")
  loaded = peft_format.load_peft(tmp_path / "peft", params, hf_config, head="classification")
  np.testing.assert_allclose(np.asarray(forward(rl.merge(base.with_head(params, loaded.trained), loaded.adapters,
                                                         loaded.spec))), expected, atol=TOL, rtol=0)


TINY_DECODER = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Tied and untied LM heads; Qwen2's q/k/v biases; Gemma2's head_dim * heads != hidden, sliding window and soft-caps.
DECODER_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**TINY_DECODER, tie_word_embeddings=False),
    "gemma2": lambda: transformers.Gemma2Config(**TINY_DECODER, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                                tie_word_embeddings=True),
}


def tiny_decoder(folder, model_type):
  """A random tiny causal LM of ``model_type`` (norms and biases off their init values) saved in ``folder``; its batch."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(DECODER_CONFIGS[model_type]())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(folder)
  ids = np.random.default_rng(0).integers(3, 99, size=(2, 10)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# Scanned: the layers' weights stacked (one nn.scan); adapters and files are the same per layer.
@pytest.mark.parametrize("model_type,scan", [("llama", False), ("qwen2", False), ("gemma2", False),
                                             ("qwen2", True), ("gemma2", True)])
def test_every_decoder_both_ways_and_merged(model_type, scan, tmp_path):
  batch = tiny_decoder(tmp_path / "base", model_type)
  module, params, _, hf_config = hub.load_pretrained(tmp_path / "base", head="causal_lm", scan_layers=scan)
  assert ("layers" in params["model"]) == scan
  forward = jax.jit(lambda p: module.apply({"params": p}, batch["input_ids"], attention_mask=batch["attention_mask"]))
  load_torch = lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=hub.default_lora_targets(hf_config))
  adapters = lora_adapters(params, spec, scale=0.2)
  assert len(adapters) == 7 * hf_config.num_hidden_layers  # q, k, v, o, gate, up, down
  expected, base_logits = np.asarray(forward(rl.merge(params, adapters, spec))), np.asarray(forward(params))
  assert np.abs(expected - base_logits).max() > 0.05

  peft_format.save_peft(tmp_path / "ours", params=params, adapters=adapters, spec=spec, hf_config=hf_config,
                        head="causal_lm")
  config = json.loads((tmp_path / "ours" / peft_format.ADAPTER_CONFIG).read_text())
  assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
  assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
  np.testing.assert_allclose(peft_logits(load_torch(), tmp_path / "ours", batch), expected, atol=TOL, rtol=0)

  peft_format.save_merged(tmp_path / "merged", params=params, hf_config=hf_config, head="causal_lm",
                          adapters=adapters, spec=spec)
  assert ("lm_head.weight" in load_file(tmp_path / "merged" / peft_format.MODEL_WEIGHTS)) != hf_config.tie_word_embeddings
  model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    np.testing.assert_allclose(model.eval()(**torch_inputs(batch)).logits.numpy(), expected, atol=TOL, rtol=0)

  wrapped = peft.get_peft_model(load_torch(), peft.LoraConfig(
      task_type="CAUSAL_LM", r=2, lora_alpha=4,
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in wrapped.named_parameters():
      if "lora_B" in name:
        p.copy_(0.2 * torch.randn_like(p))
    expected = wrapped.eval()(**torch_inputs(batch)).logits.numpy()
  assert np.abs(expected - base_logits).max() > 0.05
  wrapped.save_pretrained(tmp_path / "peft")
  loaded = peft_format.load_peft(tmp_path / "peft", params, hf_config, head="causal_lm")
  assert len(loaded.adapters) == 7 * hf_config.num_hidden_layers and not loaded.trained
  np.testing.assert_allclose(np.asarray(forward(rl.merge(params, loaded.adapters, loaded.spec))), expected,
                             atol=TOL, rtol=0)
  if scan:
    # The LoRA family keeps a scanned model's adapters stacked over the layers:
    # a run started from PEFT's folder has PEFT's model, merged or low-rank.
    settings = methods.MethodSettings(name="rm_lora", spec=rl.LoraSpec(
        rank=2, alpha=4.0, targets=hub.default_lora_targets(hf_config)), options=methods.RmOptions(num_directions=1))
    fresh = methods.make_method(settings).init(jax.random.key(0), params)
    assert len(fresh["adapters"]) == 7  # one per matrix kind
    started = peft_format.start_from(loaded, settings)(fresh)["adapters"]
    assert len(started) == 7 and all(np.shape(ad["a"])[0] == hf_config.num_hidden_layers for ad in started.values())
    for apply in (rl.merge, rl.attach):
      np.testing.assert_allclose(np.asarray(forward(apply(params, started, settings.spec))), expected,
                                 atol=TOL, rtol=0)


def test_question_answering_merged_and_peft(tmp_path):
  batch = tiny_checkpoint(tmp_path / "base", "bert", cls=transformers.AutoModelForQuestionAnswering)
  module, params, _, hf_config = hub.load_pretrained(tmp_path / "base", head="qa")
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=hub.default_lora_targets(hf_config))
  adapters = lora_adapters(params, spec, scale=0.2)
  out = module.apply({"params": rl.merge(params, adapters, spec)}, batch["input_ids"],
                     attention_mask=batch["attention_mask"])
  peft_format.save_merged(tmp_path / "merged", params=params, hf_config=hf_config, head="qa", adapters=adapters, spec=spec)
  model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged", output_loading_info=True)
  assert not any(info.values()), info
  peft_format.save_peft(tmp_path / "peft", params=params, adapters=adapters, spec=spec,
                        trained={"qa_outputs/bias": params["qa_outputs"]["bias"] + 1.0}, hf_config=hf_config, head="qa")
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["task_type"] == "QUESTION_ANS" and config["modules_to_save"] == ["qa_outputs"]
  with torch.no_grad():
    got = model.eval()(**torch_inputs(batch))
    wrapped = peft.PeftModel.from_pretrained(
        transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "base"), str(tmp_path / "peft")).eval()
    via_peft = wrapped(**torch_inputs(batch))
  for name in ("start_logits", "end_logits"):
    np.testing.assert_allclose(getattr(got, name).numpy(), np.asarray(out[name]), atol=TOL, rtol=0)
    np.testing.assert_allclose(getattr(via_peft, name).numpy(), np.asarray(out[name]) + 1.0, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A tiny BERT classifier and a LoRA export of it, for the error cases."""
  folder = tmp_path_factory.mktemp("tiny")
  tiny_checkpoint(folder / "base", "bert", num_labels=3)
  _, params, _, hf_config = hub.load_pretrained(folder / "base", head="classification", num_labels=3)
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=hub.default_lora_targets(hf_config))
  head = {p: v for p, v in paths.flatten_with_paths(params).items() if p.startswith("classifier/")}
  peft_format.save_peft(folder / "peft", params=params, adapters=lora_adapters(params, spec), spec=spec, trained=head,
                        hf_config=hf_config, head="classification")
  return folder / "peft", params, hf_config


def edit_config(folder, **changes):
  file = folder / "adapter_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def edit_weights(folder, change):
  file = folder / "adapter_model.safetensors"
  save_file(change(load_file(file)), file)


def llama_names(state):
  return {k.replace("bert.encoder.layer.", "model.layers.").replace("attention.self.query", "self_attn.q_proj"): v
          for k, v in state.items()}


def wider(state):
  key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
  return {**state, key: np.zeros((2, 64), np.float32)}


def more_labels(state):
  return {**state, "base_model.model.classifier.weight": np.zeros((5, 32), np.float32)}


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors does not exist"),
    (lambda f: (f / "adapter_config.json").unlink(), r"adapter_config.json does not exist"),
    (lambda f: edit_config(f, peft_type="IA3"), r"adapter_config.json has peft_type 'IA3', which cannot be loaded; "
                                                r"rmlora_jax reads LORA and ADALORA"),
    (lambda f: edit_config(f, use_dora=True), r"adapter_config.json sets use_dora=True"),
    (lambda f: edit_config(f, target_modules=["q_proj", "v_proj"], base_model_name_or_path="meta-llama/Llama-3.2-1B"),
     r"adapter_config.json targets 'q_proj', which matches no module of this bert model .*made for 'meta-llama"),
    (lambda f: edit_config(f, target_modules=["query", "nonexistent"]), r"targets 'nonexistent', which matches no module"),
    (lambda f: edit_weights(f, llama_names), r"adapter_model.safetensors adapts 'model\.layers\.0\..*', which is "
                                             r"not a module of this bert model"),
    (lambda f: edit_weights(f, wider), r"adapter_model.safetensors has lora_A of 'bert.encoder.layer.0.attention.self."
                                       r"query' with shape \(2, 64\), but this model needs \(2, 32\): .*another size"),
    (lambda f: edit_weights(f, more_labels), r"has 'base_model.model.classifier.weight' of shape \(5, 32\), but this bert"),
    (lambda f: edit_config(f, task_type="QUESTION_ANS"), r"is a QUESTION_ANS adapter, for a model with head 'qa', not "
                                                         r"'classification'"),
])
def test_bad_folders_are_clear_errors_naming_the_file(tiny_export, damage, message, tmp_path):
  folder, params, hf_config = tiny_export
  copy = tmp_path / "adapter"
  copy.mkdir()
  for f in folder.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  damage(copy)
  with pytest.raises(ValueError, match=message) as error:
    peft_format.load_peft(copy, params, hf_config, head="classification")
  assert str(copy) in str(error.value)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
  """A random ViT image classifier saved as a folder; our params and model of it, and a jitted forward."""
  folder = tmp_path_factory.mktemp("vit")
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(transformers.ViTConfig(
      image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
      num_labels=3))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(folder)
  module, params, _, hf_config = hub.load_pretrained(folder, head="image_classification", num_labels=3)
  pixels = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
  forward = jax.jit(lambda p: module.apply({"params": p}, pixels)["logits"])
  return dict(folder=folder, params=params, hf_config=hf_config, pixels=pixels, forward=forward)


def image_logits(model, pixels):
  with torch.no_grad():
    return model.eval()(pixel_values=torch.from_numpy(pixels)).logits.numpy()


def test_vit_merged_and_peft_exports_give_our_logits_in_pytorch(tiny_vit, tmp_path):
  params, hf_config, forward = tiny_vit["params"], tiny_vit["hf_config"], tiny_vit["forward"]
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=hub.default_lora_targets(hf_config))
  adapters = lora_adapters(params, spec, scale=0.2)
  assert len(adapters) == 2 * 6
  head = randomize(jax.random.key(2), {p: v for p, v in paths.flatten_with_paths(params).items()
                                       if p.startswith("classifier/")}, 0.3)
  expected = np.asarray(forward(rl.merge(base.with_head(params, head), adapters, spec)))
  assert np.abs(expected - np.asarray(forward(params))).max() > 0.05

  peft_format.save_merged(tmp_path / "merged", params=params, hf_config=hf_config, head="image_classification",
                          adapters=adapters, spec=spec, trained=head)
  model, info = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "merged",
                                                                             output_loading_info=True)
  assert type(model).__name__ == "ViTForImageClassification" and not any(info.values()), info
  np.testing.assert_allclose(image_logits(model, tiny_vit["pixels"]), expected, atol=TOL, rtol=0)

  peft_format.save_peft(tmp_path / "peft", params=params, adapters=adapters, spec=spec, trained=head,
                        hf_config=hf_config, head="image_classification", base_model_name_or_path=tiny_vit["folder"])
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["task_type"] is None and config["modules_to_save"] == ["classifier"]
  # PEFT wraps the modules transformers builds, named as in memory (transformers 5: q_proj, fc1, ...).
  assert config["target_modules"] == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
  # The merged file holds the checkpoint's names, as save_pretrained writes them.
  assert "vit.encoder.layer.1.attention.attention.query.weight" in load_file(tmp_path / "merged" / "model.safetensors")
  wrapped = pixel_peft_model(transformers.AutoModelForImageClassification.from_pretrained(tiny_vit["folder"]),
                             tmp_path / "peft")
  np.testing.assert_allclose(image_logits(wrapped, tiny_vit["pixels"]), expected, atol=TOL, rtol=0)
  loaded = peft_format.load_peft(tmp_path / "peft", params, hf_config, head="image_classification")
  np.testing.assert_allclose(np.asarray(forward(rl.merge(base.with_head(params, loaded.trained), loaded.adapters,
                                                         loaded.spec))), expected, atol=TOL, rtol=0)


def test_vit_classifier_lora_merges_into_the_classifier(tiny_vit, tmp_path):
  """LoRA on the classification layer itself (the paper's last-layer experiment): W0 + dW in the merged folder."""
  params, hf_config, forward = tiny_vit["params"], tiny_vit["hf_config"], tiny_vit["forward"]
  spec = rl.LoraSpec(rank=2, alpha=4.0, targets=(r"classifier/kernel",))
  adapters = lora_adapters(params, spec, scale=0.5)
  expected = np.asarray(forward(rl.merge(params, adapters, spec)))
  assert np.abs(expected - np.asarray(forward(params))).max() > 0.05
  peft_format.save_merged(tmp_path, params=params, hf_config=hf_config, head="image_classification",
                          adapters=adapters, spec=spec)
  model, info = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info
  np.testing.assert_allclose(image_logits(model, tiny_vit["pixels"]), expected, atol=TOL, rtol=0)


def pixel_peft_model(model, folder):
  """``PeftModel.from_pretrained(model, folder)``, after checking PEFT's load report has no missing or unexpected keys."""
  reports = []
  load_adapter = peft.PeftModel.load_adapter

  def recording(self, *args, **kwargs):
    reports.append(load_adapter(self, *args, **kwargs))
    return reports[-1]

  with mock.patch.object(peft.PeftModel, "load_adapter", recording):
    wrapped = peft.PeftModel.from_pretrained(model, str(folder)).eval()
  (report,) = reports
  assert not report.unexpected_keys and not report.missing_keys, report
  saved = set(peft.utils.load_peft_weights(str(folder), device="cpu"))
  made = {k for k in wrapped.state_dict() if ".lora_" in k or ".modules_to_save." in k}
  assert len(made) == len(saved), (sorted(made - saved)[:4], sorted(saved)[:4])
  return wrapped
