#!/usr/bin/env bash
# Compile-only checks of the CUDA backend (csrc/cuda/), no GPU needed (docs/gpu.md):
#  1. every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc --resource-usage and the flags
#     torch's CUDAExtension adds (no implicit half/bfloat16 conversions); fails on a compile
#     error or on any kernel with a non-zero stack frame (spills), and prints registers,
#     stack and shared memory per kernel and architecture;
#  2. the ATen glue csrc/cuda/*.cpp with g++ -fsyntax-only against the venv's torch headers
#     and the CUDA headers, so the glue cannot rot on CPU-only machines either.
# The .cu files include only CUDA headers. cuBLASLt's header comes from the CUDA toolkit or,
# where the toolkit has none, from the nvidia-cublas wheel (headers only, cached under
# .venv/cuda-extra/include).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cu)
glue=(csrc/cuda/*.cpp)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc check: no csrc/cuda/*.cu sources in this tree"
  exit 0
fi
command -v nvcc >/dev/null || { echo "nvcc check: nvcc not found" >&2; exit 1; }
PY=${PYTHON:-.venv/bin/python}
cuda_include=$(dirname "$(dirname "$(command -v nvcc)")")/include
[ -d /usr/local/cuda/include ] && cuda_include=/usr/local/cuda/include
extra=.venv/cuda-extra/include
if [ ! -f "$cuda_include/cublasLt.h" ] && [ ! -f "$extra/cublasLt.h" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps -d "$tmp" "nvidia-cublas==13.1.1.3"
  "$PY" - "$tmp" "$extra" <<'EOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
os.makedirs(sys.argv[2], exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/include/" in name and name.endswith(".h"):
            with open(os.path.join(sys.argv[2], os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
EOF
  rm -rf "$tmp"
fi
includes=(-I"$cuda_include")
[ -f "$extra/cublasLt.h" ] && includes+=(-I"$extra")

status=0
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# Same defines as torch.utils.cpp_extension.COMMON_NVCC_FLAGS, so what compiles here builds there.
nvcc_flags=(-std=c++17 -O3 --resource-usage -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
            -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90)
for src in "${sources[@]}"; do
  log="$logs/$(basename "$src").log"
  if ! nvcc "${nvcc_flags[@]}" "${includes[@]}" -c "$src" -o /dev/null > "$log" 2>&1; then
    cat "$log"; echo "nvcc check: $src failed to compile" >&2; status=1; continue
  fi
  if grep -i -E "warning" "$log"; then echo "nvcc check: $src compiles with warnings" >&2; status=1; fi
done
# One line per kernel and architecture: registers, stack frame (spills), shared memory.
summary=$(mktemp)
cat "$logs"/*.log > "$summary"
"$PY" - "$summary" <<'EOF' || { echo "nvcc check: a kernel spills (non-zero stack frame) or none was compiled" >&2; status=1; }
import re, subprocess, sys

rows, name, arch, stack = [], None, None, 0
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
    if m:
        name, arch = m.groups()
    elif name and (m := re.search(r"(\d+) bytes stack frame", line)):
        stack = int(m.group(1))
    elif name and (m := re.search(r"Used (\d+) registers", line)):
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((arch, name, int(m.group(1)), stack, int(smem.group(1)) if smem else 0))
        name, stack = None, 0
names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True).stdout.split("\n")
noise = r"entskip::cuda::\(anonymous namespace\)::|entskip::cuda::"
print("arch   regs stack   smem  kernel")
for (arch, _, regs, stack, smem), full in sorted(zip(rows, names), key=lambda r: (r[0][0], r[1])):
    print(f"{arch:6} {regs:>4} {stack:>5} {smem:>6}  {re.sub(noise, '', full)}")
spills = [r for r in rows if r[3] > 0]
print(f"nvcc check: {len(rows)} kernel builds, {len(spills)} with a non-zero stack frame")
sys.exit(1 if spills or not rows else 0)
EOF
rm -f "$summary"

# The glue: syntax only (a CPU-only torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h).
torch_includes=$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem " + p for p in include_paths()))')
py_include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
for src in "${glue[@]}"; do
  # shellcheck disable=SC2086
  if ! g++ -std=c++17 -fsyntax-only -Wall -Werror -DENTSKIP_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $torch_includes \
       -isystem "$py_include" "${includes[@]}" "$src"; then
    echo "nvcc check: glue $src does not compile" >&2; status=1
  fi
done
[ $status -eq 0 ] && echo "nvcc check: ${#sources[@]} CUDA sources and ${#glue[@]} glue files compile, no spills"
exit $status
