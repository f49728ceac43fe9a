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
"""

import pathlib

import pytest

_INTEGRATION_DIRS = ("experiments", "distributed")
_ROOT = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    relative = pathlib.Path(str(item.fspath)).resolve().relative_to(_ROOT)
    if relative.parts[0] in _INTEGRATION_DIRS:
      item.add_marker(pytest.mark.integration)
