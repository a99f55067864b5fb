"""Ranks that disagree: one rank with other shapes, another split mode, other group rows, another
comm_turn or dtype, or an invalid call. Never a silently wrong result and never a hang:

- check_ranks=True: every rank raises the same clear error, within 5 s.
- check_ranks=False, buffers of one size: the plan fingerprint that rides on the all-reduce makes
  every rank raise the same clear error.
- check_ranks=False, one rank invalid: it raises at once; the others' wait ends with the group's
  timeout (3 s here).
- check_ranks=False, buffers of different sizes: through shared memory, every rank raises; through
  the process group, a mismatched collective, which the backend handles (see
  test_size_mismatch_without_check_ranks).
"""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce

GROUP_TIMEOUT_S = 3

# Rank 0 always makes the reference call: split_item 3, x [10, 4], groups of 2, 3 and 5 rows.
BASE = dict(split_item=3, m=(2, 3, 5), k=4, n=3, dtype=torch.float32, comm_turn=0)

# What rank 1 changes, and whether its buffer keeps rank 0's size (10 * 3 elements).
DISAGREEMENTS = {
    "other_split_same_size": dict(split_item=2),  # G x tensors, one y of the same shape
    "other_shape_same_size": dict(m=(3, 3, 4), n=3),  # other group rows, same [10, 3] output
    "other_n_same_size": dict(m=(2, 3, 1), n=5),  # [6, 5]: 30 elements like [10, 3]
    "other_comm_turn": dict(comm_turn=2),
    "other_dtype": dict(dtype=torch.float64),
    "other_rows_other_size": dict(m=(2, 3, 7)),
    "invalid": dict(invalid=True),
}


def _call(spec, group, check_ranks):
    gen = torch.Generator().manual_seed(dist.get_rank())
    m, k, n = spec["m"], spec["k"], spec["n"]
    w = [torch.randn(k, n, generator=gen, dtype=spec["dtype"]) for _ in m]
    if spec["split_item"] == 2:
        x = [torch.randn(mi, k, generator=gen, dtype=spec["dtype"]) for mi in m]
        group_list = None
    else:
        x = [torch.randn(sum(m), k, generator=gen, dtype=spec["dtype"])]
        group_list = [sum(m[: i + 1]) for i in range(len(m))]
        if spec.get("invalid"):
            group_list[-1] -= 1
    return gmm_allreduce.grouped_mat_mul_all_reduce(
        x, w, group, group_list=group_list, split_item=spec["split_item"],
        comm_turn=spec["comm_turn"], check_ranks=check_ranks)


def disagree(kind, check_ranks):
    """On every rank: the call (rank 1 changed by `kind`) on a fresh group with a short timeout.
    Returns (outcome, exception type, message, seconds)."""
    group = dist.new_group(timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    spec = dict(BASE, **(DISAGREEMENTS[kind] if dist.get_rank() == 1 else {}))
    start = time.monotonic()
    try:
        outputs = _call(spec, group, check_ranks)
        outcome = ("returned", "", str([tuple(y.shape) for y in outputs]))
    except Exception as e:  # noqa: BLE001 - the outcome is what is tested
        outcome = ("raised", type(e).__name__, str(e).splitlines()[0])
    return (*outcome, time.monotonic() - start)


@pytest.mark.parametrize("kind", list(DISAGREEMENTS))
def test_check_ranks_every_rank_raises_the_same_error_fast(pools, kind):
    results = pools(2).run(disagree, kind, True, timeout=60)
    (outcome, exc, message, _), (outcome1, exc1, message1, _) = results
    assert outcome == outcome1 == "raised" and exc == exc1 == "ValueError"
    assert message == message1 and message.startswith("check_ranks: ")
    assert "rank 1" in message
    assert max(r[3] for r in results) < 5


@pytest.mark.parametrize("kind", ["other_split_same_size", "other_shape_same_size", "other_n_same_size"])
def test_same_size_disagreement_raises_on_every_rank(pools, kind):
    """No check_ranks, and the buffers happen to have one size: the all-reduce completes, and the
    fingerprint it carried makes every rank raise instead of returning a mixed sum."""
    results = pools(2).run(disagree, kind, False, timeout=60)
    for outcome, exc, message, _ in results:
        assert (outcome, exc) == ("raised", "ValueError")
        assert message.startswith("ranks disagree on the call: their plans ")
        assert "Pass check_ranks=True" in message


def test_invalid_call_ends_in_the_groups_timeout(pools):
    """No check_ranks, rank 1's call invalid: rank 1 raises its ValueError before communicating;
    rank 0's all-reduce has no partner and the group's timeout ends it with an error."""
    (out0, exc0, msg0, t0), (out1, exc1, msg1, t1) = pools(2).run(disagree, "invalid", False, timeout=60)
    assert (out1, exc1) == ("raised", "ValueError") and msg1.startswith("group_list: the last")
    assert t1 < 1
    assert out0 == "raised" and "Timed out" in msg0, msg0
    assert GROUP_TIMEOUT_S - 0.5 < t0 < GROUP_TIMEOUT_S + 10
    # rank 0 ended in its first call's shared-memory setup: its segment went all the same
    from shm_main import segments

    assert segments() == []


def test_fingerprint_costs_no_collective(pools):
    """The fingerprint rides on the op's one all-reduce (docs/testing.md)."""
    from test_collectives import count_collectives

    for fused, _ in pools(2).run(count_collectives, 8):
        assert fused == 1


# A size mismatch, through the process group (GMM_ALLREDUCE_SHM=0), is a mismatched collective for
# the backend. Run in fresh processes: gloo's answer may be to abort the process (it did, as of
# torch 2.13: "Received data size doesn't match expected size"), which must not take the test's
# rank pool with it.
SIZE_MISMATCH_SCRIPT = os.path.join(os.path.dirname(__file__), "size_mismatch_main.py")


@pytest.mark.parametrize("debug", ["DETAIL", "OFF"])
@pytest.mark.parametrize("shm", ["1", "0"], ids=["shm", "gloo"])
def test_size_mismatch_without_check_ranks(debug, shm):
    """Different buffer sizes, no check_ranks. Through shared memory (the default on one host)
    both ranks raise a clear error. Through gloo, with TORCH_DISTRIBUTED_DEBUG=DETAIL PyTorch checks
    every collective and each rank raises a clear mismatch error; without it, gloo aborts a rank
    or raises. Either way: no hang, and no rank returns a result."""
    env = dict(os.environ, TORCH_DISTRIBUTED_DEBUG=debug, GMM_ALLREDUCE_SHM=shm)
    proc = subprocess.run([sys.executable, SIZE_MISMATCH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert not [r for r in reports if r["outcome"] == "returned"], proc.stdout
    if shm == "1":
        assert len(reports) == 2, proc.stdout + proc.stderr
        for r in reports:
            assert r["outcome"] == "raised", r
            assert "shared-memory all-reduce: ranks disagree on the buffer" in r["message"], r
    elif debug == "DETAIL":
        assert len(reports) == 2, proc.stdout + proc.stderr
        for r in reports:
            assert r["outcome"] == "raised" and "Detected mismatch between collectives" in r["message"]
