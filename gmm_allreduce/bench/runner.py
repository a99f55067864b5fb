"""Spawning the ranks and timing the methods on them.

Per iteration every method runs once, in an order that alternates direction between iterations
(so that drift cancels), each call after a barrier; a call's time is the slowest rank's, since a
collective ends when its last rank does. On CUDA the device is synchronised around each call.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .._rank import exit_with_parent
from .methods import make_methods


class Progress:
    """A one-line progress bar on stderr (a line per scenario when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done = total, width, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, what: str, n: int = 1) -> None:
        self.done += n
        if not self.tty and self.done < self.total:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac else 0.0
        bar = "#" * round(frac * self.width)
        end = "\n" if self.done >= self.total else ""
        sys.stderr.write(f"\r[{bar:<{self.width}}] {self.done}/{self.total} {what:<16} "
                         f"eta {eta:5.0f} s{end}")
        sys.stderr.flush()


def time_methods(calls: dict, runs: int, warmup: int, device: torch.device, tick) -> dict:
    """{label: [seconds per timed call]} on this rank, and under "host:" + label the seconds until
    each call returned (the host's part). Each call starts on an idle device after a barrier. On
    CUDA a call's time is that of CUDA events recorded around it: the device's span from its
    first queued work to its last, launch gaps included."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {name: [] for name in calls}
    host = {name: [] for name in calls}
    order = list(calls)
    for i in range(warmup + runs):
        for name in order if i % 2 == 0 else order[::-1]:
            call = calls[name]
            sync()
            dist.barrier()
            if cuda:
                begin.record()
            start = time.perf_counter()
            call()
            returned = time.perf_counter()
            if cuda:
                end.record()
            sync()
            if i >= warmup:
                elapsed = begin.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - start
                times[name].append(elapsed)
                host[name].append(returned - start)
        tick()
    return {**times, **{f"host:{name}": v for name, v in host.items()}}


def _rank_main(rank, world, init_file, opts, cases, results):
    exit_with_parent()
    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    dist.init_process_group(opts["backend"], init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    progress = Progress(len(cases) * (opts["runs"] + opts["warmup"])) if rank == 0 else None
    for case in cases:
        calls = make_methods(case, opts["methods"], opts["comm_turns"], device)
        tick = (lambda c=case: progress.step(c.name)) if progress else (lambda: None)
        times = time_methods(calls, opts["runs"], opts["warmup"], device, tick)
        everyone = [None] * world
        dist.all_gather_object(everyone, times)
        if rank == 0:
            results.put((case.name, everyone))
    dist.destroy_process_group()


def run(cases, world: int, opts: dict) -> dict[str, list[dict]]:
    """{scenario: [per-rank {label: times}]}; raises if a rank fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank_main,
                             args=(r, world, os.path.join(d, "rv"), opts, cases, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        out = {}
        while len(out) < len(cases):
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            try:
                name, per_rank = results.get(timeout=1.0)
            except Exception:  # queue.Empty: poll the ranks again
                continue
            out[name] = per_rank
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs) or len(out) < len(cases):
            raise RuntimeError(f"a benchmark rank failed (exit codes {[p.exitcode for p in procs]})")
    return out
