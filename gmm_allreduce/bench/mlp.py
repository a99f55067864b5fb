"""A whole MoE MLP (scenarios with "mlp": gate_up, SiLU * up, down, combine), tensor-parallel over
the ranks (each holds its own I-slice of every expert, I per rank; the outputs are summed): the
expert block op, the op composed as the transformers integration calls it, the plain PyTorch loop
over experts and vLLM's CPU fused MoE (the peer a CPU user would pick; `make bench-peers` installs
it), each of the last two followed by one dist.all_reduce at world sizes above 1. Each is checked
against a float64 reference first."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cases import Case

# The methods of an MLP scenario: "fused" (the composed op), "fp32" (the same in fp32), and:
# - block: gmm_allreduce.grouped_mlp_all_reduce, the whole block in one call;
# - block_int8: the same on int8 weights (weight-only, quantize_weights), under torch.no_grad();
# - block_w8a8: the same int8 weights with int8 activations (W8A8, dynamic per-token scales);
# - torch_loop: per expert, its tokens' rows gathered, gate_up, SiLU * up, down, weighted and
#   index_add_-ed into the output (transformers' eager experts);
# - vllm: torch.ops._C.cpu_fused_moe on weights prepacked once by cpu_prepack_moe_weight (isa "amx"
#   where the tier is amx, else "vec"), vLLM's library for the tier (_C_AVX2 under avx2).
MLP = ("block", "block_int8", "block_w8a8", "torch_loop", "vllm")


def routing(tokens: int, top_k: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's top-k (int64 [T, k]) and its renormalised weights (fp32 [T, k]), from the seed."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(tokens, experts, generator=gen).softmax(-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    return index, (weights / weights.sum(-1, keepdim=True)).float()


def _inputs(case: Case, rank: int = 0):
    """x and the routing (the same on every rank), and rank `rank`'s own weights."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    hidden, inter, experts = case.k[0], case.n[0], case.groups
    x = torch.randn(case.tokens, hidden, generator=gen, dtype=torch.float64)
    if rank:
        gen.manual_seed(case.seed + 1000 * rank)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64) / inter**0.5
    index, weights = routing(case.tokens, case.top_k, experts, case.seed)
    return x, gate_up, down, index, weights


def reference(x, gate_up, down, index, weights) -> torch.Tensor:
    """The MLP in float64, expert by expert."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(index == e)
        gate, up = (x[token].double() @ gate_up[e].double().t()).chunk(2, dim=-1)
        rows = (F.silu(gate) * up) @ down[e].double().t()
        out.index_add_(0, token, rows * weights[token, slot, None].double())
    return out


def _composed(x, gate_up, down, index, weights) -> Callable:
    """The op as integrations/transformers.py's experts_forward calls it, on its module layout
    (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    from ..integrations.transformers import experts_forward

    def apply_gate(up):
        gate, value = up.chunk(2, dim=-1)
        return F.silu(gate) * value

    module = types.SimpleNamespace(gate_up_proj=gate_up, down_proj=down, is_transposed=False,
                                   has_bias=False, _gmm_group=dist.group.WORLD,
                                   _gmm_activation=None, _apply_gate=apply_gate)
    return lambda: experts_forward(module, x, index, weights)


def _block(x, gate_up, down, index, weights) -> Callable:
    """The expert block op on the module layout, its weights passed as transposed views."""
    from ..block import grouped_mlp_all_reduce

    w13, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
    return lambda: grouped_mlp_all_reduce(x, w13, w2, dist.group.WORLD, topk_ids=index,
                                          topk_weights=weights)


def _block_int8(x, gate_up, down, index, weights, w8a8: bool = False) -> Callable:
    """The expert block op on int8 weights (per-column scales), quantised once: weight-only, or
    with int8 activations (`w8a8`)."""
    from ..block import grouped_mlp_all_reduce
    from ..quant import quantize_weights

    w13, s13 = quantize_weights(list(gate_up.transpose(1, 2).float()))
    w2, s2 = quantize_weights(list(down.transpose(1, 2).float()))
    scales = (dict(w13_scale=s13, w2_scale=s2) if w8a8
              else dict(w13_antiquant_scale=s13, w2_antiquant_scale=s2))

    def call():
        with torch.no_grad():
            return grouped_mlp_all_reduce(x, w13, w2, dist.group.WORLD, topk_ids=index,
                                          topk_weights=weights, **scales)

    return call


def _summed(call: Callable) -> Callable:
    """call, then one dist.all_reduce of its output at world sizes above 1."""
    if dist.get_world_size() == 1:
        return call

    def summed():
        out = call()
        dist.all_reduce(out)
        return out

    return summed


def _torch_loop(x, gate_up, down, index, weights) -> Callable:
    experts = gate_up.shape[0]

    def loop():
        out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)
        for e in range(experts):
            token, slot = torch.where(index == e)
            gate, up = (x[token] @ gate_up[e].t()).chunk(2, dim=-1)
            rows = (F.silu(gate) * up) @ down[e].t()
            out.index_add_(0, token, rows.float() * weights[token, slot, None])
        return out.to(x.dtype)

    return _summed(loop)


def _vllm_ops():
    """vLLM's custom ops, its library for the tier GMM_CPU_ISA leaves (as vLLM itself picks one
    from the CPU's flags)."""
    from ..cpu import cpu_capabilities

    tier = cpu_capabilities()["tier"]
    if tier == "avx2":
        torch.cpu._is_avx512_supported = lambda: False
    if tier in ("avx2", "avx512"):
        torch.cpu._is_avx512_bf16_supported = lambda: False
    try:
        import vllm._custom_ops as ops
    except ImportError as e:
        raise RuntimeError("--methods vllm: vLLM's CPU backend is not installed here; `make "
                           "bench-peers` makes .venv-peers with it") from e
    return ops, "amx" if tier == "amx" else "vec"


def _vllm(x, gate_up, down, index, weights) -> Callable:
    ops, isa = _vllm_ops()
    w13 = ops.cpu_prepack_moe_weight(gate_up.contiguous(), isa)  # once, as vLLM loads weights
    w2 = ops.cpu_prepack_moe_weight(down.contiguous(), isa)
    ids = index.to(torch.int32)

    def fused_moe():
        out = torch.empty(x.shape[0], down.shape[1], dtype=x.dtype)
        ops.cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", isa)
        return out

    return _summed(fused_moe)


def make_mlp_methods(case: Case, methods, world: int) -> dict[str, Callable]:
    """{label: callable} of an MLP scenario on this rank, each checked against the float64
    reference (the sum of every rank's MLP)."""
    x64, gate_up64, down64, index, weights = _inputs(case, dist.get_rank())
    ref = sum(reference(*_inputs(case, r)) for r in range(world))
    operands = {}

    def cast(dtype):
        if dtype not in operands:
            operands[dtype] = (x64.to(dtype), gate_up64.to(dtype), down64.to(dtype), index, weights)
        return operands[dtype]

    calls = {}
    for method in methods:
        if method == "fused":
            calls["fused@0"] = _composed(*cast(case.dtype))
        elif method == "block":
            calls[method] = _block(*cast(case.dtype))
        elif method == "block_int8":
            calls[method] = _block_int8(*cast(case.dtype))
        elif method == "block_w8a8":
            calls[method] = _block_int8(*cast(case.dtype), w8a8=True)
        elif method == "fp32" and case.dtype != torch.float32:
            calls["fp32"] = _composed(*cast(torch.float32))
        elif method == "torch_loop":
            calls[method] = _torch_loop(*cast(case.dtype))
        elif method == "vllm":
            calls[method] = _vllm(*cast(case.dtype))
    for name, call in calls.items():
        got = call().double()
        error = float((got - ref).norm() / ref.norm())
        bound = 1e-5 if name == "fp32" or case.dtype == torch.float32 else 2e-2
        bound = 3e-2 if name.startswith("block_") else bound  # int8: ~1% per product
        assert error < bound, f"{case.name}: {name} is {error:.2e} off the float64 reference"
    return calls
