"""A small tensor-parallel MoE block trained for 20 steps on the CPU with 2 ranks, its loss printed
next to the same model in a single process (plain PyTorch, full weights).

    python examples/moe_tp.py [--world-size 2] [--steps 20] [--shared-expert] [--sequence-parallel]

The block: a router (replicated) picks one expert per token (top-1, output scaled by its gate);
the experts' up-projection is column-parallel (each rank holds a slice of the hidden features,
computed with gmm_allreduce.grouped_mat_mul), followed by GELU; the down-projection is row-parallel
(gmm_allreduce.nn.GroupedRowParallelLinear: the fused grouped matmul + all-reduce). Both models
start from the same weights (same seed; each rank slices the full weights) and take SGD steps on
the same data. Exits 1 if the losses differ by more than 1e-4 relative.

--shared-expert adds an always-on expert (a replicated MLP) whose output is added to the routed
experts'; it is computed while the down-projection's all-reduce is in flight: the layer is called
with async_op=True, and gmm_allreduce.wait collects its output afterwards.

--sequence-parallel ends the block with a reduce-scatter instead (Megatron-LM's sequence
parallelism): the down-projection returns each rank its share of the token rows (in expert order),
each rank computes the loss of its rows, backward all-gathers the output's gradient inside the op,
and the gradients of the replicated parameters (router, shared expert), which each rank gets for
its rows only, are summed over the ranks before the step.
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


def shared_expert(shared: bool):
    """The always-on expert's weights (drawn after the routed experts'), or None."""
    if not shared:
        return None
    up = torch.empty(D, FFN).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D))
    down = torch.empty(FFN, D).uniform_(-1 / math.sqrt(FFN), 1 / math.sqrt(FFN))
    return torch.nn.ParameterList([up, down])


class TPMoE(torch.nn.Module):
    """This rank's part of the block."""

    def __init__(self, rank, world, shared=False, sequence_parallel=False):
        super().__init__()
        torch.manual_seed(0)  # every rank draws the same full weights, then keeps its slice
        self.rank, self.world, self.sequence_parallel = rank, world, sequence_parallel
        self.router = torch.nn.Linear(D, E)
        full_up = torch.empty(E, D, FFN).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D))
        f = FFN // world
        self.up = torch.nn.Parameter(full_up[:, :, rank * f:(rank + 1) * f].clone())
        self.down = GroupedRowParallelLinear(E, f, D, bias=True, sequence_parallel=sequence_parallel)
        self.shared = shared_expert(shared)

    def replicated(self):
        """The parameters every rank holds whole."""
        return [*self.router.parameters(), *(self.shared or [])]

    def forward(self, x):
        """The block's output; with sequence parallelism, this rank's rows of it and their token
        indices."""
        order, counts, gate = route(self.router, x)
        xs = x[order]
        h = F.gelu(gmm_allreduce.grouped_mat_mul([xs], list(self.up.unbind(0)), group_list=counts,
                                                 group_list_type=1, split_item=3)[0])
        y = self.down(h, counts, group_list_type=1, async_op=self.shared is not None)
        if self.shared is not None:  # computed while the down-projection's collective runs
            s = F.gelu(x @ self.shared[0]) @ self.shared[1]
            (y,) = gmm_allreduce.wait([y])
        if self.sequence_parallel:  # this rank's rows, in expert order
            rows = x.shape[0] // self.world
            idx = order[self.rank * rows:(self.rank + 1) * rows]
            return gate[idx] * y + (s[idx] if self.shared is not None else 0), idx
        out = gate * torch.empty_like(x).index_copy(0, order, y)
        return out + s if self.shared is not None else out


class DenseMoE(torch.nn.Module):
    """The same block in one process: full weights, one torch.mm per expert."""

    def __init__(self, shared=False):
        super().__init__()
        torch.manual_seed(0)  # the same draws, in the same order, as TPMoE
        self.router = torch.nn.Linear(D, E)
        self.up = torch.nn.Parameter(torch.empty(E, D, FFN).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        bound = 1 / math.sqrt(FFN)
        self.down = torch.nn.Parameter(torch.empty(E, FFN, D).uniform_(-bound, bound))
        self.down_bias = torch.nn.Parameter(torch.empty(E, D).uniform_(-bound, bound))
        self.shared = shared_expert(shared)

    def forward(self, x):
        order, counts, gate = route(self.router, x)
        pieces = torch.split(x[order], counts)
        ys = [F.gelu(p @ self.up[e]) @ self.down[e] + self.down_bias[e] for e, p in enumerate(pieces)]
        out = gate * torch.empty_like(x).index_copy(0, order, torch.cat(ys))
        return out + F.gelu(x @ self.shared[0]) @ self.shared[1] if self.shared is not None else out


def train(model, steps):
    x, target = data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sequence_parallel = getattr(model, "sequence_parallel", False)
    losses = []
    for _ in range(steps):
        if sequence_parallel:  # this rank's rows' part of the mean squared error
            out, idx = model(x)
            loss = (out - target[idx]).square().sum() / target.numel()
        else:
            loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        value = loss.detach().clone()
        if sequence_parallel:  # replicated parameters: each rank has its rows' gradient
            for p in model.replicated():
                dist.all_reduce(p.grad)
            dist.all_reduce(value)
        opt.step()
        losses.append(value.item())
    return losses


def _rank(rank, world, init_file, steps, shared, sequence_parallel, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    losses = train(TPMoE(rank, world, shared, sequence_parallel), steps)
    if rank == 0:
        results.put(losses)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shared-expert", action="store_true",
                        help="add an always-on expert, computed while the all-reduce runs")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="end with a reduce-scatter of the token rows")
    args = parser.parse_args(argv)
    if FFN % args.world_size:
        parser.error(f"--world-size must divide the hidden features ({FFN})")
    if args.sequence_parallel and TOKENS % args.world_size:
        parser.error(f"--world-size must divide the tokens ({TOKENS}) with --sequence-parallel")

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank, args=(r, args.world_size, os.path.join(d, "rv"),
                                                  args.steps, args.shared_expert,
                                                  args.sequence_parallel, results))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        tp = results.get(timeout=600)
        for p in procs:
            p.join()
    dense = train(DenseMoE(args.shared_expert), args.steps)

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
