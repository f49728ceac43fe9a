"""Merges the TPU-compiler plans (`experiments.plan` JSON files) into one Markdown table.

  .venv/bin/python scripts/merge_plans.py runs/plan/tpu_*.json

Rows are sorted by model, base format, slice, remat, model axis and sequence
length; each row's step-time columns are recomputed from its own JSON
(`experiments.plan.step_flops`).
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import plan  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(files: list[str]) -> str:
  runs = [json.loads(pathlib.Path(f).read_text()) for f in files]
  rows = []
  for run in runs:
    config = ml_collections.ConfigDict(run["config"])
    for row in run["rows"]:
      row["chips"] = plan._chip_columns(config, row, tuple(row["chips"]))  # pylint: disable=protected-access
      rows.append(row)
  rows.sort(key=lambda r: (r["model"], r.get("quantize") or "", r["topology"], r["remat"] != "full",
                           r["mesh"]["model"], r["seq_len"], r["remat"]))
  return plan.markdown_topologies({"config": runs[0]["config"], "rows": rows})


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit("usage: scripts/merge_plans.py <plan JSON files from configs/plan.py:tpu runs>")
  print(main(sys.argv[1:]))
