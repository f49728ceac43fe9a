r"""Collects GLUE ``results.json`` files into the paper's table layout (Markdown).

  python -m experiments.collect_results 'runs/*/results.json' > table.md

Rows are methods, columns tasks; each cell is the task's main metric as
mean ± std over seeds (n in brackets), followed by the adapters' mean
effective rank of dW and mean ||dW dWᵀ − I||_F² (the paper's Table 4).
"""

from __future__ import annotations

import collections
import glob
import json
import sys
from collections.abc import Iterable

import numpy as np

METHOD_ORDER = ("full_ft", "lora", "r_lora", "gm_lora", "rm_lora", "adalora", "sora", "lora2", "peft_lora")


def _mean_std(values: list[float]) -> str:
  v = np.asarray(values, dtype=np.float64)
  std = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():.3f} ± {std:.3f} ({len(v)})"


def table(results: Iterable[dict]) -> str:
  """Markdown tables (metrics; dW rank and orthogonality) from result dicts."""
  cells = collections.defaultdict(list)
  ranks = collections.defaultdict(list)
  orthos = collections.defaultdict(list)
  params = {}
  tasks = []
  for r in results:
    key = (r["method"], r["task"])
    cells[key].append(r["metrics"][r["main_metric"]])
    summary = r.get("adapters", {}).get("summary", {})
    if summary:
      ranks[key].append(summary["mean_effective_rank"])
      orthos[key].append(summary["mean_ortho_loss"])
    params[r["method"]] = r["trainable_params"]
    if r["task"] not in tasks:
      tasks.append(r["task"])
  methods = sorted({m for m, _ in cells}, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
  out = ["| method | # T-params | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
  for m in methods:
    row = [_mean_std(cells[(m, t)]) if cells[(m, t)] else "" for t in tasks]
    out.append(f"| {m} | {params[m]:,} | " + " | ".join(row) + " |")
  out += ["", "| method | " + " | ".join(f"{t} rank(dW) | {t} ‖dWdWᵀ−I‖²" for t in tasks) + " |",
          "|---|" + "---|---|" * len(tasks)]
  for m in methods:
    row = []
    for t in tasks:
      row.append(f"{np.mean(ranks[(m, t)]):.2f}" if ranks[(m, t)] else "")
      row.append(f"{np.mean(orthos[(m, t)]):.2f}" if orthos[(m, t)] else "")
    out.append(f"| {m} | " + " | ".join(row) + " |")
  return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit(f"usage: python -m experiments.collect_results 'GLOB' [GLOB ...]")
  files = sorted({f for pattern in argv[1:] for f in glob.glob(pattern)})
  if not files:
    raise SystemExit(f"no results.json matched {argv[1:]}")
  sys.stdout.write(table(json.loads(open(f).read()) for f in files))


if __name__ == "__main__":
  main(sys.argv)
