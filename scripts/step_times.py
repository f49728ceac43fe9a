r"""Times every step of a GLUE run in its own loop, by padded shape, with the process's page faults.

  .venv/bin/python scripts/step_times.py --config=configs/cola.py:model=minilm \
      --config.data.dir=../shared/data/glue --config.num_epochs=1 --config.method=lora \
      --config.progress=False --config.workdir=/tmp/cola_step_times

Runs `rmlora_jax.recipes.glue.train_and_evaluate` as `experiments.glue`
does, with each call of the train and eval steps blocked on until its
result is ready (so the loop loses its one step of overlap), and prints per
step and shape the count, the first call (a compile or a load from the
cache, and the wait for it) and the median, then the process's page faults
and user and system seconds. Run it as it is (not with ``-m``): it leaves
glibc's allocator as the environment sets it, so that
``GLIBC_TUNABLES`` (see experiments/__init__.py) can be compared.
"""

import atexit
import collections
import resource
import statistics
import time

import jax
from absl import flags
from ml_collections import config_flags

from rmlora_jax import cli, training
from rmlora_jax.recipes import glue

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_TIMES: dict = collections.defaultdict(list)
_CALL = training.AheadOfTime.__call__


def _timed(step, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(_CALL(step, *args))
  # A split train step (gradient, then update) is timed whole, under its gradient's name.
  _TIMES[(step._jitted.__name__ if hasattr(step._jitted, "__name__") else "step",  # pylint: disable=protected-access
          tuple(args[-1]["input_ids"].shape))].append(time.perf_counter() - start)
  return out


def _report() -> None:
  print("| step | shape | calls | first s | median s | total s |\n|---|---|---|---|---|---|")
  for (name, shape), times in sorted(_TIMES.items()):
    print(f"| {name} | {shape} | {len(times)} | {times[0]:.3f} | {statistics.median(times):.4f} | {sum(times):.2f} |")
  usage = resource.getrusage(resource.RUSAGE_SELF)
  print(f"page faults {usage.ru_minflt:,}, user {usage.ru_utime:.1f} s, system {usage.ru_stime:.1f} s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  training.AheadOfTime.__call__ = _timed
  # At exit, also after a success, which cli.run ends with os._exit once the atexit functions ran.
  atexit.register(_report)
  cli.run(cli.config_main(glue.train_and_evaluate, _CONFIG))
