"""The CUDA half of ``entskip._C``, checked without a GPU.

With a CUDA build of torch, setup.py builds the CUDA kernels or fails (never a silent CPU-only
build), so here ``entskip._C`` must load with them, every ``entskip::*`` op in the schema
registry must have a CUDA kernel (the public ops: Python, choosing Triton or CUDA C++; the
private ``_cuda_*`` ops: C++), and the library must carry sm_80 and sm_90 machine code plus
compute_90 PTX for newer GPUs. Skipped on a CPU-only torch; the CUDA-torch CI stage sets
``ENTSKIP_REQUIRE_CUDA_BUILD=1``, under which a skip fails (conftest).
"""

from __future__ import annotations

import struct

import pytest
import torch

import entskip
from entskip import backends, gpu_dispatch

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")

# A dispatch key under which a kernel serves CUDA tensors: CUDA itself or a composite.
CUDA_SERVING_KEYS = ("CUDA", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
FATBIN_MAGIC = 0xBA55ED50
PTX, ELF = 1, 2  # fatbin entry kinds


def entskip_ops() -> list[str]:
    """Every ``entskip::*`` operator in the schema registry (the library defines them when it loads)."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("entskip::"))


def test_native_library_loads_with_its_cuda_kernels():
    assert entskip.native_available(), f"entskip._C did not load: {backends.NATIVE_ERROR}"
    assert gpu_dispatch.cuda_kernels_available(), "entskip._C was built without its CUDA kernels"


def test_registry_has_public_and_private_ops():
    ops = entskip_ops()
    assert {"entskip::bsr_skip_add", "entskip::dense_skip_add"} <= set(ops), ops
    assert {"entskip::_cuda_bsr_skip_add", "entskip::_cuda_dense_skip_add"} <= set(ops), ops


@pytest.mark.parametrize("op", entskip_ops())
def test_every_op_has_a_cuda_kernel(op):
    keys = [k for k in CUDA_SERVING_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(op, k)]
    assert keys, f"{op} has no kernel for CUDA tensors (none under {CUDA_SERVING_KEYS})"
    if op.startswith("entskip::_cuda_"):
        assert "CUDA" in keys, f"{op} is a CUDA C++ op without a CUDA kernel"


def _section(path: str, wanted: str) -> bytes:
    """The bytes of ELF64 section ``wanted`` of the shared library at ``path`` (b"" if absent)."""
    data = open(path, "rb").read()
    assert data[:5] == b"\x7fELF\x02", f"{path} is not an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (name offset, file offset, size)
        name, = struct.unpack_from("<I", data, shoff + i * shentsize)
        offset, size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 24)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        if data[strtab + name:data.index(b"\0", strtab + name)].decode() == wanted:
            return data[offset:offset + size]
    return b""


def fatbin_entries(blob: bytes) -> set[tuple[int, int]]:
    """``{(kind, sm)}`` of every entry of the fat binaries in an ``.nv_fatbin`` section.

    Each fat binary: a 16-byte header (magic, version, header size, payload size), then entries,
    each with its own header: kind (1 PTX, 2 ELF) at byte 0, header size at 4, payload size at 8,
    the architecture (e.g. 90 for sm_90 / compute_90) at 28.
    """
    entries, pos = set(), 0
    while pos + 16 <= len(blob):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; padding between them
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            entries.add((kind, arch))
            entry += entry_header + size
        pos = end
    return entries


def test_library_embeds_sm80_sm90_code_and_compute90_ptx():
    entries = fatbin_entries(_section(entskip._C.__file__, ".nv_fatbin"))
    assert {(ELF, 80), (ELF, 90)} <= entries, f"machine code for sm_80 and sm_90 expected, found {sorted(entries)}"
    assert (PTX, 90) in entries, f"compute_90 PTX (for GPUs newer than sm_90) expected, found {sorted(entries)}"
