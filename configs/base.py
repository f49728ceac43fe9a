"""Shared base of the GLUE configs: the RM-LoRA paper's Table 3 settings.

Task files (``configs/rte.py`` ...) build on this and change only what differs.
Any field can be overridden from the command line, e.g.::

  python -m experiments.glue --config=configs/rte.py:model=minilm \
      --config.method=lora --config.lora.rank=4 --config.workdir=runs/rte_lora

The config argument after the colon is a comma-separated list of
``key=value``: ``model=minilm`` (the embedded offline all-MiniLM-L6-v2),
``model=deberta`` (the paper's model, the default) or ``model=<hub id or
folder>``, ``method=<name>``, and ``preset=authors``: the RM-LoRA authors'
training loop (`PRESETS`; each of its settings is an ordinary field too).
"""

from ml_collections import config_dict

MODEL_ALIASES = {"minilm": "minilm-l6", "deberta": "microsoft/deberta-v3-base"}

# Named sets of overrides (``:preset=<name>``); results.json records the name.
PRESETS = {
    # The RM-LoRA authors' released training loop (RM-LoRA/adalora_trainer.py,
    # run_glue.sh): gradients clipped, then masked (Adam's momentum still moves
    # the unselected directions), no mask on the first optimizer step,
    # independent index sets for A's rows and B's columns (--lora_type v2, their
    # MRPC script), Hugging Face's defaults of no warm-up and no weight decay.
    # Their head's zero gradient is a separate opt-in: rm.emulate_frozen_head.
    "authors": {"rm.mask_mode": "gradient", "rm.mask_start_step": 1, "rm.mask_sets": "independent",
                "optim.warmup_ratio": 0.0, "optim.weight_decay": 0.0},
}


def parse_arg(arg: str | None) -> dict[str, str]:
  """Parses ``"model=minilm,method=lora"`` into a dict; rejects unknown keys."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in ("model", "method", "preset"):
      raise ValueError(
          f"config argument {item!r}: expected model=<minilm|deberta|hub id|folder>, "
          f"method=<name> (the methods of rmlora_jax.methods.METHODS) or preset=<{'|'.join(PRESETS)}>"
      )
    if key == "preset" and value not in PRESETS:
      raise ValueError(f"config argument {item!r}: unknown preset {value!r}; choose one of {tuple(PRESETS)}")
    out[key] = value
  return out


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The base config; ``arg`` as described in the module docstring."""
  args = parse_arg(arg)
  c = config_dict.ConfigDict()
  c.task = "rte"
  c.method = args.get("method", "rm_lora")  # a name of rmlora_jax.methods.METHODS
  c.preset = ""  # set by ``:preset=<name>`` (PRESETS), recorded in results.json
  c.seed = 0
  # Where checkpoints, metrics, plots and results.json go; empty:
  # runs/<task>_<method>_<model>_s<seed>. The same workdir again resumes the run.
  c.workdir = ""
  # A PEFT adapter folder (experiments.export --format=peft, or PEFT's
  # save_pretrained): the run starts from its adapters and trained head.
  c.init_adapters = ""

  c.model = config_dict.ConfigDict()
  name = args.get("model", "deberta")
  c.model.name_or_path = MODEL_ALIASES.get(name, name)  # hub id, local HF folder, or alias "minilm-l6"
  c.model.dtype = "float32"  # computation dtype: float32 or bfloat16
  # QLoRA for every method (docs/QLORA.md): "" keeps the frozen base in float;
  # "int8" or "fp8" (channel-wise scales), "nf4" or "int4" (a scale per 64
  # values) store every transformer-block kernel quantised after loading.
  c.model.quantize = ""
  # Values of d_in per scale: -1 the format's default (64 for nf4 and int4, one
  # scale per output column for int8 and fp8), 0 per column, else a block that
  # divides every quantised kernel's d_in.
  c.model.quantize_block = -1
  # Decoders only (Llama, Qwen2, Gemma): run the layers as one nn.scan over
  # stacked weights, compiled once at any depth, with the same results and one
  # adapter per layer (docs/MODELS.md). Unset (configs/sft.py): scanned on a
  # GPU or TPU, unrolled on a CPU, where XLA compiles the unrolled layers faster.
  c.model.scan_layers = False

  c.data = config_dict.ConfigDict()
  # GLUE folder in the official layout; unset: $GLUE_DIR, else the hub copy below.
  c.data.dir = config_dict.placeholder(str)
  c.data.hub_name = "nyu-mll/glue"
  c.data.num_buckets = 4  # distinct padded lengths, so few compilations
  # "fit": the num_buckets lengths (multiples of bucket_multiple) that pad this
  # data's batches least; "geometric": halvings up to max_seq_len (16, 32, 64, 128).
  c.data.bucketing = "fit"
  c.data.bucket_multiple = 4
  # Token ids cached between runs; empty: ~/.cache/rmlora_jax/glue_tokens.
  c.data.cache_dir = ""
  c.data.train_subset = -1  # >0: that many training examples after a seeded shuffle
  c.data.subset_seed = 0
  # >0: hold out that many training examples (drawn by subset_seed) as the dev
  # split, for tasks whose dev file is missing (the shared STS-B copy).
  c.data.dev_from_train = -1

  # Table 3: batch 32, 3 epochs (MRPC and WNLI 5), LoRA lr 1e-3, full FT 1e-5.
  c.num_epochs = 3
  c.max_steps = -1  # -1: derived from num_epochs
  c.batch_size = 32
  c.learning_rate = -1.0  # <= 0: Table 3's value for the method (1e-5 full_ft, 1e-3 otherwise)
  c.max_seq_len = 128

  c.optim = config_dict.ConfigDict()
  c.optim.weight_decay = 0.01
  c.optim.warmup_ratio = 0.06  # linear warm-up, then linear decay to 0
  c.optim.max_grad_norm = 1.0  # <= 0: no clipping
  # Micro-batches per optimizer step (gradient accumulation): batch_size stays
  # the examples per optimizer step, each micro-batch batch_size / this; steps
  # (max_steps, eval/log/checkpoint_every_steps) count optimizer steps.
  c.optim.accumulate_steps = 1
  # A step whose loss or gradient norm is nan/inf is skipped (not applied); this
  # many in a row stop the run, its last checkpoint intact and resumable.
  c.optim.max_nonfinite_steps = 10

  # Regression (STS-B) only: the new head's output bias starts at the mean
  # training score ("label_mean") or at 0 as in transformers ("zero"). From 0,
  # LoRA runs at lr 1e-3 collapse the [CLS] features while fitting the mean.
  c.head_bias = "label_mean"

  c.lora = config_dict.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 32.0
  c.lora.init_std = 0.02
  # "gaussian": a ~ N(0, init_std^2), the paper's; "kaiming_uniform": PEFT's
  # U(-1/sqrt(d_in), 1/sqrt(d_in)) (LoRA family and SoRA).
  c.lora.init = "gaussian"
  c.lora.targets = ()  # empty: the model's default (every attention and FFN matrix)
  c.lora.train_patterns = ()  # extra regexes of params trained with the adapters (head is always)
  # "low_rank": our encoders compute x W0 + (x a^T) b^T s (no weight gradient of
  # W0, faster; docs/BENCHMARKS.md); "merge": W0 + dW as a plain kernel.
  c.lora.apply = "low_rank"

  c.rm = config_dict.ConfigDict()
  c.rm.num_directions = 4  # r_hat: directions updated per step and adapter
  c.rm.ortho_weight = 0.1
  # The authors' code: plain Frobenius norm averaged over matrices. The paper's
  # Eq. 10 is squared=True, reduction="sum".
  c.rm.ortho_squared = False
  c.rm.ortho_reduction = "mean"
  # "update": mask before and after AdamW (unselected directions do not move);
  # "gradient": mask gradients only, as the authors' code does.
  c.rm.mask_mode = "update"
  c.rm.mask_period = 1
  c.rm.mask_start_step = 0  # optimizer steps before masking starts (the authors' code: 1)
  # "shared": one index set for A's rows and B's columns (the paper; the
  # authors' --lora_type v1); "independent": two sets (v2).
  c.rm.mask_sets = "shared"
  # True: zero the head's gradient once masking starts, as the authors' code
  # does by accident (the head then moves only by Adam's leftover momentum).
  c.rm.emulate_frozen_head = False

  c.adalora = config_dict.ConfigDict()
  # The papers compare AdaLoRA at LoRA's inference budget: it starts at rank
  # 2R and is pruned to R (RM-LoRA Table 2: "16 / 8" beside LoRA R = 8).
  c.adalora.init_rank = -1  # <= 0: 2 * lora.rank
  c.adalora.target_rank = -1  # <= 0: lora.rank
  # The AdaLoRA authors' GLUE scripts (QingruZhang/AdaLoRA, SST-2's): pruning
  # from 12% of the steps, the rank pattern frozen for the last 44%, penalty
  # weight 0.1 (0.3 on RTE and STS-B, set there), alpha / r = 8 (8 to 16 by
  # task); every 10 steps (theirs: every 100 of tens of thousands).
  c.adalora.t_init_ratio = 0.12  # fraction of steps before pruning starts
  c.adalora.t_final_ratio = 0.44  # fraction of steps with the rank pattern frozen
  c.adalora.delta_t = 10
  c.adalora.beta1 = 0.85
  c.adalora.beta2 = 0.85
  c.adalora.ortho_weight = 0.1
  # AdaLoRA's scale alpha / r over its initial rank r; <= 0: lora.alpha / r
  # (2 at the defaults, where its penalty keeps SST-2 at the majority class).
  c.adalora.alpha_over_rank = 8.0

  c.sora = config_dict.ConfigDict()
  c.sora.init_rank = 16
  c.sora.xi = 0.005  # lambda of Table 3 (task files set it)
  c.sora.gate_lr = -1.0  # <= 0: the learning rate
  # "paper": gates start at 1, SGD then threshold lr * xi; "released": SoRA's
  # code, gates ~ N(0, 1), Adam then threshold xi per step (it prunes; the
  # paper's form at lr 1e-3 hardly does).
  c.sora.variant = "paper"

  c.lora2 = config_dict.ConfigDict()
  # The LoRA² paper's headline setting: k = 1 (outer planes of width one), r = 8.
  c.lora2.k = 1
  c.lora2.r = 8
  c.lora2.target_rank = 4
  c.lora2.ortho_weight = 0.1  # the authors' code: 0.1 (0.3 for RTE and STS-B)
  # "paper": Grams over r for (U, V), (u, v), (P, Q); "released": the released
  # code's k x k Grams of U, u, v, V (it fixes k = 8: set lora2.k=8, target_rank=2).
  c.lora2.variant = "paper"
  c.lora2.t_init_ratio = 0.1
  c.lora2.t_final_ratio = 0.2
  c.lora2.delta_t = 10
  c.lora2.beta1 = 0.85
  c.lora2.beta2 = 0.85

  # Device mesh (docs/SCALING.md): sizes of its three axes, one of them -1 for
  # "the rest of the devices"; their product must divide the device count (and
  # equal it across processes).
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # data parallel: batch split, weights replicated
  c.mesh.fsdp = 1  # fully sharded data parallel: batch and weights split
  c.mesh.model = 1  # tensor parallel: attention heads and FFN columns split

  # Multi-host runs: jax.distributed.initialize, one process per host (or GPU).
  c.distributed = config_dict.ConfigDict()
  c.distributed.initialize = False  # True: initialise even with no address (JAX auto-detects TPU pods, SLURM, MPI)
  c.distributed.coordinator_address = ""  # "host:port" of process 0; empty: $JAX_COORDINATOR_ADDRESS
  c.distributed.num_processes = -1  # -1: $JAX_NUM_PROCESSES, else auto-detected
  c.distributed.process_id = -1  # -1: $JAX_PROCESS_ID, else auto-detected

  c.log_every_steps = 10
  c.eval_every_steps = -1  # -1: at the end of each epoch
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 2
  c.progress = True  # tqdm progress bar
  if "preset" in args:
    c.preset = args["preset"]
    for dotted, value in PRESETS[args["preset"]].items():
      section, key = dotted.split(".")
      c[section][key] = value
  return c
