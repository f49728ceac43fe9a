"""Pod plan: the RM-LoRA train step of Llama 2 7B and Llama 3 70B, compiled ahead of time.

Nothing is allocated: the sharded step is lowered from shapes and compiled,
and XLA's per-chip memory and FLOPs are tabulated against the chips' HBM.
The argument after the colon picks the grid (default ``pod``)::

  scripts/tpu_env.sh install                      # once: the TPU compiler into .tpu_compiler/
  scripts/tpu_env.sh python -m experiments.plan --config=configs/plan.py:tpu
  scripts/tpu_env.sh python -m experiments.plan --config=configs/plan.py:tiny_tpu  # the test's, seconds
  python -m experiments.plan --config=configs/plan.py          # fake CPU devices, no libtpu
  python -m experiments.plan --config=configs/plan.py:tiny     # the CPU test's grid, seconds

``tpu`` (any non-empty ``topology``) compiles every case at full depth with
the TPU compiler for real slices (``--config.topology='("v5e:16x16",)'``).
Without a topology the step is compiled by XLA:CPU on fake devices;
``compile_layers=(2, 4)`` then compiles each case at 2 and 4 layers (full
widths) and extrapolates memory and FLOPs linearly to the full depth; the
cases of ``verify`` are also compiled at full depth, and the table says
which rows are compiled and which extrapolated.
"""

from ml_collections import config_dict

from configs import base

# LlamaArch fields by name (Hugging Face configs of the released checkpoints).
ARCHS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      head_dim=128, intermediate_size=11008, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                       head_dim=128, intermediate_size=28672, rms_norm_eps=1e-5, rope_theta=500000.0),
    # For the test: every dimension divisible by 8 devices.
    "tiny": dict(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0),
}
# HBM per chip (GiB) and dense bf16 peak (TFLOP/s), from the Google Cloud TPU
# docs (system architecture pages of v5e, v5p and v6e). The names are the
# prefixes of `topology` entries.
CHIPS = {
    "v5e": dict(hbm_gib=16.0, peak_tflops=197.0),
    "v5p": dict(hbm_gib=95.0, peak_tflops=459.0),
    "v6e": dict(hbm_gib=32.0, peak_tflops=918.0),
}
GRIDS = ("pod", "tiny", "tpu", "tiny_tpu")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The plan for grid ``arg`` (one of GRIDS; default pod)."""
  grid = arg or "pod"
  if grid not in GRIDS:
    raise ValueError(f"configs/plan.py: grid {grid!r} is unknown; choose one of {GRIDS}")
  glue = base.get_config()
  c = config_dict.ConfigDict()
  c.grid = grid
  c.models = ("llama2-7b", "llama3-70b")  # names of `archs`
  c.archs = config_dict.ConfigDict({k: v for k, v in ARCHS.items() if k != "tiny"})
  # TPU slices compiled for by libtpu ("v5e:16x16", "v5p:4x4x4", "v6e:16x16",
  # ...; the chip before the colon names a `chips` entry), every case at full
  # depth. Empty: fake CPU devices (`devices`) and XLA:CPU.
  c.topology = ()
  c.devices = (64, 128, 256)  # device counts planned without a topology; the largest is faked on the CPU
  c.model_axis = (1, 4, 8)  # tensor-parallel sizes tried; fsdp = devices / data / model
  c.data_axis = 1  # plain data parallelism (weights replicated along it)
  c.seq_lens = (2048, 4096)
  c.sequences_per_shard = 1  # global batch = this x data x fsdp sequences
  c.dtype = "bfloat16"  # computation and frozen-weight dtype (adapters stay float32)
  # What each decoder layer keeps for the backward pass, one row per entry:
  # "none" (everything), "full" (its input only; the layer is recomputed),
  # "dots" (its input and matmul outputs: jax.checkpoint_policies.dots_saveable).
  c.remat = ("full",)
  # The decoder layers as one nn.scan over stacked weights (compile time flat
  # in depth); False: unrolled, each layer compiled on its own.
  c.scan_layers = True
  # QLoRA (docs/QLORA.md): "" keeps the frozen kernels in `dtype`; "int8",
  # "fp8", "nf4" or "int4" stores every transformer-block kernel quantised.
  c.quantize = ""
  # "batch": the hidden states between layers are constrained to the batch
  # split over data x fsdp; "none": left to XLA's sharding propagation.
  c.activation_sharding = "batch"
  c.rank = 8
  c.alpha = 16.0
  c.targets = ()  # empty: every attention and MLP projection (llama.DEFAULT_LORA_TARGETS)
  c.rm = glue.rm  # r_hat (num_directions = 4), penalty weight and form, mask mode
  c.learning_rate = 1e-4
  c.seed = 0
  # Compile at these depths (same widths) and extrapolate linearly per layer;
  # empty: compile every case at full depth.
  c.compile_layers = (2, 4)
  # Cases also compiled at full depth to check the extrapolation:
  # "model:devices:model_axis:seq_len", e.g. ("llama2-7b:64:8:2048",). None by
  # default.
  c.verify = ()
  # When the deeper of the two compiles needs less memory than the shallower
  # one (XLA:CPU scheduled them differently), the line through them says
  # nothing: compile that case at full depth instead (under a minute for 7B
  # on 2 cores). False: report no memory estimate for it.
  c.full_depth_when_memory_falls = True
  c.chips = config_dict.ConfigDict(CHIPS)
  c.mfu = 0.4  # the model FLOPs utilisation the second step-time estimate assumes
  c.hbm_fraction = 0.9  # a mesh fits a chip when its total is at most this share of the HBM
  # Compile the CPU code with LLVM optimisation off (--xla_backend_optimization_level=0):
  # the HLO passes, buffer assignment and cost analysis are the same, only faster.
  c.fast_compile = True
  c.output = "runs/plan/plan.json"  # the results JSON ("" : none); the Markdown goes next to it
  if grid in ("tpu", "tiny_tpu"):
    c.topology = ("v5e:16x16", "v5p:4x4x4")
    c.models = ("llama2-7b",)
    c.model_axis = (1,)
    c.compile_layers = ()
    c.output = "runs/plan/tpu.json"
  if grid == "tiny_tpu":
    c.topology = ("v5e:4x4",)
    c.output = ""
  if grid in ("tiny", "tiny_tpu"):
    c.models = ("tiny",)
    c.archs = config_dict.ConfigDict({"tiny": ARCHS["tiny"]})
    c.devices = (8,)
    c.model_axis = (1, 2)
    c.seq_lens = (32,)
    c.compile_layers = ()
    c.verify = ()
    c.output = ""
  return c
