"""The two test tiers.

``integration``: tests that run an experiment end to end, start
subprocesses or several processes, or load a real checkpoint of a hundred
million parameters; everything under tests/experiments/ and
tests/distributed/ is in this tier, and a test elsewhere joins it with
``@pytest.mark.integration``. The rest is the quick unit tier:

  .venv/bin/python -m pytest -q -m "not integration"   # unit tier, a few minutes
  .venv/bin/python -m pytest -q -m integration          # integration tier
  .venv/bin/python -m pytest -q                         # both (what CI runs)

pyproject.toml runs them in two worker processes (pytest-xdist); ``-n 0``
runs one process.

XLA compiles the tests' programs, and those of the processes they start,
at backend optimisation level 0 (``XLA_FLAGS``): most of the suite's time is
compiling small programs run for a few steps, and the numbers are those of
the default level up to float rounding. ``RMLORA_TEST_XLA_OPT=default``
keeps XLA's default level.
"""

import os
import pathlib

import pytest

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if os.environ.get("RMLORA_TEST_XLA_OPT") != "default" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""):
  # Before any test imports JAX's backend: XLA reads the flags once, when it starts.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

_INTEGRATION_DIRS = ("experiments", "distributed")
_ROOT = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    relative = pathlib.Path(str(item.fspath)).resolve().relative_to(_ROOT)
    if relative.parts[0] in _INTEGRATION_DIRS:
      item.add_marker(pytest.mark.integration)
