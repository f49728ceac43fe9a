r"""The Table 4 and Figure 1 analogues of the vision runs, written into docs/VISION.md.

  python -m experiments.vision_report --runs=runs/vision --pretrain=runs/vit_pretrain \
      --doc=docs/VISION.md --figure=docs/vision_figure1.png

Reads ``<pretrain>/results.json`` and every
``<runs>/transfer_<method>_r<R>_s<seed>/results.json`` (scripts/vision_runs.sh
writes them) and replaces the text between the markers
``<!-- vision-results:begin -->`` and ``<!-- vision-results:end -->`` of
``--doc`` with: the pre-training result, the Table 4 analogue (per rank and
method: rank(dW), ||dW dW^T - I||_F^2, test and train accuracy, the gap, as
mean ± sample std over seeds, and the frozen random head's accuracy), and a
link to the 4-panel Figure 1 analogue (test loss, test accuracy, train
accuracy and generalisation gap per epoch, mean over seeds, one panel row
per rank).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import pathlib
import re

import numpy as np
from absl import flags

from rmlora_jax import cli

_RUNS = flags.DEFINE_string("runs", "runs/vision", "Folder of the pre-training and transfer run folders.")
_PRETRAIN = flags.DEFINE_string("pretrain", "runs/vit_pretrain", "The pre-training run's folder.")
_DOC = flags.DEFINE_string("doc", "docs/VISION.md", "Markdown file whose results section is replaced.")
_FIGURE = flags.DEFINE_string("figure", "docs/vision_figure1.png", "Where the 4-panel figure goes.")

METHODS = ("lora", "gm_lora", "r_lora", "rm_lora")
NAMES = {"lora": "LoRA", "gm_lora": "GM-LoRA", "r_lora": "R-LoRA", "rm_lora": "RM-LoRA"}
BEGIN, END = "<!-- vision-results:begin -->", "<!-- vision-results:end -->"
_RUN = re.compile(r"transfer_(?P<method>\w+?)_r(?P<rank>\d+)_s(?P<seed>\d+)$")
PANELS = (("loss", "test loss"), ("accuracy", "test accuracy"), ("train_accuracy", "train accuracy"),
          ("generalization_gap", "generalisation gap (train - test acc.)"))


def _ms(values, scale=1.0, digits=1) -> str:
  v = np.asarray(values, np.float64) * scale
  if len(v) == 0:
    return "–"
  std = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
  return f"{v.mean():.{digits}f}{std}"


def load_runs(root: str) -> dict[tuple[int, str], list[dict]]:
  """``{(rank, method): [results of each seed]}`` of the transfer runs under ``root``."""
  runs = collections.defaultdict(list)
  for file in sorted(glob.glob(os.path.join(root, "transfer_*", "results.json"))):
    m = _RUN.match(pathlib.Path(file).parent.name)
    if m:
      runs[(int(m["rank"]), m["method"])].append(json.loads(pathlib.Path(file).read_text()))
  return runs


def table(runs) -> str:
  """The Table 4 analogue as Markdown."""
  lines = ["| method | R | seeds | rank(ΔW) | ‖ΔWΔWᵀ − I‖²_F | test acc. (%) | train acc. (%) | gap (pp) "
           "| frozen random head acc. (%) |", "|---|---|---|---|---|---|---|---|---|"]
  for rank in sorted({r for r, _ in runs}):
    for method in METHODS:
      rs = runs.get((rank, method), [])
      if not rs:
        continue
      summ = [r["adapters"]["summary"] for r in rs]
      lines.append(
          f"| {NAMES[method]} | {rank} | {len(rs)} | {_ms([s['mean_effective_rank'] for s in summ])} "
          f"| {_ms([s['mean_ortho_loss'] for s in summ], digits=2)} "
          f"| {_ms([r['metrics']['accuracy'] for r in rs], 100)} "
          f"| {_ms([r['metrics']['train_accuracy'] for r in rs], 100)} "
          f"| {_ms([r['metrics']['generalization_gap'] for r in rs], 100)} "
          f"| {_ms([r['initial_metrics']['accuracy'] for r in rs], 100)} |")
  return "\n".join(lines)


def baselines(root: str, runs) -> str:
  """The floor (the frozen random head, before training) and the linear probe (the whole classifier trained)."""
  floor = {r["seed"]: r["initial_metrics"]["accuracy"] for rs in runs.values() for r in rs}
  probes = [json.loads(pathlib.Path(f).read_text())
            for f in sorted(glob.glob(os.path.join(root, "probe_full_ft_s*", "results.json")))]
  lines = [f"- Frozen random head, no training (the floor; W0 of each seed): test accuracy "
           f"{_ms(list(floor.values()), 100)}% over {len(floor)} seeds."]
  if probes:
    summ = [p["adapters"]["summary"] for p in probes]
    lines.append(
        f"- Linear probe (method full_ft on frozen features: the whole 5 × 192 classifier trained, same "
        f"optimiser and epochs): test accuracy {_ms([p['metrics']['accuracy'] for p in probes], 100)}%, train "
        f"{_ms([p['metrics']['train_accuracy'] for p in probes], 100)}%, rank(W − W0) "
        f"{_ms([s['mean_effective_rank'] for s in summ])}, ‖ΔWΔWᵀ − I‖²_F "
        f"{_ms([s['mean_ortho_loss'] for s in summ], digits=2)} over {len(probes)} seeds.")
  return "\n".join(lines)


def figure(runs, path: str) -> None:
  """Figure 1 analogue: a row per rank, the four panels, mean over seeds per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ranks = sorted({r for r, _ in runs})
  fig, axes = plt.subplots(len(ranks), 4, figsize=(16, 3.2 * len(ranks)), squeeze=False)
  for row, rank in zip(axes, ranks):
    for ax, (key, title) in zip(row, PANELS):
      for method in METHODS:
        rs = runs.get((rank, method), [])
        if not rs:
          continue
        curves = np.array([[e[key] for e in r["history"]["eval"]] for r in rs], np.float64)
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0) * (1 if key == "loss" else 100)
        ax.plot(epochs, mean, marker=".", label=f"{NAMES[method]} (n={len(rs)})")
      ax.set_title(f"R={rank}: {title}", fontsize=9)
      ax.set_xlabel("epoch")
    row[0].legend(fontsize=7)
  fig.suptitle("Last-layer LoRA of the offline ViT stand-in on five unseen CIFAR-10 classes (mean over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def pretrain_line(folder: str) -> str:
  file = pathlib.Path(folder) / "results.json"
  if not file.is_file():
    return "Pre-training run not found."
  r = json.loads(file.read_text())
  m = r["metrics"]
  return (f"Pre-trained stand-in ({', '.join(r['classes'])}; {r['train_images']} training, {r['test_images']} "
          f"test images; {r['steps']} steps, {r['train_time_s']:.0f} s): test accuracy "
          f"**{100 * m['accuracy']:.1f}%** (chance 20%), train accuracy {100 * m['train_accuracy']:.1f}%.")


def main(argv):
  del argv
  runs = load_runs(_RUNS.value)
  if not runs:
    raise ValueError(f"--runs={_RUNS.value!r} holds no transfer_<method>_r<R>_s<seed>/results.json")
  figure(runs, _FIGURE.value)
  rel = os.path.relpath(_FIGURE.value, os.path.dirname(os.path.abspath(_DOC.value)))
  body = "\n\n".join([pretrain_line(_PRETRAIN.value), baselines(_RUNS.value, runs), table(runs),
                       f"![Figure 1 analogue]({rel})"])
  doc = pathlib.Path(_DOC.value)
  text = doc.read_text() if doc.is_file() else f"{BEGIN}\n{END}\n"
  if BEGIN not in text or END not in text:
    raise ValueError(f"--doc={_DOC.value!r} lacks the markers {BEGIN} and {END}")
  head, rest = text.split(BEGIN, 1)
  doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")
  print(body)


if __name__ == "__main__":
  cli.run(main)
