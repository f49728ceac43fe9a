"""Command-line plumbing shared by the entry points under ``experiments/``.

`run` is ``absl.app.run`` with one difference: an error caused by the user's
input (a bad config value, a missing file or folder, a model that cannot be
found, a mesh that does not fit the devices) ends the program with one line on
stderr, ``error: <what is wrong>``, and exit status 2, instead of a traceback.
Such errors are `ValueError` (the library's convention for bad input, whose
messages name the value and where it came from) and `OSError` (files, folders,
disks, an unreachable hub). Every other exception is a bug of the program and keeps its
traceback; so do all of them when ``$RMLORA_TRACEBACK`` is set to a non-empty
value other than ``0``.

Example::

  def main(argv):
    ...

  if __name__ == "__main__":
    cli.run(main)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging

# Set to 1 to see the traceback of errors that are otherwise one line.
TRACEBACK_ENV = "RMLORA_TRACEBACK"
# What the user's errors exit with (2, as argparse and absl do for bad usage).
EXIT_USER_ERROR = 2


def is_user_error(error: BaseException) -> bool:
  """Whether ``error`` comes from the user's input or environment rather than from a bug.

  `ValueError` (the library's bad-input convention) and `OSError` (a file or
  folder that is missing or unwritable, a full disk, a hub that cannot be
  reached offline).
  """
  return isinstance(error, (ValueError, OSError)) and not isinstance(error, BrokenPipeError)


def one_line(error: BaseException) -> str:
  """``error``'s message on one line, ``error: `` in front.

  A message that embeds a traceback (ml_collections does, for a config file
  that raises) keeps its first line and the exception's last line.
  """
  text = str(error) if str(error) else type(error).__name__
  if "Traceback (most recent call last)" in text:
    head = text.split("Traceback (most recent call last)")[0].strip()
    tail = [line for line in text.splitlines() if line.strip()][-1].strip()
    text = f"{head} {tail}"
  if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
    text = f"{text}: {error.filename}"
  return "error: " + " ".join(text.split())


def show_tracebacks() -> bool:
  """True when ``$RMLORA_TRACEBACK`` asks for full tracebacks."""
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def guarded(main: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
  """``main`` with user errors turned into one line on stderr and exit status 2."""

  def wrapper(argv: Sequence[str]) -> Any:
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if show_tracebacks() or not is_user_error(e):
        raise
      fail(one_line(e))

  return wrapper


def fail(line: str) -> NoReturn:
  """Prints ``line`` to stderr and exits with `EXIT_USER_ERROR`."""
  sys.stdout.flush()
  sys.stderr.flush()
  print(line, file=sys.stderr, flush=True)
  # os._exit: no orbax or tensorboard thread can print a traceback after us.
  os._exit(EXIT_USER_ERROR)  # pylint: disable=protected-access


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or a failing ``--config`` file as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if show_tracebacks():
      raise
    fail(one_line(e))


# Where compiled steps are kept between runs; empty string: no cache.
CACHE_ENV = "RMLORA_COMPILATION_CACHE"


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache; returns its folder (None: off).

  The folder is ``$RMLORA_COMPILATION_CACHE``, else ``$JAX_COMPILATION_CACHE_DIR``
  (JAX's own setting, left as it is), else ``$XDG_CACHE_HOME/rmlora_jax/jax``
  (``~/.cache/rmlora_jax/jax``). ``RMLORA_COMPILATION_CACHE=`` (empty) turns it off.
  A second run of the same config then loads its train and eval steps
  instead of compiling them.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if os.environ.get(CACHE_ENV) == "":
    return None
  folder = os.environ.get(CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not folder:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "rmlora_jax", "jax")
  jax.config.update("jax_compilation_cache_dir", folder)
  # Cache every step that took more than a tenth of a second to compile.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  return folder


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """`absl.app.run` of ``main``, with the user's errors as one line (see the module doc).

  Bad flags, and a ``--config`` file that fails its own checks, are one line too.
  The persistent compilation cache is on (`enable_compilation_cache`). When
  ``main`` succeeds, the process ends by `exit_now`.
  """
  enable_compilation_cache()
  try:
    app.run(guarded(main), flags_parser=parse_flags)
  except SystemExit as e:
    if e.code in (None, 0):
      exit_now()
    raise


def exit_now() -> None:
  """Ends a process whose work is done (status 0) without tearing the interpreter down.

  The ``atexit`` functions run and stdout, stderr and absl's log are flushed,
  as at a normal exit; then `os._exit` skips freeing every object one by one,
  which after a GLUE run (its arrays, models and compiled programs) took 1.2
  s. Returns, leaving the normal exit to run, while a thread that is not a
  daemon is still alive: Python would wait for it.
  """
  import atexit  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  main_thread = threading.main_thread()
  if threading.current_thread() is not main_thread or any(
      t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
    return
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
      pass
  os._exit(0)  # pylint: disable=protected-access


def config_main(train: Callable[[Any, str | None], Any], config_flag: Any, *,
                quiet: bool = True) -> Callable[[Sequence[str]], None]:
  """The ``main`` of an experiment: ``train(config, config.workdir)`` for ``--config``.

  Args:
    train: e.g. `rmlora_jax.tasks.glue.train_and_evaluate`.
    config_flag: what ``config_flags.DEFINE_config_file`` returned.
    quiet: without ``--verbosity``, log warnings only (orbax logs every save
      at INFO), keeping the terminal to the progress bar and evaluations.

  Example::

    _CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.")
    if __name__ == "__main__":
      cli.run(cli.config_main(glue.train_and_evaluate, _CONFIG))
  """

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if quiet and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    train(config_flag.value, config_flag.value.workdir)

  return main


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name and its wide-vector extensions, for benchmark records.

  Ratios against PyTorch depend on them: its oneDNN kernels use AVX-512 and
  AMX where present. Linux reads ``/proc/cpuinfo``; elsewhere, what
  `platform.processor` says.
  """
  import platform  # pylint: disable=g-import-not-at-top

  try:
    with open(cpuinfo, encoding="utf-8") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  fields = {}
  for line in info.splitlines():  # the first processor's fields
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  name = " ".join(fields.get("model name", "").split()) or platform.machine()
  have = set(fields.get("flags", "").split())
  extensions = [e for e in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if e in have]
  return f"{name} ({', '.join(extensions) or 'no AVX2'}; {os.cpu_count()} cores)"
