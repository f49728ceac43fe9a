"""The RM-LoRA authors' training loop, written here in PyTorch, against our jitted train step.

The reference follows the loop of the authors' released code as described in
docs/FAMILY.md (and ../shared/papers/README.md): the loss with the
orthogonality penalty (plain Frobenius norms averaged over the matrices,
weight 0.1), backward, clipping of all trainable gradients at norm 1, then,
from the second optimizer step on, each LoRA gradient multiplied by a 0/1
mask (rows of A and columns of B in an index set; one shared set or two
independent ones) and, in their code, every other trainable gradient (the
head) by zero; then torch's AdamW and a linear schedule without warm-up.
Our default composition (masks before and after AdamW) is a variant: the
unselected entries of each factor are put back after the step.

Both sides start from the same tiny BERT checkpoint, the same adapters and
head, see the same batches with dropout off, and use the same index sets
(ours, read from `rmlora_jax.direction_mask` and handed to the reference).
After 20 steps every adapter and head entry must agree to 1e-5.
"""

import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import numpy as np
import pytest
import torch
import transformers

import rmlora_jax as rl
from rmlora_jax import methods, trainer, training
from rmlora_jax import paths as paths_lib
from rmlora_jax.data import glue as glue_data
from rmlora_jax.models import hub
from rmlora_jax.tasks import classification

STEPS, BATCH, SEQ, RANK, R_HAT, ALPHA, LR, SEED = 20, 8, 12, 4, 2, 8.0, 1e-3, 3

# (method, RmOptions overrides): the authors' loop in both index-set variants,
# with and without their head's zero gradient; our default composition; the
# plain-LoRA control.
AUTHORS = dict(mask_mode="gradient", mask_start_step=1)
CASES = {
    "lora": ("lora", {}),
    "lora_frozen_head": ("lora", dict(AUTHORS, emulate_frozen_head=True)),
    "rm_v1": ("rm_lora", dict(AUTHORS, mask_sets="shared")),
    "rm_v2": ("rm_lora", dict(AUTHORS, mask_sets="independent")),
    "rm_v2_frozen_head": ("rm_lora", dict(AUTHORS, mask_sets="independent", emulate_frozen_head=True)),
    "gm_v1_frozen_head": ("gm_lora", dict(AUTHORS, mask_sets="shared", emulate_frozen_head=True)),
    "rm_update_default": ("rm_lora", {}),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random BertForSequenceClassification (dropout 0), saved; biases and norms off their init."""
  folder = tmp_path_factory.mktemp("tiny_bert_authors")
  config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                   vocab_size=99, max_position_embeddings=64, num_labels=2,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  folder = str(folder)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    lengths = rng.integers(4, SEQ + 1, BATCH)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    batches.append({"input_ids": (rng.integers(1, 99, (BATCH, SEQ)) * mask).astype(np.int32),
                    "attention_mask": mask, "token_type_ids": np.zeros((BATCH, SEQ), np.int32),
                    "labels": rng.integers(0, 2, BATCH).astype(np.int32),
                    "weights": np.ones(BATCH, np.float32), "index": np.arange(BATCH, dtype=np.int32)})
  _BATCHES[folder] = batches
  return folder, batches


@functools.cache
def ours_case(folder, case):
  """`ours` for one of CASES on the checkpoint's batches, computed once per test session."""
  return ours(folder, _BATCHES[folder], *CASES[case])


_BATCHES = {}


def ours(folder, batches, method_name, options):
  """20 steps of our jitted train step; returns the initial and final trainable trees as NumPy."""
  module, params, _, hf_config = hub.load_pretrained(folder, head="classification", num_labels=2)
  spec = rl.LoraSpec(rank=RANK, alpha=ALPHA, targets=hub.default_lora_targets(hf_config))
  settings = methods.MethodSettings(
      name=method_name, spec=spec, train_patterns=(r"classifier/.*",), seed=SEED, total_steps=STEPS,
      adapter_apply="low_rank", max_grad_norm=1.0, weight_decay=0.0,
      options=methods.RmOptions(num_directions=R_HAT, **options))
  method = methods.make_method(settings)
  tx = method.optimizer(trainer.lr_schedule(LR, STEPS, 0.0))
  task = classification.TextClassification(spec=glue_data.get_task("sst2"), buckets=(SEQ,))
  mesh = training.make_mesh()
  state, shardings = training.init_state(method, tx, params, key=jax.random.key(5), mesh=mesh,
                                         param_specs=jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params))
  start = jax.tree.map(np.asarray, state.trainable)
  step = training.make_train_step(module, method, tx, task, seed=SEED, mesh=mesh, state_sharding=shardings,
                                  split=True)  # as the trainer runs it
  for batch in batches:
    state, _ = step(state, params, batch)
  return start, jax.tree.map(np.asarray, state.trainable)


def torch_name(path):
  """Our kernel path (encoder/layer_0/attention/query/kernel) -> the torch Linear's module name."""
  _, layer, *rest, _ = path.split("/")
  inner = {("attention", "query"): "attention.self.query", ("attention", "key"): "attention.self.key",
           ("attention", "value"): "attention.self.value", ("attention", "output"): "attention.output.dense",
           ("intermediate",): "intermediate.dense", ("output",): "output.dense"}[tuple(rest)]
  return f"bert.encoder.layer.{layer.removeprefix('layer_')}.{inner}"


class LoraLinear(torch.nn.Module):
  """``base(x) + (alpha / r) x Aᵀ Bᵀ`` with A (r, d_in), B (d_out, r): LoRA written by hand."""

  def __init__(self, base, a, b, scale):
    super().__init__()
    self.base, self.scale = base, scale
    self.lora_A = torch.nn.Parameter(torch.tensor(a))
    self.lora_B = torch.nn.Parameter(torch.tensor(b))

  def forward(self, x):
    return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


@functools.partial(jax.jit, static_argnames=("factor", "independent"))
def _draw(step, path_hash, *, factor, independent):
  return rl.direction_mask(SEED, step, "", RANK, R_HAT, path_hash=path_hash, factor=factor, independent=independent)


def masks_at(step, paths, options):
  """Our draw for each adapter at ``step``: {path: (rows of A, columns of B)} as 0/1 arrays.

  `rl.direction_mask` of the adapter's path within the trainable tree
  (``adapters/<kernel path>``), jitted with the path's hash as an argument.
  """
  independent = options.get("mask_sets") == "independent"
  return {p: tuple(np.asarray(_draw(step, paths_lib.path_hash(f"adapters/{p}"), factor=f, independent=independent))
                   for f in "ab")
          for p in paths}


def reference(folder, batches, start, method_name, options):
  """The authors' training step in PyTorch (see the module docstring); returns {path: (A, B)} and the head."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # these tiny matrices only lose from threads competing with XLA's
  try:
    return _reference(folder, batches, start, method_name, options)
  finally:
    torch.set_num_threads(threads)


def _reference(folder, batches, start, method_name, options):
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification.from_pretrained(folder).eval()  # dropout is 0 anyway
  for p in model.parameters():
    p.requires_grad_(False)
  loras = {}
  for path, ad in start["adapters"].items():
    parent_name, _, child = torch_name(path).rpartition(".")
    parent = model.get_submodule(parent_name)
    loras[path] = LoraLinear(getattr(parent, child), ad["a"], ad["b"], ALPHA / RANK)
    setattr(parent, child, loras[path])
  with torch.no_grad():  # our (d_in, d_out) kernel is torch's weight transposed
    model.classifier.weight.copy_(torch.tensor(start["head"]["classifier/kernel"].T))
    model.classifier.bias.copy_(torch.tensor(start["head"]["classifier/bias"]))
  head = [model.classifier.weight, model.classifier.bias]
  for p in head:
    p.requires_grad_(True)
  factors = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
  params = factors + head
  opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
  masked = method_name in ("gm_lora", "rm_lora")
  ortho = method_name in ("r_lora", "rm_lora")
  update_mode = masked and options.get("mask_mode", "update") == "update"
  first = options.get("mask_start_step", 0)
  eye = torch.eye(RANK)
  for t, batch in enumerate(batches):
    logits = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                   attention_mask=torch.tensor(batch["attention_mask"]),
                   token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long)).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(batch["labels"], dtype=torch.long))
    if ortho:  # plain Frobenius norms, averaged over the 2 x adapters matrices, weight 0.1
      norms = [torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - eye) for m in loras.values()]
      norms += [torch.linalg.matrix_norm(m.lora_B.T @ m.lora_B - eye) for m in loras.values()]
      loss = loss + 0.1 * torch.stack(norms).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    masks = None
    if t >= first and (masked or options.get("emulate_frozen_head")):
      ones = (np.ones(RANK, np.float32),) * 2
      masks = masks_at(t, loras, options) if masked else {p: ones for p in loras}
      for path, m in loras.items():
        rows, cols = masks[path]
        m.lora_A.grad *= torch.tensor(rows)[:, None]
        m.lora_B.grad *= torch.tensor(cols)[None, :]
      if options.get("emulate_frozen_head"):
        for p in head:
          p.grad.zero_()
    before = [p.detach().clone() for p in params]
    opt.step()
    sched.step()
    if update_mode and masks is not None:  # our default: unselected directions do not move at all
      with torch.no_grad():
        for k, (path, m) in enumerate(loras.items()):  # factors are [A, B] per adapter, in this order
          rows, cols = (torch.tensor(x) for x in masks[path])
          m.lora_A.copy_(rows[:, None] * m.lora_A + (1 - rows[:, None]) * before[2 * k])
          m.lora_B.copy_(cols[None, :] * m.lora_B + (1 - cols[None, :]) * before[2 * k + 1])
        if options.get("emulate_frozen_head"):
          for k, p in enumerate(head):
            p.copy_(before[len(factors) + k])
  adapters = {p: (m.lora_A.detach().numpy(), m.lora_B.detach().numpy()) for p, m in loras.items()}
  return adapters, model.classifier.weight.detach().numpy().T, model.classifier.bias.detach().numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_twenty_steps_equal_the_authors_loop_in_pytorch(checkpoint, case):
  folder, batches = checkpoint
  method_name, options = CASES[case]
  start, got = ours_case(folder, case)
  adapters, kernel, bias = reference(folder, batches, start, method_name, options)
  assert len(adapters) == 12  # six matrices in each of two layers
  moved = 0.0
  for path, (a, b) in adapters.items():
    np.testing.assert_allclose(got["adapters"][path]["a"], a, atol=1e-5, rtol=0, err_msg=path)
    np.testing.assert_allclose(got["adapters"][path]["b"], b, atol=1e-5, rtol=0, err_msg=path)
    moved = max(moved, float(np.abs(b).max()))
  np.testing.assert_allclose(got["head"]["classifier/kernel"], kernel, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["head"]["classifier/bias"], bias, atol=1e-5, rtol=0)
  # The comparison has something to compare: B left zero, the head moved.
  assert moved > 1e-3
  assert np.abs(kernel - start["head"]["classifier/kernel"]).max() > 1e-4


def test_the_variants_differ_where_they_should(checkpoint):
  """Each switch changes the numbers (else the equalities above could not tell the variants apart)."""
  folder, _ = checkpoint
  runs = {case: ours_case(folder, case) for case in ("rm_v1", "rm_v2", "rm_v2_frozen_head", "rm_update_default")}
  a = lambda case: np.concatenate([ad["a"].ravel() for ad in runs[case][1]["adapters"].values()])
  assert np.abs(a("rm_v1") - a("rm_v2")).max() > 1e-4
  assert np.abs(a("rm_v1") - a("rm_update_default")).max() > 1e-4
  # Frozen head: moved by step 0's update and Adam's leftover momentum only, so less far.
  start = runs["rm_v2"][0]["head"]["classifier/kernel"]
  drift = lambda case: np.abs(runs[case][1]["head"]["classifier/kernel"] - start).max()
  assert drift("rm_v2_frozen_head") < 0.8 * drift("rm_v2")
