"""How the Triton kernels are tuned and launched: autotune keys, ``ENTSKIP_AUTOTUNE``,
the device guard, and layouts made under ``torch.inference_mode()``.

Without a GPU the kernels run in the interpreter (``TRITON_INTERPRET=1``, set by conftest)
on CPU tensors and small shapes. Each test clears the autotuner's cache of the kernel it
watches, so it sees its own tuning whatever ran before.
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

import entskip
from entskip import bsr_skip, gpu_dispatch, reference

from conftest import assert_close, random_layout

pytestmark = [
    pytest.mark.skipif(not gpu_dispatch.triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs a GPU or TRITON_INTERPRET=1"),
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernels():
    return gpu_dispatch.triton_kernels()


def _rand(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def _alpha():
    return torch.tensor(0.7, device=DEVICE)


def _banded_layout(dim: int, block: int, per_row: int) -> entskip.BlockLayout:
    """``per_row`` blocks in every block row (a cyclic band)."""
    n = dim // block
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, [(i + j) % n for j in range(per_row)]] = True
    return entskip.BlockLayout.from_mask(mask, block).to(DEVICE)


def _bsr_problem(layout, n=8, seed=0):
    b = layout.block
    values = _rand(layout.nnzb, b, b, seed=seed)
    x, branch = _rand(n, layout.shape[1], seed=seed + 1), _rand(n, layout.shape[0], seed=seed + 2)
    return x, values, branch


def _bsr_reference(layout, x, values, branch, alpha):
    return reference.bsr_skip_add(x.double(), values.double(), layout.crow_indices, layout.col_indices,
                                  branch.double(), alpha.double())


def _record_launches(monkeypatch, kernel):
    """Every launch of ``kernel``'s compiled function: ``(config kwargs, num_warps, num_stages, constexprs)``."""
    launches = []
    real = kernel.fn.run

    def run(*args, **kwargs):
        launches.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel.fn, "run", run)
    return launches


def _config_of(launch, tile: str):
    return launch[tile], launch["num_warps"], launch["num_stages"]


def _shape(config, tile: str):
    return config.kwargs[tile], config.num_warps, config.num_stages


class _Reads(dict):
    """A dict that records which keys are read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_autotune_keys_hold_every_argument_the_fits_rules_read(kernels):
    """Pruning runs once per key: an argument that changes which configs fit must be in it
    (the tensors' dtypes are in triton's key already)."""
    tuned = [(kernels.bsr_skip._block_row_kernel, kernels.bsr_skip.block_row_fits),
             (kernels.bsr_skip._sampled_kernel, kernels.bsr_skip.sampled_fits),
             (kernels.dense_skip._matmul_kernel, kernels.dense_skip.matmul_fits)]
    for kernel, fits in tuned:
        read = set()
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for precision in ("ieee", "tf32"):
                for block in (16, 32, 64):
                    for has_dot in (False, True):
                        args = _Reads({"a_ptr": torch.empty(0, dtype=dtype), "B": block, "PRECISION": precision,
                                       "HAS_DOT": has_dot})
                        for config in kernel.configs:
                            fits(config, args)
                        read |= args.read
        assert read - {"a_ptr"} <= set(kernel.keys), f"{kernel.base_fn.__name__}: key {kernel.keys}, fits reads {read}"


def test_block_size_is_part_of_the_key(kernels, monkeypatch):
    """After a b=16 call, a float32 b=64 call with the same (D_in, D_out, density) key must
    run only configs that fit b=64 (it used to reuse b=16's winner: BM=64 w4 s3)."""
    monkeypatch.setenv("ENTSKIP_AUTOTUNE", "once")
    kernel = kernels.bsr_skip._block_row_kernel
    kernel.cache.clear()
    small, big = _banded_layout(128, 16, per_row=2), _banded_layout(128, 64, per_row=2)
    assert kernels.bsr_skip._density_key(small.nnzb, 8) == kernels.bsr_skip._density_key(big.nnzb, 2)
    alpha = _alpha()
    x, values, branch = _bsr_problem(small)
    kernels.bsr_skip.forward(x, values, small.crow_indices, small.col_indices, alpha, branch)

    launches = _record_launches(monkeypatch, kernel)
    x, values, branch = _bsr_problem(big, seed=3)
    y = kernels.bsr_skip.forward(x, values, big.crow_indices, big.col_indices, alpha, branch)
    args = {"a_ptr": x, "B": 64, "PRECISION": kernels.tuning.precision(x.dtype)}
    fitting = {_shape(c, "BM") for c in kernel.configs if kernels.bsr_skip.block_row_fits(c, args)}
    assert launches and {_config_of(launch, "BM") for launch in launches} <= fitting
    assert_close(y, _bsr_reference(big, x, values, branch, alpha), torch.float32, "y")


def test_dense_batch_sizes_share_a_tuned_config(kernels, monkeypatch):
    """Row counts are bucketed to the next power of two: a new batch size in the same bucket
    does not tune again."""
    monkeypatch.setenv("ENTSKIP_AUTOTUNE", "once")
    kernel = kernels.dense_skip._matmul_kernel
    kernel.cache.clear()
    weight, alpha = _rand(32, 48, seed=1) / 7, _alpha()
    for n in (33, 40, 64):
        x, branch = _rand(n, 48, seed=n), _rand(n, 32, seed=n + 1)
        y = kernels.dense_skip.forward(x, weight, alpha, branch)
        assert_close(y, reference.skip_add(x.double(), weight.double(), branch.double(), alpha.double()),
                     torch.float32, f"y (N={n})")
    assert len(kernel.cache) == 1
    x = _rand(65, 48, seed=65)
    kernels.dense_skip.forward(x, weight, alpha, None)
    assert len(kernel.cache) == 2


@pytest.fixture
def timings(kernels, monkeypatch):
    """Replaces the GPU benchmarker: records each timed call and reports decreasing times,
    so the last config timed is the fastest."""
    timed = []

    def benchmark(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [100.0 - len(timed)] * len(quantiles)

    monkeypatch.setattr(kernels.tuning, "_benchmark", benchmark)
    return timed


@pytest.mark.parametrize("mode", ["bench", "once", "first"])
def test_autotune_modes(kernels, monkeypatch, timings, poisoned, mode):
    """``once`` runs every config that fits once and ``first`` only the first, neither timed;
    ``bench`` times every config that fits and keeps the fastest. Results match the reference."""
    monkeypatch.setenv("ENTSKIP_AUTOTUNE", mode)
    kernel = kernels.bsr_skip._block_row_kernel
    kernel.cache.clear()
    layout = random_layout(64, 64, 16, 0.5, seed=4).to(DEVICE)
    x, values, branch = _bsr_problem(layout, n=40)
    alpha = _alpha()
    launches = _record_launches(monkeypatch, kernel)
    y = kernels.bsr_skip.forward(x, values, layout.crow_indices, layout.col_indices, alpha, branch)

    args = {"a_ptr": x, "B": 16, "PRECISION": kernels.tuning.precision(x.dtype)}
    fitting = [_shape(c, "BM") for c in kernel.configs if kernels.bsr_skip.block_row_fits(c, args)]
    ran = [_config_of(launch, "BM") for launch in launches]
    assert len(fitting) >= 3
    if mode == "bench":
        assert len(timings) == len(fitting) and ran[-1] == fitting[-1]
    elif mode == "once":
        assert timings == [] and set(ran) == set(fitting) and ran[-1] == fitting[0]
    else:
        assert timings == [] and set(ran) == {fitting[0]}
    assert_close(y, _bsr_reference(layout, x, values, branch, alpha), torch.float32, "y")


def test_autotune_mode_errors(kernels, monkeypatch):
    layout = random_layout(64, 64, 16, 0.5, seed=4).to(DEVICE)
    x, values, branch = _bsr_problem(layout)
    kernel = kernels.bsr_skip._block_row_kernel

    def forward():
        kernel.cache.clear()
        kernels.bsr_skip.forward(x, values, layout.crow_indices, layout.col_indices, _alpha(), branch)

    monkeypatch.setenv("ENTSKIP_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="ENTSKIP_AUTOTUNE must be one of bench, once, first or unset, got 'fast'"):
        forward()
    if kernels.tuning.interpreting():
        monkeypatch.setenv("ENTSKIP_AUTOTUNE", "bench")
        with pytest.raises(ValueError, match="under TRITON_INTERPRET=1 use once or first"):
            forward()
    monkeypatch.setenv("ENTSKIP_AUTOTUNE", "")  # empty: the default
    forward()


def test_launchers_enter_the_device_guard_of_their_tensors(kernels, monkeypatch):
    """Each launcher runs under ``device_guard`` of its first tensor (Triton launches on the
    current device). The guard switches devices only for CUDA tensors: see the next test."""
    seen = []

    def guard(tensor):
        seen.append(tensor.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(kernels.tuning, "device_guard", guard)
    layout = random_layout(64, 64, 16, 0.5, seed=4).to(DEVICE)
    x, values, branch = _bsr_problem(layout, n=5)
    alpha, grad = _alpha(), _rand(5, 64, seed=9)
    kernels.bsr_skip.forward(x, values, layout.crow_indices, layout.col_indices, alpha, branch)
    kernels.bsr_skip.backward(grad, x, values, *layout.tensors(), alpha, [True, True, True])
    weight = layout.to_dense(values)
    kernels.dense_skip.forward(x, weight, alpha, branch)
    kernels.dense_skip.backward(grad, x, weight, alpha, [True, True, True])
    assert seen == [x.device] * 4


def test_device_guard_enters_the_cuda_device_of_the_tensor(kernels, monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with kernels.tuning.device_guard(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with kernels.tuning.device_guard(torch.zeros(1)):  # CPU (interpreter): no device switch
        pass
    assert entered == [torch.device("cuda", 1)]


def test_layouts_made_under_inference_mode(monkeypatch):
    """Inference tensors have no version counter: their layouts are validated once and then
    remembered by identity, inside and outside inference mode."""
    calls = []
    real = entskip.layout.BlockLayout.__init__
    monkeypatch.setattr(entskip.layout.BlockLayout, "__init__", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.inference_mode():
        layout = random_layout(64, 64, 16, 0.5, seed=5).to(DEVICE)
        x, values, branch = _bsr_problem(layout)
        assert layout.crow_indices.is_inference()
        calls.clear()
        y = bsr_skip.gpu_forward(x, values, *layout.tensors(), _alpha(), branch, backend="triton")
        bsr_skip.gpu_backward(branch, x, values, *layout.tensors(), _alpha(), [True, True, True], backend="triton")
    again = bsr_skip.gpu_forward(x, values, *layout.tensors(), _alpha(), branch, backend="triton")
    assert calls == []  # validated when it was built (under inference mode): the calls only look it up
    expected = _bsr_reference(layout, x, values, branch, _alpha())
    assert_close(y, expected, torch.float32, "y")
    assert_close(again, expected, torch.float32, "y outside inference mode")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the launch runs on cuda:1."""
    device = torch.device("cuda", 1)
    layout = random_layout(64, 64, 16, 0.5, seed=6).to(device)
    x, values, branch = (t.to(device) for t in _bsr_problem(layout))
    alpha = _alpha().to(device)
    with torch.cuda.device(0):
        y = bsr_skip.gpu_forward(x, values, *layout.tensors(), alpha, branch, backend="triton")
        y_dense = gpu_dispatch.triton_kernels().dense_skip.forward(x, layout.to_dense(values), alpha, branch)
    expected = _bsr_reference(layout, x, values, branch, alpha)
    assert y.device == device
    assert_close(y, expected, torch.float32, "y")
    assert_close(y_dense, expected, torch.float32, "dense y")
