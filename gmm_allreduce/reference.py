"""Pure-PyTorch references, used by the tests, the demo and the benchmark alike.

- ``reference``: the exact sum over ranks in float64, from every rank's inputs (no collective).
- ``unfused``: the obvious composition a user writes today, in the inputs' dtype: one torch.mm per
  group, then one dist.all_reduce per output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist


def group_rows(group_list, group_list_type: int) -> list[int]:
    """Rows per group from group_list (cumulative end offsets, or counts)."""
    values = group_list.tolist() if isinstance(group_list, torch.Tensor) else list(group_list)
    if group_list_type == 1:
        return values
    return [end - start for start, end in zip([0, *values[:-1]], values)]


def group_operands(x, weight, group_list=None, split_item=0, group_list_type=0):
    """The 2-D x_i of each group, and the shape each group's output takes."""
    if split_item in (1, 3):
        xs = list(torch.split(x[0], group_rows(group_list, group_list_type)))
        shapes = [(xi.shape[0], w.shape[1]) for xi, w in zip(xs, weight)]
    else:
        xs = [xi.reshape(math.prod(xi.shape[:-1]), xi.shape[-1]) for xi in x]
        shapes = [(*xi.shape[:-1], w.shape[1]) for xi, w in zip(x, weight)]
    return xs, shapes


def assemble(ys: list[torch.Tensor], shapes, split_item: int) -> list[torch.Tensor]:
    if split_item in (2, 3):
        return [torch.cat(ys)]
    return [y.reshape(shape) for y, shape in zip(ys, shapes)]


def reference(
    inputs_per_rank: Sequence[dict], split_item: int = 0, group_list_type: int = 0
) -> list[torch.Tensor]:
    """sum_r (x_i^r @ W_i^r + bias_i^r / n) in float64, from each rank's inputs.

    Each element of inputs_per_rank is a dict with x, weight, bias (None or a list) and group_list.
    """
    world = len(inputs_per_rank)
    total = None
    for inp in inputs_per_rank:
        xs, shapes = group_operands(inp["x"], inp["weight"], inp.get("group_list"), split_item,
                                    group_list_type)
        bias = inp.get("bias") or [None] * len(xs)
        ys = []
        for xi, wi, bi in zip(xs, inp["weight"], bias):
            yi = xi.double() @ wi.double()
            ys.append(yi if bi is None else yi + bi.double() / world)
        total = ys if total is None else [t + y for t, y in zip(total, ys)]
    return assemble(total, shapes, split_item)


def unfused(x, weight, group=None, *, bias=None, group_list=None, split_item=0,
            group_list_type=0) -> list[torch.Tensor]:
    """The composition the op replaces: per-group torch.mm, then one dist.all_reduce per output."""
    world = dist.get_world_size(group)
    xs, shapes = group_operands(x, weight, group_list, split_item, group_list_type)
    ys = [torch.mm(xi, wi) for xi, wi in zip(xs, weight)]
    if bias:
        ys = [(y + b / world).to(y.dtype) for y, b in zip(ys, bias)]
    outputs = assemble(ys, shapes, split_item)
    for y in outputs:
        dist.all_reduce(y, group=group)
    return outputs


def _swigluoai(gate, up, alpha=1.702, limit=7.0):
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


_GATES = {"silu": lambda g, u: torch.nn.functional.silu(g) * u,
          "gelu": lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u,
          "swigluoai": _swigluoai}


def expert_block(hidden, w13, w2, topk_ids, topk_weights, activation="silu", w13_bias=None,
                 w2_bias=None, shared_input=None, world_size=1):
    """One rank's part of the expert block (gmm_allreduce.grouped_mlp), in plain PyTorch, in the
    inputs' dtype (pass float64 tensors for the exact one): per expert e, its (token, slot) rows
    gathered, gate_up, act(gate) * up, down, scaled by the routing weight and added into the token
    rows; w2_bias divided by world_size. Differentiable."""
    act = _GATES[activation]
    out = torch.zeros(hidden.shape[0], w2[0].shape[1], dtype=hidden.dtype)
    for e in range(len(w13)):
        token, slot = torch.where(topk_ids == e)
        pre = hidden[token] @ w13[e]
        if w13_bias is not None:
            pre = pre + w13_bias[e]
        gate, up = pre.chunk(2, dim=-1)
        rows = act(gate, up) @ w2[e]
        if w2_bias is not None:
            rows = rows + w2_bias[e] / world_size
        out = out.index_add(0, token, rows * topk_weights[token, slot, None])
    return out if shared_input is None else out + shared_input


def expert_parallel(xs, weights, send_counts, combine=None):
    """The expert-parallel pair in float64, from every rank's inputs (no collective).

    xs[s]: rank s's rows in (destination rank, local expert) order; weights[r]: rank r's e
    weights; send_counts[s][r*e + i]: rows rank s sends to expert i of rank r. Returns, per rank,
    (y, returned): y the dispatch's products on the experts' rank (expert-major: expert i's rows
    from rank 0, 1, ...), returned the same products back on their senders in x's order, or
    combined there when combine[s] = (index, weight, num_tokens) is given."""
    n, e = len(xs), len(weights[0])
    ys, back = [], [[None] * (n * e) for _ in range(n)]
    pieces = [list(torch.split(x.double(), list(c))) for x, c in zip(xs, send_counts)]
    for r in range(n):
        parts = []
        for i in range(e):
            for s in range(n):
                prod = pieces[s][r * e + i] @ weights[r][i].double()
                parts.append(prod)
                back[s][r * e + i] = prod
        ys.append(torch.cat(parts))
    out = []
    for s in range(n):
        rows = torch.cat(back[s])
        if combine is not None and combine[s] is not None:
            index, weight, tokens = combine[s]
            scaled = rows if weight is None else rows * weight.double().unsqueeze(1)
            rows = torch.zeros(tokens, rows.shape[1], dtype=torch.float64).index_add_(
                0, index.long(), scaled)
        out.append(rows)
    return ys, out
