"""SQuAD v1.1 extractive question answering (the RM-LoRA paper's Table 2).

  python -m experiments.squad --config=configs/squad.py:model=minilm \
      --config.data.dir=../shared/data/squad --config.workdir=runs/squad_rm_lora

Shares configs/base.py's keys (seed, workdir, max_seq_len, batch_size,
num_epochs, learning_rate, lora.*, rm.*, adalora.*, sora.*, lora2.*,
optim.*, mesh.*, data.dir), so an override means the same as for GLUE.
"""

from ml_collections import config_dict

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.task = "squad"
  del config.head_bias  # regression heads only
  config.max_seq_len = 384  # question + context window, the standard setting
  config.doc_stride = 128  # tokens of overlap between a long context's windows
  config.n_best = 20  # start and end candidates per window in post-processing
  config.max_answer_len = 30  # tokens
  config.num_epochs = 2
  config.batch_size = 16
  config.eval_every_steps = -1  # -1: at the end of each epoch
  config.sora.xi = 0.005
  config.lora2.ortho_weight = 0.1

  d = config_dict.ConfigDict()
  # A folder with train-v1.1.json (or the offline train-v1.1-subset.json) and,
  # optionally, dev-v1.1.json; unset, with no files below: the hub copy.
  d.dir = config_dict.placeholder(str)
  d.train_file = config_dict.placeholder(str)  # official SQuAD v1.1 JSON; overrides data.dir
  d.dev_file = config_dict.placeholder(str)
  d.hub_name = "rajpurkar/squad"
  # Without a dev file: the last this-many articles of the training file are the dev split.
  d.dev_articles = 4
  d.train_subset = -1  # >0: that many training questions, drawn by subset_seed
  d.eval_subset = -1  # >0: that many evaluation questions
  d.subset_seed = 0
  d.buckets = (128, 192, 256, 320)  # padded window lengths below max_seq_len (few compilations)
  # Segment ids 0 for the question and 1 for the context (BERT's convention);
  # False: 0 everywhere, for models never trained on sentence pairs.
  d.segment_ids = True
  d.cache_dir = ""  # features cached between runs; empty: ~/.cache/rmlora_jax/squad_features
  config.data = d
  return config
