#!/usr/bin/env bash
# The GPU check in two commands, each fitting a 6-minute slot of a short GPU loan (issue 14):
#
#   bash bench/gpu_check.sh A OUT   # environment, build, smoke of both backends, CUDA C++ tests, Triton tests
#   bash bench/gpu_check.sh B OUT   # large shapes and N*D > 2^31, memcheck, racecheck, focused benchmark
#
# Most informative step first. Each step runs under its own `timeout`, capped by what is left of
# the command's budget (GPU_CHECK_BUDGET, 330 s), so a command ends within 6 minutes; a step with
# under 15 s left, or after a failed build, is reported NOT RUN. Files written to OUT (8 at most
# over both commands): A.log / B.log (every step's output), summary-A.txt / summary-B.txt (one
# line per step: PASS, FAIL, TIMEOUT or NOT RUN with the reason), A's entskip-lib.tar.gz, and B's
# benchmark JSON for blocks 32 and 64 with the PNG of block 32. A sanitizer that refuses the
# device ("Device not supported") is NOT RUN, never PASS. Exit status: 0 every step passed,
# 1 a step failed or timed out, 2 none failed but some did not run.
#
# A keeps the library it built in .gpu-check/lib (gitignored) and returns it as
# OUT/entskip-lib.tar.gz (about 5 MiB). B reuses the installed build while the machine is warm;
# on a fresh machine, unpack A's tarball into .gpu-check/ of the checkout that travels
# (`mkdir -p .gpu-check && tar -xzf <A's files>/entskip-lib.tar.gz -C .gpu-check`) and run B
# with carry=[".gpu-check/lib"]: B then installs it editable without compiling. B rebuilds only
# when setup.py or csrc/ changed since A (or nothing was carried). Triton's cache goes to
# .gpu-check/triton-cache (reused while warm).
#
# PYTHON (default python3) is the interpreter; CUDA_HOME defaults to the toolkit of nvcc.
set -uo pipefail
usage="usage: bash bench/gpu_check.sh A|B OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu-check}
LIB=$CARRY/lib

native_hash() {  # of what the library is built from
  find setup.py csrc -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1
}

built_lib() {  # the library an editable install leaves in the source tree
  ls python/entskip/_C.*.so 2>/dev/null | head -n 1
}

case ${1:-} in
  _env)  # versions of everything the check depends on
    nvidia-smi
    echo "CUDA_HOME=$CUDA_HOME"
    "$CUDA_HOME/bin/nvcc" --version | tail -n 2
    compute-sanitizer --version 2>&1 | tail -n 1 || echo "compute-sanitizer: not found"
    exec "$PY" -c "
import torch, triton
print('python3', __import__('sys').version.split()[0], '| torch', torch.__version__, '| torch CUDA', torch.version.cuda,
      '| triton', triton.__version__)
print('GPU', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(),
      'memory %.0f GiB' % (torch.cuda.get_device_properties(0).total_memory / 2**30))"
    ;;
  _build)  # editable build, then keep the library for B
    "$PY" -m pip install --no-build-isolation --no-deps -e . || exit 1
    lib=$(built_lib)
    [ -n "$lib" ] || { echo "no python/entskip/_C.*.so after the build"; exit 1; }
    mkdir -p "$LIB" && cp "$lib" "$LIB/" && native_hash > "$LIB/native.sha256" || exit 1
    [ -n "${GPU_CHECK_OUT:-}" ] && { tar -czf "$GPU_CHECK_OUT/entskip-lib.tar.gz" -C "$CARRY" lib || exit 1; }
    exec "$PY" -c "from entskip import gpu_dispatch as g; assert g.cuda_kernels_available(), 'built without CUDA kernels'; print('CUDA kernels:', True, '| Triton:', g.triton_available())"
    ;;
  _prepare)  # B: the installed build if current, else A's library, else a build
    current=$(native_hash)
    if [ "$(cat "$LIB/native.sha256" 2>/dev/null)" != "$current" ]; then
      echo "no library of A for these sources in $LIB: building"
      exec bash "$0" _build
    fi
    if "$PY" -c "from entskip import gpu_dispatch as g; assert g.cuda_kernels_available()" 2>/dev/null \
       && cmp -s "$(built_lib)" "$LIB/$(basename "$(built_lib)")"; then
      echo "entskip is installed with A's library"
      exit 0
    fi
    echo "installing A's library from $LIB without compiling"
    cp "$LIB"/_C.*.so python/entskip/ && ENTSKIP_PREBUILT=1 "$PY" -m pip install --no-build-isolation --no-deps -e . || exit 1
    exec "$PY" -c "from entskip import gpu_dispatch as g; assert g.cuda_kernels_available(), 'CUDA kernels missing'; print('CUDA kernels:', True)"
    ;;
  A|B) stage=$1 ;;
  *) echo "$usage" >&2; exit 64 ;;
esac
out=${2:?$usage}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 64
log=$out/$stage.log
summary=$out/summary-$stage.txt
: > "$log"; : > "$summary"
budget=${GPU_CHECK_BUDGET:-330}
start=$SECONDS
blocked=""   # set when a later step cannot run (the build failed)
failures=0 not_run=0
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || true)
  if [ -n "$nvcc_path" ]; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")"); else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME PYTHON=$PY GPU_CHECK_CARRY=$CARRY
[ "$stage" = A ] && export GPU_CHECK_OUT=$out  # where _build leaves the library's tarball
export PATH=$PATH:$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/$CARRY/triton-cache}
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)

record() {  # record STEP VERDICT SECONDS
  printf '%s %-12s %-60s %4ss\n' "$stage" "$1" "$2" "$3" | tee -a "$summary"
}

# step NAME LIMIT COMMAND...: COMMAND under `timeout` (LIMIT seconds, at most the budget left),
# its output appended to the log. A pytest command that passed no test FAILS; output matching
# $REFUSED (e.g. a sanitizer refusing the device) makes the step NOT RUN.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( budget - (SECONDS - start) ))
  if [ -n "$blocked" ] || [ "$left" -lt 15 ]; then
    record "$name" "NOT RUN (${blocked:-no time left of the ${budget} s budget})" 0; not_run=$((not_run + 1)); return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $stage/$name (timeout ${limit}s): $*" >> "$log"
  local t0=$SECONDS part
  part=$(mktemp)
  timeout --kill-after=5 "$limit" "$@" > "$part" 2>&1
  local rc=$?
  cat "$part" >> "$log"
  local took=$(( SECONDS - t0 )) verdict=PASS
  if [ -n "${REFUSED:-}" ] && grep -q -E "$REFUSED" "$part"; then
    verdict="NOT RUN (refused: $(grep -m 1 -o -E "$REFUSED" "$part"))"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict="TIMEOUT after ${limit}s"
  elif [ $rc -ne 0 ]; then
    verdict="FAIL (exit $rc): $(grep -E "passed|failed|rror" "$part" | tail -n 1 | cut -c1-60)"
  elif [[ " $* " == *" pytest "* ]] && ! grep -q -E "[0-9]+ passed" "$part"; then
    verdict="FAIL (no test passed: all skipped or none collected)"
  fi
  rm -f "$part"
  case $verdict in PASS) ;; NOT*) not_run=$((not_run + 1)) ;; *) failures=$((failures + 1)) ;; esac
  record "$name" "$verdict" "$took"
}

build_step() {  # step, and block the rest when it fails
  local before=$failures
  step "$@"
  [ $failures -gt $before ] && blocked="the build failed"
}

pytest=("$PY" -m pytest -q -rs -p no:cacheprovider)
sanitize=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 ENTSKIP_SANITIZE=1 compute-sanitizer --error-exitcode 1)
no_sanitizer="Device not supported|device is not supported|Unable to find injection library|failed to run command .compute-sanitizer."
bench=("$PY" -m entskip.bench --device cuda --backend triton cuda --n 16384 --dims 4096 --densities 1/16 1/8 1
       --dtypes bfloat16 --methods entskip-bsr entskip-dense addmm sparse-bsr --repeats 20 --budget 2 --out "$out")

if [ "$stage" = A ]; then
  step env 30 bash "$0" _env
  build_step build 200 bash "$0" _build
  step smoke 90 "$PY" -m entskip.bench.gpu_smoke --n 8192 --d 2048
  step cuda-tests 90 env ENTSKIP_REQUIRE_CUDA_BUILD=1 "${pytest[@]}" "${xdist[@]}" tests/test_cuda_build.py \
    tests/test_cuda_backend.py -k "not 2_31"
  step triton-tests 120 env ENTSKIP_AUTOTUNE=once "${pytest[@]}" "${xdist[@]}" tests/test_triton_kernels.py \
    tests/test_triton_features_first.py -k "not 16384 and not 64bit"
else
  build_step prepare 200 bash "$0" _prepare
  step large 90 env ENTSKIP_AUTOTUNE=once "${pytest[@]}" tests/test_triton_kernels.py tests/test_cuda_backend.py \
    -k "16384 or 64bit or 2_31"
  REFUSED=$no_sanitizer step memcheck 75 "${sanitize[@]}" --tool memcheck "${pytest[@]}" -x tests/test_cuda_backend.py \
    -k "(matches_reference and not no_branch) or unaligned or empty_inputs"
  REFUSED=$no_sanitizer step racecheck 75 "${sanitize[@]}" --tool racecheck "${pytest[@]}" -x tests/test_cuda_backend.py \
    -k "bsr_matches_reference and not no_branch and (float32 or bfloat16)"
  step bench-b32 75 "${bench[@]}" --blocks 32
  step bench-b64 75 "${bench[@]}" --blocks 64 --no-plot
fi
echo "$stage: $failures failed, $not_run not run, $(( SECONDS - start )) s; log $log" | tee -a "$summary"
[ $failures -gt 0 ] && exit 1
[ $not_run -gt 0 ] && exit 2
exit 0
