"""Compile time and per-chip memory of the 7B RM-LoRA step against depth, layers scanned and unrolled.

Compiles `experiments.plan`'s step (configs/plan.py:tpu settings: FSDP only,
2048 tokens, full remat) for one TPU slice with the TPU compiler, at each
depth, once with the layers under `nn.scan` and once unrolled, and prints a
JSON line per compile and a Markdown table::

  scripts/tpu_env.sh .venv/bin/python scripts/compile_depth.py v5e:4x4 4,8,16,32
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import plan as plan_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import plan  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2**30


def main(topology: str, depths: list[int]) -> None:
  config = plan_config.get_config("tpu")
  devices = plan.topology_devices(topology)
  sizes = plan.parse_mesh(len(devices), 1, 1, where=f"topology {topology}")
  rows = []
  for depth in depths:
    for scan in (True, False):
      config.scan_layers = scan
      row = plan.compile_case(config, "llama2-7b", sizes, 2048, depth, "full", devices)
      rows.append({"layers": depth, "scan_layers": scan, "lower_s": round(row["lower_s"], 1),
                   "compile_s": round(row["compile_s"], 1), "total_gib": round(row["total"] / GIB, 2),
                   "temp_gib": round(row["temp"] / GIB, 2)})
      print(json.dumps(rows[-1]), flush=True)
  print("\n| layers | scanned: compile s | unrolled: compile s | scanned: total GiB | unrolled: total GiB |")
  print("|---|---|---|---|---|")
  for depth in depths:
    s, u = (next(r for r in rows if r["layers"] == depth and r["scan_layers"] == scan) for scan in (True, False))
    print(f"| {depth} | {s['compile_s']} | {u['compile_s']} | {s['total_gib']} | {u['total_gib']} |")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit("usage: scripts/compile_depth.py <topology, e.g. v5e:4x4> <depths, e.g. 4,8,16,32>")
  main(sys.argv[1], [int(d) for d in sys.argv[2].split(",")])
