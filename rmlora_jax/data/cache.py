"""On-disk copies of tokenised data, so a second run skips tokenisation.

A cache entry is one compressed ``.npz`` file of named arrays whose name is
a hash of everything the arrays depend on (`key`): the tokenizer's own
definition (`tokenizer_fingerprint`), the settings and the texts. A changed
input gives a new name, so an entry is never stale; an unreadable entry
(truncated, foreign) is logged and rebuilt. Writes are atomic.

Example::

  path = cache.entry(cache.default_dir("glue_tokens"), "cola-train",
                     {"tokenizer": cache.tokenizer_fingerprint(tok), "texts": digest})
  arrays = cache.load(path, ("ids", "offsets"))
  if arrays is None:
    arrays = build()
    cache.save(path, arrays)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Overrides the user's cache folder for every kind of entry (tests use it).
ENV = "RMLORA_DATA_CACHE"


def default_dir(kind: str) -> pathlib.Path:
  """``$RMLORA_DATA_CACHE/<kind>``, else ``$XDG_CACHE_HOME`` (or ~/.cache) ``/rmlora_jax/<kind>``."""
  root = os.environ.get(ENV)
  if root:
    return pathlib.Path(root) / kind
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "rmlora_jax" / kind


def folder(configured: str | os.PathLike | None, kind: str) -> pathlib.Path:
  """``configured`` (a ``config.data.cache_dir``) when set, else `default_dir` of ``kind``."""
  return pathlib.Path(configured) if configured else default_dir(kind)


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """A hash of what decides a tokenizer's output.

  For a fast tokenizer, its serialised definition (vocabulary, normaliser,
  pre-tokeniser, post-processor), so a folder edited in place gets a new
  fingerprint; its truncation and padding state is left out, since each call
  sets it from its own arguments. Otherwise its class, name and vocabulary size.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    definition = json.loads(backend.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    text = json.dumps(definition, sort_keys=True)
  else:
    text = json.dumps([type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")),
                       int(getattr(tokenizer, "vocab_size", 0))])
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def texts_digest(*columns: Iterable[Any] | None) -> str:
  """sha256 of the columns' items, in order (None columns count as absent)."""
  digest = hashlib.sha256()
  for column in columns:
    digest.update(b"\x00column" if column is not None else b"\x00none")
    for item in column or ():
      digest.update(json.dumps(item, ensure_ascii=False).encode("utf-8"))
      digest.update(b"\n")
  return digest.hexdigest()


def entry(folder: str | os.PathLike, prefix: str, key: Mapping[str, Any]) -> pathlib.Path:
  """The file for ``key`` (JSON-serialisable) under ``folder``: ``<prefix>-<hash>.npz``."""
  text = json.dumps(dict(key), sort_keys=True)
  return pathlib.Path(folder) / f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:32]}.npz"


def load(path: pathlib.Path, names: Iterable[str]) -> dict[str, np.ndarray] | None:
  """The arrays ``names`` stored at ``path``; None when absent or unreadable (the caller rebuilds)."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as data:
      return {name: data[name] for name in names}
  except (OSError, ValueError, KeyError) as err:  # Truncated or foreign file.
    logging.warning("data cache %s is unreadable (%s); rebuilding it", path, err)
    return None


def save(path: pathlib.Path, arrays: Mapping[str, np.ndarray], *, compress: bool = True) -> None:
  """Writes ``arrays`` to ``path`` atomically (a temporary file, then a rename).

  ``compress=False`` for float features, which zlib shrinks little and slowly.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      (np.savez_compressed if compress else np.savez)(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
