"""The transformers integration: a tiny Qwen2-MoE (random config, no download; it has a shared
expert) sharded over 2 and 4 CPU ranks gives the single-process model's logits and gradients,
through the expert block op (silu), and through the composed ops (an activation the block lacks)."""

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from gmm_allreduce.integrations.transformers import shard_experts

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=5e-2)}


def tiny_qwen2_moe(dtype, hidden_act="silu"):
    config = Qwen2MoeConfig(hidden_act=hidden_act, vocab_size=96, hidden_size=32, intermediate_size=48,
                            moe_intermediate_size=16, shared_expert_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                            norm_topk_prob=True)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the reference: transformers' own loop
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # weights large enough that every layer matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype)


def _sharded(name: str, grad: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """The slice of a single-process gradient that rank `rank` holds after shard_experts."""
    def part(t, dim):
        size = t.shape[dim] // ranks
        return t.narrow(dim, rank * size, size)
    if name.endswith("experts.gate_up_proj"):
        gate, up = grad.chunk(2, dim=1)
        return torch.cat([part(gate, 1), part(up, 1)], dim=1)
    if name.endswith("experts.down_proj"):
        return part(grad, 2)
    if name.endswith(("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight")):
        return part(grad, 0)
    if name.endswith("shared_expert.down_proj.weight"):
        return part(grad, 1)
    return grad


def logits_and_grads(dtype, hidden_act="silu"):
    """On every rank: the sharded model's logits and gradients against the single process's."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))

    def run(model):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_logits, want_grads = run(tiny_qwen2_moe(dtype, hidden_act))
    model = shard_experts(tiny_qwen2_moe(dtype, hidden_act))
    got_logits, got_grads = run(model)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_logits, want_logits, **tol)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, _sharded(name, want_grads[name], rank, ranks), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return got_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_sharded_qwen2_moe_matches_one_process(pools, world, dtype):
    per_rank = pools(world).run(logits_and_grads, dtype)
    assert all(torch.equal(per_rank[0], logits) for logits in per_rank[1:])


def test_an_activation_the_block_lacks_runs_composed(pools):
    per_rank = pools(2).run(logits_and_grads, torch.float32, "relu")
    assert torch.equal(per_rank[0], per_rank[1])


def test_the_implementation_is_selected(world1):
    model = shard_experts(tiny_qwen2_moe(torch.float32))
    assert model.config._experts_implementation == "gmm_allreduce"
    experts = model.model.layers[0].mlp.experts
    assert experts.config._experts_implementation == "gmm_allreduce"
    assert experts.gate_up_proj.shape == (8, 32, 32) and experts.down_proj.shape == (8, 32, 16)


def expert_parallel_logits_and_grads(dtype):
    """shard_experts(mode="ep"), each rank its own two sequences of one batch: its logits are the
    single process's rows of them; its experts' gradients the single process's (every rank's
    tokens reach them); the replicated parameters' gradients, summed over the ranks (as DDP
    would), the single process's."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 96, (2 * ranks, 11), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2 * ranks, 11, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    mine = slice(2 * rank, 2 * rank + 2)

    def run(model, ids, probe):
        logits = model(input_ids=ids).logits
        (logits * probe).sum().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_logits, want_grads = run(tiny_qwen2_moe(dtype), ids, probe)
    model = shard_experts(tiny_qwen2_moe(dtype), mode="ep")
    assert model.config._experts_implementation == "gmm_allreduce_ep"
    got_logits, got_grads = run(model, ids[mine], probe[mine])
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_logits, want_logits[mine], **tol)
    experts = 8 // ranks
    for name, grad in got_grads.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = want_grads[name][rank * experts:(rank + 1) * experts]
        else:
            grad = grad.float()
            dist.all_reduce(grad)
            want = want_grads[name].float()
            if dtype == torch.bfloat16:  # bf16 gradients of two batches summed, against one
                # batch's: rounded apart elementwise, near-cancelling elements most
                assert float((grad - want).norm() / want.norm()) < 2e-2, name
                continue
        torch.testing.assert_close(grad, want, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_expert_parallel_qwen2_moe_matches_one_process(pools, world, dtype):
    assert all(pools(world).run(expert_parallel_logits_and_grads, dtype))


def test_shard_experts_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode: expected"):
        shard_experts(torch.nn.Linear(2, 2), mode="dp")
