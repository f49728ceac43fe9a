"""The SFT experiment: response-only loss, chat-template data and generated-answer scores."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import sft as sft_config
from rmlora_jax import metrics as metrics_lib
from rmlora_jax import training
from rmlora_jax.data import sft
from rmlora_jax.models import load_pretrained
from rmlora_jax.tasks import causal_lm
from rmlora_jax.recipes import sft as sft_task
from tests.experiments.conftest import WORDS, set_overrides

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def make_tiny_chat_llama(folder):
  """A 2-layer random Llama with a word-level tokenizer and a chat template, saved in ``folder``."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {t: i for i, t in enumerate(SPECIAL + ["user", "assistant", "say", "answer"] + list(WORDS))}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = TEMPLATE
  fast.save_pretrained(folder)
  config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=40,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    tie_word_embeddings=True, initializer_range=0.5)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory):
  return make_tiny_chat_llama(tmp_path_factory.mktemp("tiny_chat_llama"))


@pytest.fixture(scope="module")
def records_and_reference(tiny_chat_llama, tmp_path_factory):
  """A 30-record JSONL file and transformers' answers to its last 6 prompts (max_new_tokens=5)."""
  path = write_records(tmp_path_factory.mktemp("records") / "d.jsonl", 30)
  dev = sft.load_file(path)[-6:]
  want = reference_answers(tiny_chat_llama, dev, 5)
  assert len(set(want.values())) > 2  # answers that differ, so a mix-up of rows cannot pass
  em = 100 * np.mean([metrics_lib.exact_match(want[e.id], e.references) for e in dev])
  f1 = 100 * np.mean([metrics_lib.token_f1(want[e.id], e.references) for e in dev])
  return path, dev, want, {"exact_match": em, "f1": f1}


def write_records(path, n, seed=0):
  """JSONL "say <words>" -> "<the last word>" records."""
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(n):
    words = list(rng.choice(WORDS, size=rng.integers(3, 9)))
    lines.append(json.dumps({"id": f"q{i}", "prompt": "say " + " ".join(words), "response": words[-1]}))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_loss_mask_covers_exactly_the_response_and_end_of_turn(tiny_chat_llama, tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(tiny_chat_llama)
  examples = sft.load_file(write_records(tmp_path / "d.jsonl", 5))
  long = sft.SftExample(id="long", prompt="say " + " ".join(["cat"] * 40), response="dog")
  f = sft.tokenize(examples + [long], tok, max_seq_len=24)
  assert f.dropped == 1 and len(f) == 5 and [e.id for e in f.examples] == [e.id for e in examples]
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  for i, e in enumerate(examples):
    # The rendered conversation's tokens, tokenized independently of render().
    text = f"<|im_start|>user\n{e.prompt}<|im_end|>\n<|im_start|>assistant\n{e.response}<|im_end|>\n"
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert list(f.input_ids[i, :f.lengths[i]]) == want
    assert list(f.input_ids[i][f.loss_mask[i] > 0]) == tok(e.response, add_special_tokens=False)["input_ids"] + [im_end]
    assert f.prompt_lengths[i] == f.lengths[i] - int(f.loss_mask[i].sum())
  plain = sft.tokenize(examples, tok, max_seq_len=24, chat_template=False)
  assert list(plain.input_ids[0][plain.loss_mask[0] > 0]) == (
      tok(examples[0].response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


def test_response_loss_is_the_numpy_cross_entropy_of_response_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
  ids = rng.integers(0, 11, size=(3, 6))
  mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
  weights = np.array([1.0, 1.0, 0.0], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  terms = [-log_p[b, t - 1, ids[b, t]] for b in range(3) for t in range(1, 6) if mask[b, t] and weights[b]]
  got = causal_lm.response_loss(logits, ids, mask, weights)
  np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)


def tiny_sft_config(model, train_file, workdir, **overrides):
  config = sft_config.get_config(f"model={model},method=lora")
  config.data.train_file = train_file
  config.data.dev_examples = 6
  config.data.eval_subset = -1
  config.data.buckets = (32,)
  config.workdir = str(workdir)
  config.max_seq_len = 32
  config.batch_size = 4
  config.max_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.max_new_tokens = 5
  config.progress = False
  config.lora.rank = 2
  return set_overrides(config, overrides)


def reference_answers(folder, examples, max_new_tokens):
  """transformers' greedy generate on each prompt alone (no padding), decoded and cut as the task does."""
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
  out = {}
  for e in examples:
    text = tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
      new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                           pad_token_id=0)[0, ids.shape[1]:].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in stop), len(new))]
    lines = [l.strip() for l in tok.decode(new, skip_special_tokens=True).splitlines() if l.strip()]
    out[e.id] = lines[0] if lines else ""
  return out


def test_sft_runs_end_to_end_and_scores_the_untuned_model_as_transformers_generates(
    tiny_chat_llama, records_and_reference, tmp_path):
  path, dev, want, scores = records_and_reference
  config = tiny_sft_config(tiny_chat_llama, path, tmp_path / "run")
  results = sft_task.train_and_evaluate(config, config.workdir)
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["task"] == "sft" and saved["method"] == "lora" and saved["steps"] == 4
  assert saved["train_examples"] == 24 and saved["eval_examples"] == 6
  assert set(saved["metrics"]) == {"exact_match", "f1"} and saved["metrics"] == results["metrics"]
  # 7 matrices per layer adapted, the LM head and everything else frozen: r (d_in + d_out) each.
  h, ff, kv = 32, 40, 2 * 8
  per_layer = 2 * ((h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + ff) + (ff + h))
  assert saved["trainable_params"] == 2 * per_layer
  # The untuned model's answers (left-padded batches, KV cache, jitted) equal
  # those of transformers' generate on each prompt alone, and so do its scores.
  module, params, tok, _ = load_pretrained(tiny_chat_llama, head="causal_lm")
  task = sft_task.build_task(config, tok, [], dev)
  generate = jax.jit(lambda batch: task.generate(module, params, batch))
  assert task.answers(generate, 4) == want
  assert saved["base"]["exact_match"] == pytest.approx(scores["exact_match"])
  assert saved["base"]["f1"] == pytest.approx(scores["f1"])


@pytest.mark.parametrize("overrides, message", [
    ({"data.train_file": "/nonexistent.jsonl"}, r"config.data.train_file='/nonexistent.jsonl' is not a file"),
    ({"data.dev_examples": 30}, r"config.data.dev_examples=30 must be in 1..29"),
    ({"temperature": -1.0}, r"config.temperature must be >= 0"),
    ({"top_p": 0.0}, r"config.top_p must be in \(0, 1\]"),
])
def test_bad_sft_config_fails_with_the_setting_named(overrides, message, tmp_path):
  config = tiny_sft_config("/nonexistent/model", write_records(tmp_path / "d.jsonl", 30), tmp_path / "w", **overrides)
  with pytest.raises(ValueError, match=message):
    sft_task.validate(config)
    sft_task.load_examples(config)


def test_bad_records_name_file_and_line(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"prompt": "x", "response": "y"}\n{"prompt": "x"}\n')
  with pytest.raises(ValueError, match=r"a.jsonl:2: no string field 'response'"):
    sft.load_file(tmp_path / "a.jsonl")
  (tmp_path / "b.jsonl").write_text('{"prompt": "x", "response": "y"}\nnot json\n')
  with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
    sft.load_file(tmp_path / "b.jsonl")


def test_datasets_loader_reads_a_local_folder_in_hub_layout(tmp_path):
  folder = tmp_path / "hub_copy"
  folder.mkdir()
  write_records(folder / "train.jsonl", 7, seed=1)
  write_records(folder / "validation.jsonl", 3, seed=2)
  train, dev = sft.load_hub(str(folder), "train"), sft.load_hub(str(folder), "validation")
  assert train == sft.load_file(folder / "train.jsonl") and dev == sft.load_file(folder / "validation.jsonl")
  with pytest.raises(ValueError, match=r"no string field 'question'"):
    sft.load_hub(str(folder), "train", prompt_field="question")


def test_squad_questions_become_prompt_response_pairs_held_out_by_article(tmp_path):
  from tests.experiments.test_squad import write_squad  # pylint: disable=g-import-not-at-top

  config = sft_config.get_config("model=unused")
  config.data.dir = str(tmp_path)
  write_squad(tmp_path / "train-v1.1.json")
  config.data.dev_articles, config.data.eval_subset = 1, -1
  train, dev, source = sft_task.load_examples(config)
  raw = json.loads((tmp_path / "train-v1.1.json").read_text())["data"]
  last = [(p["context"], q) for p in raw[-1]["paragraphs"] for q in p["qas"]]
  assert source == str(tmp_path / "train-v1.1.json") and len(dev) == len(last)
  for e, (context, q) in zip(dev, last):
    assert e.id == q["id"] and e.response == q["answers"][0]["text"]
    assert e.references == tuple(a["text"] for a in q["answers"])
    assert context.strip() in e.prompt and q["question"].strip() in e.prompt
  assert not {e.id for e in train} & {e.id for e in dev}


def test_peft_anchor_trains_on_the_same_batches_and_generates_the_same_way(
    tiny_chat_llama, records_and_reference, tmp_path):
  """PEFT's LoRA through experiments.peft_sft: our parameter count, and its untrained answers equal ours."""
  from experiments import peft_sft  # pylint: disable=g-import-not-at-top

  path, _, _, scores = records_and_reference
  config = tiny_sft_config(tiny_chat_llama, path, tmp_path / "peft", learning_rate=1e-12)
  results = peft_sft.run(config, config.workdir)
  assert results["method"] == "peft_lora" and results["task"] == "sft" and results["steps"] == 4
  h, ff, kv = 32, 40, 2 * 8
  per_layer = 2 * ((h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + ff) + (ff + h))
  assert results["trainable_params"] == 2 * per_layer
  # At a learning rate of 1e-12 the adapters stay at B = 0: PEFT's generated
  # answers are the untuned model's, which transformers gives on each prompt alone.
  assert results["metrics"]["exact_match"] == pytest.approx(scores["exact_match"])
  assert results["metrics"]["f1"] == pytest.approx(scores["f1"])
  losses = [h["task_loss"] for h in results["history"]["train"]]
  assert all(np.isfinite(losses)) and len(losses) == 4


def test_lora_from_peft_initialisation_trains_step_by_step_as_peft_does(
    tiny_chat_llama, records_and_reference, tmp_path):
  """Our LoRA started from the PEFT anchor's saved initialisation: the same loss at every step, to float noise.

  The two trainers share nothing but the task's batches: PEFT's LoRA layers,
  torch's AdamW, clipping and transformers' warm-up schedule on one side, our
  decoder, adapters and optax chain on the other.
  """
  from experiments import peft_sft  # pylint: disable=g-import-not-at-top

  path, _, _, _ = records_and_reference
  overrides = dict(learning_rate=3e-2, max_steps=6, checkpoint_every_steps=100)
  theirs = peft_sft.run(tiny_sft_config(tiny_chat_llama, path, tmp_path / "peft", **overrides),
                        str(tmp_path / "peft"))
  config = tiny_sft_config(tiny_chat_llama, path, tmp_path / "ours",
                           init_adapters=str(tmp_path / "peft" / "initial_adapter"), **overrides)
  ours = sft_task.train_and_evaluate(config, config.workdir)
  want = np.array([h["task_loss"] for h in theirs["history"]["train"]])
  got = np.array([h["task_loss"] for h in ours["history"]["train"]])
  assert len(want) == 6 and abs(want[-1] - want[0]) > 0.1  # the adapters moved the loss
  np.testing.assert_allclose(got, want, rtol=2e-4)
  # The trained adapters too: ours, exported in PEFT's format, against the
  # file PEFT saved after the same six steps, tensor by tensor (each moved ~0.06).
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from rmlora_jax.recipes import export as export_lib  # pylint: disable=g-import-not-at-top

  out = export_lib.export_run(config.workdir, fmt="peft")
  peft_trained = load_file(tmp_path / "peft" / "adapter" / "adapter_model.safetensors")
  exported = load_file(out / "adapter_model.safetensors")
  assert set(exported) == set(peft_trained) and len(exported) == 2 * 7 * 2
  start = load_file(tmp_path / "peft" / "initial_adapter" / "adapter_model.safetensors")
  for key, value in peft_trained.items():
    assert np.abs(value - start[key]).max() > 1e-2, key  # trained
    np.testing.assert_allclose(exported[key], value, atol=5e-4, err_msg=key)  # measured: <= 1e-4


@pytest.mark.parametrize("method", ["rm_lora", "lora2"])
def test_a_scanned_run_trains_and_reports_as_the_unrolled_one(method, tiny_chat_llama, records_and_reference, tmp_path):
  # Through the trainer, results.json included: the scanned model's adapters
  # are stored stacked over the layers, yet the run, its counts and its ranks
  # are those of the unrolled model's per-layer adapters (LoRA²'s pruned to its budget).
  path, *_ = records_and_reference
  saved = {}
  options = {"rm.num_directions": 1} if method == "rm_lora" else {"lora2.delta_t": 1}
  for scan in (False, True):
    config = tiny_sft_config(tiny_chat_llama, path, tmp_path / f"scan_{scan}", method=method,
                             **{**options, "model.scan_layers": scan})
    sft_task.train_and_evaluate(config, config.workdir)
    saved[scan] = json.loads((tmp_path / f"scan_{scan}" / "results.json").read_text())
    ckpt = training.Checkpointer(str(tmp_path / f"scan_{scan}" / "checkpoints"), create=False)
    stored = ckpt.state_tree(ckpt.latest_step())["trainable"]["adapters"]
    ckpt.close()
    assert len(stored) == (7 if scan else 14), sorted(stored)  # two layers, seven matrices each
  h, ff, kv = 32, 40, 2 * 8
  per_layer = 2 * ((h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + ff) + (ff + h))
  if method == "rm_lora":
    for scan in (False, True):
      assert saved[scan]["trainable_params"] == 2 * per_layer, scan
  assert saved[True]["trainable_params"] == saved[False]["trainable_params"]
  if method == "lora2":  # pruned from r = 8 to the budget's average of 4, over 14 per-layer adapters
    assert len(saved[True]["ranks"]) == 14 and all(p.startswith("model/layers_") for p in saved[True]["ranks"])
    assert saved[True]["total_rank"] == {"initial": 8 * 14, "final": 4 * 14}
  losses = {scan: [row["loss"] for row in saved[scan]["history"]["train"]] for scan in saved}
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  assert saved[True]["ranks"] == saved[False]["ranks"]
