"""Length-bucketed batching on the host, for every text task.

Sequences padded to one of a few bucket lengths (`bucket_lengths`,
`fit_buckets`) make a jitted step compile few shapes. `batch_plan` orders a
split's examples into batches as a pure function of (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted one would have;
`batches` yields them for a `TokenizedSplit` (the GLUE tasks' tokens), and
the QA and instruction-tuning data build their own batches from the same plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Batches per chunk that is sorted by length before batching (see `batch_plan`).
CHUNK_BATCHES = 50


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
  """Token ids of one split, unpadded, with special tokens."""

  # One int32 array per example, variable length.
  input_ids: list[np.ndarray]
  # Segment ids, int32, the same lengths as `input_ids` (zeros for RoBERTa-like tokenizers).
  token_type_ids: list[np.ndarray]
  # Class ids (int32) or scores (float32), one per example.
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)

  def lengths(self) -> np.ndarray:
    """Number of tokens of each example, int32 (N,)."""
    return np.fromiter((len(x) for x in self.input_ids), np.int32, len(self.input_ids))



def bucket_lengths(max_seq_len: int, num_buckets: int = 4) -> tuple[int, ...]:
  """Padded lengths for `batches`: geometric up to ``max_seq_len``, multiples of 8.

  The lengths span a factor of ``min(2**(num_buckets - 1), 8)``, so up to 4
  buckets are halvings (``bucket_lengths(128) == (16, 32, 64, 128)``) and more
  buckets split the range from ``max_seq_len / 8`` more finely
  (``bucket_lengths(256, 8) == (32, 48, 64, 80, 112, 144, 192, 256)``).
  Lengths are rounded up to multiples of 8 (at least 8; the last is always
  ``max_seq_len``), so rounding may merge buckets.
  """
  for value, name in ((max_seq_len, "max_seq_len"), (num_buckets, "num_buckets")):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"bucket_lengths: {name} must be a positive integer, got {value!r}")
  span = min(2.0 ** (num_buckets - 1), 8.0)
  out = {max_seq_len}
  for i in range(1, num_buckets):
    # round() keeps exact powers of two from rounding up past a multiple of 8.
    length = round(max_seq_len / span ** (i / (num_buckets - 1)), 6)
    out.add(min(max_seq_len, max(8, math.ceil(length / 8) * 8)))
  return tuple(sorted(out))


def fit_buckets(
    batch_lengths: Sequence[int] | np.ndarray, num_buckets: int, *, multiple: int = 8, max_len: int | None = None
) -> tuple[int, ...]:
  """The padded lengths that waste the fewest positions on batches of the given longest rows.

  Each batch is padded to the smallest bucket that holds its longest row
  (`bucket_for`). Among bucket sets of at most ``num_buckets`` lengths, each
  a multiple of ``multiple`` (or ``max_len``), the largest holding the
  longest batch, this returns one that minimises the total padded length
  (exact dynamic programme over the distinct rounded lengths). On CoLA's
  short sentences (longest rows mostly 8 to 17 tokens), 4 fitted buckets of
  multiples of 4 pad batches to 14.6 tokens a row on average, where the
  geometric `bucket_lengths(128)` pads to 18.1.

  Args:
    batch_lengths: the longest row of each batch, e.g. `batch_max_lengths`.
    num_buckets: at most this many lengths (fewer when the data has fewer).
    multiple: every length is rounded up to a multiple of this.
    max_len: no bucket is longer (rows are truncated to it when tokenised).

  Returns:
    Ascending lengths.
  """
  for value, name in ((num_buckets, "num_buckets"), (multiple, "multiple")):
    _check_positive(value, f"fit_buckets: {name}")
  lengths = np.asarray(batch_lengths, np.int64)
  if lengths.size == 0 or lengths.min() < 1:
    raise ValueError(f"fit_buckets: batch_lengths must be positive and not empty, got {lengths.size} values "
                     f"with minimum {lengths.min() if lengths.size else None}")
  rounded = -(-lengths // multiple) * multiple
  if max_len is not None:
    if lengths.max() > max_len:
      raise ValueError(f"fit_buckets: a batch has {lengths.max()} tokens, more than max_len={max_len}")
    rounded = np.minimum(rounded, max_len)
  cands, counts = np.unique(rounded, return_counts=True)
  # cost[b][j]: least padded length of the batches up to cands[j] with b
  # buckets, the largest being cands[j]; prev[b][j]: the bucket below it.
  n, k = len(cands), min(num_buckets, len(cands))
  below = np.concatenate([[0], np.cumsum(counts)])  # batches at or below cands[j-1]
  cost = np.full((k + 1, n), np.inf)
  prev = np.full((k + 1, n), -1)
  cost[1] = below[1:] * cands
  for b in range(2, k + 1):
    for j in range(b - 1, n):
      options = cost[b - 1, :j] + (below[j + 1] - below[1:j + 1]) * cands[j]
      i = int(np.argmin(options))
      cost[b, j], prev[b, j] = options[i], i
  b, j = int(np.argmin(cost[1:, n - 1])) + 1, n - 1
  out = []
  while j >= 0:
    out.append(int(cands[j]))
    j, b = prev[b, j], b - 1
  return tuple(sorted(out))


def batch_max_lengths(
    lengths: np.ndarray, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool
) -> np.ndarray:
  """The longest row of each batch of `batch_plan` (what `fit_buckets` fits)."""
  lengths = np.asarray(lengths)
  plan = batch_plan(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
  return np.asarray([lengths[idx].max() for idx in plan], np.int64)


def num_batches(n: int, batch_size: int, *, drop_remainder: bool) -> int:
  """Batches per epoch of ``n`` examples (the last partial one kept unless dropped)."""
  _check_positive(batch_size, "batch_size")
  if n < 0:
    raise ValueError(f"num_batches: n must be >= 0, got {n!r}")
  return n // batch_size if drop_remainder else -(-n // batch_size)


def _check_positive(value: Any, name: str):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def batch_plan(
    lengths: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_remainder: bool = False,
    chunk_batches: int = CHUNK_BATCHES,
) -> list[np.ndarray]:
  """The example indices of each batch of one epoch (what `batches` pads).

  With ``shuffle`` the order is a pure function of (seed, epoch): permute all
  examples, cut them into chunks of ``chunk_batches`` batches, sort each chunk
  by length, cut into batches and permute the batches. Examples of similar
  length share a batch (little padding) while the epoch stays random. Without
  ``shuffle`` the examples are sorted by length, longest first (for eval).

  Returns:
    One int array per batch; all have ``batch_size`` entries except perhaps
    the last (not with ``drop_remainder``).
  """
  _check_positive(batch_size, "batch_size")
  _check_positive(chunk_batches, "chunk_batches")
  lengths = np.asarray(lengths)
  n = len(lengths)
  if shuffle:
    if min(seed, epoch) < 0:
      raise ValueError(f"batch_plan: seed and epoch must be >= 0, got {seed!r}, {epoch!r}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    chunk = chunk_batches * batch_size
    order = np.concatenate(
        [perm[i:i + chunk][np.argsort(-lengths[perm[i:i + chunk]], kind="stable")]
         for i in range(0, n, chunk)] or [np.zeros(0, np.int64)]
    )
  else:
    order = np.argsort(-lengths, kind="stable")
  count = num_batches(n, batch_size, drop_remainder=drop_remainder)
  plan = [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]
  if shuffle:
    plan = [plan[i] for i in rng.permutation(count)]
  return plan


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest of the ascending ``buckets`` that holds ``length`` tokens."""
  for b in buckets:
    if b >= length:
      return b
  raise ValueError(
      f"An example has {length} tokens, more than the largest bucket {buckets[-1]}; "
      f"tokenize with max_seq_len <= {buckets[-1]} or add a larger bucket"
  )


def batches(
    split: TokenizedSplit,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    buckets: tuple[int, ...],
    pad_id: int = 0,
    start: int = 0,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape, length-bucketed numpy batches of one epoch.

  Args:
    split: the tokenised examples.
    batch_size: B; every batch has exactly B rows.
    seed: with ``epoch``, fixes the order when ``shuffle`` (see `batch_plan`).
    epoch: the epoch number; each epoch has its own order.
    shuffle: random length-bucketed order (train) or length-sorted (eval).
    buckets: ascending padded lengths, e.g. `bucket_lengths(max_seq_len)`.
    pad_id: the tokenizer's pad token id.
    start: skip the first ``start`` batches of the epoch without building them,
      to resume mid-epoch.
    drop_remainder: drop the last partial batch instead of filling it.

  Yields:
    ``{"input_ids", "attention_mask", "token_type_ids"}`` int32 (B, L) with L
    the smallest bucket that fits the batch's longest example; ``"labels"``
    (B,); ``"weights"`` float32 (B,), 1 for real examples and 0 for the copies
    of a real example that fill the last partial batch (metrics and losses
    must use them); ``"index"`` int32 (B,), each row's position in ``split``.
  """
  buckets = tuple(sorted(int(b) for b in buckets))
  if not buckets or buckets[0] < 1:
    raise ValueError(f"batches: buckets must be positive lengths, got {buckets!r}")
  lengths = split.lengths()
  plan = batch_plan(
      lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
      drop_remainder=drop_remainder,
  )
  if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= len(plan):
    raise ValueError(f"batches: start must be in [0, {len(plan)}], got {start!r}")
  for idx in plan[start:]:
    real = len(idx)
    # Fill with copies of the first example: its length is already in the batch.
    idx = np.concatenate([idx, np.full(batch_size - real, idx[0], idx.dtype)])
    length = bucket_for(int(lengths[idx].max()), buckets)
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    token_type_ids = np.zeros((batch_size, length), np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(idx):
      k = lengths[i]
      input_ids[row, :k] = split.input_ids[i]
      token_type_ids[row, :k] = split.token_type_ids[i]
      attention_mask[row, :k] = 1
    weights = np.zeros(batch_size, np.float32)
    weights[:real] = 1.0
    yield {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": split.labels[idx],
        "weights": weights,
        "index": idx.astype(np.int32),
    }


def padding_fraction(
    lengths: np.ndarray,
    batch_size: int,
    buckets: tuple[int, ...],
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> float:
  """Share of the token positions in an epoch of `batches` that are padding.

  Counts the fill rows of the last batch as padding. Compare
  ``buckets=bucket_lengths(m)`` with ``buckets=(m,)`` (every batch padded to
  ``max_seq_len``) to see what bucketing saves.
  """
  lengths = np.asarray(lengths)
  buckets = tuple(sorted(buckets))
  plan = batch_plan(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
  total = sum(batch_size * bucket_for(int(lengths[idx].max()), buckets) for idx in plan)
  return 1.0 - float(lengths.sum()) / total if total else 0.0
