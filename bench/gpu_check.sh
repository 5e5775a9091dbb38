#!/usr/bin/env bash
# Everything a GPU machine should check, in one command (docs/gpu.md):
# build entskip, compile-check the Triton configs, run the Triton and CUDA test files natively,
# compute-sanitizer over the CUDA tests, then the benchmark of both GPU backends side by
# side with the peers, in one run. Logs, JSON and PNGs go to OUTDIR; a step that fails is recorded and the next runs.
#
#   bash bench/gpu_check.sh OUTDIR [--quick]
#
# --quick benchmarks only D=4096, block 32, bfloat16 (the issues' target shape class).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR [--quick]}
quick=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, record the exit status
  local name=$1; shift
  local start=$(date +%s)
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log"
}

: > "$out/summary.txt"
step machine nvidia-smi
step build $PY -m pip install --no-build-isolation --no-deps -e .
step versions $PY -c "import torch, triton, entskip; from entskip import gpu_dispatch as g; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), 'triton kernels', g.triton_available(), 'cuda kernels', g.cuda_kernels_available())"
step aot $PY -m entskip.triton_kernels.aot --check
step test_triton $PY -m pytest tests/test_triton_kernels.py -q -rs
step test_cuda $PY -m pytest tests/test_cuda_backend.py -q -rs
step test_all env ENTSKIP_FUZZ_EXAMPLES=50 $PY -m pytest tests -q -rs -x  # fuzz: each new shape autotunes
step memcheck env ENTSKIP_SANITIZE=1 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest tests/test_cuda_backend.py -q -x -k "not 2_31 and not graph and not compile"
step racecheck env ENTSKIP_SANITIZE=1 compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest tests/test_cuda_backend.py -q -x -k "not 2_31 and not graph and not compile"
grid=(--dims 1024 4096 --blocks 32 --dtypes bfloat16 float32)
[ "$quick" = "--quick" ] && grid=(--dims 4096 --blocks 32 --dtypes bfloat16)
step bench $PY -m entskip.bench --device cuda --backend triton cuda "${grid[@]}" --budget 5 --out "$out"
echo "logs in $out"; cat "$out/summary.txt"
