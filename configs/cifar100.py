r"""ViT on CIFAR-100, LoRA on the last classification layer only: the RM-LoRA paper's Figure 1 / Table 4.

  python -m experiments.vision --config=configs/cifar100.py:method=rm_lora \
      --config.lora.rank=32 --config.workdir=runs/cifar100_rm_lora_r32

The model is any Hugging Face ViT (``model=<hub id or folder>``; the
paper's is a ViT-B/16). Data: an ImageFolder root (``train/<class>/*.jpg``,
``test/<class>/*.jpg``) as ``--config.data.dir``, else the hub copy
``uoft-cs/cifar100`` (needs a network). ``--config.adapt=attention_mlp``
adapts every attention and MLP kernel instead (the classifier then trains
beside them).

Shares configs/base.py's keys (seed, workdir, batch_size, num_epochs,
learning_rate, lora.*, rm.*, optim.*, mesh.*, data.dir), so an override
means the same as for GLUE and SQuAD.
"""

from ml_collections import config_dict

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg)
  config = base.get_config(arg)
  config.task = "cifar100"
  del config.head_bias  # regression heads only
  config.model.name_or_path = args.get("model", "google/vit-base-patch16-224-in21k")
  # A ViT built from scratch when model.name_or_path is empty (configs/vit_pretrain.py);
  # the fields of transformers' ViTConfig.
  config.model.vit = config_dict.ConfigDict(dict(
      image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=4,
      num_attention_heads=3, intermediate_size=384, hidden_act="gelu", hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=1e-12, qkv_bias=True))
  # "classifier": LoRA on the classification layer's kernel only (the paper's;
  # its W0 is the new random head, frozen); "attention_mlp": every attention
  # and MLP kernel, the classifier trained beside. config.lora.targets overrides.
  config.adapt = "classifier"
  # When only the classifier trains: compute the frozen backbone's features of
  # data.feature_views augmented views of each image once (cached) and train on them.
  # method=full_ft with adapt="classifier" then trains the whole classifier (a linear probe).
  config.frozen_features = True
  # Evaluate the untrained model too (results.json "initial_metrics"): the frozen random head.
  config.score_initial = True
  # Write the trained backbone as a Hugging Face ViTModel folder to <workdir>/model.
  config.save_model = False
  config.max_seq_len = 1  # unused by images; kept for the shared validation
  config.num_epochs = 10
  config.batch_size = 64
  config.learning_rate = 1e-3
  config.lora.rank = 32
  config.lora.alpha = 32.0

  config.analysis = config_dict.ConfigDict()
  # rank(dW): singular values above rank_rtol times the largest (analysis.effective_rank).
  config.analysis.rank_rtol = 1e-3
  # Keep a checkpoint per epoch and record rank(dW), ortho loss and spectrum per epoch.
  config.analysis.per_epoch = True

  d = config_dict.ConfigDict()
  # An ImageFolder root: <train_split>/<class>/*.jpg and <test_split>/<class>/*.jpg;
  # unset: the hub copy below (datasets).
  d.dir = config_dict.placeholder(str)
  d.hub_name = "uoft-cs/cifar100"
  d.train_split = "train"
  d.test_split = "test"
  d.classes = ()  # class names to keep, relabelled 0..C-1 in this order; empty: all
  d.crop_padding = 4  # random crop after this much zero padding (training); 0: none
  d.flip = True  # random horizontal flip (training)
  # The normalisation when the model folder has no image processor (transformers' ViT default).
  d.mean = (0.5, 0.5, 0.5)
  d.std = (0.5, 0.5, 0.5)
  d.feature_views = 4  # augmented views per training image for frozen_features (plus the clean one)
  d.feature_seed = 0  # draws those views (independent of config.seed, so seeds share the cache)
  d.cache_dir = ""  # frozen features cached between runs; empty: ~/.cache/rmlora_jax/vision_features
  config.data = d
  return config
