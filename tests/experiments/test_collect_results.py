"""experiments.collect_results: the paper-layout table against plain statistics."""

import json
import pathlib
import re
import statistics
import subprocess
import sys

import pytest

from experiments import collect_results

ROOT = pathlib.Path(__file__).resolve().parents[2]


def result(task, method, seed, score, *, metric="accuracy", rank=8.0, ortho=500.0, params=1000, best=None,
           final_rank=None, variant=None, time=10.0):
  pruned = method == "adalora"  # pruned to half its rank: fewer inference parameters
  final_rank = final_rank if final_rank is not None else (48 if pruned else 96)
  out = {"task": task, "method": method, "seed": seed, "main_metric": metric,
         "metrics": {metric: score, "other": -1.0}, "trainable_params": params,
         "inference_params": params * final_rank // 96,
         "total_rank": {"initial": 96, "final": final_rank}, "train_time_s": time,
         "best": {"step": 5, metric: score if best is None else best},
         "adapters": {"summary": {"mean_effective_rank": rank, "mean_ortho_loss": ortho,
                                  "mean_frobenius_norm": 0.1 * (seed + 1)}}}
  if variant:
    out["config"] = {"sora": {"variant": variant}}
  return out


SCORES = {  # (task, method) -> score per seed
    ("cola", "peft_lora"): [0.40, 0.44, 0.39],
    ("cola", "rm_lora"): [0.45, 0.47, 0.41],
    ("cola", "lora"): [0.42, 0.43, 0.38],
    ("sst2", "lora"): [0.81, 0.83],
    ("sst2", "r_lora"): [0.84],
}


def all_results():
  return [result(task, method, seed, s, metric="mcc" if task == "cola" else "accuracy",
                 rank=7.0 + seed, ortho=100.0 * seed)
          for (task, method), scores in SCORES.items() for seed, s in enumerate(scores)]


def cells(markdown):
  """{(method, column): cell} of the first table."""
  lines = [l for l in markdown.split("\n\n")[0].splitlines() if l.startswith("|")]
  header = [h.strip() for h in lines[0].strip("|").split("|")]
  out = {}
  for line in lines[2:]:
    row = [c.strip() for c in line.strip("|").split("|")]
    out.update({(row[0], h): c for h, c in zip(header[1:], row[1:])})
  return out


def test_table_cells_are_mean_and_sample_std_over_seeds():
  md = collect_results.table(all_results())
  got = cells(md)
  for (task, method), scores in SCORES.items():
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    assert got[(method, f"{task} (final)")] == f"{statistics.fmean(scores):.3f} ± {std:.3f} ({len(scores)})"
  assert got[("r_lora", "cola (final)")] == "" and got[("peft_lora", "sst2 (final)")] == ""
  assert got[("lora", "# T / I-params")] == "1,000 / 1,000"
  assert got[("lora", "# rank start / end")] == "96 / 96"
  # Methods in the paper's order with the anchor last; tasks as first seen.
  rows = re.findall(r"^\| (\w+) \| [\d,]+ / [\d,]+ \|", md, flags=re.M)
  assert rows == ["lora", "r_lora", "rm_lora", "peft_lora"]
  assert md.splitlines()[0] == "| method | # T / I-params | # rank start / end | cola (final) | sst2 (final) |"


def test_second_table_averages_rank_and_orthogonality():
  md = collect_results.table(all_results())
  second = md.split("\n\n")[1]
  row = next(l for l in second.splitlines() if l.startswith("| rm_lora "))
  # rm_lora on cola: seeds 0, 1, 2 -> ranks 7, 8, 9, ortho 0, 100, 200, ||dW||_F 0.1, 0.2, 0.3;
  # nothing pruned, 10 s each; no sst2 runs.
  assert [c.strip() for c in row.split("|")[1:12]] == ["rm_lora", "8.00", "100.00", "0.0%", "10", "0.200",
                                                       "", "", "", "", ""]


def test_best_scores_pruning_and_the_released_sora_row():
  runs = [result("cola", "sora", s, 0.1 * s, best=0.5 + 0.1 * s, final_rank=f, time=t)
          for s, (f, t) in enumerate([(24, 10.0), (48, 20.0)])]
  runs += [result("cola", "sora", 0, 0.3, variant="released", final_rank=96)]
  final, best = cells(collect_results.table(runs)), cells(collect_results.table(runs, score="best"))
  assert final[("sora", "cola (final)")] == "0.050 ± 0.071 (2)"
  assert best[("sora", "cola (best)")] == "0.550 ± 0.071 (2)"
  assert final[("sora_released", "cola (final)")] == "0.300 ± 0.000 (1)"
  # Inference parameters and final ranks differ between the two runs: their mean, marked.
  assert final[("sora", "# T / I-params")] == "1,000 / ~375"
  assert final[("sora", "# rank start / end")] == "96 / ~36"
  second = collect_results.table(runs).split("\n\n")[1]
  row = next(l for l in second.splitlines() if l.startswith("| sora "))
  # Pruned shares 1 - 24/96 = 75% and 1 - 48/96 = 50%: mean 62.5%; times 10 and 20 s.
  assert [c.strip() for c in row.split("|")[4:6]] == ["62.5%", "15"]
  old = result("cola", "lora", 0, 0.3)
  del old["best"]
  with pytest.raises(ValueError, match=r"result 0: no best evaluation recorded"):
    collect_results.table([old], score="best")


def test_presets_and_the_frozen_head_are_rows_of_their_own():
  def run(method, seed, score, preset="", frozen=False):
    out = result("sst2", method, seed, score)
    out["config"] = {"preset": preset, "rm": {"emulate_frozen_head": frozen}}
    return out

  runs = [run("rm_lora", 0, 0.80), run("rm_lora", 0, 0.70, "authors"), run("rm_lora", 1, 0.72, "authors"),
          run("rm_lora", 0, 0.60, "authors", True), run("lora", 0, 0.9, "authors"),
          run("peft_lora", 0, 0.85, "authors")]
  table = cells(collect_results.table(runs))
  assert table[("rm_lora", "sst2 (final)")] == "0.800 ± 0.000 (1)"
  assert table[("rm_lora@authors", "sst2 (final)")] == "0.710 ± 0.014 (2)"
  assert table[("rm_lora@authors+frozen_head", "sst2 (final)")] == "0.600 ± 0.000 (1)"
  assert table[("peft_lora@authors", "sst2 (final)")] == "0.850 ± 0.000 (1)"
  # Each variant right after its method's plain row, in the methods' order.
  rows = [row for row, column in table if column == "sst2 (final)"]
  assert rows == ["lora@authors", "rm_lora", "rm_lora@authors", "rm_lora@authors+frozen_head", "peft_lora@authors"]


def test_duplicate_seed_names_both_files():
  r = result("rte", "lora", 0, 0.5)
  with pytest.raises(ValueError, match=r"seed 0: a/results.json and b/results.json"):
    collect_results.table([("a/results.json", r), ("b/results.json", dict(r))])


def test_malformed_result_names_its_file():
  bad = result("rte", "lora", 0, 0.5)
  del bad["main_metric"]
  with pytest.raises(ValueError, match=r"x/results.json: .*missing main_metric"):
    collect_results.table([("x/results.json", bad)])
  wrong = result("rte", "lora", 0, 0.5, metric="f1")
  wrong["metrics"] = {"accuracy": 0.5}
  with pytest.raises(ValueError, match=r"y/results.json: main metric 'f1' not among"):
    collect_results.table([("y/results.json", wrong)])


def test_command_line_prints_the_table_and_draws_the_plot(tmp_path):
  for i, r in enumerate(all_results()):
    (tmp_path / f"run{i}").mkdir()
    (tmp_path / f"run{i}" / "results.json").write_text(json.dumps(r))
  png = tmp_path / "scores.png"
  out = subprocess.run([sys.executable, "-m", "experiments.collect_results", str(tmp_path / "*/results.json"),
                        f"--plot={png}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out == collect_results.table(all_results())
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  missing = subprocess.run([sys.executable, "-m", "experiments.collect_results", str(tmp_path / "none/*.json")],
                           cwd=ROOT, capture_output=True, text=True)
  assert missing.returncode != 0 and "no results.json matched" in missing.stderr
