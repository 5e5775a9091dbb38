"""A dry run of bench/gpu_check.sh's control flow, with every command it calls stubbed.

The script runs in a scratch copy of the repository with stubs first on PATH (``python3``,
``nvidia-smi``, ``compute-sanitizer``, ``timeout``, and ``nvcc`` under a fake CUDA_HOME) that
log their arguments; environment variables make a stub fail, time out or refuse the device.
Checked: the step order of both commands, that every step runs under ``timeout`` within the
command's budget, at most 8 files in OUT over both commands, a refused sanitizer reported as
NOT RUN (exit status 2, never PASS), a failed or timed-out step failing the command, a failed
build blocking the rest, and B reusing A's library on a fresh machine instead of compiling.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUDGET = 330  # the script's default per-command budget; 6 minutes is 360 s

STUBS = {
    # `timeout [--kill-after=N] LIMIT CMD...`: logged; exit 124 when STUB_TIMEOUT names a word of CMD.
    "timeout": r"""
while [[ $1 == --* ]]; do shift; done
limit=$1; shift
echo "timeout $limit $*" >> "$STUB_LOG"
[ -n "${STUB_TIMEOUT:-}" ] && [[ " $* " == *" $STUB_TIMEOUT "* ]] && exit 124
STUB_IN_TIMEOUT=1 exec "$@"
""",
    "nvidia-smi": 'echo "nvidia-smi in_timeout=${STUB_IN_TIMEOUT:-0}" >> "$STUB_LOG"; echo "GPU 0: stub"',
    # Refuses the device with STUB_SANITIZER=refuse; else runs the command after its options.
    "compute-sanitizer": r"""
echo "compute-sanitizer in_timeout=${STUB_IN_TIMEOUT:-0} $*" >> "$STUB_LOG"
[ "${STUB_SANITIZER:-}" = refuse ] && { echo "========= Error: Device not supported"; exit 1; }
while [[ $1 == --* ]]; do [[ $1 == --tool || $1 == --error-exitcode ]] && shift; shift; done
exec "$@"
""",
    "python3": r"""
echo "python3 in_timeout=${STUB_IN_TIMEOUT:-0} prebuilt=${ENTSKIP_PREBUILT:-0} $*" >> "$STUB_LOG"
for word in "$@"; do
  [ -n "${STUB_FAIL:-}" ] && [ "$word" = "$STUB_FAIL" ] && { echo "1 failed in 0.1s"; exit 1; }
done
case " $* " in
  *" -m pip "*) [ "${ENTSKIP_PREBUILT:-0}" = 1 ] || echo lib > python/entskip/_C.stub.so ;;
  *" -m pytest "*) echo "3 passed in 0.1s" ;;
  *" -m entskip.bench "*)
    out=${*##*--out }; out=${out%% *}
    echo json > "$out/bench-$RANDOM.json"
    [[ " $* " == *" --no-plot "* ]] || echo png > "$out/bench-$RANDOM.png" ;;
esac
exit 0
""",
}


@pytest.fixture
def env(tmp_path):
    """A scratch repository with the script, the stubs on PATH, and the variables the stubs read."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "csrc").mkdir()
    (repo / "python" / "entskip").mkdir(parents=True)
    shutil.copy(REPO / "bench" / "gpu_check.sh", repo / "bench" / "gpu_check.sh")
    (repo / "setup.py").write_text("# stub\n")
    (repo / "csrc" / "kernel.cu").write_text("// stub\n")
    bin_dir, cuda_bin = tmp_path / "bin", tmp_path / "cuda" / "bin"
    bin_dir.mkdir()
    cuda_bin.mkdir(parents=True)
    for name, body in {**STUBS, "nvcc": 'echo "nvcc stub"'}.items():
        path = (cuda_bin if name == "nvcc" else bin_dir) / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("STUB_", "ENTSKIP_", "GPU_CHECK_"))}
    variables.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CUDA_HOME=str(tmp_path / "cuda"), STUB_LOG=str(log),
                     TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    variables.pop("PYTHON", None)
    return {"repo": repo, "log": log, "tmp": tmp_path, "vars": variables}


def run(env, stage, out, **overrides):
    """Run one command of the check; ``(exit status, {step: verdict}, calls)``."""
    result = subprocess.run(["bash", str(env["repo"] / "bench" / "gpu_check.sh"), stage, str(out)],
                            env={**env["vars"], **overrides}, capture_output=True, text=True, timeout=60)
    summary = (out / f"summary-{stage}.txt").read_text().splitlines()
    verdicts = {}
    for line in summary:
        m = re.match(rf"{stage} (\S+)\s+(.*?)\s+\d+s$", line)
        if m:
            verdicts[m.group(1)] = m.group(2)
    calls = env["log"].read_text().splitlines() if env["log"].exists() else []
    env["log"].write_text("")
    return result.returncode, verdicts, calls


def timeouts(out, stage):
    """``{step: timeout}`` from the step headers of the stage's log."""
    text = (out / f"{stage}.log").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(rf"^== {stage}/(\S+) \(timeout (\d+)s\)", text, re.MULTILINE)}


def test_both_commands_run_every_step_in_order_under_timeout(env):
    a, b = env["tmp"] / "out-a", env["tmp"] / "out-b"
    rc, verdicts, calls = run(env, "A", a)
    assert rc == 0, verdicts
    assert list(verdicts) == ["env", "build", "smoke", "cuda-tests", "triton-tests"]
    assert set(verdicts.values()) == {"PASS"}
    limits = timeouts(a, "A")
    assert list(limits) == list(verdicts) and all(0 < t <= BUDGET for t in limits.values())
    work = [c for c in calls if c.startswith(("nvidia-smi", "compute-sanitizer", "python3")) and " -c " not in c]
    assert len(work) >= 5 and all("in_timeout=1" in c for c in work), [c for c in work if "in_timeout=1" not in c]
    triton = [c for c in calls if c.startswith("timeout") and "test_triton_kernels.py" in c]
    assert triton and "ENTSKIP_AUTOTUNE=once" in triton[0] and " -n 8 " in triton[0]

    rc, verdicts, calls = run(env, "B", b)
    assert rc == 0, verdicts
    assert list(verdicts) == ["prepare", "large", "memcheck", "racecheck", "bench-b32", "bench-b64"]
    assert set(verdicts.values()) == {"PASS"}
    assert not any(" -m pip " in c for c in calls), "B rebuilt on the machine A built on"
    sanitizer = [c for c in calls if c.startswith("timeout") and "compute-sanitizer" in c]
    assert len(sanitizer) == 2 and all("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in c for c in sanitizer)
    files = [p for out in (a, b) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    with tarfile.open(a / "entskip-lib.tar.gz") as tar:  # A's library, for B on a fresh machine
        assert sorted(tar.getnames()) == ["lib", "lib/_C.stub.so", "lib/native.sha256"]


def test_refused_sanitizer_is_not_run_never_pass(env):
    run(env, "A", env["tmp"] / "a")
    rc, verdicts, _ = run(env, "B", env["tmp"] / "b", STUB_SANITIZER="refuse")
    assert rc == 2
    for tool in ("memcheck", "racecheck"):
        assert verdicts[tool].startswith("NOT RUN (refused: Device not supported"), verdicts
    assert verdicts["bench-b64"] == "PASS"


@pytest.mark.parametrize("broken, verdict", [("tests/test_cuda_backend.py", "FAIL"), ("entskip.bench.gpu_smoke", "FAIL")])
def test_a_failing_step_fails_the_command(env, broken, verdict):
    rc, verdicts, _ = run(env, "A", env["tmp"] / "a", STUB_FAIL=broken)
    assert rc == 1
    failed = [k for k, v in verdicts.items() if v.startswith(verdict)]
    assert len(failed) == 1 and verdicts["triton-tests"] == "PASS", verdicts


def test_a_timed_out_step_fails_the_command(env):
    rc, verdicts, _ = run(env, "A", env["tmp"] / "a", STUB_TIMEOUT="tests/test_triton_kernels.py")
    assert rc == 1 and verdicts["triton-tests"].startswith("TIMEOUT"), verdicts


def test_a_failed_build_blocks_the_later_steps(env):
    rc, verdicts, calls = run(env, "A", env["tmp"] / "a", STUB_FAIL="pip")
    assert rc == 1 and verdicts["build"].startswith("FAIL")
    assert all(verdicts[s] == "NOT RUN (the build failed)" for s in ("smoke", "cuda-tests", "triton-tests")), verdicts
    assert not any(" -m pytest " in c for c in calls)


def test_the_budget_caps_the_timeouts(env):
    out = env["tmp"] / "a"
    rc, verdicts, _ = run(env, "A", out, GPU_CHECK_BUDGET="100")
    assert rc == 0 and all(t <= 100 for t in timeouts(out, "A").values()), timeouts(out, "A")
    rc, verdicts, _ = run(env, "A", out, GPU_CHECK_BUDGET="10")
    assert rc == 2 and all(v.startswith("NOT RUN") for v in verdicts.values()), verdicts


def test_b_on_a_fresh_machine_installs_a_library_without_compiling(env):
    run(env, "A", env["tmp"] / "a")
    # A fresh machine: the tree without A's build, plus .gpu-check/lib unpacked from A's tarball and carried.
    (env["repo"] / "python" / "entskip" / "_C.stub.so").unlink()
    shutil.rmtree(env["repo"] / ".gpu-check")
    with tarfile.open(env["tmp"] / "a" / "entskip-lib.tar.gz") as tar:
        tar.extractall(env["repo"] / ".gpu-check", filter="data")
    rc, verdicts, calls = run(env, "B", env["tmp"] / "b")
    pip = [c for c in calls if c.startswith("python3") and " -m pip " in c]
    assert rc == 0 and len(pip) == 1 and "prebuilt=1" in pip[0], pip
    assert (env["repo"] / "python" / "entskip" / "_C.stub.so").exists()

    (env["repo"] / "csrc" / "kernel.cu").write_text("// changed since A\n")
    rc, verdicts, calls = run(env, "B", env["tmp"] / "b2")
    pip = [c for c in calls if c.startswith("python3") and " -m pip " in c]
    assert rc == 0 and len(pip) == 1 and "prebuilt=0" in pip[0], pip
