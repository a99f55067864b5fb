"""The CUDA engine on a GPU (the module skips itself without one): the semantic cases of the CPU
suite on CUDA tensors at world size 1 over NCCL and at world sizes 2 and 4 over gloo on the one
GPU, against the float64 reference; the grouped GEMM's calls (bf16, stacked weights); no host sync
for split_item 3 with a device group_list; CUDA-graph capture; launches that do not grow with the
group count; and a clear error for inputs on the wrong device."""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
from test_semantics import DTYPES, SHAPES, assert_all_ranks_identical, cases_for

import gmm_allreduce
from gmm_allreduce.cases import TOLERANCE, Case, call_kwargs, check, expected, make_inputs, to_device

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
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "cuda_gemm_main.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, GMM_CUDA_GEMM=strategy))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
    ran = json.loads(out.stdout.split(maxsplit=1)[1])
    # The forced GEMM served the calls it can take (the grouped one only on sm_90 and sm_100).
    if strategy != "grouped" or capability() in (9, 10):
        assert ran.get(strategy, 0) > 0, ran


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


def poison_cache(numel=1 << 24):
    """Fills a block of the CUDA caching allocator with NaN and frees it: the op's next buffers are
    likely carved from it, so that an element no kernel writes shows as NaN."""
    torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def capability() -> int:
    return torch.cuda.get_device_capability()[0]


def moe_call(groups=16, rows=1024, k=256, n=512, seed=0, dtype=torch.bfloat16, stacked=True,
             bias=True):
    """split_item 3 with a device group_list (cumulative ends, some groups empty), weights sliced
    from one [G, K, N] tensor (stacked) or separate: MoE's call."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, rows + 1, (groups - 1,), generator=gen).sort().values
    ends = torch.cat([cuts, torch.tensor([rows])])
    x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
    w3 = (torch.randn(groups, k, n, generator=gen) / k**0.5).to(dtype).cuda()
    weight = list(w3.unbind(0)) if stacked else [w.clone() for w in w3]
    kwargs = dict(group_list=ends.cuda(), split_item=3)
    if bias:
        kwargs["bias"] = [torch.randn(n, generator=gen).cuda() for _ in range(groups)]
    return [x], weight, kwargs


def reference_of(x, weight, kwargs):
    """float64 reference; the group rows from the row ends a device list gives (clamped)."""
    gl = kwargs["group_list"].cpu()
    rows = x[0].shape[0]
    ends = torch.ops.gmm_allreduce._row_ends_reference(gl, kwargs.get("group_list_type", 0), rows,
                                                       0, rows).tolist()
    biases = kwargs.get("bias") or [None] * len(weight)
    out = []
    for s, e, w, b in zip([0, *ends[:-1]], ends, weight, biases):
        y = x[0][s:e].double() @ w.double()
        out.append(y + b.double() if b is not None else y)
    return torch.cat(out)


def expected_gemm(x, weight, kwargs) -> str:
    """The GEMM the engine picks for the call on this GPU (the rule of csrc/cuda/host/choice.h)."""
    gl = kwargs.get("group_list")
    return torch.ops.gmm_allreduce._gemm_choice(
        x, weight, kwargs.get("bias"), gl if isinstance(gl, list) else None,
        gl if isinstance(gl, torch.Tensor) else None, kwargs["split_item"],
        kwargs.get("group_list_type", 0), capability(), os.environ.get("GMM_CUDA_GEMM", "auto"),
        kwargs.get("reduce_dtype"))


def kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
            for _ in range(e.count)]


def count_kernels(fn) -> int:
    return sum(1 for name in kernel_names(fn) if not any(
        skip in name.lower() for skip in ("nccl", "memcpy", "memset")))


# The GEMM kernel that shows in the profile for each strategy.
GEMM_KERNELS = {"grouped": "cutlass", "tiled": "tiled_gemm_kernel", "loop": "gemm"}

# split_item 3 with a device group_list: bf16 on stacked weights (the grouped GEMM on sm_90/100,
# the tiled kernel elsewhere), fp16 (the Ascend op's combination) and separate weights (tiled).
DEVICE_ROWS = {"bf16-stacked": (torch.bfloat16, True), "fp16-stacked": (torch.float16, True),
               "bf16-separate": (torch.bfloat16, False)}


@pytest.mark.parametrize("reduce_dtype", [None, torch.float32], ids=["dtype", "fp32"])
@pytest.mark.parametrize("form", list(DEVICE_ROWS))
def test_split3_device_group_list_costs_no_sync(nccl1, form, reduce_dtype):
    """Also with reduce_dtype float32, whose fp32 partials the tiled kernel writes."""
    dtype, stacked = DEVICE_ROWS[form]
    x, weight, kwargs = moe_call(dtype=dtype, stacked=stacked)
    kwargs["reduce_dtype"] = reduce_dtype
    gemm = expected_gemm(x, weight, kwargs)
    assert gemm.endswith("+rows_on_device"), gemm
    assert reduce_dtype is None or gemm.startswith("tiled"), gemm
    expected = reference_of(x, weight, kwargs)
    names = kernel_names(lambda: gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs))
    assert any(GEMM_KERNELS[gemm.split("+")[0]] in n for n in names), (gemm, names)
    torch.cuda.synchronize()
    poison_cache()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)
        (y2,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, comm_turn=3, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    tol = dict(atol=5e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), expected, **tol)
    torch.testing.assert_close(y2.double(), expected, **tol)


@pytest.mark.parametrize("comm_turn", [0, 3])
@pytest.mark.parametrize("form", list(DEVICE_ROWS))
def test_cuda_graph_replays_new_group_list_and_x(nccl1, form, comm_turn):
    """Captured once, replayed with other group rows and other x written into the captured
    inputs: each replay equals the eager call on those inputs."""
    dtype, stacked = DEVICE_ROWS[form]
    x, weight, kwargs = moe_call(seed=1, dtype=dtype, stacked=stacked)
    static_x, static_gl = x[0], kwargs["group_list"]
    call = lambda: gmm_allreduce.grouped_mat_mul_all_reduce(  # noqa: E731
        [static_x], weight, nccl1, comm_turn=comm_turn, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (captured,) = call()
    for seed in (2, 3):
        new_x, _, new_kwargs = moe_call(seed=seed, dtype=dtype, stacked=stacked)
        static_x.copy_(new_x[0])
        static_gl.copy_(new_kwargs["group_list"])
        captured.fill_(float("nan"))
        graph.replay()
        (eager,) = call()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def test_bias_is_added_before_the_single_rounding(nccl1):
    """bf16: each product sums exactly to 257 (not a bf16 value), the bias is 0.75; rounded once,
    257.75 gives 258; rounded twice (257 -> 256 by ties-to-even, then 256.75 -> 256) it gives 256.
    The loop and tiled GEMMs round once; the grouped GEMM's bf16 output rounds first (README)."""
    k, n, groups = 264, 16, 12
    x = torch.zeros(groups * 4, k, dtype=torch.bfloat16, device="cuda")
    x[:, :257] = 1
    w3 = torch.ones(groups, k, n, dtype=torch.bfloat16, device="cuda")
    bias = [torch.full((n,), 0.75, device="cuda") for _ in range(groups)]
    for weight, gl in ((list(w3.unbind(0)), [4] * groups), ([w.clone() for w in w3], [4] * groups),
                       (list(w3[:8].unbind(0)), [6] * 8)):  # grouped (sm_90/100), tiled, loop
        kwargs = dict(bias=bias, group_list=gl, group_list_type=1, split_item=3)
        gemm = expected_gemm([x], weight, kwargs)
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], weight, nccl1, **kwargs)
        want = 256.0 if gemm == "grouped" else 258.0
        assert torch.all(y == want), (gemm, y.unique())


def test_many_groups(nccl1):
    """1024 groups with a device group_list (past the grouped GEMM's limit: the tiled kernel, in
    8 launches); 300 fp16 groups on host rows (3 tiled launches); 300 fp32 groups with biases (the
    loop's bias epilogue in two launches)."""
    x, weight, kwargs = moe_call(groups=1024, rows=4096, k=64, n=32, seed=4)
    assert expected_gemm(x, weight, kwargs) == "tiled+rows_on_device"
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)
    torch.testing.assert_close(y.double(), reference_of(x, weight, kwargs), atol=5e-2, rtol=3e-2)
    for dtype in (torch.float16, torch.float32):
        case = Case(name=f"300-{dtype}", split_item=0, m=tuple(i % 5 for i in range(300)),
                    k=(24,) * 300, n=(8,) * 300, dtype=dtype, bias_dtype=torch.float32,
                    integers=True)
        check(case, call(case, 0, 1, nccl1), 1)


def test_layouts_the_grouped_gemm_must_refuse_or_take(nccl1):
    """Column-major stacked weights (the backward's w.t()) are taken; x padded by a row stride that
    is no multiple of 8, x misaligned, N % 8 != 0 and an expanded x fall back, and all compute
    the reference."""
    x, weight, kwargs = moe_call(groups=16, rows=256, k=64, n=32, seed=5, bias=False)
    wt = list(torch.stack(weight).transpose(1, 2).contiguous().transpose(1, 2).unbind(0))
    padded = torch.zeros(256, 68, dtype=torch.bfloat16, device="cuda")[:, :64]
    padded.copy_(x[0])
    shifted = torch.zeros(256 * 64 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(256, 64)
    shifted.copy_(x[0])
    expanded = x[0][:1].expand(256, 64)
    n36 = list((torch.randn(16, 64, 36) / 8).bfloat16().cuda().unbind(0))
    for xs, ws in (([x[0]], wt), ([padded], weight), ([shifted], weight), ([expanded], weight),
                   (x, n36)):
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(xs, ws, nccl1, **kwargs)
        torch.testing.assert_close(y.double(), reference_of(xs, ws, kwargs), atol=5e-2, rtol=3e-2)


def test_malformed_device_group_list_stays_in_bounds(nccl1):
    """A device group_list is not validated (that would be a sync): decreasing, negative, too
    large values are clamped; every row still gets a group, and nothing is read or written out
    of bounds (compute-sanitizer in tools/gpu_session.sh)."""
    for values, group_list_type in (([5, 2, 900, -4] * 4, 0), ([-3, 2**40, 7, 0] * 4, 1)):
        x, weight, kwargs = moe_call(groups=16, rows=64, k=64, n=32, seed=6)
        kwargs.update(group_list=torch.tensor(values, device="cuda"),
                      group_list_type=group_list_type)
        poison_cache()
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, **kwargs)
        assert not y.isnan().any()
        torch.testing.assert_close(y.double(), reference_of(x, weight, kwargs), atol=5e-2,
                                   rtol=3e-2)


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
    # chunk offsets, the grouped GEMM (and its setup) or the tiled kernel, the bias epilogue
    assert launches[16] == launches[64] <= 6, launches


def test_outputs_ready_on_the_current_stream(nccl1):
    """The caller's stream is kept busy (torch.cuda._sleep) before the call: the op's GEMMs, its
    collective on NCCL's stream and the consumer queued after it must still run in order."""
    x, weight, kwargs = moe_call(seed=2)
    expected = reference_of(x, weight, kwargs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # ~25 ms of a busy stream ahead of the op
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1, comm_turn=4, **kwargs)
        doubled = y * 2  # queued right after the op on the same stream
    stream.synchronize()
    torch.testing.assert_close(doubled.double(), expected * 2, atol=1e-1, rtol=3e-2)


def scatter_and_fp32_on_gpu(cases):
    """The reduce-scatter op and reduce_dtype=float32 on cuda:0 (gloo between the ranks)."""
    torch.cuda.set_device(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for case in cases:
        inputs = on_cuda(make_inputs(case, rank, world), stacked=True)
        kw = call_kwargs(case, inputs)
        (rs,) = gmm_allreduce.grouped_mat_mul_reduce_scatter(inputs["x"], inputs["weight"], **kw)
        (fp32,) = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], **kw,
                                                          reduce_dtype=torch.float32)
        out.append((rs.cpu(), fp32.cpu()))
    return out


@pytest.mark.parametrize("world", [1, 2], ids=lambda w: f"w{w}")
def test_reduce_scatter_and_reduce_dtype_on_gpu(pools, world):
    """The grouped GEMM's bf16 cases (M = 288 divides by 1 and 2): each rank's rows of the
    reference, and the fp32 sum against it (the loop GEMM writes fp32 products into the buffer)."""
    cases = [c for c in grouped_cases() if c.split_item == 3]
    for rank, results in enumerate(pools(world).run(scatter_and_fp32_on_gpu, cases)):
        for case, (rs, fp32) in zip(cases, results):
            (ref,) = expected(case, world)
            rows = ref.shape[0] // world
            tol = (0, 0) if case.integers else TOLERANCE[case.dtype]
            torch.testing.assert_close(rs.double(), ref[rank * rows:(rank + 1) * rows], atol=tol[0],
                                       rtol=tol[1])
            check(case, [fp32], world)


@pytest.mark.parametrize("dtype_id", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("split_item", [2, 3], ids=lambda s: f"split{s}")
def test_combine_matches_reference_nccl_world1(nccl1, split_item, dtype_id):
    """The combine with combine_index, combine_weight and shared_input on the GPU (the index a
    device tensor, never read on the host), comm_turn 0 and 3."""
    from test_combine import cases_for as combine_cases

    for turn in (0, 3):
        for case in combine_cases(split_item, dtype_id, turn):
            check(case, call(case, 0, 1, nccl1, stacked=split_item == 3), 1)


def test_combine_with_device_index_costs_no_sync_and_drops_bad_rows(nccl1):
    """split_item 3 with group_list and combine_index on the GPU: no device-to-host sync; rows
    whose token lies outside [0, T) are dropped, never written out of bounds."""
    gen = torch.Generator().manual_seed(3)
    counts, k, n, tokens = [24, 0, 40, 8], 64, 32, 20
    x = torch.randn(sum(counts), k, generator=gen).to(torch.bfloat16)
    w = torch.randn(len(counts), k, n, generator=gen).div(8).to(torch.bfloat16)
    index = torch.randint(0, tokens, (sum(counts),), generator=gen)
    index[[0, 5, 30]] = torch.tensor([-1, tokens, 10 * tokens])
    weight = torch.rand(sum(counts), generator=gen)
    shared = torch.randn(tokens, n, generator=gen).to(torch.bfloat16)
    rows = torch.cat([xi.double() @ wi.double()
                      for xi, wi in zip(torch.split(x, counts), w.unbind(0))])
    keep = (index >= 0) & (index < tokens)
    want = shared.double().index_add(0, index[keep], rows[keep] * weight.double()[keep, None])
    dev = torch.device("cuda", 0)
    kwargs = dict(group_list=torch.tensor(counts, device=dev), group_list_type=1, split_item=3,
                  combine_index=index.to(dev), combine_weight=weight.to(dev), num_tokens=tokens,
                  shared_input=shared.to(dev))
    args = ([x.to(dev)], list(w.to(dev).unbind(0)), nccl1)
    gmm_allreduce.grouped_mat_mul_all_reduce(*args, **kwargs)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(*args, **kwargs)
        (y3,) = gmm_allreduce.grouped_mat_mul_all_reduce(*args, comm_turn=3, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for out in (y, y3):
        torch.testing.assert_close(out.double().cpu(), want, atol=6e-2, rtol=3e-2)


# NCCL at world size 1, the op's collectives issued (the test-only switch): what a single GPU can
# show of the stream order, graph capture and async waits that several would need otherwise.
@pytest.fixture
def nccl1_issuing(nccl1):
    torch.ops.gmm_allreduce._collectives_at_world_size_1(True)
    yield nccl1
    torch.ops.gmm_allreduce._collectives_at_world_size_1(False)


def nccl_collectives(fn) -> int:
    return sum(1 for name in kernel_names(fn) if "nccl" in name.lower())


@pytest.mark.parametrize("comm_turn", [0, 1, 3, 8])
def test_comm_turn_chunks_go_through_nccl(nccl1_issuing, comm_turn):
    """Each chunk's all-reduce is an NCCL kernel of its own, and the result is the reference."""
    x, weight, kwargs = moe_call(seed=4, groups=8, rows=512, n=256)
    kwargs["group_list"] = kwargs["group_list"].tolist()  # host rows: the chunks are known
    expected = reference_of(x, weight, dict(kwargs, group_list=torch.tensor(kwargs["group_list"])))
    fn = lambda: gmm_allreduce.grouped_mat_mul_all_reduce(  # noqa: E731
        x, weight, nccl1_issuing, comm_turn=comm_turn, **kwargs)
    assert nccl_collectives(fn) == max(comm_turn, 1)
    (y,) = fn()
    torch.testing.assert_close(y.double(), expected, atol=5e-2, rtol=3e-2)


@pytest.mark.parametrize("comm_turn", [0, 3])
def test_cuda_graph_captures_the_collective(nccl1_issuing, comm_turn):
    """split_item 3 with a device group_list, captured with its NCCL all-reduce(s) and replayed
    with other group rows and x: each replay equals the eager call."""
    x, weight, kwargs = moe_call(seed=5)
    static_x, static_gl = x[0], kwargs["group_list"]
    call = lambda: gmm_allreduce.grouped_mat_mul_all_reduce(  # noqa: E731
        [static_x], weight, nccl1_issuing, comm_turn=comm_turn, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (captured,) = call()
    for seed in (6, 7):
        new_x, _, new_kwargs = moe_call(seed=seed)
        static_x.copy_(new_x[0])
        static_gl.copy_(new_kwargs["group_list"])
        captured.fill_(float("nan"))
        graph.replay()
        (eager,) = call()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager, atol=0, rtol=0)


def slow_nccl_stream(group, sleep_cycles=200_000_000):
    """Queues on NCCL's stream an all-reduce that waits behind ~0.1 s of a busy other stream:
    whatever the op then queues on that NCCL stream finishes after it. Returns the events recorded
    before and after the busy wait."""
    busy = torch.cuda.Stream()
    start, slept = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(busy):
        start.record()
        torch.cuda._sleep(sleep_cycles)
        slept.record()
        dist.all_reduce(torch.ones(1 << 20, device="cuda"), group=group, async_op=True)
    return start, slept


@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
def test_consumers_wait_for_a_slow_collective(nccl1_issuing, async_op):
    """The op's all-reduce is queued behind a slow one on NCCL's stream. Work queued after the op
    (after its wait, with async_op, made on a second stream) must start only once the op's
    collective is done: its event comes after the slow one's end, not before."""
    x, weight, kwargs = moe_call(seed=8)
    expected = reference_of(x, weight, kwargs)
    start, slept = slow_nccl_stream(nccl1_issuing)
    caller, waiter = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(caller):
        out = gmm_allreduce.grouped_mat_mul_all_reduce(x, weight, nccl1_issuing, comm_turn=2,
                                                      async_op=async_op, **kwargs)
    with torch.cuda.stream(caller if not async_op else waiter):
        (y,) = gmm_allreduce.wait(out)
        doubled = y * 2
        after = torch.cuda.Event(enable_timing=True)
        after.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(after) >= start.elapsed_time(slept)
    torch.testing.assert_close(doubled.double(), expected * 2, atol=1e-1, rtol=3e-2)


@pytest.mark.parametrize("kind", ["int8", "fp8", "wo_bf16", "wo_fp16_offset"])
def test_quantised_calls_match_reference_nccl_world1(nccl1, kind):
    """int8 through torch._int_mm where cuBLASLt takes the shape (more than 16 rows, K and N
    multiples of 8; else the exact fp64 GEMM), e4m3 through torch._scaled_mm (multiples of 16),
    weight-only through the dequantised weight; every split mode, bias, the combine."""
    from test_quant import QCase, cases_for, make
    from test_quant import check as check_quant
    from test_quant import expected as expected_quant

    def cuda(v):
        if isinstance(v, torch.Tensor):
            return v.cuda()
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [t.cuda() for t in v]
        return v

    aligned = [QCase(kind, 3, m=(16, 32, 0, 48), integers=i, bias=True,
                     output_dtype=torch.float32 if i else None) for i in (True, False)]
    for case in cases_for(kind) + aligned:
        x, w, kw, _, _ = make(case, 0)
        ys = gmm_allreduce.grouped_mat_mul_all_reduce(
            cuda(x), cuda(w), nccl1, split_item=case.split_item, comm_turn=case.comm_turn,
            **{k: cuda(v) for k, v in kw.items()})
        assert all(y.is_cuda for y in ys), case.name
        check_quant(case, [y.cpu() for y in ys], expected_quant(case, 1))


# The expert block on the GPU: composed on the device (the routing sorted there, the gate_up
# products through the comm-free op, the activation, the combined down product).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_expert_block_matches_reference_nccl_world1(nccl1, dtype):
    from gmm_allreduce.reference import expert_block

    gen = torch.Generator().manual_seed(5)
    t, k, e, h, i = 64, 4, 8, 128, 64
    x = torch.randn(t, h, generator=gen, dtype=torch.float64)
    w13 = torch.randn(e, h, 2 * i, generator=gen, dtype=torch.float64) / h ** 0.5
    w2 = torch.randn(e, i, h, generator=gen, dtype=torch.float64) / i ** 0.5
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    ids[3, 1] = -1
    weights = torch.rand(t, k, generator=gen)
    want = expert_block(x, w13, w2, ids, weights.double())
    dev = torch.device("cuda", 0)
    for device_ids in (False, True):
        y = gmm_allreduce.grouped_mlp_all_reduce(
            x.to(dev, dtype), w13.to(dev, dtype), w2.to(dev, dtype), nccl1,
            topk_ids=ids.to(dev) if device_ids else ids, topk_weights=weights.to(dev))
        assert y.is_cuda and y.dtype == dtype
        error = float((y.double().cpu() - want).norm() / want.norm())
        assert error < (2e-2 if dtype == torch.bfloat16 else 1e-4), (device_ids, error)


def test_expert_block_w8a8_matches_the_cpu(nccl1):
    """W8A8 in the block on the GPU (the rows quantised on the device, cuBLASLt's int8 GEMMs where
    they take the shapes) gives the CPU's values: the same int8 rows, exact int32 sums."""
    gen = torch.Generator().manual_seed(6)
    t, k, e, h, i = 64, 4, 8, 128, 64
    x = torch.randn(t, h, generator=gen).bfloat16()
    q13, s13 = gmm_allreduce.quantize_weights(list(torch.randn(e, h, 2 * i, generator=gen)))
    q2, s2 = gmm_allreduce.quantize_weights(list(torch.randn(e, i, h, generator=gen)))
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen)
    kw = dict(topk_ids=ids, topk_weights=weights, w13_scale=s13, w2_scale=s2)
    with torch.no_grad():
        want = gmm_allreduce.grouped_mlp(x, q13, q2, **kw)
        dev = torch.device("cuda", 0)
        y = gmm_allreduce.grouped_mlp_all_reduce(
            x.to(dev), [q.to(dev) for q in q13], [q.to(dev) for q in q2], nccl1,
            topk_ids=ids.to(dev), topk_weights=weights.to(dev),
            w13_scale=[s.to(dev) for s in s13], w2_scale=[s.to(dev) for s in s2])
    assert y.is_cuda and y.dtype == torch.bfloat16
    error = float((y.double().cpu() - want.double()).norm() / want.double().norm())
    assert error < 1e-2, error


def test_expert_block_device_ids_drop_bad_ids_and_grads(nccl1):
    """A device topk_ids is not read on the host: ids outside [0, E) are dropped; gradients flow."""
    from gmm_allreduce.reference import expert_block

    gen = torch.Generator().manual_seed(6)
    t, k, e, h, i = 32, 2, 4, 64, 32
    dev = torch.device("cuda", 0)
    x = torch.randn(t, h, generator=gen, dtype=torch.float64)
    w13 = torch.randn(e, h, 2 * i, generator=gen, dtype=torch.float64) / h ** 0.5
    w2 = torch.randn(e, i, h, generator=gen, dtype=torch.float64) / i ** 0.5
    ids = torch.randint(0, e, (t, k), generator=gen)
    ids[[0, 5, 9], [0, 1, 0]] = torch.tensor([-1, e, 100])
    weights = torch.rand(t, k, generator=gen, dtype=torch.float64)
    want = expert_block(x, w13, w2, ids.masked_fill((ids < 0) | (ids >= e), -1), weights)
    leaves = [v.to(dev).float().requires_grad_() for v in (x, w13, w2, weights)]
    y = gmm_allreduce.grouped_mlp_all_reduce(leaves[0], leaves[1], leaves[2], nccl1,
                                             topk_ids=ids.to(dev), topk_weights=leaves[3])
    torch.testing.assert_close(y.double().cpu(), want, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert all(leaf.grad is not None and leaf.grad.is_cuda for leaf in leaves)


def test_expert_block_with_device_ids_costs_no_sync(nccl1):
    """The block with topk_ids on the GPU: routing, gate_up, activation, down and combine with no
    device-to-host sync (the ids are never read on the host)."""
    gen = torch.Generator().manual_seed(7)
    t, k, e, h, i = 48, 2, 8, 64, 32
    dev = torch.device("cuda", 0)
    x = torch.randn(t, h, generator=gen).to(dev, torch.bfloat16)
    w13 = (torch.randn(e, h, 2 * i, generator=gen) / h ** 0.5).to(dev, torch.bfloat16)
    w2 = (torch.randn(e, i, h, generator=gen) / i ** 0.5).to(dev, torch.bfloat16)
    ids = torch.randint(0, e, (t, k), generator=gen).to(dev)
    weights = torch.rand(t, k, generator=gen).to(dev)
    kw = dict(topk_ids=ids, topk_weights=weights)
    gmm_allreduce.grouped_mlp_all_reduce(x, w13, w2, nccl1, **kw)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            y = gmm_allreduce.grouped_mlp_all_reduce(x, w13, w2, nccl1, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.shape == (t, h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_expert_parallel_pair_on_gpu_nccl_world1(nccl1, dtype):
    """The expert-parallel pair on the GPU: products on the CUDA engine, NCCL's all-to-all with
    row splits (the collectives of one rank asked to run), the combine on the device; gradients
    flow."""
    from gmm_allreduce.reference import expert_parallel

    gen = torch.Generator().manual_seed(8)
    e, k, n, tokens = 4, 64, 32, 24
    counts = [3, 0, 7, 5]
    x = torch.randn(sum(counts), k, generator=gen, dtype=torch.float64)
    w = torch.randn(e, k, n, generator=gen, dtype=torch.float64) / k ** 0.5
    idx = torch.randint(0, tokens, (sum(counts),), generator=gen)
    cw = torch.rand(sum(counts), generator=gen, dtype=torch.float64)
    ys, outs = expert_parallel([x], [w], [counts], [(idx, cw, tokens)])
    dev = torch.device("cuda", 0)
    torch.ops.gmm_allreduce._collectives_at_world_size_1(True)
    try:
        leaves = [x.to(dev, dtype).requires_grad_(), w.to(dev, dtype).requires_grad_()]
        y, _, perm = gmm_allreduce.all_to_all_grouped_mat_mul(
            leaves[0], leaves[1], nccl1, send_counts=counts, recv_counts=counts,
            return_permuted=True)
        out, _ = gmm_allreduce.grouped_mat_mul_all_to_all(
            perm, leaves[1], nccl1, send_counts=counts, recv_counts=counts,
            combine_index=idx.to(dev), combine_weight=cw.to(dev, torch.float32), num_tokens=tokens)
        out.float().sum().backward()
    finally:
        torch.ops.gmm_allreduce._collectives_at_world_size_1(False)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert y.is_cuda and out.is_cuda and out.dtype == dtype
    assert float((y.double().cpu() - ys[0]).norm() / ys[0].norm()) < bound
    assert float((out.double().cpu() - outs[0]).norm() / outs[0].norm()) < bound
    assert all(leaf.grad is not None and leaf.grad.is_cuda for leaf in leaves)
