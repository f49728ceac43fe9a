"""Instruction tuning (SFT) of a decoder LLM: loss on response tokens, scored by generated answers.

  python -m experiments.sft --config=configs/sft.py:method=rm_lora \
      --config.data.dir=../shared/data/squad --config.workdir=runs/sft_rm_lora

The default model is the embedded SmolLM2-135M-Instruct (``model=smollm2``,
installed by scripts/setup.sh); ``model=<folder or hub id>`` takes any
Llama, Qwen2 or Gemma causal LM. With ``data.dir`` a SQuAD v1.1 folder, each
question becomes a prompt (passage and question) and its first answer the
response; the last ``data.dev_articles`` articles are held out and scored by
exact match and F1 of the generated answers. ``data.train_file`` takes JSON
or JSONL ``{"prompt", "response"[, "answers"]}`` records instead.

Shares configs/base.py's keys (seed, workdir, max_seq_len, batch_size,
num_epochs, learning_rate, lora.*, rm.*, adalora.*, sora.*, lora2.*,
optim.*, mesh.*, data.dir), so an override means the same as for GLUE.
"""

from ml_collections import config_dict

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_config(arg)
  config.task = "sft"
  del config.head_bias  # regression heads only
  if "model" not in args:
    config.model.name_or_path = "smollm2"
  # The layers as one nn.scan on a GPU or TPU (one layer to compile, not 30),
  # unrolled on a CPU; True or False forces either.
  config.model.scan_layers = config_dict.placeholder(bool)
  # Sized for a CPU (about 15 s a step for SmolLM2-135M on 2 cores); on an
  # accelerator raise batch_size, max_steps and max_seq_len.
  config.max_seq_len = 256  # prompt + response tokens; longer examples are left out (and counted)
  config.batch_size = 4
  config.num_epochs = 1
  config.max_steps = 120
  config.eval_every_steps = -1  # -1: at the end of each epoch (and of the run)
  config.chat_template = True  # the tokenizer's chat template; False: "prompt\nresponse<eos>"
  config.eval_base = True  # score the untuned model on the held-out prompts first
  # Generation at evaluation: greedy (temperature 0) or sampled (temperature, top_p).
  config.max_new_tokens = 24
  config.temperature = 0.0
  config.top_p = 1.0
  config.sora.xi = 0.005
  config.lora2.ortho_weight = 0.1

  d = config_dict.ConfigDict()
  # A SQuAD v1.1 folder (train-v1.1.json or the offline train-v1.1-subset.json).
  d.dir = config_dict.placeholder(str)
  # JSON or JSONL prompt/response records; override data.dir.
  d.train_file = config_dict.placeholder(str)
  d.dev_file = config_dict.placeholder(str)
  d.prompt_field = "prompt"
  d.response_field = "response"
  d.hub_name = ""  # a `datasets` id with train/validation splits, when no files are given
  d.dev_articles = 4  # SQuAD: the last this-many articles are held out
  d.dev_examples = 200  # train_file without dev_file: the last this-many records are held out
  d.train_subset = -1  # >0: that many training examples, drawn by subset_seed
  d.eval_subset = 64  # >0: that many held-out examples (generation is the slow part of evaluation)
  d.subset_seed = 0
  # Padded lengths below max_seq_len; each is one more compilation of a deep
  # decoder (minutes on CPU), so by default every batch pads to max_seq_len.
  d.buckets = ()
  config.data = d
  return config
