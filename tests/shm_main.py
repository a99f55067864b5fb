"""Ranks whose /dev/shm is not what it seems, or who die, or share the host with a hostile user,
for tests/test_shm.py: each rank runs in a process of its own (started here with subprocess, some
under `unshare -m` with a tmpfs of their own on /dev/shm), joins a gloo group through a file
rendezvous, and writes a JSON report to a file of its own; the parent prints one JSON line per
report.

    python shm_main.py launch MODE WORLD PRIVATE_RANKS   # PRIVATE_RANKS: e.g. "1" or "0,1" or ""
    python shm_main.py rank MODE WORLD RANK DIR          # one rank (what launch starts)

MODE:
  sum       whether the group took shared memory, and its sums
  kill      rank 1 dies by SIGKILL; rank 0's next sum must raise
  a2akill   (3 ranks) rank 2 dies by SIGKILL; the others' next all-to-all (the dispatch of
            all_to_all_grouped_mat_mul, their rows copied in, waiting for rank 2's) must raise
  room      (in a /dev/shm of 1 MiB) a sum too large for it takes the process group, a small one
            shared memory; the same for two all-to-alls
  memory    what the group pins in /dev/shm: after setup, after sums, capped by
            GMM_ALLREDUCE_SHM_BYTES, and after the group is destroyed (no other call)
  setupkill the launcher kills every rank the moment a segment appears in /dev/shm (during setup),
            then runs a "sum" job, whose setup must remove what the dead left
  hostile   an unprivileged user plants under this user's prefix a FIFO and a symlink to a FIFO
            (PRIVATE_RANKS: "fifo"), or a file whose size keeps changing ("truncated"), before a
            "sum" job
"""

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
NOBODY = 65534


def segments(owner: int | None = None) -> list[str]:
    """This user's segments in /dev/shm (entries under its prefix owned by `owner`, any owner if
    None)."""
    out = []
    for f in os.listdir("/dev/shm"):
        if f.startswith(SEGMENT_PREFIX):
            try:
                if owner is None or os.lstat(os.path.join("/dev/shm", f)).st_uid == owner:
                    out.append(f)
            except FileNotFoundError:
                pass
    return sorted(out)


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def rank_main(mode: str, world: int, rank: int, d: str) -> None:
    import testing_ops  # noqa: F401  (registers the ops, the test-only ones too)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    ops = torch.ops.gmm_allreduce
    if mode == "memory":
        report = memory(rank)
    else:
        name = dist.group.WORLD.group_name
        report = {"rank": rank, "shared": ops._shared_memory(name)}
        t = torch.arange(100_000, dtype=torch.float32) + rank
        expected = torch.arange(100_000, dtype=torch.float32) * world + world * (world - 1) // 2
        total = t.clone()
        ops._all_reduce_(total, name)
        report["sum_ok"] = bool(torch.equal(total, expected))
        report["segments_after_setup"] = segments(os.getuid())
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
    if mode == "a2akill":
        import gmm_allreduce

        if rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        counts = [2] * world  # one local expert per rank, 2 rows to each
        start = time.monotonic()
        try:
            gmm_allreduce.all_to_all_grouped_mat_mul(torch.ones(2 * world, 64),
                                                     torch.ones(1, 64, 8), send_counts=counts,
                                                     recv_counts=counts)
            report.update(outcome="returned")
        except RuntimeError as e:
            report.update(outcome="raised", message=str(e).splitlines()[0])
        report["seconds"] = time.monotonic() - start
    if mode == "room":
        big = torch.ones(1_000_000) * (rank + 1)
        ops._all_reduce_(big, name)
        small = torch.ones(1000) * (rank + 1)
        ops._all_reduce_(small, name)
        want = world * (world + 1) / 2
        report.update(big_ok=bool((big == want).all()), small_ok=bool((small == want).all()),
                      stats=ops._shm_stats(name))
        import gmm_allreduce

        # All-to-alls: 2 MB for the other rank finds no room (the process group takes it), a
        # few rows do.
        for rows in (8000, 8):
            x = torch.full((rows * world, 64), float(rank + 1))
            y, _, _ = gmm_allreduce.all_to_all_grouped_mat_mul(
                x, torch.eye(64).unsqueeze(0), send_counts=[rows] * world,
                recv_counts=[rows] * world)
            got = torch.cat([torch.full((rows, 64), float(s + 1)) for s in range(world)])
            report[f"a2a_ok_{rows}"] = bool(torch.equal(y, got))
        report["stats_after_a2a"] = ops._shm_stats(name)
    path = os.path.join(d, f"report{rank}.json")
    with open(path + ".part", "w") as f:
        json.dump(report, f)
    os.replace(path + ".part", path)
    os._exit(0)  # a group with a dead rank has no clean teardown


def memory(rank: int) -> dict:
    """/dev/shm in use (this private tmpfs) at each step of one group's life."""
    import gc

    import torch
    import torch.distributed as dist

    import gmm_allreduce

    ops = torch.ops.gmm_allreduce

    def used():  # once both ranks are at the same step, before either moves on
        dist.barrier()
        n = shm_used()
        dist.barrier()
        return n

    report = {"rank": rank, "before": used()}
    group = dist.new_group([0, 1])
    report["shared"] = ops._shared_memory(group.group_name)
    report["setup"] = used()
    for n in (1000, 100_000, 3_000_000):  # 4 KB, 400 KB, 12 MB (several rounds)
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([torch.ones(1, 1)], [torch.ones(1, n)],
                                                        group, split_item=3, group_list=[1])
        report[f"sum_ok_{n}"] = bool((y == 2).all())
        report[f"after_{n}"] = used()
        report[f"pinned_{n}"] = ops._shm_stats(group.group_name)[0]
    dist.destroy_process_group(group)
    del group
    gc.collect()
    report["destroyed"] = used()
    return report


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


def kill_during_setup(world: int, tries: int) -> None:
    """Kills every rank of a job the moment the first segment appears, `tries` times; reports
    what each kill left."""
    for _ in range(tries):
        with tempfile.TemporaryDirectory() as d:
            procs = [subprocess.Popen([sys.executable, SCRIPT, "rank", "sum", str(world), str(r), d])
                     for r in range(world)]
            deadline = time.monotonic() + 60
            while not segments() and time.monotonic() < deadline:
                pass
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            print(json.dumps({"left_by_kill": segments()}))


# As another user (a shell, which that user can run, unlike this user's Python), under the prefix of
# the user who runs the tests, until the file $1 exists: "fifo" ($2), a FIFO and a symlink to a
# FIFO; "truncated", a file whose size keeps changing (past a segment's: 0 to 16 MiB, sparse).
PLANT = f"""
cd /dev/shm
if [ "$2" = fifo ]; then
  mkfifo {SEGMENT_PREFIX}fifo elsewhere && ln -s elsewhere {SEGMENT_PREFIX}link
  touch {SEGMENT_PREFIX}planted
  while [ ! -e "$1" ]; do sleep 0.05; done
else
  touch {SEGMENT_PREFIX}planted
  while [ ! -e "$1" ]; do
    for size in 0 4096 16777216; do truncate -s $size {SEGMENT_PREFIX}grow; done
  done
fi
"""


def hostile(world: int, kind: str) -> None:
    """A "sum" job while another user's files of `kind` sit under this user's prefix (and, for
    "truncated", one of this user's too)."""
    stop = tempfile.mktemp()
    planter = subprocess.Popen(["sh", "-c", PLANT, "plant", stop, kind], user=NOBODY, group=NOBODY,
                               extra_groups=[], cwd="/")
    while not os.path.exists(f"/dev/shm/{SEGMENT_PREFIX}planted"):
        time.sleep(0.01)
    own = None
    if kind == "truncated":  # another job's, or a careless one
        own = subprocess.Popen([sys.executable, "-c", (
            "import os, sys\n"
            f"f = open('/dev/shm/{SEGMENT_PREFIX}mine', 'wb')\n"
            "size = 0\n"
            "while not os.path.exists(sys.argv[1]):\n"
            "    size = (1 << 24) - size\n"
            "    f.truncate(size)\n"), stop])
    try:
        launch("sum", world, set())
    finally:
        open(stop, "w").close()
        planter.wait(timeout=30)
        if own is not None:
            own.wait(timeout=30)
            os.unlink(f"/dev/shm/{SEGMENT_PREFIX}mine")
        os.unlink(stop)


if __name__ == "__main__":
    if sys.argv[1] == "rank":
        rank_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[2] == "setupkill":
        kill_during_setup(int(sys.argv[3]), 3)
        launch("sum", int(sys.argv[3]), set())
    elif sys.argv[2] == "hostile":
        hostile(int(sys.argv[3]), sys.argv[4])
    else:
        launch(sys.argv[2], int(sys.argv[3]), {int(r) for r in sys.argv[4].split(",") if r})
    print(json.dumps({"segments_at_end": segments(os.getuid())}))
