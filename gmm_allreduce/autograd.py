"""Autograd for the op: glue that saves the inputs and calls the C++ backward op.

Convention (Megatron-LM's row-parallel linear): the forward all-reduce's backward is the identity,
since the gradient arriving at the op's output is already the same on every rank; so no collective
runs in backward. grad x_i = dy_i @ W_i^T and grad W_i = x_i^T @ dy_i are local (each rank's own
K-slice); a bias is one logical parameter replicated on every rank, and its gradient is dy_i summed
over rows, on every rank.

The reduce-scatter op (sequence parallelism) returns each rank its own rows of the sum; its backward
all-gathers the output's gradient along the rows (the one collective of its backward), after which
every rank holds the whole dy and the same local products follow.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.gmm_allreduce)

_BACKWARD = torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce_backward
_GATHER = torch.ops.gmm_allreduce._all_gather_rows


# Each differentiable op's argument names, from its schema (registration.cpp).
_NAMES = {op: tuple(arg.name for arg in getattr(torch.ops.gmm_allreduce, op).default._schema.arguments)
          for op in ("grouped_mat_mul_all_reduce", "grouped_mat_mul_reduce_scatter", "grouped_mat_mul")}


def _arguments(op: str, inputs: tuple) -> dict:
    """The op's inputs by their schema's names, not by position."""
    return dict(zip(_NAMES[op], inputs))


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, _arguments("grouped_mat_mul_all_reduce", inputs), bias_scale=1)


def _setup_context_scatter(ctx, inputs, output):
    """The reduce-scatter op: backward first all-gathers the output's gradient over the group."""
    args = _arguments("grouped_mat_mul_reduce_scatter", inputs)
    _save(ctx, inputs, args, bias_scale=1)
    ctx.gather_group = args["group_name"]


def _setup_context_compute(ctx, inputs, output):
    """grouped_mat_mul adds bias / world_size: its bias gradient is scaled alike."""
    args = _arguments("grouped_mat_mul", inputs)
    _save(ctx, inputs, args, bias_scale=1 / args["world_size"])


def _save(ctx, inputs, args, bias_scale):
    x, weight, group_list_tensor = args["x"], args["weight"], args["group_list_tensor"]
    ctx.n_inputs = len(inputs)
    ctx.gather_group = None
    ctx.bias_scale = bias_scale

    bias = list(args["bias"]) if args["bias"] is not None else []
    ctx.counts = (len(x), len(weight), len(bias))
    ctx.group_list = args["group_list"]
    ctx.bias_given = args["bias"] is not None
    ctx.has_group_list_tensor = group_list_tensor is not None
    ctx.split_item, ctx.group_list_type = args["split_item"], args["group_list_type"]
    ctx.needs = (any(t.requires_grad for t in x), any(t.requires_grad for t in weight),
                 any(t.requires_grad for t in bias))
    tensors = [*x, *weight, *bias]
    if group_list_tensor is not None:
        tensors.append(group_list_tensor)
    ctx.save_for_backward(*tensors)


def _backward(ctx, grads):
    nx, nw, nb = ctx.counts
    if ctx.gather_group is not None:  # the reduce-scatter op: dy holds this rank's rows only
        grads = [_GATHER(grads[0].contiguous(), ctx.gather_group)]

    saved = ctx.saved_tensors
    x, weight, bias = saved[:nx], saved[nx:nx + nw], saved[nx + nw:nx + nw + nb]
    group_list_tensor = saved[-1] if ctx.has_group_list_tensor else None
    grad_x, grad_w, grad_b = _BACKWARD(
        list(grads), list(x), list(weight), list(bias) if nb else None, ctx.group_list,
        group_list_tensor, ctx.split_item, ctx.group_list_type, list(ctx.needs))
    if ctx.bias_scale != 1:
        grad_b = [g * ctx.bias_scale for g in grad_b]
    # One entry per input, shaped like it (autograd matches the structure, lists included).
    none = [None] * nx, [None] * nw, [None] * nb
    return (grad_x if ctx.needs[0] else none[0], grad_w if ctx.needs[1] else none[1],
            (grad_b if ctx.needs[2] else none[2]) if ctx.bias_given else None,
            *[None] * (ctx.n_inputs - 3))


torch.library.register_autograd("gmm_allreduce::grouped_mat_mul_all_reduce", _backward,
                                setup_context=_setup_context)
torch.library.register_autograd("gmm_allreduce::grouped_mat_mul_reduce_scatter", _backward,
                                setup_context=_setup_context_scatter)
torch.library.register_autograd("gmm_allreduce::grouped_mat_mul", _backward,
                                setup_context=_setup_context_compute)


@torch.library.register_fake("gmm_allreduce::grouped_mat_mul_all_reduce_backward")
def _backward_fake(grad, x, weight, bias, group_list, group_list_tensor, split_item,
                   group_list_type, output_mask):
    def like(tensors, needed):
        return [t.new_empty(t.shape) for t in tensors] if needed else []

    return (like(x, output_mask[0]), like(weight, output_mask[1]),
            like(bias or [], output_mask[2]))
