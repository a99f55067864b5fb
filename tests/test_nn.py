"""GroupedRowParallelLinear, ExpertsMLP, torch.compile over the op, and the MoE training
example."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.nn import ExpertsMLP, GroupedRowParallelLinear

ROOT = Path(__file__).resolve().parents[1]


def layer_against_single_process():
    """On every rank: the layer's slice equals the single-process layer's weight (built on a
    group of this rank alone, same seed), and forward equals the single-process forward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(world)][rank]
    torch.manual_seed(0)
    layer = GroupedRowParallelLinear(3, 4, 5)
    torch.manual_seed(0)
    full = GroupedRowParallelLinear(3, 4 * world, 5, group=alone)
    assert torch.equal(layer.weight, full.weight[:, rank * 4:(rank + 1) * 4])
    assert torch.equal(layer.bias, full.bias)

    gen = torch.Generator().manual_seed(5)
    x_full = torch.randn(9, 4 * world, generator=gen)
    counts = [2, 0, 7]
    y = layer(x_full[:, rank * 4:(rank + 1) * 4], counts, group_list_type=1)
    want = full(x_full, counts, group_list_type=1)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    return layer.weight.grad.shape == layer.weight.shape and layer.bias.grad is not None


def test_layer_is_the_single_process_layer_sliced(pools):
    assert all(pools(2).run(layer_against_single_process))


def experts_against_single_process(bias):
    """On every rank: ExpertsMLP holds its slice of the single-process layer, and its forward and
    gradients (hidden_states' and topk_weights' whole, the weights' sliced) are that layer's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(world)][rank]
    torch.manual_seed(0)
    layer = ExpertsMLP(4, 6, 3, out_features=5, bias=bias)
    torch.manual_seed(0)
    full = ExpertsMLP(4, 6, 3 * world, out_features=5, bias=bias, group=alone)
    mine = slice(rank * 3, (rank + 1) * 3)
    gate, up = full.gate_up_proj.chunk(2, dim=2)
    assert torch.equal(layer.gate_up_proj, torch.cat([gate[..., mine], up[..., mine]], dim=2))
    assert torch.equal(layer.down_proj, full.down_proj[:, mine])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=gen)
    ids = torch.randint(-1, 4, (10, 2), generator=gen)
    weights = torch.rand(10, 2, generator=gen)
    outs, grads = [], []
    for module in (layer, full):
        h, w = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = module(h, ids, w)
        (y * torch.arange(50.0).view(10, 5).sin()).sum().backward()
        outs.append(y)
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    gate, up = full.gate_up_proj.grad.chunk(2, dim=2)
    torch.testing.assert_close(layer.gate_up_proj.grad,
                               torch.cat([gate[..., mine], up[..., mine]], dim=2), atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(layer.down_bias.grad, full.down_bias.grad, atol=1e-5, rtol=1e-5)
    return True


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_experts_mlp_is_the_single_process_layer_sliced(pools, bias):
    assert all(pools(2).run(experts_against_single_process, bias))


def test_layer_repr_and_checks(world1):
    assert "intermediate_features=8 (8 per rank)" in repr(ExpertsMLP(2, 4, 8))
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        ExpertsMLP(0, 4, 8)
    assert "in_features=6 (6 per rank)" in repr(GroupedRowParallelLinear(2, 6, 3))
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        GroupedRowParallelLinear(0, 6, 3)


def _fn(x, w, b, split_item, group_list, hcomm):
    y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, hcomm, bias=b, group_list=group_list,
                                                 split_item=split_item)
    return sum((t * t).sum() for t in y)


@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
def test_compile_fullgraph_matches_eager(world1, split_item):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(split_item)
    n = [5, 5] if split_item in (2, 3) else [5, 3]
    if split_item in (1, 3):
        x, gl = [torch.randn(7, 4, generator=gen)], [3, 7]
    else:
        x, gl = [torch.randn(3, 4, generator=gen), torch.randn(4, 4, generator=gen)], None
    w = [torch.randn(4, ni, generator=gen) for ni in n]
    b = [torch.randn(ni, generator=gen) for ni in n]
    leaves = [t.requires_grad_() for t in [*x, *w, *b]]
    results = []
    for fn in (_fn, torch.compile(_fn, fullgraph=True, backend="aot_eager")):
        loss = fn(x, w, b, split_item, gl, world1.group_name)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e)
    for a, b_ in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b_)


def test_compile_inductor_module(world1):
    """The layer under the default backend (Inductor), forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = GroupedRowParallelLinear(4, 8, 6)
    x = torch.randn(10, 8)
    counts = [1, 4, 0, 5]
    compiled = torch.compile(lambda x: layer(x, counts, group_list_type=1).square().sum(),
                             fullgraph=True)
    eager = layer(x, counts, group_list_type=1).square().sum()
    grads_e = torch.autograd.grad(eager, list(layer.parameters()))
    loss = compiled(x)
    grads_c = torch.autograd.grad(loss, list(layer.parameters()))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("flags", [[], ["--shared-expert"], ["--sequence-parallel"],
                                   ["--shared-expert", "--sequence-parallel", "--world-size", "4"]],
                         ids=["tp", "shared-async", "sequence-parallel", "both-w4"])
def test_moe_example_agrees_with_single_process(flags):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "moe_tp.py"), *flags],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith(": OK")


@pytest.mark.parametrize("world", ["2", "4"])
def test_expert_parallel_example_trains_like_one_process(world):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "moe_ep.py"), "--world-size",
                          world, "--steps", "10"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "largest relative difference" in out.stdout
