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


def _compiled(layers, temp, argument=1.0):
  """A stand-in for one compile's numbers (GiB), as `plan.compile_case` reports them in bytes."""
  g = plan.GIB
  row = {"layers": layers, "argument": argument * layers * g, "output": 0.0, "alias": 0.0, "temp": temp * g,
         "generated_code": 0.0, "flops": 1e12 * layers, "bytes_accessed": 1e9 * layers, "lower_s": 1.0,
         "compile_s": 1.0}
  row["total"] = row["argument"] + row["temp"]
  return row


def test_memory_that_falls_with_depth_gives_no_estimate_and_no_recommendation():
  # What the pod grid hit on 2026-12-03: temp at 4 layers below temp at 2, so
  # the line to 32 layers went negative and the mesh "fitted" every chip.
  low, high = _compiled(2, temp=10.0), _compiled(4, temp=6.0)
  line = plan.extrapolate(low, high, 32)
  assert line["temp"] < 0  # the line itself: 10 + 30 * (6 - 10) / 2 GiB
  assert plan.memory_fell(low, high) == ("temp fell from 10.00 GiB at 2 layers to 6.00 GiB at 4; "
                                         "total fell from 12.00 GiB at 2 layers to 10.00 GiB at 4")
  assert plan.memory_fell(low, _compiled(4, temp=10.5)) is None
  config = plan_config.get_config()
  common = dict(global_batch=64, tokens=64 * 2048, devices=64, source="extrapolated", model="m", seq_len=2048,
                model_flops_per_device=1e12)
  fsdp_only = {**high, **line, **common, "temp": None, "total": None, "memory_unknown": "fell",
               "mesh": {"data": 1, "fsdp": 64, "model": 1}}
  tensor = {**high, **plan.extrapolate(_compiled(2, 1.0), _compiled(4, 1.5), 32), **common,
            "mesh": {"data": 1, "fsdp": 16, "model": 4}}
  for row in (fsdp_only, tensor):
    row["chips"] = plan._chip_columns(config, row)
  assert all(c["fits"] is None for c in fsdp_only["chips"].values())
  assert tensor["total"] / plan.GIB == 32 + 1.0 + 30 * 0.25  # arguments 1 GiB a layer, temp 1 + 0.25 a layer
  assert tensor["chips"]["v5e"]["fits"] is False and tensor["chips"]["v5p"]["fits"] is True
  recommended = {r["chip"]: r for r in plan.recommend(config, [fsdp_only, tensor])}
  assert recommended["v5e"]["mesh"] is None and recommended["v5e"]["unknown_model_axes"] == [1]
  assert recommended["v5p"]["mesh"]["model"] == 4 and recommended["v5p"]["unknown_model_axes"] == [1]
  results = {"config": config.to_dict(), "rows": [fsdp_only, tensor], "recommended": list(recommended.values()),
             "extrapolation_checks": []}
  table = plan.markdown(results)
  assert "| m | 2048 | 64 | 1×64×1 | 64 | extrapolated (memory unknown†) | 32.00 | 0.00 | ? |" in table
  assert "| m | 2048 | 64 | v5e | none fits (model=1: unknown) |" in table
  assert "| m | 2048 | 64 | v5p | 1×16×4 |" in table and "extrapolated; model=1 unknown |" in table


def test_a_case_whose_memory_falls_with_depth_is_compiled_at_full_depth(monkeypatch):
  compiled = []

  def fake_compile(config, model, sizes, seq_len, num_layers):
    compiled.append(num_layers)
    return _compiled(num_layers, temp={2: 10.0, 4: 6.0}.get(num_layers, 20.0))

  monkeypatch.setattr(plan, "compile_case", fake_compile)
  monkeypatch.setattr(plan, "abstract_step", lambda *a: (None, None, {"tokens": 1}))
  monkeypatch.setattr(plan, "partitioning_mesh", lambda sizes: None)
  config = plan_config.get_config()
  full = plan.arch_of(config, "llama2-7b")
  row = plan._extrapolated_row(config, "llama2-7b", {"data": 1, "fsdp": 64, "model": 1}, 4096, full)
  assert compiled == [2, 4, 32]
  assert row["source"] == "compiled" and row["temp"] == 20.0 * plan.GIB
  assert row["extrapolation_refused"].startswith("temp fell from 10.00 GiB")
  compiled.clear()
  config.full_depth_when_memory_falls = False
  row = plan._extrapolated_row(config, "llama2-7b", {"data": 1, "fsdp": 64, "model": 1}, 4096, full)
  assert compiled == [2, 4] and row["temp"] is None and row["total"] is None and row["memory_unknown"]
