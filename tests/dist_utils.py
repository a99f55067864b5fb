"""A pool of W spawned ranks, joined over gloo with a file:// rendezvous, that runs many test
functions without being restarted: starting ranks costs seconds on a small machine.

`pool.run(fn, *args)` runs fn(*args) on every rank (fn must be importable: a module-level function)
and returns the per-rank results in rank order. A rank that raises or dies, or a call that
outlasts its timeout, fails the call and retires the pool (its ranks may be stuck in a
collective); the next `get_pool` starts a fresh one. Ranks die with the test process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

PG_TIMEOUT_S = 60
CALL_TIMEOUT_S = 180
FAILURE_GRACE_S = 15  # after a rank raised, how long the others may take to report


class RankError(AssertionError):
    """A function raised on some rank; carries that rank's traceback."""


def _worker(rank, world, init_file, backend, tasks, results):
    import testing_ops  # noqa: F401  (the test-only ops, on every rank)
    import torch
    import torch.distributed as dist

    from gmm_allreduce._rank import exit_with_parent

    exit_with_parent()  # a test process that dies takes its ranks with it
    torch.set_num_threads(1)  # W ranks share the machine's few cores
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    while (item := tasks.get()) is not None:
        fn, args = item
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int, backend: str = "gloo"):
        ctx = mp.get_context("spawn")
        self.world = world
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "rendezvous")
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world, init_file, backend, self._tasks[r],
                                              self._results), daemon=True)
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        self.healthy = True

    def run(self, fn, *args, timeout: float = CALL_TIMEOUT_S) -> list:
        assert self.healthy, "this pool was retired after a failure"
        for q in self._tasks:
            q.put((fn, args))
        results, failures = [None] * self.world, []
        deadline = time.monotonic() + timeout
        received, first_failure = 0, 0.0
        while received < self.world:
            try:
                rank, ok, value = self._results.get(timeout=1)
            except queue.Empty:
                dead = [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self._procs)
                        if not p.is_alive()]
                if failures:  # the others may wait for it in a collective: a short grace
                    deadline = min(deadline, first_failure + FAILURE_GRACE_S)
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"{', '.join(dead)} died" if dead else "did not finish on every rank"
                    raise RankError("\n".join([f"{fn.__name__}: {why}", *failures])) from None
                continue
            received += 1
            if ok:
                results[rank] = value
            else:
                first_failure = first_failure or time.monotonic()
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            self.close()
            raise RankError(f"{fn.__name__} failed\n" + "\n".join(failures))
        return results

    def close(self):
        self.healthy = False
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()


_pools: dict[int, DistPool] = {}


def get_pool(world: int) -> DistPool:
    pool = _pools.get(world)
    if pool is None or not pool.healthy:
        pool = _pools[world] = DistPool(world)
    return pool


def close_pools():
    for pool in _pools.values():
        if pool.healthy:
            pool.close()
    _pools.clear()


def new_group_with_shm(shm: str, **kwargs):
    """In a rank: a new group of every rank, set up with GMM_ALLREDUCE_SHM=shm in this process
    ("0": its sums go through the process group), the variable restored after."""
    import torch
    import torch.distributed as dist

    old = os.environ.get("GMM_ALLREDUCE_SHM")
    os.environ["GMM_ALLREDUCE_SHM"] = shm
    try:
        group = dist.new_group(list(range(dist.get_world_size())), **kwargs)
        torch.ops.gmm_allreduce._all_reduce_(torch.zeros(1), group.group_name)  # its setup
        return group
    finally:
        if old is None:
            os.environ.pop("GMM_ALLREDUCE_SHM", None)
        else:
            os.environ["GMM_ALLREDUCE_SHM"] = old
