"""experiments.export after a GLUE run: PyTorch with the exported adapter scores as the run did; runs start from it."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers

import rmlora_jax as rl
from tests.experiments.conftest import set_overrides
from tests.experiments.test_glue import tiny_config
from rmlora_jax import cli
from rmlora_jax.recipes import export as export_lib
from rmlora_jax.recipes import run as run_lib
from rmlora_jax import paths
from rmlora_jax.adapters import base
from rmlora_jax.data import glue as glue_data
from rmlora_jax.recipes import glue as glue_task

ROOT = pathlib.Path(__file__).resolve().parents[2]
README_WORKDIR = "runs/rte_lora"


def readme_lines():
  """The bash lines of README.md's "Use the result in PyTorch": run, export, load in PyTorch."""
  section = (ROOT / "README.md").read_text().split("## Use the result in PyTorch\n")[1].split("\n## ")[0]
  (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
  lines = block.strip().splitlines()
  assert len(lines) == 3 and all(README_WORKDIR in line for line in lines), lines
  return lines


@pytest.fixture(scope="module")
def run(tiny_bert, tiny_glue, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rte_lora")
  config = tiny_config(tiny_bert, tiny_glue, workdir, method="lora")
  return config, glue_task.train_and_evaluate(config, config.workdir)


def dev_batch(config):
  task = glue_data.get_task("rte")
  dev = glue_data.load_split(task, task.eval_splits[0], config.data.dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.name_or_path)
  batch = tokenizer(list(dev.text_a), list(dev.text_b), truncation=True, max_length=config.max_seq_len,
                    padding=True, return_tensors="np")
  return {k: np.asarray(v, np.int32) for k, v in batch.items()}, np.asarray(dev.labels)


def our_logits(config, batch):
  """The run's model on ``batch``: base weights as loaded for training, adapters and head from the checkpoint."""
  module, params, _, _, _ = run_lib.load_model(config, "classification", 2)
  trainable, _ = run_lib.trained_state(config.workdir)
  spec = rl.LoraSpec(rank=config.lora.rank, alpha=config.lora.alpha, targets=(".*",))
  merged = rl.merge(base.with_head(params, trainable["head"]), trainable["adapters"], spec)
  return np.asarray(module.apply({"params": merged}, batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch["token_type_ids"])["logits"])


def torch_logits(model, batch):
  with torch.no_grad():
    return model.eval()(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).logits.numpy()


def test_export_after_a_glue_run_scores_as_the_run_in_pytorch(run, tmp_path):
  config, results = run
  workdir = config.workdir
  # The README's export line, on this run, through the real entry point.
  export = shlex.split(readme_lines()[1].replace(README_WORKDIR, workdir))
  environ = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", cli.CACHE_ENV: ""}
  proc = subprocess.run([sys.executable, *export[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=environ)
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = pathlib.Path(workdir) / "peft"
  assert (folder / "adapter_model.safetensors").is_file()

  batch, labels = dev_batch(config)
  expected = our_logits(config, batch)
  base_model = lambda: transformers.AutoModelForSequenceClassification.from_pretrained(config.model.name_or_path,
                                                                                         num_labels=2)
  with_peft = torch_logits(peft.PeftModel.from_pretrained(base_model(), str(folder)), batch)
  np.testing.assert_allclose(with_peft, expected, atol=1e-4, rtol=0)
  accuracy = float(np.mean(with_peft.argmax(-1) == labels))
  assert accuracy == pytest.approx(results["metrics"]["accuracy"], abs=1e-9)

  export_lib.export_run(workdir, fmt="merged", out=tmp_path / "merged")
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
  np.testing.assert_allclose(torch_logits(merged, batch), expected, atol=1e-4, rtol=0)

  # The README's PyTorch line: AutoPeftModel finds the base model from the adapter's config.
  code = shlex.split(readme_lines()[2].replace(README_WORKDIR, workdir))[-1]
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used


def test_a_run_starts_from_a_peft_adapter(run, tiny_bert, tiny_glue, tmp_path):
  config, _ = run
  folder = export_lib.export_run(config.workdir, fmt="peft", out=tmp_path / "peft")
  # One step at a negligible learning rate: the adapters must still be those of the first run.
  second = tiny_config(tiny_bert, tiny_glue, tmp_path / "second", method="lora", init_adapters=str(folder), max_steps=1,
                        learning_rate=1e-9)
  results = glue_task.train_and_evaluate(second, second.workdir)
  assert results["config"]["init_adapters"] == str(folder)
  before, _ = run_lib.trained_state(config.workdir)
  after, _ = run_lib.trained_state(second.workdir)
  flat_before, flat_after = paths.flatten_with_paths(before), paths.flatten_with_paths(after)
  assert set(flat_before) == set(flat_after)
  assert max(np.abs(flat_before[p] - flat_after[p]).max() for p in flat_before) < 1e-6
  assert np.abs(flat_before["adapters/encoder/layer_0/attention/query/kernel/b"]).max() > 1e-4

  with pytest.raises(ValueError, match=r"config.init_adapters=.*has rank 4 at .*, the run's adapters rank 2"):
    glue_task.train_and_evaluate(set_overrides(second, {"lora.rank": 2}), str(tmp_path / "third"))
  with pytest.raises(ValueError, match=r"config.init_adapters='/nonexistent' is not a folder"):
    glue_task.train_and_evaluate(set_overrides(second, {"init_adapters": "/nonexistent"}), str(tmp_path / "fourth"))
  with pytest.raises(ValueError, match=r"has no checkpoints folder"):
    export_lib.export_run(tmp_path, fmt="peft")
