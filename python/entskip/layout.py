"""``BlockLayout``: a validated block-sparse row (BSR) layout and its cached transpose.

A layout places ``nnzb`` square ``b x b`` blocks in a ``(rows, cols)`` matrix:
block ``k`` lies at block row ``r`` (``crow_indices[r] <= k < crow_indices[r + 1]``)
and block column ``col_indices[k]``. The transpose lists the same blocks column by
column: block ``t`` of block column ``j`` (``ccol_indices[j] <= t < ccol_indices[j + 1]``)
is ``values[perm[t]]`` at block row ``row_indices[t]``.

Kernels trust only validated layouts: the constructor checks every field and raises
``ValueError`` naming it (monotone ``crow``, in-range, sorted, unique ``col`` per row,
lengths, shape divisible by the block size). A validation holds for the index tensors
as they were checked (:mod:`entskip.versions`): :func:`validate` checks them again once
one was edited in place, and code that runs kernels on stored index tensors (a
mapping's buffers, the GPU ops' arguments) calls it before every launch.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import reference, versions

_FIELDS = ("crow_indices", "col_indices", "ccol_indices", "row_indices", "perm")


def _index_tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    return t.detach().to("cpu", torch.int64).contiguous()


def _check_block_and_shape(block, shape) -> tuple[int, tuple[int, int]]:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block size must be a positive int, got {block!r}")
    try:  # integers only: 32.5 or "32" must not be truncated or parsed
        shape = tuple(operator.index(s) for s in shape if not isinstance(s, bool))
    except TypeError as err:
        raise TypeError(f"shape must be two ints, got {shape!r}") from err
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (rows, cols) with positive sizes, got {shape}")
    if shape[0] % block or shape[1] % block:
        raise ValueError(f"shape {shape} is not divisible by the block size {block}")
    return block, shape


class BlockLayout:
    """Validated BSR layout of a ``shape = (rows, cols)`` matrix with ``block x block`` blocks.

    Args:
        crow_indices: ``(rows / block + 1,)`` integer offsets, ``crow[0] = 0``, non-decreasing.
        col_indices: ``(nnzb,)`` integer block columns, strictly increasing within each row.
        block: block size ``b``.
        shape: ``(rows, cols)``, both divisible by ``b``.

    The index tensors are stored as int64 on the device of ``crow_indices``.
    """

    __slots__ = ("block", "shape") + _FIELDS

    def __init__(self, crow_indices: Tensor, col_indices: Tensor, block: int, shape: tuple[int, int]):
        block, shape = _check_block_and_shape(block, shape)
        device = crow_indices.device if isinstance(crow_indices, Tensor) else torch.device("cpu")
        crow = _index_tensor(crow_indices, "crow_indices")
        col = _index_tensor(col_indices, "col_indices")
        nrows, ncols = shape[0] // block, shape[1] // block
        if crow.numel() != nrows + 1:
            raise ValueError(f"crow_indices must have {nrows + 1} entries for {nrows} block rows, got {crow.numel()}")
        if crow[0] != 0:
            raise ValueError(f"crow_indices must start at 0, got {int(crow[0])}")
        if crow[-1] != col.numel():
            raise ValueError(f"crow_indices must end at len(col_indices) = {col.numel()}, got {int(crow[-1])}")
        if bool((crow.diff() < 0).any()):
            raise ValueError("crow_indices must be non-decreasing")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= ncols):
            raise ValueError(f"col_indices must lie in [0, {ncols}), got values in [{int(col.min())}, {int(col.max())}]")
        rows = reference.block_rows(crow)
        same_row = rows[1:] == rows[:-1]
        step = col[1:] - col[:-1]
        if bool((same_row & (step == 0)).any()):
            raise ValueError("col_indices has duplicate block columns in a row")
        if bool((same_row & (step < 0)).any()):
            raise ValueError("col_indices must be sorted within each block row")
        perm = torch.sort(col * nrows + rows, stable=True).indices
        ccol = torch.zeros(ncols + 1, dtype=torch.int64)
        ccol[1:] = torch.bincount(col, minlength=ncols).cumsum(0)
        self.block, self.shape = block, shape
        self._set(device, crow, col, ccol, rows[perm], perm)
        versions.remember(self.tensors(), block)

    def _set(self, device, *tensors: Tensor) -> None:
        for name, t in zip(_FIELDS, tensors):
            object.__setattr__(self, name, t.to(device))

    @classmethod
    def _trusted(cls, block: int, shape: tuple[int, int], *tensors: Tensor) -> "BlockLayout":
        """Wrap tensors of an already validated layout (no checks)."""
        layout = cls.__new__(cls)
        layout.block, layout.shape = block, tuple(shape)
        layout._set(tensors[0].device, *tensors)
        return layout

    @classmethod
    def from_mask(cls, mask: Tensor, block: int) -> "BlockLayout":
        """Layout of the non-zero entries of a boolean ``(rows / b, cols / b)`` block mask."""
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        crow[1:] = mask.sum(1).cumsum(0)
        col = mask.nonzero()[:, 1]
        return cls(crow, col, block, (mask.shape[0] * block, mask.shape[1] * block))

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        """Fraction of the ``(rows / b) x (cols / b)`` blocks that are stored."""
        return self.nnzb / ((self.shape[0] // self.block) * (self.shape[1] // self.block))

    @property
    def device(self) -> torch.device:
        return self.crow_indices.device

    def tensors(self) -> tuple[Tensor, ...]:
        """``(crow_indices, col_indices, ccol_indices, row_indices, perm)``."""
        return tuple(getattr(self, name) for name in _FIELDS)

    def is_current(self) -> bool:
        """Whether the index tensors are the validated ones, none edited since."""
        return versions.is_current(self.tensors(), self.block)

    def to(self, device) -> "BlockLayout":
        moved = BlockLayout._trusted(self.block, self.shape, *(t.to(device) for t in self.tensors()))
        if self.is_current():  # copies of validated tensors are valid
            versions.remember(moved.tensors(), self.block)
        return moved

    def transpose(self) -> "BlockLayout":
        """Layout of ``M^T``; its block ``t`` holds ``values[self.perm[t]].mT``."""
        inverse = torch.empty_like(self.perm)
        inverse[self.perm] = torch.arange(self.nnzb, device=self.perm.device)
        transposed = BlockLayout._trusted(
            self.block,
            (self.shape[1], self.shape[0]),
            self.ccol_indices,
            self.row_indices,
            self.crow_indices,
            self.col_indices,
            inverse,
        )
        if self.is_current():
            versions.remember(transposed.tensors(), self.block)
        return transposed

    def gather(self, matrix: Tensor) -> Tensor:
        """The ``(nnzb, b, b)`` blocks of a dense ``matrix`` at this layout's positions."""
        if tuple(matrix.shape) != self.shape:
            raise ValueError(f"matrix must have shape {self.shape}, got {tuple(matrix.shape)}")
        b = self.block
        blocks = matrix.reshape(self.shape[0] // b, b, self.shape[1] // b, b).permute(0, 2, 1, 3)
        return blocks[reference.block_rows(self.crow_indices), self.col_indices]

    def to_dense(self, values: Tensor) -> Tensor:
        """Dense ``shape`` matrix with ``values (nnzb, b, b)`` placed at the blocks."""
        return reference.bsr_to_dense(values, self.crow_indices, self.col_indices, self.shape)

    def to_sparse_bsr(self, values: Tensor) -> Tensor:
        """A ``torch.sparse_bsr_tensor`` with this layout and ``values``."""
        return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, values, self.shape)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, BlockLayout)
            and (self.block, self.shape) == (other.block, other.shape)
            and torch.equal(self.crow_indices.cpu(), other.crow_indices.cpu())
            and torch.equal(self.col_indices.cpu(), other.col_indices.cpu())
        )

    __hash__ = None

    def __repr__(self) -> str:
        return f"BlockLayout(shape={self.shape}, block={self.block}, nnzb={self.nnzb}, density={self.density:.4g})"


def validate(crow: Tensor, col: Tensor, ccol: Tensor, row: Tensor, perm: Tensor, block: int) -> None:
    """Raise ``ValueError`` unless the index tensors form a valid layout of ``block x block``
    blocks and its exact transpose, as :class:`BlockLayout` builds them (``TypeError`` for a
    tensor that is not 1-D int64).

    Checked on the host (a device-to-host copy for GPU tensors) unless these tensors
    passed before and none changed since (:mod:`entskip.versions`): later calls, CUDA
    graph capture included, neither copy nor synchronise.
    """
    tensors = (crow, col, ccol, row, perm)
    if versions.is_current(tensors, block):
        return
    for name, t in zip(_FIELDS, tensors):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.int64:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {got}")
    shape = ((crow.numel() - 1) * block, (ccol.numel() - 1) * block)
    layout = BlockLayout(crow, col, block, shape)
    for name, mine, given in zip(_FIELDS[2:], layout.tensors()[2:], tensors[2:]):
        if not torch.equal(mine.cpu(), given.cpu()):
            raise ValueError(f"{name} does not describe the transpose of crow_indices/col_indices")
    versions.remember(tensors, block)
