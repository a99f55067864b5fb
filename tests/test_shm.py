"""The same-host shared-memory all-reduce (csrc/comm/shm/same_host_group.cpp), which the op's CPU sums
take when every rank of the group shares this host's /dev/shm: the same bytes on every rank, equal
to the sum in rank order in fp32 (16-bit types) rounded once; every dtype and size (one round,
several, the reduce-scatter path); several groups at once; all or nothing when some ranks do not
share /dev/shm, or lack room in it, or turn it off; a dead or late rank makes the others raise;
nothing left in /dev/shm."""

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from shm_main import SCRIPT, segments

import gmm_allreduce  # noqa: F401  (registers the ops)

OPS = torch.ops.gmm_allreduce


def all_reduce(t, group_name):
    t = t.clone()
    OPS._all_reduce_(t, group_name)
    return t

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
# Elements: none, one, a one-round whole sum, the reduce-scatter path (> 256 KiB), several rounds
# (> 4 MiB).
SIZES = [0, 1, 1000, 70_000, 1_200_000]


def values(dtype, n, rank):
    gen = torch.Generator().manual_seed(1000 * rank + n)
    if dtype.is_floating_point:
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=gen, dtype=dtype)


def expected_sum(dtype, n, world):
    """The ranks' values summed in rank order in fp32 for 16-bit types (their own type else),
    rounded once."""
    acc_type = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    acc = values(dtype, n, 0).to(acc_type)
    for r in range(1, world):
        acc = acc + values(dtype, n, r).to(acc_type)
    return acc.to(dtype)


def sums():
    name = dist.group.WORLD.group_name
    out = {"shared": OPS._shared_memory(name)}
    for dtype in DTYPES:
        for n in SIZES:
            out[(str(dtype), n)] = all_reduce(values(dtype, n, dist.get_rank()), name)
    return out


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"w{w}")
def test_sums_are_exact_and_identical_on_every_rank(pools, world):
    per_rank = pools(world).run(sums)
    assert all(r["shared"] for r in per_rank), "the group did not take shared memory"
    for dtype in DTYPES:
        for n in SIZES:
            want = expected_sum(dtype, n, world)
            for rank, r in enumerate(per_rank):
                got = r[(str(dtype), n)]
                assert torch.equal(got, want), f"{dtype} n={n} rank {rank}"
    assert segments() == []


def op_in_subgroups():
    """TP pairs {0,1} {2,3} and DP pairs {0,2} {1,3}, called in turn: each on shared memory."""
    from test_groups import CASE, _call_in

    tp, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    dp, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    for _ in range(3):
        _call_in(tp, CASE)
        _call_in(dp, CASE)
    return OPS._shared_memory(tp.group_name), OPS._shared_memory(dp.group_name)


def test_several_groups_each_on_shared_memory(pools):
    assert pools(4).run(op_in_subgroups) == [(True, True)] * 4
    assert segments() == []


def turned_off(off_ranks):
    """GMM_ALLREDUCE_SHM=0 on some ranks: a new group, then whether it took shared memory."""
    old = os.environ.get("GMM_ALLREDUCE_SHM")
    if dist.get_rank() in off_ranks:
        os.environ["GMM_ALLREDUCE_SHM"] = "0"
    try:
        group = dist.new_group([0, 1])
        shared = OPS._shared_memory(group.group_name)
        total = all_reduce(torch.ones(10), group.group_name)
        return shared, total.tolist()
    finally:
        if old is None:
            os.environ.pop("GMM_ALLREDUCE_SHM", None)
        else:
            os.environ["GMM_ALLREDUCE_SHM"] = old


@pytest.mark.parametrize("off_ranks", [(0, 1), (1,)], ids=["all", "one"])
def test_turned_off_on_any_rank_means_off_for_all(pools, off_ranks):
    assert pools(2).run(turned_off, off_ranks) == [(False, [2.0] * 10)] * 2


def late_rank():
    """Rank 1 comes 4.5 s late to a sum of a group whose timeout is 3 s: rank 0 raises when its
    timeout ends, and rank 1 at once, finding that rank 0 gave up."""
    import time

    group = dist.new_group([0, 1], timeout=timedelta(seconds=3))
    all_reduce(torch.ones(4), group.group_name)  # setup
    if dist.get_rank() == 1:
        time.sleep(4.5)
    start = time.monotonic()
    try:
        all_reduce(torch.ones(4), group.group_name)
        return "returned", "", time.monotonic() - start
    except RuntimeError as e:
        return "raised", str(e).splitlines()[0], time.monotonic() - start


def test_a_late_rank_ends_in_the_timeout(pools):
    (out0, msg0, t0), (out1, msg1, t1) = pools(2).run(late_rank, timeout=60)
    assert out0 == out1 == "raised"
    assert "rank 1 of the group did not reach the all-reduce within the process group's timeout" in msg0
    assert "rank 0 of the group gave up on the all-reduce" in msg1
    assert 2.5 < t0 < 10 and t1 < 1


def mismatched_sizes():
    group = dist.new_group([0, 1])
    n = 10 if dist.get_rank() == 0 else 12
    all_reduce(torch.ones(4), group.group_name)  # setup
    try:
        all_reduce(torch.ones(n), group.group_name)
        return "returned"
    except RuntimeError as e:
        return str(e).splitlines()[0]


def test_ranks_with_other_sizes_raise(pools):
    """No hang and no mixed sum: both ranks name the disagreement."""
    for message in pools(2).run(mismatched_sizes, timeout=60):
        assert message.startswith("shared-memory all-reduce: ranks disagree on the buffer"), message
        assert "check_ranks=True" in message


def run_script(*args, wrap=()):
    out = subprocess.run([*wrap, sys.executable, SCRIPT, "launch", *args], capture_output=True,
                         text=True, timeout=240)
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ranks = sorted((r for r in reports if "rank" in r), key=lambda r: r["rank"])
    end = next(r for r in reports if "segments_at_end" in r)
    return ranks, end["segments_at_end"], out.stdout + out.stderr


def test_a_killed_rank_makes_the_others_raise():
    """Rank 1 dies by SIGKILL (its segment already unlinked at setup); rank 0, in its next sum,
    finds it dead and raises within seconds, not at the group's 30 s timeout."""
    ranks, left, log = run_script("kill", "2", "")
    assert [r["rank"] for r in ranks] == [0], log
    r0 = ranks[0]
    assert r0["shared"] and r0["sum_ok"] and r0["segments_after_setup"] == [], log
    assert r0["outcome"] == "raised" and "rank 1 of the group" in r0["message"], r0
    assert "died" in r0["message"] and r0["seconds"] < 10, r0
    assert left == [] and segments() == []


needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (a mount namespace with a /dev/shm of its own)")


@needs_unshare
@pytest.mark.parametrize("private", ["1", "0,1"], ids=["one", "both"])
def test_ranks_without_a_common_dev_shm_fall_back(private):
    """Ranks on one host whose /dev/shm differ (a container's own tmpfs): the segments they
    create cannot be opened by the others, so all of them take the process group; sums right."""
    ranks, left, log = run_script("sum", "2", private)
    assert [r["rank"] for r in ranks] == [0, 1], log
    for r in ranks:
        assert not r["shared"] and r["sum_ok"], r
    assert left == []


@needs_unshare
def test_a_dev_shm_without_room_falls_back():
    """Both ranks in a 12 MiB /dev/shm: the second segment (8 MiB) does not fit; setup finds it at
    once (the memory is reserved there) and both take the process group."""
    wrap = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=12m tmpfs /dev/shm && exec "$0" "$@"']
    ranks, left, log = run_script("sum", "2", "", wrap=wrap)
    assert [r["rank"] for r in ranks] == [0, 1], log
    for r in ranks:
        assert not r["shared"] and r["sum_ok"], r
    assert left == []
