"""Tensor-parallel MoE experts for Hugging Face transformers (>= 5), through its ExpertsInterface.

transformers dispatches every MoE experts module (``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I], with ``forward(hidden_states, top_k_index, top_k_weights)``) to the implementation
named by ``config._experts_implementation``. Importing this module registers ``"gmm_allreduce"``:

- each rank holds the experts split along the intermediate dim: ``gate_up_proj`` column-parallel
  (its gate and up rows ``[r I/n, (r+1) I/n)``), ``down_proj`` row-parallel (its columns alike);
- the whole block (routing, gate_up, the gated activation, down, the combine of each token's top-k
  rows and the all-reduce of [T, H]) is ONE call of ``grouped_mlp_all_reduce``, its weights
  passed as transposed views; an activation the block op lacks (``config.hidden_act`` other than
  silu or a tanh gelu) runs composed instead: the up projection locally
  (``gmm_allreduce.grouped_mat_mul`` on the rows sorted by expert), then the down projection, the
  combine and the all-reduce in one call of ``grouped_mat_mul_all_reduce``.

``shard_experts(model, group, mode="ep")`` splits the experts instead (expert parallelism,
``"gmm_allreduce_ep"``): each rank keeps E/n whole experts (rank r experts ``[r E/n, (r+1) E/n)``)
and its own tokens (data parallel). Per MoE block: the routing's (token, slot) pairs sorted by
expert, the counts exchanged (``dist.all_to_all_single``), the rows dispatched to their experts'
ranks and multiplied by gate_up there (``all_to_all_grouped_mat_mul``), the gated activation, then
the down products returned and combined into the token rows (``grouped_mat_mul_all_to_all``);
expert biases: gate_up's added to the received rows, down's (kept whole on every rank, [E, H])
added by the tokens' rank as its weighted sum over each token's experts. The shared expert stays
whole on every rank. Gradients flow back through both all-to-alls: an expert's
gradient sums every rank's tokens, the replicated parameters' are each rank's own (data parallel:
sum them over the group, as DDP does).

Weights in either of transformers' layouts are taken: ``[E, 2I, H]`` / ``[E, H, I]`` or transposed
(``is_transposed``: ``[E, H, 2I]`` / ``[E, I, H]``), gate and up columns concatenated or interleaved
(gpt-oss), with biases (``gate_up_proj_bias`` sliced with its columns, ``down_proj_bias`` counted
once). The gate is the module's: transformers' default (``config.hidden_act``) and gpt-oss's
clamped SwiGLU run in the block op (an interleaved ``gate_up_proj`` is reordered to gate columns
then up columns when sharded); any other ``_apply_gate`` runs composed.

``shard_experts(model, group)`` turns a loaded model (the same weights on every rank) into that
layout and selects the implementation. A block with a shared expert (Qwen2-MoE's
``shared_expert`` and ``shared_expert_gate``) gets it split alike (gate/up column-parallel,
down row-parallel) and added through ``shared_input``, so that routed and shared experts cost one
collective. The input of each column-parallel projection goes through ``copy_to_group``, whose
backward all-reduces the gradient (Megatron-LM's f operator), so that training gives the single
process's gradients.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from ..block import grouped_mlp_all_reduce
from ..expert_parallel import all_to_all_grouped_mat_mul, grouped_mat_mul_all_to_all
from ..ops import grouped_mat_mul, grouped_mat_mul_all_reduce

NAME = "gmm_allreduce"
NAME_EP = "gmm_allreduce_ep"

# transformers' activation names (ACT2FN) that the block op computes.
_BLOCK_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu",
                      "gelu_new": "gelu"}


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (every rank's column slice
    contributes to the input's gradient)."""

    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.ops.gmm_allreduce._all_reduce_(grad, ctx.group_name)
        return grad, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToGroup.apply(x, group.group_name)


def _weights(module) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj and down_proj as [E, H, 2I] and [E, I, H] (views: no copy)."""
    if module.is_transposed:
        return module.gate_up_proj, module.down_proj
    return module.gate_up_proj.transpose(1, 2), module.down_proj.transpose(1, 2)


def _biases(module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not module.has_bias:
        return None, None
    return module.gate_up_proj_bias, module.down_proj_bias


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, shared_input: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The "gmm_allreduce" experts implementation, on a module sharded by shard_experts."""
    group = self._gmm_group
    w13, w2 = _weights(self)
    b13, b2 = _biases(self)
    if self._gmm_activation is not None:  # hidden_states' gradient is summed over the group by the op
        return grouped_mlp_all_reduce(hidden_states, w13, w2, group, topk_ids=top_k_index,
                                      topk_weights=top_k_weights, activation=self._gmm_activation,
                                      w13_bias=b13, w2_bias=b2, shared_input=shared_input)
    tokens, top_k = top_k_index.shape
    experts = w13.shape[0]
    # The token-expert pairs sorted by expert: expert row j is token order[j] // top_k's.
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=experts)
    x = copy_to_group(hidden_states, group)[order // top_k]
    (up,) = grouped_mat_mul([x], list(w13.unbind(0)), bias=None if b13 is None else list(b13),
                            group_list=counts, group_list_type=1, split_item=3)
    act = self._apply_gate(up)  # this rank's [gate; up] slice: its slice of the activation
    (out,) = grouped_mat_mul_all_reduce(
        [act], list(w2.unbind(0)), group, bias=None if b2 is None else list(b2), group_list=counts,
        group_list_type=1, split_item=3, combine_index=order // top_k,
        combine_weight=top_k_weights.reshape(-1)[order], num_tokens=tokens,
        shared_input=shared_input)
    return out


ExpertsInterface.register(NAME, experts_forward)


def experts_forward_ep(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "gmm_allreduce_ep" experts implementation, on a module split by
    shard_experts(mode="ep"): this rank's tokens through every rank's experts."""
    group = self._gmm_group
    tokens, top_k = top_k_index.shape
    experts = self._gmm_experts  # E, over all ranks
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)  # by (rank, local expert): by global expert
    send = torch.bincount(expert_ids, minlength=experts)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[s*e + i]: rank s's rows for my i
    send, recv = send.tolist(), recv.tolist()
    w13, w2 = _weights(self)
    up, _, _ = all_to_all_grouped_mat_mul(hidden_states[order // top_k], w13, group,
                                          send_counts=send, recv_counts=recv)
    if self.has_bias:  # each received row's expert's: the rows are expert-major
        mine = self.gate_up_proj_bias.shape[0]
        rows = torch.tensor(recv).view(-1, mine).sum(0)
        up = up + self.gate_up_proj_bias.repeat_interleave(rows, dim=0)
    out, _ = grouped_mat_mul_all_to_all(
        self._apply_gate(up), w2, group, send_counts=recv,
        recv_counts=send, combine_index=order // top_k,
        combine_weight=top_k_weights.reshape(-1)[order], num_tokens=tokens)
    if self.has_bias:  # down_proj_bias, whole on every rank: each token's weighted sum of its
        # experts' (the combine of rows that each carry their expert's bias)
        out = out + (top_k_weights.unsqueeze(-1) * self.down_proj_bias[top_k_index]).sum(1).to(
            out.dtype)
    return out


ExpertsInterface.register(NAME_EP, experts_forward_ep)


def _shared_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE's sparse block with a sharded shared expert, whose partial joins the routed
    experts' one collective."""
    batch, sequence, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    _, routing_weights, selected = self.gate(flat)
    mlp = self.shared_expert
    local = copy_to_group(flat, self.experts._gmm_group)
    partial = mlp.down_proj(mlp.act_fn(mlp.gate_proj(local)) * mlp.up_proj(local))
    # The gate scales each token's row, so it scales the sum of the ranks' partials alike; its
    # gradient, dout . partial on each rank, is summed over the group by copy_to_group.
    gate = copy_to_group(F.sigmoid(self.shared_expert_gate(flat)), self.experts._gmm_group)
    shared = gate * partial
    out = self.experts(flat, selected, routing_weights, shared_input=shared)
    return out.reshape(batch, sequence, hidden)


def _slice(t: torch.Tensor, dim: int, rank: int, ranks: int, what: str) -> torch.Tensor:
    size = t.shape[dim]
    if size % ranks:
        raise ValueError(f"{what}: its {size} features along dim {dim} cannot be split evenly over "
                         f"{ranks} ranks")
    part = size // ranks
    return t.narrow(dim, rank * part, part)


def _block_activation(module) -> str | None:
    """The block op's activation for the module's gate, or None: the module's own, composed."""
    gate = type(module)._apply_gate
    if gate is _default_apply_gate:
        return _BLOCK_ACTIVATIONS.get(getattr(module.config, "hidden_act", None))
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # pragma: no cover - a transformers without gpt-oss
        return None
    if gate is GptOssExperts._apply_gate and (module.alpha, module.limit) == (1.702, 7.0):
        return "swigluoai"
    return None


def _shard_tensor_parallel(module, name: str, rank: int, ranks: int) -> None:
    """gate_up_proj's and its bias's gate and up columns [r I/n, (r+1) I/n), down_proj's rows alike;
    an interleaved gate_up_proj that the block op computes is reordered to gate then up columns."""
    activation = _block_activation(module)
    columns = 2 if module.is_transposed else 1  # gate_up_proj's 2I dim; its bias's is 1

    def split(t: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        if module.is_concatenated:
            gate, up = t.chunk(2, dim=dim)
        else:
            gate, up = t.unflatten(dim, (-1, 2)).unbind(dim + 1)
        gate, up = _slice(gate, dim, rank, ranks, what), _slice(up, dim, rank, ranks, what)
        if module.is_concatenated or activation is not None:
            return torch.cat([gate, up], dim=dim).contiguous()
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)  # the module's own order

    module.gate_up_proj = torch.nn.Parameter(split(module.gate_up_proj.data, columns,
                                                   f"{name}.gate_up_proj"))
    if module.has_bias:
        module.gate_up_proj_bias = torch.nn.Parameter(split(module.gate_up_proj_bias.data, 1,
                                                            f"{name}.gate_up_proj_bias"))
    rows = 1 if module.is_transposed else 2  # down_proj's I dim
    module.down_proj = torch.nn.Parameter(
        _slice(module.down_proj.data, rows, rank, ranks, f"{name}.down_proj").contiguous())
    if activation is not None:
        module.is_concatenated = True
    module._gmm_activation = activation


def _shard_linear(linear: torch.nn.Linear, dim: int, rank: int, ranks: int, what: str) -> None:
    if linear.bias is not None:
        raise NotImplementedError(f"{what}: a bias in a sharded projection is not supported")
    linear.weight = torch.nn.Parameter(_slice(linear.weight.data, dim, rank, ranks, what).clone())


def shard_experts(model: torch.nn.Module, group: dist.ProcessGroup | None = None, *,
                  mode: str = "tp") -> torch.nn.Module:
    """Splits every experts module of `model` (the same weights on every rank) over `group`'s
    ranks and selects the matching experts implementation; returns the model. mode "tp": every
    expert split along its intermediate dim (tensor parallel, the same tokens on every rank);
    "ep": E/n whole experts per rank (expert parallel, each rank its own tokens)."""
    if mode not in ("tp", "ep"):
        raise ValueError(f"mode: expected \"tp\" or \"ep\", got {mode!r}")
    group = group if group is not None else dist.group.WORLD
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    name_used = NAME if mode == "tp" else NAME_EP
    found = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")
                and getattr(module, "has_gate", False)):
            continue
        if mode == "ep":  # down_proj_bias stays whole (the tokens' ranks add it)
            experts = module.gate_up_proj.shape[0]
            split = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias",) if module.has_bias
                                                     else ())
            for what in split:
                setattr(module, what, torch.nn.Parameter(_slice(
                    getattr(module, what).data, 0, rank, ranks, f"{name}.{what}").clone()))
            module._gmm_experts = experts
        else:
            _shard_tensor_parallel(module, name, rank, ranks)
        module._gmm_group = group
        module.config._experts_implementation = name_used
        found += 1
    for name, block in model.named_modules():
        if mode == "ep" or not (hasattr(block, "shared_expert") and hasattr(block, "experts")
                                and hasattr(block.experts, "_gmm_group")):
            continue  # expert parallelism keeps the shared expert whole on every rank
        mlp = block.shared_expert
        _shard_linear(mlp.gate_proj, 0, rank, ranks, f"{name}.shared_expert.gate_proj")
        _shard_linear(mlp.up_proj, 0, rank, ranks, f"{name}.shared_expert.up_proj")
        _shard_linear(mlp.down_proj, 1, rank, ranks, f"{name}.shared_expert.down_proj")
        block.forward = types.MethodType(_shared_block_forward, block)
    if not found:
        raise ValueError("model: no experts module (gate_up_proj and down_proj) to shard")
    model.config._experts_implementation = name_used
    return model
