"""``python -m entskip``: a short demo on the CPU.

Builds each mapping kind at ``D = 512``, prints the properties it is built to keep,
checks the fused op against the reference on fresh random inputs, and times the
fused op beside the unfused eager expression and the plain ``x + r``.
"""

from __future__ import annotations

import argparse
import time

import torch

import entskip
from entskip import mappings, reference


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m entskip", description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    d, n = args.dim, args.rows
    print(f"entskip {entskip.__version__}, torch {torch.__version__}, backend {entskip.get_backend()} "
          f"(native library loaded: {entskip.native_available()}), {torch.get_num_threads()} threads")
    x, r = torch.randn(n, d), torch.randn(n, d)
    base = _median_ms(lambda: x + r, args.repeats)
    kinds = {
        "identity": mappings.identity(d),
        "orthogonal": mappings.orthogonal(d),
        "block_orthogonal": mappings.block_orthogonal(d, block=32),
        "permutation": mappings.permutation(d),
        "sparse 1/8": mappings.sparse(d, density=0.125, block=32),
        "structural": mappings.structural(d, block=32),
    }
    header = f"{'mapping':<17}{'|M|_2':>7}{'|eig| range':>16}{'density':>9}{'max err':>10}{'fused ms':>10}{'eager ms':>10}{'x+r ms':>8}"
    print(f"y = 0.8 * (x @ M^T) + r, x and r: {n} x {d} float32")
    print(header)
    for name, mapping in kinds.items():
        p = mapping.properties()
        m = mapping.matrix()
        y = entskip.skip_add(x, mapping, r, 0.8)
        err = (y.double() - reference.skip_add(x.double(), m.double(), r.double(), 0.8)).abs().max().item()
        fused = _median_ms(lambda: entskip.skip_add(x, mapping, r, 0.8), args.repeats)
        eager = _median_ms(lambda: 0.8 * (x @ m.T) + r, args.repeats)
        eig = f"[{p['eig_abs_min']:.2f}, {p['eig_abs_max']:.2f}]"
        print(f"{name:<17}{p['spectral_norm']:>7.3f}{eig:>16}{p['density']:>9.4f}{err:>10.1e}{fused:>10.2f}{eager:>10.2f}{base:>8.2f}")


if __name__ == "__main__":
    main()
