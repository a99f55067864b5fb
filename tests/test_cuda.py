"""The CUDA engine on a GPU (the module skips itself without one): the semantic cases of the CPU
suite on CUDA tensors at world size 1 over NCCL and at world sizes 2 and 4 over gloo on the one
GPU, against the float64 reference; the grouped GEMM's calls (bf16, stacked weights); no host sync
for split_item 3 with a device group_list; CUDA-graph capture; launches that do not grow with the
group count; and a clear error for inputs on the wrong device."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from test_semantics import DTYPES, SHAPES, assert_all_ranks_identical, cases_for

import gmm_allreduce
from gmm_allreduce.cases import Case, call_kwargs, check, make_inputs, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_cuda(inputs: dict, stacked: bool = False) -> dict:
    """The inputs on cuda:0; group_list tensors too. stacked: the weights as slices of one
    [G, K, N] tensor (as a MoE parameter holds them), which the grouped GEMM requires."""
    inputs = to_device(inputs, torch.device("cuda", 0))
    if stacked:
        inputs["weight"] = list(torch.stack(inputs["weight"]).unbind(0))
    return inputs


def call(case: Case, rank: int, world: int, group, stacked: bool = False):
    inputs = on_cuda(make_inputs(case, rank, world), stacked)
    outputs = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], group,
                                                       **call_kwargs(case, inputs))
    assert all(o.is_cuda for o in outputs), case.name
    return [o.cpu() for o in outputs]


# Calls the grouped GEMM serves: bf16, one x, K and N multiples of 8, 16 groups (more than the
# loop's 8), an empty group; biases of two dtypes and none; every group_list spelling; chunks.
def grouped_cases() -> list[Case]:
    base = Case(name="grouped", split_item=3, m=(40, 0, 24, 8) * 4, k=(64,) * 16, n=(32,) * 16,
                dtype=torch.bfloat16, bias_dtype=torch.float32)
    out = []
    for i, (split, bias, form, t, turn) in enumerate([
            (3, torch.float32, "tensor", 0, 0), (3, torch.bfloat16, "tensor32", 1, 3),
            (3, None, "list", 0, 0), (1, torch.float32, "list", 1, 0),
            (1, None, "tensor", 0, 2), (3, torch.float32, "tensor", 1, 1000)]):
        for integers in (True, False):
            out.append(dataclasses.replace(
                base, name=f"grouped{i}-split{split}-{form}-{'int' if integers else 'rand'}",
                split_item=split, bias_dtype=bias, group_list_form=form, group_list_type=t,
                comm_turn=turn, integers=integers, seed=i))
    return out


# Calls the tiled kernel takes under the default rule: fp16 and bf16, more than 8 small groups,
# ragged K and N (split_item 0), one y from G x's (2), strided operands, K = 0, empty groups.
def tiled_cases() -> list[Case]:
    g = 12
    ragged = dict(m=tuple(17 * (i % 4) for i in range(g)), k=tuple(8 * i + 3 for i in range(g)))
    out = []
    for i, (split, dtype, bias, layout, n) in enumerate([
            (0, torch.float16, torch.float16, "contiguous", tuple(5 + 11 * i for i in range(g))),
            (0, torch.bfloat16, torch.float32, "strided", tuple(70 - 3 * i for i in range(g))),
            (2, torch.float16, None, "contiguous", (33,) * g),
            (2, torch.bfloat16, torch.float32, "strided", (65,) * g)]):
        for integers in (True, False):
            out.append(Case(name=f"tiled{i}-split{split}-{'int' if integers else 'rand'}",
                            split_item=split, n=n, dtype=dtype, bias_dtype=bias, layout=layout,
                            integers=integers, seed=i, **ragged))
    k0 = Case(name="tiled-k0", split_item=0, m=(3,) * 10, k=(0,) * 10, n=(7,) * 10,
              dtype=torch.float16, bias_dtype=torch.float16, integers=True)
    return [*out, k0]


# Every case under every forced strategy (those a strategy cannot take fall back to the loop).
STRATEGY_CASES = [*((c, False) for c in tiled_cases()), *((c, True) for c in grouped_cases())]


@pytest.mark.parametrize("strategy", ["loop", "tiled", "grouped"])
def test_every_strategy_matches_reference(strategy):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "cuda_gemm_main.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, GMM_CUDA_GEMM=strategy))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr


def test_tiled_kernel_matches_reference_nccl_world1(nccl1):
    for case in tiled_cases():
        check(case, call(case, 0, 1, nccl1), 1)


@pytest.fixture(scope="module")
def nccl1(world1):
    """A world-size-1 NCCL group beside the gloo default group of the test process."""
    torch.cuda.set_device(0)
    group = dist.new_group(ranks=[0], backend="nccl")
    yield group
    dist.destroy_process_group(group)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
def test_matches_reference_nccl_world1(nccl1, split_item, dtype_id, with_bias):
    for case in cases_for(split_item, dtype_id, with_bias):
        check(case, call(case, 0, 1, nccl1), 1)


def test_grouped_gemm_matches_reference_nccl_world1(nccl1):
    for case in grouped_cases():
        check(case, call(case, 0, 1, nccl1, stacked=True), 1)


def run_on_gpu(cases, stacked):
    torch.cuda.set_device(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    return [call(case, rank, world, dist.group.WORLD, stacked) for case in cases]


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_matches_reference_gloo_on_one_gpu(pools, world):
    cases = [c for s in SHAPES for d in DTYPES for c in cases_for(s, d, True)]
    per_rank = pools(world).run(run_on_gpu, cases, False)
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, world)
    assert_all_ranks_identical(cases, per_rank)

    for cases, stacked in ((grouped_cases(), True), (tiled_cases(), False)):
        per_rank = pools(world).run(run_on_gpu, cases, stacked)
        for case, outputs in zip(cases, per_rank[0]):
            check(case, outputs, world)
        assert_all_ranks_identical(cases, per_rank)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_grads_match_reference(world1, dtype_id):
    """Backward on CUDA: the gradient products run on the CUDA engine (transposed operands)."""
    from test_autograd import all_cases, grads_against_reference

    dtype, bias_dtype = DTYPES[dtype_id]
    cases = all_cases(dtype, bias_dtype)
    assert grads_against_reference(cases, device="cuda") == [c.name for c in cases]


def test_wrong_device_is_a_clear_error(nccl1):
    x = [torch.randn(4, 8, device="cuda")]
    with pytest.raises(ValueError, match=r"weight\[0\]: expected a tensor on cuda:0"):
        gmm_allreduce.grouped_mat_mul_all_reduce(x, [torch.randn(8, 16)], nccl1)
    with pytest.raises(ValueError, match=r"bias\[0\]: expected a tensor on cuda:0"):
        gmm_allreduce.grouped_mat_mul_all_reduce(x, [torch.randn(8, 16, device="cuda")], nccl1,
                                                 bias=[torch.randn(16)])


def moe_call(groups=16, rows=1024, k=256, n=512, seed=0):
    """split_item 3 in bf16 with a device group_list (cumulative ends, some groups empty) and
    weights sliced from one [G, K, N] tensor: the grouped GEMM's call."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, rows + 1, (groups - 1,), generator=gen).sort().values
    ends = torch.cat([cuts, torch.tensor([rows])])
    x = torch.randn(rows, k, generator=gen).bfloat16().cuda()
    w3 = (torch.randn(groups, k, n, generator=gen) / k**0.5).bfloat16().cuda()
    bias = [torch.randn(n, generator=gen).cuda() for _ in range(groups)]
    kwargs = dict(bias=bias, group_list=ends.cuda(), split_item=3)
    return [x], list(w3.unbind(0)), kwargs


def reference_of(x, weight, kwargs):
    ends = kwargs["group_list"].tolist()
    counts = [e - s for s, e in zip([0, *ends[:-1]], ends)]
    rows = torch.split(x[0].double(), counts)
    return torch.cat([r @ w.double() + b.double() for r, w, b in zip(rows, weight, kwargs["bias"])])


# The grouped GEMM may tile a chunk of rows unlike the whole; bf16 outputs then differ by a rounding.
CHUNKED = dict(atol=2e-2, rtol=2e-2)


def test_split3_device_group_list_costs_no_sync(nccl1):
    x, weight, kwargs = moe_call()
    expected = reference_of(x, weight, kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)
        (y2,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, comm_turn=3, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(y.double(), expected, atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(y2, y, **CHUNKED)


def test_cuda_graph_replay_matches_eager(nccl1):
    x, weight, kwargs = moe_call(seed=1)
    eager = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(2):
            gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (captured,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and "nccl" not in e.key.lower() and "memcpy" not in e.key.lower()
               and "memset" not in e.key.lower())


def test_launches_do_not_grow_with_groups(nccl1):
    """The grouped GEMM (bf16, stacked weights) and the tiled kernel (fp16, separate weights)."""
    fp16 = {}
    for groups in (16, 64):
        case = Case(name="launches", split_item=0, m=(8,) * groups, k=(40,) * groups,
                    n=(24,) * groups, dtype=torch.float16, bias_dtype=torch.float32)
        inputs = on_cuda(make_inputs(case, 0, 1))
        fp16[groups] = count_kernels(lambda i=inputs, c=case: gmm_allreduce.grouped_mat_mul_all_reduce(
            i["x"], i["weight"], nccl1, **call_kwargs(c, i)))
    # the tiled kernel; the outputs' split off the buffer
    assert fp16[16] == fp16[64] <= 3, fp16
    launches = {}
    for groups in (16, 64):
        x, weight, kwargs = moe_call(groups=groups, rows=2048)
        launches[groups] = count_kernels(
            lambda x=x, w=weight, kw=kwargs: gmm_allreduce.grouped_mat_mul_all_reduce(x, w, nccl1, **kw))
    # chunk offsets, the grouped GEMM (and its setup), the bias epilogue
    assert launches[16] == launches[64] <= 6, launches


def test_outputs_ready_on_the_current_stream(nccl1):
    x, weight, kwargs = moe_call(seed=2)
    expected = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, comm_turn=4, **kwargs)
        doubled = y * 2  # queued right after the op on the same stream
    stream.synchronize()
    torch.testing.assert_close(doubled, expected * 2, **CHUNKED)
