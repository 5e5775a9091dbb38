#!/usr/bin/env bash
# Packaging check: the source distribution builds a wheel that installs a working entskip into a
# fresh virtual environment holding only torch, ninja, setuptools and wheel.
#  1. `python -m build --sdist --no-isolation` (with the project's .venv) -> entskip-*.tar.gz,
#     which must carry the native sources, the Triton kernels, README and LICENSE
#  2. a fresh venv; `pip wheel --no-build-isolation` of the archive (entskip._C is compiled from
#     the sdist alone: one native build), then `pip install` of that wheel
#  3. import it outside the checkout, check the version and the native library, and compare one
#     skip_add (sparse mapping, float64) and its gradients with the pure-PyTorch reference
# The sdist is made from the checkout run from a scratch folder, so a build/ folder in the checkout
# (setuptools' output) can neither shadow the `build` package nor end up in the archive.
# PYTHON (default .venv/bin/python) builds the sdist; FRESH_PYTHON (default python3) makes the fresh
# venv, which gets TORCH (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)
PY=${PYTHON:-.venv/bin/python}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # absolute (not resolved: a venv python is a symlink); it also runs from a scratch folder
FRESH_PYTHON=${FRESH_PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/entskip-sdist.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$PY" -m pip install -q build
(cd "$work" && "$PY" -m build --sdist --no-isolation --outdir "$work/dist" "$root") > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/entskip-*.tar.gz)
tar tzf "$sdist" > "$work/sdist-files.txt"
echo "sdist: $(basename "$sdist") ($(wc -l < "$work/sdist-files.txt") files)"
for f in LICENSE README.md csrc/checks.h csrc/cpu/simd.h csrc/cuda/device_utils.cuh csrc/cuda/bsr_block_row.cu triton_kernels/bsr_skip.py python/entskip/_version.py; do
  grep -qx "entskip-[^/]*/$f" "$work/sdist-files.txt" || { echo "sdist lacks $f" >&2; exit 1; }
done

"$FRESH_PYTHON" -m venv "$work/venv"
V="$work/venv/bin/python"
"$V" -m pip install -q "$TORCH" ninja setuptools wheel

smoke() {  # smoke LABEL: import the installed entskip (not the checkout) and check one skip_add
  (cd "$work" && "$V" - "$1" "$root" <<'PYEOF'
import os, sys, torch, entskip
from entskip import mappings, reference
label, root = sys.argv[1], sys.argv[2]
assert not entskip.__file__.startswith(root), f"imported the checkout, not the install: {entskip.__file__}"
assert entskip.native_available(), entskip.backends.NATIVE_ERROR
import importlib.metadata as md
assert md.version("entskip") == entskip.__version__, (md.version("entskip"), entskip.__version__)
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 128, dtype=torch.float64, generator=g, requires_grad=True)
r = torch.randn(64, 128, dtype=torch.float64, generator=g, requires_grad=True)
M = mappings.sparse(128, density=0.25, block=16, seed=0).to(torch.float64)
with entskip.use_backend("cpu"):
    y = entskip.skip_add(x, M, r, alpha=0.7)
dy = torch.randn_like(y)
gx, gr = torch.autograd.grad(y, (x, r), dy)
with entskip.use_backend("reference"):
    y_ref = entskip.skip_add(x, M, r, alpha=0.7)
gx_ref, gr_ref = torch.autograd.grad(y_ref, (x, r), dy)
for got, want in ((y, y_ref), (gx, gx_ref), (gr, gr_ref)):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
print(f"{label}: entskip {entskip.__version__} from {os.path.dirname(entskip.__file__)}: skip_add and its gradients match the reference")
PYEOF
  )
}

"$V" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheels" "$sdist" > "$work/wheel.log" 2>&1 || { cat "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/wheels/entskip-*.whl)
echo "wheel from the sdist: $(basename "$wheel")"
"$V" -m pip install -q --no-build-isolation "$wheel"
smoke "sdist -> wheel"
echo "sdist check finished in $(( $(date +%s) - start )) s"
