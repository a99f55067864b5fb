"""A small expert-parallel MoE block trained for 20 steps on the CPU with 2 ranks, its loss printed
next to the same model in a single process (plain PyTorch, all experts, all the data).

    python examples/moe_ep.py [--world-size 2] [--steps 20]

Each rank owns E / n whole experts and its own share of the tokens (data parallel). Per step, each
rank routes its tokens (top-2 of E; the router is replicated), sorts its (token, expert) pairs by
expert, exchanges the counts, and then:

- gmm_allreduce.all_to_all_grouped_mat_mul sends each row to its expert's rank and multiplies it
  there by the expert's up-projection;
- GELU on the expert's rank;
- gmm_allreduce.grouped_mat_mul_all_to_all multiplies by the down-projection and returns each row
  to its token's rank, combined there into the token's output with the routing weights.

Backward runs the same two all-to-alls the other way. The experts' gradients gather every rank's
tokens on the expert's rank; the router's, each rank's own tokens' share, are summed over the ranks
(as DDP would) before the SGD step. Both models start from the same weights and see the same data.
Exits 1 if the losses differ by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import gmm_allreduce

D, E, FFN, TOKENS, TOP_K, LR = 16, 4, 32, 64, 2, 0.2


def weights() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"router": torch.randn(D, E, generator=gen) / D ** 0.5,
            "up": torch.randn(E, D, FFN, generator=gen) / D ** 0.5,
            "down": torch.randn(E, FFN, D, generator=gen) / FFN ** 0.5}


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's tokens of this step, and their targets."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(TOKENS, D, generator=gen), torch.randn(TOKENS, D, generator=gen)


def route(x: torch.Tensor, router: torch.Tensor):
    probs = (x @ router).softmax(-1)
    weight, expert = probs.topk(TOP_K, dim=-1)
    return expert, weight / weight.sum(-1, keepdim=True)


def reference_step(p: dict, x, target) -> torch.Tensor:
    """The block in plain PyTorch, every expert, every token."""
    expert, weight = route(x, p["router"])
    out = torch.zeros_like(x)
    for e in range(E):
        token, slot = torch.where(expert == e)
        rows = F.gelu(x[token] @ p["up"][e]) @ p["down"][e]
        out = out.index_add(0, token, rows * weight[token, slot, None])
    return F.mse_loss(out, target, reduction="sum") / TOKENS


def expert_parallel_step(p: dict, x, target) -> torch.Tensor:
    """This rank's tokens through every rank's experts; the loss of its tokens."""
    expert, weight = route(x, p["router"])
    flat = expert.reshape(-1)
    order = torch.argsort(flat, stable=True)  # by (rank, local expert)
    send = torch.bincount(flat, minlength=E)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # recv[s * e + i]: rank s's rows for my expert i
    send, recv = send.tolist(), recv.tolist()
    h, _, _ = gmm_allreduce.all_to_all_grouped_mat_mul(x[order // TOP_K], p["up"], send_counts=send,
                                                       recv_counts=recv)
    out, _ = gmm_allreduce.grouped_mat_mul_all_to_all(
        F.gelu(h), p["down"], send_counts=recv, recv_counts=send, combine_index=order // TOP_K,
        combine_weight=weight.reshape(-1)[order], num_tokens=x.shape[0])
    return F.mse_loss(out, target, reduction="sum") / TOKENS  # its share of the whole loss


def rank_main(rank: int, world: int, path: str, steps: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    full = weights()
    e = E // world
    mine = slice(rank * e, (rank + 1) * e)
    p = {"router": full["router"].clone(), "up": full["up"][mine].clone(),
         "down": full["down"][mine].clone()}
    for t in p.values():
        t.requires_grad_()
    share = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
    losses = []
    for step in range(steps):
        x, target = data(step)
        loss = expert_parallel_step(p, x[share], target[share])
        loss.backward()
        dist.all_reduce(p["router"].grad)  # data parallel: the ranks' shares summed
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        losses.append(summed.item())
        with torch.no_grad():
            for t in p.values():
                t -= LR * t.grad
                t.grad = None
    if rank == 0:
        results.put(losses)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if E % args.world_size or TOKENS % args.world_size:
        print(f"--world-size must divide {E} experts and {TOKENS} tokens", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(rank_main, args=(args.world_size, os.path.join(d, "rv"), args.steps,
                                            results), nprocs=args.world_size, start_method="spawn")
    ep = results.get()
    p = {k: v.clone().requires_grad_() for k, v in weights().items()}
    worst = 0.0
    for step in range(args.steps):
        x, target = data(step)
        loss = reference_step(p, x, target)
        loss.backward()
        with torch.no_grad():
            for t in p.values():
                t -= LR * t.grad
                t.grad = None
        worst = max(worst, abs(ep[step] - loss.item()) / abs(loss.item()))
        print(f"step {step:2d}  expert parallel {ep[step]:.6f}  one process {loss.item():.6f}")
    print(f"largest relative difference: {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
