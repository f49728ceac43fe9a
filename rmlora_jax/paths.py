"""Parameter paths: the "/"-joined names that LoRA targets are matched against.

A leaf of ``{"encoder": {"layer_0": {"query": {"kernel": w}}}}`` has the path
``"encoder/layer_0/query/kernel"``. Every selection in this library (adapter
targets, partition rules, trainable heads) is a regex over these strings.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import Any

import jax


def key_name(key: Any) -> str:
  """The string form of one entry of a `jax.tree_util` key path."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(key_path: Iterable[Any]) -> str:
  """Joins a `jax.tree_util` key path into ``"a/b/c"``."""
  return "/".join(key_name(k) for k in key_path)


def flatten_with_paths(tree: Any, *, is_leaf: Any = None) -> dict[str, Any]:
  """Maps each leaf's "/"-path to the leaf, in tree order (``is_leaf`` as `jax.tree_util`'s)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(kp): leaf for kp, leaf in leaves}


def compile_patterns(patterns: Iterable[str], *, where: str) -> list[re.Pattern[str]]:
  """Compiles regexes, naming ``where`` they came from when one is invalid."""
  compiled = []
  for p in patterns:
    if not isinstance(p, str):
      raise ValueError(f"{where}: expected a regex string, got {p!r}")
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{where}: invalid regex {p!r}: {e}") from e
  return compiled


def match_paths(
    paths: Iterable[str], patterns: Iterable[str], *, where: str
) -> list[str]:
  """The paths that some pattern ``re.fullmatch``es; every pattern must match.

  Args:
    paths: candidate "/"-paths.
    patterns: regexes; a path is selected when one of them fully matches it.
    where: the name of the setting the patterns came from, for error messages.

  Returns:
    The selected paths, in the order of ``paths``.

  Raises:
    ValueError: a pattern is invalid or matches no path. Silent misses are the
      classic LoRA bug (an adapter that was never attached), so they are loud.
  """
  paths = list(paths)
  compiled = compile_patterns(patterns, where=where)
  for rx in compiled:
    if not any(rx.fullmatch(p) for p in paths):
      examples = ", ".join(repr(p) for p in paths[:6])
      more = f" (and {len(paths) - 6} more)" if len(paths) > 6 else ""
      raise ValueError(
          f"{where}: pattern {rx.pattern!r} matches no parameter path. "
          f"Patterns must fully match paths such as {examples}{more}."
      )
  return [p for p in paths if any(rx.fullmatch(p) for rx in compiled)]


def path_hash(path: str) -> int:
  """A stable 31-bit integer for ``path``, for `jax.random.fold_in`.

  CRC32 rather than Python's ``hash``: it must agree across processes and
  hosts, which ``hash`` of a string does not (hash randomisation).
  """
  return zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF


def find_adapters(tree: Any, factors: Iterable[str], *, exact: bool = True) -> dict[str, dict[str, str]]:
  """The adapter dicts in ``tree``, found by their factor names: the one way adapters are found.

  Args:
    tree: any pytree holding adapters (a trainable tree, gradients, updates).
    factors: the names of one family's factors, e.g. ``{"a", "b"}`` for LoRA.
    exact: a node's leaf children must be exactly ``factors`` (one family);
      False: they must include them (``{"a", "b"}`` also finds SoRA's
      ``{"a", "b", "g"}``).

  Returns:
    ``{adapter path: {factor name: leaf path}}`` in sorted path order; with
    ``exact=False`` only the factors asked for.
  """
  factors = frozenset(factors)
  children: dict[str, dict[str, str]] = {}
  for path in flatten_with_paths(tree):
    parent, _, name = path.rpartition("/")
    children.setdefault(parent, {})[name] = path
  if exact:
    return {p: c for p, c in sorted(children.items()) if frozenset(c) == factors}
  return {p: {f: c[f] for f in sorted(factors)} for p, c in sorted(children.items()) if factors <= frozenset(c)}

