"""Our nf4 base against bitsandbytes' (the QLoRA paper's library), and a LoRA step over it against PEFT's QLoRA.

bitsandbytes stores a 4-bit weight in blocks of 64 consecutive values of
PyTorch's (d_out, d_in) weight, each with its absmax; with d_in a multiple
of 64 those are our nf4 blocks (64 values of d_in per scale), so the two
dequantised bases should agree value for value, and PEFT's LoRA over the
4-bit model give our step's numbers. bitsandbytes' CPU path for inference
(eval mode, on a CPU with AVX512-BF16) repacks the 4-bit weights for a
bfloat16 kernel, which rounds the products to bfloat16 and afterwards
breaks training; ``support_avx512bf16_for_cpu = False`` on each
``Linear4bit`` keeps the float32 path, as the PEFT anchor does.
"""

import json

import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes")

import jax
import jax.numpy as jnp
import peft
import torch
import transformers

import rmlora_jax as rl
from rmlora_jax import methods, paths, quantize
from rmlora_jax.models import hub

MODULES = {"attention.self.query": "attention/query", "attention.self.key": "attention/key",
           "attention.self.value": "attention/value", "attention.output.dense": "attention/output",
           "intermediate.dense": "intermediate", "output.dense": "output"}


def test_nf4_base_equals_bitsandbytes_and_a_lora_step_over_it_equals_peft_qlora(tmp_path):
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=32, num_labels=3,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = transformers.BertForSequenceClassification(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "base")
  _, params, _, _ = hub.load_pretrained(str(tmp_path / "base"), head="classification", num_labels=3)
  q = rl.quantize_base(params, rl.QuantizeSpec(format="nf4"))
  deq = paths.flatten_with_paths(rl.dequantize_base(q))
  bits = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False,
                                         llm_int8_skip_modules=["bert.pooler.dense", "classifier"])
  qmodel = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "base", quantization_config=bits, device_map="cpu").eval()

  # The dequantised bases: every block kernel equal (ours is (d_in, d_out), PyTorch's (d_out, d_in)).
  for m in qmodel.modules():
    if isinstance(m, bnb.nn.Linear4bit):
      m.support_avx512bf16_for_cpu = False
  for i in range(2):
    for module, ours in MODULES.items():
      weight = qmodel.bert.encoder.layer[i].get_submodule(module).weight
      assert isinstance(weight, bnb.nn.Params4bit)
      theirs = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
      kernel = np.asarray(deq[f"encoder/layer_{i}/{ours}/kernel"])
      np.testing.assert_allclose(kernel.T, theirs.numpy(), rtol=0, atol=1e-6)
      assert np.abs(kernel - np.asarray(paths.flatten_with_paths(params)[f"encoder/layer_{i}/{ours}/kernel"])).max() > 1e-3

  # LoRA on query and value, the same nonzero factors on both sides; loss and factor gradients equal.
  spec = rl.LoraSpec(rank=4, alpha=8.0, targets=(r".*/attention/(query|value)/kernel",))
  method = quantize.for_quantized_base(methods.make_method(methods.MethodSettings(
      name="lora", spec=spec, train_patterns=(r"classifier/.*",), total_steps=1)))
  trainable = method.init(jax.random.key(0), q)
  rng = np.random.default_rng(1)
  trainable["adapters"] = {p: {k: jnp.asarray(rng.normal(size=v.shape) * 0.2, jnp.float32) for k, v in ad.items()}
                           for p, ad in trainable["adapters"].items()}
  wrapped = peft.get_peft_model(qmodel, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=["query", "value"]))
  for path, ad in trainable["adapters"].items():
    layer, name = int(path.split("/")[1].split("_")[1]), path.split("/")[3]
    lora = getattr(wrapped.base_model.model.bert.encoder.layer[layer].attention.self, name)
    with torch.no_grad():
      lora.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ad["a"])))
      lora.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ad["b"])))
  ids = np.random.default_rng(2).integers(3, 99, (4, 10))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  weights = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
  logits = wrapped(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  torch_loss = (logits * torch.from_numpy(weights)).sum()
  torch_loss.backward()

  module = hub.load_pretrained(str(tmp_path / "base"), head="classification", num_labels=3)[0]

  def loss(trainable):
    out = module.apply({"params": method.assemble(trainable, q)}, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    return jnp.sum(out * weights), out

  (value, ours_logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
  np.testing.assert_allclose(np.asarray(ours_logits), logits.detach().numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(float(value), torch_loss.item(), rtol=1e-5, atol=1e-4)
  for path, grad in grads["adapters"].items():
    layer, name = int(path.split("/")[1].split("_")[1]), path.split("/")[3]
    lora = getattr(wrapped.base_model.model.bert.encoder.layer[layer].attention.self, name)
    for factor, theirs in (("a", lora.lora_A["default"].weight.grad), ("b", lora.lora_B["default"].weight.grad)):
      assert float(theirs.abs().max()) > 1e-3
      np.testing.assert_allclose(np.asarray(grad[factor]), theirs.numpy(), rtol=1e-4, atol=1e-5,
                                 err_msg=f"{path} {factor}")


def _tiny_glue(tmp_path):
  """A BERT of widths 64 and 128 (whole nf4 blocks) with a tokenizer, and a tiny RTE folder."""
  from tests.experiments import conftest as experiments
  (tmp_path / "bert").mkdir()
  (tmp_path / "glue").mkdir()
  model = experiments.make_tiny_bert(tmp_path / "bert", hidden_size=64, intermediate_size=128)
  return model, experiments.write_rte(tmp_path / "glue", n_train=16, n_dev=8)


@pytest.mark.integration
def test_an_nf4_runs_peft_export_names_the_bitsandbytes_settings_that_load_its_base(tmp_path):
  from rmlora_jax.recipes import export, glue
  from tests.experiments.test_glue import tiny_config

  model, data = _tiny_glue(tmp_path)
  config = tiny_config(model, data, tmp_path / "run", method="lora",
                       **{"model.quantize": "nf4", "data.cache_dir": str(tmp_path / "tokens")})
  glue.train_and_evaluate(config, config.workdir)
  folder = export.export_run(tmp_path / "run", fmt="peft")
  note = json.loads((folder / "quantization.json").read_text())
  assert note["format"] == "nf4" and len(note["kernels"]) == 12 and "BitsAndBytesConfig" in note["note"]
  assert note["bitsandbytes"]["llm_int8_skip_modules"] == ["bert.pooler.dense", "classifier"]
  merged = json.loads((export.export_run(tmp_path / "run", fmt="merged") / "quantization.json").read_text())
  assert "bitsandbytes" not in merged  # a merged folder's weights are not the run's quantised kernels
  # Loaded with those settings, transformers quantises exactly the run's kernels, to the run's values.
  loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      model, num_labels=2, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
          bnb_4bit_compute_dtype=torch.float32, **note["bitsandbytes"]))
  four_bit = {n for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
  assert len(four_bit) == 12 and not four_bit & set(note["bitsandbytes"]["llm_int8_skip_modules"])
  _, params, _, _ = hub.load_pretrained(model, head="classification", num_labels=2)
  deq = paths.flatten_with_paths(rl.dequantize_base(rl.quantize_base(params, rl.QuantizeSpec(format="nf4"))))
  for i in range(2):
    for module, ours in MODULES.items():
      weight = loaded.bert.encoder.layer[i].get_submodule(module).weight
      theirs = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().numpy()
      np.testing.assert_allclose(np.asarray(deq[f"encoder/layer_{i}/{ours}/kernel"]).T, theirs, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_the_peft_anchor_trains_qlora_over_bitsandbytes_nf4_and_refuses_other_formats(tmp_path):
  from experiments import peft_glue
  from tests.experiments.test_glue import tiny_config

  model, data = _tiny_glue(tmp_path)
  config = tiny_config(model, data, tmp_path / "peft", method="lora",
                       **{"model.quantize": "nf4", "data.cache_dir": str(tmp_path / "tokens")})
  results = peft_glue.run(config, config.workdir)
  assert results["method"] == "peft_lora" and results["quantize"]["library"] == "bitsandbytes"
  assert len(results["quantize"]["modules"]) == 12  # the six block kernels of both layers; pooler and head float
  assert all(np.isfinite(h["loss"]) for h in results["history"]["train"])
  config = tiny_config(model, data, tmp_path / "peft8", method="lora", **{"model.quantize": "int8"})
  with pytest.raises(ValueError, match=r"config.model.quantize='int8': the PEFT anchor quantises through "
                                       r"bitsandbytes, whose only format equal to ours is nf4"):
    peft_glue.run(config, config.workdir)
  config = tiny_config(model, data, tmp_path / "peftada", method="adalora", **{"model.quantize": "nf4"})
  with pytest.raises(ValueError, match=r"config.model.quantize='nf4': the PEFT anchor runs LoRA over a 4-bit base, "
                                       r"not AdaLoRA"):
    peft_glue.run(config, config.workdir)
  assert not (tmp_path / "peft8").exists() and not (tmp_path / "peftada").exists()  # refused before any work
