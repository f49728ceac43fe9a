"""The train-step benchmark runs end to end on the tiny shape (no timing asserted)."""

import json

from configs import bench as bench_config
from experiments import bench


def test_bench_runs_end_to_end(tmp_path):
  config = bench_config.get_config("tiny")
  config.methods = ("lora",)
  config.output = str(tmp_path / "bench.json")
  bench.report(bench.benchmark(config), config.output)
  results = json.loads((tmp_path / "bench.json").read_text())
  rows = results["rows"]
  assert set(rows) == {"lora", "floor", "peft_lora"}
  for row in rows.values():
    assert row["median_s"] > 0 and len(row["times_s"]) == config.repeats
  assert rows["lora"]["trainable_params"] == rows["peft_lora"]["trainable_params"]
  assert rows["floor"]["vs_floor"] == 1.0
  assert "| lora |" in bench.markdown(results)
