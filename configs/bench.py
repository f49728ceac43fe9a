"""Train-step benchmark: rmlora_jax methods against the floor and PEFT.

The argument after the colon picks the shape (default ``minilm``)::

  python -m experiments.bench --config=configs/bench.py
  python -m experiments.bench --config=configs/bench.py:bert-base
  python -m experiments.bench --config=configs/bench.py:minilm \
      --config.targets=qv --config.repeats=9 --config.output=runs/bench_minilm.json
  python -m experiments.bench --config=configs/bench.py:smollm2 \
      --config.methods='("lora","rm_lora")' --config.warmup=1 --config.repeats=3

Shapes are random-weight BERT encoders: ``minilm`` (all-MiniLM-L6-v2's shape),
``bert-base``, and ``tiny`` (for the test); and random-weight Llama decoders
timed on the SFT task's response-only next-token loss: ``smollm2``
(SmolLM2-135M's shape, at the SFT experiment's batch 4 and 256 tokens) and
``tiny-llama`` (for the test).
"""

from ml_collections import config_dict

from configs import base
from rmlora_jax.models import bert

# hidden, layers, heads, intermediate, vocab
SHAPES = {
    "tiny": (32, 2, 4, 64, 1000),
    "minilm": (384, 6, 12, 1536, 30522),
    "bert-base": (768, 12, 12, 3072, 30522),
}
# Flax kernel paths adapted by each `targets` choice (BERT parameter paths).
TARGETS = {
    "qv": (r"encoder/layer_\d+/attention/(query|value)/kernel",),
    "all": bert.DEFAULT_LORA_TARGETS,  # what the GLUE experiment adapts by default
}
# What PEFT's target_modules names for the same choice (transformers' BertModel).
PEFT_TARGETS = {
    "qv": ("query", "value"),
    "all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}
# Decoders (transformers' LlamaConfig fields): hidden, layers, heads, kv heads,
# intermediate, vocab, rope_theta, rms_norm_eps. All tie the LM head to the
# embedding table, as SmolLM2 does.
DECODER_SHAPES = {
    "tiny-llama": (32, 2, 4, 2, 64, 1000, 10000.0, 1e-5),
    "smollm2": (576, 30, 9, 3, 1536, 49152, 100000.0, 1e-5),
}
# PEFT's target_modules for the decoders (transformers' LlamaForCausalLM). The
# experiment adapts the same matrices of our model; "all" is
# `rmlora_jax.models.llama.DEFAULT_LORA_TARGETS`.
DECODER_PEFT_TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
METHODS = ("full_ft", "lora", "rm_lora", "adalora")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The benchmark config for shape ``arg`` (one of SHAPES or DECODER_SHAPES; default minilm)."""
  shape = arg or "minilm"
  if shape not in SHAPES and shape not in DECODER_SHAPES:
    raise ValueError(f"configs/bench.py: shape {shape!r} is unknown; choose one of "
                     f"{tuple(SHAPES) + tuple(DECODER_SHAPES)}")
  glue = base.get_config()
  c = config_dict.ConfigDict()
  c.shape = shape
  if shape in SHAPES:
    hidden, layers, heads, inter, vocab = SHAPES[shape]
    c.model = config_dict.ConfigDict(dict(
        family="bert", hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=inter, vocab_size=vocab))
  else:
    hidden, layers, heads, kv_heads, inter, vocab, rope_theta, eps = DECODER_SHAPES[shape]
    c.model = config_dict.ConfigDict(dict(
        family="llama", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, intermediate_size=inter, vocab_size=vocab, rope_theta=rope_theta,
        rms_norm_eps=eps, tie_word_embeddings=True))
  c.dtype = "float32"  # computation dtype of our model: float32 or bfloat16
  c.batch_size = 32
  c.seq_len = 128
  c.rank = 8
  c.alpha = 16.0
  # "all" (all six matrices of a BERT layer, all seven of a decoder layer: what
  # the GLUE and SFT experiments adapt by default) or "qv" (query and value,
  # PEFT's default)
  c.targets = "all"
  # rmlora_jax methods timed, besides the floor and PEFT; "name@merge" or
  # "name@low_rank" overrides adapter_apply for that runner, "name@scan" or
  # "name@unrolled" scan_layers (e.g. "lora@scan,lora@unrolled").
  c.methods = METHODS
  # Decoder shapes: the layers as one nn.scan over stacked weights (what the
  # SFT experiment does on a GPU or TPU); False: unrolled (what it does on a CPU).
  c.scan_layers = False
  # How adapters reach the model (MethodSettings.adapter_apply): "low_rank" or "merge".
  c.adapter_apply = "low_rank"
  # The families' settings, as the GLUE experiment reads them (its defaults):
  # rm (R-, GM-, RM-LoRA: r_hat, penalty, mask mode), adalora, sora, lora2.
  c.rm = glue.rm
  c.adalora = glue.adalora
  c.sora = glue.sora
  c.lora2 = glue.lora2
  c.peft = True  # time PEFT's LoRA step too, when torch and peft are installed
  c.warmup = 3  # untimed steps of each runner after compiling
  c.repeats = 5  # timed steps of each runner, alternating between runners
  c.threads = 0  # torch threads; 0: as many as CPU cores (XLA's CPU backend uses them all)
  # Dense peak of the accelerator for MFU: H100 SXM TF32 (JAX's default float32
  # matmul precision on GPU); 989 for bfloat16. Unused on CPU.
  c.gpu_peak_tflops = 494.0
  c.seed = 0
  c.output = ""  # a path: also write the results JSON there
  # A folder: after timing, trace profile_steps steps of each JAX runner there
  # (jax.profiler, TensorBoard's format) and print where each step's time goes,
  # by XLA op kind (CPU only: the thunk times need --xla_cpu_enable_xprof_traceme).
  c.profile = ""
  c.profile_steps = 3
  if shape in ("tiny", "tiny-llama"):
    c.batch_size, c.seq_len, c.warmup, c.repeats = 4, 16, 1, 2
  if shape == "smollm2":
    # The SFT experiment's defaults (configs/sft.py): batch 4, 256 tokens.
    c.batch_size, c.seq_len = 4, 256
  return c
