"""What the benchmark times on each rank, for one scenario. Every method is a no-argument callable
over inputs made once; the op's result is checked against the float64 reference first."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..cases import TOLERANCE, Case, call_kwargs, check, expected, make_inputs, to_device
from ..ops import grouped_mat_mul, grouped_mat_mul_all_reduce, grouped_mat_mul_reduce_scatter
from ..prepack import prepack_weights
from ..reference import group_operands, unfused
from .mlp import MLP, make_mlp_methods

# Methods every device runs; "fused" is timed once per comm_turn of the sweep.
# - unfused: the naive composition, a matmul and a dist.all_reduce per group;
# - flat_loop, grouped_mm: the best compositions a careful user writes, one buffer and one
#   dist.all_reduce (none at world size 1): per-group torch.mm into the buffer, or one
#   torch._grouped_mm on the stacked weights (split_item 1 and 3 with one N); fp16 on the CPU,
#   and bf16 on a CPU without native bf16 GEMMs, computed in fp32 from fp32 copies of the weights
#   made once, as a careful user would (ATen's CPU GEMMs there are reference loops);
# - compute: the op without its collective; comm: dist.all_reduce of the op's buffer alone;
#   comm_op: the op's own all-reduce of that buffer alone (shared memory where it applies).
COMMON = ("fused", "unfused", "flat_loop", "grouped_mm", "compute", "comm", "comm_op")
# MoE-layer scenarios (tokens and top_k: the op combines the expert rows into token rows before
# its collective) get these instead of unfused, flat_loop and grouped_mm, all with one
# dist.all_reduce of what they reduce:
# - op_then_combine: the op without the combine (its all-reduce of the [M, N] expert rows), then
#   the best combine (an fp32 index_add_ of the weighted rows);
# - grouped_mm_combine: torch._grouped_mm, the weighted rows index_add_-ed in fp32 into [T, N],
#   rounded, one all-reduce of [T, N];
# - hf_combine: transformers' own path: torch._grouped_mm, rows scaled, un-permuted to token order,
#   view(T, top_k, N).sum(1), one all-reduce of [T, N];
# - loop_combine: grouped_mm_combine with one torch.mm per group into one buffer instead of
#   torch._grouped_mm (faster on the CPU).
COMBINE = ("op_then_combine", "grouped_mm_combine", "hf_combine", "loop_combine")
# The best compositions, against which the op is reported (vs_best: paired, the op over the
# fastest composition of each iteration; for comm_op, over comm).
COMPOSITIONS = ("flat_loop", "grouped_mm", "grouped_mm_combine", "hf_combine", "loop_combine",
                "quant_loop", *MLP)
# Quantised scenarios (quant: "int8" or "weight_int8") get these instead of unfused, flat_loop and
# grouped_mm; fused, compute and comm time the quantised call:
# - float: the same op call on the float inputs (what quantisation saves);
# - quant_loop: the best quantised composition, one ATen kernel per group (torch._int_mm and the
#   dequantisation in ATen ops; torch._weight_int8pack_mm at <= 16 rows with K a multiple of 16,
#   else the weight dequantised and torch.mm) into one buffer, then one dist.all_reduce;
# - prepacked: the fused call on weights packed once by prepack_weights, under torch.no_grad()
#   (the same call as fused where the host's tier packs nothing).
QUANT = ("float", "quant_loop", "prepacked")
# The same op call with every float input in fp32 (bf16, fp16 and quantised scenarios): what a
# 16-bit or quantised call is reported against (vs_fp32: paired, the op over this call).
FP32 = "fp32"
# Beyond the Ascend op (not run by default): rs, the reduce-scatter op (split_item 2 and 3, M divisible
# by the world size), against rs_grouped_mm, torch._grouped_mm then one dist.reduce_scatter_tensor;
# fused_fp32, the op with reduce_dtype=torch.float32 (against fused at comm_turn 0).
EXTRA = ("rs", "rs_grouped_mm", "fused_fp32")
# Library baselines of the GPU table (world size 1): one torch.mm per group and one dense
# torch.mm of the same FLOPs, without a collective.
GPU_ONLY = ("mm_loop", "dense")


def label(method: str, comm_turn: int | None = None) -> str:
    return f"fused@{comm_turn}" if method == "fused" else method


def make_methods(case: Case, methods, comm_turns, device: torch.device) -> dict[str, Callable]:
    """{label: callable} on this rank's inputs for `case`, moved to `device`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = to_device(make_inputs(case, rank, world), device)
    kw = call_kwargs(case, inputs)
    local_kw = call_kwargs(case, inputs, collective=False)  # the same call without the collective
    x, w = inputs["x"], inputs["weight"]
    if device.type == "cuda" and len({tuple(t.shape) for t in w}) == 1:
        # Equal-shape weights as a MoE layer holds them: slices of one [G, K, N] parameter, here
        # column-major per group like the grouped_mm baseline's. Every method uses the same.
        w = list(torch.stack(list(w)).transpose(-2, -1).contiguous().transpose(-2, -1).unbind(0))
        inputs["weight"] = w
    calls: dict[str, Callable] = {}
    if case.ep:  # expert parallelism: its own methods (bench/ep.py)
        from .ep import EP, make_ep_methods

        return make_ep_methods(case, [m for m in methods if m in EP] or list(EP), world)
    if case.mlp:  # the block op and the PyTorch loop always, vLLM where installed or asked for
        import importlib.util

        extra = ["block", "torch_loop"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
        return make_mlp_methods(
            case, [m for m in dict.fromkeys([*methods, *extra]) if m in ("fused", FP32, *MLP)], world)
    if FP32 in methods:
        methods = [m for m in methods if m != FP32]
        if case.dtype != torch.float32 or case.quant is not None:
            calls[FP32] = _fp32_call(case, rank, world, device)
    if case.quant is not None:
        return {**calls, **_quant_methods(case, methods, comm_turns, inputs, kw, local_kw, world)}
    if case.tokens is not None:  # an MoE layer: the combine's baselines replace the plain ones
        methods = [m for m in methods if m not in ("unfused", "flat_loop", "grouped_mm")]
        methods += [m for m in COMBINE if m not in methods]
    for method in methods:
        if method == "fused":
            for t in comm_turns:
                calls[label(method, t)] = (
                    lambda kw_t={**kw, "comm_turn": t}: grouped_mat_mul_all_reduce(x, w, **kw_t))
        elif method == "unfused":
            calls[method] = lambda: unfused(x, w, **local_kw)
        elif method == "compute":
            calls[method] = lambda: grouped_mat_mul(x, w, world_size=world, **local_kw)
        elif method in ("comm", "comm_op"):
            numel = (case.tokens * case.n[0] if case.tokens is not None
                     else sum(m * n for m, n in zip(case.m, case.n)))
            flat = torch.zeros(numel, dtype=case.dtype, device=device)
            group = dist.group.WORLD.group_name
            calls[method] = ((lambda flat=flat: dist.all_reduce(flat)) if method == "comm" else
                             (lambda flat=flat, group=group: torch.ops.gmm_allreduce._all_reduce_(flat, group)))
        elif method == "fused_fp32":
            calls[method] = lambda: grouped_mat_mul_all_reduce(x, w, **kw, reduce_dtype=torch.float32)
        elif method in ("rs", "rs_grouped_mm"):
            call = None
            if case.split_item in (2, 3) and sum(case.m) % world == 0:
                call = ((lambda: grouped_mat_mul_reduce_scatter(x, w, **kw)) if method == "rs"
                        else _scatter_composition(case, x, w, world))
            if call is not None:
                calls[method] = call
        elif method in COMBINE:
            calls[method] = _combine_composition(method, case, inputs, world)
        elif method in COMPOSITIONS:
            composed = _composition(method, case, x, w, kw, world)
            if composed is not None:
                calls[method] = composed
        elif method in GPU_ONLY:
            baseline = _gpu_baseline(method, case, x, w, kw)
            if baseline is not None:
                calls[method] = baseline
        else:
            raise ValueError(f"--methods: unknown method {method!r}")
    if any(label("fused", t) in calls for t in comm_turns):
        check(case, [y.cpu() for y in calls[label("fused", comm_turns[0])]()], world)
    for method in COMBINE:  # the baselines compute the same thing, rounding more often (products,
        if method in calls:  # scaled rows, sums in 16 bits): within 3x the op's tolerance
            (ref,) = expected(case, world)
            atol, rtol = TOLERANCE[case.dtype]
            torch.testing.assert_close(calls[method]().cpu().double(), ref, atol=3 * atol * world,
                                       rtol=3 * rtol, msg=lambda m, method=method: f"{method}: {m}")
    return calls


def _fp32_call(case: Case, rank: int, world: int, device: torch.device) -> Callable:
    """The op's call on the same values drawn in fp32 (the weights in the same layout)."""
    case32 = dataclasses.replace(case, dtype=torch.float32, quant=None)
    inputs = to_device(make_inputs(case32, rank, world), device)
    kw = call_kwargs(case32, inputs)
    return lambda: grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], **kw)


def _quant_methods(case: Case, methods, comm_turns, inputs, kw, local_kw, world) -> dict:
    """The methods of a quantised scenario (split_item 3, no bias, no combine), checked first:
    the op against the quantised composition and against the float reference."""
    from ..quant import quantize_per_token, quantize_weights

    x, w = inputs["x"], inputs["weight"]
    wq, scale = quantize_weights(w)
    if case.quant == "int8":
        xq, per_token = quantize_per_token(x[0])
        qkw = {"scale": scale, "per_token_scale": per_token, "output_dtype": case.dtype}
    else:
        xq, per_token = x[0], None
        qkw = {"antiquant_scale": scale}
    rows = list(case.m)
    ends = torch.tensor(rows).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    n = case.n[0]

    # torch._int_mm where the CPU has VNNI or AMX; elsewhere a careful user multiplies in fp32
    # (exact for K <= 1024): there ATen's int8 GEMM is a reference loop, and oneDNN's AVX2 one
    # (under --cpu-isa avx2) saturates int16 pair sums: wrong in 65527 of 65536 sums of full-range
    # int8 (64 x 512 x 1024).
    from ..cpu import cpu_capabilities

    native_int8 = x[0].device.type != "cpu" or "int16" not in cpu_capabilities()["int8"]

    def int_mm(a, b):
        return torch._int_mm(a, b) if native_int8 else a.float() @ b.float()

    def quant_loop():
        flat = torch.empty(sum(rows) * n, dtype=case.dtype, device=x[0].device)
        for y, a, b, wi, si in zip(flat.split([m * n for m in rows]), starts, ends, wq, scale):
            y = y.view(b - a, n)
            if case.quant == "int8":
                y.copy_(int_mm(xq[a:b], wi).float().mul_(per_token[a:b, None]).mul_(si))
            elif b - a <= 16 and wi.shape[0] % 16 == 0:
                y.copy_(torch._weight_int8pack_mm(xq[a:b], wi.t(), si.to(case.dtype)))
            else:
                torch.mm(xq[a:b], (wi.float() * si).to(case.dtype), out=y)
        if world > 1:
            dist.all_reduce(flat)
        return flat.view(-1, n)

    calls = {}
    for method in [m for m in methods if m not in ("unfused", "flat_loop", "grouped_mm")] + list(QUANT):
        if method == "fused":
            for t in comm_turns:
                calls[label(method, t)] = (lambda t=t: grouped_mat_mul_all_reduce(
                    [xq], wq, **{**kw, "comm_turn": t}, **qkw))
        elif method == "compute":
            calls[method] = lambda: grouped_mat_mul([xq], wq, world_size=world, **local_kw, **qkw)
        elif method == "float":
            calls[method] = lambda: grouped_mat_mul_all_reduce(x, w, **kw)
        elif method == "quant_loop":
            calls[method] = quant_loop
        elif method == "prepacked":
            packed = prepack_weights(wq)

            def prepacked(packed=packed):
                with torch.no_grad():
                    return grouped_mat_mul_all_reduce([xq], packed, **kw, **qkw)
            calls[method] = prepacked
        elif method in ("comm", "comm_op"):
            flat = torch.zeros(sum(rows) * n, dtype=case.dtype, device=x[0].device)
            group = dist.group.WORLD.group_name
            calls[method] = ((lambda flat=flat: dist.all_reduce(flat)) if method == "comm" else
                             (lambda flat=flat, group=group: torch.ops.gmm_allreduce._all_reduce_(flat, group)))
    (got,) = grouped_mat_mul_all_reduce([xq], wq, **kw, **qkw)
    if "prepacked" in calls:
        (got_packed,) = calls["prepacked"]()
        assert torch.equal(got_packed, got), f"{case.name}: prepacked weights changed the result"
    atol, rtol = TOLERANCE[case.dtype]
    torch.testing.assert_close(got.double(), quant_loop().double(), atol=3 * atol * world,
                               rtol=3 * rtol)
    (ref,) = expected(case, world)
    error = float((got.double() - ref).norm() / ref.norm())
    assert error < 0.05, f"{case.name}: the quantised call is {error:.3f} off the float reference"
    return calls


def _grouped_mm_operands(case: Case, x, w):
    """The weights stacked K-major ([G, K, N], as torch._grouped_mm wants them) and the groups'
    end rows as int32 offsets."""
    stacked = torch.stack(list(w)).transpose(-2, -1).contiguous().transpose(-2, -1)
    offs = torch.tensor(case.m, device=x[0].device).cumsum(0).to(torch.int32)
    return stacked, offs


def _upcast_on_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a careful user computes this dtype's products in fp32 on this device: fp16 on any
    CPU, bf16 on a CPU where oneDNN has no bf16 GEMM (ATen's is then a reference loop)."""
    if device.type != "cpu":
        return False
    return dtype == torch.float16 or (
        dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _composition(method: str, case: Case, x, w, kw, world: int) -> Callable | None:
    """flat_loop or grouped_mm: the groups into one buffer, then one dist.all_reduce. None where
    the method does not apply to the scenario's shapes."""
    xs, _ = group_operands(x, w, kw["group_list"], case.split_item, case.group_list_type)
    device = x[0].device
    upcast = _upcast_on_cpu(case.dtype, device)

    def all_reduce(flat):
        if world > 1:
            dist.all_reduce(flat)
        return flat

    if method == "flat_loop":
        sizes = [xi.shape[0] * wi.shape[1] for xi, wi in zip(xs, w)]
        w32 = [wi.float() for wi in w] if upcast else w  # fp32 copies made once, like parameters

        def flat_loop():
            flat = torch.empty(sum(sizes), dtype=case.dtype, device=device)
            for y, xi, wi in zip(flat.split(sizes), xs, w32):
                y = y.view(xi.shape[0], wi.shape[1])
                if upcast:
                    y.copy_(torch.mm(xi.float(), wi))
                else:
                    torch.mm(xi, wi, out=y)
            return all_reduce(flat)

        return flat_loop
    if case.split_item not in (1, 3) or len(set(case.n)) != 1 or not hasattr(torch, "_grouped_mm"):
        return None
    stacked, offs = _grouped_mm_operands(case, x, w)
    if upcast:
        stacked = stacked.float()
    if upcast:
        return lambda: all_reduce(torch._grouped_mm(x[0].float(), stacked, offs=offs).to(case.dtype))
    return lambda: all_reduce(torch._grouped_mm(x[0], stacked, offs=offs))


def _combine_composition(method: str, case: Case, inputs: dict, world: int) -> Callable:
    """An MoE layer's down-projection, combine and all-reduce, as MoE stacks write it."""
    x, w = inputs["x"], inputs["weight"]
    index, weight = inputs["combine_index"], inputs["combine_weight"]
    tokens, n = case.tokens, case.n[0]
    stacked, offs = _grouped_mm_operands(case, x, w)

    def all_reduce(out):
        if world > 1:
            dist.all_reduce(out)
        return out

    def index_add(rows):  # the weighted rows summed into token rows in fp32, rounded once
        out = torch.zeros(tokens, n, dtype=torch.float32, device=rows.device)
        scaled = rows.float() if weight is None else rows.float() * weight[:, None]
        return out.index_add_(0, index, scaled).to(case.dtype)

    if method == "op_then_combine":
        kw = call_kwargs(case, inputs)
        for arg in ("combine_index", "combine_weight", "num_tokens", "shared_input"):
            kw.pop(arg)
        return lambda: index_add(grouped_mat_mul_all_reduce(x, w, **kw)[0])
    if method == "grouped_mm_combine":
        return lambda: all_reduce(index_add(torch._grouped_mm(x[0], stacked, offs=offs)))
    if method == "loop_combine":
        xs = torch.split(x[0], list(case.m))
        upcast = _upcast_on_cpu(case.dtype, x[0].device)  # fp32 rows, from fp32 weights made once
        ws = [wi.float() for wi in w] if upcast else w

        def loop():
            rows = torch.empty(x[0].shape[0], n, dtype=torch.float32 if upcast else case.dtype,
                               device=x[0].device)
            for y, xi, wi in zip(torch.split(rows, list(case.m)), xs, ws):
                torch.mm(xi.float() if upcast else xi, wi, out=y)
            return all_reduce(index_add(rows))

        return loop
    # transformers' grouped_mm_experts_forward: rows sorted by expert, back in token order (each
    # token's top_k rows adjacent) by the inverse permutation of its sort, then summed.
    inverse = torch.argsort(index, stable=True)  # token slot -> expert row
    w16 = None if weight is None else weight.to(case.dtype)

    def hf():
        rows = torch._grouped_mm(x[0], stacked, offs=offs)
        if w16 is not None:
            rows = rows * w16[:, None]
        return all_reduce(rows[inverse].view(tokens, case.top_k, n).sum(dim=1))

    return hf


# torch 2.13 renamed reduce_scatter_tensor (kept as a deprecated alias).
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _scatter_composition(case: Case, x, w, world: int) -> Callable | None:
    """torch._grouped_mm on the stacked weights, then one dist.reduce_scatter_tensor."""
    if (case.split_item != 3 or len(set(case.n)) != 1 or not hasattr(torch, "_grouped_mm")
            or case.tokens is not None):  # no combine: not the op's computation
        return None
    stacked, offs = _grouped_mm_operands(case, x, w)
    upcast = _upcast_on_cpu(case.dtype, x[0].device)
    if upcast:
        stacked = stacked.float()

    def composed():
        y = torch._grouped_mm(x[0].float() if upcast else x[0], stacked, offs=offs).to(case.dtype)
        out = y.new_empty(y.shape[0] // world, y.shape[1])
        _reduce_scatter(out, y)
        return out

    return composed


def _gpu_baseline(method: str, case: Case, x, w, kw) -> Callable | None:
    """The library baselines (no collective)."""
    xs, _ = group_operands(x, w, kw["group_list"], case.split_item, case.group_list_type)
    if method == "mm_loop":
        return lambda: [torch.mm(xi, wi) for xi, wi in zip(xs, w)]
    rows, k = sum(case.m), max(case.k)
    n = max(1, round(sum(m * ki * ni for m, ki, ni in zip(case.m, case.k, case.n)) / (rows * k)))
    a = torch.randn(rows, k, dtype=case.dtype, device=x[0].device)
    b = torch.randn(k, n, dtype=case.dtype, device=x[0].device)
    return lambda: torch.mm(a, b)
