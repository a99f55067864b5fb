"""grouped_mat_mul_reduce_scatter: rank r gets rows [r * M / n, (r + 1) * M / n) of the summed
output. Against the float64 reference at world sizes 1, 2, 4 and 8 for every dtype, both
single-output split modes, empty groups, bias, comm_turn >= 1 and reduce_dtype; the collectives it
issues; its errors before any communication; gradients against the reference and gradcheck;
opcheck and torch.compile."""

import math

import pytest
import torch
import torch.distributed as dist
from dist_utils import new_group_with_shm
from torch.profiler import profile

import gmm_allreduce
from gmm_allreduce.cases import TOLERANCE, Case, call_kwargs, expected, make_inputs

# Single-output shapes whose M (24, 16, 8) divides by 1, 2, 4 and 8: an empty group, one group,
# K = 0 (the bias alone).
SHAPES = {
    3: [dict(name="uneven_empty", m=(5, 0, 12, 7), k=(13,) * 4, n=(9,) * 4),
        dict(name="single", m=(16,), k=(24,), n=(17,)),
        dict(name="k0", m=(3, 5), k=(0, 0), n=(6, 6))],
    2: [dict(name="uneven_empty", m=(5, 0, 11), k=(13, 17, 5), n=(9,) * 3),
        dict(name="single", m=(8,), k=(24,), n=(17,))],
}
DTYPES = {"fp16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.float32),
          "fp32": (torch.float32, torch.float32)}


def cases_for(split_item, dtype_id, comm_turn):
    dtype, bias_dtype = DTYPES[dtype_id]
    return [Case(split_item=split_item, dtype=dtype, bias_dtype=bias_dtype if i % 2 == 0 else None,
                 integers=integers, group_list_form=("list", "tensor")[i % 2], seed=i,
                 comm_turn=comm_turn, **{**shape, "name": f"{shape['name']}-{int(integers)}"})
            for i, shape in enumerate(SHAPES[split_item]) for integers in (True, False)]


def scatter_cases(cases, reduce_dtype=None, gloo=False):
    """Through the world group (shared memory at world > 1), or a gloo one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = new_group_with_shm("0") if gloo else dist.group.WORLD
    assert torch.ops.gmm_allreduce._shared_memory(group.group_name) == (world > 1 and not gloo)
    out = []
    for case in cases:
        inputs = make_inputs(case, rank, world)
        before = [t.clone() for t in (*inputs["x"], *inputs["weight"])]
        (y,) = gmm_allreduce.grouped_mat_mul_reduce_scatter(
            inputs["x"], inputs["weight"], group, **call_kwargs(case, inputs),
            reduce_dtype=reduce_dtype)
        assert all(torch.equal(a, b) for a, b in zip(before, (*inputs["x"], *inputs["weight"])))
        out.append(y.clone())
    return out


def check_rows(case, y, world, rank):
    (ref,) = expected(case, world)
    rows = ref.shape[0] // world
    want = ref[rank * rows:(rank + 1) * rows]
    assert y.dtype == case.dtype and tuple(y.shape) == tuple(want.shape), (case.name, y.shape)
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(y.double(), want, atol=atol * math.sqrt(world), rtol=rtol,
                               msg=lambda m: f"{case.name} rank {rank}: {m}")


@pytest.mark.parametrize("comm_turn", [0, 3])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("split_item", [2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("world", [1, 2, 4, 8], ids=lambda w: f"w{w}")
def test_matches_reference(pools, world, split_item, dtype_id, comm_turn):
    cases = cases_for(split_item, dtype_id, comm_turn)
    for rank, outputs in enumerate(pools(world).run(scatter_cases, cases)):
        for case, y in zip(cases, outputs):
            check_rows(case, y, world, rank)


@pytest.mark.parametrize("comm_turn", [0, 3])
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_matches_reference_over_gloo(pools, world, comm_turn):
    """The process group's reduce-scatter (across hosts, or GMM_ALLREDUCE_SHM=0)."""
    cases = cases_for(3, "bf16", comm_turn) + cases_for(2, "fp16", comm_turn)
    for rank, outputs in enumerate(pools(world).run(scatter_cases, cases, None, True)):
        for case, y in zip(cases, outputs):
            check_rows(case, y, world, rank)


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_reduce_dtype_float32(pools, world):
    cases = cases_for(3, "bf16", 2) + cases_for(2, "fp16", 0)
    for rank, outputs in enumerate(pools(world).run(scatter_cases, cases, torch.float32)):
        for case, y in zip(cases, outputs):
            check_rows(case, y, world, rank)


# What the profiler sees of a reduce-scatter: through shared memory, or the process group's under
# whichever name this torch gives the one-tensor one.
REDUCE_SCATTERS = ("gmm_allreduce::shm_reduce_scatter", "c10d::_reduce_scatter_base_",
                   "c10d::reduce_scatter_tensor_coalesced_", "c10d::reduce_scatter_")


def count_reduce_scatters(comm_turn, gloo):
    group = new_group_with_shm("0") if gloo else dist.group.WORLD
    x, w = [torch.randn(16, 4)], [torch.randn(4, 3) for _ in range(2)]
    kw = dict(group_list=[5, 16], split_item=3, comm_turn=comm_turn)
    gmm_allreduce.grouped_mat_mul_reduce_scatter(x, w, group, **kw)  # shared memory set up
    with profile() as prof:
        gmm_allreduce.grouped_mat_mul_reduce_scatter(x, w, group, **kw)
    return sorted(e.name for e in prof.events()
                  if e.name.startswith(("c10d::", "gmm_allreduce::shm")))


@pytest.mark.parametrize("gloo", [False, True], ids=["shm", "gloo"])
@pytest.mark.parametrize("comm_turn, rounds", [(0, 1), (1, 1), (3, 3), (100, 8)])
def test_one_collective_per_round(pools, comm_turn, rounds, gloo):
    """One reduce-scatter for comm_turn 0 and 1; k for k >= 1, at most M / n = 8 (rows per rank)."""
    for names in pools(2).run(count_reduce_scatters, comm_turn, gloo):
        assert len(names) == rounds and all(n in REDUCE_SCATTERS for n in names), names


def errors():
    x, w = [torch.randn(6, 4)], [torch.randn(4, 3)]
    rank = dist.get_rank()
    out = []
    for kw in (dict(split_item=0), dict(split_item=1, group_list=[6]),
               dict(split_item=3, group_list=[6])):
        try:
            gmm_allreduce.grouped_mat_mul_reduce_scatter(x, w, **kw)
            out.append("returned")
        except ValueError as e:
            out.append(str(e).splitlines()[0])
    # M = 7 with 2 ranks on one rank only: with check_ranks both raise, naming it.
    xm = [torch.randn(7 if rank == 1 else 6, 4)]
    try:
        gmm_allreduce.grouped_mat_mul_reduce_scatter(xm, w, group_list=[xm[0].shape[0]],
                                                     check_ranks=True)
        out.append("returned")
    except ValueError as e:
        out.append(str(e).splitlines()[0])
    return out


def test_errors_before_any_communication(pools):
    for split0, split1, ok, disagree in pools(2).run(errors, timeout=60):
        assert split0.startswith("split_item: the reduce-scatter returns one tensor"), split0
        assert split1.startswith("split_item: the reduce-scatter returns one tensor"), split1
        assert ok == "returned"
        assert "check_ranks: rank 1 rejected the call" in disagree, disagree
        assert "7 rows cannot be scattered evenly over the group's 2 ranks" in disagree, disagree


def gradients():
    """Each rank: y_r = rows r of sum_s (x_s @ W_s + b / n); loss = sum_r <y_r, g_r>."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(8, 3, generator=gen, dtype=torch.float64) for _ in range(world)]
    ws = [[torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
          for _ in range(world)]
    b = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)]
    g = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    x = xs[rank].clone().requires_grad_()
    w = [t.clone().requires_grad_() for t in ws[rank]]
    bias = [t.clone().requires_grad_() for t in b]
    rows = 8 // world
    (y,) = gmm_allreduce.grouped_mat_mul_reduce_scatter([x], w, bias=bias, group_list=[3, 8])
    (y * g[rank * rows:(rank + 1) * rows]).sum().backward()
    # The reference: dL/dY = g (all rows); group 0 is rows 0-2, group 1 rows 3-7.
    want_x = torch.cat([g[:3] @ ws[rank][0].t(), g[3:] @ ws[rank][1].t()])
    want_w = [xs[rank][:3].t() @ g[:3], xs[rank][3:].t() @ g[3:]]
    want_b = [g[:3].sum(0), g[3:].sum(0)]
    torch.testing.assert_close(x.grad, want_x)
    for got, want in zip([*(t.grad for t in w), *(t.grad for t in bias)], [*want_w, *want_b]):
        torch.testing.assert_close(got, want)
    return True


@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_gradients_against_the_reference(pools, world):
    assert pools(world).run(gradients) == [True] * world


def test_gradcheck(world1):
    """float64, world size 1 (gradcheck perturbs one process's inputs: at world size > 1 another
    rank's output depends on them too, which the reference test above covers)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    b = [torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def fn(x, w0, w1, b0, b1):
        return gmm_allreduce.grouped_mat_mul_reduce_scatter([x], [w0, w1], world1, bias=[b0, b1],
                                                            group_list=[3, 8], comm_turn=2)[0]

    assert torch.autograd.gradcheck(fn, (x, *w, *b))


def test_opcheck_and_compile(world1):
    x = torch.randn(6, 4, requires_grad=True)
    w = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    args = ([x], w, None, [2, 6], None, 3, world1.group_name, "sum", 0, 0, False, None, False, None,
            None, None, None, None, None, None, None, None)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul_reduce_scatter.default, args)

    def fn(x, w0, w1):
        return gmm_allreduce.grouped_mat_mul_reduce_scatter([x], [w0, w1], world1, group_list=[2, 6])[0] * 2

    eager = fn(x, *w)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, *w), eager)


def layer_rows():
    from gmm_allreduce.nn import GroupedRowParallelLinear

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = GroupedRowParallelLinear(2, 3, 4)
    torch.manual_seed(0)
    sp = GroupedRowParallelLinear(2, 3, 4, sequence_parallel=True)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(rank))
    rows = 8 // world
    return torch.allclose(sp(x, [3, 8]), full(x, [3, 8])[rank * rows:(rank + 1) * rows], atol=1e-6)


def test_sequence_parallel_layer(pools):
    assert pools(2).run(layer_rows) == [True, True]


def test_nn_after_import_gmm_allreduce():
    import subprocess
    import sys

    code = "import gmm_allreduce; print(gmm_allreduce.nn.GroupedRowParallelLinear.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "GroupedRowParallelLinear", out.stderr


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_outputs_larger_than_a_shared_memory_round(pools, world):
    """8 MiB of fp32 output: each rank's part passes through shared memory in several rounds
    (4 MiB per rank per round); exact on small integers, with and without comm_turn."""
    cases = [Case(name=f"large-turn{t}", split_item=3, m=(600, 424), k=(4, 4), n=(2048, 2048),
                  dtype=torch.float32, integers=True, comm_turn=t) for t in (0, 2)]
    for rank, outputs in enumerate(pools(world).run(scatter_cases, cases)):
        for case, y in zip(cases, outputs):
            check_rows(case, y, world, rank)
