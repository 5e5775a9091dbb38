"""setup.py's choice of the CUDA toolkit, headers and libraries, on fake toolkits (no compiler runs).

setup.py runs in a scratch folder (with stand-in sources) with ``setuptools.setup`` captured and
``torch.version.cuda`` set, so the extension it would build can be inspected: the toolkit found
through an ``nvcc`` wrapper script, the toolkit's headers before a wheel's, ``cudart`` and
cuBLASLt from the toolkit or the wheel, compute_90 PTX, and the reasons it refuses to build.
"""

from __future__ import annotations

import os
import runpy
import shutil
import stat
import sys
import types
from pathlib import Path

import pytest
import setuptools
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]


def _executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _toolkit(root: Path, cublas: bool, cudart: bool = True) -> Path:
    """A fake toolkit: an nvcc whose dry run names its root, headers, and optionally cuBLASLt/cudart."""
    _executable(root / "bin" / "nvcc", f'echo "#$ TOP={root}/bin/.."\n')
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64").mkdir()
    if cudart:
        (root / "lib64" / "libcudart.so").write_text("")
    if cublas:
        (root / "include" / "cublasLt.h").write_text("")
        (root / "lib64" / "libcublasLt.so").write_text("")
    return root


@pytest.fixture
def build(tmp_path, monkeypatch):
    """``build(**env)``: the extension setup.py makes, with a CUDA torch and only ``env``'s variables."""
    src = tmp_path / "src"
    for name in ("csrc/ops.cpp", "csrc/cuda/kernel.cu", "csrc/cuda/glue.cpp"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    shutil.copy(REPO / "setup.py", src / "setup.py")
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(__path__=[str(tmp_path / "nvidia")]))
    for var in ("CUDA_HOME", "CUDA_PATH", "ENTSKIP_NO_CUDA", "ENTSKIP_PREBUILT"):  # setup.py sets CUDA_HOME:
        monkeypatch.setenv(var, "")  # recorded, so the teardown restores the variable as it was
        monkeypatch.delenv(var)

    def run(path=None, **env):
        monkeypatch.setenv("PATH", path or "/nonexistent")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        runpy.run_path(str(src / "setup.py"))
        (ext,) = captured["ext_modules"]
        return ext

    return run


def _nvcc_flags(ext) -> list[str]:
    return ext.extra_compile_args["nvcc"]


def test_toolkit_found_through_a_wrapper_script(tmp_path, build):
    home = _toolkit(tmp_path / "cuda-13.0", cublas=True)
    _executable(tmp_path / "wrapper" / "nvcc", f'exec {home}/bin/nvcc "$@"\n')  # like /usr/local/bin/nvcc
    ext = build(path=str(tmp_path / "wrapper"))
    assert cpp_extension.CUDA_HOME == str(home) and os.environ["CUDA_HOME"] == str(home)
    assert ("ENTSKIP_WITH_CUDA", "1") in ext.define_macros
    assert str(home / "include") in ext.include_dirs and str(home / "lib64") in ext.library_dirs
    assert "-lcublasLt" in ext.extra_link_args and "cudart" in ext.libraries
    flags = _nvcc_flags(ext)
    for code in ("sm_80", "sm_90", "compute_90"):
        assert any(f.endswith(f"code={code}") for f in flags), flags


def test_wheel_cublas_comes_after_the_toolkit_headers(tmp_path, build):
    home = _toolkit(tmp_path / "cuda", cublas=False, cudart=False)
    wheel = tmp_path / "nvidia" / "cu13"
    for name in ("include/cublasLt.h", "include/cuda_runtime.h", "lib/libcublasLt.so.13", "lib/libcudart.so.13"):
        (wheel / name).parent.mkdir(parents=True, exist_ok=True)
        (wheel / name).write_text("")
    ext = build(CUDA_HOME=str(home))
    dirs = ext.include_dirs
    assert dirs.index(str(home / "include")) < dirs.index(str(wheel / "include")), dirs
    assert "-l:libcublasLt.so.13" in ext.extra_link_args and f"-Wl,-rpath,{wheel / 'lib'}" in ext.extra_link_args
    link = next(Path(d) / "libcudart.so" for d in ext.library_dirs if (Path(d) / "libcudart.so").exists())
    assert os.path.realpath(link) == str(wheel / "lib" / "libcudart.so.13")


def test_a_toolkit_without_cublas_and_no_wheel_fails_with_the_reason(tmp_path, build):
    home = _toolkit(tmp_path / "cuda", cublas=False)
    with pytest.raises(RuntimeError, match="cuBLASLt .* is in neither CUDA_HOME.*ENTSKIP_NO_CUDA=1"):
        build(CUDA_HOME=str(home))


def test_a_wrapper_without_a_toolkit_fails_with_the_reason(tmp_path, build):
    _executable(tmp_path / "bin" / "nvcc", "exit 1\n")
    with pytest.raises(RuntimeError, match="cannot find the toolkit of .*nvcc.*CUDA_HOME"):
        build(path=str(tmp_path / "bin"))


def test_a_bad_cuda_home_fails_and_entskip_no_cuda_builds_cpu_only(tmp_path, build):
    with pytest.raises(RuntimeError, match="CUDA_HOME=/nonexistent is not a CUDA toolkit"):
        build(CUDA_HOME="/nonexistent")
    ext = build(CUDA_HOME="/nonexistent", ENTSKIP_NO_CUDA="1")
    assert ("ENTSKIP_WITH_CUDA", "1") not in (ext.define_macros or [])
    assert not any(s.endswith(".cu") for s in ext.sources)


def test_native_sources_have_distinct_object_names():
    """setuptools compiles csrc/cuda/x.cu and csrc/cuda/x.cpp to the same x.o: ninja then
    refuses the build ("multiple rules generate"), so no two sources in a folder may share a stem."""
    import collections
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    stems = collections.Counter((p.parent, p.stem) for p in root.rglob("*") if p.suffix in (".cpp", ".cu"))
    assert not [k for k, n in stems.items() if n > 1], f"sources sharing an object name: {[k for k, n in stems.items() if n > 1]}"
