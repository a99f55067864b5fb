"""The Ascend MoE op family's names, arguments and defaults (gmm_allreduce.ascend), checked on the
cases of the Ascend sources themselves: torch_npu's op-plugin documentation and unit tests."""

import pytest
import torch
import torch.nn.functional as F

import gmm_allreduce
from gmm_allreduce.ascend import npu_grouped_matmul_finalize_routing


def _routing_case(m, k, n, batch, top_k, group_num, seed=0):
    """The inputs as op-plugin's test_npu_grouped_matmul_finalize_routing.py draws them (its
    test_npu_grouped_matmul_finalize_routing_1): int8 x and weights in [-10, 10), normal scales,
    top-k routing of `batch` tokens over `group_num` experts, softmax logits, row_index from the
    routing's argsort."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-10, 10, (m, k), dtype=torch.int8, generator=g)
    weight = torch.randint(-10, 10, (group_num, k, n), dtype=torch.int8, generator=g)
    scale = torch.normal(0, 0.01, (group_num, n), generator=g)
    pertoken_scale = torch.normal(0, 0.01, (m, 1), generator=g)
    group_list = torch.tensor([batch] * group_num, dtype=torch.int64)
    logit_ori = torch.normal(0, 0.1, (batch, group_num), generator=g)
    routing = torch.argsort(logit_ori, 1)[:, -top_k:]
    shared_input = torch.normal(0, 0.1, (batch // 4, n), generator=g).to(torch.bfloat16)
    logit = F.softmax(logit_ori[torch.arange(batch).reshape(-1, 1).repeat(1, top_k), routing],
                      dim=1, dtype=torch.float32).reshape(m)
    row_index = (torch.argsort(routing.reshape(-1)) // top_k).to(torch.int64)
    return dict(x=x, weight=weight, scale=scale, pertoken_scale=pertoken_scale,
                group_list=group_list, shared_input=shared_input, logit=logit, row_index=row_index)


def _golden(c, top_k, shared_input=None, shared_input_scale=1.0, shared_input_offset=0):
    """op-plugin's supported_op_exec, in float64 (exact int8 products) rather than int32."""
    sizes = c["group_list"].tolist()
    xs, ps = torch.split(c["x"], sizes), torch.split(c["pertoken_scale"], sizes)
    mm = torch.cat([(xs[i].double() @ c["weight"][i].double()) * c["scale"][i].double()
                    * ps[i].double() for i in range(len(sizes))])
    out = mm * c["logit"].double().reshape(-1, 1)
    out = out[torch.argsort(c["row_index"])].reshape(-1, top_k, mm.shape[-1]).sum(dim=1)
    if shared_input is not None:
        out[shared_input_offset:shared_input_offset + shared_input.shape[0]] += (
            shared_input_scale * shared_input.double())
    return out


def _close(got, want):
    # op-plugin compares with assertRtolEqual(..., 0.001); fp32 sums here are far closer.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_finalize_routing_the_documented_example():
    # op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_grouped_matmul_finalize_routing.md,
    # its example (and test_npu_grouped_matmul_finalize_routing_1): m, k, n = 576, 2048, 7168,
    # batch 72, topK 8, 8 experts, shared_input of batch // 4 rows at offset batch // 2.
    m, k, n, batch, top_k, group_num = 576, 2048, 7168, 72, 8, 8
    c = _routing_case(m, k, n, batch, top_k, group_num)
    offset = batch // 2
    got = npu_grouped_matmul_finalize_routing(
        c["x"], c["weight"], c["group_list"], scale=c["scale"],
        pertoken_scale=c["pertoken_scale"].reshape(m), shared_input=c["shared_input"],
        logit=c["logit"], row_index=c["row_index"], shared_input_offset=offset, output_bs=batch)
    assert got.dtype == torch.float32 and got.shape == (batch, n)  # "fixed to float32, (batch, n)"
    _close(got, _golden(c, top_k, c["shared_input"], 1.0, offset))


def test_finalize_routing_cumulative_group_list_without_shared_input():
    # op-plugin test_npu_grouped_matmul_finalize_routing_sharedinput_none_grouplist_cumsum, at
    # smaller shapes: the golden from counts, the call with group_list_type=0 on their cumsum.
    m, k, n, batch, top_k, group_num = 64, 256, 512, 16, 4, 4
    c = _routing_case(m, k, n, batch, top_k, group_num, seed=1)
    want = _golden(c, top_k)
    got = npu_grouped_matmul_finalize_routing(
        c["x"], c["weight"], torch.cumsum(c["group_list"], dim=0), scale=c["scale"],
        pertoken_scale=c["pertoken_scale"].reshape(m), logit=c["logit"], row_index=c["row_index"],
        output_bs=batch, group_list_type=0)
    _close(got, want)


def test_finalize_routing_shared_input_weight_and_the_rows_past_group_list():
    # The documented parameters: shared_input "multiplied by shared_input_weight, then added";
    # "the sum of group_list must be <= m" (rows past it take no part); output_bs 0 gives m rows
    # (op-plugin GroupedMatmulFinalizeRoutingKernelNpuOpApi.cpp: output_bs_real = x's m).
    m, k, n, batch, top_k, group_num = 32, 64, 128, 8, 4, 4
    c = _routing_case(m, k, n, batch, top_k, group_num, seed=2)
    want = _golden(c, top_k, c["shared_input"], 0.5, 3)
    extra = 5  # rows of x past group_list's total
    x = torch.cat([c["x"], torch.full((extra, k), 7, dtype=torch.int8)])
    pts = torch.cat([c["pertoken_scale"].reshape(m), torch.ones(extra)])
    logit = torch.cat([c["logit"], torch.ones(extra)])
    row_index = torch.cat([c["row_index"], torch.zeros(extra, dtype=torch.int64)])
    got = npu_grouped_matmul_finalize_routing(
        x, c["weight"], c["group_list"], scale=c["scale"], pertoken_scale=pts,
        shared_input=c["shared_input"], logit=logit, row_index=row_index,
        shared_input_weight=0.5, shared_input_offset=3, output_bs=batch)
    _close(got, want)
    full = npu_grouped_matmul_finalize_routing(
        c["x"], c["weight"], c["group_list"], scale=c["scale"],
        pertoken_scale=c["pertoken_scale"].reshape(m), logit=c["logit"], row_index=c["row_index"])
    assert full.shape == (m, n)
    _close(full[:batch], _golden(c, top_k))
    assert torch.count_nonzero(full[batch:]) == 0


def test_finalize_routing_takes_other_output_dtypes_and_weight_layouts():
    m, k, n, batch, top_k, group_num = 32, 64, 128, 8, 4, 4
    c = _routing_case(m, k, n, batch, top_k, group_num, seed=3)
    kw = dict(scale=c["scale"], pertoken_scale=c["pertoken_scale"], logit=c["logit"],
              row_index=c["row_index"], output_bs=batch)
    want = npu_grouped_matmul_finalize_routing(c["x"], c["weight"], c["group_list"], **kw)
    w_nk = c["weight"].transpose(1, 2).contiguous().transpose(1, 2)  # [e, n, k] memory
    torch.testing.assert_close(npu_grouped_matmul_finalize_routing(
        c["x"], w_nk, c["group_list"].tolist(), **kw), want, atol=0, rtol=0)
    fp8 = npu_grouped_matmul_finalize_routing(  # integers in [-10, 10) are exact in e4m3
        c["x"].to(torch.float8_e4m3fn), c["weight"].to(torch.float8_e4m3fn), c["group_list"], **kw)
    torch.testing.assert_close(fp8, want, rtol=1e-6, atol=1e-7)
    bf16 = npu_grouped_matmul_finalize_routing(c["x"], c["weight"], c["group_list"],
                                               dtype=torch.bfloat16, **kw)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), want, rtol=1e-2, atol=1e-3)


def _small():
    c = _routing_case(16, 32, 64, 4, 4, 4)
    kw = dict(scale=c["scale"], pertoken_scale=c["pertoken_scale"], logit=c["logit"],
              row_index=c["row_index"], output_bs=4)
    return c, kw


@pytest.mark.parametrize("change, error, message", [
    # What torch_npu documents but ours cannot honour: a clear NotImplementedError, never a
    # wrong result (op-plugin docs: int4 weights packed in int32, offset and bias for A8W4 only,
    # the MX formats of x_dtype, w_dtype, scale_dtype, pertoken_scale_dtype).
    (dict(weight=torch.zeros(4, 32, 8, dtype=torch.int32)), NotImplementedError, r"^w: int4"),
    (dict(offset=torch.zeros(4, 1, 64)), NotImplementedError, r"^offset: not supported"),
    (dict(bias=torch.zeros(4, 64)), NotImplementedError, r"^bias: not supported"),
    (dict(x_dtype=1), NotImplementedError, r"^x_dtype: not supported"),
    (dict(w_dtype=1), NotImplementedError, r"^w_dtype: not supported"),
    (dict(scale_dtype=1), NotImplementedError, r"^scale_dtype: not supported"),
    (dict(pertoken_scale_dtype=1), NotImplementedError, r"^pertoken_scale_dtype: not supported"),
    # Calls torch_npu refuses too (its binding: 2-D x, 3-D w, group_list_type 0 or 1).
    (dict(x=torch.zeros(1, 16, 32, dtype=torch.int8)), ValueError, r"^x: expected a 2-D tensor"),
    (dict(weight=torch.zeros(4, 2, 32, 64, dtype=torch.int8)), ValueError,
     r"^w: expected a 3-D tensor"),
    (dict(group_list_type=2), ValueError, r"^group_list_type: expected 0"),
    (dict(x=torch.zeros(16, 32)), TypeError, r"^x: expected int8 or float8_e4m3fn x"),
    (dict(dtype=torch.int32), ValueError, r"^dtype: expected None, torch.float32"),
    (dict(row_index=None), ValueError, r"^row_index: required"),
    (dict(group_list=torch.tensor([5, 5, 5, 5])), ValueError, r"^group_list: its rows \(20\)"),
    (dict(shared_input=torch.zeros(3, 64), shared_input_offset=2), ValueError,
     r"^shared_input_offset: rows \[2, 5\)"),
    # And ours, for the arguments it forwards (the op's own checks name them).
    (dict(scale=None), ValueError, r"^scale: required"),
])
def test_finalize_routing_bad_calls(change, error, message):
    c, kw = _small()
    args = {"x": c["x"], "weight": c["weight"], "group_list": c["group_list"], **kw, **change}
    x, w, gl = args.pop("x"), args.pop("weight"), args.pop("group_list")
    with pytest.raises(error, match=message):
        npu_grouped_matmul_finalize_routing(x, w, gl, **args)


def test_the_functions_are_exported():
    assert gmm_allreduce.npu_grouped_matmul_finalize_routing is npu_grouped_matmul_finalize_routing
