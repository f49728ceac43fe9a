"""A qwix-LoRA NNX BERT trained with RM-LoRA, exported as a PEFT adapter, gives its logits in PEFT.

The NNX model is written here (as a user's own would be) with this
library's BERT parameter paths, so `peft_format.save_peft` finds each
adapter's transformers module by the same names as for our linen port.
"""

import numpy as np
import optax
import pytest

qwix = pytest.importorskip("qwix")

import jax
import jax.numpy as jnp
import torch
import transformers
from flax import nnx

import rmlora_jax as rl
from rmlora_jax import paths, peft_format, qwix_lora
from rmlora_jax.models import hub
from tests.test_peft_format import peft_logits, tiny_checkpoint, torch_inputs

RANK, ALPHA, NUM_LABELS = 4, 8.0, 3


class Attention(nnx.Module):

  def __init__(self, hidden, heads, eps, rngs):
    self.query, self.key, self.value, self.output = (nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(4))
    self.layer_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
    self.heads = heads

  def __call__(self, x, keep):
    b, t, h = x.shape
    split = lambda y: y.reshape(b, t, self.heads, h // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(h // self.heads)
    logits = jnp.where(keep[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    ctx = jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, h)
    return self.layer_norm(x + self.output(ctx))


class Layer(nnx.Module):

  def __init__(self, config, rngs):
    h, eps = config.hidden_size, config.layer_norm_eps
    self.attention = Attention(h, config.num_attention_heads, eps, rngs)
    self.intermediate = nnx.Linear(h, config.intermediate_size, rngs=rngs)
    self.output = nnx.Linear(config.intermediate_size, h, rngs=rngs)
    self.output_layer_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)

  def __call__(self, x, keep):
    x = self.attention(x, keep)
    return self.output_layer_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class Embeddings(nnx.Module):

  def __init__(self, config, rngs):
    h = config.hidden_size
    self.word_embeddings = nnx.Embed(config.vocab_size, h, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, h, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, h, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)

  def __call__(self, ids):
    positions = jnp.arange(ids.shape[1])[None]
    return self.layer_norm(self.word_embeddings(ids) + self.position_embeddings(positions)
                           + self.token_type_embeddings(jnp.zeros_like(ids)))


class Encoder(nnx.Module):

  def __init__(self, config, rngs):
    self.num_layers = config.num_hidden_layers
    for i in range(self.num_layers):
      setattr(self, f"layer_{i}", Layer(config, rngs))

  def __call__(self, x, keep):
    for i in range(self.num_layers):
      x = getattr(self, f"layer_{i}")(x, keep)
    return x


class Pooler(nnx.Module):

  def __init__(self, hidden, rngs):
    self.dense = nnx.Linear(hidden, hidden, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x[:, 0]))


class NnxBert(nnx.Module):
  """BERT for sequence classification in NNX, one ``nnx.Linear`` per projection."""

  def __init__(self, config, num_labels, rngs):
    self.embeddings = Embeddings(config, rngs)
    self.encoder = Encoder(config, rngs)
    self.pooler = Pooler(config.hidden_size, rngs)
    self.classifier = nnx.Linear(config.hidden_size, num_labels, rngs=rngs)

  def __call__(self, ids, mask):
    return self.classifier(self.pooler(self.encoder(self.embeddings(ids), mask.astype(bool))))


def test_rm_lora_on_a_qwix_lora_nnx_bert_exports_to_peft_with_its_logits(tmp_path):
  batch = tiny_checkpoint(tmp_path / "base", "bert", num_labels=NUM_LABELS)
  _, params, _, hf_config = hub.load_pretrained(str(tmp_path / "base"), head="classification", num_labels=NUM_LABELS)
  model = NnxBert(hf_config, NUM_LABELS, nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  assert set(paths.flatten_with_paths(state.to_pure_dict())) == set(paths.flatten_with_paths(params))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  torch_base = lambda: transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
  with torch.no_grad():
    base_logits = torch_base()(**torch_inputs(batch)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(ids, mask)), base_logits, atol=1e-4, rtol=0)  # the port is BERT

  model = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=r".*attention/(query|value)", rank=RANK,
                                                            alpha=ALPHA), ids, mask, rngs=nnx.Rngs(1))
  mask_tx = lambda: rl.random_direction_mask(2, seed=5)
  optimizer = nnx.Optimizer(model, qwix_lora.in_adapter_layout(optax.chain(mask_tx(), optax.adam(5e-2), mask_tx())),
                            wrt=nnx.LoRAParam)
  labels = jnp.asarray([0, 2, 1])

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      penalty = rl.ortho_penalty(qwix_lora.as_adapters(nnx.state(model, nnx.LoRAParam)))
      ce = optax.softmax_cross_entropy_with_integer_labels(model(ids, mask), labels).mean()
      return ce + 0.01 * penalty
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(8)]
  assert losses[-1] < losses[0]
  ours = np.asarray(model(ids, mask))
  assert np.abs(ours - base_logits).max() > 0.05  # the trained adapters matter

  adapters = qwix_lora.as_adapters(nnx.state(model, nnx.LoRAParam))
  assert sorted(adapters) == [f"encoder/layer_{i}/attention/{m}/kernel" for i in range(2) for m in ("query", "value")]
  head = {p: v for p, v in paths.flatten_with_paths(params).items() if p.startswith("classifier/")}
  spec = rl.LoraSpec(rank=RANK, alpha=ALPHA, targets=(r"attention/(query|value)/kernel",))
  peft_format.save_peft(tmp_path / "peft", params=params, adapters=adapters, spec=spec, trained=head,
                        hf_config=hf_config, head="classification", base_model_name_or_path=tmp_path / "base")
  np.testing.assert_allclose(peft_logits(torch_base(), tmp_path / "peft", batch), ours, atol=1e-4, rtol=0)
