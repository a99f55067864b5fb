"""The transformers integration: a tiny Qwen2-MoE (random config, no download; it has a shared
expert) sharded over 2 and 4 CPU ranks gives the single-process model's logits and gradients,
through the expert block op (silu), and through the composed ops (an activation the block lacks);
a tiny gpt-oss (transposed weights, interleaved gate and up columns, biases, its clamped SwiGLU)
alike."""

import pytest
import torch
import torch.distributed as dist
from transformers import GptOssConfig, GptOssForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

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


def tiny_gpt_oss(dtype, limit=7.0):
    """gpt-oss: [E, H, 2I] gate_up_proj with gate and up columns interleaved, biases, a clamped
    SwiGLU (`limit` other than 7 is a gate the block op lacks)."""
    config = GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=16, head_dim=8,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                          sliding_window=8, rope_parameters={"rope_type": "default",
                                                             "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    for layer in model.model.layers:
        layer.mlp.experts.limit = limit
    return model.to(dtype)


def _sharded(name: str, grad: torch.Tensor, rank: int, ranks: int, layout="qwen2") -> torch.Tensor:
    """The slice of a single-process gradient that rank `rank` holds after shard_experts: gate and
    up columns concatenated ("qwen2", "gpt-oss" through the block op) or interleaved ("gpt-oss
    composed"); gpt-oss's weights are transposed."""
    def part(t, dim):
        size = t.shape[dim] // ranks
        return t.narrow(dim, rank * size, size)
    gpt_oss = layout.startswith("gpt-oss")
    if name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
        dim = 2 if gpt_oss and grad.dim() == 3 else 1
        if not gpt_oss:
            gate, up = grad.chunk(2, dim=dim)
        else:
            gate, up = grad.unflatten(dim, (-1, 2)).unbind(dim + 1)
        if layout == "gpt-oss composed":
            return torch.stack([part(gate, dim), part(up, dim)], dim=dim + 1).flatten(dim, dim + 1)
        return torch.cat([part(gate, dim), part(up, dim)], dim=dim)
    if name.endswith("experts.down_proj"):
        return part(grad, 1 if gpt_oss else 2)
    if name.endswith(("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight")):
        return part(grad, 0)
    if name.endswith("shared_expert.down_proj.weight"):
        return part(grad, 1)
    return grad


def logits_and_grads(dtype, hidden_act="silu", model="qwen2", limit=7.0):
    """On every rank: the sharded model's logits and gradients against the single process's."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))

    def run(model):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    def build():
        if model == "gpt-oss":
            return tiny_gpt_oss(dtype, limit)
        return tiny_qwen2_moe(dtype, hidden_act)

    want_logits, want_grads = run(build())
    got_logits, got_grads = run(shard_experts(build()))
    layout = model if limit == 7.0 else f"{model} composed"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_logits, want_logits, **tol)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, _sharded(name, want_grads[name], rank, ranks, layout),
                                   **tol, msg=lambda m, name=name: f"{name}: {m}")
    return got_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_sharded_qwen2_moe_matches_one_process(pools, world, dtype):
    per_rank = pools(world).run(logits_and_grads, dtype)
    assert all(torch.equal(per_rank[0], logits) for logits in per_rank[1:])


def test_an_activation_the_block_lacks_runs_composed(pools):
    per_rank = pools(2).run(logits_and_grads, torch.float32, "relu")
    assert torch.equal(per_rank[0], per_rank[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sharded_gpt_oss_matches_one_process(pools, dtype):
    per_rank = pools(2).run(logits_and_grads, dtype, "silu", "gpt-oss")
    assert torch.equal(per_rank[0], per_rank[1])


def test_gpt_oss_with_another_limit_runs_composed(pools):
    per_rank = pools(2).run(logits_and_grads, torch.float32, "silu", "gpt-oss", 5.0)
    assert torch.equal(per_rank[0], per_rank[1])


def test_gpt_oss_takes_the_block_op(world1, monkeypatch):
    """Its "silu" hidden_act is not its gate: the block op runs swigluoai, on gate columns then up
    columns with their biases."""
    calls = []
    import gmm_allreduce.integrations.transformers as integration
    monkeypatch.setattr(integration, "grouped_mlp_all_reduce",
                        lambda *a, **k: calls.append(k["activation"]) or a[0])
    model = shard_experts(tiny_gpt_oss(torch.float32))
    experts = model.model.layers[0].mlp.experts
    assert experts.is_concatenated and experts.gate_up_proj.shape == (8, 32, 32)
    model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert calls == ["swigluoai", "swigluoai"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expert_parallel_gpt_oss_matches_one_process(pools, dtype):
    """Transposed, interleaved experts with biases: gate_up's split with the experts, down's whole
    on every rank (its gradient, summed over the ranks, the single process's)."""
    assert all(pools(2).run(expert_parallel_logits_and_grads, dtype, "gpt-oss"))


def test_the_implementation_is_selected(world1):
    model = shard_experts(tiny_qwen2_moe(torch.float32))
    assert model.config._experts_implementation == "gmm_allreduce"
    experts = model.model.layers[0].mlp.experts
    assert experts.config._experts_implementation == "gmm_allreduce"
    assert experts.gate_up_proj.shape == (8, 32, 32) and experts.down_proj.shape == (8, 32, 16)


def expert_parallel_logits_and_grads(dtype, model="qwen2"):
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

    build = tiny_gpt_oss if model == "gpt-oss" else tiny_qwen2_moe
    want_logits, want_grads = run(build(dtype), ids, probe)
    model = shard_experts(build(dtype), mode="ep")
    assert model.config._experts_implementation == "gmm_allreduce_ep"
    got_logits, got_grads = run(model, ids[mine], probe[mine])
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_logits, want_logits[mine], **tol)
    experts = 8 // ranks
    for name, grad in got_grads.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj", "experts.gate_up_proj_bias")):
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
