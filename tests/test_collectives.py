"""What crosses the process group: one collective per call, check_ranks agreement, and the Ascend
document's own example run over gloo."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.profiler import profile

import gmm_allreduce
from gmm_allreduce.reference import unfused

# A sum through the process group, or through shared memory (the op's same-host path).
COLLECTIVES = ("c10d::allreduce_", "gmm_allreduce::same_host_sum")


def _count_collectives(fn):
    fn()  # the group's first sum sets up its shared memory (collectives of its own)
    with profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in COLLECTIVES)


def count_collectives(groups):
    """On every rank: collectives issued by the op and by the unfused composition, for G groups."""
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = [torch.randn(groups * (groups + 1) // 2, 8, generator=gen)]  # group i has i+1 rows
    weight = [torch.randn(8, 4, generator=gen) for _ in range(groups)]
    kw = dict(group_list=[(i + 1) * (i + 2) // 2 for i in range(groups)], split_item=1)
    return (_count_collectives(lambda: gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, **kw)),
            _count_collectives(lambda: unfused(x, weight, **kw)))


@pytest.mark.parametrize("groups", [1, 64])
def test_one_collective_per_call(pools, groups):
    for fused, composed in pools(2).run(count_collectives, groups):
        assert fused == 1
        assert composed == groups  # the counter does see every collective


def call_with_rank_specific_args(kind):
    """On every rank: a call that rank 1 gets wrong (kind), with check_ranks=True."""
    rank = dist.get_rank()
    x, w = [torch.randn(10, 4)], [torch.randn(4, 3) for _ in range(3)]
    group_list = [2, 5, 10]
    if rank == 1 and kind == "invalid":
        group_list = [2, 5, 9]
    if rank == 1 and kind == "other_shape":
        x = [torch.randn(12, 4)]
        group_list = [2, 5, 12]
    try:
        y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, group_list=group_list, split_item=3,
                                                     check_ranks=True)
        return ("ok", tuple(y[0].shape))
    except (ValueError, TypeError) as e:
        return (type(e).__name__, str(e))


def test_check_ranks_valid_call_passes(pools):
    assert pools(2).run(call_with_rank_specific_args, "valid") == [("ok", (10, 3))] * 2


@pytest.mark.parametrize("kind, message", [
    ("invalid", "check_ranks: rank 1 rejected the call: group_list: the last cumulative offset "
                "must equal x[0].shape[0] = 10, got 9"),
    ("other_shape", "check_ranks: ranks disagree on the call: rank 0 has split_item=3 comm_turn=0 "
                    "dtype=Float outputs=[[10, 3]] rows=[2, 3, 5]; rank 1 has split_item=3 "
                    "comm_turn=0 dtype=Float outputs=[[12, 3]] rows=[2, 3, 7]"),
])
def test_check_ranks_every_rank_raises_the_same_error(pools, kind, message):
    results = pools(2).run(call_with_rank_specific_args, kind, timeout=30)
    assert results == [("ValueError", message)] * 2


def seed_example(out_dir):
    """The Ascend document's example, changing only the import, the device and how hcomm is obtained."""
    rank = dist.get_rank()
    from gmm_allreduce import npu_grouped_mat_mul_all_reduce

    torch.manual_seed(rank)
    x1 = torch.randn(32, 256, dtype=torch.float16)
    w1 = torch.randn(256, 32, dtype=torch.float16)
    x2 = torch.randn(64, 128, dtype=torch.float16)
    w2 = torch.randn(128, 64, dtype=torch.float16)
    group_list = None
    split_item = 0
    hccl_group = dist.group.WORLD.group_name  # the Ascend example asks HCCL for its comm name here
    reduce_op = "sum"
    comm_turn = 0
    y = npu_grouped_mat_mul_all_reduce([x1, x2], [w1, w2], hccl_group, bias=[],
                                       group_list=group_list, split_item=split_item,
                                       reduce_op=reduce_op, comm_turn=comm_turn)
    if rank == 0:
        for i, yi in enumerate(y):
            yi.cpu().numpy().tofile(os.path.join(out_dir, f"y_{i}.bin"))
    # The reference: every rank's float64 partial, summed.
    ref = [x1.double() @ w1.double(), x2.double() @ w2.double()]
    for r in ref:
        dist.all_reduce(r)
    return [r.numpy() for r in ref]


def test_seed_example(pools):
    with tempfile.TemporaryDirectory() as d:
        refs = pools(2).run(seed_example, d)[0]
        for i, ref in enumerate(refs):
            y = np.fromfile(os.path.join(d, f"y_{i}.bin"), dtype=np.float16).reshape(ref.shape)
            # fp16 outputs of magnitude ~25: a few ulp (1/64 each) of rounding
            np.testing.assert_allclose(y.astype(np.float64), ref, atol=0.25, rtol=1e-2)
