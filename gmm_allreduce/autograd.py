"""Autograd for the op: glue that saves the inputs and calls the C++ backward op.

Convention (Megatron-LM's row-parallel linear): the forward all-reduce's backward is the identity,
since the gradient arriving at the op's output is already the same on every rank; so no collective
runs in backward. grad x_i = dy_i @ W_i^T and grad W_i = x_i^T @ dy_i are local (each rank's own
K-slice); a bias is one logical parameter replicated on every rank, and its gradient is dy_i summed
over rows, on every rank.

The reduce-scatter op (sequence parallelism) returns each rank its own rows of the sum; its backward
all-gathers the output's gradient along the rows (the one collective of its backward), after which
every rank holds the whole dy and the same local products follow.

With the combine, dy_j = combine_weight[j] * dout[combine_index[j]] for each expert row, and
shared_input's gradient is dout itself (the sum's backward is the identity). combine_weight's
gradient <dout[combine_index[j]], y_j> needs the summed expert row y_j, which no rank holds: each
rank computes its part from its own partial products and the parts are summed over the group (one
all-reduce of M values), so that the gradient is exact and the same on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._schema import NAMES, arguments
from .quant import is_quantised

_BACKWARD = torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce_backward
_GATHER = torch.ops.gmm_allreduce._all_gather_rows


def _setup_context(ctx, inputs, output):
    args = arguments("grouped_mat_mul_all_reduce", inputs)
    _save(ctx, "grouped_mat_mul_all_reduce", args, args["group_name"])
    ctx.sum_group = args["group_name"]  # combine_weight's gradient: partials summed over the group


def _setup_context_scatter(ctx, inputs, output):
    """The reduce-scatter op: backward first all-gathers the output's gradient over the group."""
    args = arguments("grouped_mat_mul_reduce_scatter", inputs)
    _save(ctx, "grouped_mat_mul_reduce_scatter", args, args["group_name"])
    ctx.gather_group = ctx.sum_group = args["group_name"]


def _setup_context_compute(ctx, inputs, output):
    """grouped_mat_mul adds bias / world_size: its bias gradient is scaled alike; its output is
    this rank's part, so combine_weight's gradient is this rank's part too (no sum)."""
    args = arguments("grouped_mat_mul", inputs)
    _save(ctx, "grouped_mat_mul", args, args["world_size"])
    ctx.bias_scale = 1 / args["world_size"]


def _world_size(world: int | str) -> int:
    """world_size, or the size of the group of that name (resolved only where backward needs it:
    combine_weight's gradient recomputes the partial products, bias / world_size included)."""
    if isinstance(world, int):
        return world
    return dist.distributed_c10d._resolve_process_group(world).size()


def _save(ctx, op, args, world):
    x, weight, group_list_tensor = args["x"], args["weight"], args["group_list_tensor"]
    ctx.op, ctx.world = op, world
    ctx.gather_group = ctx.sum_group = None
    ctx.bias_scale = 1

    bias = list(args["bias"]) if args["bias"] is not None else []
    ctx.counts = (len(x), len(weight), len(bias))
    ctx.group_list = args["group_list"]
    ctx.bias_given = args["bias"] is not None
    ctx.split_item, ctx.group_list_type = args["split_item"], args["group_list_type"]
    combine_weight, shared = args["combine_weight"], args["shared_input"]
    ctx.needs = (any(t.requires_grad for t in x), any(t.requires_grad for t in weight),
                 any(t.requires_grad for t in bias),
                 combine_weight is not None and combine_weight.requires_grad,
                 shared is not None and shared.requires_grad)
    if any(ctx.needs) and is_quantised((*x, *weight), (args["scale"], args["per_token_scale"],
                                                       args["antiquant_scale"])):
        raise RuntimeError("quantised calls (int8 or float8 x or weight) are inference-only: an "
                           "input requires grad")
    # The optional tensors follow the lists, each saved where given (None keeps its place).
    optional = (group_list_tensor, args["combine_index"], combine_weight)
    ctx.optional_given = tuple(t is not None for t in optional)
    ctx.save_for_backward(*x, *weight, *bias, *(t for t in optional if t is not None))


def _backward(ctx, grads):
    nx, nw, nb = ctx.counts
    if ctx.gather_group is not None:  # the reduce-scatter op: dy holds this rank's rows only
        grads = [_GATHER(grads[0].contiguous(), ctx.gather_group)]

    saved = iter(ctx.saved_tensors)
    x, weight, bias = ([next(saved) for _ in range(count)] for count in (nx, nw, nb))
    group_list_tensor, combine_index, combine_weight = (
        next(saved) if given else None for given in ctx.optional_given)
    grad_x, grad_w, grad_b, grad_cw = _BACKWARD(
        list(grads), x, weight, bias if nb else None, ctx.group_list, group_list_tensor,
        ctx.split_item, ctx.group_list_type, combine_index, combine_weight,
        _world_size(ctx.world) if ctx.needs[3] else 1, list(ctx.needs[:4]))
    if ctx.bias_scale != 1:
        grad_b = [g * ctx.bias_scale for g in grad_b]
    if ctx.needs[3]:
        if ctx.sum_group is not None:  # the gradient of the summed products: the ranks' parts
            torch.ops.gmm_allreduce._all_reduce_(grad_cw, ctx.sum_group)
        grad_cw = grad_cw.to(combine_weight.dtype)
    # One entry per input, shaped like it (autograd matches the structure, lists included).
    out = dict.fromkeys(NAMES[ctx.op])
    out["x"] = grad_x if ctx.needs[0] else [None] * nx
    out["weight"] = grad_w if ctx.needs[1] else [None] * nw
    if ctx.bias_given:
        out["bias"] = grad_b if ctx.needs[2] else [None] * nb
    if ctx.needs[3]:
        out["combine_weight"] = grad_cw
    if ctx.needs[4]:  # the sum's backward is the identity: each rank's part gets dout
        out["shared_input"] = grads[0]
    return tuple(out.values())


torch.library.register_autograd("gmm_allreduce::grouped_mat_mul_all_reduce", _backward,
                                setup_context=_setup_context)
torch.library.register_autograd("gmm_allreduce::grouped_mat_mul_reduce_scatter", _backward,
                                setup_context=_setup_context_scatter)
torch.library.register_autograd("gmm_allreduce::grouped_mat_mul", _backward,
                                setup_context=_setup_context_compute)


@torch.library.register_fake("gmm_allreduce::grouped_mat_mul_all_reduce_backward")
def _backward_fake(grad, x, weight, bias, group_list, group_list_tensor, split_item,
                   group_list_type, combine_index, combine_weight, world_size, output_mask):
    def like(tensors, needed):
        return [t.new_empty(t.shape) for t in tensors] if needed else []

    rows = combine_index.shape[0] if combine_index is not None and output_mask[3] else 0
    opmath = torch.float64 if grad[0].dtype == torch.float64 else torch.float32
    return (like(x, output_mask[0]), like(weight, output_mask[1]),
            like(bias or [], output_mask[2]), grad[0].new_empty((rows,), dtype=opmath))
