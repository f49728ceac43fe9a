"""experiments/__init__.py: `python -m experiments.<name>` restarts itself with glibc's malloc keeping its memory."""

import os
import pathlib
import subprocess
import sys

import pytest

import experiments

ROOT = pathlib.Path(__file__).resolve().parents[2]
# What `python -m experiments.<name>` does first, with sys.argv[0] as runpy sets it while the package imports.
PROBE = "import sys; sys.argv[0] = '-m'; import experiments, os; print(os.environ.get('GLIBC_TUNABLES'))"


def _probe(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RMLORA_MALLOC")}
  proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**environ, **env}, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip()


def _glibc() -> bool:
  try:
    return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
  except (ValueError, OSError):
    return False


@pytest.mark.skipif(not _glibc(), reason="glibc's tunables: Linux with glibc only")
def test_an_entry_point_restarts_with_the_malloc_tunables_and_keeps_the_users():
  assert _probe() == experiments.MALLOC_TUNABLES
  # A user's own tunables come first and are kept.
  assert _probe(GLIBC_TUNABLES="glibc.malloc.tcache_count=0") == (
      "glibc.malloc.tcache_count=0:" + experiments.MALLOC_TUNABLES)
  # Turned off, or set by the user already: no restart, nothing added.
  assert _probe(RMLORA_MALLOC="0") == "None"
  assert _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4") == "glibc.malloc.arena_max=4"


def test_importing_the_package_leaves_the_process_alone():
  proc = subprocess.run([sys.executable, "-c", "import experiments, os; print(os.environ.get('GLIBC_TUNABLES'))"],
                        cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr
