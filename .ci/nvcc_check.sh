#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc (compile only, no GPU
# needed) and fail if any kernel spills (a non-zero stack frame), DESIGN section 7.
# The .cu files include only CUDA headers, so they compile without torch.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc check: no csrc/cuda/*.cu sources in this tree (the CUDA backend is not written yet)"
  exit 0
fi
command -v nvcc >/dev/null || { echo "nvcc check: nvcc not found" >&2; exit 1; }
status=0
for src in "${sources[@]}"; do
  log=$(nvcc -std=c++17 -O3 -c "$src" -o /dev/null --resource-usage \
        -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 2>&1) || {
    echo "$log"; echo "nvcc check: $src failed to compile" >&2; status=1; continue; }
  echo "$log"
  if echo "$log" | grep -E "[1-9][0-9]* bytes stack frame" >/dev/null; then
    echo "nvcc check: $src has a kernel that spills (non-zero stack frame)" >&2; status=1
  fi
done
exit $status
