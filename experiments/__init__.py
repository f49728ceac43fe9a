"""The experiments' entry points (``python -m experiments.<name>``).

Run that way on Linux with glibc, an entry point first starts itself again
with glibc's ``malloc`` told to keep the memory it is given and reuse it
(`MALLOC_TUNABLES`: one arena, no blocks mapped on their own, no trimming).
XLA:CPU allocates each step's buffers afresh; left alone, glibc hands the
compute threads' freed arenas back to the kernel at the end of a step and
maps fresh zeroed pages at the next, so a CoLA epoch on MiniLM took 11
million page faults, a third of its step time (docs/BENCHMARKS.md). Kept,
the memory is reused: 0.5 million faults. The price is memory: the process
never gives back what it has freed, and one heap fragments (the RTE main
job peaked at 8.7 GB against 3.7 GB). ``RMLORA_MALLOC=0`` turns this off;
your own scripts get the same by setting ``GLIBC_TUNABLES`` to
`MALLOC_TUNABLES` before Python starts.
"""

import os
import sys

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=17179869184")


def _wants_malloc_tunables() -> bool:
  if os.environ.get("RMLORA_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  if "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
    return False  # set already (by us, a moment ago, or by the user)
  try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"; musl has none
    major, minor = (int(x) for x in libc.split()[1].split(".")[:2])
  except (ValueError, IndexError, OSError):
    return False
  return (major, minor) >= (2, 26)  # the release that brought these tunables


# While `python -m experiments.<name>` imports this package, sys.argv[0] is "-m"
# (an import from a test or a notebook leaves the process alone).
if sys.argv[:1] == ["-m"] and _wants_malloc_tunables():
  tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
