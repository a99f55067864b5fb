"""The Ascend MoE op family's names, arguments and defaults (gmm_allreduce.ascend), checked on the
cases of the Ascend sources themselves: torch_npu's op-plugin documentation and unit tests."""

import pytest
import torch
import torch.nn.functional as F

import gmm_allreduce
from gmm_allreduce.ascend import npu_grouped_matmul, npu_grouped_matmul_finalize_routing


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
    assert gmm_allreduce.npu_grouped_matmul is npu_grouped_matmul


# ---- npu_grouped_matmul: the cases of op-plugin's test/test_custom_ops/test_npu_grouped_matmul.py

def _normal(*size, dtype=torch.float16, std=0.1, g=None):
    return torch.normal(0.0, std, size, generator=g).to(dtype)


def _fp16_close(got, want):  # op-plugin: assertRtolEqual(..., 0.001) on fp16 outputs
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


def test_grouped_matmul_several_x_weights_and_outputs():
    # test_npu_grouped_matmul_0 (x, weight, y all lists; group_type=-1), its shapes.
    g = torch.Generator().manual_seed(0)
    x = [_normal(256, 256, g=g), _normal(1024, 256, g=g), _normal(512, 1024, g=g)]
    w = [_normal(256, 256, g=g), _normal(256, 1024, g=g), _normal(1024, 128, g=g)]
    b = [_normal(256, g=g), _normal(1024, g=g), _normal(128, g=g)]
    x_before = [t.clone() for t in x]
    out = npu_grouped_matmul(x, w, bias=b, group_list=None, split_item=0, group_type=-1)
    assert len(out) == 3 and all(o.dtype == torch.float16 for o in out)
    for o, xi, wi, bi in zip(out, x, w, b):
        _fp16_close(o, xi.double() @ wi.double() + bi.double())
    assert all(torch.equal(a, c) for a, c in zip(x, x_before))  # "assertRtolEqual(x[0], x_clone[0])"


def test_grouped_matmul_x_of_more_dims():
    # test_npu_grouped_matmul_0_multi_dim (x [7, 1024, 96] and [7, 1024, 32]), at 64 rows a batch
    # and N 512 and 1024 instead of 5120 and 8192.
    g = torch.Generator().manual_seed(1)
    x = [_normal(7, 64, 96, g=g), _normal(7, 64, 32, g=g)]
    w = [_normal(96, 512, g=g), _normal(32, 1024, g=g)]
    b = [_normal(512, g=g), _normal(1024, g=g)]
    out = npu_grouped_matmul(x, w, bias=b, split_item=0, group_type=-1)
    for o, xi, wi, bi in zip(out, x, w, b):
        assert o.shape == xi.shape[:-1] + (wi.shape[1],)
        _fp16_close(o, xi.double() @ wi.double() + bi.double())


@pytest.mark.parametrize("form", ["tensor", "list", "counts", "pairs"])
def test_grouped_matmul_one_x_cut_by_group_list(form):
    # test_npu_grouped_matmul_3 and _4 (one x [1792, 1024], three weights, one y; group_list
    # [256, 1280, 1792] as a tensor and as a list); counts (group_list_type=1) and [E, 2] pairs
    # (group_list_type=2) from the documented parameter.
    g = torch.Generator().manual_seed(2)
    x = _normal(1792, 1024, g=g)
    w = [_normal(1024, 256, g=g) for _ in range(3)]
    b = [_normal(256, g=g) for _ in range(3)]
    ends = [256, 1280, 1792]
    group_list, kind = {
        "tensor": (torch.tensor(ends), 0),
        "list": (ends, 0),
        "counts": (torch.tensor([256, 1024, 512]), 1),
        "pairs": (torch.tensor([[2, 512], [0, 256], [1, 1024]]), 2),
    }[form]
    (out,) = npu_grouped_matmul([x], w, bias=b, group_list=group_list, split_item=3, group_type=0,
                                group_list_type=kind)
    starts = [0, *ends[:-1]]
    want = torch.cat([x[a:e].double() @ wi.double() + bi.double()
                      for a, e, wi, bi in zip(starts, ends, w, b)])
    _fp16_close(out, want)
    outs = npu_grouped_matmul([x], w, bias=b, group_list=group_list, split_item=0, group_type=0,
                              group_list_type=kind)  # one x, one y per group
    _fp16_close(torch.cat(outs), want)


def test_grouped_matmul_one_3d_weight():
    # test_npu_grouped_matmul_1 (x [1792, 1024], one weight [2, 1024, 256], group_list
    # [256, 1792], split_item 3).
    g = torch.Generator().manual_seed(3)
    x = _normal(1792, 1024, g=g)
    w = _normal(2, 1024, 256, g=g)
    (out,) = npu_grouped_matmul([x], [w], group_list=torch.tensor([256, 1792]), split_item=3,
                                group_type=0)
    _fp16_close(out, torch.cat([x[:256].double() @ w[0].double(), x[256:].double() @ w[1].double()]))


def test_grouped_matmul_several_x_one_y():
    # test_npu_grouped_matmul_2 (three x, three weights of N 256, one y; split_item 2).
    g = torch.Generator().manual_seed(4)
    x = [_normal(256, 256, g=g), _normal(1024, 256, g=g), _normal(512, 1024, g=g)]
    w = [_normal(256, 256, g=g), _normal(256, 256, g=g), _normal(1024, 256, g=g)]
    b = [_normal(256, g=g) for _ in range(3)]
    (out,) = npu_grouped_matmul(x, w, bias=b, group_list=None, split_item=2, group_type=0)
    _fp16_close(out, torch.cat([xi.double() @ wi.double() + bi.double()
                                for xi, wi, bi in zip(x, w, b)]))


@pytest.mark.parametrize("scale_dtype, output_dtype", [(torch.float32, torch.float16),
                                                       (torch.bfloat16, torch.bfloat16)])
def test_grouped_matmul_w8a8_with_an_int32_bias(scale_dtype, output_dtype):
    # test_npu_grouped_matmul_quant_3 (int8 x [1792, 1024] and weights in [1, 5), int32 biases,
    # per-channel scales from deq_scale_generate: uniform in [0.01, 0.03]; float32 scales give
    # float16, bfloat16 scales bfloat16): y = (x @ w + bias) * scale.
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, 5, (1792, 1024), dtype=torch.int8, generator=g)
    w = [torch.randint(1, 5, (1024, 256), dtype=torch.int8, generator=g) for _ in range(3)]
    b = [torch.randint(1, 5, (256,), dtype=torch.int32, generator=g) for _ in range(3)]
    scale = [(torch.rand(256, generator=g) * 0.02 + 0.01).to(scale_dtype) for _ in range(3)]
    (out,) = npu_grouped_matmul([x], w, bias=b, scale=scale,
                                group_list=torch.tensor([256, 1280, 1792]), split_item=3,
                                group_type=0, output_dtype=output_dtype)
    assert out.dtype == output_dtype
    ends = [0, 256, 1280, 1792]
    want = torch.cat([(x[ends[i]:ends[i + 1]].double() @ w[i].double() + b[i].double())
                      * scale[i].double() for i in range(3)])
    rtol = 2e-3 if output_dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=0)


def test_grouped_matmul_w8a8_per_token_scales_as_a_list():
    # The documented per-token case: per_token_scale a list, one [m] tensor per x.
    g = torch.Generator().manual_seed(6)
    x = torch.randint(-128, 128, (48, 64), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (2, 64, 32), dtype=torch.int8, generator=g)
    scale = torch.rand(2, 32, generator=g) + 0.5
    pts = torch.rand(48, 1, generator=g) + 0.5
    (out,) = npu_grouped_matmul([x], [w], scale=[scale], per_token_scale=[pts],
                                group_list=torch.tensor([16, 32]), group_list_type=1,
                                split_item=3, group_type=0, output_dtype=torch.float32)
    want = torch.cat([(x[:16].double() @ w[0].double()) * scale[0].double(),
                      (x[16:].double() @ w[1].double()) * scale[1].double()]) * pts.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)


def test_grouped_matmul_int8_weights_with_float_x():
    # test_npu_grouped_matmul_antiquant_0 (fp16 x, int8 weights in [-9, 9), per-channel fp16
    # antiquant scale and offset, fp16 bias): y = x @ ((w + offset) * scale) + bias.
    g = torch.Generator().manual_seed(7)
    x = [_normal(256, 256, std=0.05, g=g), _normal(1024, 256, std=0.05, g=g),
         _normal(512, 1024, std=0.05, g=g)]
    w = [torch.randint(-9, 9, size, dtype=torch.int8, generator=g)
         for size in ((256, 256), (256, 1024), (1024, 128))]
    n = [256, 1024, 128]
    b = [_normal(k, std=0.05, g=g) for k in n]
    s = [_normal(k, std=0.05, g=g) for k in n]
    o = [_normal(k, std=0.05, g=g) for k in n]
    out = npu_grouped_matmul(x, w, bias=b, antiquant_scale=s, antiquant_offset=o, split_item=0,
                             group_type=-1)
    for y, xi, wi, bi, si, oi in zip(out, x, w, b, s, o):
        _fp16_close(y, xi.double() @ ((wi.double() + oi.double()) * si.double()) + bi.double())


def _gm_small():
    x = [torch.randint(-5, 5, (8, 16), dtype=torch.int8)]
    w = [torch.randint(-5, 5, (16, 8), dtype=torch.int8) for _ in range(2)]
    return x, w, dict(scale=[torch.ones(8)] * 2, group_list=[4, 8], split_item=3,
                      output_dtype=torch.float32)


@pytest.mark.parametrize("change, error, message", [
    # What torch_npu documents but ours cannot honour (op-plugin docs: the activation arguments,
    # act_type, group_type 2, int64 scales of an int8 output, offset).
    (dict(act_type=5), NotImplementedError, r"^act_type: fused activations"),
    (dict(group_type=2), NotImplementedError, r"^group_type: 2 \(groups along K\)"),
    (dict(offset=[torch.zeros(8)] * 2), NotImplementedError, r"^offset: not supported"),
    (dict(activation_input=[torch.zeros(8)]), NotImplementedError, r"^activation_input"),
    (dict(scale=[torch.ones(8, dtype=torch.int64)] * 2), NotImplementedError, r"^scale: int64"),
    (dict(output_dtype=None), NotImplementedError, r"^output_dtype: None \(an int8 or int32"),
    (dict(output_dtype=torch.int32), NotImplementedError, r"^output_dtype: torch.int32"),
    (dict(weight=[torch.zeros(16, 1, dtype=torch.int32)] * 2), NotImplementedError,
     r"^weight: int4"),
    (dict(antiquant_scale=[torch.ones(2, 8)] * 2), NotImplementedError,
     r"^antiquant_scale: per-group scales"),
    # Calls torch_npu refuses too.
    (dict(group_type=-1), ValueError, r"^group_list: must be None for group_type=-1"),
    (dict(group_type=1), ValueError, r"^group_type: expected None, -1, 0 or 2"),
    (dict(group_list_type=3), ValueError, r"^group_list_type: expected 0, 1 or 2"),
    (dict(split_item=4), ValueError, r"^split_item: expected 0, 1, 2 or 3"),
    (dict(x=[torch.zeros(4, 16, dtype=torch.int8)] * 2, group_list=[4, 6]), ValueError,
     r"^group_list: expected the rows of x's tensors \(\[4, 4\]\), got \[4, 6\]"),
    (dict(x=torch.zeros(8, 16, dtype=torch.int8)), TypeError, r"^x: expected a list of tensors"),
])
def test_grouped_matmul_bad_calls(change, error, message):
    x, w, kw = _gm_small()
    kw = {"x": x, "weight": w, **kw, **change}
    x, w = kw.pop("x"), kw.pop("weight")
    with pytest.raises(error, match=message):
        npu_grouped_matmul(x, w, **kw)


def _finalize_golden(rows, skip1, skip2, bias, scales, src, experts):
    """The golden of op-plugin's test/test_custom_ops/test_npu_moe_finalize_routing.py
    (moe_finalize_routing_np), in float64: a slot whose index is -1 adds its bias alone."""
    top_k = scales.shape[1] if scales is not None else 1
    tokens = src.shape[0] // top_k
    rows = rows.double().reshape(-1, rows.shape[-1])
    out = torch.zeros(tokens, rows.shape[1], dtype=torch.float64)
    for t in (skip1, skip2):
        if t is not None:
            out += t.double()
    for i in range(tokens):
        for k in range(top_k):
            value = int(src[k * tokens + i])
            row = rows[value] if value != -1 else 0
            s = float(scales[i, k]) if scales is not None else 1.0
            b = bias[int(experts[i, k])].double() if bias is not None else 0
            out[i] += s * (row + b)
    return out


def _finalize_inputs(expert_num, token_len, top_k, num_rows, dtype=torch.float32, seed=0):
    """op-plugin's generate_input_data: normal rows, skips, bias and scales; the destination rows
    a shuffled arange; each slot's expert drawn in [0, expert_num)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        expanded_permuted_rows=torch.randn(num_rows * top_k, token_len, generator=g).to(dtype),
        skip1=torch.randn(num_rows, token_len, generator=g).to(dtype),
        skip2=torch.randn(num_rows, token_len, generator=g).to(dtype),
        bias=torch.randn(expert_num, token_len, generator=g).to(dtype),
        scales=torch.randn(num_rows, top_k, generator=g).to(dtype),
        expanded_src_to_dst_row=torch.randperm(num_rows * top_k, generator=g).to(torch.int32),
        export_for_source_row=torch.randint(0, expert_num, (num_rows, top_k), generator=g,
                                            dtype=torch.int32))


def _golden_of(a):
    return _finalize_golden(a["expanded_permuted_rows"], a["skip1"], a["skip2"], a["bias"],
                            a["scales"], a["expanded_src_to_dst_row"], a["export_for_source_row"])


def test_moe_finalize_routing_the_unit_test_case():
    # op-plugin test/test_custom_ops/test_npu_moe_finalize_routing.py, test_moe_finalize_routing:
    # generate_input_data(expert_num=16, token_len=5, top_k=4, num_rows=5), rtol 1e-4.
    a = _finalize_inputs(16, 5, 4, 5)
    out = gmm_allreduce.npu_moe_finalize_routing(**a)
    assert out.shape == (5, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _golden_of(a), rtol=1e-4, atol=1e-5)


def test_moe_finalize_routing_drop_pad_unit_test_case():
    # The same file, test_moe_finalize_routing_drop_pad: rows [expert_num, c, H] = [16, 20, 5],
    # top_k 1, num_rows 20, scales None, export_for_source_row reshaped to (20, 1),
    # drop_pad_mode=1.
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(16, 20, 5, generator=g)
    a = dict(expanded_permuted_rows=rows, skip1=torch.randn(20, 5, generator=g),
             skip2=torch.randn(20, 5, generator=g), bias=torch.randn(16, 5, generator=g),
             scales=None, expanded_src_to_dst_row=torch.randperm(20, generator=g).int(),
             export_for_source_row=torch.randint(0, 16, (20, 1), generator=g).int())
    out = gmm_allreduce.npu_moe_finalize_routing(**a, drop_pad_mode=1)
    torch.testing.assert_close(out.double(), _golden_of(a), rtol=1e-4, atol=1e-5)


def test_moe_finalize_routing_the_documented_example():
    # op-plugin docs/context/torch_npu-npu_moe_finalize_routing.md: expert_num 16, token_len 10,
    # top_k 4, num_rows 50, float32; expanded_src_to_dst_row drawn with randint (indices repeat:
    # a gather), run unchanged but for the device.
    expert_num, token_len, top_k, num_rows = 16, 10, 4, 50
    expanded_permuted_rows = torch.randn((num_rows * top_k, token_len), dtype=torch.float32)
    skip1 = torch.randn((num_rows, token_len), dtype=torch.float32)
    skip2_optional = torch.randn((num_rows, token_len), dtype=torch.float32)
    bias = torch.randn((expert_num, token_len), dtype=torch.float32)
    scales = torch.randn((num_rows, top_k), dtype=torch.float32)
    expert_for_source_row = torch.randint(low=0, high=expert_num, size=(num_rows, top_k),
                                          dtype=torch.int32)
    expanded_src_to_dst_row = torch.randint(low=0, high=num_rows * top_k,
                                            size=(num_rows * top_k,), dtype=torch.int32)
    drop_pad_mode = 0
    output = gmm_allreduce.npu_moe_finalize_routing(
        expanded_permuted_rows, skip1, skip2_optional, bias, scales, expanded_src_to_dst_row,
        expert_for_source_row, drop_pad_mode)
    want = _finalize_golden(expanded_permuted_rows, skip1, skip2_optional, bias, scales,
                            expanded_src_to_dst_row, expert_for_source_row)
    torch.testing.assert_close(output.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_finalize_routing_16_bit_rounds_once(dtype):
    a = _finalize_inputs(8, 16, 2, 12, dtype=dtype, seed=3)
    out = gmm_allreduce.npu_moe_finalize_routing(**a)
    assert out.dtype == dtype
    want = _golden_of(a)
    assert float((out.double() - want).abs().max()) <= float(want.abs().max()) * 2 ** -7


def test_moe_finalize_routing_optional_inputs_and_dropped_rows():
    a = _finalize_inputs(8, 6, 3, 4, seed=4)
    a["expanded_src_to_dst_row"][[0, 5]] = -1  # dropped slots: their bias alone
    for drop in ({}, {"skip1": None}, {"skip1": None, "skip2": None},
                 {"bias": None, "export_for_source_row": None}, {"scales": None, "skip1": None}):
        b = {**a, **drop}
        if b["scales"] is None:  # K from the inputs that are left: one slot per row
            b["expanded_src_to_dst_row"] = a["expanded_src_to_dst_row"][:4].clamp_min(0)
            b["export_for_source_row"] = a["export_for_source_row"][:, :1]
        out = gmm_allreduce.npu_moe_finalize_routing(**b)
        torch.testing.assert_close(out.double(), _golden_of(b), rtol=1e-5, atol=1e-5)


def test_moe_finalize_routing_errors():
    a = _finalize_inputs(8, 6, 3, 4)
    cases = [
        ({"drop_pad_mode": 2}, NotImplementedError, "drop_pad_mode: 2"),
        ({"drop_pad_mode": True}, TypeError, "drop_pad_mode: expected an int"),
        ({"expanded_permuted_rows": a["expanded_permuted_rows"].int()}, TypeError,
         "expanded_permuted_rows: expected float32"),
        ({"expanded_permuted_rows": a["expanded_permuted_rows"][0]}, ValueError,
         "expanded_permuted_rows: expected a 2-D"),
        ({"skip1": None, "skip2": None, "scales": None, "export_for_source_row": None,
          "bias": None}, ValueError, "one of them is needed"),
        ({"scales": a["scales"][:, :2]}, ValueError, "scales: expected shape"),
        ({"export_for_source_row": None}, ValueError, "export_for_source_row: needed with bias"),
        ({"skip2": a["skip2"].double()}, ValueError, "skip2: expected"),
        ({"expanded_src_to_dst_row": a["expanded_src_to_dst_row"][:-1]}, ValueError,
         "expanded_src_to_dst_row: expected NUM_ROWS"),
        ({"expanded_src_to_dst_row": a["expanded_src_to_dst_row"] + 100}, ValueError,
         r"expanded_src_to_dst_row: expected values in \[-1, 12\)"),
        ({"export_for_source_row": a["export_for_source_row"] + 8}, ValueError,
         r"export_for_source_row: expected values in \[0, 8\)"),
    ]
    for over, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            gmm_allreduce.npu_moe_finalize_routing(**{**a, **over})
