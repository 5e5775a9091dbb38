"""Skip mappings ``M`` (docs/design.md, "Mappings") as ``nn.Module``s, and their constructors.

A mapping holds ``M`` (``out_features x in_features``) in the storage that suits its
structure and runs ``y = alpha * (x @ M^T) + branch`` through the matching op:

============================  =================================  ==========================
constructor                   storage                            op
============================  =================================  ==========================
:func:`identity`              none                               elementwise
:func:`orthogonal`            dense ``weight`` (D, D)            dense skip-add (GEMM)
:func:`block_orthogonal`      block-diagonal BSR ``blocks``      BSR skip-add
:func:`permutation`           ``index`` (D,)                     gather
:func:`sparse`                BSR ``blocks`` at a block density  BSR skip-add
:func:`structural`            block-banded BSR ``blocks``        BSR skip-add
============================  =================================  ==========================

The Entangled Residual Mappings paper asks that a mapping share key attributes of the
identity (eigenvalues, structure, Jacobian norm) without giving a recipe. The
constructions below are entskip's own; each docstring says which attribute it keeps,
and :meth:`Mapping.properties` measures them. Every random construction takes a
``seed`` and is reproducible.

Mappings are frozen by default (their matrix is a buffer). ``learnable=True`` makes
it a parameter; orthogonal kinds then stay orthogonal through a parametrization.

A mapping's tensors must be on the device of the activations it is applied to
(``ValueError`` otherwise). Its structure (a permutation's ``index``, a block-sparse
layout) is checked when it is built and when a ``state_dict`` is loaded, and again
before the next call after one of its tensors was edited in place
(:mod:`entskip.versions`; not under ``torch.compile``, where the ``cpu`` and GPU kernels
still check the layout themselves but ``reference`` does not).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import devices, layout as _layout, reference, versions
from .bsr_skip import bsr_skip_add
from .dense_skip import dense_skip_add
from .identity_skip import identity_skip_add
from .layout import BlockLayout
from .permutation_skip import permutation_skip_add

__all__ = [
    "BlockLayout",
    "Mapping",
    "IdentityMapping",
    "DenseMapping",
    "PermutationMapping",
    "BlockSparseMapping",
    "BatchedCayley",
    "identity",
    "orthogonal",
    "block_orthogonal",
    "permutation",
    "sparse",
    "structural",
    "make",
    "MAPPINGS",
]


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return dim


def _check_block(dim: int, block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block size must be a positive int, got {block!r}")
    if dim % block:
        raise ValueError(f"dim {dim} is not divisible by the block size {block}")
    return block


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _haar(shape: tuple[int, ...], seed: int) -> Tensor:
    """Haar-random orthogonal matrices ``(..., n, n)`` in float64, row-major.

    QR of a Gaussian with the signs fixed by ``diag(R)``. ``torch.linalg.qr`` returns a
    column-major Q; the result is made contiguous so kernels read ``M``, not ``M^T``.
    """
    q, r = torch.linalg.qr(torch.randn(shape, generator=_generator(seed), dtype=torch.float64))
    return (q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)).contiguous()


def spectral_norm(matrix: Tensor) -> float:
    """Largest singular value of a dense matrix, exactly (float64, ``O(D^3)``)."""
    m = matrix.detach().to("cpu", torch.float64)
    return float(torch.linalg.eigvalsh(m.mT @ m)[-1].clamp_min(0).sqrt())


class Mapping(nn.Module):
    """A skip mapping ``M`` of shape ``(out_features, in_features)``.

    Subclasses implement :meth:`matrix` (the dense ``M``, for the reference and the
    analysis) and :meth:`skip_add_2d` (the fused op on ``(N, D_in)`` activations, and on
    features-first ``(N, D_in, S)`` ones where :attr:`features_first` is true). A subclass
    that overrides :meth:`skip_add_2d` gets ``(N, D_in)`` activations only, unless it sets
    :attr:`features_first` (or :attr:`any_rank`) itself.
    """

    kind = "mapping"
    #: whether :meth:`skip_add_2d` also takes features-first ``(N, D_in, S)`` activations
    features_first = False
    #: whether :meth:`skip_add_2d` takes ``(..., D_in)`` activations of any rank as they are
    #: (the elementwise skips), so that they need no reshape to ``(N, D_in)``
    any_rank = False

    def __init_subclass__(cls, **kwargs):
        # A subclass that overrides skip_add_2d takes the formats it declares itself: it does
        # not inherit features_first or any_rank from a parent whose skip_add_2d it replaces.
        super().__init_subclass__(**kwargs)
        if "skip_add_2d" in cls.__dict__:
            for flag in ("features_first", "any_rank"):
                if flag not in cls.__dict__:
                    setattr(cls, flag, False)

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def matrix(self) -> Tensor:
        """The dense ``(out_features, in_features)`` matrix ``M``."""
        raise NotImplementedError

    def skip_add_2d(self, x: Tensor, branch: Tensor | None, alpha: Tensor) -> Tensor:
        """``alpha * (x @ M^T) + branch`` for validated ``x (N, in_features)``; where
        :attr:`features_first`, also ``alpha * (M @ x[n]) + branch[n]`` for ``x (N, in_features, S)``
        (``branch`` and the result then ``(N, out_features, S)``)."""
        raise NotImplementedError

    def elementwise_operands(self) -> tuple[Tensor | None, Tensor | None] | None:
        """For a mapping that runs an elementwise op on features-last ``x`` of any rank:
        ``(index, inverse)`` of the permutation op as stored, unchecked (``(None, None)``: the
        identity op), for a caller that checks them itself (``entskip._C.plain_skip_add``);
        ``None`` for any other mapping."""
        return None

    def skip_add_features_first(self, x: Tensor, branch: Tensor | None, alpha: Tensor) -> Tensor:
        """``alpha * (M @ x[n]) + branch[n]`` for validated features-first ``x (N, in_features, S)``,
        where :attr:`features_first`: :meth:`skip_add_2d`, unless a mapping that takes any rank
        (whose 3-D input would be features last) says otherwise."""
        return self.skip_add_2d(x, branch, alpha)

    @property
    def density(self) -> float:
        """Fraction of ``M``'s entries that are stored (structural non-zeros)."""
        raise NotImplementedError

    @torch.no_grad()
    def properties(self) -> dict[str, float]:
        """Measured attributes of ``M`` in float64 (``O(D^3)``: meant for checks, not loops).

        Always: ``spectral_norm`` (the Jacobian norm of the skip), ``min_singular_value``,
        ``rms_gain`` (``sqrt(tr(M^T M) / D_in)``: the gain on a white input), ``density``.
        For square ``M`` also the eigenvalue moduli ``eig_abs_min``/``eig_abs_mean``/
        ``eig_abs_max``, the mean eigenvalue ``eig_mean`` (``tr(M) / D``, real),
        ``distance_from_identity`` (``||M - I||_F / sqrt(D)``) and
        ``orthogonality_error`` (``max |M^T M - I|``).
        """
        m = self.matrix().detach().to("cpu", torch.float64)
        sv = torch.linalg.svdvals(m)
        out = {
            "spectral_norm": float(sv[0]),
            "min_singular_value": float(sv[-1]),
            "rms_gain": float(sv.square().sum().div(m.shape[1]).sqrt()),
            "density": self.density,
        }
        if m.shape[0] == m.shape[1]:
            eye = torch.eye(m.shape[0], dtype=m.dtype)
            moduli = torch.linalg.eigvals(m).abs()
            out["eig_abs_min"], out["eig_abs_max"] = float(moduli.min()), float(moduli.max())
            out["eig_abs_mean"] = float(moduli.mean())
            out["eig_mean"] = float(torch.diagonal(m).mean())
            out["distance_from_identity"] = float(torch.linalg.matrix_norm(m - eye) / math.sqrt(m.shape[0]))
            out["orthogonality_error"] = float((m.mT @ m - eye).abs().max())
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class IdentityMapping(Mapping):
    """``M = I``: the ordinary residual (``alpha = 1``) or Zhang et al.'s decayed shortcut."""

    kind = "identity"
    features_first = True  # elementwise: any format
    any_rank = True

    def __init__(self, dim: int):
        dim = _check_dim(dim)
        super().__init__(dim, dim)

    def matrix(self) -> Tensor:
        return torch.eye(self.in_features)

    def skip_add_2d(self, x, branch, alpha):
        return identity_skip_add(x, branch, alpha)

    def elementwise_operands(self):
        return None, None

    @property
    def density(self) -> float:
        return 1.0 / self.in_features


class DenseMapping(Mapping):
    """A dense ``weight (out_features, in_features)``; runs the dense skip-add (a GEMM)."""

    kind = "dense"
    features_first = True

    def __init__(self, weight: Tensor, learnable: bool = False):
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
        super().__init__(weight.shape[1], weight.shape[0])
        weight = weight.detach().contiguous()
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def matrix(self) -> Tensor:
        return self.weight

    def skip_add_2d(self, x, branch, alpha):
        weight = self.weight
        devices.check_same(x, **{"mapping.weight": weight})
        return dense_skip_add(x, weight.to(x.dtype), branch, alpha)

    @property
    def density(self) -> float:
        return 1.0


class PermutationMapping(Mapping):
    """``M[i, index[i]] = 1``: orthogonal and 1-sparse, run as a gather ``x[..., index]``."""

    kind = "permutation"
    any_rank = True
    features_first = True  # skip_add_features_first permutes dim 1 of (N, D, S) in place

    def __init__(self, index: Tensor):
        _check_permutation(index)
        n = index.numel()
        super().__init__(n, n)
        self.register_buffer("index", index.to(torch.int64))
        self._passed = (self.index, versions.state(self.index))  # the index that passed its check, with its state
        # the inverse permutation, for dx (derived from index: not saved)
        self.register_buffer("inverse", torch.argsort(self.index), persistent=False)

    def matrix(self) -> Tensor:
        return torch.eye(self.in_features, device=self.index.device)[self.index]

    def skip_add_2d(self, x, branch, alpha):
        buffers = self._buffers  # not self.index: nn.Module's attribute lookup costs a microsecond a buffer
        return permutation_skip_add(x, self._checked_index(x, buffers["index"]), buffers["inverse"], branch, alpha)

    def skip_add_features_first(self, x, branch, alpha):
        return permutation_skip_add(x, self._checked_index(x, self.index), self.inverse, branch, alpha,
                                    features_first=True)

    def elementwise_operands(self):
        buffers = self._buffers
        return buffers["index"], buffers["inverse"]

    def _checked_index(self, x: Tensor, index: Tensor) -> Tensor:
        """``index``, on ``x``'s device and (once per version) still a permutation.

        The last index that passed is kept with its state (:func:`entskip.versions.state`)
        on the mapping itself, not in :mod:`entskip.versions`' table, whose lookup costs more
        than a small skip's kernel (and whose entry for ``index`` the GPU dispatch keeps
        for the pair ``(index, inverse)``)."""
        if index.device != x.device:
            devices.check_same(x, **{"mapping.index": index})
        if not torch.compiler.is_compiling():
            passed = self.__dict__.get("_passed")  # absent in a mapping pickled whole before it existed
            if passed is None or passed[0] is not index or passed[1] != versions.state(index):
                _check_permutation(index, self.in_features, "the mapping's index (edited in place?)")
                self._passed = (index, versions.state(index))
        return index

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        index = state_dict.get(prefix + "index")
        if index is not None:
            _check_permutation(index, self.in_features, f"state_dict '{prefix}index'")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.inverse = torch.argsort(self.index)  # follows the loaded index

    @property
    def density(self) -> float:
        return 1.0 / self.in_features


def _check_permutation(index, n: int | None = None, name: str = "index") -> None:
    """``ValueError`` unless ``index`` is a 1-D integer tensor holding a permutation of
    ``0..n-1`` (``n``: its length unless given)."""
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex \
            or index.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor")
    n = index.numel() if n is None else n
    if index.numel() != n or not torch.equal(torch.sort(index.detach().cpu().to(torch.int64)).values, torch.arange(n)):
        raise ValueError(f"{name} must be a permutation of 0..{n - 1}")


_LAYOUT_BUFFERS = _layout._FIELDS  # the order of BlockLayout.tensors()


class BlockSparseMapping(Mapping):
    """A block-sparse ``M``: ``blocks (nnzb, b, b)`` placed by a validated :class:`BlockLayout`.

    The layout lives in buffers (``crow_indices`` and ``col_indices`` are saved; the
    transposed order is derived) so it moves with ``.to()`` and round-trips through
    ``state_dict``; a loaded layout is validated, together with the blocks' shape,
    before it replaces the current one (a partial ``state_dict``'s too: the buffers it
    holds with the current others). (The tensor is called ``blocks``, not
    ``values``: a parametrized ``values`` would clash with ``ModuleDict.values``.)
    """

    kind = "block_sparse"
    features_first = True

    def __init__(self, layout: BlockLayout, blocks: Tensor, learnable: bool = False):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        b = layout.block
        if not isinstance(blocks, Tensor) or tuple(blocks.shape) != (layout.nnzb, b, b):
            raise ValueError(f"blocks must have shape {(layout.nnzb, b, b)}, got {tuple(getattr(blocks, 'shape', ()))}")
        super().__init__(layout.shape[1], layout.shape[0])
        self.block = b
        self._set_layout(layout.to(blocks.device))
        blocks = blocks.detach().contiguous()
        if learnable:
            self.blocks = nn.Parameter(blocks)
        else:
            self.register_buffer("blocks", blocks)

    def _set_layout(self, layout: BlockLayout) -> None:
        for name, t in zip(_LAYOUT_BUFFERS, layout.tensors()):
            self.register_buffer(name, t, persistent=name in ("crow_indices", "col_indices"))

    @property
    def layout(self) -> BlockLayout:
        """The (validated) layout, on the mapping's device."""
        return BlockLayout._trusted(
            self.block,
            (self.out_features, self.in_features),
            self.crow_indices,
            self.col_indices,
            self.ccol_indices,
            self.row_indices,
            self.perm,
        )

    def matrix(self) -> Tensor:
        return self.layout.to_dense(self.blocks)

    def skip_add_2d(self, x, branch, alpha):
        blocks = self.blocks
        tensors = tuple(getattr(self, name) for name in _LAYOUT_BUFFERS)
        devices.check_same(x, **{"mapping.blocks": blocks}, **{f"mapping.{n}": t for n, t in zip(_LAYOUT_BUFFERS, tensors)})
        if not torch.compiler.is_compiling():
            try:
                _layout.validate(*tensors, self.block)
            except (TypeError, ValueError) as err:
                raise type(err)(f"the mapping's layout is invalid (a buffer edited in place?): {err}") from err
            b = self.block
            if tuple(blocks.shape) != (tensors[1].numel(), b, b):
                raise ValueError(f"mapping.blocks must have shape {(tensors[1].numel(), b, b)}, got {tuple(blocks.shape)}")
        return bsr_skip_add(x, blocks.to(x.dtype), *tensors, branch, alpha)

    @property
    def density(self) -> float:
        return self.layout.density

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        crow, col = state_dict.get(prefix + "crow_indices"), state_dict.get(prefix + "col_indices")
        if crow is not None or col is not None:  # the layout as it will be after the load
            crow = self.crow_indices if crow is None else crow
            col = self.col_indices if col is None else col
            try:
                layout = BlockLayout(crow, col, self.block, (self.out_features, self.in_features))
            except (TypeError, ValueError) as err:
                raise ValueError(f"invalid block layout in state_dict at '{prefix}': {err}") from err
            expected = (layout.nnzb, self.block, self.block)
            if parametrize.is_parametrized(self, "blocks"):
                current = tuple(self.parametrizations.blocks.original.shape)
                if current != expected:
                    raise ValueError(f"state_dict layout at '{prefix}' has {layout.nnzb} blocks; this mapping has {current[0]}")
            else:
                blocks = state_dict.get(prefix + "blocks")
                if blocks is None:
                    raise ValueError(f"state_dict has a layout at '{prefix}' but no '{prefix}blocks'")
                if tuple(blocks.shape) != expected:
                    raise ValueError(
                        f"state_dict '{prefix}blocks' has shape {tuple(blocks.shape)}, but its layout needs {expected}"
                    )
                if self.blocks.shape != blocks.shape:  # another density: resize before the copy
                    self.blocks.data = self.blocks.new_empty(expected)
            self._set_layout(layout.to(self.crow_indices.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}, nnzb={self.layout.nnzb}, density={self.density:.4g}"


class BatchedCayley(nn.Module):
    """Parametrization keeping a batch of ``b x b`` blocks orthogonal.

    ``blocks = base @ cayley(A - A^T)`` with ``cayley(S) = (I - S)^{-1} (I + S)``, which is
    orthogonal for every skew-symmetric ``S``. ``base`` holds the initial orthogonal
    blocks, so the mapping starts where it was built (``A = 0``). Cost: ``O(nnzb b^3)``
    per forward, ``D b^2`` for a block-diagonal mapping, far below a dense Cayley map.
    """

    def __init__(self, blocks: Tensor):
        super().__init__()
        self.register_buffer("base", blocks.detach().clone())

    def forward(self, a: Tensor) -> Tensor:
        s = a - a.mT
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        return self.base @ torch.linalg.solve(eye - s, eye + s)

    def right_inverse(self, blocks: Tensor) -> Tensor:
        self.base = blocks.detach().clone()
        return torch.zeros_like(blocks)


def _finish(mapping: Mapping, dtype, device) -> Mapping:
    return mapping.to(device=device, dtype=dtype or torch.get_default_dtype())


def identity(dim: int) -> IdentityMapping:
    """``M = I`` (no storage)."""
    return IdentityMapping(dim)


def orthogonal(
    dim: int, *, seed: int = 0, learnable: bool = False, orthogonal_map: str = "cayley", dtype=None, device=None
) -> DenseMapping:
    """Haar-random orthogonal ``D x D`` matrix (QR of a Gaussian, signs fixed by ``diag(R)``).

    Keeps ``|eigenvalues| = 1`` and Jacobian (spectral) norm 1. ``learnable=True``
    registers ``torch.nn.utils.parametrizations.orthogonal`` (``orthogonal_map``,
    trivialized at the initial matrix) so the weight stays orthogonal while it trains.
    """
    mapping = DenseMapping(_haar((_check_dim(dim), dim), seed), learnable=learnable)
    mapping.kind = "orthogonal"
    mapping = _finish(mapping, dtype, device)
    if learnable:
        nn.utils.parametrizations.orthogonal(mapping, "weight", orthogonal_map=orthogonal_map)
    return mapping


def block_orthogonal(
    dim: int, block: int = 32, *, seed: int = 0, learnable: bool = False, dtype=None, device=None
) -> BlockSparseMapping:
    """Block-diagonal ``M`` of Haar-random ``b x b`` orthogonal blocks.

    Exactly orthogonal (``|eigenvalues| = 1``, spectral norm 1) and ``b / D`` dense.
    ``learnable=True`` keeps the blocks orthogonal through :class:`BatchedCayley`.
    """
    dim = _check_dim(dim)
    block = _check_block(dim, block)
    n = dim // block
    layout = BlockLayout(torch.arange(n + 1), torch.arange(n), block, (dim, dim))
    mapping = BlockSparseMapping(layout, _haar((n, block, block), seed), learnable=learnable)
    mapping.kind = "block_orthogonal"
    mapping = _finish(mapping, dtype, device)
    if learnable:
        parametrize.register_parametrization(mapping, "blocks", BatchedCayley(mapping.blocks))
    return mapping


def permutation(dim: int, *, seed: int = 0, device=None) -> PermutationMapping:
    """A random permutation matrix: orthogonal, one non-zero per row (run as a gather)."""
    index = torch.randperm(_check_dim(dim), generator=_generator(seed))
    return PermutationMapping(index).to(device=device)


def _normalized(values: Tensor, layout: BlockLayout, normalize: str | None) -> Tensor:
    if normalize is None:
        return values
    if normalize != "spectral":
        raise ValueError(f"normalize must be 'spectral' or None, got {normalize!r}")
    return values / spectral_norm(layout.to_dense(values))


def _blocks_per_row(dim: int, block: int, density) -> int:
    """``k = max(1, round(density * D / b))`` stored blocks per block row; warns at ``k = 1``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    n = dim // block
    k = min(n, max(1, round(density * n)))
    if k == 1:
        warnings.warn(
            f"sparse(dim={dim}, density={density}, block={block}) has one block per block row "
            f"({n} block rows): the mapping is the identity; raise the density or lower the block size",
            UserWarning,
            stacklevel=3,
        )
    return k


def _random_mask(n: int, k: int, gen: torch.Generator) -> BlockLayout:
    """The diagonal plus ``k - 1`` uniformly drawn other blocks in every block row (``construction="random"``)."""
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(n):
        others = torch.randperm(n - 1, generator=gen)[: k - 1]
        mask[i, others + (others >= i).long()] = True
    return mask


def _unipotent_mask(n: int, k: int, gen: torch.Generator) -> Tensor:
    """The diagonal plus, in block row ``i``, ``min(k - 1, rank(i))`` blocks of columns earlier
    in a random order of the block indices (``rank(i)`` = position of ``i`` in that order,
    the least-used columns first): strictly block-triangular off the diagonal in that order."""
    order = torch.randperm(n, generator=gen)
    mask = torch.eye(n, dtype=torch.bool)
    uses = torch.zeros(n)
    for position in range(1, n):
        earlier = order[:position]
        # The least-used earlier columns first (random ties): even column loads keep ||N|| low.
        rank = uses[earlier] + torch.rand(position, generator=gen)
        chosen = earlier[rank.argsort()[: k - 1]]
        mask[order[position], chosen] = True
        uses[chosen] += 1
    return mask


SPARSE_CONSTRUCTIONS = ("unipotent", "random")


def sparse(
    dim: int,
    density: float = 0.125,
    block: int = 32,
    *,
    seed: int = 0,
    strength: float = 0.15,
    construction: str = "unipotent",
    normalize: str | None = "auto",
    learnable: bool = False,
    dtype=None,
    device=None,
) -> BlockSparseMapping:
    """The Entangled paper's sparse mapping: identity diagonal blocks plus ``b x b`` blocks
    that mix channel groups, stored block-sparse (``k = max(1, round(density * D / b))``
    blocks in a full block row).

    ``construction="unipotent"`` (default): ``M = I + strength * N`` with ``N``
    strictly block-triangular in a random order of the block indices (block row ``i``
    gets up to ``k - 1`` off-diagonal blocks, each a Haar-random orthogonal ``b x b``
    block; the first ``k - 1`` rows of that order have fewer, so the density is
    ``(n k - k (k - 1) / 2) / n^2`` for ``n = D / b`` block rows). ``N`` is rescaled
    so that ``||N||_F = sqrt(D)``, hence ``||M - I||_F / sqrt(D) = strength`` exactly.
    Kept from the identity: **every eigenvalue is exactly 1** (``M`` is unipotent,
    ``det M = 1``), the diagonal blocks are ``I`` and the sparsity is block-sparse.
    Given up: orthogonality; the spectral norm is at least 1 (the singular values
    multiply to ``|det M| = 1``) and grows with ``strength``: at the default 0.15 it is
    1.15-1.23 for 8 to 32 block rows and densities 1/8 to 1/2 (0.1: about 1.1; 0.25:
    1.25-1.35). ``strength`` trades how much the mapping mixes channel groups against
    how far its Jacobian norm leaves 1.

    ``construction="random"`` (entskip's earlier default; for old checkpoints and results): every block
    row holds the diagonal ``I`` and exactly ``k - 1`` uniformly drawn off-diagonal
    blocks of ``N(0, 1 / (k b))`` entries. With ``normalize="spectral"`` (its default)
    the matrix is divided by its spectral norm: Jacobian norm 1, but eigenvalue moduli
    about 0.1-0.8, a contracting skip. ``strength`` does not apply to it.

    ``normalize``: ``"auto"`` (``None`` for ``"unipotent"``, ``"spectral"`` for
    ``"random"``), ``"spectral"`` (divide by the spectral norm) or ``None``.

    A density giving one block per block row makes ``M = I``: a ``UserWarning`` says
    so. Block sizes 16, 32 and 64 are the ones the GPU kernels are tuned for; any
    block dividing ``dim`` is accepted. Checkpoints of either construction load into
    either (the layout comes with the ``state_dict``).
    """
    dim = _check_dim(dim)
    block = _check_block(dim, block)
    if construction not in SPARSE_CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {SPARSE_CONSTRUCTIONS}, got {construction!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength < math.inf:
        raise ValueError(f"strength must be a non-negative finite number, got {strength!r}")
    if normalize == "auto":
        normalize = None if construction == "unipotent" else "spectral"
    if normalize not in (None, "spectral"):
        raise ValueError(f"normalize must be 'auto', 'spectral' or None, got {normalize!r}")
    k = _blocks_per_row(dim, block, density)
    n = dim // block
    gen = _generator(seed)
    if construction == "random":
        layout = BlockLayout.from_mask(_random_mask(n, k, gen), block)
        values = torch.randn(layout.nnzb, block, block, generator=gen, dtype=torch.float64) / math.sqrt(k * block)
    else:
        layout = BlockLayout.from_mask(_unipotent_mask(n, k, gen), block)
        values = _haar((layout.nnzb, block, block), int(torch.randint(2**62, (1,), generator=gen)))
        off = layout.nnzb - n
        if off:
            values *= strength * math.sqrt(dim / (off * block))  # ||N||_F^2 = off * b -> strength^2 * D
    values[reference.block_rows(layout.crow_indices) == layout.col_indices] = torch.eye(block, dtype=torch.float64)
    mapping = BlockSparseMapping(layout, _normalized(values, layout, normalize), learnable=learnable)
    mapping.kind = "sparse"
    return _finish(mapping, dtype, device)


def structural(
    dim: int,
    rho: float = 0.1,
    bandwidth: int | None = None,
    block: int = 32,
    *,
    normalize: str | None = None,
    learnable: bool = False,
    dtype=None,
    device=None,
) -> BlockSparseMapping:
    """A banded Toeplitz correlation matrix ``C_ij = rho^|i-j|`` for ``|i-j| <= bandwidth``.

    Symmetric, positive definite (checked; a band that breaks it raises
    ``ValueError``), stored block-banded; ``bandwidth`` defaults to ``block``.
    ``rho`` is the strength: ``||C - I||_F / sqrt(D)`` is about
    ``rho * sqrt(2 / (1 - rho^2))``.

    ``normalize=None`` (default): the correlation matrix itself. Kept from the identity:
    the unit diagonal, so the **mean eigenvalue is exactly 1** (``tr C / D``), all
    eigenvalues real and positive, in about ``[(1 - rho) / (1 + rho), (1 + rho) / (1 - rho)]``
    (0.82-1.22 at the default ``rho = 0.1``), symmetry (a gradient-flow-preserving
    positive-definite Jacobian). Given up: the spectral norm exceeds 1 (about
    ``(1 + rho) / (1 - rho)``).

    ``normalize="spectral"``: divided by the spectral norm (Jacobian norm 1, diagonal
    ``1 / lambda_max``); the mean eigenvalue then falls to about ``(1 - rho) / (1 + rho)``
    (0.33 at ``rho = 0.5``): a contracting low-pass filter over the channel order.
    ``structural(dim, rho=0.5, normalize="spectral")`` is entskip's earlier
    default (for old checkpoints and results). Deterministic: there is nothing random to seed.
    """
    dim = _check_dim(dim)
    block = _check_block(dim, block)
    bandwidth = block if bandwidth is None else bandwidth
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
        raise ValueError(f"bandwidth must be a non-negative int, got {bandwidth!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not -1 < rho < 1:
        raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
    idx = torch.arange(dim)
    lag = (idx[:, None] - idx[None, :]).abs()
    dense = torch.where(lag <= bandwidth, torch.tensor(float(rho), dtype=torch.float64) ** lag, 0.0)
    if torch.linalg.cholesky_ex(dense).info != 0:
        raise ValueError(f"structural(rho={rho}, bandwidth={bandwidth}) is not positive definite")
    n = dim // block
    bidx = torch.arange(n)
    block_gap = ((bidx[:, None] - bidx[None, :]).abs() * block - (block - 1)).clamp_min(0)
    layout = BlockLayout.from_mask(block_gap <= bandwidth, block)
    mapping = BlockSparseMapping(layout, _normalized(layout.gather(dense), layout, normalize), learnable=learnable)
    mapping.kind = "structural"
    return _finish(mapping, dtype, device)


MAPPINGS = {
    "identity": identity,
    "orthogonal": orthogonal,
    "block_orthogonal": block_orthogonal,
    "permutation": permutation,
    "sparse": sparse,
    "structural": structural,
}


def make(name: str, dim: int, **kwargs) -> Mapping:
    """Build a mapping by name (a key of :data:`MAPPINGS`) with its constructor's keywords."""
    if name not in MAPPINGS:
        raise ValueError(f"unknown mapping {name!r}; choose one of {sorted(MAPPINGS)}")
    return MAPPINGS[name](dim, **kwargs)
