"""Benchmark: the fused op against the unfused composition (per-group torch.mm, then one
dist.all_reduce per output), on the scenarios of benchmarks/shapes.json.

    python -m gmm_allreduce.bench                     # CPU scenarios, 2 ranks, 1 thread each
    python -m gmm_allreduce.bench --scenarios moe16_cpu --runs 50 --markdown

Every rank checks the fused result against the float64 reference before timing. Methods are
interleaved, ranks aligned by a barrier before each timed call, and the median (and IQR) of the
slowest rank's time per call is reported. Rows are appended to a CSV.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import grouped_mat_mul_all_reduce
from .cases import Case, call_kwargs, check, make_inputs
from .reference import unfused

SHAPES = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
METHODS = ("fused", "unfused")


def rows_per_group(total: int, groups: int, skew: float, seed: int, align: int = 16) -> list[int]:
    """Row counts drawn once from the seed: weights exp(skew * N(0,1)), counts in multiples of
    `align` by largest remainder, summing to total (any remainder below `align` goes last)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(skew * torch.randn(groups, generator=gen, dtype=torch.float64))
    units = total // align
    share = (weights / weights.sum() * units).tolist()
    counts = [math.floor(s) for s in share]
    by_remainder = sorted(range(groups), key=lambda i: share[i] - counts[i], reverse=True)
    for i in by_remainder[: units - sum(counts)]:
        counts[i] += 1
    rows = [c * align for c in counts]
    rows[-1] += total - sum(rows)
    return rows


def scenario_case(s: dict) -> Case:
    g = s["groups"]
    per_group = lambda v: tuple(v) if isinstance(v, list) else (v,) * g  # noqa: E731
    m = per_group(s["M"]) if isinstance(s["M"], list) else tuple(
        rows_per_group(s["M"], g, s["skew"], s["seed"]))
    return Case(name=s["name"], split_item=s["split_item"], m=m, k=per_group(s["K"]),
                n=per_group(s["N"]), dtype=DTYPES[s["dtype"]], seed=s["seed"])


def flops(case: Case) -> float:
    return sum(2.0 * m * k * n for m, k, n in zip(case.m, case.k, case.n))


def bench_rank(case: Case, runs: int, warmup: int) -> dict:
    """On every rank: check, then time both methods interleaved; returns this rank's times."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = make_inputs(case, rank, world)
    kw = call_kwargs(case, inputs)
    calls = {
        "fused": lambda: grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], **kw),
        "unfused": lambda: unfused(inputs["x"], inputs["weight"], **kw),
    }
    check(case, calls["fused"](), world)
    times = {name: [] for name in calls}
    order = list(calls)
    for i in range(warmup + runs):
        for name in order if i % 2 == 0 else order[::-1]:  # alternate order: drift cancels
            call = calls[name]
            dist.barrier()
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarise(case: Case, per_rank: list[dict]) -> dict:
    """Per call, the slowest rank's time (a collective ends when its last rank does). The speedup
    is the median of per-iteration ratios of adjacent fused and unfused calls: pairing cancels the
    drift of a shared machine that comparing two separate medians would keep."""
    out = {"scenario": case.name, "groups": case.groups, "dtype": str(case.dtype).split(".")[-1],
           "split_item": case.split_item, "gflop": flops(case) / 1e9}
    slowest = {name: [max(ts) for ts in zip(*(r[name] for r in per_rank))] for name in METHODS}
    for name in METHODS:
        q = statistics.quantiles(slowest[name], n=4)
        out[f"{name}_ms"] = statistics.median(slowest[name]) * 1e3
        out[f"{name}_iqr_ms"] = (q[2] - q[0]) * 1e3
    ratios = [u / f for f, u in zip(slowest["fused"], slowest["unfused"])]
    q = statistics.quantiles(ratios, n=4)
    out["speedup"] = statistics.median(ratios)
    out["speedup_q1"], out["speedup_q3"] = q[0], q[2]
    return out


def _rank_main(rank, world, init_file, cases, runs, warmup, threads, results):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    for case in cases:
        everyone = [None] * world
        dist.all_gather_object(everyone, bench_rank(case, runs, warmup))
        if rank == 0:
            results.put(summarise(case, everyone))
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", help="names (default: all CPU scenarios)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", type=Path, default=SHAPES)
    parser.add_argument("--csv", type=Path, default=SHAPES.parent / "results.csv")
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md table")
    args = parser.parse_args(argv)

    scenarios = json.loads(args.shapes.read_text())["cpu"]
    if args.scenarios:
        scenarios = [s for s in scenarios if s["name"] in args.scenarios]
    cases = [scenario_case(s) for s in scenarios]

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank_main, args=(r, args.world_size, os.path.join(d, "rv"),
                                                      cases, args.runs, args.warmup,
                                                      args.threads, results))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        rows = []
        print(f"{'scenario':<16} {'G':>3} {'dtype':<9} {'GFLOP':>7} {'fused ms':>10} "
              f"{'unfused ms':>11} {'speedup (IQR)':>19}", flush=True)
        for _ in cases:
            row = results.get()
            rows.append(row)
            print(f"{row['scenario']:<16} {row['groups']:>3} {row['dtype']:<9} {row['gflop']:>7.3f} "
                  f"{row['fused_ms']:>10.3f} {row['unfused_ms']:>11.3f} {row['speedup']:>7.2f}x "
                  f"({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f})",
                  flush=True)
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            return 1

    meta = {"date": datetime.date.today().isoformat(), "device": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "world_size": args.world_size,
            "threads_per_rank": args.threads, "runs": args.runs}
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
    if args.markdown:
        print(f"\n{meta}\n")
        print("| scenario | G | split | dtype | GFLOP | fused ms (IQR) | unfused ms (IQR) "
              "| speedup, paired median (IQR) |")
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['scenario']} | {r['groups']} | {r['split_item']} | {r['dtype']} | "
                  f"{r['gflop']:.3f} | {r['fused_ms']:.3f} ({r['fused_iqr_ms']:.3f}) | "
                  f"{r['unfused_ms']:.3f} ({r['unfused_iqr_ms']:.3f}) | {r['speedup']:.2f}x "
                  f"({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
