"""Ranks whose /dev/shm is not what it seems, or who die, for tests/test_shm.py: each rank runs in
a process of its own (started here with subprocess, some under `unshare -m` with a tmpfs of their
own on /dev/shm), joins a gloo group through a file rendezvous, and writes a JSON report to a file
of its own; the parent prints one JSON line per report.

    python shm_main.py launch MODE WORLD PRIVATE_RANKS   # PRIVATE_RANKS: e.g. "1" or "0,1" or ""
    python shm_main.py rank MODE WORLD RANK DIR          # one rank (what launch starts)

MODE: "sum" (check whether the group took shared memory, and its sums), "kill" (rank 1 dies by
SIGKILL; rank 0's next sum must raise)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

SCRIPT = os.path.abspath(__file__)
SEGMENT_PREFIX = f"gmm_allreduce.{os.getuid()}."


def segments() -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(SEGMENT_PREFIX))


def rank_main(mode: str, world: int, rank: int, d: str) -> None:
    import testing_ops  # noqa: F401  (registers the ops, the test-only ones too)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    name = dist.group.WORLD.group_name
    ops = torch.ops.gmm_allreduce
    report = {"rank": rank, "shared": ops._shared_memory(name)}
    t = torch.arange(100_000, dtype=torch.float32) + rank
    expected = torch.arange(100_000, dtype=torch.float32) * world + world * (world - 1) // 2
    total = t.clone()
    ops._all_reduce_(total, name)
    report["sum_ok"] = bool(torch.equal(total, expected))
    report["segments_after_setup"] = segments()
    if mode == "kill":
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        start = time.monotonic()
        try:
            ops._all_reduce_(t.clone(), name)
            report.update(outcome="returned")
        except RuntimeError as e:
            report.update(outcome="raised", message=str(e).splitlines()[0])
        report["seconds"] = time.monotonic() - start
    path = os.path.join(d, f"report{rank}.json")
    with open(path + ".part", "w") as f:
        json.dump(report, f)
    os.replace(path + ".part", path)
    os._exit(0)  # a group with a dead rank has no clean teardown


def launch(mode: str, world: int, private: set[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for rank in range(world):
            cmd = [sys.executable, SCRIPT, "rank", mode, str(world), str(rank), d]
            if rank in private:  # a mount namespace of its own, with its own /dev/shm
                cmd = ["unshare", "-m", "sh", "-c",
                       "mount -t tmpfs -o size=64m tmpfs /dev/shm && exec \"$0\" \"$@\"", *cmd]
            procs.append(subprocess.Popen(cmd))
        for p in procs:
            p.wait(timeout=120)
        for rank in range(world):
            path = os.path.join(d, f"report{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    print(json.dumps(json.load(f)))
        print(json.dumps({"segments_at_end": segments()}))


if __name__ == "__main__":
    if sys.argv[1] == "rank":
        rank_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        launch(sys.argv[2], int(sys.argv[3]), {int(r) for r in sys.argv[4].split(",") if r})
