r"""Peak process memory of loading a checkpoint: float, quantised as it is read, and quantised after.

  python -m experiments.load_memory --checkpoint=smollm2 --formats=,int8,nf4
  python -m experiments.load_memory --synthetic=tinyllama --json=docs/bench/load_memory.json

Each load runs in a fresh process (`hub.load_pretrained` of ``--checkpoint``, the
decoder's ``causal_lm`` head, or an encoder's ``--head``), which reports its
peak resident set (``ru_maxrss``: anonymous memory and the pages of the
memory-mapped checkpoint it touched alike) and its resident set just before
loading (the imports), and the bytes of the params it returns. Per format:

* ``read``: ``load_pretrained(..., quantize=spec)``: each kernel quantised as
  it is read;
* ``after``: ``quantize_base(load_pretrained(...), spec)``: the float model
  loaded whole, then quantised (the two give the same bits,
  tests/models/test_hub.py).

The empty format is the float load. ``--synthetic=tinyllama`` first writes a
random Llama checkpoint of TinyLlama-1.1B's shape (hidden 2048, 22 layers,
FFN 5632, vocabulary 32000, 4 KV heads) in bfloat16, as such models are
published, into ``--synthetic_dir``. Memory figures belong here, never in
tests.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", "smollm2", "An alias or a folder with config.json and safetensors weights.")
_HEAD = flags.DEFINE_string("head", "causal_lm", "load_pretrained's head.")
_FORMATS = flags.DEFINE_list("formats", ["", "int8", "nf4"], "Formats ('' = float32, int8, nf4, int4, fp8).")
_SYNTHETIC = flags.DEFINE_enum("synthetic", "", ["", "tinyllama"], "Write a random checkpoint of this shape first.")
_SYNTHETIC_DIR = flags.DEFINE_string("synthetic_dir", "/tmp/rmlora_synthetic_tinyllama", "Where it goes.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "Load a decoder's layers stacked for nn.scan.")
_MODES = flags.DEFINE_list("modes", ["read", "after"], "For each format: quantised as read, after loading.")
_JSON = flags.DEFINE_string("json", "", "Also write the rows here.")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# TinyLlama-1.1B's shape.
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)

# Run in the child: load, then report. argv: model, head, format, mode, scan_layers.
_CHILD = r"""
import json, resource, sys
model, head, fmt, mode, scan = sys.argv[1:6]
import jax.numpy as jnp, transformers
from rmlora_jax import quantize
from rmlora_jax.models import hub
jnp.zeros(1).block_until_ready()  # the CPU client, in the baseline
def rss_mib():
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
before = rss_mib()
spec = quantize.QuantizeSpec(format=fmt) if fmt else None
params = hub.load_pretrained(model, head=head, scan_layers=scan == "1",
                             **({"quantize": spec} if spec is not None and mode == "read" else {}))[1]
if spec is not None and mode == "after":
  params = quantize.quantize_base(params, spec)
print(json.dumps({"imports_mib": before, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params_mib": quantize.tree_bytes(params) / 2**20}))
"""


def write_synthetic(folder: pathlib.Path) -> pathlib.Path:
  """A random bfloat16 Llama checkpoint of TinyLlama-1.1B's shape (weights, config; no tokenizer)."""
  if (folder / "model.safetensors").is_file():
    return folder
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  config = transformers.LlamaConfig(**TINYLLAMA)
  h, f = config.hidden_size, config.intermediate_size
  kv = config.num_key_value_heads * h // config.num_attention_heads  # the K and V projections' width
  shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,),
            "lm_head.weight": (config.vocab_size, h)}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
  generator = torch.Generator().manual_seed(0)
  tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  config.save_pretrained(folder)
  return folder


def measure(model: str, head: str, fmt: str, mode: str, scan_layers: bool = False) -> dict:
  """One load in a fresh process: its resident set before loading, its peak, the params' bytes."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _CHILD, model, head, fmt, mode, str(int(scan_layers))], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"loading {model} ({fmt or 'float32'}, {mode}) failed: {proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  model = str(write_synthetic(pathlib.Path(_SYNTHETIC_DIR.value))) if _SYNTHETIC.value else _CHECKPOINT.value
  rows = []
  for fmt in _FORMATS.value:
    for mode in (_MODES.value if fmt else ("read",)):
      row = {"format": fmt or "float32", "mode": mode if fmt else "float", **measure(model, _HEAD.value, fmt, mode, _SCAN.value)}
      rows.append(row)
      print(f"{row['format']:>8} {row['mode']:>6}: peak {row['peak_mib']:8.0f} MiB (imports {row['imports_mib']:.0f}),"
            f" params {row['params_mib']:.0f} MiB", flush=True)
  print("\n| format | quantised | peak RSS MiB | over the imports MiB | params MiB |\n|---|---|---|---|---|")
  for r in rows:
    when = {"float": "—", "read": "as read", "after": "after loading"}[r["mode"]]
    print(f"| {r['format']} | {when} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['imports_mib']:.0f} |"
          f" {r['params_mib']:.0f} |")
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps({"model": model, "scan_layers": _SCAN.value, "rows": rows},
                                                   indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
