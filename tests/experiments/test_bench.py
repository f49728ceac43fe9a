"""The train-step benchmark runs end to end on the tiny shape (no timing asserted)."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from configs import bench as bench_config
from experiments import bench

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_runs_end_to_end(tmp_path):
  config = bench_config.get_config("tiny")
  # SoRA and LoRA² as well: every method is built from the GLUE config's sections.
  config.methods = ("lora", "sora", "lora2")
  config.warmup, config.repeats = 0, 1  # compiling is most of the test's time; no timing is asserted
  config.output = str(tmp_path / "bench.json")
  bench.report(bench.benchmark(config), config.output)
  results = json.loads((tmp_path / "bench.json").read_text())
  rows = results["rows"]
  assert set(rows) == {"lora", "sora", "lora2", "floor", "peft_lora"}
  for row in rows.values():
    assert row["median_s"] > 0 and len(row["times_s"]) == config.repeats
  assert rows["lora"]["trainable_params"] == rows["peft_lora"]["trainable_params"]
  # SoRA starts at config.sora.init_rank (16 by default), not at the LoRA rank.
  # The default targets are the GLUE experiment's: all six matrices of a layer.
  assert config.targets == "all"
  h, i = config.model.hidden_size, config.model.intermediate_size
  six = [(h, h)] * 4 + [(h, i), (i, h)]  # query key value attention-output intermediate output
  adapted = six * config.model.num_layers
  head = h * 2 + 2  # the classifier, trained beside the adapters by every method
  assert rows["lora"]["trainable_params"] == _lora_params(config.rank, adapted) + head
  assert rows["sora"]["trainable_params"] == (_lora_params(config.sora.init_rank, adapted)
                                              + config.sora.init_rank * len(adapted) + head)
  assert rows["floor"]["vs_floor"] == 1.0
  assert "| lora |" in bench.markdown(results)


def _lora_params(rank, shapes):
  """LoRA's trainable count written out: r * (d_in + d_out) for each adapted matrix."""
  return sum(rank * (d_in + d_out) for d_in, d_out in shapes)


def test_decoder_bench_runs_end_to_end(tmp_path):
  """tiny-llama: our LoRA and PEFT's train the same number of parameters, all seven matrices a layer."""
  config = bench_config.get_config("tiny-llama")
  # lora@int8@scan: an int8 base under the scanned layers, beside the float unrolled runners.
  config.methods = ("lora", "rm_lora", "lora@int8@scan")
  config.warmup, config.repeats = 0, 1  # compiling is most of the test's time; no timing is asserted
  config.output = str(tmp_path / "bench.json")
  bench.report(bench.benchmark(config), config.output)
  results = json.loads((tmp_path / "bench.json").read_text())
  rows = results["rows"]
  assert set(rows) == {"lora", "rm_lora", "lora@int8@scan", "floor", "peft_lora"}
  assert rows["lora@int8@scan"]["trainable_params"] == rows["lora"]["trainable_params"]
  assert rows["lora@int8@scan"]["frozen_mib"] > 0
  with pytest.raises(ValueError, match=r"suffix @nf8 is not one of @merge, @low_rank, @scan, @unrolled, @int8"):
    bench.variant("lora@nf8")
  assert bench.variant("rm_lora@merge@nf4@unrolled") == ("rm_lora", "merge", False, "nf4")
  for row in rows.values():
    assert row["median_s"] > 0 and len(row["times_s"]) == config.repeats
  m = config.model
  h, i = m.hidden_size, m.intermediate_size
  kv = h // m.num_heads * m.num_kv_heads
  per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
  expected = _lora_params(config.rank, per_layer * m.num_layers)
  assert rows["lora"]["trainable_params"] == expected
  assert rows["peft_lora"]["trainable_params"] == expected
  assert rows["rm_lora"]["trainable_params"] == expected
  # The floor trains two norm scales and nothing else (no head: the LM head is tied).
  assert rows["floor"]["trainable_params"] == 2 * h
  assert "| peft_lora |" in bench.markdown(results)


def test_decoder_losses_agree_with_torch():
  """Our SFT loss on the converted weights equals the torch loss PEFT's runner minimises."""
  import jax
  import numpy as np
  import torch

  from rmlora_jax.models import llama

  config = bench_config.get_config("tiny-llama")
  hf_config = bench._hf_config(config)
  torch_model, state = bench._torch_state(hf_config, config.seed, decoder=True)
  params, _ = llama.params_from_state_dict(state, hf_config)
  module = llama.LlamaForCausalLM(arch=llama.arch_from_hf_config(hf_config))
  batch = bench._decoder_batch(config, np.random.default_rng(0))
  assert batch["loss_mask"].sum() > 0 and batch["attention_mask"].min() == 0
  task = bench._task(config)
  ours = task.loss(task.forward(module, jax.tree.map(np.asarray, params), batch, deterministic=True, rngs=None),
                   batch)
  with torch.no_grad():
    logits = torch_model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                         attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long)).logits
    theirs = bench._torch_response_loss(logits, torch.tensor(batch["input_ids"], dtype=torch.long),
                                        torch.tensor(batch["loss_mask"], dtype=torch.float32),
                                        torch.tensor(batch["weights"]))
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


def test_profile_names_the_ops_a_step_runs(tmp_path):
  """--config.profile traces each JAX runner: LoRA's step runs more matmuls than the floor's."""
  out = tmp_path / "bench.json"
  subprocess.run(
      [sys.executable, "-m", "experiments.bench", "--config=configs/bench.py:tiny", "--config.peft=False",
       "--config.methods=('lora',)", "--config.warmup=0", "--config.repeats=1", "--config.profile_steps=1",
       f"--config.profile={tmp_path / 'trace'}", f"--config.output={out}"],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
  rows = json.loads(out.read_text())["rows"]
  matmuls = {name: sum(p["count"] for p in rows[name]["profile"] if re.match(r"(dot|ynn_fusion)", p["op"]))
             for name in ("lora", "floor")}
  assert matmuls["lora"] > matmuls["floor"] > 0, matmuls
  assert all(p["ms"] > 0 and p["count"] >= 1 for p in rows["lora"]["profile"])
  assert list((tmp_path / "trace" / "lora").rglob("*.xplane.pb"))  # TensorBoard can open it.
