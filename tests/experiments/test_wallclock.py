"""experiments.wallclock: whole runs of ours and PEFT's in turn (no timing is asserted)."""

import json
import pathlib
import subprocess
import sys

from experiments import wallclock

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_summary_takes_medians_ranges_and_the_ratio_of_medians():
  runs = [{"side": side, "task": "cola", "wall_s": w, "train_time_s": t, "metric": 0.0}
          for side, w, t in [("ours", 3.0, 2.0), ("ours", 1.0, 1.0), ("ours", 2.0, 4.0),
                             ("peft", 4.0, 2.0), ("peft", 5.0, 2.0), ("peft", 9.0, 6.0)]]
  summary = wallclock._summary(runs)["cola"]
  assert summary["ours_wall_s"] == {"median": 2.0, "min": 1.0, "max": 3.0}
  assert summary["peft_train_time_s"] == {"median": 2.0, "min": 2.0, "max": 6.0}
  assert summary["ratio_wall"] == 2.0 / 5.0 and summary["ratio_train"] == 2.0 / 2.0
  assert "| cola | 2.0 [1.0–3.0] | 5.0 [4.0–9.0] | 0.40 |" in wallclock.table({"cola": summary})


def test_repeats_alternate_which_side_goes_first():
  assert [wallclock.order(i) for i in range(3)] == [["ours", "peft"], ["peft", "ours"], ["ours", "peft"]]


def test_runs_both_sides_and_writes_the_record(tiny_bert, tiny_glue, tmp_path):
  # One repeat with empty caches (no untimed run to fill shared ones first): each side's process runs once.
  out = tmp_path / "wallclock.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.wallclock", "--tasks=rte", "--repeats=1", "--caches=cold",
                         f"--data_dir={tiny_glue}", f"--out={out}", "--",
                         f"--config.model.name_or_path={tiny_bert}", "--config.method=lora", "--config.batch_size=8",
                         "--config.max_seq_len=32", "--config.max_steps=2", "--config.lora.rank=4"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  assert [r["side"] for r in record["runs"]] == ["ours", "peft"] and record["caches"] == "cold"
  assert all(r["wall_s"] > r["train_time_s"] > 0 for r in record["runs"])
  assert all(r["page_faults"] > 0 and r["system_s"] >= 0 for r in record["runs"])
  assert set(record["summary"]["rte"]) >= {"ours_wall_s", "peft_wall_s", "ratio_wall", "ratio_train"}
  assert "| rte |" in proc.stdout
