"""The names, arguments and defaults of Ascend's MoE ops (torch_npu), as thin fronts over ours, so
that code ported from an NPU changes its import and its device only. No engine of their own: each
maps its arguments onto `grouped_mat_mul` (docs/porting.md)."""

from __future__ import annotations

import torch

from .ops import grouped_mat_mul

_W8A8 = (torch.int8, torch.float8_e4m3fn)
_OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _not_honoured(**given) -> None:
    """NotImplementedError for the first argument given that our ops cannot honour."""
    for arg, (value, why) in given.items():
        if value is not None:
            raise NotImplementedError(f"{arg}: not supported here ({why}); pass None")


def _tensor(arg: str, value, dim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg}: expected a tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{arg}: expected a {dim}-D tensor, got shape {tuple(value.shape)}")
    return value


def _rows_used(group_list, group_list_type: int) -> int:
    """The rows of x that group_list covers (its sum, or its last cumulative offset)."""
    if isinstance(group_list, torch.Tensor):
        values = group_list.reshape(-1).tolist()  # one read of a device tensor (a sync)
    else:
        values = list(group_list)
    if not values:
        return 0
    return int(sum(values)) if group_list_type == 1 else int(values[-1])


def npu_grouped_matmul_finalize_routing(
    x: torch.Tensor,
    w: torch.Tensor,
    group_list,
    *,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    shared_input: torch.Tensor | None = None,
    logit: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    shared_input_weight: float = 1.0,
    shared_input_offset: int = 0,
    output_bs: int = 0,
    group_list_type: int = 1,
    tuning_config=None,
    x_dtype=None,
    w_dtype=None,
    scale_dtype=None,
    pertoken_scale_dtype=None,
) -> torch.Tensor:
    """torch_npu's grouped matmul with the MoE combine (W8A8), on any device of ours.

    ``x [m, k]`` int8 (or float8_e4m3fn) rows grouped by ``group_list`` (counts with
    ``group_list_type=1``, the default; cumulative with 0; its total may be below m: the rows past it
    are ignored), ``w [e, k, n]`` int8 in any layout, ``scale [e, n]`` and ``pertoken_scale [m]``
    their dequantisation scales. Row j's dequantised product, times ``logit[j]``, is summed into
    output row ``row_index[j]`` of ``output_bs`` rows (0: m); ``shared_input [s, n]`` times
    ``shared_input_weight`` is added to rows ``[shared_input_offset, shared_input_offset + s)``.
    Returns ``[output_bs, n]`` in ``dtype`` (None: float32, as on Ascend; bfloat16 and float16 too).

    int4 weights (packed in int32), ``offset``, ``bias`` (Ascend applies it before the per-token
    scale, for int4 weights only) and the MX formats (``x_dtype``, ``w_dtype``, ``scale_dtype``,
    ``pertoken_scale_dtype``) raise NotImplementedError; ``tuning_config`` (a tiling hint) is
    ignored. One collective-free call of ``grouped_mat_mul``; for a tensor-parallel layer, the same
    arguments of ``grouped_mat_mul_all_reduce`` add the sum over ranks.
    """
    _not_honoured(
        offset=(offset, "asymmetric int4 quantisation"),
        bias=(bias, "a bias before the per-token scale, for int4 weights"),
        x_dtype=(x_dtype, "MX and hifloat8 formats"),
        w_dtype=(w_dtype, "MX and hifloat8 formats"),
        scale_dtype=(scale_dtype, "MX scales"),
        pertoken_scale_dtype=(pertoken_scale_dtype, "MX scales"),
    )
    x = _tensor("x", x, 2)
    w = _tensor("w", w)
    if w.dtype == torch.int32:
        raise NotImplementedError("w: int4 weights packed in int32 are not supported here; pass "
                                  "int8 weights [e, k, n]")
    if w.dim() != 3:
        raise ValueError(f"w: expected a 3-D tensor [e, k, n], got shape {tuple(w.shape)}")
    if x.dtype not in _W8A8:
        raise TypeError(f"x: expected int8 or float8_e4m3fn x (W8A8), got {x.dtype}; for float x, "
                        "grouped_mat_mul with combine_index does the same")
    if group_list_type not in (0, 1):
        raise ValueError(f"group_list_type: expected 0 (cumulative) or 1 (counts), got "
                         f"{group_list_type!r}")
    out_dtype = torch.float32 if dtype is None else dtype
    if out_dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {dtype}")
    if row_index is None:
        raise ValueError("row_index: required (the output row of each row of x)")
    scale = _tensor("scale", scale, 2) if scale is not None else None
    if pertoken_scale is not None:
        pertoken_scale = _tensor("pertoken_scale", pertoken_scale)
        if pertoken_scale.dim() == 2 and pertoken_scale.shape[1] == 1:  # [m, 1], as its tests pass
            pertoken_scale = pertoken_scale.reshape(-1)
    m, n = x.shape[0], w.shape[-1]
    tokens = output_bs or m
    used = _rows_used(group_list, group_list_type)
    if not 0 <= used <= m:
        raise ValueError(f"group_list: its rows ({used}) must lie in [0, m = {m}]")

    def rows(t):  # the rows group_list covers
        return t if t is None or used == m else t[:used]

    shared = None
    if shared_input is not None:
        shared_input = _tensor("shared_input", shared_input, 2)
        s = shared_input.shape[0]
        if not 0 <= shared_input_offset <= tokens - s:
            raise ValueError(f"shared_input_offset: rows [{shared_input_offset}, "
                             f"{shared_input_offset + s}) of shared_input must lie in the "
                             f"output's {tokens} rows")
        if shared_input_offset == 0 and s == tokens and shared_input_weight == 1.0:
            shared = shared_input
        else:  # placed and scaled in fp32, as the Ascend kernel adds it
            shared = torch.zeros(tokens, n, dtype=torch.float32, device=x.device)
            shared[shared_input_offset:shared_input_offset + s] = (
                shared_input.to(torch.float32) * shared_input_weight)
    (out,) = grouped_mat_mul(
        [rows(x)], list(w.unbind(0)), group_list=group_list, split_item=3,
        group_list_type=group_list_type, combine_index=rows(row_index),
        combine_weight=rows(logit), num_tokens=tokens, shared_input=shared,
        scale=list(scale.unbind(0)) if scale is not None else None,
        per_token_scale=rows(pertoken_scale), output_dtype=out_dtype)
    return out
