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


def with_setting(ranks, name, value):
    """`name`=`value` on `ranks`: a new group, then whether it took shared memory and its sum (or
    the error its setup raised)."""
    old = os.environ.get(name)
    if dist.get_rank() in ranks:
        os.environ[name] = value
    try:
        group = dist.new_group([0, 1])
        try:
            shared = OPS._shared_memory(group.group_name)
        except ValueError as e:
            return "ValueError", str(e).splitlines()[0]
        total = all_reduce(torch.ones(10), group.group_name)
        return shared, total.tolist()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest.mark.parametrize("value", ["0", "false", "Off", "no "])
@pytest.mark.parametrize("off_ranks", [(0, 1), (1,)], ids=["all", "one"])
def test_turned_off_on_any_rank_means_off_for_all(pools, off_ranks, value):
    assert pools(2).run(with_setting, off_ranks, "GMM_ALLREDUCE_SHM", value) == [(False, [2.0] * 10)] * 2


@pytest.mark.parametrize("value", ["1", "TRUE", "on", "yes", ""])
def test_turned_on(pools, value):
    assert pools(2).run(with_setting, (0, 1), "GMM_ALLREDUCE_SHM", value) == [(True, [2.0] * 10)] * 2


@pytest.mark.parametrize("name, value", [("GMM_ALLREDUCE_SHM", "maybe"), ("GMM_ALLREDUCE_SHM", "2"),
                                         ("GMM_ALLREDUCE_SHM_BYTES", "lots"),
                                         ("GMM_ALLREDUCE_SHM_BYTES", "1k")])
def test_a_setting_not_understood_raises_on_every_rank(pools, name, value):
    """Set on rank 1 only: rank 1 names the variable and its value; rank 0 names rank 1; neither
    waits for the other."""
    (exc0, msg0), (exc1, msg1) = pools(2).run(with_setting, (1,), name, value, timeout=60)
    assert exc0 == exc1 == "ValueError"
    assert msg1.startswith(f"{name}: expected") and repr(value)[1:-1] in msg1, msg1
    assert msg0.startswith("rank 1 of the group could not read its settings"), msg0


def first_calls_from_two_threads(shm):
    """Two groups of the same two ranks, each first called from a thread of its own: rank 0 starts
    group a's call, then b's; rank 1 the other way round. Each group's setup is its own: neither
    waits for the other."""
    import threading
    import time

    group = {k: dist.new_group([0, 1], timeout=timedelta(seconds=15)) for k in "ab"}
    order = "ab" if dist.get_rank() == 0 else "ba"
    results = {}

    def call(key):
        try:
            results[key] = all_reduce(torch.ones(1000), group[key].group_name).eq(2).all().item()
        except RuntimeError as e:
            results[key] = str(e).splitlines()[0]

    old = os.environ.get("GMM_ALLREDUCE_SHM")
    os.environ["GMM_ALLREDUCE_SHM"] = shm
    start = time.monotonic()
    try:
        threads = []
        for key in order:
            threads.append(threading.Thread(target=call, args=(key,)))
            threads[-1].start()
            time.sleep(0.5)
        for t in threads:
            t.join()
    finally:
        if old is None:
            os.environ.pop("GMM_ALLREDUCE_SHM", None)
        else:
            os.environ["GMM_ALLREDUCE_SHM"] = old
    return results, time.monotonic() - start, [OPS._shared_memory(group[k].group_name) for k in "ab"]


@pytest.mark.parametrize("shm", ["1", "0"], ids=["shm", "gloo"])
def test_two_threads_set_up_two_groups_at_once(pools, shm):
    for results, seconds, shared in pools(2).run(first_calls_from_two_threads, shm, timeout=90):
        assert results == {"a": True, "b": True} and seconds < 5, (results, seconds)
        assert shared == [shm == "1"] * 2


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


def mismatches_checked_every_spin(rounds):
    """`rounds` new groups, each called with other sizes on its two ranks, one rank 1 ms behind
    the other in turn, while a waiting rank checks its peers at every spin (1024 by default): the
    late rank publishes its round, finds the mismatch and gives up, all within the waiting rank's
    spin, and the waiting rank must still find the mismatch itself rather than blame the other."""
    import time

    OPS._shm_peer_check_spins(1)
    try:
        messages = []
        for i in range(rounds):
            group = dist.new_group([0, 1])
            all_reduce(torch.ones(4), group.group_name)  # setup
            if dist.get_rank() == i % 2:
                time.sleep(0.001)
            try:
                all_reduce(torch.ones(10 + 2 * dist.get_rank()), group.group_name)
                messages.append("returned")
            except RuntimeError as e:
                messages.append(str(e).splitlines()[0])
            dist.destroy_process_group(group)
        return messages
    finally:
        OPS._shm_peer_check_spins(1024)


def test_a_peer_that_publishes_then_gives_up_is_not_the_cause(pools):
    """Both ranks name the disagreement, every round (before: in about one round of five, the
    waiting rank raised "rank r of the group gave up")."""
    for messages in pools(2).run(mismatches_checked_every_spin, 40, timeout=120):
        wrong = [m for m in messages
                 if not m.startswith("shared-memory all-reduce: ranks disagree on the buffer")]
        assert not wrong, wrong


def run_script(*args, wrap=(), env=None, timeout=240):
    out = subprocess.run([*wrap, sys.executable, SCRIPT, "launch", *args], capture_output=True,
                         text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})
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


def private_dev_shm(size="64m"):
    """The command prefix that runs a command in a mount namespace with a tmpfs of its own on
    /dev/shm, open to every user as the real one is."""
    return ["unshare", "-m", "sh", "-c",
            f'mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && exec "$0" "$@"']


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
def test_a_dev_shm_without_room_refuses_only_the_calls_that_do_not_fit():
    """Both ranks in a 4 MiB /dev/shm: setup needs a page each; a 400 KB sum, 1 MiB per rank; a
    4 MB sum would need 8 MiB per rank, which no rank can reserve (posix_fallocate says so, not
    SIGBUS), so every rank takes the process group for it; and a small sum still goes through
    shared memory. The same for an all-to-all of 2 MB per rank and one of a few rows."""
    ranks, left, log = run_script("room", "2", "", wrap=private_dev_shm("4m"))
    assert [r["rank"] for r in ranks] == [0, 1], log
    for r in ranks:
        assert r["shared"] and r["sum_ok"] and r["big_ok"] and r["small_ok"], r
        pinned, refused = r["stats"]
        assert refused == 1 and pinned == 4096 + 2 * (512 << 10), r
        # The all-to-alls: 2 MB for the other rank refused alike, a few rows through shm.
        assert r["a2a_ok_8000"] and r["a2a_ok_8"] and r["stats_after_a2a"][1] == 2, r
    assert left == []


@needs_unshare
@pytest.mark.parametrize("cap", [None, "1m"], ids=["default", "capped"])
def test_a_group_pins_what_it_needs_and_frees_it_when_destroyed(cap):
    """/dev/shm in use, measured in a private tmpfs at world 2: a page per rank after setup; then
    what the largest sum so far needed, in powers of two, up to 8 MiB per rank (or the cap); and,
    once the group is destroyed and freed, nothing, without any later call."""
    env = {} if cap is None else {"GMM_ALLREDUCE_SHM_BYTES": cap}
    ranks, left, log = run_script("memory", "2", "", wrap=private_dev_shm(), env=env)
    assert [r["rank"] for r in ranks] == [0, 1], log
    limit = 8 << 20 if cap is None else 1 << 20
    for r in ranks:
        assert r["shared"] and all(r[f"sum_ok_{n}"] for n in (1000, 100_000, 3_000_000)), r
        grown = [r[k] - r["before"] for k in ("setup", "after_1000", "after_100000",
                                              "after_3000000")]
        assert grown[0] <= 2 * 8192, r
        assert grown == sorted(grown) and grown[3] <= 2 * limit, r
        assert r["pinned_1000"] == 4096 + 2 * (64 << 10), r
        assert r["pinned_100000"] == 4096 + 2 * min(512 << 10, (limit - 8192) // 2), r
        assert limit // 2 < r["pinned_3000000"] <= limit, r
        assert r["destroyed"] == r["before"], r
    assert left == []


@needs_unshare
def test_a_kill_during_setup_leaves_nothing():
    """Every rank killed the instant a segment appears in /dev/shm (mid-setup), three times: the
    segment bears a whole header from its first instant, so the next job's setup removes it."""
    ranks, left, log = run_script("setupkill", "2", wrap=private_dev_shm())
    killed = [json.loads(line) for line in log.splitlines() if line.startswith('{"left_by_kill"')]
    assert len(killed) == 3 and all(k["left_by_kill"] for k in killed), log
    assert [r["rank"] for r in ranks] == [0, 1], log
    assert all(r["shared"] and r["sum_ok"] for r in ranks), log
    assert left == [], log


@needs_unshare
@pytest.mark.parametrize("kind", ["fifo", "truncated"])
def test_files_planted_by_another_user_neither_block_nor_crash_setup(kind):
    """An unprivileged user plants under this user's prefix a FIFO and a symlink to a FIFO (an
    open of either would block for good), or a file whose size keeps changing (a mapping of it
    would fault; this user has one such file too). Setup skips them all: the job takes shared
    memory and sums right, well within its timeout."""
    ranks, left, log = run_script("hostile", "2", kind, wrap=private_dev_shm(), timeout=120)
    assert [r["rank"] for r in ranks] == [0, 1], log
    for r in ranks:
        assert r["shared"] and r["sum_ok"], r
    assert left == [], log
