"""experiments.load_memory: peak memory of loading, float and quantised (no figure is asserted)."""

import json
import pathlib
import subprocess
import sys

from experiments import load_memory
from rmlora_jax import quantize
from rmlora_jax.models import load_pretrained

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_synthetic_checkpoint_loads_every_weight_into_the_llama_port(tmp_path, monkeypatch):
  # TinyLlama's layout at a tiny size: every name it writes is one the port reads, and nothing is missing.
  monkeypatch.setattr(load_memory, "TINYLLAMA", {**load_memory.TINYLLAMA, "hidden_size": 64, "intermediate_size": 96,
                                                 "num_hidden_layers": 2, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2, "vocab_size": 50})
  folder = load_memory.write_synthetic(tmp_path / "tiny")
  _, params, _, config, report = load_pretrained(folder, head="causal_lm", return_report=True)
  assert report.missing == () and report.unexpected == ()
  assert config.num_key_value_heads == 2 and params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)


def test_reports_each_load_in_its_own_process(tiny_bert, tmp_path):
  out = tmp_path / "load.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.load_memory", f"--checkpoint={tiny_bert}", "--head=base",
                         "--formats=,int8", f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [(r["format"], r["mode"]) for r in rows] == [("float32", "float"), ("int8", "read"), ("int8", "after")]
  floats = load_pretrained(tiny_bert)[1]
  expected = quantize.tree_bytes(quantize.quantize_base(floats, quantize.QuantizeSpec(format="int8"))) / 2**20
  assert rows[0]["params_mib"] == quantize.tree_bytes(floats) / 2**20
  assert rows[1]["params_mib"] == rows[2]["params_mib"] == expected
  assert all(r["peak_mib"] >= r["imports_mib"] > 0 for r in rows)
  assert "| int8 | as read |" in proc.stdout
