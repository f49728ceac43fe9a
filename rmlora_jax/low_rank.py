"""Dense layers with a low-rank update kept apart: the kernel types models understand.

`LowRankKernel` stands for ``w0 + (left @ right).T`` without forming it;
`dense_apply` and `dense_group_apply` compute ``x @ kernel`` for plain and
low-rank kernels. A frozen kernel may also be a `qwix.QArray` (a base
quantised by `rmlora_jax.quantize.quantize_base`), alone or as a
`LowRankKernel`'s ``w0``: it is then read through qwix (`qwix.dot_general`,
`qwix.dequantize`) in the computation dtype, and the low-rank branch stays
float. This module knows nothing of adapters: the models of
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
import qwix

Array = jax.Array


def is_quantized(kernel: Any) -> bool:
  """Whether ``kernel`` is a quantised frozen kernel (a `qwix.QArray`)."""
  return isinstance(kernel, qwix.QArray)


def frozen_kernel(kernel: Array | qwix.QArray, dtype: Any = None) -> Array:
  """A frozen kernel as a plain array in ``dtype`` (None: its own).

  A `qwix.QArray` is dequantised in ``dtype`` (`qwix.dequantize` of the
  array with its scale cast to it), anything else is cast.
  """
  if is_quantized(kernel):
    return qwix.dequantize(kernel if dtype is None else kernel.astype(dtype))
  return jnp.asarray(kernel, dtype)


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

  # The frozen kernel (d_in, d_out), plain or quantised (a `qwix.QArray`).
  w0: Array | qwix.QArray
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
    """The equivalent dense kernel ``w0 + (left @ right).T`` (a quantised ``w0`` dequantised)."""
    return (frozen_kernel(self.w0) + (self.left @ self.right).T).astype(self.w0.dtype)


def dense_apply(x: Array, kernel: Array | qwix.QArray | LowRankKernel, dtype: Any = None) -> Array:
  """``x @ kernel`` over the last axis, for a plain, quantised or `LowRankKernel` kernel.

  A `qwix.QArray` goes through `qwix.dot_general` with its scale in
  ``dtype`` (for a float ``x`` qwix dequantises the kernel, then multiplies).

  Args:
    x: (..., d_in) inputs.
    kernel: a (d_in, d_out) array or `qwix.QArray`, or a `LowRankKernel`.
    dtype: the computation dtype; None: ``x``'s.

  Returns:
    (..., d_out) in ``dtype``.
  """
  dtype = dtype or x.dtype
  x = jnp.asarray(x, dtype)
  if is_quantized(kernel):
    contract = (((x.ndim - 1,), (0,)), ((), ()))
    return qwix.dot_general(x, kernel.astype(dtype), contract).astype(dtype)
  if not isinstance(kernel, LowRankKernel):
    return x @ jnp.asarray(kernel, dtype)
  return dense_group_apply(x, [kernel], dtype)[0]


def dense_group_apply(x: Array, kernels: Sequence[Array | qwix.QArray | LowRankKernel], dtype: Any = None, *,
                      shards: int = 1) -> list[Array]:
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

  With tensor parallelism each kernel's d_out is split over ``shards``
  devices (the Megatron column-parallel layout). Concatenating such kernels
  end to end would move them between devices every step (XLA reshards the
  concatenation with all-to-alls, and the output's split with more), so with
  ``shards > 1`` the group's columns are laid out shard-major instead:
  ``[k_1 shard 0 | k_2 shard 0 | ... | k_1 shard 1 | ...]``, which every
  device assembles from the columns it holds. The result is the same.

  Quantised frozen kernels (`qwix.QArray`s, also as a `LowRankKernel`'s
  ``w0``) are dequantised in ``dtype`` (`frozen_kernel`) before the
  concatenation; the low-rank branches are float as ever.

  Args:
    x: (..., d_in) inputs.
    kernels: (d_in, d_out_i) arrays, `qwix.QArray`s or `LowRankKernel`s.
    dtype: the computation dtype; None: ``x``'s.
    shards: how many devices split each kernel's d_out (the mesh's tensor
      parallel axis, `rmlora_jax.partitioning.column_shards`); a group with a
      width it does not divide is laid out end to end.

  Returns:
    One (..., d_out_i) array per kernel, in ``dtype``.
  """
  dtype = dtype or x.dtype
  x = jnp.asarray(x, dtype)
  frozen = [k.w0 if isinstance(k, LowRankKernel) else k for k in kernels]
  widths = [w.shape[-1] for w in frozen]
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
    raise ValueError(f"dense_group_apply: shards must be a positive integer, got {shards!r}")
  if len(kernels) == 1 or any(w % shards for w in widths):
    shards = 1
  y = x @ _concat_columns([frozen_kernel(w, dtype) for w in frozen], shards)
  for k in kernels:
    if isinstance(k, LowRankKernel) and k.left.shape[-1] != k.right.shape[0]:
      raise ValueError(f"dense_group_apply: a LowRankKernel's left {k.left.shape} and right {k.right.shape} "
                       f"factors disagree on the rank")
  # (d_out, rank) per kernel, rank 0 for a plain one (or a rank-0 update, which
  # adds nothing): static, read by both passes.
  ranks = [k.right.shape[0] if isinstance(k, LowRankKernel) else 0 for k in kernels]
  low = [k for k, rank in zip(kernels, ranks) if rank]
  if low:
    layout = (shards, tuple(zip(widths, ranks)))
    z = _low_rank_group(layout, x.reshape(-1, x.shape[-1]), tuple(k.left.astype(dtype) for k in low),
                        tuple(k.right.astype(dtype) for k in low))
    y = y + z.reshape(y.shape)
  return _split_columns(y, widths, shards)


def _concat_columns(arrays: Sequence[Array], shards: int) -> Array:
  """``arrays`` (..., w_i) side by side, shard-major: each of ``shards`` column blocks holds its part of every one."""
  if shards == 1:
    return jnp.concatenate(arrays, axis=-1)
  parts = [a.reshape(*a.shape[:-1], shards, a.shape[-1] // shards) for a in arrays]
  joined = jnp.concatenate(parts, axis=-1)
  return joined.reshape(*joined.shape[:-2], -1)


def _split_columns(y: Array, widths: Sequence[int], shards: int) -> list[Array]:
  """The inverse of `_concat_columns`: (..., sum w_i) back into (..., w_i) arrays."""
  if shards == 1:
    return jnp.split(y, np.cumsum(widths)[:-1], axis=-1)
  parts = jnp.split(y.reshape(*y.shape[:-1], shards, -1), np.cumsum([w // shards for w in widths])[:-1], axis=-1)
  return [p.reshape(*y.shape[:-1], w) for p, w in zip(parts, widths)]


# (shards, ((d_out, rank) per kernel of the group)): `_low_rank_group`'s static argument.
Layout = tuple[int, tuple[tuple[int, int], ...]]


def _block_left(layout: Layout, lefts: tuple[Array, ...]) -> Array:
  """The (sum r', sum d_out) matrix whose block (i, j) is ``lefts[i].T`` where kernel j is low-rank i, else 0.

  Its columns are laid out as the group's frozen kernels are (`_concat_columns`).
  """
  shards, kernels = layout
  total, offset, it = sum(rank for _, rank in kernels), 0, iter(lefts)
  blocks = []
  for width, rank in kernels:
    if not rank:
      blocks.append(jnp.zeros((total, width), lefts[0].dtype))
      continue
    blocks.append(jnp.pad(next(it).T, ((offset, total - offset - rank), (0, 0))))
    offset += rank
  return _concat_columns(blocks, shards)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_rank_group(layout: Layout, x: Array, lefts: tuple[Array, ...], rights: tuple[Array, ...]) -> Array:
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
  shards, kernels = layout
  d_blocks = _split_columns(u.T @ g, [width for width, _ in kernels], shards)
  d_lefts, row = [], 0
  for d_block, (_, rank) in zip(d_blocks, kernels):
    if rank:
      d_lefts.append(d_block[row:row + rank].T)
      row += rank
  ranks = [rank for _, rank in kernels if rank]
  d_rights = tuple(jnp.split(du.T @ x, np.cumsum(ranks)[:-1], axis=0))
  return du @ jnp.concatenate(rights, axis=0), tuple(d_lefts), d_rights


_low_rank_group.defvjp(_low_rank_group_fwd, _low_rank_group_bwd)
