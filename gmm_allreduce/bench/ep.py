"""Expert parallelism (scenarios with "ep"): each rank holds T tokens routed top-k over E global
experts, and E/n whole experts of its own. "mlp": the whole path (dispatch, gate_up, SiLU * up,
down, return, combine into token rows); "down": the down projection and the return with the combine
(its input rows already at the experts' ranks). Against the composition a careful user writes:
dist.all_to_all_single with splits, the rows reordered expert-major, the best grouped GEMM here
(gmm_allreduce.grouped_mat_mul, comm-free), the return all_to_all_single and an fp32 index_add_.
The routing's counts are exchanged once, before timing (both sides need them alike). Each method is
checked against a float64 reference of this rank's tokens first."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cases import Case
from .mlp import _inputs, reference, routing

# ep: the fused ops through shared memory (ranks of one host); ep_gloo: the same ops on a group
# whose all-to-all goes through gloo (GMM_ALLREDUCE_SHM=0); composed: the user's composition.
EP = ("ep", "ep_gloo", "composed")


def _gloo_group():
    import os

    old = os.environ.get("GMM_ALLREDUCE_SHM")
    os.environ["GMM_ALLREDUCE_SHM"] = "0"
    try:
        group = dist.new_group(list(range(dist.get_world_size())))
        torch.ops.gmm_allreduce._all_reduce_(torch.zeros(1), group.group_name)  # its setup
    finally:
        if old is None:
            del os.environ["GMM_ALLREDUCE_SHM"]
        else:
            os.environ["GMM_ALLREDUCE_SHM"] = old
    return group


def _setup(case: Case, rank: int, world: int):
    """This rank's tokens and routing (its own seed), every expert's weights (one seed), the rows in
    (rank, local expert) order and the counts each way."""
    experts = case.groups
    if experts % world:
        raise ValueError(f"{case.name}: {experts} experts do not split over {world} ranks")
    x, gate_up, down, _, _ = _inputs(case, 0)
    gen = torch.Generator().manual_seed(case.seed + 7 * rank + 1)
    x = torch.randn(case.tokens, x.shape[1], generator=gen, dtype=torch.float64)
    index, weights = routing(case.tokens, case.top_k, experts, case.seed + 31 * rank)
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (rank, local expert) order: global expert order
    send = torch.bincount(flat, minlength=experts)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # recv[s * e + i]: rows rank s sends to my expert i
    return dict(x=x, gate_up=gate_up, down=down, index=index, weights=weights,
                order=order, token=order // case.top_k, weight=weights.reshape(-1)[order],
                send=send.tolist(), recv=recv.tolist(), e=experts // world)


def _expert_major(recv: list[int], world: int, e: int) -> torch.Tensor:
    """The permutation from received (rank, expert) order to expert-major order."""
    starts, at = {}, 0
    for s in range(world):
        for i in range(e):
            starts[(s, i)] = at
            at += recv[s * e + i]
    return torch.cat([torch.arange(starts[(s, i)], starts[(s, i)] + recv[s * e + i])
                      for i in range(e) for s in range(world)] or [torch.zeros(0, dtype=torch.long)])


def _per_rank(counts: list[int], world: int, e: int) -> list[int]:
    return [sum(counts[r * e:(r + 1) * e]) for r in range(world)]


def make_ep_methods(case: Case, methods, world: int) -> dict[str, Callable]:
    import gmm_allreduce

    rank = dist.get_rank()
    s = _setup(case, rank, world)
    e, dtype, tokens = s["e"], case.dtype, case.tokens
    mine = slice(rank * e, (rank + 1) * e)
    w13 = s["gate_up"][mine].to(dtype).transpose(1, 2)  # [e, H, 2I] views of [e, 2I, H]
    w2 = s["down"][mine].to(dtype).transpose(1, 2)      # [e, I, H] views of [e, H, I]
    x = s["x"].to(dtype)
    token, weight, send, recv = s["token"], s["weight"], s["send"], s["recv"]
    expert_rows = [sum(recv[r * e + i] for r in range(world)) for i in range(e)]
    perm = _expert_major(recv, world, e)
    unperm = torch.argsort(perm)
    mlp = case.ep == "mlp"
    # "down": the down projection's input rows, already at the experts' ranks, expert-major.
    gen = torch.Generator().manual_seed(case.seed + 101 * rank)
    rows64 = torch.randn(sum(recv), w2.shape[1], generator=gen, dtype=torch.float64)
    rows_in = rows64.to(dtype)

    def act(y):
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up

    def fused(group):
        def call():
            if mlp:
                y, _, _ = gmm_allreduce.all_to_all_grouped_mat_mul(
                    x.index_select(0, token), w13, group, send_counts=send, recv_counts=recv)
                h = act(y)
            else:
                h = rows_in
            return gmm_allreduce.grouped_mat_mul_all_to_all(
                h, w2, group, send_counts=recv, recv_counts=send, combine_index=token,
                combine_weight=weight, num_tokens=tokens)[0]
        return call

    def composition(x, w13, w2, rows_in):
        in_splits, out_splits = _per_rank(send, world, e), _per_rank(recv, world, e)

        def call():
            if mlp:
                got = x.new_empty(sum(recv), x.shape[1])
                dist.all_to_all_single(got, x.index_select(0, token), out_splits, in_splits)
                y = gmm_allreduce.grouped_mat_mul([got.index_select(0, perm)], list(w13),
                                                  group_list=expert_rows, split_item=3,
                                                  group_list_type=1)[0]
                h = act(y)
            else:
                h = rows_in
            z = gmm_allreduce.grouped_mat_mul([h], list(w2), group_list=expert_rows,
                                              split_item=3, group_list_type=1)[0]
            back = z.new_empty(sum(send), z.shape[1])
            dist.all_to_all_single(back, z.index_select(0, unperm).contiguous(), in_splits,
                                   out_splits)
            acc = torch.float64 if z.dtype == torch.float64 else torch.float32
            out = torch.zeros(tokens, z.shape[1], dtype=acc)
            out.index_add_(0, token, back.to(acc) * weight.to(acc).unsqueeze(1))
            return out.to(z.dtype)

        return call

    calls = {}
    for method in methods:
        if method == "ep":
            calls["ep"] = fused(dist.group.WORLD)
        elif method == "ep_gloo":
            calls["ep_gloo"] = fused(_gloo_group())
        elif method == "composed":
            calls["composed"] = composition(x, w13, w2, rows_in)
    if mlp:  # every method against the float64 MLP of this rank's tokens
        ref = reference(s["x"], s["gate_up"], s["down"], s["index"], s["weights"])
    else:  # the composition in float64 (the all-to-all moves bytes exactly)
        ref = composition(s["x"], s["gate_up"][mine].transpose(1, 2),
                          s["down"][mine].transpose(1, 2), rows64)()
    for name, call in calls.items():
        got = call().double()
        error = float((got - ref).norm() / ref.norm())
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        assert error < bound, f"{case.name}: {name} is {error:.2e} off the float64 reference"
    return calls

