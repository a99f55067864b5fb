"""The names, arguments and defaults of Ascend's MoE ops (torch_npu), as thin fronts over ours, so
that code ported from an NPU changes its import and its device only. No engine of their own: each
maps its arguments onto `grouped_mat_mul`, or the combine alone for rows already computed
(docs/porting.md)."""

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


def _per_weight(arg: str, values, groups: int, split_3d: bool):
    """A list argument of one tensor per weight; for a single 3-D weight [g, k, n], its one tensor
    [g, ...] split per expert."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{arg}: expected a list of tensors, got {type(values).__name__}")
    values = list(values)
    if split_3d and len(values) == 1 and isinstance(values[0], torch.Tensor) \
            and values[0].dim() >= 2 and values[0].shape[0] == groups:
        values = list(values[0].unbind(0))
    return values


def _counts_from_pairs(group_list: torch.Tensor, groups: int) -> torch.Tensor:
    """group_list_type 2's [E, 2] rows (group index, rows) as per-group counts, on its device."""
    if group_list.dim() != 2 or group_list.shape[1] != 2:
        raise ValueError(f"group_list: expected [E, 2] (group index, rows) for group_list_type=2, "
                         f"got shape {tuple(group_list.shape)}")
    counts = torch.zeros(groups, dtype=torch.int64, device=group_list.device)
    return counts.index_add_(0, group_list[:, 0].long(), group_list[:, 1].long())


def npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    per_token_scale=None,
    group_list=None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item: int | None = 0,
    group_type: int | None = None,
    group_list_type: int = 0,
    act_type: int = 0,
    output_dtype: torch.dtype | None = None,
    tuning_config=None,
) -> list[torch.Tensor]:
    """torch_npu's grouped matmul (no collective), on any device of ours.

    Its rules: ``x`` and ``weight`` lists (a single 3-D weight ``[g, k, n]`` with its scales,
    biases and antiquant scales as ``[g, n]``), ``group_list`` a list of cumulative offsets or a
    tensor read by ``group_list_type`` (0 cumulative, 1 counts, 2 ``[E, 2]`` rows of (group, rows)),
    ``group_type`` None, -1 (each x its own group) or 0 (groups along M); ``per_token_scale`` a list
    (one tensor per x); ``output_dtype=None`` is x's dtype; W8A8 (int8 x and weights) takes an
    int32 bias, added to the int32 sums before dequantisation, and float ``scale`` (its output
    dtype then given: bfloat16 or float16, float32 too), with or without ``per_token_scale``;
    weight-only int8 takes ``antiquant_scale`` and ``antiquant_offset`` per output channel.

    Not supported, each a NotImplementedError naming the argument: ``offset``, the activation
    arguments, ``act_type`` other than 0, ``group_type=2`` (groups along K), int64 (packed) scales
    and int8 or int32 outputs of W8A8, int4 weights, per-group antiquant scales.
    ``tuning_config`` (a tiling hint) is ignored.
    """
    _not_honoured(
        offset=(offset, "the offset of a requantisation to int8"),
        activation_input=(activation_input, "a fused activation's backward input"),
        activation_quant_scale=(activation_quant_scale, "reserved by torch_npu"),
        activation_quant_offset=(activation_quant_offset, "reserved by torch_npu"),
    )
    if act_type != 0:
        raise NotImplementedError(f"act_type: fused activations are not supported here (got "
                                  f"{act_type!r}); apply it to the outputs")
    if group_type not in (None, -1, 0, 2):
        raise ValueError(f"group_type: expected None, -1, 0 or 2, got {group_type!r}")
    if group_type == 2:
        raise NotImplementedError("group_type: 2 (groups along K) is not supported here; pass "
                                  "None, -1 or 0")
    if group_list_type not in (0, 1, 2):
        raise ValueError(f"group_list_type: expected 0, 1 or 2, got {group_list_type!r}")
    split_item = 0 if split_item is None else split_item
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise TypeError(f"x: expected a list of tensors, got {type(x).__name__}")
    weight = _per_weight("weight", weight, 0, split_3d=False)
    single_3d = len(weight) == 1 and isinstance(weight[0], torch.Tensor) and weight[0].dim() == 3
    if single_3d:
        weight = list(weight[0].unbind(0))
    if any(isinstance(w, torch.Tensor) and w.dtype == torch.int32 for w in weight):
        raise NotImplementedError("weight: int4 weights packed in int32 are not supported here")
    groups = len(weight)
    bias = _per_weight("bias", bias, groups, single_3d)
    scale = _per_weight("scale", scale, groups, single_3d)
    antiquant_scale = _per_weight("antiquant_scale", antiquant_scale, groups, single_3d)
    antiquant_offset = _per_weight("antiquant_offset", antiquant_offset, groups, single_3d)
    if any(s.dim() != 1 for s in antiquant_scale or []):
        raise NotImplementedError("antiquant_scale: per-group scales ([G, n]) are not supported "
                                  "here; pass one scale per output channel")
    if any(s.dtype in (torch.int64, torch.uint64) for s in scale or []):
        raise NotImplementedError("scale: int64 scales (a requantisation to int8, packed) are not "
                                  "supported here; pass float32 or bfloat16 scales and a float "
                                  "output_dtype")
    w8a8 = bool(x) and isinstance(x[0], torch.Tensor) and x[0].dtype == torch.int8
    if w8a8 and output_dtype in (None, torch.int8, torch.int32):
        raise NotImplementedError(f"output_dtype: {output_dtype} (an int8 or int32 output of int8 "
                                  "x) is not supported here; pass torch.bfloat16, torch.float16 "
                                  "or torch.float32")

    # There split_item says only whether y is one tensor (2, 3) or one per group (0, 1); whether
    # x is one tensor cut by group_list follows from x. Ours names the four pairs 0-3.
    if split_item not in (0, 1, 2, 3):
        raise ValueError(f"split_item: expected 0, 1, 2 or 3, got {split_item!r}")
    gl, gl_type = group_list, group_list_type
    if isinstance(group_list, torch.Tensor) and group_list_type == 2:
        gl, gl_type = _counts_from_pairs(group_list, groups), 1
    elif group_list is not None and not isinstance(group_list, torch.Tensor):
        gl, gl_type = list(group_list), 0  # a list is always cumulative offsets there
    if group_type == -1 and group_list is not None:
        raise ValueError("group_list: must be None for group_type=-1 (each x is its own group)")
    one_x = len(x) == 1 and gl is not None
    if not one_x and gl is not None:  # several x: group_list, if given, must match their rows
        ends = gl.tolist() if isinstance(gl, torch.Tensor) else gl
        rows = [t.shape[0] for t in x]
        got = torch.tensor(ends).cumsum(0).tolist() if gl_type == 1 else list(ends)
        if got != torch.tensor(rows).cumsum(0).tolist():
            raise ValueError(f"group_list: expected the rows of x's tensors ({rows}), got {ends}")
        gl = None
    one_y = split_item in (2, 3)
    split_item = (3 if one_y else 1) if one_x else (2 if one_y else 0)

    if per_token_scale is not None:
        pts = _per_weight("per_token_scale", per_token_scale, 0, split_3d=False)
        pts = [t.reshape(-1) for t in pts]  # [m] or [m, 1]
        per_token_scale = pts[0] if len(pts) == 1 else torch.cat(pts)
    elif w8a8 and scale is not None:  # per-channel scales alone: rows of scale 1
        per_token_scale = torch.ones(sum(t.shape[0] for t in x), dtype=torch.float32,
                                     device=x[0].device)
    return grouped_mat_mul(
        list(x), weight, bias=bias, group_list=gl, split_item=split_item, group_list_type=gl_type,
        scale=scale, per_token_scale=per_token_scale, antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset, output_dtype=output_dtype)


def _in_range(arg: str, index: torch.Tensor, lowest: int, bound: int) -> None:
    """Host indices checked against [lowest, bound) (a device tensor is not read)."""
    if index.device.type == "cpu" and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < lowest or hi >= bound:
            raise ValueError(f"{arg}: expected values in [{lowest}, {bound}), got values in "
                             f"[{lo}, {hi}]")


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
                             expanded_src_to_dst_row, export_for_source_row,
                             drop_pad_mode=0) -> torch.Tensor:
    """torch_npu's npu_moe_finalize_routing: the experts' output rows gathered back into token
    rows. With T token rows and K slots each::

        out[i] = skip1[i] + skip2[i] + sum over k of scales[i, k] *
                 (expanded_permuted_rows[expanded_src_to_dst_row[i + k * T]]
                  + bias[export_for_source_row[i, k]])

    in fp32 (rounded once into the rows' dtype). skip1, skip2, bias, scales (1 where None) and
    export_for_source_row (needed with bias) are optional; T comes from skip1, skip2, scales or
    export_for_source_row. An index may repeat (a gather, not a permutation); -1 takes no row (the
    bias alone). drop_pad_mode 0: rows [T * K, H]; 1: rows [E, C, H] (each expert's capacity,
    padded), read as [E * C, H]; 2 and 3 (row-major indices) raise NotImplementedError.
    Inference, like Ascend's.
    """
    rows = expanded_permuted_rows
    if not isinstance(drop_pad_mode, int) or isinstance(drop_pad_mode, bool):
        raise TypeError(f"drop_pad_mode: expected an int, got {type(drop_pad_mode).__name__}")
    if drop_pad_mode not in (0, 1):
        raise NotImplementedError(f"drop_pad_mode: {drop_pad_mode} (indices in row-major order) is "
                                  "not supported here; pass 0 or 1")
    rows = _tensor("expanded_permuted_rows", rows, 2 if drop_pad_mode == 0 else 3)
    rows = rows.reshape(-1, rows.shape[-1])
    if rows.dtype not in _OUTPUT_DTYPES:
        raise TypeError(f"expanded_permuted_rows: expected float32, bfloat16 or float16, got "
                        f"{rows.dtype}")
    src = _tensor("expanded_src_to_dst_row", expanded_src_to_dst_row, 1)
    tokens = next((t.shape[0] for t in (skip1, skip2, scales, export_for_source_row)
                   if isinstance(t, torch.Tensor) and t.dim() == 2), None)
    if tokens is None:
        raise ValueError("skip1, skip2, scales, export_for_source_row: one of them is needed to "
                         "know the token rows (NUM_ROWS)")
    if tokens == 0 or src.shape[0] % tokens:
        raise ValueError(f"expanded_src_to_dst_row: expected NUM_ROWS * K values with NUM_ROWS = "
                         f"{tokens}, got {src.shape[0]}")
    top_k = src.shape[0] // tokens
    addends = []
    for arg, t in (("skip1", skip1), ("skip2", skip2)):
        if t is not None:
            t = _tensor(arg, t, 2)
            if t.shape != (tokens, rows.shape[1]) or t.dtype != rows.dtype:
                raise ValueError(f"{arg}: expected {rows.dtype} of shape ({tokens}, "
                                 f"{rows.shape[1]}), got {t.dtype} of shape {tuple(t.shape)}")
            addends.append(t)
    weight = expert = None
    if scales is not None:
        scales = _tensor("scales", scales, 2)
        if scales.shape != (tokens, top_k):
            raise ValueError(f"scales: expected shape ({tokens}, {top_k}), got "
                             f"{tuple(scales.shape)}")
        weight = scales.t().reshape(-1)  # add p = i + k * T takes scales[i, k]
    if bias is not None:
        bias = _tensor("bias", bias, 2)
        if export_for_source_row is None:
            raise ValueError("export_for_source_row: needed with bias (each slot's expert)")
        experts = _tensor("export_for_source_row", export_for_source_row, 2)
        if experts.shape != (tokens, top_k):
            raise ValueError(f"export_for_source_row: expected shape ({tokens}, {top_k}), got "
                             f"{tuple(experts.shape)}")
        expert = experts.t().reshape(-1)
    _in_range("expanded_src_to_dst_row", src, -1, rows.shape[0])
    if expert is not None:
        _in_range("export_for_source_row", expert, 0, bias.shape[0])
    token = torch.arange(src.shape[0], device=rows.device) % tokens
    return torch.ops.gmm_allreduce._combine_rows(rows, src, token, weight, bias, expert, tokens,
                                                 addends)


@torch.library.register_fake("gmm_allreduce::_combine_rows")
def _combine_rows_fake(rows, pick, token, weight, bias, expert, num_tokens, addends):
    return rows.new_empty((num_tokens, rows.shape[1]))
