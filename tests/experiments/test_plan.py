"""The pod plan compiles the sharded RM-LoRA step ahead of time and counts what each device holds.

One subprocess with 8 fake CPU devices runs the plan's entry point on the
tiny grid (a 1-layer Llama, meshes 1x8x1 and 1x4x2); another, where the TPU
compiler is installed (``scripts/tpu_env.sh install``), compiles it for a
v5e:4x4 slice. The compiled step's per-device argument memory is checked
against a count written out here with NumPy from the architecture's shapes,
the partition rules' layout and the mesh sizes (and, for the TPU, its tiled
layouts), without JAX.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import plan as plan_config
from experiments import plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
BF16, F32, I32 = 2, 4, 4


def _shard(shape, axes, mesh):
  """Elements one device holds of ``shape`` with dimension i split over mesh axis ``axes[i]`` (or None)."""
  return int(np.prod([d // (mesh[a] if a else 1) for d, a in zip(shape, axes)]))


def _shard_shape(shape, axes, mesh):
  return tuple(d // (mesh[a] if a else 1) for d, a in zip(shape, axes))


def argument_shards(arch, mesh, seq_len, rank, sequences_per_shard):
  """(shard shape, bytes per element) of each argument leaf one device holds.

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
  leaves = [(_shard_shape(s, ax, mesh), BF16) for s, ax in kernels]
  leaves += [(_shard_shape((v, h), row, mesh), BF16), (_shard_shape((h, v), column, mesh), BF16)]
  leaves += [((h,), BF16)] * (2 * arch["num_layers"] + 1)  # RMSNorm scales
  for s, ax in kernels:  # adapters, then AdamW's mu and nu
    leaves += [(_shard_shape((rank, s[0]), (None, ax[0]), mesh), F32),
               (_shard_shape((s[1], rank), (ax[1], None), mesh), F32)] * 3
  # Replicated int32 scalars: the step, the two direction-mask counts (before
  # and after AdamW, mask_mode="update"), Adam's count.
  leaves += [((), I32)] * 4
  rows = sequences_per_shard  # per device: its data x fsdp shard's sequences
  leaves += [((rows, seq_len), I32)] * 3 + [((rows,), F32)]  # input_ids, attention_mask, loss_mask; weights
  return leaves


def expected_argument_bytes(arch, mesh, seq_len, rank, sequences_per_shard):
  """Bytes per device of the frozen weights, adapters, Adam moments, counters and batch."""
  return sum(int(np.prod(s)) * item for s, item in argument_shards(arch, mesh, seq_len, rank, sequences_per_shard))


def _round_up(x, m):
  return -(-x // m) * m


def tpu_buffer_bytes(shape, itemsize):
  """Bytes of one array in TPU HBM: tiled layouts, whole 512-byte blocks.

  The minor dimension is padded to 128 lanes; the second-minor to 1, 2 or 4
  rows when it is that small, else to a multiple of 8; the compiler lays a
  two-dimensional argument out with whichever dimension minor wastes less
  (a LoRA ``b`` of shape (d, 8) goes column-major). A vector is padded to
  128 elements.
  """
  sublanes = lambda r: r if r in (1, 2, 4) else 4 if r == 3 else _round_up(r, 8)
  if not shape:
    elements = 1
  elif len(shape) == 1:
    elements = _round_up(shape[0], 128)
  else:
    r, c = shape[-2:]
    elements = math.prod(shape[:-2]) * min(sublanes(r) * _round_up(c, 128), sublanes(c) * _round_up(r, 128))
  return _round_up(elements * itemsize, 512)


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
    assert set(r["chips"]) == {"v5e", "v5p", "v6e"} and all(c["fits"] for c in r["chips"].values())
  assert {(r["chip"], r["mesh"]["model"]) for r in results["recommended"]} == {("v5e", 1), ("v5p", 1), ("v6e", 1)}
  table = output.with_suffix(".md").read_text()
  assert "| tiny | 32 | 8 | 1×8×1 | full | 8 | compiled |" in table
  assert "| tiny | 32 | 8 | 1×4×2 | full | 4 | compiled |" in table
  assert table in proc.stdout


TPU_LIBRARY = pathlib.Path(os.environ.get("RMLORA_TPU_COMPILER", ROOT / ".tpu_compiler")) / "libtpu" / "libtpu.so"


@pytest.mark.integration  # a subprocess loading libtpu; about 40 s on 2 busy cores
@pytest.mark.skipif(not TPU_LIBRARY.is_file(), reason="no TPU compiler: run scripts/tpu_env.sh install")
def test_plan_compiles_the_tiny_grid_for_a_tpu_slice(tmp_path):
  config = plan_config.get_config("tiny_tpu")
  output = tmp_path / "plan.json"
  # libtpu is loaded in the subprocess only (scripts/tpu_env.sh puts it on
  # the path): this process never imports it.
  proc = subprocess.run(["scripts/tpu_env.sh", sys.executable, "-m", "experiments.plan",
                         "--config=configs/plan.py:tiny_tpu", f"--config.output={output}"], cwd=ROOT,
                        env=dict(os.environ, RMLORA_TPU_COMPILER=str(TPU_LIBRARY.parents[1])),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  assert "libtpu" not in sys.modules
  results = json.loads(output.read_text())
  assert results["environment"]["compiler"] == "TPU (libtpu)"
  rows = results["rows"]
  assert [(r["topology"], r["devices"], r["mesh"]["fsdp"], r["mesh"]["model"]) for r in rows] == [
      ("v5e:4x4", 16, 16, 1), ("v5e:4x4", 16, 8, 2)]
  arch = config.archs.tiny.to_dict()
  for r in rows:
    assert r["device_kind"] == "TPU v5 lite" and r["layers"] == arch["num_layers"] and r["source"] == "compiled"
    shards = argument_shards(arch, r["mesh"], r["seq_len"], config.rank, config.sequences_per_shard)
    # What the shardings alone give, and what the TPU's tiled layouts make of it.
    assert sum(r["counted_bytes"].values()) == expected_argument_bytes(
        arch, r["mesh"], r["seq_len"], config.rank, config.sequences_per_shard)
    assert r["argument"] == sum(tpu_buffer_bytes(s, item) for s, item in shards), (r["mesh"], r["argument"])
    assert r["alias"] > 0 and r["flops"] > r["model_flops_per_device"] > 0
    assert set(r["chips"]) == {"v5e"} and r["chips"]["v5e"]["fits"]
  table = output.with_suffix(".md").read_text()
  assert "| v5e:4x4 | 16 | tiny | bfloat16 | 32 | full | 1×16×1 | 16 |" in table
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
  assert "| m | 2048 | 64 | 1×64×1 | full | 64 | extrapolated (memory unknown†) | 32.00 | 0.00 | ? |" in table
  assert "| m | 2048 | 64 | full | v5e | none fits (model=1: unknown) |" in table
  assert "| m | 2048 | 64 | full | v5p | 1×16×4 |" in table and "extrapolated; model=1 unknown |" in table


def test_a_case_whose_memory_falls_with_depth_is_compiled_at_full_depth(monkeypatch):
  compiled = []

  def fake_compile(config, model, sizes, seq_len, num_layers, remat):
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


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_quantised_base_is_planned_at_its_own_bytes(fmt):
  # One device, so the frozen argument is the whole tree: the block kernels at
  # the format's bits plus a bfloat16 scale per column (per 64 rows for nf4),
  # the embedding, the LM head and the norms in bfloat16, counted with NumPy.
  config = plan_config.get_config("tiny")
  config.quantize = fmt
  arch = plan.arch_of(config, "tiny")
  _, _, info = plan.abstract_step(config, arch, plan.partitioning_mesh({"data": 1, "fsdp": 1, "model": 1}), 32)
  h, i, v, kv = arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.num_kv_heads * arch.head_dim
  kernels = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
  bits, rows = {"int8": (8, lambda d_in: 1), "nf4": (4, lambda d_in: d_in // 64)}[fmt]
  block = sum(math.ceil(a * b * bits / 8) + rows(a) * b * 2 for a, b in kernels) * arch.num_layers
  rest = (2 * v * h + 2 * h * arch.num_layers + h) * 2  # embedding, LM head, two norms a layer, final norm
  assert info["counted_bytes"]["frozen"] == block + rest
  assert info["frozen_params"] == v * h * 2 + sum(a * b for a, b in kernels) * arch.num_layers + h * (2 * arch.num_layers + 1)
