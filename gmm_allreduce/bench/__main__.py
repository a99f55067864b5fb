"""Benchmark the op against the unfused composition, its compute alone and its all-reduce alone,
over a comm_turn sweep, on the scenarios of shapes.json.

    python -m gmm_allreduce.bench                                  # CPU scenarios, 2 ranks
    python -m gmm_allreduce.bench --scenarios moe16_cpu --comm-turns 0 1 2 4 8 --plot t.png
    python -m gmm_allreduce.bench --device cuda --backend nccl --world-size 1   # GPU scenarios

Every rank checks the op's result against the float64 reference before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

import torch

from ..cpu import TIERS, cpu_capabilities, cpu_description, emulation_env
from . import report, runner
from .ep import EP
from .methods import COMMON, EXTRA, FP32, GPU_ONLY
from .mlp import MLP
from .scenarios import DTYPES, SHAPES, load


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m gmm_allreduce.bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--scenarios", nargs="*", help="names (default: every scenario of the device)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--comm-turns", type=int, nargs="+", default=[0], metavar="K",
                   help="comm_turn values of the fused op (default: 0)")
    p.add_argument("--methods", nargs="+", default=list(COMMON),
                   choices=[*COMMON, *EXTRA, *GPU_ONLY, FP32, *MLP, *EP],
                   help=f"default: {' '.join(COMMON)}")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="every scenario's float dtype instead of its own")
    p.add_argument("--weight-layout", choices=["kn", "nk"], default="kn",
                   help="kn: each weight a contiguous [K, N] tensor (default); nk: the transposed "
                        "view of an [N, K] tensor (nn.Linear's layout)")
    p.add_argument("--cpu-isa", choices=list(TIERS),
                   help="run the ranks at this CPU tier (GMM_CPU_ISA and the libraries' own caps: "
                        "gmm_allreduce.cpu.emulation_env)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", type=Path, default=SHAPES)
    p.add_argument("--csv", type=Path, default=Path("benchmarks/results.csv"),
                   help="appended to (default: benchmarks/results.csv under the current directory)")
    p.add_argument("--plot", type=Path, help="PNG: time against comm_turn (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="also print a RESULTS.md table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    scenarios = load(args.shapes)
    pool = scenarios["gpu" if args.device == "cuda" else "cpu"]
    if args.scenarios:
        every = {c.name: c for c in scenarios["cpu"] + scenarios["gpu"]}
        unknown = [n for n in args.scenarios if n not in every]
        if unknown:
            print(f"--scenarios: unknown {unknown}; known: {sorted(every)}", file=sys.stderr)
            return 2
        pool = [every[n] for n in args.scenarios]
    if args.dtype or args.weight_layout == "nk":
        pool = [dataclasses.replace(c, dtype=DTYPES[args.dtype] if args.dtype else c.dtype,
                                    layout="transposed" if args.weight_layout == "nk" else c.layout)
                for c in pool]
    if args.cpu_isa:  # read by the ranks, which start after this
        os.environ.update(emulation_env(args.cpu_isa))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no usable CUDA device", file=sys.stderr)
        return 2

    opts = {"threads": args.threads, "device": args.device, "backend": args.backend,
            "runs": args.runs, "warmup": args.warmup, "methods": args.methods,
            "comm_turns": args.comm_turns}
    if args.device == "cpu":
        print(f"{cpu_description()}; the CPU engine's kernels (gmm_allreduce.cpu_capabilities()):")
        for key, value in cpu_capabilities().items():
            print(f"  {key:<14} {value}")
    per_scenario = runner.run(pool, args.world_size, opts)
    rows = [row for case in pool for row in report.summarise(case, per_scenario[case.name])]

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_description()
    policy = cpu_capabilities()
    meta = {"date": datetime.date.today().isoformat(), "device": device,
            "cpu_tier": f"{policy['tier']} (host {policy['host']})", "torch": torch.__version__,
            "weight_layout": args.weight_layout,
            "backend": args.backend, "world_size": args.world_size,
            "threads_per_rank": args.threads, "runs": args.runs}
    report.print_table(rows)
    report.write_csv(args.csv, rows, meta)
    if args.plot:
        title = ", ".join(f"{k}={meta[k]}" for k in ("device", "torch", "backend", "world_size"))
        if not report.plot(args.plot, rows, title):
            print("--plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    if args.markdown:
        print("\n" + report.markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
