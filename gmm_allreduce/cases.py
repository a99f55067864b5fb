"""Deterministic test cases: every rank's inputs regenerate from (seed, rank), so any process can
build all ranks' inputs and the float64 reference without a collective. Used by the tests and the
demo."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import reference

# Accepted error against the float64 reference, as (atol, rtol) for outputs of magnitude ~1 per
# rank. A partial is rounded once to the dtype, then the ranks' partials are summed in the dtype,
# so the error grows with the world size: the tolerance is scaled by sqrt(world) in `check`.
TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@dataclass(frozen=True)
class Case:
    """One call: per-group rows m, inner dim k and output dim n, and how the call is spelt.

    For split_item 0, ``lead`` may give each x_i's leading dims (their product is m_i). For
    split_item 1 and 3 all k are equal (one x). For 2 and 3 all n are equal (one y).
    """

    name: str
    split_item: int
    m: tuple[int, ...]
    k: tuple[int, ...]
    n: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    bias_dtype: torch.dtype | None = None  # None: no bias
    integers: bool = False  # small-integer inputs whose sums are exact in every dtype
    group_list_form: str = "list"  # "list" or "tensor" (int64) or "tensor32"
    group_list_type: int = 0  # 0 cumulative, 1 counts
    lead: tuple[tuple[int, ...], ...] | None = None
    seed: int = 0
    comm_turn: int = 0
    check_ranks: bool = False
    # "contiguous", or "strided": x with a step of 2 along K and weight stored transposed (views
    # of larger or other-order storage, as slices and .t() give them), or "transposed": x
    # contiguous and each weight the transposed view of an [N, K] tensor (nn.Linear's layout)
    layout: str = "contiguous"
    # The combine (split_item 2, 3): its num_tokens T (None: no combine); routing weights (float32,
    # the same on every rank, like combine_index) or none; a shared expert's partial per rank.
    # Quantised benchmark scenarios (the bench quantises the float inputs): "int8" (W8A8: x per
    # row, weights per channel) or "weight_int8" (weight-only int8); None: a float call.
    quant: str | None = None
    tokens: int | None = None
    weighted: bool = True
    shared: bool = False
    # top_k: every token gets exactly top_k expert rows (a router's top-k; M = tokens * top_k),
    # instead of any number
    top_k: int | None = None
    # A whole MoE MLP (benchmark scenarios only): gate_up [E, 2N, K], SiLU * up, down [E, K, N] and
    # the combine of the tokens' top_k rows, for the op composed as the transformers integration
    # calls it against other MLPs (bench/mlp.py); m holds the routed rows per expert.
    mlp: bool = False
    # Expert parallelism (benchmark scenarios only, bench/ep.py): "mlp" (dispatch, gate_up,
    # SiLU * up, down, return, combine) or "down" (the down projection, return and combine) over
    # the ranks, each owning groups / n whole experts; None otherwise.
    ep: str | None = None

    @property
    def groups(self) -> int:
        return len(self.m)


def make_inputs(case: Case, rank: int, world: int) -> dict:
    """This rank's x, weight, bias and group_list, regenerated from (case.seed, rank)."""
    gen = torch.Generator().manual_seed(case.seed * 1009 + rank)

    def draw(shape, scale=1.0):
        if case.integers:
            return torch.randint(-1, 2, shape, generator=gen).to(case.dtype)
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(case.dtype)

    def draw_x(*shape):
        if case.layout == "strided":
            return draw((*shape[:-1], 2 * shape[-1]))[..., ::2]
        return draw(shape)

    def draw_w(k, n):
        if case.layout in ("strided", "transposed"):
            return draw((n, k), 1 / math.sqrt(max(k, 1))).t()
        return draw((k, n), 1 / math.sqrt(max(k, 1)))

    weight = [draw_w(k, n) for k, n in zip(case.k, case.n)]
    if case.split_item in (1, 3):
        x = [draw_x(sum(case.m), case.k[0])]
    elif case.lead is not None:
        x = [draw_x(*lead, k) for lead, k in zip(case.lead, case.k)]
    else:
        x = [draw_x(m, k) for m, k in zip(case.m, case.k)]
    bias = None
    if case.bias_dtype is not None:
        if case.integers:  # bias_i / world stays an integer: exact in every dtype
            bias = [(torch.randint(-3, 4, (n,), generator=gen) * world).to(case.bias_dtype)
                    for n in case.n]
        else:
            bias = [torch.randn(n, generator=gen).to(case.bias_dtype) for n in case.n]
    inputs = {"x": x, "weight": weight, "bias": bias, "group_list": group_list(case)}
    if case.tokens is not None:
        inputs.update(combine_inputs(case, gen))
    return inputs


def combine_inputs(case: Case, gen: torch.Generator) -> dict:
    """The combine's arguments: the routing (index and weights) drawn from the seed alone, the same
    on every rank; shared_input from this rank's generator. Every token row may get any number of
    expert rows, none included."""
    route = torch.Generator().manual_seed(case.seed * 7919 + 17)
    rows, n = sum(case.m), case.n[0]
    if case.top_k is not None:  # the expert rows of the tokens' top-k slots, in a random order
        index = torch.randperm(rows, generator=route) // case.top_k
    else:
        index = torch.randint(0, max(case.tokens, 1), (rows,), generator=route)
    if case.integers:
        weight = torch.randint(-1, 2, (rows,), generator=route).float()
    else:
        weight = torch.rand(rows, generator=route) + 0.5
    shared = None
    if case.shared:
        shared = (torch.randint(-1, 2, (case.tokens, n), generator=gen).to(case.dtype)
                  if case.integers else torch.randn(case.tokens, n, generator=gen).to(case.dtype))
    return {"combine_index": index, "combine_weight": weight if case.weighted else None,
            "shared_input": shared}


def to_device(inputs: dict, device) -> dict:
    """make_inputs' tensors (a group_list tensor too) moved to `device`."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [t.to(device) for t in v]
        return v

    return {k: move(v) for k, v in inputs.items()}


def group_list(case: Case):
    if case.split_item not in (1, 3):
        return None
    values = list(case.m)
    if case.group_list_type == 0:
        values = [sum(values[: i + 1]) for i in range(len(values))]
    if case.group_list_form == "tensor":
        return torch.tensor(values, dtype=torch.int64)
    if case.group_list_form == "tensor32":
        return torch.tensor(values, dtype=torch.int32)
    return values


def call_kwargs(case: Case, inputs: dict, collective: bool = True) -> dict:
    """The keyword arguments of the op's call; collective=False leaves out those that only the
    collective op takes (for grouped_mat_mul and the unfused composition)."""
    kw = {
        "bias": inputs["bias"],
        "group_list": inputs["group_list"],
        "split_item": case.split_item,
        "group_list_type": case.group_list_type,
    }
    if collective:
        kw.update(comm_turn=case.comm_turn, check_ranks=case.check_ranks)
    if case.tokens is not None:
        kw.update(combine_index=inputs["combine_index"], combine_weight=inputs["combine_weight"],
                  num_tokens=case.tokens, shared_input=inputs["shared_input"])
    return kw


def expected(case: Case, world: int) -> list[torch.Tensor]:
    """The float64 reference for this case at this world size."""
    inputs = [make_inputs(case, r, world) for r in range(world)]
    summed = reference(inputs, case.split_item, case.group_list_type)
    if case.tokens is None:
        return summed
    return [combined(summed[0], inputs, case.tokens)]


def combined(rows: torch.Tensor, inputs_per_rank, tokens: int) -> torch.Tensor:
    """The combine of the summed expert rows (it is linear: combining the sum is summing the
    ranks' combines), plus every rank's shared_input, in float64."""
    first = inputs_per_rank[0]
    weight = first["combine_weight"]
    scaled = rows if weight is None else rows * weight.double()[:, None]
    out = torch.zeros(tokens, rows.shape[1], dtype=torch.float64)
    out.index_add_(0, first["combine_index"], scaled)
    for inputs in inputs_per_rank:
        if inputs["shared_input"] is not None:
            out += inputs["shared_input"].double()
    return out


def max_error(outputs, refs) -> float:
    errs = [(o.double() - r).abs().max().item() for o, r in zip(outputs, refs) if r.numel()]
    return max(errs, default=0.0)


def check(case: Case, outputs: list[torch.Tensor], world: int) -> float:
    """Asserts outputs match the reference (exactly for integer cases); returns the max error."""
    refs = expected(case, world)
    assert len(outputs) == len(refs), f"{case.name}: {len(outputs)} outputs, expected {len(refs)}"
    for i, (o, r) in enumerate(zip(outputs, refs)):
        assert o.dtype == case.dtype, f"{case.name}: output {i} has dtype {o.dtype}"
        assert tuple(o.shape) == tuple(r.shape), f"{case.name}: output {i} shape {tuple(o.shape)}"
        if case.integers:
            torch.testing.assert_close(o.double(), r, atol=0, rtol=0, msg=lambda m, i=i: f"{case.name}[{i}]: {m}")
        else:
            atol, rtol = TOLERANCE[case.dtype]
            scale = math.sqrt(world)
            if case.tokens:  # a token sums its rows' rounded products, weighted up to 1.5
                scale *= 1.5 * math.sqrt(max(1.0, sum(case.m) / case.tokens))
            torch.testing.assert_close(o.double(), r, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, i=i: f"{case.name}[{i}]: {m}")
    return max_error(outputs, refs)
