"""The main job: run the op on W ranks, check every output against the float64 reference, print a
table. Exits non-zero on any mismatch.

    python -m gmm_allreduce.demo                       # spawns 4 ranks on the CPU over gloo
    python -m gmm_allreduce.demo --world-size 8
    torchrun --nproc-per-node 4 -m gmm_allreduce.demo  # joins the group torchrun made
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import grouped_mat_mul_all_reduce
from ._rank import exit_with_parent
from .cases import Case, call_kwargs, check, make_inputs

SCENARIOS = [
    # The Ascend document's own example: two fp16 groups, split_item 0, bias=[].
    Case(name="seed_example", split_item=0, m=(32, 64), k=(256, 128), n=(32, 64),
         dtype=torch.float16),
    Case(name="split0_multidim", split_item=0, m=(64, 48), k=(96, 64), n=(80, 48),
         lead=((4, 16), (48,)), dtype=torch.bfloat16, bias_dtype=torch.float32),
    Case(name="split1_counts", split_item=1, m=(40, 0, 88), k=(128,) * 3, n=(64, 32, 96),
         dtype=torch.float16, bias_dtype=torch.float16, group_list_type=1),
    Case(name="split2_fp32", split_item=2, m=(50, 14, 64), k=(64, 32, 128), n=(96,) * 3,
         dtype=torch.float32, bias_dtype=torch.float32),
    Case(name="split3_tensor", split_item=3, m=(96, 32, 0, 128), k=(256,) * 4, n=(128,) * 4,
         dtype=torch.bfloat16, bias_dtype=torch.float32, group_list_form="tensor"),
]

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _to(inputs: dict, device: torch.device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        return [move(t) for t in v] if isinstance(v, list) else v
    return {k: move(v) for k, v in inputs.items()}


def run_scenario(case: Case, device: torch.device, repeats: int = 5) -> dict:
    """On every rank: the op on this rank's inputs, timed, checked against the reference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = _to(make_inputs(case, rank, world), device)
    call = lambda: grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], None,  # noqa: E731
                                              **call_kwargs(case, inputs))
    outputs = call()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    try:
        error, ok, detail = check(case, [o.cpu() for o in outputs], world), True, ""
    except AssertionError as e:
        error, ok, detail = float("nan"), False, str(e).splitlines()[0]
    return {"error": error, "ok": ok, "detail": detail, "ms": statistics.median(times) * 1e3}


def describe(case: Case) -> str:
    def seq(values):
        return "[" + ",".join(map(str, values)) + "]"
    m = case.m if case.lead is None else ["x".join(map(str, lead)) for lead in case.lead]
    return (f"G={case.groups} m={seq(m)} k={seq(dict.fromkeys(case.k))} "
            f"n={seq(dict.fromkeys(case.n))}")


def dtype_name(case: Case) -> str:
    bias = DTYPE_NAMES[case.bias_dtype] if case.bias_dtype else "none"
    return f"{DTYPE_NAMES[case.dtype]}/{bias}"


def main_rank(device_name: str) -> bool:
    """Runs every scenario on this rank; rank 0 prints the table. True when all ranks passed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    rows = []
    for case in SCENARIOS:
        mine = run_scenario(case, device)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        rows.append((case, everyone))
    all_ok = all(r["ok"] for _, everyone in rows for r in everyone)
    if rank == 0:
        print(f"gmm_allreduce demo: world size {world}, device {device.type}, backend "
              f"{dist.get_backend()}, torch {torch.__version__}")
        header = f"{'scenario':<17} {'split':>5}  {'shapes':<44} {'x/bias':<10} {'max err':>9} {'ms':>8}  result"
        print(header)
        print("-" * len(header))
        for case, everyone in rows:
            worst = max(r["error"] for r in everyone)
            ok = all(r["ok"] for r in everyone)
            slowest = max(r["ms"] for r in everyone)
            print(f"{case.name:<17} {case.split_item:>5}  {describe(case):<44} {dtype_name(case):<10} "
                  f"{worst:>9.2e} {slowest:>8.2f}  {'OK' if ok else 'FAIL'}")
            for r, res in enumerate(everyone):
                if not res["ok"]:
                    print(f"    rank {r}: {res['detail']}")
        print("all scenarios OK" if all_ok else "MISMATCH: see the rows marked FAIL")
    return all_ok


def _spawned(rank: int, world: int, init_file: str, backend: str, device: str):
    exit_with_parent()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    ok = main_rank(device)
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=4, help="ranks to spawn (default 4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default=None, help="gloo (default on cpu) or nccl (cuda)")
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
        ok = main_rank(args.device)
        dist.destroy_process_group()
        return 0 if ok else 1

    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_spawned, args=(args.world_size, os.path.join(d, "rendezvous"), backend,
                                     args.device), nprocs=args.world_size)
        except mp.ProcessExitedException:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
