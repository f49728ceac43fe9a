"""Dense layers with a low-rank update kept apart: the kernel type models understand.

`LowRankKernel` stands for ``w0 + (left @ right).T`` without forming it;
`dense_apply` and `dense_group_apply` compute ``x @ kernel`` for plain and
low-rank kernels. This module knows nothing of adapters: the models of
`rmlora_jax.models` import it, and the adapter families
(`rmlora_jax.adapters`) build `LowRankKernel`s for them, so models never
import adapter code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankKernel:
  """A frozen Dense kernel and a low-rank update, applied without merging them.

  Stands in for the kernel ``w0 + (left @ right).T`` of shape (d_in, d_out).
  Models whose Dense layers understand it (`rmlora_jax.models`' BERT, DeBERTa-v2
  and ViT, through `dense_apply`) compute ``x @ w0 + (x @ right.T) @ left.T``:
  in training the backward pass then needs no (d_in, d_out) weight gradient,
  only the small ones of ``left`` and ``right``.
  """

  # The frozen kernel (d_in, d_out).
  w0: Array
  # (d_out, r'), the update's scale folded in.
  left: Array
  # (r', d_in).
  right: Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.w0.shape

  @property
  def dtype(self) -> jnp.dtype:
    return self.w0.dtype

  def merged(self) -> Array:
    """The equivalent dense kernel ``w0 + (left @ right).T``."""
    return (self.w0 + (self.left @ self.right).T).astype(self.w0.dtype)


def dense_apply(x: Array, kernel: Array | LowRankKernel, dtype: Any = None) -> Array:
  """``x @ kernel`` over the last axis, for a plain or a `LowRankKernel` kernel.

  Args:
    x: (..., d_in) inputs.
    kernel: a (d_in, d_out) array or a `LowRankKernel`.
    dtype: the computation dtype; None: ``x``'s.

  Returns:
    (..., d_out) in ``dtype``.
  """
  dtype = dtype or x.dtype
  x = jnp.asarray(x, dtype)
  if not isinstance(kernel, LowRankKernel):
    return x @ jnp.asarray(kernel, dtype)
  return dense_group_apply(x, [kernel], dtype)[0]


def dense_group_apply(x: Array, kernels: Sequence[Array | LowRankKernel], dtype: Any = None) -> list[Array]:
  """``[x @ k for k in kernels]`` for projections that read the same input (Q, K, V).

  Equal to `dense_apply` on each kernel, computed in fewer, wider matmuls:
  the frozen kernels are concatenated into one ``x @ [w0_1 | w0_2 | ...]``;
  the low-rank branches share one ``u = x @ [right_1; right_2; ...].T`` of
  width ``sum(r')`` and one ``u @ L`` with ``L`` block-diagonal in the left
  factors (zero where a kernel has none), added to the frozen product before
  it is split. So ``x`` is read twice, not once per adapter, and the group's
  backward pass runs two small matmuls where it ran two per adapter. The
  gradients are written out (a custom VJP) so that no (d_out, N) gradient is
  transposed on CPU; that, not the fusion, is what first brought the
  adapters near the frozen model's speed (docs/BENCHMARKS.md). One
  consequence of the shared product: an inf in an adapter's branch (a
  diverged bf16 run) reaches the group's plain kernels' outputs as NaN
  through their zero blocks.

  Args:
    x: (..., d_in) inputs.
    kernels: (d_in, d_out_i) arrays or `LowRankKernel`s.
    dtype: the computation dtype; None: ``x``'s.

  Returns:
    One (..., d_out_i) array per kernel, in ``dtype``.
  """
  dtype = dtype or x.dtype
  x = jnp.asarray(x, dtype)
  frozen = [k.w0 if isinstance(k, LowRankKernel) else k for k in kernels]
  widths = [w.shape[-1] for w in frozen]
  y = x @ jnp.concatenate([jnp.asarray(w, dtype) for w in frozen], axis=-1)
  low = [k for k in kernels if isinstance(k, LowRankKernel)]
  for k in low:
    if k.left.shape[-1] != k.right.shape[0]:
      raise ValueError(f"dense_group_apply: a LowRankKernel's left {k.left.shape} and right {k.right.shape} "
                       f"factors disagree on the rank")
  if low:
    # (d_out, rank) per kernel, rank 0 for a plain one: static, read by both passes.
    layout = tuple((w, k.right.shape[0] if isinstance(k, LowRankKernel) else 0) for w, k in zip(widths, kernels))
    z = _low_rank_group(layout, x.reshape(-1, x.shape[-1]), tuple(k.left.astype(dtype) for k in low),
                        tuple(k.right.astype(dtype) for k in low))
    y = y + z.reshape(y.shape)
  return jnp.split(y, np.cumsum(widths)[:-1], axis=-1)


def _block_left(layout: tuple[tuple[int, int], ...], lefts: tuple[Array, ...]) -> Array:
  """The (sum r', sum d_out) matrix whose block (i, j) is ``lefts[i].T`` where kernel j is low-rank i, else 0."""
  total, offset, it = sum(rank for _, rank in layout), 0, iter(lefts)
  blocks = []
  for width, rank in layout:
    if not rank:
      blocks.append(jnp.zeros((total, width), lefts[0].dtype))
      continue
    blocks.append(jnp.pad(next(it).T, ((offset, total - offset - rank), (0, 0))))
    offset += rank
  return jnp.concatenate(blocks, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_rank_group(layout, x: Array, lefts: tuple[Array, ...], rights: tuple[Array, ...]) -> Array:
  """``(x @ [right_1; ...].T) @ L``: each adapter's ``(x @ right_i.T) @ left_i.T`` in its kernel's columns."""
  return _low_rank_group_fwd(layout, x, lefts, rights)[0]


def _low_rank_group_fwd(layout, x, lefts, rights):
  block = _block_left(layout, lefts)
  u = x @ jnp.concatenate(rights, axis=0).T
  return u @ block, (x, rights, u, block)


def _low_rank_group_bwd(layout, res, g):
  # Written out rather than left to autodiff for one reason: autodiff takes
  # the left factors' gradient as g.T @ u, whose (d_out, N) operand XLA CPU
  # materialises transposed (and fuses the activation's backward into that
  # strided copy); u.T @ g contracts g over its leading axis as stored, and
  # only the rank-sized result is transposed. On MiniLM that copy was most of
  # what the adapters cost beyond the frozen model (docs/BENCHMARKS.md).
  x, rights, u, block = res
  du = g @ block.T
  d_block = u.T @ g
  d_lefts, row, col = [], 0, 0
  for width, rank in layout:
    if rank:
      d_lefts.append(d_block[row:row + rank, col:col + width].T)
      row += rank
    col += width
  ranks = [rank for _, rank in layout if rank]
  d_rights = tuple(jnp.split(du.T @ x, np.cumsum(ranks)[:-1], axis=0))
  return du @ jnp.concatenate(rights, axis=0), tuple(d_lefts), d_rights


_low_rank_group.defvjp(_low_rank_group_fwd, _low_rank_group_bwd)
