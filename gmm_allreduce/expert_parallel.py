"""Expert parallelism: grouped matmul fused with an all-to-all-v over a process group. Each of the
group's n ranks owns e experts (global expert g = r * e + i); the rows routed to an expert go to its
rank and come back. The Python front normalises the arguments (3-D weights to per-expert views,
counts given as tensors to lists, the process group to its name); checks, the all-to-all and the
products are C++ (csrc/core/expert_parallel.cpp). Its fake kernels and autograd glue follow, then
Ascend's spellings of the two ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._schema import NAMES, arguments
from .block import _experts
from .ops import _bool, _group_name, _int, _tensor

_BACKWARD = torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce_backward


def _counts(arg: str, value) -> list[int]:
    """Counts as a list of ints: a list/tuple of ints, or a 1-D integer tensor (read on the host:
    a device tensor costs one device-to-host copy)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{arg}: expected a list of ints or a 1-D integer tensor, got a "
                            f"{value.dim()}-D {value.dtype} tensor")
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_int(f"{arg}[{j}]", v) for j, v in enumerate(value)]
    raise TypeError(f"{arg}: expected a list of ints or a 1-D integer tensor, got "
                    f"{type(value).__name__}")


def _optional(arg: str, value) -> torch.Tensor | None:
    return None if value is None else _tensor(arg, value)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _none_if_empty(t: torch.Tensor, given: bool) -> torch.Tensor | None:
    return t if given else None


def all_to_all_grouped_mat_mul(x: torch.Tensor, weight, hcomm=None, *, send_counts,
                               recv_counts, shared_x: torch.Tensor | None = None,
                               shared_weight: torch.Tensor | None = None,
                               return_permuted: bool = False, check_ranks: bool = False):
    """Dispatch, then compute: rows sent to their experts' ranks, multiplied there.

    Each of the group's n ranks owns e local experts (this rank's weights). On every rank::

        x's rows are ordered by (destination rank r, its local expert i): send_counts[r*e + i]
        rows go to expert i of rank r;
        this rank receives recv_counts[s*e + i] rows from rank s for its expert i, placed
        expert-major (expert i's rows from rank 0, then rank 1, ...) as permuted_x;
        y = permuted_x's expert-i rows @ weight[i], for each i.

    Args:
        x: [A, K] float32/bfloat16/float16/float64, A = sum(send_counts).
        weight: [e, K, N] (or a list of e [K, N]), any strides.
        hcomm: the process group (its name, the group, or None for the default group).
        send_counts, recv_counts: n*e ints each, as lists or 1-D integer tensors (a device
            tensor costs one device-to-host copy). Counts that disagree between ranks raise on
            every rank through shared memory; check_ranks=True checks every count, on every
            backend, before any data moves.
        shared_x, shared_weight: a shared expert's [T, K'] and [K', N'], multiplied locally.
        return_permuted: also return permuted_x.
        check_ranks: the ranks agree on their calls first (one small all-reduce each for the
            verdicts and the counts): one rank's bad call is every rank's error.

    Returns:
        (y [sum(recv_counts), N], shared_x @ shared_weight or None, permuted_x or None).

    Autograd: the gradients of x (the return all-to-all of y's gradient times W^T), weight and
    the shared operands.
    """
    weights = _experts("weight", weight)
    sx, sw = _optional("shared_x", shared_x), _optional("shared_weight", shared_weight)
    keep = _bool("return_permuted", return_permuted)
    # The weights' gradient needs the received rows: kept whenever it will be asked for.
    y, shared_y, permuted = torch.ops.gmm_allreduce.all_to_all_grouped_mat_mul(
        _tensor("x", x), weights, _group_name("hcomm", hcomm), _counts("send_counts", send_counts),
        _counts("recv_counts", recv_counts), sx, sw, keep or _needs_grad(*weights),
        _bool("check_ranks", check_ranks))
    return y, _none_if_empty(shared_y, sx is not None), _none_if_empty(permuted, keep)


def grouped_mat_mul_all_to_all(x: torch.Tensor, weight, hcomm=None, *, send_counts,
                               recv_counts, shared_x: torch.Tensor | None = None,
                               shared_weight: torch.Tensor | None = None,
                               combine_index: torch.Tensor | None = None,
                               combine_weight: torch.Tensor | None = None,
                               num_tokens: int | None = None, check_ranks: bool = False):
    """Compute, then return: the inverse of all_to_all_grouped_mat_mul.

    On every rank::

        x's rows are expert-major as the dispatch left them: for each local expert i, the rows of
        rank 0, then rank 1, ...; send_counts[r*e + i] of expert i's rows go back to rank r;
        rows = x's expert-i rows @ weight[i], sent back; this rank receives recv_counts[r*e + i]
        rows from rank r's expert i, in the (r, i) order its dispatch sent them;
        with combine_index: out[combine_index[j]] += combine_weight[j] * rows[j] into
        [num_tokens, N] (fp32 accumulation, fp64 for fp64, rounded once); otherwise out = rows.

    Args:
        x: [A, K], A = sum(send_counts). weight: [e, K, N] or a list. hcomm, send_counts,
            recv_counts, shared_x, shared_weight, check_ranks: as for
            all_to_all_grouped_mat_mul (for the pair, this op's counts are the dispatch's
            swapped).
        combine_index: None, or int64/int32 [sum(recv_counts)], values in [0, num_tokens).
        combine_weight: None (weights 1), or float [sum(recv_counts)].
        num_tokens: the combined output's rows (with combine_index).

    Returns:
        (out, shared_x @ shared_weight or None).

    Autograd: the gradients of x (the dispatch all-to-all of out's gradient times W^T), weight,
    combine_weight and the shared operands.
    """
    n_tokens = None if num_tokens is None else _int("num_tokens", num_tokens)
    sx, sw = _optional("shared_x", shared_x), _optional("shared_weight", shared_weight)
    cw = _optional("combine_weight", combine_weight)
    # combine_weight's gradient needs the returned rows: kept only when it will be asked for.
    out, shared_y, _ = torch.ops.gmm_allreduce.grouped_mat_mul_all_to_all(
        _tensor("x", x), _experts("weight", weight), _group_name("hcomm", hcomm),
        _counts("send_counts", send_counts), _counts("recv_counts", recv_counts), sx, sw,
        _optional("combine_index", combine_index), cw, n_tokens, _needs_grad(cw),
        _bool("check_ranks", check_ranks))
    return out, _none_if_empty(shared_y, sx is not None)


# The fake kernels: the outputs' shapes from the arguments.
@torch.library.register_fake("gmm_allreduce::all_to_all_grouped_mat_mul")
def _dispatch_fake(x, weight, group_name, send_counts, recv_counts, shared_x, shared_weight,
                   return_permuted, check_ranks):
    rows = sum(recv_counts)
    shared = (x.new_empty((shared_x.shape[0], shared_weight.shape[1])) if shared_x is not None
              else x.new_empty((0,)))
    return (x.new_empty((rows, weight[0].shape[1])), shared,
            x.new_empty((rows, x.shape[1])) if return_permuted else x.new_empty((0,)))


@torch.library.register_fake("gmm_allreduce::grouped_mat_mul_all_to_all")
def _return_fake(x, weight, group_name, send_counts, recv_counts, shared_x, shared_weight,
                 combine_index, combine_weight, num_tokens, keep_rows, check_ranks):
    rows = x.new_empty((sum(recv_counts), weight[0].shape[1]))
    shared = (x.new_empty((shared_x.shape[0], shared_weight.shape[1])) if shared_x is not None
              else x.new_empty((0,)))
    if combine_index is None:
        return rows, shared, x.new_empty((0,))
    return (x.new_empty((num_tokens, weight[0].shape[1])), shared,
            rows if keep_rows else x.new_empty((0,)))


@torch.library.register_fake("gmm_allreduce::_combine_rows_backward")
def _combine_rows_backward_fake(grad, combine_index, combine_weight, rows):
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad.new_empty((combine_index.shape[0], grad.shape[1])),
            grad.new_empty((combine_index.shape[0] if rows is not None else 0,), dtype=acc))


@torch.library.register_fake("gmm_allreduce::_all_to_all_rows")
def _rows_fake(x, group_name, send_counts, recv_counts, e, to_experts):
    return x.new_empty((sum(recv_counts), x.shape[1]))


# Autograd. The dispatch's backward is the return of the gradients and vice versa: for
# y = P(x) @ W (P the dispatch's movement), grad x = P^-1(grad y @ W^T), grad W_i = P(x)_i^T @
# grad y_i; for out = combine(R(x @ W)) (R the return's movement), grad x = R^-1(g) @ W^T with g the
# combine's backward, grad W_i = x_i^T @ R^-1(g)_i. Each backward is one call of the other op.
def _expert_rows(counts: list[int], e: int) -> list[int]:
    return [sum(counts[r * e + i] for r in range(len(counts) // e)) for i in range(e)]


def _weight_grads(x: torch.Tensor, grad: torch.Tensor, weight, rows: list[int]):
    """grad W_i = x_i^T @ grad_i over the expert-major rows (the grouped products' backward op)."""
    return _BACKWARD([grad.contiguous()], [x], list(weight), None, rows, None, 3, 1, None, None, 1,
                     [False, True, False, False])[1]


def _shared_grads(ctx, grad_shared, shared_x, shared_weight):
    if grad_shared is None or shared_x is None or not any(ctx.needs_shared):
        return None, None
    gx, gw = _BACKWARD([grad_shared.contiguous()], [shared_x], [shared_weight], None,
                       [shared_x.shape[0]], None, 3, 1, None, None, 1,
                       [ctx.needs_shared[0], ctx.needs_shared[1], False, False])[:2]
    return gx[0] if ctx.needs_shared[0] else None, gw[0] if ctx.needs_shared[1] else None


def _transposed(weight) -> list[torch.Tensor]:
    return [w.t() for w in weight]


def _setup_common(ctx, op: str, inputs) -> dict:
    a = arguments(op, inputs)
    ctx.op, ctx.group, ctx.e = op, a["group_name"], len(a["weight"])
    ctx.send, ctx.recv = list(a["send_counts"]), list(a["recv_counts"])
    ctx.needs_x = a["x"].requires_grad
    ctx.needs_w = any(w.requires_grad for w in a["weight"])
    ctx.shared_given = a["shared_x"] is not None
    ctx.needs_shared = ((a["shared_x"].requires_grad, a["shared_weight"].requires_grad)
                        if ctx.shared_given else (False, False))
    return a


def _setup_dispatch(ctx, inputs, output):
    a = _setup_common(ctx, "all_to_all_grouped_mat_mul", inputs)
    ctx.save_for_backward(*a["weight"], output[2] if ctx.needs_w else None, a["shared_x"],
                          a["shared_weight"])


def _backward_dispatch(ctx, grad_y, grad_shared, grad_permuted):
    saved = list(ctx.saved_tensors)
    weight, permuted, shared_x, shared_weight = saved[:ctx.e], *saved[ctx.e:]
    out = dict.fromkeys(NAMES[ctx.op])
    if ctx.needs_x:
        grad_x = torch.ops.gmm_allreduce.grouped_mat_mul_all_to_all(
            grad_y.contiguous(), _transposed(weight), ctx.group, ctx.recv, ctx.send, None, None,
            None, None, None, False, False)[0]
        if grad_permuted is not None and grad_permuted.numel():
            grad_x = grad_x + torch.ops.gmm_allreduce._all_to_all_rows(
                grad_permuted.contiguous(), ctx.group, ctx.recv, ctx.send, ctx.e, False)
        out["x"] = grad_x
    out["weight"] = (_weight_grads(permuted, grad_y, weight, _expert_rows(ctx.recv, ctx.e))
                     if ctx.needs_w else [None] * ctx.e)
    out["shared_x"], out["shared_weight"] = _shared_grads(ctx, grad_shared, shared_x,
                                                          shared_weight)
    return tuple(out.values())


def _setup_return(ctx, inputs, output):
    a = _setup_common(ctx, "grouped_mat_mul_all_to_all", inputs)
    ctx.combined = a["combine_index"] is not None
    cw = a["combine_weight"]
    ctx.needs_cw = cw is not None and cw.requires_grad
    ctx.save_for_backward(a["x"] if ctx.needs_w else None, *a["weight"], a["combine_index"], cw,
                          output[2] if ctx.needs_cw else None, a["shared_x"], a["shared_weight"])


def _backward_return(ctx, grad_out, grad_shared, grad_rows):
    saved = list(ctx.saved_tensors)
    x, weight = saved[0], saved[1:1 + ctx.e]
    index, cw, rows, shared_x, shared_weight = saved[1 + ctx.e:]
    out = dict.fromkeys(NAMES[ctx.op])
    g = grad_out
    if ctx.combined:  # the combine's backward: each returned row's share of its token's gradient
        g, grad_cw = torch.ops.gmm_allreduce._combine_rows_backward(
            grad_out.contiguous(), index, cw, rows if ctx.needs_cw else None)
        if ctx.needs_cw:
            out["combine_weight"] = grad_cw.to(cw.dtype)
        if grad_rows is not None and grad_rows.numel():
            g = g + grad_rows
    if ctx.needs_x or ctx.needs_w:
        grad_x, _, g_experts = torch.ops.gmm_allreduce.all_to_all_grouped_mat_mul(
            g.contiguous(), _transposed(weight), ctx.group, ctx.recv, ctx.send, None, None,
            ctx.needs_w, False)
        out["x"] = grad_x if ctx.needs_x else None
        if ctx.needs_w:
            out["weight"] = _weight_grads(x, g_experts, weight, _expert_rows(ctx.send, ctx.e))
    if out["weight"] is None:
        out["weight"] = [None] * ctx.e
    out["shared_x"], out["shared_weight"] = _shared_grads(ctx, grad_shared, shared_x,
                                                          shared_weight)
    return tuple(out.values())


torch.library.register_autograd("gmm_allreduce::all_to_all_grouped_mat_mul", _backward_dispatch,
                                setup_context=_setup_dispatch)
torch.library.register_autograd("gmm_allreduce::grouped_mat_mul_all_to_all", _backward_return,
                                setup_context=_setup_return)


# Ascend's spellings (torch_npu.npu_alltoallv_gmm / npu_gmm_alltoallv): code written for them
# changes its import and its device. Its hcom is the process group (or its name) here.
def _ascend_weight(arg: str, weight, transposed: bool):
    weights = _experts(arg, weight)
    return [w.t() for w in weights] if _bool(f"trans_{arg}", transposed) else weights


def _ascend(gmm_weight, hcom, ep_world_size, send_counts, recv_counts, send_counts_tensor,
            recv_counts_tensor, mm_x, mm_weight, trans_gmm_weight, trans_mm_weight) -> dict:
    """Ascend's arguments as ours (everything but x and the op's own flags)."""
    n = _int("ep_world_size", ep_world_size)
    group = _group_name("hcom", hcom)
    size = torch.distributed.distributed_c10d._resolve_process_group(group).size()
    if n != size:
        raise ValueError(f"ep_world_size: expected the group's size {size}, got {n}")
    if mm_weight is not None and _bool("trans_mm_weight", trans_mm_weight):
        mm_weight = _tensor("mm_weight", mm_weight).t()
    return dict(
        weight=_ascend_weight("gmm_weight", gmm_weight, trans_gmm_weight), hcomm=group,
        send_counts=_counts("send_counts", send_counts if send_counts_tensor is None
                            else send_counts_tensor),
        recv_counts=_counts("recv_counts", recv_counts if recv_counts_tensor is None
                            else recv_counts_tensor),
        shared_x=_optional("mm_x", mm_x), shared_weight=_optional("mm_weight", mm_weight))


def npu_alltoallv_gmm(gmm_x, gmm_weight, hcom, ep_world_size, send_counts, recv_counts, *,
                      send_counts_tensor=None, recv_counts_tensor=None, mm_x=None, mm_weight=None,
                      trans_gmm_weight=False, trans_mm_weight=False, permute_out_flag=False):
    """torch_npu's npu_alltoallv_gmm: all_to_all_grouped_mat_mul under Ascend's names
    (send_counts_tensor / recv_counts_tensor, when given, replace the lists; trans_* mark
    weights given as [e, N, K] / [N', K']). Returns (gmm_y, mm_y or None, permute_out or None)."""
    a = _ascend(gmm_weight, hcom, ep_world_size, send_counts, recv_counts, send_counts_tensor,
                recv_counts_tensor, mm_x, mm_weight, trans_gmm_weight, trans_mm_weight)
    return all_to_all_grouped_mat_mul(gmm_x, **a,
                                      return_permuted=_bool("permute_out_flag", permute_out_flag))


def npu_gmm_alltoallv(gmm_x, gmm_weight, hcom, ep_world_size, send_counts, recv_counts, *,
                      send_counts_tensor=None, recv_counts_tensor=None, mm_x=None, mm_weight=None,
                      trans_gmm_weight=False, trans_mm_weight=False):
    """torch_npu's npu_gmm_alltoallv: grouped_mat_mul_all_to_all under Ascend's names. Returns
    (y, mm_y or None)."""
    a = _ascend(gmm_weight, hcom, ep_world_size, send_counts, recv_counts, send_counts_tensor,
                recv_counts_tensor, mm_x, mm_weight, trans_gmm_weight, trans_mm_weight)
    return grouped_mat_mul_all_to_all(gmm_x, **a)
