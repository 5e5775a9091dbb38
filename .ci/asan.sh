#!/usr/bin/env bash
# Sanitizer job (`make asan`): build entskip._C with AddressSanitizer and
# UndefinedBehaviorSanitizer into build/asan (the worktree's own library is not touched),
# then run the op, robustness, hostile-layout, hardening and fuzz tests against it.
#
#   bash .ci/asan.sh              build (incrementally) and test
#   ASAN_TESTS="tests/test_ops.py" bash .ci/asan.sh   other test files
#   ENTSKIP_FUZZ_EXAMPLES=N ...   the fuzz campaign's size (default 500)
#
# How: the extension is compiled with -fsanitize=address,undefined (vptr off: torch's
# classes come from an uninstrumented library, whose type info the check would misread),
# -fno-omit-frame-pointer -g for readable reports (setup.py's -O3 stays: it comes last).
# Python and torch are not instrumented, so the sanitizer runtime must be loaded before
# anything else: LD_PRELOAD holds libasan first, then libstdc++ (libasan intercepts
# __cxa_throw; with libstdc++ loaded up front the interceptor finds it, and the C++
# exceptions of torch's checks still reach Python as RuntimeError). The tests
# import a copy of the Python package (build/asan/pkg) holding the sanitized library,
# through PYTHONPATH, so the editable install keeps its normal build.
#
# Options: detect_leaks=0 (CPython and torch keep allocations alive until exit, which
# LeakSanitizer reports as leaks); halt_on_error=1 for both sanitizers (UBSan's findings
# are recoverable by default: this makes each one fail the run instead of printing and
# continuing); print_stacktrace=1 for UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=build/asan
SAN="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g"
TESTS=${ASAN_TESTS:-tests/test_ops.py tests/test_identity_permutation_ops.py tests/test_robustness.py tests/test_hostile_layouts.py tests/test_hardening.py tests/test_fuzz.py}

start=$(date +%s)
mkdir -p "$OUT"
CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="$SAN" ENTSKIP_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py -q build_ext --build-temp "$OUT/tmp" --build-lib "$OUT/lib" >"$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
built=$(date +%s)
echo "asan: built in $((built - start)) s ($OUT/lib)"

rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
cp -r python/entskip "$OUT/pkg/entskip"
find "$OUT/pkg" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
cp "$OUT"/lib/entskip/_C*.so "$OUT/pkg/entskip/"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$PWD/$OUT/pkg"
"$PY" - <<'PY'
import os, entskip, entskip._C as c
assert c.__file__.startswith(os.environ["PYTHONPATH"]), f"the tests would not run the sanitized library: {c.__file__}"
assert entskip.native_available()
print("asan: testing", c.__file__)
PY
"$PY" -m pytest $TESTS -q -p no:cacheprovider
echo "asan: tests passed in $(( $(date +%s) - built )) s"
