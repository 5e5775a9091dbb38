"""Ahead-of-time compilation of every shipped Triton config, without a GPU.

``python -m entskip.triton_kernels.aot [--arch 80 90] [--check]`` compiles each kernel
of :mod:`entskip.triton_kernels` for every dtype, block size and autotune config that
its ``fits`` rule ships, for each GPU architecture, with ``triton.compile`` and a
``GPUTarget`` (docs/gpu.md). It prints one line per build: registers, stack bytes
(spills), shared memory and whether the PTX uses ``wgmma`` (Hopper's warpgroup MMA).
With ``--check`` it exits non-zero on a compile error, a spill, or an sm_90 build of a
16-bit matrix kernel without ``wgmma`` (wgmma multiplies 64-row tiles, so the sampled
dvalues product, whose tiles are ``b x b``, is held to it only for ``b = 64``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import bsr_skip, dense_skip, elementwise_skip, tuning

# (dtype, tl.dot input precision): float32 with and without TF32. float16 builds the same
# tiles as bfloat16 (same size, same MMA shapes); `--dtype fp16` compiles it too.
PRECISIONS = ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"),
              (torch.float64, "ieee"))
DEFAULT_DTYPES = ("bf16", "fp32", "tf32", "fp64")
BLOCKS = (16, 32, 64)


@dataclasses.dataclass
class Build:
    """One compiled (kernel, variant, dtype, block, config, arch)."""

    kernel: str
    dtype: str
    block: int | None
    config: str
    arch: int
    registers: int = -1
    stack: int = -1
    shared: int = -1
    wgmma: bool = False
    expect_wgmma: bool = False
    error: str | None = None

    def problems(self) -> list[str]:
        found = []
        if self.error:
            found.append(f"compile error: {self.error}")
        elif self.stack != 0:
            found.append(f"spills ({self.stack} stack bytes)")
        elif self.expect_wgmma and not self.wgmma:
            found.append("sm_90 build without wgmma")
        return found


def _variants():
    """``(name, autotuner, fits, dtype, types, constexprs, aligned, blocks)`` per kernel variant
    and dtype. As at run time, strides equal to 1 are constexprs and ``aligned`` names the
    integer arguments Triton specializes as multiples of 16 (feature counts)."""
    for dtype, precision in PRECISIONS:
        dt = tuning.triton_dtype(dtype)
        acc = "fp64" if dt == "fp64" else "fp32"
        types = {name: f"*{dt}" for name in ("a_ptr", "v_ptr", "x_ptr", "b_ptr", "branch_ptr", "out_ptr", "c_ptr", "dot_ptr",
                                            "g_ptr", "dx_ptr")}
        types.update({name: "*i64" for name in ("ptr_ptr", "idx_ptr", "perm_ptr", "block_row_ptr", "col_ptr")})
        types.update({"alpha_ptr": "*fp32", "part_ptr": f"*{acc}"})
        common = {"UPCAST": False, "PRECISION": precision}
        # Activation layouts: features-last (features contiguous, one image: IMAGES = 1 and
        # image strides 0) and features-first (positions contiguous, S of any alignment).
        for layout, block_row, sampled in [
            ("", ({"stride_af": 1, "stride_of": 1}, ("stride_an", "stride_as", "stride_on", "stride_os")),
             ({"stride_af": 1, "stride_xf": 1, "IMAGES": 1}, ("stride_an", "stride_as", "stride_xn", "stride_xs"))),
            ("_ff", ({"stride_as": 1, "stride_os": 1}, ("stride_an", "stride_on")),
             ({"stride_as": 1, "stride_xs": 1}, ("stride_an", "stride_xn"))),
        ]:
            ones, aligned = block_row
            aligned = ("D_IN", "D_OUT") + aligned
            # S_KEY (read by the fits rules, unused by the code): 0 features-last, > 0 features-first
            ones = {**ones, "S_KEY": 16 if layout else 0}
            yield (f"block_row/forward{layout}", bsr_skip._block_row_kernel, bsr_skip.block_row_fits, dtype, types,
                   {**common, **ones, "TRANS_V": True, "HAS_PERM": False, "HAS_BRANCH": True}, aligned, BLOCKS)
            yield (f"block_row/dx{layout}", bsr_skip._block_row_kernel, bsr_skip.block_row_fits, dtype, types,
                   {**common, **ones, "TRANS_V": False, "HAS_PERM": True, "HAS_BRANCH": False}, aligned, BLOCKS)
            ones, aligned = sampled
            ones = {**ones, "S_KEY": 16 if layout else 0}
            yield (f"sampled/dvalues{layout}", bsr_skip._sampled_kernel, bsr_skip.sampled_fits, dtype, types,
                   {**common, **ones}, ("D_IN", "D_OUT") + aligned, BLOCKS)
        # Features-last (L = 1, a constexpr at run time):  y = x @ W^T: A = x (N, D_in), B = W^T;
        # dx = g @ W;  S = g^T @ x (dW). Features-first (batch of L = N images, S positions of
        # any alignment): y[n] = W @ x[n];  dx[n] = W^T @ g[n];  S = sum_n g[n] @ x[n]^T.
        # The batch strides are multiples of 16 (D * S with D a multiple of 16, or 0).
        batch = ("stride_al", "stride_bl")
        for name, ones, aligned, flags in [
            ("matmul/forward", ("stride_ak", "stride_bk", "L"), ("N", "K", "stride_am", "stride_bn"), {"HAS_BRANCH": True}),
            ("matmul/dx", ("stride_ak", "stride_bn", "L"), ("N", "K", "stride_am", "stride_bk"), {"HAS_BRANCH": False}),
            ("matmul/dW", ("stride_am", "stride_bn", "L"), ("M", "N", "stride_ak", "stride_bk"),
             {"HAS_BRANCH": False, "HAS_DOT": True, "REDUCE_L": True}),
            ("matmul/forward_ff", ("stride_ak", "stride_bn"), ("M", "K", "stride_am"), {"HAS_BRANCH": True}),
            ("matmul/dx_ff", ("stride_am", "stride_bn"), ("M", "K", "stride_ak"), {"HAS_BRANCH": False}),
            ("matmul/dW_ff", ("stride_ak", "stride_bk"), ("M", "N"),
             {"HAS_BRANCH": False, "HAS_DOT": True, "REDUCE_L": True}),
        ]:
            # L_KEY (read by matmul_fits, unused by the code): 0 features-last, > 0 features-first
            flags = {**common, "HAS_DOT": False, "REDUCE_L": False, "L_KEY": 2 if name.endswith("_ff") else 0, **flags,
                     **{one: 1 for one in ones}}
            yield (name, dense_skip._matmul_kernel, dense_skip.matmul_fits, dtype, types, flags, aligned + batch, (None,))
        if precision == "ieee":  # the elementwise skips: no dot, one fixed tile
            yield from _elementwise_variants(dtype, types, common)


def _elementwise_variants(dtype, types, common):
    """The elementwise-skip kernels (one fixed config each, no autotuning), as ``_variants`` yields them."""
    one = [triton.Config({"ROWS": elementwise_skip.ROWS, "COLS": elementwise_skip.COLS},
                         num_warps=elementwise_skip.NUM_WARPS, num_stages=1)]
    for name, kernel, flags in [
        ("elementwise/fwd", elementwise_skip._forward_kernel, {"HAS_INDEX": False, "HAS_BRANCH": True}),
        ("elementwise/fwd_perm", elementwise_skip._forward_kernel, {"HAS_INDEX": True, "HAS_BRANCH": True}),
        ("elementwise/bwd", elementwise_skip._backward_kernel, {"HAS_INDEX": False, "DX": True, "DA": True}),
        ("elementwise/bwd_perm", elementwise_skip._backward_kernel, {"HAS_INDEX": True, "DX": True, "DA": True}),
    ]:
        yield (name, SimpleNamespace(fn=kernel, configs=one), lambda config, args: True, dtype, types,
               {**common, **flags}, (), (None,))


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}


def _attrs(fn, types: dict[str, str], constexprs: dict, aligned) -> dict:
    """Divisibility by 16 of the pointer and ``aligned`` integer arguments."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name not in constexprs and (types.get(name, "").startswith("*") or name in aligned)}


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` from ``cuobjdump --dump-resource-usage``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    if not regs or not stack:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{out}")
    return int(regs.group(1)), int(stack.group(1))


def _specs(archs, kernels, dtypes, blocks):
    """``(variant index, dtype, block, config index, arch)`` of every shipped build."""
    for v, (name, autotuner, fits, dtype, _types, _flags, _aligned, variant_blocks) in enumerate(_variants()):
        dtype_name = "tf32" if _flags["PRECISION"] == "tf32" else tuning.triton_dtype(dtype)
        if kernels and not any(name.startswith(k) for k in kernels):
            continue
        if dtype_name not in (dtypes or DEFAULT_DTYPES):
            continue
        for block in variant_blocks:
            if blocks and block is not None and block not in blocks:
                continue
            args = {"a_ptr": SimpleNamespace(dtype=dtype), "B": block, **_flags}
            for c, config in enumerate(autotuner.configs):
                if fits(config, args):
                    for arch in archs:
                        yield v, block, c, arch


def _compile(spec) -> Build:
    v, block, c, arch = spec
    name, autotuner, _fits, dtype, types, flags, aligned, _blocks = list(_variants())[v]
    fn, config = autotuner.fn, autotuner.configs[c]
    constexprs = {k: v for k, v in {**flags, **config.kwargs, **({"B": block} if block is not None else {})}.items()
                  if k in fn.arg_names}
    build = Build(name, "tf32" if flags["PRECISION"] == "tf32" else tuning.triton_dtype(dtype), block, f"{config.kwargs} w{config.num_warps} s{config.num_stages}", arch)
    # wgmma multiplies 64-row tiles: the sampled product's b x b tiles use mma.sync for b < 64
    build.expect_wgmma = (arch >= 90 and build.dtype in ("bf16", "fp16") and not name.startswith("elementwise")
                          and (not name.startswith("sampled") or block >= 64))
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs,
                                        attrs=_attrs(fn, types, constexprs, aligned))
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        build.registers, build.stack = _resources(compiled.asm["cubin"])
        build.shared = compiled.metadata.shared
        build.wgmma = "wgmma" in compiled.asm["ptx"]
    except Exception as err:  # reported, and fails --check
        build.error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return build


def builds(archs=(80, 90), kernels=(), dtypes=(), blocks=(), jobs=None):
    """Compile every shipped config (optionally only some kernels, dtypes, blocks) in
    ``jobs`` processes; yields one :class:`Build` each, in order."""
    specs = list(_specs(archs, kernels, dtypes, blocks))
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile, specs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entskip.triton_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, a spill or no wgmma on sm_90")
    parser.add_argument("--kernel", nargs="*", default=[], help="only kernels whose name starts with these")
    parser.add_argument("--dtype", nargs="*", default=[], help=f"these dtypes (bf16 fp16 fp32 tf32 fp64; default: {' '.join(DEFAULT_DTYPES)})")
    parser.add_argument("--block", type=int, nargs="*", default=[], help="only these block sizes")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    opts = parser.parse_args(argv)
    if tuning.interpreting():
        parser.error("unset TRITON_INTERPRET: the AOT check compiles real GPU code")
    start, bad, count = time.time(), 0, 0
    print(f"triton {triton.__version__}, targets sm_{' sm_'.join(map(str, opts.arch))}")
    print(f"{'kernel':18} {'dtype':5} {'b':>4} {'arch':>4} {'regs':>4} {'stack':>5} {'smem':>6} {'wgmma':5} config")
    for build in builds(tuple(opts.arch), opts.kernel, opts.dtype, opts.block, opts.jobs):
        count += 1
        problems = build.problems()
        bad += bool(problems)
        print(f"{build.kernel:18} {build.dtype:5} {build.block or '-':>4} {build.arch:>4} {build.registers:>4} "
              f"{build.stack:>5} {build.shared:>6} {str(build.wgmma):5} {build.config}"
              + (f"  <-- {'; '.join(problems)}" if problems else ""), flush=True)
    print(f"{count} builds, {bad} with problems, {time.time() - start:.0f} s")
    return 1 if opts.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
