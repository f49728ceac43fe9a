#!/usr/bin/env bash
# Runs a command with the TPU compiler (libtpu) on the path, on a machine with
# no TPU: JAX stays on its CPU backend, and jax.experimental.topologies loads
# libtpu only to describe TPU topologies and compile for them.
#
#   scripts/tpu_env.sh install [pip options]        # once (scripts/setup.sh does it): libtpu into .tpu_compiler/
#   scripts/tpu_env.sh python -m experiments.plan --config=configs/plan.py:tpu
#
# libtpu lives in .tpu_compiler/, outside the virtual environment: with it
# importable, every plain `import jax` probes for TPUs (slower, noisy).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${RMLORA_TPU_COMPILER:-$ROOT/.tpu_compiler}"
if [[ "${1:-}" == "install" ]]; then
  # The project's interpreter when there is one: the wheel is per Python version.
  PY="python"; [[ -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"
  shift
  exec "$PY" -m pip install --no-deps --target "$TARGET" -r "$ROOT/requirements-tpu-compiler.txt" "$@"
fi
LIB="$TARGET/libtpu/libtpu.so"
if [[ ! -f "$LIB" ]]; then
  echo "scripts/tpu_env.sh: no TPU compiler at $LIB; run: scripts/tpu_env.sh install" >&2
  exit 1
fi
# jax._src.cloud_tpu_init.get_tpu_library_path reads TPU_LIBRARY_PATH before
# trying `import libtpu`, so the library is found without PYTHONPATH.
export TPU_LIBRARY_PATH="$LIB"
# The CPU backend only: there is no TPU to initialise.
export JAX_PLATFORMS=cpu
# No metadata server or TPU VM to ask: without these libtpu logs errors
# looking for its accelerator type and workers. They do not choose the
# topology compiled for (jax.experimental.topologies does).
export TPU_SKIP_MDS_QUERY=1
export TPU_WORKER_HOSTNAMES="${TPU_WORKER_HOSTNAMES:-localhost}"
export TPU_ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v5litepod-16}"
# libtpu takes a lockfile (/tmp/libtpu_lockfile) so that two processes do not
# drive one TPU; here there is none, and a test may compile beside a plan.
export ALLOW_MULTIPLE_LIBTPU_LOAD=1
exec "$@"
