r"""Collects GLUE ``results.json`` files into the paper's table layout (Markdown).

  python -m experiments.collect_results 'runs/table/*/results.json' > table.md
  python -m experiments.collect_results 'runs/table/*/results.json' --score=best --plot=runs/table/results.png

Rows are methods, columns tasks; each cell is the task's main metric as
mean ± sample std over seeds (n in brackets): the final evaluation's
(``--score=final``, the default) or the best over the run's evaluations
(``--score=best``, what GLUE papers report); the header says which. The
budget columns are the papers' # T / I-params (inference parameters
averaged over runs where pruning makes them differ, marked ~) and the total
rank over adapters at the start and end. A second table gives, per task,
the adapters' mean effective rank of dW and mean ||dW dWᵀ − I||_F² (the
paper's Table 4), the share of the initial rank pruned by the end
(AdaLoRA, SoRA, LoRA²), the mean training time and the mean ||dW||_F (how
far the updates moved; blank for results.json files from before it). ``--plot`` also draws
one panel per task: every seed's score as a dot, the mean as a line with
±1 std, methods in the table's order.

Runs of SoRA with the released code's variant (``sora.variant=released``)
are a row of their own, ``sora_released``; so are runs under a preset
(``rm_lora@authors``) and with the authors' frozen-head emulation
(``rm_lora@authors+frozen_head``), each listed after its method's plain row.
"""

from __future__ import annotations

import collections
import glob
import json
from collections.abc import Iterable, Sequence

import numpy as np
from absl import app, flags

from rmlora_jax import cli
from rmlora_jax import methods

_PLOT = flags.DEFINE_string("plot", None, "Also write a PNG of per-seed scores to this path.")
_SCORE = flags.DEFINE_enum("score", "final", ["final", "best"],
                           "Which evaluation of each run the table uses: the last, or the best.")

METHOD_ORDER = (*methods.METHODS, "sora_released", "peft_lora", "peft_adalora")
SCORES = ("final", "best")
_REQUIRED = ("task", "method", "seed", "metrics", "main_metric", "trainable_params")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, dtype=np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _method_key(label: str) -> tuple[int, str]:
  method = label.split("@")[0].split("+")[0]
  return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)


def row_label(result: dict) -> str:
  """The table row of a result: its method (``sora_released`` for SoRA's released-code variant),
  then ``@<preset>`` when it ran under one and ``+frozen_head`` with ``rm.emulate_frozen_head``."""
  config = result.get("config", {})
  variant = config.get("sora", {}).get("variant")
  label = "sora_released" if result["method"] == "sora" and variant == "released" else result["method"]
  preset = result.get("preset") or config.get("preset")
  if preset:
    label += f"@{preset}"
  if config.get("rm", {}).get("emulate_frozen_head") and methods.METHODS.get(result["method"]) is not None \
      and methods.METHODS[result["method"]].options is methods.RmOptions:
    label += "+frozen_head"
  return label


def _score(result: dict, source: str, score: str) -> float:
  metric = result["main_metric"]
  if score == "final":
    return float(result["metrics"][metric])
  if metric not in result.get("best", {}):
    raise ValueError(f"{source}: no best evaluation recorded (an older results.json); use --score=final")
  return float(result["best"][metric])


def _cell(values: Sequence[float], fmt: str) -> str:
  if not values:
    return ""
  return ("~" if max(values) != min(values) else "") + fmt.format(np.mean(values))


class Collection:
  """Results grouped by (method, task), one entry per seed, in a stable order.

  ``score`` picks each run's "final" evaluation or its "best".
  """

  def __init__(self, results: Iterable[tuple[str, dict]], score: str = "final"):
    if score not in SCORES:
      raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    self.score = score
    self.scores = collections.defaultdict(dict)  # (method, task) -> {seed: main metric}
    self.ranks = collections.defaultdict(list)
    self.orthos = collections.defaultdict(list)
    self.norms = collections.defaultdict(list)  # (method, task) -> mean ||dW||_F over adapters
    self.pruned = collections.defaultdict(list)  # (method, task) -> share of the initial total rank pruned
    self.times = collections.defaultdict(list)  # (method, task) -> training seconds
    self.trainable: dict[str, list[int]] = collections.defaultdict(list)
    self.inference: dict[str, list[int]] = collections.defaultdict(list)
    self.rank_start: dict[str, list[int]] = collections.defaultdict(list)
    self.rank_end: dict[str, list[int]] = collections.defaultdict(list)
    self.metric_names: dict[str, str] = {}
    self.tasks: list[str] = []
    seen = {}
    for source, r in results:
      missing = [k for k in _REQUIRED if k not in r]
      if missing:
        raise ValueError(f"{source}: not a results.json of the trainer (missing {', '.join(missing)})")
      if r["main_metric"] not in r["metrics"]:
        raise ValueError(f"{source}: main metric {r['main_metric']!r} not among its metrics {sorted(r['metrics'])}")
      label = row_label(r)
      key = (label, r["task"])
      if (key, r["seed"]) in seen:
        raise ValueError(f"two results for task {r['task']}, method {label}, seed {r['seed']}: "
                         f"{seen[(key, r['seed'])]} and {source}")
      seen[(key, r["seed"])] = source
      self.scores[key][r["seed"]] = _score(r, source, score)
      summary = r.get("adapters", {}).get("summary", {})
      if summary:
        self.ranks[key].append(summary["mean_effective_rank"])
        self.orthos[key].append(summary["mean_ortho_loss"])
        if "mean_frobenius_norm" in summary:  # results.json from before the measure lack it
          self.norms[key].append(summary["mean_frobenius_norm"])
      if "train_time_s" in r:
        self.times[key].append(float(r["train_time_s"]))
      self.trainable[label].append(int(r["trainable_params"]))
      self.inference[label].append(int(r.get("inference_params", r["trainable_params"])))
      total = r.get("total_rank")
      if total and total["initial"]:
        self.rank_start[label].append(total["initial"])
        self.rank_end[label].append(total["final"])
        self.pruned[key].append(1.0 - total["final"] / total["initial"])
      self.metric_names[r["task"]] = r["main_metric"]
      if r["task"] not in self.tasks:
        self.tasks.append(r["task"])
    self.methods = sorted({m for m, _ in self.scores}, key=_method_key)

  def seeds(self, method: str, task: str) -> list[float]:
    """The main metric of each seed, in seed order."""
    by_seed = self.scores.get((method, task), {})
    return [by_seed[s] for s in sorted(by_seed)]


def _collect(results: Collection | Iterable[dict | tuple[str, dict]], score: str = "final") -> Collection:
  """``results`` as a `Collection`, grouping and checking them unless they already are one."""
  if isinstance(results, Collection):
    return results
  return Collection((r if isinstance(r, tuple) else (f"result {i}", r) for i, r in enumerate(results)), score)


def table(results: Collection | Iterable[dict | tuple[str, dict]], score: str = "final") -> str:
  """Markdown tables (metrics and budgets; dW rank, orthogonality, pruning, time) from result dicts.

  ``results`` holds dicts, or ``(source, dict)`` pairs whose source (a file
  name) errors then name, or is a `Collection` of them (which then carries
  its own ``score``).
  """
  c = _collect(results, score)
  # The papers' budget columns: trainable / inference parameters and the total
  # rank over adapters at the start / end (AdaLoRA, SoRA and LoRA² prune it).
  out = ["| method | # T / I-params | # rank start / end | "
         + " | ".join(f"{t} ({c.score})" for t in c.tasks) + " |",
         "|---|---|---|" + "---|" * len(c.tasks)]
  for m in c.methods:
    row = []
    for t in c.tasks:
      values = c.seeds(m, t)
      row.append("{:.3f} ± {:.3f} ({})".format(*_mean_std(values), len(values)) if values else "")
    params = f"{_cell(c.trainable[m], '{:,.0f}')} / {_cell(c.inference[m], '{:,.0f}')}"
    ranks = f"{_cell(c.rank_start[m], '{:.0f}')} / {_cell(c.rank_end[m], '{:.0f}')}" if c.rank_start[m] else ""
    out.append(f"| {m} | {params} | {ranks} | " + " | ".join(row) + " |")
  out += ["", "| method | " + " | ".join(f"{t} rank(dW) | {t} ‖dWdWᵀ−I‖² | {t} pruned | {t} train s | {t} ‖dW‖_F"
                                       for t in c.tasks) + " |",
          "|---|" + "---|---|---|---|---|" * len(c.tasks)]
  for m in c.methods:
    row = []
    for t in c.tasks:
      row.append(f"{np.mean(c.ranks[(m, t)]):.2f}" if c.ranks[(m, t)] else "")
      row.append(f"{np.mean(c.orthos[(m, t)]):.2f}" if c.orthos[(m, t)] else "")
      row.append(f"{100 * np.mean(c.pruned[(m, t)]):.1f}%" if c.pruned[(m, t)] else "")
      row.append(f"{np.mean(c.times[(m, t)]):.0f}" if c.times[(m, t)] else "")
      row.append(f"{np.mean(c.norms[(m, t)]):.3f}" if c.norms[(m, t)] else "")
    out.append(f"| {m} | " + " | ".join(row) + " |")
  return "\n".join(out) + "\n"


def plot(results: Collection | Iterable[dict | tuple[str, dict]], path: str) -> None:
  """One panel per task: each seed's main metric (dots) and mean ± std (a line and error bar)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  c = _collect(results)
  fig, axes = plt.subplots(1, len(c.tasks), figsize=(0.9 * len(c.methods) * len(c.tasks) + 1.5, 3.6),
                           squeeze=False)
  for ax, task in zip(axes[0], c.tasks):
    methods = [m for m in c.methods if c.seeds(m, task)]
    for x, m in enumerate(methods):
      values = c.seeds(m, task)
      mean, std = _mean_std(values)
      # A line, not a bar: the axis is cropped to the scores, so bar lengths would mislead.
      ax.hlines(mean, x - 0.3, x + 0.3, color="C7" if m.startswith("peft_") else "C0", lw=3)
      ax.errorbar(x, mean, yerr=std, color="black", capsize=4, lw=1)
      ax.scatter(x + np.linspace(-0.15, 0.15, len(values)), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    lows = [min(c.seeds(m, task)) for m in methods]
    highs = [max(c.seeds(m, task)) for m in methods]
    pad = 0.15 * (max(highs) - min(lows) + 1e-3)
    ax.set_ylim(min(lows) - pad, max(highs) + pad)
    ax.set_title(task)
    ax.set_ylabel(c.metric_names[task])
    ax.grid(axis="y", lw=0.3)
  fig.suptitle(f"{c.score} dev score per seed (dots); mean (line) ± std over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def load(patterns: Sequence[str]) -> list[tuple[str, dict]]:
  """``(file, results dict)`` for every file the glob patterns match."""
  files = sorted({f for pattern in patterns for f in glob.glob(pattern)})
  if not files:
    raise ValueError(f"no results.json matched {list(patterns)}")
  out = []
  for f in files:
    try:
      out.append((f, json.loads(open(f, encoding="utf-8").read())))
    except json.JSONDecodeError as e:
      raise ValueError(f"{f}: not valid JSON ({e})") from None
  return out


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("usage: python -m experiments.collect_results 'GLOB' [GLOB ...] [--score=final|best] "
                         "[--plot=PATH]")
  results = Collection(load(argv[1:]), _SCORE.value)
  print(table(results), end="")
  if _PLOT.value:
    plot(results, _PLOT.value)


if __name__ == "__main__":
  cli.run(main)
