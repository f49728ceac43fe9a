"""README.md's example runs as written, and CI runs the README's test command."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _is_api_example(block):
  return "rl.init_lora" in block and "nn.Sequential" in block


def test_api_example_runs_and_learns(capsys):
  (example,) = [b for b in _blocks("python") if _is_api_example(b)]
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)
  out = capsys.readouterr().out
  loss = float(re.search(r"loss (\S+)", out).group(1))
  # The example fits sin(x).sum() through a rank-8 adapter on the first layer:
  # far better than predicting zero (whose loss is the target's mean square).
  baseline = float(np.mean(np.asarray(namespace["y"]) ** 2))
  assert loss < 0.5 * baseline, (loss, baseline)
  assert "rank(dW)" in out


def test_bring_your_own_model_trains_rm_lora_through_the_trainer(capsys, tmp_path, monkeypatch):
  (example,) = [b for b in _blocks("python") if "trainer.train_and_evaluate" in b]
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)
  results, y = namespace["results"], np.asarray(namespace["y"])
  # Predicting the mean of the held-out targets scores -var; the adapted
  # network must do far better, through a rank-8 update of its hidden layer.
  assert results["final"]["neg_mse"] > -0.3 * np.var(y[768:]), results["final"]
  assert results["method"] == "rm_lora" and results["ranks"] == {"hidden/kernel": 8}
  assert results["history"]["train"][-1]["penalty"] > 0  # R: the penalty is in the loss
  assert "{'step': 240" in capsys.readouterr().out


def test_every_other_python_block_runs():
  blocks = [b for b in _blocks("python") if not _is_api_example(b) and "trainer.train_and_evaluate" not in b]
  assert blocks
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
  commands = [line for b in _blocks("bash") for line in b.splitlines() if "pytest" in line]
  assert len(commands) == 1, commands
  ci = (ROOT / ".ci" / "run").read_text()
  assert commands[0] in ci.splitlines(), (commands[0], ci)
