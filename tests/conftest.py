"""Shared fixtures and helpers for the entskip tests.

``poisoned`` turns on PyTorch's deterministic mode, in which every ``empty`` tensor
(including the outputs the C++ kernels allocate) is filled with NaN: an output element
a kernel forgets to write then fails the comparison with the reference.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic mode (``poisoned``) on CUDA: older torch raises in cuBLAS calls unless cuBLAS has a
# fixed workspace. cuBLAS reads the variable when its first handle is made, so it is set here.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import entskip
from entskip import mappings

# A test file whose skips are failures when its variable is 1 (the CUDA-torch CI stage sets them:
# there timm, torchvision and the CUDA build are installed, so a skip would hide a missing piece).
# Only the "needs a CUDA GPU" skip stays a skip, on a machine without one.
MUST_RUN = {"ENTSKIP_REQUIRE_TIMM": "test_timm_torchvision.py", "ENTSKIP_REQUIRE_CUDA_BUILD": "test_cuda_build.py"}
NO_GPU_REASON = "needs a CUDA GPU"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    required = [var for var, name in MUST_RUN.items() if item.path.name == name and os.environ.get(var) == "1"]
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if required and not (reason.endswith(NO_GPU_REASON) and not torch.cuda.is_available()):
        report.outcome = "failed"
        report.longrepr = f"skipped, but {required[0]}=1 requires it to run: {reason}"


# Relative tolerance per dtype (scaled by the reference's largest magnitude).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def poisoned():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    assert torch.empty(4).isnan().all(), "poisoning is not active"
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def cpu_backend():
    if not entskip.native_available():
        pytest.fail(f"entskip._C did not load: {entskip.backends.NATIVE_ERROR}")
    with entskip.use_backend("cpu"):
        yield


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", scale: float | None = None
) -> None:
    """``|actual - expected| <= rtol * scale`` elementwise, with ``rtol`` of ``dtype``.

    ``scale`` defaults to ``max(|expected|, 1)``; a reduction whose terms cancel passes
    the sum of the terms' magnitudes instead (its condition).
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    if scale is None:
        scale = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
    torch.testing.assert_close(a, e, rtol=0, atol=RTOL[dtype] * scale, msg=lambda m: f"{what} ({dtype}): {m}")


def random_layout(rows: int, cols: int, block: int, density: float, seed: int, empty_row: bool = False):
    """A random (possibly rectangular) BlockLayout; with ``empty_row`` block row 0 has no blocks."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows // block, cols // block, generator=gen) < density
    if empty_row:
        mask[0] = False
    return entskip.BlockLayout.from_mask(mask, block)


def make_mapping(kind: str, dim: int, block: int, seed: int = 0, out_dim: int | None = None) -> mappings.Mapping:
    """A float64 mapping of each kind the tests cover."""
    out_dim = dim if out_dim is None else out_dim
    f64 = dict(dtype=torch.float64)
    if kind == "orthogonal":
        return mappings.orthogonal(dim, seed=seed, **f64)
    if kind == "dense_rect":
        gen = torch.Generator().manual_seed(seed)
        return mappings.DenseMapping(torch.randn(out_dim, dim, generator=gen, dtype=torch.float64))
    if kind == "dense_colmajor":  # a non-contiguous weight (column-major, as torch.linalg.qr returns)
        gen = torch.Generator().manual_seed(seed)
        m = mappings.DenseMapping(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        m.weight = m.weight.t().contiguous().t()
        assert not m.weight.is_contiguous()
        return m
    if kind == "sparse":  # at least two blocks per block row, so blocks really mix
        return mappings.sparse(dim, density=min(1.0, max(0.3, 2.5 * block / dim)), block=block, seed=seed, **f64)
    if kind == "sparse_full":
        return mappings.sparse(dim, density=1.0, block=block, seed=seed, **f64)
    if kind == "structural":
        return mappings.structural(dim, rho=0.4, bandwidth=block, block=block, **f64)
    if kind == "block_orthogonal":
        return mappings.block_orthogonal(dim, block=block, seed=seed, **f64)
    if kind == "bsr_rect":  # rectangular, random blocks, an empty block row
        layout = random_layout(out_dim, dim, block, 0.4, seed, empty_row=True)
        gen = torch.Generator().manual_seed(seed + 1)
        return mappings.BlockSparseMapping(layout, torch.randn(layout.nnzb, block, block, generator=gen, dtype=torch.float64))
    if kind == "identity":
        return mappings.identity(dim)
    if kind == "permutation":
        return mappings.permutation(dim, seed=seed)
    raise ValueError(kind)


def stored_tensor(mapping: mappings.Mapping) -> torch.Tensor | None:
    """The tensor that stores ``M`` (dense ``weight`` or BSR ``blocks``); ``None`` for identity/permutation."""
    if isinstance(mapping, mappings.DenseMapping):
        return mapping.weight
    if isinstance(mapping, mappings.BlockSparseMapping):
        return mapping.blocks
    return None


def mapping_matrix(mapping: mappings.Mapping) -> torch.Tensor:
    return mapping.matrix().detach().double()


class OpLog(TorchDispatchMode):
    """Records every op that reaches the dispatcher's Python mode (``ops``), and those with a
    tensor argument of more than one element (``big``: not the checks of a 0-d alpha)."""

    def __init__(self):
        super().__init__()
        self.ops, self.big = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.numel() > 1 for t in flat):
            self.big.append(str(func))
        return func(*args, **(kwargs or {}))
