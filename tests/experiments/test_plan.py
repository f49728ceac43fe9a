"""The pod plan compiles the sharded RM-LoRA step ahead of time and counts what each device holds.

One subprocess with 8 fake CPU devices runs the plan's entry point on the
tiny grid (a 1-layer Llama, meshes 1x8x1 and 1x4x2). The compiled step's
per-device argument memory is checked against a count written out here with
NumPy from the architecture's shapes, the partition rules' layout and the
mesh sizes, without JAX.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from configs import plan as plan_config
from experiments import plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
BF16, F32, I32 = 2, 4, 4


def _shard(shape, axes, mesh):
  """Elements one device holds of ``shape`` with dimension i split over mesh axis ``axes[i]`` (or None)."""
  return int(np.prod([d // (mesh[a] if a else 1) for d, a in zip(shape, axes)]))


def expected_argument_bytes(arch, mesh, seq_len, rank, sequences_per_shard):
  """Bytes per device of the frozen weights, adapters, Adam moments, counters and batch.

  Layout (the Megatron layout of partitioning.DECODER_RULES, kernels (d_in, d_out)):
  q/k/v/gate/up (fsdp, model), o/down (model, fsdp), embedding (model, fsdp),
  lm_head (fsdp, model), norm scales replicated. A LoRA ``a`` (rank, d_in) is
  split as its kernel's d_in, ``b`` (d_out, rank) as its d_out; AdamW's two
  moments as their adapter.
  """
  h, i, v, d = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"], arch["head_dim"]
  q, kv = arch["num_heads"] * d, arch["num_kv_heads"] * d
  column, row = ("fsdp", "model"), ("model", "fsdp")
  kernels = [((h, q), column), ((h, kv), column), ((h, kv), column), ((q, h), row),
             ((h, i), column), ((h, i), column), ((i, h), row)] * arch["num_layers"]
  frozen = sum(_shard(s, ax, mesh) for s, ax in kernels)
  frozen += _shard((v, h), row, mesh) + _shard((h, v), column, mesh)
  frozen += (2 * arch["num_layers"] + 1) * h  # RMSNorm scales
  adapters = sum(_shard((rank, s[0]), (None, ax[0]), mesh) + _shard((s[1], rank), (ax[1], None), mesh)
                 for s, ax in kernels)
  # Replicated int32 scalars: the step, the two direction-mask counts (before
  # and after AdamW, mask_mode="update"), Adam's count.
  counters = 4
  rows = sequences_per_shard  # per device: its data x fsdp shard's sequences
  batch = 3 * rows * seq_len * I32 + rows * F32  # input_ids, attention_mask, loss_mask; weights
  return BF16 * frozen + 3 * F32 * adapters + I32 * counters + batch


def test_plan_compiles_the_tiny_grid_and_counts_argument_memory(tmp_path):
  config = plan_config.get_config("tiny")
  output = tmp_path / "plan.json"
  # The flags the entry point would re-execute itself with, so it does not have to.
  env = dict(os.environ, JAX_PLATFORMS="cpu", RMLORA_COMPILATION_CACHE="",
             XLA_FLAGS=plan.xla_flags(max(config.devices), config.fast_compile, os.environ.get("XLA_FLAGS", "")))
  proc = subprocess.run([sys.executable, "-m", "experiments.plan", "--config=configs/plan.py:tiny",
                         f"--config.output={output}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  results = json.loads(output.read_text())
  rows = results["rows"]
  assert [(r["mesh"]["fsdp"], r["mesh"]["model"]) for r in rows] == [(8, 1), (4, 2)]
  arch = config.archs.tiny.to_dict()
  for r in rows:
    want = expected_argument_bytes(arch, r["mesh"], r["seq_len"], config.rank, config.sequences_per_shard)
    assert r["source"] == "compiled"
    assert r["argument"] == want, (r["mesh"], r["argument"], want)
    assert sum(r["counted_bytes"].values()) == want
    # The donated state comes back in its own buffers.
    assert r["alias"] == r["counted_bytes"]["state"]
    assert r["temp"] > 0 and r["flops"] > r["model_flops_per_device"] > 0
    assert set(r["chips"]) == {"v5e", "v5p"} and all(c["fits"] for c in r["chips"].values())
  assert {(r["chip"], r["mesh"]["model"]) for r in results["recommended"]} == {("v5e", 1), ("v5p", 1)}
  table = output.with_suffix(".md").read_text()
  assert "| tiny | 32 | 8 | 1×8×1 | 8 | compiled |" in table
  assert "| tiny | 32 | 8 | 1×4×2 | 4 | compiled |" in table
  assert table in proc.stdout
