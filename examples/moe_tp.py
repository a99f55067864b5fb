"""A small tensor-parallel MoE block trained for 20 steps on the CPU with 2 ranks, its loss printed
next to the same model in a single process (plain PyTorch, full weights).

    python examples/moe_tp.py [--world-size 2] [--steps 20]

The block: a router (replicated) picks one expert per token (top-1, output scaled by its gate);
the experts' up-projection is column-parallel (each rank holds a slice of the hidden features,
computed with gmm_allreduce.grouped_mat_mul), followed by GELU; the down-projection is row-parallel
(gmm_allreduce.nn.GroupedRowParallelLinear: the fused grouped matmul + all-reduce). Both models
start from the same weights (same seed; each rank slices the full weights) and take SGD steps on
the same data. Exits 1 if the losses differ by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import gmm_allreduce
from gmm_allreduce.nn import GroupedRowParallelLinear

D, E, FFN, TOKENS, LR = 16, 4, 32, 96, 0.2


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(TOKENS, D, generator=gen), torch.randn(TOKENS, D, generator=gen)


def route(router, x):
    """Top-1 routing: token order sorted by expert, tokens per expert, and each token's gate."""
    probs = F.softmax(router(x), dim=-1)
    expert = probs.argmax(-1)
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=E)
    return order, counts.tolist(), probs.gather(1, expert[:, None])


class TPMoE(torch.nn.Module):
    """This rank's part of the block."""

    def __init__(self, rank, world):
        super().__init__()
        torch.manual_seed(0)  # every rank draws the same full weights, then keeps its slice
        self.router = torch.nn.Linear(D, E)
        full_up = torch.empty(E, D, FFN).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D))
        f = FFN // world
        self.up = torch.nn.Parameter(full_up[:, :, rank * f:(rank + 1) * f].clone())
        self.down = GroupedRowParallelLinear(E, f, D, bias=True)

    def forward(self, x):
        order, counts, gate = route(self.router, x)
        xs = x[order]
        h = F.gelu(gmm_allreduce.grouped_mat_mul([xs], list(self.up.unbind(0)), group_list=counts,
                                                 group_list_type=1, split_item=3)[0])
        out = torch.empty_like(x).index_copy(0, order, self.down(h, counts, group_list_type=1))
        return gate * out


class DenseMoE(torch.nn.Module):
    """The same block in one process: full weights, one torch.mm per expert."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same draws, in the same order, as TPMoE
        self.router = torch.nn.Linear(D, E)
        self.up = torch.nn.Parameter(torch.empty(E, D, FFN).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        bound = 1 / math.sqrt(FFN)
        self.down = torch.nn.Parameter(torch.empty(E, FFN, D).uniform_(-bound, bound))
        self.down_bias = torch.nn.Parameter(torch.empty(E, D).uniform_(-bound, bound))

    def forward(self, x):
        order, counts, gate = route(self.router, x)
        pieces = torch.split(x[order], counts)
        ys = [F.gelu(p @ self.up[e]) @ self.down[e] + self.down_bias[e] for e, p in enumerate(pieces)]
        return gate * torch.empty_like(x).index_copy(0, order, torch.cat(ys))


def train(model, steps):
    x, target = data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _rank(rank, world, init_file, steps, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    losses = train(TPMoE(rank, world), steps)
    if rank == 0:
        results.put(losses)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if FFN % args.world_size:
        parser.error(f"--world-size must divide the hidden features ({FFN})")

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank, args=(r, args.world_size, os.path.join(d, "rv"),
                                                  args.steps, results))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        tp = results.get(timeout=600)
        for p in procs:
            p.join()
    dense = train(DenseMoE(), args.steps)

    print(f"{'step':>4} {f'{args.world_size} ranks':>14} {'1 process':>14} {'rel. diff':>10}")
    worst = 0.0
    for step, (a, b) in enumerate(zip(tp, dense)):
        rel = abs(a - b) / abs(b)
        worst = max(worst, rel)
        print(f"{step:>4} {a:>14.8f} {b:>14.8f} {rel:>10.2e}")
    ok = len(tp) == len(dense) == args.steps and worst <= 1e-4 and dense[-1] < dense[0]
    print(f"max relative difference {worst:.2e}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
