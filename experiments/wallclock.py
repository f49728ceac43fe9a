r"""Whole GLUE runs of ours and PEFT's in turn: process start to results.json, medians and ranges.

  python -m experiments.wallclock --tasks=cola,sst2 --repeats=3 --out=docs/bench/wallclock.json \
      -- --config.num_epochs=1 --config.method=lora

Each repeat runs ``experiments.glue`` and ``experiments.peft_glue`` with the
same flags (the task's config with ``model=minilm``, the shared GLUE copy,
SST-2 on its 2,000-example subset, progress off, then whatever follows
``--``), one after the other, alternating which goes first. Every run gets a
fresh workdir. ``--caches=warm`` (the default) shares one token cache and one
compilation cache over the runs, warmed by an untimed run of ours first;
``--caches=cold`` gives every run empty ones (a user's first run). Printed
and written: per task and side the median and range of the wall clock and of
``train_time_s``, and the ratio of the medians; each run's record also has
its page faults and kernel (system) time. Timing belongs here, never in
tests: run it on an otherwise idle machine and say how loaded it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from rmlora_jax import cli

_TASKS = flags.DEFINE_list("tasks", ["cola", "sst2"], "GLUE tasks (configs/<task>.py).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each side per task.")
_CACHES = flags.DEFINE_enum("caches", "warm", ["warm", "cold"], "Shared warm caches, or empty ones per run.")
_DATA = flags.DEFINE_string("data_dir", "../shared/data/glue", "The GLUE folder.")
_MODEL = flags.DEFINE_string("model", "minilm", "The config argument's model=.")
_OUT = flags.DEFINE_string("out", "", "Also write the measurements and summary here (JSON).")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDES = {"ours": "experiments.glue", "peft": "experiments.peft_glue"}


def _run(side: str, task: str, workdir: pathlib.Path, caches: pathlib.Path, extra: list[str]) -> dict:
  """One run of ``side``; returns its wall clock and results.json's train_time_s."""
  args = [sys.executable, "-m", SIDES[side], f"--config={ROOT}/configs/{task}.py:model={_MODEL.value}",
          f"--config.data.dir={_DATA.value}", f"--config.workdir={workdir}", "--config.progress=False",
          f"--config.data.cache_dir={caches / 'tokens'}"]
  if task == "sst2":
    args.append("--config.data.train_subset=2000")
  env = dict(os.environ, RMLORA_COMPILATION_CACHE=str(caches / "jax"))
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run([*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    err = proc.stderr.split("\nExtension modules:")[0]  # a fatal error's list of loaded modules says nothing
    raise RuntimeError(f"{side} on {task} failed (exit {proc.returncode}): {err[-3000:]}")
  results = json.loads((workdir / "results.json").read_text())
  # The run's page faults and kernel time (the process and its children): what the allocator costs.
  return {"side": side, "task": task, "wall_s": round(wall, 2), "train_time_s": results["train_time_s"],
          "metric": results["metrics"][results["main_metric"]],
          "page_faults": after.ru_minflt - before.ru_minflt, "system_s": round(after.ru_stime - before.ru_stime, 2)}


def _summary(runs: list[dict]) -> dict:
  out = {}
  for task in dict.fromkeys(r["task"] for r in runs):
    row = {}
    for side in SIDES:
      mine = [r for r in runs if r["task"] == task and r["side"] == side]
      for key in ("wall_s", "train_time_s"):
        values = [r[key] for r in mine]
        row[f"{side}_{key}"] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    row["ratio_wall"] = row["ours_wall_s"]["median"] / row["peft_wall_s"]["median"]
    row["ratio_train"] = row["ours_train_time_s"]["median"] / row["peft_train_time_s"]["median"]
    out[task] = row
  return out


def table(summary: dict) -> str:
  """The summary as Markdown: medians [min–max] per side, and ours / PEFT."""
  cell = lambda d: f"{d['median']:.1f} [{d['min']:.1f}–{d['max']:.1f}]"
  lines = ["| task | ours wall s | PEFT wall s | ours / PEFT | ours train s | PEFT train s | ours / PEFT |",
           "|---|---|---|---|---|---|---|"]
  for task, r in summary.items():
    lines.append(f"| {task} | {cell(r['ours_wall_s'])} | {cell(r['peft_wall_s'])} | {r['ratio_wall']:.2f} | "
                 f"{cell(r['ours_train_time_s'])} | {cell(r['peft_train_time_s'])} | {r['ratio_train']:.2f} |")
  return "\n".join(lines) + "\n"


def order(repeat: int) -> list[str]:
  """The sides in the order repeat ``repeat`` (0-based) runs them: ours first, then PEFT first, in turn."""
  return list(SIDES) if repeat % 2 == 0 else list(SIDES)[::-1]


def main(argv: list[str]) -> None:
  extra = argv[1:]
  runs = []
  with tempfile.TemporaryDirectory(prefix="wallclock-") as tmp:
    tmp = pathlib.Path(tmp)
    for task in _TASKS.value:
      shared = tmp / f"caches-{task}"
      if _CACHES.value == "warm":  # fill the shared caches once, untimed
        _run("ours", task, tmp / f"warmup-{task}", shared, extra)
      for i in range(_REPEATS.value):
        for side in order(i):
          caches = shared if _CACHES.value == "warm" else tmp / f"caches-{task}-{side}-{i}"
          runs.append(_run(side, task, tmp / f"{task}-{side}-{i}", caches, extra))
          print(json.dumps(runs[-1]), flush=True)
  summary = _summary(runs)
  print(table(summary))
  if _OUT.value:
    record = {"caches": _CACHES.value, "flags": extra, "runs": runs, "summary": summary,
              "load_average": os.getloadavg(), "cpu": cli.cpu_description(),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    pathlib.Path(_OUT.value).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
