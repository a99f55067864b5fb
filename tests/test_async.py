"""async_op=True: the op returns once its collectives are started and registers its work for its
outputs; after gmm_allreduce.wait (or wait_tensor on any one output) the results equal the
synchronous call's, bitwise, over shared memory and over gloo, for both collective ops, every
split mode, comm_turn and reduce_dtype. Errors of the deferred part come at the wait; under
torch.compile async_op is refused."""

import ctypes
import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import new_group_with_shm

import gmm_allreduce

WAIT = torch.ops._c10d_functional.wait_tensor


def calls(rank):
    """(name, op, x, weight, kwargs) for every split mode of both ops."""
    gen = torch.Generator().manual_seed(rank)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype)

    w3 = [r(8, 6) for _ in range(3)]
    out = []
    for turn in (0, 2):
        for reduce_dtype in (None, torch.float32):
            kw = dict(comm_turn=turn, reduce_dtype=reduce_dtype)
            tag = f"turn{turn}-{reduce_dtype}"
            out += [
                (f"ar-split0-{tag}", gmm_allreduce.grouped_mat_mul_all_reduce,
                 [r(4, 8), r(0, 8), r(5, 8)], w3, dict(split_item=0, **kw)),
                (f"ar-split1-{tag}", gmm_allreduce.grouped_mat_mul_all_reduce, [r(12, 8)], w3,
                 dict(split_item=1, group_list=[3, 3, 12], bias=[r(6, dtype=torch.float32)] * 3, **kw)),
                (f"ar-split2-{tag}", gmm_allreduce.grouped_mat_mul_all_reduce,
                 [r(4, 8), r(5, 8), r(1, 8)], w3, dict(split_item=2, **kw)),
                (f"ar-split3-{tag}", gmm_allreduce.grouped_mat_mul_all_reduce, [r(12, 8)], w3,
                 dict(split_item=3, group_list=[3, 3, 12], **kw)),
                (f"rs-split3-{tag}", gmm_allreduce.grouped_mat_mul_reduce_scatter, [r(12, 8)], w3,
                 dict(split_item=3, group_list=[5, 7, 12], **kw)),
            ]
    return out


def async_equals_sync(shm):
    group = new_group_with_shm(shm)
    assert torch.ops.gmm_allreduce._shared_memory(group.group_name) == (shm == "1")
    out = {}
    for name, op, x, w, kw in calls(dist.get_rank()):
        want = op(x, w, group, **kw)
        got = gmm_allreduce.wait(op(x, w, group, async_op=True, **kw))
        out[name] = len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    return out


@pytest.mark.parametrize("shm", ["1", "0"], ids=["shm", "gloo"])
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_async_results_equal_the_synchronous_ones(pools, world, shm):
    for per_rank in pools(world).run(async_equals_sync, shm):
        assert all(per_rank.values()) and len(per_rank) == 20, per_rank


def several_outputs(shm):
    """Split 1, three outputs: waiting for the last one alone finishes them all; waiting again,
    on any, is a no-op."""
    group = new_group_with_shm(shm)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, w = [torch.randn(12, 8, generator=gen)], [torch.randn(8, 6, generator=gen) for _ in range(3)]
    want = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, group, split_item=1, group_list=[3, 3, 12])
    got = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, group, split_item=1, group_list=[3, 3, 12],
                                                   async_op=True)
    WAIT(got[2])
    first = all(torch.equal(a, b) for a, b in zip(got, want))
    for t in got:
        WAIT(t)
    return first and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("shm", ["1", "0"], ids=["shm", "gloo"])
def test_any_output_finishes_the_call(pools, shm):
    assert pools(2).run(several_outputs, shm) == [True, True]


def disagree_at_the_wait(split_item):
    """Rank 1 calls with other group rows of the same size: the fingerprint check, deferred, raises
    at the wait on both ranks, not at the call; and at every later wait, on any output."""
    group = new_group_with_shm("0")
    x, w = [torch.ones(6, 4)], [torch.ones(4, 3)] * 2
    gl = [2, 6] if dist.get_rank() == 0 else [3, 6]
    y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, group, split_item=split_item, group_list=gl,
                                                 async_op=True)
    messages = []
    for outputs in (y, y, y[::-1], y[-1:]):
        try:
            gmm_allreduce.wait(outputs)
            messages.append("returned")
        except Exception as e:  # noqa: BLE001  (the test reports what was raised)
            messages.append(f"{type(e).__name__}: {e}")
    return messages


@pytest.mark.parametrize("split_item", [1, 3])
def test_errors_of_the_deferred_part_come_at_every_wait(pools, split_item):
    for messages in pools(2).run(disagree_at_the_wait, split_item):
        assert messages[0].startswith("ValueError: ranks disagree on the call"), messages
        assert messages == [messages[0]] * 4, messages


def test_unwaited_calls_are_released_once_their_outputs_are_freed(world1):
    """60 calls with 4 MB outputs, each freed unwaited: each is released at the next async call
    (c10d's registry of works keeps what is registered until it is waited for), so neither the
    registry nor the memory grows; a call whose outputs are alive stays, and its wait is right."""
    registered = torch._C._distributed_c10d._get_work_registry_size

    def resident_bytes():  # with what malloc keeps free handed back first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    x, w = torch.randn(1024, 64), [torch.randn(64, 1024)]

    def call():
        return gmm_allreduce.grouped_mat_mul_all_reduce([x], w, world1, split_item=3,
                                                        group_list=[1024], async_op=True)

    base = registered()
    gmm_allreduce.wait(call())
    assert registered() == base  # a waited call leaves nothing registered
    for _ in range(10):  # the allocators' steady state
        call()
    rss = resident_bytes()
    for _ in range(60):
        y = call()
        del y
    kept = call()
    assert registered() == base + 1
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # ASan holds freed memory a while
        assert resident_bytes() - rss < 100 << 20  # 60 unreleased calls would hold 240 MB more
    (y,) = gmm_allreduce.wait(kept)
    torch.testing.assert_close(y, x @ w[0])
    assert registered() == base
    # Only a view of the output kept: the call is released, and a wait on the view raises rather
    # than return what was never written.
    view = call()[0].view(-1)
    call()
    with pytest.raises(RuntimeError, match="this call was released unfinished"):
        gmm_allreduce.wait([view])


def test_world1_gradients_and_compile(world1):
    x = torch.randn(6, 4, requires_grad=True)
    w = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    (y,) = gmm_allreduce.wait(gmm_allreduce.grouped_mat_mul_all_reduce(
        [x], w, world1, split_item=3, group_list=[2, 6], async_op=True))
    y.sum().backward()
    torch.testing.assert_close(x.grad[:2], w[0].detach().sum(1).expand(2, 4))

    def fn(x):
        return gmm_allreduce.grouped_mat_mul_all_reduce([x], w, world1, split_item=3,
                                                        group_list=[2, 6], async_op=True)[0]

    with pytest.raises(Exception, match="async_op=True is not supported under torch.compile"):
        torch.compile(fn, fullgraph=True, backend="eager")(x.detach())
