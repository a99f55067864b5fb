"""The expert block: an MoE MLP in one call (gate_up, gated activation, down, the routing weights'
combine into token rows) ending with the collective of the grouped products: an all-reduce, a
reduce-scatter, or none. The Python front normalises the arguments (3-D weights to per-expert
views, the process group to its name); routing, checks, compute and communication are C++
(csrc/core/mlp.h). Its fake kernels and autograd glue follow."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._schema import NAMES, arguments
from .ops import _async, _bool, _dtype, _group_name, _int, _tensor

_ACTIVATIONS = ("silu", "gelu", "swigluoai")


def _experts(arg: str, value) -> list[torch.Tensor]:
    """A 3-D tensor [E, ...] as its E views (no copy), or a list of tensors."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 3:
            raise ValueError(f"{arg}: expected a 3-D tensor [E, rows, cols] or a list of E 2-D "
                             f"tensors, got a {value.dim()}-D tensor")
        return list(value.unbind(0))
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
        for i, t in enumerate(value):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{arg}[{i}]: expected a tensor, got {type(t).__name__}")
        return value
    raise TypeError(f"{arg}: expected a tensor or a list of tensors, got {type(value).__name__}")


def _per_expert(arg: str, value) -> list[torch.Tensor] | None:
    """A bias or scale per expert: None, a 2-D tensor [E, n] (its E rows) or a list of E 1-D
    tensors."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 2:
            raise ValueError(f"{arg}: expected a 2-D tensor [E, n] or a list of E 1-D tensors, got "
                             f"a {value.dim()}-D tensor")
        return list(value.unbind(0))
    return _experts(arg, value)


def _operands(hidden_states, w13, w2, topk_ids, topk_weights, activation, w13_bias, w2_bias,
              shared_input, w13_antiquant_scale=None, w2_antiquant_scale=None, w13_scale=None,
              w2_scale=None) -> dict:
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected a str ({', '.join(_ACTIVATIONS)}), got "
                        f"{type(activation).__name__}")
    a = {"hidden_states": _tensor("hidden_states", hidden_states),
         "w13": _experts("w13", w13), "w2": _experts("w2", w2),
         "topk_ids": _tensor("topk_ids", topk_ids),
         "topk_weights": _tensor("topk_weights", topk_weights), "activation": activation,
         "w13_bias": _per_expert("w13_bias", w13_bias), "w2_bias": _per_expert("w2_bias", w2_bias),
         "shared_input": None if shared_input is None else _tensor("shared_input", shared_input),
         "w13_antiquant_scale": _per_expert("w13_antiquant_scale", w13_antiquant_scale),
         "w2_antiquant_scale": _per_expert("w2_antiquant_scale", w2_antiquant_scale),
         "w13_scale": _per_expert("w13_scale", w13_scale),
         "w2_scale": _per_expert("w2_scale", w2_scale)}
    quantised = any(a[k] is not None for k in ("w13_antiquant_scale", "w2_antiquant_scale",
                                                 "w13_scale", "w2_scale"))
    if quantised and torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (a["hidden_states"], a["topk_weights"], a["shared_input"],
                      *(a["w13_bias"] or []), *(a["w2_bias"] or []))):
        raise RuntimeError("int8 weights are inference-only: an input requires grad (call under "
                           "torch.no_grad(), or detach it)")
    return a


def _collective_front(name: str, doc: str):
    """The public function of the collective op `name`: the arguments normalised, the op called."""
    op = getattr(torch.ops.gmm_allreduce, name)

    def front(hidden_states: torch.Tensor, w13, w2, hcomm=None, *, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, activation: str = "silu", w13_bias=None, w2_bias=None,
              shared_input: torch.Tensor | None = None, comm_turn: int = 0,
              reduce_dtype: torch.dtype | None = None, async_op: bool = False,
              check_ranks: bool = False, w13_antiquant_scale=None, w2_antiquant_scale=None,
              w13_scale=None, w2_scale=None) -> torch.Tensor:
        operands = _operands(hidden_states, w13, w2, topk_ids, topk_weights, activation, w13_bias,
                             w2_bias, shared_input, w13_antiquant_scale, w2_antiquant_scale,
                             w13_scale, w2_scale)
        return op(*operands.values(), _group_name("hcomm", hcomm), _int("comm_turn", comm_turn),
                  _bool("check_ranks", check_ranks), _dtype("reduce_dtype", reduce_dtype),
                  _async("async_op", async_op))

    front.__name__ = front.__qualname__ = name
    front.__doc__ = doc
    return front


grouped_mlp_all_reduce = _collective_front("grouped_mlp_all_reduce", doc="""\
An MoE expert block, tensor-parallel, summed over the ranks of a process group.

With n ranks, rank r holding the I-slice of every expert (w13's gate and up columns, w2's
rows), every rank returns, for each token t::

    out[t] = sum_r (shared_input^r[t] + sum over slots s with e = topk_ids[t, s] >= 0 of
             topk_weights[t, s] * (act(x[t] @ G_e^r + bg_e^r) * (x[t] @ U_e^r + bu_e^r)
                                   @ w2_e^r + w2_bias_e / n))

where x = hidden_states, G_e / U_e the first / last I columns of w13[e] (bg_e, bu_e those of
w13_bias[e]). Computed and summed in fp32 (fp64 for fp64), rounded once into x's dtype before
the collective.

Args:
    hidden_states: [T, H], the tokens in their order (not permuted), the same on every rank.
    w13: [E, H, 2I] (or a list of E [H, 2I]): gate columns, then up columns; any strides, so
        that transformers' or vLLM's [E, 2I, H] passes as ``.transpose(1, 2)`` without a copy.
    w2: [E, I, N] (or a list), any strides (``down_proj.transpose(1, 2)``).
    hcomm: the process group (its name, the group, or None for the default group).
    topk_ids: [T, k] int64/int32, the expert of each (token, slot); -1 for none. Checked on
        the host (values in [-1, E)); a device tensor is not read on the host, and its ids
        outside [0, E) are dropped.
    topk_weights: [T, k] float, the routing weights.
    activation: "silu" (silu(gate) * up), "gelu" (gelu(gate, tanh) * up) or "swigluoai"
        (gpt-oss: g = min(gate, 7), u = clamp(up, -7, 7), g * sigmoid(1.702 g) * (u + 1);
        gpt-oss checkpoints interleave gate and up columns: pass w13 as
        ``torch.cat([w13[..., ::2], w13[..., 1::2]], -1)``, once).
    w13_bias: None, [E, 2I] or a list of E [2I]: this rank's slice, added before the
        activation.
    w2_bias: None, [E, N] or a list of E [N]: counted once (each rank adds w2_bias / n).
    shared_input: None or [T, N]: this rank's partial of a shared expert, added before the sum.
    comm_turn, reduce_dtype, async_op, check_ranks: as for grouped_mat_mul_all_reduce (the
        output's token rows cut into chunks, each summed while the next computes).
    w13_antiquant_scale, w2_antiquant_scale: with int8 w13 and w2 (weight-only, inference),
        their per-column scales, [E, 2I] and [E, N] (or lists): the weights are w * scale.
    w13_scale, w2_scale: instead, W8A8 (inference): the same per-column scales of int8 w13 and
        w2, with int8 activations: each routed row of hidden_states and of the activation is
        quantised on the fly, s = max|row| / 127, round(row / s), and the int8 products exact
        (int32) are scaled by s * scale.

Returns:
    [T, N] in hidden_states' dtype.

Autograd: the gradients of hidden_states, w13, w2, both biases, topk_weights and shared_input;
the activation is recomputed in backward. hidden_states being the same on every rank, its
gradient is the sum of the ranks' parts (one all-reduce in backward, with topk_weights').
""")

grouped_mlp_reduce_scatter = _collective_front("grouped_mlp_reduce_scatter", doc="""\
The expert block of grouped_mlp_all_reduce, its [T, N] sum scattered by rows over the
group's n ranks: rank r returns rows [r * T / n, (r + 1) * T / n) (T divisible by n).
Backward all-gathers the output's gradient first.""")


def grouped_mlp(hidden_states: torch.Tensor, w13, w2, *, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, activation: str = "silu", w13_bias=None, w2_bias=None,
                shared_input: torch.Tensor | None = None, world_size: int = 1,
                w13_antiquant_scale=None, w2_antiquant_scale=None, w13_scale=None,
                w2_scale=None) -> torch.Tensor:
    """One rank's part of the expert block, with no collective (w2_bias divided by world_size):
    the same arguments and checks as grouped_mlp_all_reduce."""
    operands = _operands(hidden_states, w13, w2, topk_ids, topk_weights, activation, w13_bias,
                         w2_bias, shared_input, w13_antiquant_scale, w2_antiquant_scale,
                         w13_scale, w2_scale)
    return torch.ops.gmm_allreduce.grouped_mlp(*operands.values(), _int("world_size", world_size))


# The fake kernels: the output's shape from the arguments.
def _fake_output(a: dict) -> torch.Tensor:
    h, w2 = a["hidden_states"], a["w2"]
    if h.dim() != 2 or not w2 or w2[0].dim() != 2:
        raise ValueError("hidden_states: expected a 2-D tensor [T, H] and w2 2-D tensors")
    return h.new_empty((h.shape[0], w2[0].shape[1]))


@torch.library.register_fake("gmm_allreduce::grouped_mlp_all_reduce")
def _fake(*args, **kwargs):
    return _fake_output(arguments("grouped_mlp_all_reduce", args, kwargs))


@torch.library.register_fake("gmm_allreduce::grouped_mlp_reduce_scatter")
def _fake_scatter(*args, **kwargs):
    a = arguments("grouped_mlp_reduce_scatter", args, kwargs)
    y = _fake_output(a)
    ranks = dist.distributed_c10d._resolve_process_group(a["group_name"]).size()
    if y.shape[0] % ranks != 0:
        raise ValueError(f"hidden_states: the output's {y.shape[0]} token rows cannot be scattered "
                         f"evenly over the group's {ranks} ranks")
    return y.new_empty((y.shape[0] // ranks, y.shape[1]))


@torch.library.register_fake("gmm_allreduce::grouped_mlp")
def _fake_compute(*args, **kwargs):
    return _fake_output(arguments("grouped_mlp", args, kwargs))


@torch.library.register_fake("gmm_allreduce::grouped_mlp_backward")
def _backward_fake(grad, hidden, w13, w2, topk_ids, topk_weights, activation, w13_bias, w2_bias,
                   world_size, output_mask):
    opmath = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    d_hidden = hidden.new_empty(hidden.shape if output_mask[0] else (0,), dtype=opmath)

    def like(tensors, needed):
        return [t.new_empty(t.shape) for t in tensors] if needed and tensors else []

    return (d_hidden, like(w13, output_mask[1]), like(w2, output_mask[2]),
            like(w13_bias, output_mask[3]), like(w2_bias, output_mask[3]),
            topk_weights.new_empty(topk_weights.shape, dtype=opmath))


# Autograd. The convention of the grouped products (autograd.py): the forward's sum is the identity
# in backward, the reduce-scatter's backward all-gathers the output's gradient. hidden_states is
# replicated (the column-parallel input): its gradient, like topk_weights' (whose summed expert
# rows no rank holds), is the sum of the ranks' parts: one all-reduce of both together.
_BACKWARD = torch.ops.gmm_allreduce.grouped_mlp_backward


def _setup(op: str, ctx, inputs, scatter: bool = False) -> None:
    a = arguments(op, inputs)
    ctx.op, ctx.activation = op, a["activation"]
    ctx.group = a.get("group_name")
    ctx.gather = scatter
    ctx.world = a.get("world_size", 1)
    ctx.bias_given = (a["w13_bias"] is not None, a["w2_bias"] is not None)
    ctx.counts = (len(a["w13"]), len(a["w2"]))
    biases = [*(a["w13_bias"] or []), *(a["w2_bias"] or [])]
    ctx.needs = (a["hidden_states"].requires_grad, any(t.requires_grad for t in a["w13"]),
                 any(t.requires_grad for t in a["w2"]), any(t.requires_grad for t in biases),
                 a["topk_weights"].requires_grad,
                 a["shared_input"] is not None and a["shared_input"].requires_grad)
    ctx.save_for_backward(a["hidden_states"], *a["w13"], *a["w2"], a["topk_ids"],
                          a["topk_weights"], *(a["w13_bias"] or []), *(a["w2_bias"] or []))


def _backward(ctx, grad):
    e13, e2 = ctx.counts
    saved = list(ctx.saved_tensors)
    hidden, w13, w2 = saved[0], saved[1:1 + e13], saved[1 + e13:1 + e13 + e2]
    topk_ids, topk_weights = saved[1 + e13 + e2:3 + e13 + e2]
    rest = saved[3 + e13 + e2:]
    w13_bias = rest[:e13] if ctx.bias_given[0] else None
    w2_bias = rest[len(rest) - e2:] if ctx.bias_given[1] else None
    if ctx.gather:  # the reduce-scatter op: grad holds this rank's rows only
        grad = torch.ops.gmm_allreduce._all_gather_rows(grad.contiguous(), ctx.group)
    world = ctx.world if ctx.group is None else dist.distributed_c10d._resolve_process_group(
        ctx.group).size()
    d_hidden, d_w13, d_w2, d_b13, d_b2, d_topk = _BACKWARD(
        grad, hidden, w13, w2, topk_ids, topk_weights, ctx.activation, w13_bias, w2_bias, world,
        list(ctx.needs[:5]))
    if ctx.group is not None and (ctx.needs[0] or ctx.needs[4]):  # the ranks' parts summed
        both = torch.cat([d_hidden.reshape(-1), d_topk.reshape(-1)])
        torch.ops.gmm_allreduce._all_reduce_(both, ctx.group)
        d_hidden, d_topk = both[:d_hidden.numel()].view_as(d_hidden), both[d_hidden.numel():]
    if ctx.group is None and ctx.world != 1:  # grouped_mlp added w2_bias / world_size
        d_b2 = [g / ctx.world for g in d_b2]
    out = dict.fromkeys(NAMES[ctx.op])
    out["hidden_states"] = d_hidden.to(hidden.dtype) if ctx.needs[0] else None
    out["w13"] = d_w13 if ctx.needs[1] else [None] * e13
    out["w2"] = d_w2 if ctx.needs[2] else [None] * e2
    if ctx.bias_given[0]:
        out["w13_bias"] = d_b13 if ctx.needs[3] else [None] * e13
    if ctx.bias_given[1]:
        out["w2_bias"] = d_b2 if ctx.needs[3] else [None] * e2
    if ctx.needs[4]:
        out["topk_weights"] = d_topk.reshape(topk_weights.shape).to(topk_weights.dtype)
    if ctx.needs[5]:
        out["shared_input"] = grad
    return tuple(out.values())


torch.library.register_autograd(
    "gmm_allreduce::grouped_mlp_all_reduce", _backward,
    setup_context=lambda ctx, inputs, output: _setup("grouped_mlp_all_reduce", ctx, inputs))
torch.library.register_autograd(
    "gmm_allreduce::grouped_mlp_reduce_scatter", _backward,
    setup_context=lambda ctx, inputs, output: _setup("grouped_mlp_reduce_scatter", ctx, inputs,
                                                     scatter=True))
torch.library.register_autograd(
    "gmm_allreduce::grouped_mlp", _backward,
    setup_context=lambda ctx, inputs, output: _setup("grouped_mlp", ctx, inputs))
