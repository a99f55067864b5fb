"""Layers over the ops: GroupedRowParallelLinear, a row-parallel grouped linear layer (e.g. the
down-projection of tensor-parallel MoE experts), and ExpertsMLP, a tensor-parallel MoE layer's
experts (the expert block op)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .block import grouped_mlp_all_reduce, grouped_mlp_reduce_scatter
from .ops import grouped_mat_mul_all_reduce, grouped_mat_mul_reduce_scatter
from .quant import quantize_per_token, quantize_weights


class GroupedRowParallelLinear(torch.nn.Module):
    """G linear maps, each with its input features split over the ranks of `group`.

    Rank r holds rows [r * K_local, (r + 1) * K_local) of every group's full [K, N] weight, as one
    parameter `weight` of shape [G, K_local, N], and the full bias [G, N], replicated. forward(x,
    group_list) takes this rank's [M, K_local] activations, rows sorted by group, and returns the
    [M, N] sum over ranks (split_item 3), identical on every rank; with sequence_parallel=True,
    this rank's rows [r * M / n, (r + 1) * M / n) of that sum (a reduce-scatter: Megatron-LM's
    sequence parallelism; M must divide by the world size). reduce_dtype=torch.float32 sums the
    ranks' partials in fp32, rounding each output once.

    Initialisation: the full weight [G, K, N] (K = K_local * world size) and bias [G, N] are drawn
    as in a single-process model (uniform in +-1/sqrt(K), like torch.nn.Linear, from the default
    generator), then sliced; with the same seed on every rank, rank r's slice is exactly the slice
    of the single-process model's weight. This draws the full weight once on each rank.
    """

    def __init__(self, num_groups: int, in_features_per_rank: int, out_features: int,
                 bias: bool = True, group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 sequence_parallel: bool = False, reduce_dtype: torch.dtype | None = None):
        super().__init__()
        self.sequence_parallel, self.reduce_dtype = sequence_parallel, reduce_dtype
        if num_groups < 1 or in_features_per_rank < 0 or out_features < 0:
            raise ValueError("num_groups must be >= 1 and the feature counts >= 0, got "
                             f"{num_groups}, {in_features_per_rank}, {out_features}")
        self.group = group
        # The group's name, fixed here so that forward traces under torch.compile.
        self.hcomm = (group or dist.group.WORLD).group_name if dist.is_initialized() else None
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.num_groups, self.out_features = num_groups, out_features
        self.in_features_per_rank, self.in_features = in_features_per_rank, in_features_per_rank * world
        factory = {"dtype": dtype, "device": device}
        self.weight = torch.nn.Parameter(
            torch.empty(num_groups, in_features_per_rank, out_features, **factory))
        self.bias = (torch.nn.Parameter(torch.empty(num_groups, out_features, **factory))
                     if bias else None)
        self.quantized: str | None = None  # None, "weight_only" or "w8a8"
        self.reset_parameters(rank)

    @torch.no_grad()
    def reset_parameters(self, rank: int = 0) -> None:
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
        full = torch.empty(self.num_groups, self.in_features, self.out_features, dtype=torch.float32)
        full.uniform_(-bound, bound)
        k = self.in_features_per_rank
        self.weight.copy_(full[:, rank * k:(rank + 1) * k])
        if self.bias is not None:
            self.bias.copy_(torch.empty(self.num_groups, self.out_features).uniform_(-bound, bound))

    @torch.no_grad()
    def quantize_weights(self, activations: bool = False) -> None:
        """Replaces the weight by its int8 quantisation (a buffer [G, K_local, N], each group's
        the transpose of an [N, K_local] tensor) and weight_scale ([G, N], fp32): inference only.
        activations=True: forward also quantises x per row (W8A8); else weight-only."""
        if self.quantized is not None:
            raise RuntimeError(f"the weights are quantised already ({self.quantized})")
        q, scale = quantize_weights(list(self.weight.unbind(0)))
        del self.weight
        self.register_buffer("weight", torch.stack([t.t() for t in q]).transpose(1, 2))
        self.register_buffer("weight_scale", torch.stack(scale))
        self.quantized = "w8a8" if activations else "weight_only"

    def forward(self, x: torch.Tensor, group_list, group_list_type: int = 0,
                async_op: bool = False) -> torch.Tensor:
        """x: [M, K_local], rows sorted by group; group_list: rows per group as cumulative end
        offsets (group_list_type 0) or counts (1), a list or an int tensor. async_op: return once
        the collective is started; read the output after gmm_allreduce.wait([y])."""
        bias = list(self.bias.unbind(0)) if self.bias is not None else None
        op = grouped_mat_mul_reduce_scatter if self.sequence_parallel else grouped_mat_mul_all_reduce
        quant = {}
        if self.quantized is not None:
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError("quantised calls are inference-only: x requires grad")
            scale = list(self.weight_scale.unbind(0))
            if self.quantized == "w8a8":
                dtype = x.dtype
                x, per_token = quantize_per_token(x)
                quant = dict(scale=scale, per_token_scale=per_token, output_dtype=dtype)
            else:
                quant = dict(antiquant_scale=scale)
        return op([x], list(self.weight.unbind(0)), self.hcomm, bias=bias, group_list=group_list,
                  split_item=3, group_list_type=group_list_type, reduce_dtype=self.reduce_dtype,
                  async_op=async_op, **quant)[0]

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, in_features={self.in_features} "
                f"({self.in_features_per_rank} per rank), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
                + (f", reduce_dtype={self.reduce_dtype}" if self.reduce_dtype is not None else "")
                + (f", quantized={self.quantized}" if self.quantized is not None else ""))


class ExpertsMLP(torch.nn.Module):
    """A tensor-parallel MoE layer's experts as one layer: E gated MLPs, each with its intermediate
    features split over the ranks of `group` (gate_up column-parallel, down row-parallel), run by
    the expert block op (grouped_mlp_all_reduce: routing, gate_up, activation, down, combine and
    one collective in one call).

    Rank r holds, as parameters, `gate_up_proj` [E, H, 2 I_local] (its slice of every expert's gate
    columns, then of its up columns) and `down_proj` [E, I_local, N] (its rows), and optionally
    `gate_up_bias` [E, 2 I_local] (its slice) and `down_bias` [E, N] (replicated). forward(
    hidden_states [T, H], topk_ids [T, k], topk_weights [T, k]) returns the [T, N] sum over ranks,
    identical on every rank (with sequence_parallel=True, this rank's rows [r T / n, (r + 1) T / n)).

    Initialisation: the full weights are drawn as in a single-process model (uniform in
    +-1/sqrt(fan_in), like torch.nn.Linear, from the default generator), then sliced: with the same
    seed on every rank, rank r holds exactly its slice of the single-process layer.
    """

    def __init__(self, num_experts: int, hidden_features: int, intermediate_per_rank: int,
                 out_features: int | None = None, activation: str = "silu", bias: bool = False,
                 group: dist.ProcessGroup | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, sequence_parallel: bool = False,
                 reduce_dtype: torch.dtype | None = None):
        super().__init__()
        out_features = hidden_features if out_features is None else out_features
        if num_experts < 1 or min(hidden_features, intermediate_per_rank, out_features) < 0:
            raise ValueError("num_experts must be >= 1 and the feature counts >= 0, got "
                             f"{num_experts}, {hidden_features}, {intermediate_per_rank}, "
                             f"{out_features}")
        self.activation, self.sequence_parallel, self.reduce_dtype = (activation, sequence_parallel,
                                                                      reduce_dtype)
        self.group = group
        self.hcomm = (group or dist.group.WORLD).group_name if dist.is_initialized() else None
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.num_experts, self.hidden_features, self.out_features = (num_experts, hidden_features,
                                                                     out_features)
        self.intermediate_per_rank = intermediate_per_rank
        self.intermediate_features = intermediate_per_rank * world
        factory = {"dtype": dtype, "device": device}
        e, h, i, n = num_experts, hidden_features, intermediate_per_rank, out_features
        self.gate_up_proj = torch.nn.Parameter(torch.empty(e, h, 2 * i, **factory))
        self.down_proj = torch.nn.Parameter(torch.empty(e, i, n, **factory))
        self.gate_up_bias = torch.nn.Parameter(torch.empty(e, 2 * i, **factory)) if bias else None
        self.down_bias = torch.nn.Parameter(torch.empty(e, n, **factory)) if bias else None
        self.reset_parameters(rank)

    @torch.no_grad()
    def reset_parameters(self, rank: int = 0) -> None:
        e, h, n = self.num_experts, self.hidden_features, self.out_features
        i, full_i = self.intermediate_per_rank, self.intermediate_features
        mine = slice(rank * i, (rank + 1) * i)

        def uniform(*shape, fan_in):
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            return torch.empty(*shape).uniform_(-bound, bound)

        gate_up = uniform(e, h, 2 * full_i, fan_in=h)
        gate, up = gate_up.chunk(2, dim=2)
        self.gate_up_proj.copy_(torch.cat([gate[..., mine], up[..., mine]], dim=2))
        self.down_proj.copy_(uniform(e, full_i, n, fan_in=full_i)[:, mine])
        if self.gate_up_bias is not None:
            bias = uniform(e, 2 * full_i, fan_in=h)
            gate, up = bias.chunk(2, dim=1)
            self.gate_up_bias.copy_(torch.cat([gate[:, mine], up[:, mine]], dim=1))
            self.down_bias.copy_(uniform(e, n, fan_in=full_i))

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, shared_input: torch.Tensor | None = None,
                async_op: bool = False) -> torch.Tensor:
        op = grouped_mlp_reduce_scatter if self.sequence_parallel else grouped_mlp_all_reduce
        return op(hidden_states, self.gate_up_proj, self.down_proj, self.hcomm, topk_ids=topk_ids,
                  topk_weights=topk_weights, activation=self.activation,
                  w13_bias=self.gate_up_bias, w2_bias=self.down_bias, shared_input=shared_input,
                  reduce_dtype=self.reduce_dtype, async_op=async_op)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_features={self.hidden_features}, "
                f"intermediate_features={self.intermediate_features} "
                f"({self.intermediate_per_rank} per rank), out_features={self.out_features}, "
                f"activation={self.activation!r}, bias={self.gate_up_bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")
