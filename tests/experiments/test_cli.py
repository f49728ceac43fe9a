"""Command lines fail like good tools: one line on stderr, exit status 2, no traceback.

Each case runs the real entry point in a subprocess, as a user would.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from rmlora_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_entry(module, *args, cwd, env=None):
  environ = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", cli.CACHE_ENV: ""}
  environ.pop(cli.TRACEBACK_ENV, None)
  environ.update(env or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=300, env=environ)


def assert_one_line_error(proc, pattern):
  """Exit status 2, no traceback, and exactly one ``error:`` line matching ``pattern``."""
  import re
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert re.search(pattern, errors[0]), errors[0]
  return errors[0]


def glue_args(model, data_dir, workdir, *extra):
  return [f"--config={ROOT}/configs/rte.py", f"--config.model.name_or_path={model}",
          f"--config.data.dir={data_dir}", f"--config.workdir={workdir}", "--config.batch_size=8",
          "--config.max_seq_len=32", "--config.max_steps=2", "--config.progress=False",
          "--config.lora.rank=4", "--config.rm.num_directions=2", "--config.data.num_buckets=1", *extra]


def test_default_command_offline_says_which_model_works_and_picks_a_workdir(tmp_path):
  # The command a user reads first: no workdir, the paper's hub model, no network.
  proc = run_entry("experiments.glue", f"--config={ROOT}/configs/rte.py",
                   f"--config.data.dir={ROOT.parent / 'shared' / 'data' / 'glue'}", cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1"})
  line = assert_one_line_error(proc, r"config.model.name_or_path='microsoft/deberta-v3-base' cannot be loaded")
  assert "model=minilm" in line
  assert "workdir: runs/rte_rm_lora_deberta-v3-base_s0" in proc.stderr
  assert (tmp_path / "runs" / "rte_rm_lora_deberta-v3-base_s0").is_dir()


@pytest.mark.parametrize("extra, pattern", [
    (["--config.method=dora"], r"config.method='dora' is unknown; choose one of"),
    (["--config.lora.rank=0"], r"config.lora.rank must be a positive integer, got 0"),
    (["--config.method=rm_lora", "--config.rm.num_directions=5"], r"rm.num_directions=5 must be in 1..config.lora.rank=4"),
    (["--config.batch_size=-8"], r"config.batch_size must be a positive integer, got -8"),
    (["--config.learning_rate=nan"], r"config.learning_rate=nan is not a finite number"),
    (["--config.lora.alpha=inf"], r"config.lora.alpha=inf is not a finite number"),
    (["--config.mesh.data=3"], r"mesh"),
    (["--config.lora.targets=('nothing/matches/this',)"], r"nothing/matches/this"),
])
def test_bad_settings_are_one_line(extra, pattern, tiny_bert, tiny_glue, tmp_path):
  proc = run_entry("experiments.glue", *glue_args(tiny_bert, tiny_glue, tmp_path / "w", *extra), cwd=ROOT)
  assert_one_line_error(proc, pattern)


def test_bad_files_and_folders_are_one_line(tiny_bert, tiny_glue, tmp_path):
  # A data folder that does not exist.
  proc = run_entry("experiments.glue", *glue_args(tiny_bert, tmp_path / "nowhere", tmp_path / "w1"), cwd=ROOT)
  assert_one_line_error(proc, r"config.data.dir='.*nowhere' is not a directory")
  # A malformed TSV: a row with too few columns, named by file and line.
  bad = tmp_path / "bad_glue" / "RTE"
  bad.mkdir(parents=True)
  (bad / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tonly one column\n")
  (bad / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
  proc = run_entry("experiments.glue", *glue_args(tiny_bert, bad.parent, tmp_path / "w2"), cwd=ROOT)
  assert_one_line_error(proc, r"train.tsv")
  # A model folder without config.json.
  empty = tmp_path / "not_a_model"
  empty.mkdir()
  proc = run_entry("experiments.glue", *glue_args(empty, tiny_glue, tmp_path / "w3"), cwd=ROOT)
  assert_one_line_error(proc, r"has no config.json")
  # A workdir that cannot be created (a file stands where a folder should be).
  (tmp_path / "a_file").write_text("")
  proc = run_entry("experiments.glue", *glue_args(tiny_bert, tiny_glue, tmp_path / "a_file" / "run"), cwd=ROOT)
  assert_one_line_error(proc, r"config.workdir='.*a_file/run' cannot be written")


def test_bad_config_argument_and_other_entry_points(tmp_path):
  proc = run_entry("experiments.glue", f"--config={ROOT}/configs/rte.py:modle=minilm", cwd=tmp_path)
  assert_one_line_error(proc, r"config argument 'modle=minilm'")
  proc = run_entry("experiments.collect_results", str(tmp_path / "nothing*.json"), cwd=tmp_path)
  assert_one_line_error(proc, r"nothing\*\.json")


def test_tracebacks_on_request_and_for_bugs(tmp_path, monkeypatch):
  proc = run_entry("experiments.glue", f"--config={ROOT}/configs/rte.py:modle=minilm", cwd=tmp_path,
                   env={cli.TRACEBACK_ENV: "1"})
  assert proc.returncode != 0 and "Traceback" in proc.stderr

  def buggy(argv):
    raise TypeError("a bug of the program")

  with pytest.raises(TypeError):  # not the user's fault: the traceback stays
    cli.guarded(buggy)([])
  assert cli.one_line(ValueError("two\nlines  here")) == "error: two lines here"
  assert cli.one_line(FileNotFoundError(2, "No such file", "/x/y")) == "error: [Errno 2] No such file: '/x/y'"


def test_second_run_finds_its_steps_in_the_compilation_cache(tiny_bert, tiny_glue, tmp_path):
  cache = tmp_path / "cache"
  args = glue_args(tiny_bert, tiny_glue, tmp_path / "w1", "--config.method=lora")
  first = run_entry("experiments.glue", *args, cwd=ROOT, env={cli.CACHE_ENV: str(cache)})
  assert first.returncode == 0, first.stderr[-3000:]
  # The train step's gradient and update programs and the eval step; small
  # helpers near the 0.1 s threshold may or may not be cached, depending on
  # the machine's load (the tiny model's update among them).
  steps = lambda: {p.name for p in cache.iterdir() if any(f in p.name for f in ("grad_fn", "apply_fn", "eval_fn"))}
  entries = steps()
  assert any("grad_fn" in e for e in entries) and any("eval_fn" in e for e in entries), entries
  args = glue_args(tiny_bert, tiny_glue, tmp_path / "w2", "--config.method=lora")
  second = run_entry("experiments.glue", *args, cwd=ROOT, env={cli.CACHE_ENV: str(cache)})
  assert second.returncode == 0, second.stderr[-3000:]
  assert steps() == entries  # found, not compiled again


def test_readme_shows_what_the_command_prints():
  import re
  readme = (ROOT / "README.md").read_text()
  (block,) = [b for b in re.findall(r"```text\n(.*?)```", readme, flags=re.S) if "error:" in b]
  command, shown = block.strip().splitlines()
  args = command.removeprefix("$ python -m ").split()
  proc = run_entry(args[0], *args[1:], cwd=ROOT)
  assert assert_one_line_error(proc, "") == shown


# A program ending through cli.run: main writes 200 kB to stdout unflushed and
# registers an atexit function; an object left in __main__ reports whether the
# interpreter was torn down (its __del__ runs then, not after os._exit).
EXITING = r'''
import atexit, os, sys, threading, time
from rmlora_jax import cli

class Finalized:
  def __del__(self, write=os.write):
    write(2, b"torn down\n")

witness = Finalized()
mode = sys.argv.pop(1)

def main(argv):
  atexit.register(lambda: sys.stdout.write("atexit ran\n"))
  sys.stdout.write("x" * 200000 + "\n")
  if mode == "thread":  # a thread Python must wait for
    threading.Thread(target=lambda: (time.sleep(0.3), sys.stdout.write("thread done\n"))).start()
  if mode == "fail":
    raise RuntimeError("a bug")

cli.run(main)
'''


@pytest.mark.parametrize("mode", ["done", "thread", "fail"])
def test_a_finished_run_exits_at_once_with_its_output_and_atexit_functions(mode, tmp_path):
  environ = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", cli.CACHE_ENV: ""}
  proc = subprocess.run([sys.executable, "-c", EXITING, mode], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=environ)
  lines = proc.stdout.splitlines()
  assert lines[0] == "x" * 200000, proc.stdout[:100]
  if mode == "fail":  # a bug: the traceback and absl's normal exit
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr
    assert "torn down" in proc.stderr
    return
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "atexit ran" in lines
  if mode == "done":
    assert "torn down" not in proc.stderr  # ended by os._exit
  else:  # a live thread: the normal exit waits for it
    assert "thread done" in lines and "torn down" in proc.stderr


def test_cpu_description_names_the_model_and_its_vector_extensions(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nmodel name\t: Example  CPU @ 2.0GHz\nflags\t\t: fpu avx2 avx512f amx_tile\n\n"
                  "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
  assert cli.cpu_description(str(info)).startswith("Example CPU @ 2.0GHz (avx2, avx512f, amx_tile; ")
  info.write_text("model name\t: Plain\nflags\t\t: fpu sse2\n")
  assert cli.cpu_description(str(info)).startswith("Plain (no AVX2; ")
  assert cli.cpu_description(str(tmp_path / "absent"))  # falls back to what platform reports
