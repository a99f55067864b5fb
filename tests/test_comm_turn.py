"""comm_turn >= 1: the output cut into chunks of rows, each all-reduced while the next computes.

The result must equal the float64 reference (exactly for small-integer inputs), equal comm_turn=0
up to the rounding of the reduction, be identical on all ranks, and issue one collective per
non-empty chunk.
"""

import dataclasses
import math

import pytest
import torch
from test_semantics import SHAPES, assert_all_ranks_identical, run_cases

import gmm_allreduce
from gmm_allreduce.cases import TOLERANCE, Case, check

TURNS = [1, 2, 3, 7, 1000]  # 1000: more chunks asked for than there are rows


def turn_cases(split_item):
    cases = []
    for i, shape in enumerate(SHAPES[split_item]):
        for integers, dtype, bias_dtype in ((True, torch.float32, torch.float32),
                                            (False, torch.bfloat16, torch.float32)):
            base = Case(split_item=split_item, dtype=dtype, bias_dtype=bias_dtype,
                        integers=integers, seed=i, group_list_type=i % 2,
                        **{**shape, "name": f"{shape['name']}-{'int' if integers else 'rand'}"})
            cases += [dataclasses.replace(base, name=f"{base.name}-turn{t}", comm_turn=t)
                      for t in [0, *TURNS]]
    return cases


@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_comm_turn_matches_reference_and_turn0(pools, world, split_item):
    cases = turn_cases(split_item)
    per_rank = pools(world).run(run_cases, cases)
    turn0 = {}
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, world)
        base = case.name.rsplit("-turn", 1)[0]
        if case.comm_turn == 0:
            turn0[base] = outputs
            continue
        for a, b in zip(outputs, turn0[base]):
            if case.integers:
                assert torch.equal(a, b), case.name
            else:  # the ranks' partials may be summed in another order: both near the reference
                atol, rtol = (2 * t * math.sqrt(world) for t in TOLERANCE[case.dtype])
                torch.testing.assert_close(a, b, atol=atol, rtol=rtol,
                                           msg=lambda m, c=case: f"{c.name}: {m}")
    assert_all_ranks_identical(cases, per_rank)


# (m per group, n per group, comm_turn) -> collectives: at most comm_turn, never an empty chunk.
CHUNKS = [
    ((10, 6), (4, 4), 0, 1),
    ((10, 6), (4, 4), 1, 1),
    ((10, 6), (4, 4), 4, 4),
    ((10, 6), (4, 4), 16, 16),    # one row per chunk
    ((10, 6), (4, 4), 100, 16),   # capped by the row count
    ((3, 0, 2), (5, 5, 5), 9, 5),  # the empty group adds no chunk
    ((4, 4), (0, 3), 8, 4),       # rows of width 0 hold no elements: no chunk of their own
    ((0,), (3,), 5, 0),           # nothing to reduce: no collective at all
]


def count_chunk_collectives(chunks):
    """On every rank: the collectives of each call of CHUNKS (through shared memory or gloo)."""
    from test_collectives import _count_collectives

    out = []
    for m, n, turn, _ in chunks:
        x = [torch.ones(mi, 3) for mi in m]
        w = [torch.ones(3, ni) for ni in n]
        out.append(_count_collectives(
            lambda x=x, w=w, turn=turn: gmm_allreduce.grouped_mat_mul_all_reduce(x, w, comm_turn=turn)))
    return out


def test_one_collective_per_nonempty_chunk(pools):
    """At world size 2 (one rank sums nothing: no collective at all)."""
    expected = [c[3] for c in CHUNKS]
    assert pools(2).run(count_chunk_collectives, CHUNKS) == [expected, expected]


def test_chunks_balance_elements_not_rows(world1):
    """Groups of different widths: chunk boundaries follow elements, so results stay correct."""
    x = [torch.randn(50, 8), torch.randn(3, 8), torch.randn(20, 8)]
    w = [torch.randn(8, 1), torch.randn(8, 200), torch.randn(8, 7)]
    ref = [xi @ wi for xi, wi in zip(x, w)]
    for turn in (2, 3, 5, 11):
        y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, comm_turn=turn)
        for a, b in zip(y, ref):
            torch.testing.assert_close(a, b)


def test_the_world_size_1_switch_issues_every_chunk_collective(world1):
    """The test-only switch that GPU tests use to run NCCL on one GPU: at world size 1 the op then
    issues one collective per non-empty chunk, as at world size 2 (none without it), for both ops,
    with the same results."""
    from torch.profiler import profile

    def collectives(call):
        with profile() as prof:
            call()
        return sum(1 for e in prof.events() if e.name.startswith("c10d::") and "reduce" in e.name)

    x, w = [torch.randn(10, 3), torch.randn(6, 3)], [torch.randn(3, 4), torch.randn(3, 4)]
    rows = [torch.cat(x)]
    calls = [lambda: gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, comm_turn=4),
             lambda: gmm_allreduce.grouped_mat_mul_reduce_scatter(rows, w, world1, split_item=3,
                                                                  group_list=[10, 16], comm_turn=4)]
    plain = [[t.clone() for t in call()] for call in calls]
    assert [collectives(call) for call in calls] == [0, 0]
    torch.ops.gmm_allreduce._collectives_at_world_size_1(True)
    try:
        assert [collectives(call) for call in calls] == [4, 4]
        for call, want in zip(calls, plain):
            for a, b in zip(call(), want):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    finally:
        torch.ops.gmm_allreduce._collectives_at_world_size_1(False)
