"""Public functional API: :func:`skip_add`.

    y = alpha * (x @ M^T) + branch

``x`` is ``(..., D_in)`` (or has its features along ``feature_dim``, e.g. ``1`` for
``(N, C, H, W)`` activations), ``branch`` has ``x``'s shape with ``D_out`` features
(or is ``None``), ``alpha`` is a float or a 0-d floating tensor. The op runs on the
backend chosen by :mod:`entskip.backends`; every backend computes the same function
and supports autograd and ``torch.compile(fullgraph=True)``.

``alpha`` is applied in the op's compute dtype: float64 for float64 ``x``, else float32
(reduced precisions accumulate in float32). It must be finite in that dtype: a float
(or a CPU tensor) that is not, ``1e39`` for float32 ``x`` say, raises ``ValueError``
before anything runs. A CUDA tensor ``alpha`` is checked without a synchronisation, by
``torch._assert_async``: a non-finite one trips a device-side assertion that surfaces as
a ``RuntimeError`` at the next synchronisation (and leaves the CUDA context unusable).
Under ``torch.compile`` a tensor ``alpha`` is not checked.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import backends, devices, direct_calls
from .bsr_skip import bsr_skip_add
from .dense_skip import dense_skip_add
from .identity_skip import identity_skip_add
from .layout import BlockLayout
from .mappings import Mapping


Run = Callable[[Tensor, Tensor | None, Tensor], Tensor]


class _Bound(NamedTuple):
    """A mapping argument bound to ``x``: its features (``None``: ``x``'s, the identity) and
    ``run(x, branch, alpha)``, which takes ``(rows, D)`` activations; features-first
    ``(N, D, S)`` ones too where ``features_first``, ``(..., D)`` of any rank where ``any_rank``."""

    in_features: int | None
    out_features: int | None
    run: Run
    features_first: bool
    any_rank: bool


def _bound(mapping, x: Tensor) -> _Bound:
    """The :class:`_Bound` of a mapping argument (a Mapping, a dense or BSR tensor, ``None``) for ``x``."""
    if isinstance(mapping, Mapping):
        return _Bound(mapping.in_features, mapping.out_features, mapping.skip_add_2d, mapping.features_first,
                      mapping.any_rank)
    if mapping is None:
        return _Bound(None, None, identity_skip_add, True, True)  # elementwise: any format
    if not isinstance(mapping, Tensor):
        raise TypeError(f"mapping must be an entskip Mapping, a tensor or None, got {type(mapping).__name__}")
    devices.check_same(x, mapping=mapping)
    if mapping.layout == torch.sparse_bsr:
        values = mapping.values()
        if mapping.dim() != 2 or values.dim() != 3:
            raise ValueError(
                f"a BSR mapping must be a 2-D (D_out, D_in) matrix with blocks values (nnzb, b, b), got shape "
                f"{tuple(mapping.shape)} with values {tuple(values.shape)}: batched and hybrid BSR tensors are not supported"
            )
        if values.shape[1] != values.shape[2]:
            raise ValueError(f"a BSR mapping's blocks must be square (b x b), got {values.shape[1]} x {values.shape[2]} blocks")
        b = values.shape[-1]
        layout = BlockLayout(mapping.crow_indices(), mapping.col_indices(), b, tuple(mapping.shape))
        _check_floating(values, "mapping values")
        if tuple(values.shape) != (layout.nnzb, b, b):
            raise ValueError(f"mapping values must have shape {(layout.nnzb, b, b)} for its layout, got {tuple(values.shape)}")

        def run(x, branch, alpha):
            return bsr_skip_add(x, values.to(x.dtype), *layout.tensors(), branch, alpha)

        return _Bound(layout.shape[1], layout.shape[0], run, True, False)
    _check_floating(mapping, "mapping")
    if mapping.dim() != 2:
        raise ValueError(f"mapping must be a 2-D (D_out, D_in) matrix, got shape {tuple(mapping.shape)}")
    return _Bound(mapping.shape[1], mapping.shape[0],
                  lambda x, branch, alpha: dense_skip_add(x, mapping.to(x.dtype), branch, alpha), True, False)


def _check_floating(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a strided (dense) tensor, got layout {t.layout}")


_AUTOCAST_DEVICES = ("cpu", "cuda")  # autocast is available for these without asking


def _autocast(x: Tensor, branch: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Under ``torch.autocast`` for ``x``'s device, ``x`` and ``branch`` in the autocast dtype.

    Like autocast's lower-precision ops (``matmul``, ``linear``), floating inputs other
    than float64 are cast, so the op runs in the autocast dtype even when ``x`` is a
    float32 residual stream and ``branch`` comes from an autocast Linear. The cast is
    differentiable: gradients reach ``x`` and ``branch`` in their own dtypes.
    """
    device_type = x.device.type
    if device_type not in _AUTOCAST_DEVICES and not torch.amp.is_autocast_available(device_type):
        return x, branch
    if not torch.is_autocast_enabled(device_type):
        return x, branch
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor | None) -> Tensor | None:
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(x), cast(branch)


# Round to nearest even takes a float to float32's inf from the midpoint between its largest
# finite value, 2^128 - 2^104, and 2^128 on.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def _finite_float(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` is finite once rounded to ``dtype`` (float32 or float64)."""
    return math.isfinite(value) and (dtype == torch.float64 or abs(value) < _FLOAT32_OVERFLOW)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # not a fake or traced tensor: .item() is a real value


def _check_finite_tensor(alpha: Tensor, dtype: torch.dtype) -> None:
    """``alpha`` finite in ``dtype``: eagerly on the CPU, by a device-side assertion on a GPU."""
    if torch.compiler.is_compiling():
        return
    device_type = alpha.device.type
    if device_type == "cpu":
        if type(alpha) in _PLAIN_TENSORS and not _finite_float(alpha.item(), dtype):
            raise ValueError(f"alpha must be finite in {dtype} (the op's compute dtype), got {alpha.item()!r} ({alpha.dtype})")
    elif device_type != "meta":
        torch._assert_async(torch.isfinite(alpha.detach().to(dtype)), f"alpha must be finite in {dtype} (got NaN or Inf)")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``alpha`` is applied in: float64 for float64 ``x``, else float32 (like a
    module's alpha; float64 ``x`` must not see a rounded alpha)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _alpha_tensor(alpha, x: Tensor) -> Tensor:
    """``alpha`` as a 0-d tensor on ``x``'s device (a float: in the compute dtype, float64
    for float64 ``x``, else float32), checked finite in the compute dtype."""
    dtype = _compute_dtype(x)
    if isinstance(alpha, Tensor):  # the checks in the order that is cheapest for a valid alpha
        if alpha.dim() != 0:
            if alpha.dim() > 1 or alpha.numel() != 1:
                raise ValueError(f"alpha must be a float or a 0-d tensor, got shape {tuple(alpha.shape)}")
            alpha = alpha.view(())
        if not alpha.dtype.is_floating_point:
            raise TypeError(f"alpha must be floating point, got {alpha.dtype}")
        if alpha.device != x.device:
            devices.check_same(x, alpha=alpha)
        _check_finite_tensor(alpha, dtype)
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or a 0-d tensor, got {type(alpha).__name__}")
    try:
        value = float(alpha)
    except OverflowError:  # an int beyond float64
        value = math.inf
    if not _finite_float(value, dtype):
        raise ValueError(f"alpha must be finite in {dtype} (the op's compute dtype for {x.dtype} x), got {alpha!r}")
    # torch.full, not torch.tensor: no blocking host-to-device copy (legal under CUDA graph capture)
    return torch.full((), value, dtype=dtype, device=x.device)


def _is_plain_elementwise(x, mapping, branch, alpha) -> bool:
    """Whether :func:`skip_add` may run an elementwise mapping (``None``, identity,
    permutation) on features-last ``x`` as it is: every argument well formed, ``alpha``
    a 0-d tensor on ``x``'s device and no autocast. Anything else takes the general path,
    which checks each argument and raises the documented errors."""
    if not (isinstance(x, Tensor) and isinstance(alpha, Tensor) and x.layout == torch.strided and x.dim() > 0
            and x.dtype.is_floating_point and alpha.dim() == 0 and alpha.dtype.is_floating_point
            and alpha.device == x.device and not torch._C._is_any_autocast_enabled()):
        return False
    if mapping is not None and not (isinstance(mapping, Mapping) and mapping.any_rank
                                    and mapping.in_features == mapping.out_features == x.shape[-1]):
        return False
    return branch is None or (isinstance(branch, Tensor) and branch.layout == torch.strided and branch.dtype == x.dtype
                              and branch.device == x.device and branch.shape == x.shape)


def _reshaped_result(y: Tensor, shape) -> Tensor:
    """The op's fresh result ``y`` in ``shape``, without a copy and not as a view of ``y``
    (``aten._unsafe_view``, as ``torch.matmul`` returns its batched results): an in-place op
    on it, such as the ReLU(inplace=True) after a ResNet block's skip, is then plain, where
    on a view autograd would rebase it (``CopySlices``) and copy the whole gradient three
    times in the backward. No op saves its result for the backward, so nothing else can see
    it change."""
    if y.is_contiguous():
        return torch.ops.aten._unsafe_view(y, shape)
    return y.reshape(shape)


class _ChannelsLastAlias(torch.autograd.Function):
    """``y (N * H * W, C)``, contiguous, as the ``(N, C, H, W)`` channels_last map over the same
    memory: a tensor of its own for autograd (not a view of ``y``), so that an in-place op on
    it is not rebased (see :func:`_reshaped_result`); its gradient is the map's gradient as
    ``(N * H * W, C)`` rows."""

    @staticmethod
    def forward(ctx, y, shape):
        n, c, h, w = shape
        return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), (n, c, h, w), (h * w * c, 1, w * c, c))

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]), None


def _channels_last_result(y: Tensor, shape) -> Tensor:
    """The op's rows ``y (N * H * W, C)`` as the channels_last ``(N, C, H, W)`` result, without
    a copy: a fresh tensor for autograd where ``y`` needs a gradient (eager, plain tensors),
    else the permuted view (no autograd to rebase an in-place op; under ``torch.compile``
    the graph is functionalised)."""
    n, c, h, w = shape
    if (y.requires_grad and torch.is_grad_enabled() and type(y) is Tensor and y.is_contiguous()
            and not torch.compiler.is_compiling()):
        return _ChannelsLastAlias.apply(y, tuple(shape))
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


def skip_add(
    x: Tensor,
    mapping: Mapping | Tensor | None = None,
    branch: Tensor | None = None,
    alpha: Tensor | float = 1.0,
    *,
    feature_dim: int = -1,
) -> Tensor:
    """``alpha * (x @ M^T) + branch``: an entangled (or depth-decayed) residual skip.

    Args:
        x: ``(..., D_in)`` floating-point activations; any strides.
        mapping: the skip ``M``: an :class:`entskip.mappings.Mapping` (see
            :func:`entskip.mappings.make`), a dense ``(D_out, D_in)`` tensor, a
            ``torch.sparse_bsr_tensor`` (its layout is validated on every call), or
            ``None`` for the identity. A mapping of another dtype is cast to ``x``'s;
            it must be on ``x``'s device.
        branch: the residual branch's output, ``x``'s shape with ``D_out`` features,
            same dtype and device as ``x``; ``None`` for a pure skip product.
            Under ``torch.autocast`` both are first cast to the autocast dtype
            (float64 excepted), so the op runs in it.
        alpha: the skip weight, a float or a 0-d (or one-element) floating tensor on
            ``x``'s device (learnable if it requires grad), finite in the compute dtype.
        feature_dim: the dimension of ``x`` and ``branch`` that holds the features
            (``1`` for ``(N, C, H, W)``). Free (no copy of ``x``) for ``channels_last``
            tensors, which run features last, and for contiguous ones (``NCHW``), which
            run the ops' features-first format on the ``(N, C, H * W)`` view (on CUDA
            tensors the permutation's kernels copy it to features last and back).

    Returns:
        ``x``'s shape with ``D_out`` features, ``x``'s dtype (the autocast dtype
        under ``torch.autocast``); a 4-D result keeps the memory format of ``x``.
    """
    if type(feature_dim) is int and feature_dim == -1:
        if backends.native_cpu and (mapping is None or isinstance(mapping, Mapping)):
            y = direct_calls.plain_cpu_skip_add(x, mapping, branch, alpha)  # checked in C++
            if y is not None:
                return y
        if _is_plain_elementwise(x, mapping, branch, alpha):
            # The common call of an identity or permutation skip, checked in fewer steps: on a
            # ViT-Ti block's 0.1 ms skip, the general path's Python costs a fifth of the op.
            _check_finite_tensor(alpha, _compute_dtype(x))
            return identity_skip_add(x, branch, alpha) if mapping is None else mapping.skip_add_2d(x, branch, alpha)
    _check_floating(x, "x")
    if branch is not None:
        _check_floating(branch, "branch")
    x, branch = _autocast(x, branch)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the features)")
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
        raise TypeError(f"feature_dim must be an int, got {feature_dim!r}")
    fd = feature_dim % x.dim() if -x.dim() <= feature_dim < x.dim() else None
    if fd is None:
        raise ValueError(f"feature_dim {feature_dim} is out of range for x with {x.dim()} dims")
    d_in, d_out, run, takes_features_first, any_rank = _bound(mapping, x)
    if d_in is None:  # identity
        d_in = d_out = x.shape[fd]
    if d_in != x.shape[fd]:
        raise ValueError(f"x has {x.shape[fd]} features along dim {feature_dim}, but the mapping expects {d_in}")
    out_shape = list(x.shape)
    out_shape[fd] = d_out
    if branch is not None:
        if branch.dtype != x.dtype:
            raise TypeError(f"branch has dtype {branch.dtype} but x has dtype {x.dtype}; they must match")
        if branch.device != x.device:
            raise ValueError(f"branch is on {branch.device} but x is on {x.device}")
        if list(branch.shape) != out_shape:
            raise ValueError(f"branch must have shape {tuple(out_shape)} (x's with D_out features), got {tuple(branch.shape)}")
    alpha = _alpha_tensor(alpha, x)

    last = fd == x.dim() - 1
    if last and any_rank:  # an elementwise skip takes x as it is (no reshapes: they cost more than a small op)
        return run(x, branch, alpha)
    xm = x if last else x.movedim(fd, -1)
    if not last and takes_features_first and x.is_contiguous() and not xm.is_contiguous():
        # Features first in memory (a contiguous NCHW map): the op reads the (N, C, H * W)
        # view in place; a branch in another format (channels_last) reaches the op wrapper
        # as a strided view, which it copies into this format.
        n, s = math.prod(x.shape[:fd]), math.prod(x.shape[fd + 1:])
        b3 = None if branch is None else branch.reshape(n, d_out, s)
        if isinstance(mapping, Mapping):
            run = mapping.skip_add_features_first
        return _reshaped_result(run(x.view(n, d_in, s), b3, alpha), out_shape)
    lead = xm.shape[:-1]
    x2 = xm.reshape(-1, d_in)
    b2 = None
    if branch is not None:
        b2 = (branch if last else branch.movedim(fd, -1)).reshape(-1, d_out)
    if last:
        return _reshaped_result(run(x2, b2, alpha), (*lead, d_out))
    y = run(x2, b2, alpha)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last and fd == 1:
        return _channels_last_result(y, out_shape)  # the op's rows are the channels_last map
    y = y.reshape(*lead, d_out).movedim(-1, fd)
    return y if channels_last else y.contiguous()
