"""Soak: many calls at world size 2 over varying shapes, split modes, dtypes, comm_turn and
check_ranks. Resident memory must grow by less than 50 MB after warm-up, no thread may leak, and
every 100th call is checked against the float64 reference.

CI runs GMM_SOAK_CALLS (10,000) calls; `make soak` runs more, at world sizes 2 and 4, and prints
the figures that docs/testing.md records.
"""

import itertools
import os
import time

import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.cases import Case, call_kwargs, check, make_inputs

CALLS = int(os.environ.get("GMM_SOAK_CALLS", "10000"))
WORLDS = [int(w) for w in os.environ.get("GMM_SOAK_WORLDS", "2").split(",")]
WARMUP = 500
CHECK_EVERY = 100
MAX_GROWTH_MB = 50


def soak_cases() -> list[Case]:
    """24 calls of different shapes, cycled through."""
    shapes = [
        dict(split_item=0, m=(7, 0, 12), k=(13, 17, 5), n=(9, 3, 33)),
        dict(split_item=1, m=(5, 0, 12, 1), k=(13,) * 4, n=(9, 3, 17, 4)),
        dict(split_item=2, m=(5, 9, 12), k=(13, 17, 5), n=(9, 9, 9)),
        dict(split_item=3, m=(64, 0, 3, 40, 1, 20), k=(24,) * 6, n=(16,) * 6),
        dict(split_item=3, m=tuple(range(1, 17)), k=(8,) * 16, n=(32,) * 16),
        dict(split_item=1, m=(128, 64), k=(32, 32), n=(48, 8)),
    ]
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
              (torch.float16, torch.float16), (torch.float32, None)]
    cases = []
    for i, (shape, (dtype, bias)) in enumerate(itertools.product(shapes, dtypes)):
        cases.append(Case(name=f"soak{i}", dtype=dtype, bias_dtype=bias, seed=i,
                          group_list_form=["list", "tensor", "tensor32"][i % 3],
                          group_list_type=i % 2, comm_turn=[0, 0, 1, 3][i % 4],
                          check_ranks=i % 5 == 0, layout=["contiguous", "strided"][i % 2],
                          **shape))
    return cases


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def soak(calls: int) -> dict:
    """On every rank: `calls` calls cycling through soak_cases(); figures for the test."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = soak_cases()
    prepared = [(c, make_inputs(c, rank, world)) for c in cases]
    checked = 0
    start = time.monotonic()
    for i in range(calls):
        case, inputs = prepared[i % len(prepared)]
        outputs = gmm_allreduce.grouped_mat_mul_all_reduce(
            inputs["x"], inputs["weight"], None, **call_kwargs(case, inputs))
        if i % CHECK_EVERY == 0:
            check(case, outputs, world)
            checked += 1
        if i == WARMUP - 1:
            rss0, threads0 = _rss_mb(), _threads()
    return dict(calls=calls, checked=checked, seconds=time.monotonic() - start,
                rss_growth_mb=_rss_mb() - rss0, thread_growth=_threads() - threads0,
                rss_mb=_rss_mb())


def test_soak(pools):
    assert CALLS > WARMUP
    for world in WORLDS:
        per_rank = pools(world).run(soak, CALLS, timeout=3600)
        for rank, stats in enumerate(per_rank):
            print(f"soak world={world} rank={rank}: {stats}")
            assert stats["checked"] == -(-CALLS // CHECK_EVERY)
            assert stats["rss_growth_mb"] < MAX_GROWTH_MB, stats
            assert stats["thread_growth"] == 0, stats
