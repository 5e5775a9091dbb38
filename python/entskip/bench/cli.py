"""Command line of ``python -m entskip.bench``: parse the options, run the grid, report."""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

import entskip
from entskip.backends import BACKENDS

from . import heap
from .cases import ALPHA, BLOCKS, DENSITIES, DTYPES, QUICK, SIZES, Workloads, density_label, grid, parse_density
from .peers import METHOD_IDS, compile_limits, on_backends, select
from .plot import plot
from .report import REPO, environment, table, write_json
from .roofline import measure
from .sweep import sweep
from .timing import Settings



def _default_out() -> Path:
    """``bench/results`` of the source tree this package runs from, else the working directory."""
    return REPO / "bench" / "results" if (REPO / "bench").is_dir() else Path.cwd()


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with every default filled in (device defaults, then ``--quick``'s)."""
    p = argparse.ArgumentParser(
        prog="python -m entskip.bench",
        description="Time entskip's fused skip-add beside its peers; print a table, write JSON and a PNG.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    p.add_argument(
        "--quick", action="store_true",
        help="a small grid: N=2048, D=1024, block 32, densities 1/8 1, float32, 3 repeats (explicit options win)",
    )
    p.add_argument("--n", type=int, help="rows N of x and r (default: 8192 on CPU, 16384 on CUDA)")
    p.add_argument("--dims", type=int, nargs="+", help="features D (default: 1024 4096 on CPU; 1024 4096 8192 on CUDA)")
    p.add_argument("--blocks", type=int, nargs="+", help=f"block sizes (default: {' '.join(map(str, BLOCKS))})")
    p.add_argument(
        "--densities", type=parse_density, nargs="+",
        help=f"block densities, e.g. 1/8 (default: {' '.join(map(density_label, DENSITIES))})",
    )
    p.add_argument("--dtypes", choices=tuple(DTYPES), nargs="+", metavar="DTYPE", help="float32, bfloat16 (default: both)")
    p.add_argument(
        "--methods", choices=METHOD_IDS, nargs="+", metavar="METHOD",
        help=f"some of {', '.join(METHOD_IDS)} (default: all; x+r is always timed)",
    )
    p.add_argument(
        "--backend", choices=BACKENDS, nargs="+", default=["auto"],
        help=f"entskip backend(s), timed side by side: {', '.join(BACKENDS)} (default: auto)",
    )
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default: 10 on CPU, 50 on CUDA; 3 with --quick)")
    p.add_argument(
        "--budget", type=float, default=10.0, help="stop sampling a measurement after this many seconds (>= 3 samples)"
    )
    p.add_argument("--out", type=Path, help="output folder (default: bench/results of the repo, else the working directory)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--skips", action="store_true",
        help="instead of the grid: the identity/permutation skips on 16x197x192, 8192x1024, 64x197x768 "
             "beside torch.add(r, x, alpha=a) and x + r (--dtypes, --repeats, --no-backward apply)",
    )
    p.add_argument(
        "--conv", action="store_true",
        help="instead of the grid: entskip on (N, C, H, W) ResNet maps in channels_last and NCHW beside "
             "conv2d(x, M 1x1) + r and x + r (--dtypes, --repeats, --no-backward apply; --quick: N = 4, 3 repeats)",
    )
    p.add_argument(
        "--timm-step", action="store_true",
        help="also (or, without --skips, only) a timm vit_tiny_patch16_224 training step, plain vs entangled",
    )
    p.add_argument(
        "--resnet-step", action="store_true",
        help="also (or, without --skips, only) torchvision resnet18/resnet50 training steps in both memory "
             "formats, plain vs entangled (sparse 1/4)",
    )
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    defaults = {**SIZES[args.device], "blocks": BLOCKS, "densities": DENSITIES, "dtypes": tuple(DTYPES)}
    if args.quick:
        defaults.update(QUICK)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = _default_out()
    if args.n < 1 or args.repeats < 1 or min(args.dims) < 1 or min(args.blocks) < 1:
        p.error("--n, --dims, --blocks and --repeats must be positive")
    bad = [(d, b) for d in args.dims for b in args.blocks if d % b]
    if bad:
        p.error(f"every D must be divisible by every block size; not: {bad}")
    return args


def _backend_in_use(device: torch.device) -> str:
    try:
        return entskip.backends.resolve(device)
    except Exception as err:  # reported, and the entskip rows say n/a with the same reason
        return f"unavailable ({err})"


def main(argv=None) -> Path:
    """Run the benchmark; returns the path of the JSON it wrote."""
    args = parse_args(argv)
    heap.keep_freed_memory()  # before the first tensor (see .heap)
    if args.conv:
        return _main_conv(args)
    if args.skips or args.timm_step or args.resnet_step:
        return _main_skips(args)
    start = time.perf_counter()
    device = torch.device(args.device)
    env = environment(device)  # before the run: its load average is the other work's
    stem = f"entskip-bench-{device.type}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    torch.manual_seed(0)
    settings = Settings.for_device(device, args.repeats, args.budget)
    cases = grid(args.n, args.dims, args.blocks, args.densities, args.dtypes, backward=not args.no_backward)
    methods = on_backends(select(args.methods or METHOD_IDS), args.backend)
    resolved = []
    for name in args.backend:
        with entskip.use_backend(name):
            resolved.append(_backend_in_use(device))
    backend = ", ".join(f"{name} -> {r}" for name, r in zip(args.backend, resolved))
    with compile_limits():
        machine = measure(device, args.dtypes, settings)
        records, machine = sweep(cases, methods, Workloads(device), machine, settings)
    print(table(records, machine, backend), flush=True)

    json_path = args.out / f"{stem}.json"
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json(json_path, {
        **env,
        "options": options,
        "backend": {"requested": args.backend, "resolved": resolved},
        "roofline": machine.as_dict(),
        "timing": {**settings.as_dict(), "clock": "CUDA events" if device.type == "cuda" else "time.perf_counter"},
        "methods": {m.id: {"label": m.label, "role": m.role, "sparse": m.sparse, "note": m.note} for m in methods},
        "wall_s": time.perf_counter() - start,
        "results": records,
    })
    written = [json_path]
    if not args.no_plot:
        where = env["machine"].get("gpu", env["machine"]["cpu"])
        title = (
            f"entskip.bench: y = {ALPHA} * (x @ M^T) + r, N = {args.n}\n"
            f"{where}, {env['machine']['torch_threads']} threads; entskip backend {backend}"
        )
        try:
            plot(records, json_path.with_suffix(".png"), title)
            written.append(json_path.with_suffix(".png"))
        except ImportError as err:
            print(f"no PNG: {err} (pip install matplotlib)")
    print("\n".join(f"wrote {p}" for p in written))
    return json_path



def _main_skips(args) -> Path:
    """``--skips`` / ``--timm-step`` / ``--resnet-step``: the elementwise-skip grid (:mod:`.skips`)
    and the whole-model training steps (:mod:`.model_steps`), in one JSON."""
    from . import model_steps, skips

    start = time.perf_counter()
    device = torch.device(args.device)
    env = environment(device)
    kind = "skips" if args.skips else "steps"
    stem = f"entskip-bench-{kind}-{device.type}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    payload = {**env, "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "backend": {"requested": args.backend, "resolved": [_backend_in_use(device)]}}
    with entskip.use_backend(args.backend[0]):
        if args.skips:
            repeats = args.repeats if args.repeats != SIZES[args.device]["repeats"] else 15
            records = skips.run_grid(device, args.dtypes, repeats, backward=not args.no_backward)
            print(skips.table(records), flush=True)
            payload.update(repeats=repeats, targets={f"{m} {p}": t for (m, p), t in skips.TARGETS.items()},
                           results=records)
        if args.timm_step:
            payload["timm_step"] = step = model_steps.timm_step()
            print(f"\ntimm training step: {model_steps.describe(step)}", flush=True)
        if args.resnet_step:
            payload["resnet_step"] = step = model_steps.resnet_steps()
            print(f"\ntorchvision training steps (sparse 1/4, block 16):\n{model_steps.describe(step)}", flush=True)
    payload["wall_s"] = time.perf_counter() - start
    path = args.out / f"{stem}.json"
    write_json(path, payload)
    print(f"wrote {path}")
    return path


def _main_conv(args) -> Path:
    """``--conv``: the convolutional grid (:mod:`.conv`), its JSON and PNG."""
    from . import conv

    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type != "cpu":
        raise SystemExit("--conv times the CPU kernels: use --device cpu")
    env = environment(device)
    stem = f"entskip-bench-conv-{device.type}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    repeats = args.repeats if args.repeats != SIZES[args.device]["repeats"] else 15
    batch = 4 if args.quick else None
    with entskip.use_backend(args.backend[0]):
        records = conv.run_grid(args.dtypes, repeats, batch=batch, backward=not args.no_backward)
    print(conv.table(records), flush=True)
    path = args.out / f"{stem}.json"
    write_json(path, {
        **env, "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "backend": {"requested": args.backend, "resolved": [_backend_in_use(device)]}, "repeats": repeats,
        "batch_override": batch, "targets": {"nchw_vs_channels_last": conv.NCHW_LIMIT,
                                             "sparse_vs_conv1x1": conv.SPARSE_LIMIT, "dense_vs_conv1x1": conv.DENSE_LIMIT},
        "wall_s": time.perf_counter() - start, "results": records,
    })
    written = [path]
    if not args.no_plot:
        title = (f"entskip.bench --conv: y = {conv.ALPHA} * M x + r on (N, C, H, W); {env['machine']['cpu']}, "
                 f"{env['machine']['torch_threads']} threads, load {env['machine']['load_average']}")
        try:
            conv.plot(records, path.with_suffix(".png"), title)
            written.append(path.with_suffix(".png"))
        except ImportError as err:
            print(f"no PNG: {err} (pip install matplotlib)")
    print("\n".join(f"wrote {p}" for p in written))
    return path
