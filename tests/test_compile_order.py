"""torch.compile (Inductor, CPU) of a function that calls the op between functional-collective
all-reduces, on the op's own group and on another: the compiled results equal eager's, nothing
hangs, and Inductor issues the collectives in program order around the op.

The op runs its all-reduce inside one kernel, which Inductor lowers as a fallback kernel; its
communication passes (simple_overlap, on by default since torch 2.14; pytorch/pytorch issue
189454) move a collective earlier over any node they take for compute. On ranks that run the same
graph that only reorders them alike; on ranks whose graphs differ (pipeline stages, asymmetric
send/recv) it can pair unrelated collectives or hang. So the op must stay where the program put it
relative to the collectives (gmm_allreduce/inductor.py makes Inductor see it as one)."""

import pytest
import torch.distributed as dist

import gmm_allreduce

OP = "gmm_allreduce.grouped_mat_mul_all_reduce"


def collective_order(code: str) -> list[str]:
    """The collectives that Inductor's generated code issues, in order: "op" for ours, "ar" for a
    functional all-reduce."""
    order = []
    for line in code.splitlines():
        call = line.strip()
        if call.startswith("#"):
            continue
        if f"torch.ops.{OP}.default(" in call:
            order.append("op")
        elif "torch.ops._c10d_functional.all_reduce" in call:
            order.append("ar")
    return order


def compiled_against_eager(world: int):
    """On every rank: the program below compiled with Inductor, against eager, and the order in
    which the generated code issues its collectives."""
    import torch._inductor.config
    from torch._inductor.utils import run_and_get_code
    from torch.distributed import _functional_collectives as funcol

    torch._dynamo.reset()
    torch._inductor.config.force_disable_caches = True  # a cached graph would hide the lowering
    rank = dist.get_rank()
    if world == 2:  # the op's group and another group of the same ranks
        tp, dp = dist.group.WORLD, dist.new_group([0, 1])
    else:  # tensor-parallel pairs {0,1} {2,3} and data-parallel pairs {0,2} {1,3}
        tp, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
        dp, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    tp_name, dp_name = tp.group_name, dp.group_name

    def program(x, w, before):
        a = funcol.all_reduce(before * 2, "sum", tp_name)  # before the op, on its group
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], w, tp_name, group_list=[3, 3, 4],
                                                        group_list_type=1, split_item=3)
        # after the op and independent of it, on its group: what a pass may hoist above it
        c = funcol.all_reduce(before + 3, "sum", tp_name)
        b = funcol.all_reduce(y + 1, "sum", dp_name)  # on the op's output, another group
        d = funcol.all_reduce(x.sum(0), "sum", dp_name)  # independent, another group
        return a, y, c, b, d

    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(-2, 3, (10, 8), generator=gen).float()
    w = [torch.randint(-2, 3, (8, 6), generator=gen).float() for _ in range(3)]
    before = torch.randint(-2, 3, (5,), generator=gen).float()
    eager = program(x, w, before)
    compiled, codes = run_and_get_code(torch.compile(program, fullgraph=True), x, w, before)
    again = torch.compile(program, fullgraph=True)(x, w, before)  # the cached graph
    same = all(torch.equal(e, c) for e, c in zip(eager, compiled)) and all(
        torch.equal(e, c) for e, c in zip(eager, again))
    return same, collective_order("\n".join(codes))


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_compiled_collectives_stay_in_program_order_around_the_op(pools, world):
    for same, order in pools(world).run(compiled_against_eager, world, timeout=600):
        assert same, "compiled results differ from eager"
        assert order == ["ar", "op", "ar", "ar", "ar"], order
