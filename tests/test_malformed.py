"""Malformed input beyond the documented rules (which test_errors covers): wrong Python types, nesting, integer,
complex and bool dtypes, strided, expanded and overlapping tensors, tensors that require grad,
sizes past 32-bit indexing and past int64, NaN and Inf.

Every entry gets either the exception it names, with a message naming the argument, or a result
equal to the float64 reference; never a crash, an abort or a hang. The caller's tensors (their
bytes and their metadata) are unchanged either way.
"""

import math

import pytest
import torch
from test_errors import _call as call
from test_errors import edit, setitem, split0, split3

import gmm_allreduce
from gmm_allreduce.reference import reference

OK = "ok"  # the call must succeed and match the reference


def strided(t, step=2):
    """t's values in a tensor whose last dim has a step of `step` in memory."""
    base = torch.zeros(*t.shape[:-1], t.shape[-1] * step, dtype=t.dtype)
    base[..., ::step] = t
    return base[..., ::step]


def overlapping_weights(kw):
    """weight[1] a view overlapping weight[0]'s storage (split3: three [4, 3] weights)."""
    storage = torch.randn(6, 3)
    return [storage[0:4], storage[1:5], storage[2:6]]


def permuted_3d(kw):
    """x[0] as [2, 3, 4] whose leading dims cannot be flattened without a copy."""
    return [torch.randn(3, 2, 4).transpose(0, 1), kw["x"][1]]


def grad_leaves(key):
    def change(kw):
        return [t.clone().requires_grad_() for t in kw[key]]
    return change


def with_value(key, index, value, where=(0, 0)):
    def change(kw):
        seq = [t.clone() for t in kw[key]]
        seq[index][where] = value
        return seq
    return change


STORAGE = torch.randn(60)  # one storage for x and the weights
BIG_VIRTUAL = 1 << 20  # rows of an expanded (stride-0) operand: 1 GiB seen, 4 KiB stored

# (id, call, expected: OK or (exception, message regex))
CORPUS = [
    # Python types where tensors or lists are expected
    ("x_none", edit(split0, x=None), (TypeError, r"^x: expected a list of tensors, got NoneType")),
    ("weight_none", edit(split0, weight=None), (TypeError, r"^weight: expected a list of tensors, got NoneType")),
    ("x_item_none", edit(split0, x=setitem("x", 0, None)), (TypeError, r"^x\[0\]: expected a tensor, got NoneType")),
    ("weight_item_none", edit(split0, weight=setitem("weight", 1, None)),
     (TypeError, r"^weight\[1\]: expected a tensor, got NoneType")),
    ("bias_item_none", edit(split0, bias=setitem("bias", 1, None)),
     (TypeError, r"^bias\[1\]: expected a tensor, got NoneType")),
    ("x_ints", edit(split0, x=[1, 2]), (TypeError, r"^x\[0\]: expected a tensor, got int")),
    ("x_int", edit(split0, x=3), (TypeError, r"^x: expected a list of tensors, got int")),
    ("x_str", edit(split0, x="ab"), (TypeError, r"^x\[0\]: expected a tensor, got str")),
    ("x_generator", edit(split0, x=lambda kw: (t for t in kw["x"])),
     (TypeError, r"^x: expected a list of tensors, got generator")),
    ("x_nested", edit(split0, x=lambda kw: [[t] for t in kw["x"]]),
     (TypeError, r"^x\[0\]: expected a tensor, got list")),
    ("weight_nested", edit(split0, weight=lambda kw: [kw["weight"]]),
     (TypeError, r"^weight\[0\]: expected a tensor, got list")),
    ("bias_tensor", edit(split0, bias=lambda kw: kw["bias"][0]),
     (TypeError, r"^bias: expected a list of tensors, got Tensor")),
    ("bias_float", edit(split0, bias=1.5), (TypeError, r"^bias: expected a list of tensors, got float")),
    ("group_list_int", edit(split3, group_list=10),
     (TypeError, r"^group_list: expected a list of ints or a tensor, got int")),
    ("group_list_nested", edit(split3, group_list=[[2], [5], [10]]),
     (TypeError, r"^group_list\[0\]: expected an int, got list")),
    ("group_list_item_none", edit(split3, group_list=[2, None, 10]),
     (TypeError, r"^group_list\[1\]: expected an int, got NoneType")),
    ("group_list_bool", edit(split3, group_list=[2, True, 10]),
     (TypeError, r"^group_list\[1\]: expected an int, got bool")),
    ("hcomm_bytes", edit(split0, hcomm=b"0"),
     (TypeError, r"^hcomm: expected a group name, a ProcessGroup or None, got bytes")),
    ("hcomm_empty", edit(split0, hcomm=""), (ValueError, r'^hcomm: no process group is registered under the name ""')),
    ("reduce_op_none", edit(split0, reduce_op=None), (TypeError, r"^reduce_op: expected a str, got NoneType")),
    ("reduce_op_upper", edit(split0, reduce_op="SUM"), (ValueError, r'^reduce_op: only "sum" is supported, got "SUM"')),
    ("comm_turn_float", edit(split0, comm_turn=1.0), (TypeError, r"^comm_turn: expected an int, got float")),
    ("x_tuple", edit(split0, x=lambda kw: tuple(kw["x"]), weight=lambda kw: tuple(kw["weight"])), OK),
    # dtypes
    ("x_int64", edit(split0, x=lambda kw: [t.long() for t in kw["x"]]),
     (TypeError, r"^x\[0\]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got Long")),
    ("x_uint8", edit(split3, x=lambda kw: [kw["x"][0].to(torch.uint8)]),
     (TypeError, r"^x\[0\]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got Byte")),
    ("x_bool", edit(split3, x=lambda kw: [kw["x"][0] > 0]),
     (TypeError, r"^x\[0\]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got Bool")),
    ("x_complex128", edit(split3, x=lambda kw: [kw["x"][0].to(torch.complex128)]),
     (TypeError, r"^x\[0\]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got ComplexDouble")),
    ("x_float8", edit(split3, x=lambda kw: [kw["x"][0].to(torch.float8_e4m3fn)]),
     (TypeError, r"^weight\[0\]: expected dtype Float8_e4m3fn like x\[0\], got Float")),
    ("weight_int", edit(split0, weight=setitem("weight", 0, lambda w: w.int())),
     (TypeError, r"^weight\[0\]: expected dtype Float like x\[0\], got Int")),
    ("weight_bool", edit(split0, weight=setitem("weight", 1, lambda w: w > 0)),
     (TypeError, r"^weight\[1\]: expected dtype Float like x\[0\], got Bool")),
    ("bias_complex", edit(split0, bias=setitem("bias", 0, lambda b: b.to(torch.complex64))),
     (TypeError, r"^bias\[0\]: expected a floating-point dtype, got ComplexFloat")),
    ("bias_bool", edit(split0, bias=setitem("bias", 1, lambda b: b > 0)),
     (TypeError, r"^bias\[1\]: expected a floating-point dtype, got Bool")),
    ("bias_float64", edit(split0, bias=lambda kw: [b.double() for b in kw["bias"]]), OK),
    ("group_list_bool_tensor", edit(split3, group_list=torch.tensor([True, True, True])),
     (TypeError, r"^group_list: expected an int64 or int32 tensor, got Bool")),
    ("group_list_uint8_tensor", edit(split3, group_list=torch.tensor([2, 5, 10], dtype=torch.uint8)),
     (TypeError, r"^group_list: expected an int64 or int32 tensor, got Byte")),
    ("group_list_0d_tensor", edit(split3, group_list=torch.tensor(10)),
     (ValueError, r"^group_list: expected a 1-D tensor, got 0-D")),
    # layouts: accepted (and computed correctly) unless a large copy would be hidden
    ("x_transposed", edit(split3, x=lambda kw: [kw["x"][0].t().contiguous().t()]), OK),
    ("weight_transposed", edit(split0, weight=lambda kw: [w.t().contiguous().t() for w in kw["weight"]]), OK),
    ("x_step2", edit(split0, x=lambda kw: [strided(t) for t in kw["x"]]), OK),
    ("weight_step3", edit(split3, weight=lambda kw: [strided(w, 3) for w in kw["weight"]]), OK),
    ("x_storage_offset", edit(split3, x=lambda kw: [torch.cat([torch.randn(2, 4), kw["x"][0]])[2:]]), OK),
    ("x_permuted_3d", edit(split0, x=permuted_3d), OK),
    ("x_channels_last", edit(split0, x=lambda kw: [torch.randn(1, 3, 1, 4).to(memory_format=torch.channels_last),
                                                   kw["x"][1]]), OK),
    ("x_expanded_small", edit(split3, x=lambda kw: [torch.randn(1, 4).expand(10, 4)]), OK),
    ("weight_expanded_small", edit(split0, weight=setitem("weight", 0, lambda w: w[:1].expand(4, 2))), OK),
    ("x_expanded_huge", edit(split3, x=[torch.randn(1, 256).expand(BIG_VIRTUAL, 256)],
                             weight=[torch.randn(256, 3)] * 3, group_list=[0, 0, BIG_VIRTUAL]),
     (ValueError, r"^x\[0\]: its strides \[0, 1\] \(sizes \[1048576, 256\]\) let no matmul read it as "
                  r"\[1048576, 256\] without copying it \(1024 MiB\); pass x\[0\].contiguous\(\)")),
    ("weight_expanded_huge", edit(split0, weight=setitem("weight", 1, torch.randn(6, 1).expand(6, 1 << 22)),
                                  bias=None),
     (ValueError, r"^weight\[1\]: its strides \[1, 0\] .* \(96 MiB\); pass weight\[1\].contiguous\(\)")),
    ("x_sparse", edit(split3, x=lambda kw: [kw["x"][0].to_sparse()]),
     (TypeError, r"^x\[0\]: expected a dense \(strided\) tensor, got layout Sparse")),
    ("weight_sparse_csr", edit(split0, weight=setitem("weight", 0, lambda w: w.to_sparse_csr())),
     (TypeError, r"^weight\[0\]: expected a dense \(strided\) tensor, got layout SparseCsr")),
    ("group_list_on_meta", edit(split3, group_list=torch.tensor([2, 5, 10], device="meta")),
     (ValueError, r"^group_list: expected a tensor on cpu or on cpu like x\[0\], got one on meta")),
    # aliasing and autograd
    ("x_same_tensor_twice", edit(split0, x=lambda kw: [kw["x"][0]] * 2,
                                 weight=lambda kw: [kw["weight"][0]] * 2, bias=None), OK),
    ("weights_overlap", edit(split3, weight=overlapping_weights), OK),
    ("x_and_weight_share_storage", edit(split3, x=lambda kw: [STORAGE[:40].view(10, 4)],
                                        weight=lambda kw: [STORAGE[a:a + 12].view(4, 3) for a in (20, 30, 48)]),
     OK),
    ("x_requires_grad", edit(split3, x=grad_leaves("x")), OK),
    ("all_require_grad", edit(split0, x=grad_leaves("x"), weight=grad_leaves("weight"),
                              bias=grad_leaves("bias")), OK),
    # sizes past int32 and int64
    ("group_list_beyond_int32", edit(split3, group_list=[2, 5, 2**32]),
     (ValueError, r"^group_list: the last cumulative offset must equal x\[0\].shape\[0\] = 10, got 4294967296")),
    ("group_list_tensor_beyond_int32", edit(split3, group_list=torch.tensor([2**33, 5, 10])),
     (ValueError, r"^group_list\[1\]: cumulative offsets must not decrease, got 5 after 8589934592")),
    ("group_list_beyond_int64", edit(split3, group_list=[2, 5, 2**64]),
     (ValueError, r"^group_list\[2\]: expected a value that fits in int64, got 18446744073709551616")),
    ("group_list_counts_overflow", edit(split3, group_list=[2**62, 2**62, 2**62], group_list_type=1),
     (ValueError, r"^group_list: the sum of the counts: .* overflows int64")),
    ("output_overflows_int64", edit(split0, x=[torch.empty(2**40, 0)], weight=[torch.empty(0, 2**30)], bias=None),
     (ValueError, r"^output of group 0: 1099511627776 \* 1073741824 overflows int64")),
    ("comm_turn_max_int64", edit(split3, comm_turn=2**63 - 1), OK),
    ("comm_turn_beyond_int64", edit(split3, comm_turn=2**64),
     (ValueError, r"^comm_turn: expected a value that fits in int64")),
    ("split_item_huge", edit(split0, split_item=2**40),
     (ValueError, r"^split_item: expected 0, 1, 2 or 3, got 1099511627776")),
    # NaN and Inf propagate
    ("x_nan", edit(split3, x=with_value("x", 0, math.nan, (3, 1))), OK),
    ("x_inf", edit(split0, x=with_value("x", 1, math.inf, (2, 0))), OK),
    ("weight_neg_inf", edit(split3, weight=with_value("weight", 2, -math.inf, (0, 2))), OK),
    ("bias_nan", edit(split0, bias=with_value("bias", 1, math.nan, 4)), OK),
    ("inf_minus_inf", edit(split3, x=lambda kw: [torch.ones(10, 4)],
                           weight=lambda kw: [torch.tensor([[math.inf] * 3, [-math.inf] * 3, [0.0] * 3,
                                                            [0.0] * 3])] * 3), OK),
]


def snapshot(value):
    """Every tensor in value: its metadata and a copy of its storage's bytes (NaN-safe)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.layout != torch.strided:
            return ("opaque", value.shape)
        raw = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage()).clone()
        return (value.shape, value.stride(), value.storage_offset(), value.dtype, value.requires_grad, raw)
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if isinstance(b, tuple) and len(b) == 6 and isinstance(b[5], torch.Tensor):
            assert b[:5] == a[:5] and torch.equal(b[5], a[5]), "an input was modified"
        elif isinstance(b, list):
            assert_unchanged(b, a)


def expected(kw):
    """The float64 reference for a one-rank call (tensors detached; generators not allowed)."""
    inputs = {key: kw.get(key) for key in ("x", "weight", "bias", "group_list")}
    for key in ("x", "weight", "bias"):
        if inputs[key] is not None:
            inputs[key] = [t.detach() for t in inputs[key]]
    return reference([inputs], kw.get("split_item", 0), kw.get("group_list_type", 0))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("make, outcome", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_malformed_input(world1, make, outcome):
    kw = make()
    before = snapshot(list(kw.values()))
    if outcome == OK:
        outputs = call(kw)
        refs = expected(kw)
        assert len(outputs) == len(refs)
        for y, ref in zip(outputs, refs):
            torch.testing.assert_close(y.detach().double(), ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    else:
        exc, message = outcome
        with pytest.raises(exc, match=message):
            call(kw)
    assert_unchanged(before, snapshot(list(kw.values())))


def test_corpus_is_large():
    assert len(CORPUS) >= 60


def test_nan_stays_in_its_row(world1):
    """A NaN in one row of x poisons that row's outputs and nothing else."""
    x = torch.ones(6, 4)
    x[2, 1] = math.nan
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], [torch.ones(4, 3)] * 2, world1,
                                                    group_list=[3, 6], split_item=3)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4, 5]].isnan().any()


def test_requires_grad_outputs_are_differentiable(world1):
    kw = edit(split0, x=grad_leaves("x"), weight=grad_leaves("weight"), bias=grad_leaves("bias"))()
    outputs = call(kw)
    assert all(y.requires_grad for y in outputs)
    sum(y.sum() for y in outputs).backward()  # expanded (stride-0) gradients
    assert all(t.grad is not None for t in kw["x"] + kw["weight"] + kw["bias"])
    with torch.no_grad():
        assert not any(y.requires_grad for y in call(kw))


def test_output_past_32bit_indexing(world1):
    """2^31 + 5 output elements (bf16, K = 0: the bias alone, 4 GiB): every element is right,
    including those past index 2^31, with comm_turn chunks cut across that index."""
    rows = 2**31 + 5
    x = [torch.empty(rows, 0, dtype=torch.bfloat16)]
    w = [torch.empty(0, 1, dtype=torch.bfloat16)] * 2
    bias = [torch.tensor([3.0]), torch.tensor([-2.0])]
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, bias=bias, group_list=[5, rows],
                                                    split_item=3, comm_turn=3)
    assert y.shape == (rows, 1)
    assert torch.aminmax(y[:5]) == (3.0, 3.0)
    assert [v.item() for v in torch.aminmax(y[5:])] == [-2.0, -2.0]
    del y
