"""Invalid calls (the rules of docs/semantics.md): the right exception type, a message naming the
argument, raised before any communication, and the caller's tensors left unchanged."""

import re
import subprocess
import sys

import pytest
import torch

import gmm_allreduce
from gmm_allreduce import grouped_mat_mul_all_reduce as op


def split0():
    """A valid split_item=0 call: two groups, with bias."""
    return dict(x=[torch.randn(3, 4), torch.randn(5, 6)],
                weight=[torch.randn(4, 2), torch.randn(6, 7)],
                bias=[torch.randn(2), torch.randn(7)], split_item=0)


def split3():
    """A valid split_item=3 call: one x of 10 rows cut into groups of 2, 3, 5."""
    return dict(x=[torch.randn(10, 4)], weight=[torch.randn(4, 3) for _ in range(3)],
                bias=[torch.randn(3) for _ in range(3)], group_list=[2, 5, 10], split_item=3)


def edit(base, **changes):
    def make():
        kw = base()
        for key, value in changes.items():
            kw[key] = value(kw) if callable(value) else value
        return kw
    return make


def setitem(key, index, value):
    def change(kw):
        seq = list(kw[key])
        seq[index] = value(seq[index]) if callable(value) else value
        return seq
    return change


# (id, call, exception, message regex)
INVALID = [
    ("x_empty", edit(split0, x=[]), ValueError, r"^x: expected at least one tensor"),
    ("weight_empty", edit(split0, weight=[]), ValueError, r"^weight: expected at least one tensor"),
    ("x_count_split0", edit(split0, x=lambda kw: kw["x"][:1]), ValueError,
     r"^x: expected 2 tensors \(one per weight\) for split_item=0, got 1"),
    ("x_count_split2", edit(split0, split_item=2, bias=None, x=lambda kw: kw["x"] * 2), ValueError,
     r"^x: expected 2 tensors .* for split_item=2, got 4"),
    ("x_count_split3", edit(split3, x=lambda kw: kw["x"] * 2), ValueError,
     r"^x: expected a single tensor for split_item=3"),
    ("x_count_split1", edit(split3, split_item=1, x=lambda kw: kw["x"] * 3), ValueError,
     r"^x: expected a single tensor for split_item=1"),
    ("split_item_high", edit(split0, split_item=4), ValueError, r"^split_item: expected 0, 1, 2 or 3, got 4"),
    ("split_item_negative", edit(split0, split_item=-1), ValueError, r"^split_item: .* got -1"),
    ("reduce_op_max", edit(split0, reduce_op="max"), ValueError, r'^reduce_op: only "sum" is supported, got "max"'),
    ("comm_turn_negative", edit(split0, comm_turn=-2), ValueError, r"^comm_turn: expected an integer >= 0, got -2"),
    ("group_list_type", edit(split3, group_list_type=2), ValueError, r"^group_list_type: expected 0 .* or 1 .*, got 2"),
    ("group_list_given_split0", edit(split0, group_list=[3, 8]), ValueError,
     r"^group_list: must not be given for split_item=0"),
    ("group_list_given_split2", edit(split0, split_item=2, bias=None, group_list=torch.tensor([3, 8]),
                                     weight=[torch.randn(4, 2), torch.randn(6, 2)]), ValueError,
     r"^group_list: must not be given for split_item=2"),
    ("group_list_missing_split3", edit(split3, group_list=None), ValueError, r"^group_list: required for split_item=3"),
    ("group_list_missing_split1", edit(split3, split_item=1, group_list=None), ValueError,
     r"^group_list: required for split_item=1"),
    ("group_list_length", edit(split3, group_list=[5, 10]), ValueError,
     r"^group_list: expected 3 values \(one per weight\), got 2"),
    ("group_list_decreasing", edit(split3, group_list=[5, 2, 10]), ValueError,
     r"^group_list\[1\]: cumulative offsets must not decrease, got 2 after 5"),
    ("group_list_negative", edit(split3, group_list=[2, -1, 10]), ValueError,
     r"^group_list\[1\]: expected a value >= 0, got -1"),
    ("group_list_negative_count", edit(split3, group_list=[2, -1, 9], group_list_type=1), ValueError,
     r"^group_list\[1\]: expected a value >= 0, got -1"),
    ("group_list_end", edit(split3, group_list=[2, 5, 9]), ValueError,
     r"^group_list: the last cumulative offset must equal x\[0\].shape\[0\] = 10, got 9"),
    ("group_list_counts_sum", edit(split3, group_list=[2, 5, 10], group_list_type=1), ValueError,
     r"^group_list: counts must sum to x\[0\].shape\[0\] = 10, got 17"),
    ("group_list_tensor_float", edit(split3, group_list=torch.tensor([2.0, 5.0, 10.0])), TypeError,
     r"^group_list: expected an int64 or int32 tensor, got Float"),
    ("group_list_tensor_2d", edit(split3, group_list=torch.tensor([[2, 5, 10]])), ValueError,
     r"^group_list: expected a 1-D tensor, got 2-D"),
    ("weight_3d", edit(split0, weight=setitem("weight", 1, torch.randn(1, 6, 7))), ValueError,
     r"^weight\[1\]: expected a 2-D tensor \[K, N\], got 3-D"),
    ("x_1d_split0", edit(split0, x=setitem("x", 0, torch.randn(4))), ValueError,
     r"^x\[0\]: expected a tensor of 2 to 5 dims for split_item=0, got 1-D"),
    ("x_6d_split0", edit(split0, x=setitem("x", 0, torch.randn(1, 1, 1, 1, 3, 4))), ValueError,
     r"^x\[0\]: expected a tensor of 2 to 5 dims for split_item=0, got 6-D"),
    ("x_3d_split2", edit(split0, split_item=2, bias=None, x=setitem("x", 0, torch.randn(1, 3, 4)),
                         weight=[torch.randn(4, 2), torch.randn(6, 2)]), ValueError,
     r"^x\[0\]: expected a 2-D tensor for split_item=2, got 3-D"),
    ("x_3d_split3", edit(split3, x=[torch.randn(1, 10, 4)]), ValueError,
     r"^x\[0\]: expected a 2-D tensor for split_item=3, got 3-D"),
    ("k_mismatch", edit(split0, weight=setitem("weight", 1, torch.randn(5, 7))), ValueError,
     r"^weight\[1\]: expected 6 rows \(K, the last dim of x\[1\]\), got 5"),
    ("k_mismatch_split3", edit(split3, weight=setitem("weight", 2, torch.randn(3, 3))), ValueError,
     r"^weight\[2\]: expected 4 rows \(K, the last dim of x\[0\]\), got 3"),
    ("bias_count", edit(split0, bias=lambda kw: kw["bias"][:1]), ValueError,
     r"^bias: expected 2 tensors \(one per weight\), got 1"),
    ("bias_2d", edit(split0, bias=setitem("bias", 0, torch.randn(1, 2))), ValueError,
     r"^bias\[0\]: expected a 1-D tensor, got 2-D"),
    ("bias_length", edit(split0, bias=setitem("bias", 1, torch.randn(6))), ValueError,
     r"^bias\[1\]: expected length 7 \(N of weight\[1\]\), got 6"),
    ("n_differs_split3", edit(split3, weight=setitem("weight", 1, torch.randn(4, 5)), bias=None), ValueError,
     r"^weight\[1\]: expected N = 3 like weight\[0\], since split_item=3 returns one tensor; got 5"),
    ("n_differs_split2", edit(split0, split_item=2, bias=None), ValueError,
     r"^weight\[1\]: expected N = 2 like weight\[0\], since split_item=2 returns one tensor; got 7"),
    ("weight_dtype_differs", edit(split0, weight=setitem("weight", 1, lambda w: w.double())), TypeError,
     r"^weight\[1\]: expected dtype Float like x\[0\], got Double"),
    ("x_dtype_differs", edit(split0, x=setitem("x", 1, lambda t: t.half())), TypeError,
     r"^x\[1\]: expected dtype Float like x\[0\], got Half"),
    ("x_int", edit(split0, x=[torch.ones(3, 4, dtype=torch.int32), torch.ones(5, 6, dtype=torch.int32)]),
     TypeError, r"^x\[0\]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got Int"),
    ("x_complex", edit(split0, x=lambda kw: [t.to(torch.complex64) for t in kw["x"]]), TypeError,
     r"^x\[0\]: expected float16, bfloat16, float32, float64, int8 or float8_e4m3fn, got ComplexFloat"),
    ("bias_int", edit(split0, bias=setitem("bias", 0, torch.ones(2, dtype=torch.int64))), TypeError,
     r"^bias\[0\]: expected a floating-point dtype, got Long"),
    ("weight_on_meta", edit(split0, weight=setitem("weight", 0, lambda w: w.to("meta"))), ValueError,
     r"^weight\[0\]: expected a tensor on cpu like x\[0\], got one on meta"),
    ("bias_on_meta", edit(split0, bias=setitem("bias", 1, lambda b: b.to("meta"))), ValueError,
     r"^bias\[1\]: expected a tensor on cpu like x\[0\], got one on meta"),
    ("hcomm_unknown", edit(split0, hcomm="no-such-group"), ValueError,
     r'^hcomm: no process group is registered under the name "no-such-group"'),
    ("hcomm_int", edit(split0, hcomm=3), TypeError, r"^hcomm: expected a group name, a ProcessGroup or None, got int"),
    ("x_not_list", edit(split0, x=lambda kw: kw["x"][0]), TypeError, r"^x: expected a list of tensors, got Tensor"),
    ("weight_item_not_tensor", edit(split0, weight=setitem("weight", 1, 3.0)), TypeError,
     r"^weight\[1\]: expected a tensor, got float"),
    ("split_item_str", edit(split0, split_item="0"), TypeError, r"^split_item: expected an int, got str"),
    # Flags are bools: "False", [0] or 2 would otherwise count as True.
    *[(f"{flag}_{tag}", edit(split0, **{flag: value}), TypeError,
       rf"^{flag}: expected True or False, got {re.escape(repr(value))}")
      for flag in ("async_op", "check_ranks")
      for tag, value in (("str", "False"), ("list", [0]), ("int", 2), ("none", None))],
    ("group_list_item_float", edit(split3, group_list=[2, 5.5, 10]), TypeError,
     r"^group_list\[1\]: expected an int, got float"),
]


def _call(kw):
    kw = dict(kw)
    return op(kw.pop("x"), kw.pop("weight"), kw.pop("hcomm", None), **kw)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    return [_clone(t) for t in v] if isinstance(v, list) else v


def _assert_unchanged(before, after, name=""):
    if isinstance(before, torch.Tensor):
        assert before.device.type == "meta" or torch.equal(before, after), f"{name} was modified"
    elif isinstance(before, (list, dict)):
        items = before.items() if isinstance(before, dict) else enumerate(before)
        for key, value in items:
            _assert_unchanged(value, after[key], f"{name}[{key}]")


def test_valid_bases_are_valid(world1):
    """The bases the invalid calls edit are themselves valid: each error comes from the edit."""
    for base in (split0, split3):
        assert len(_call(base())) >= 1


@pytest.mark.parametrize("make, exc, message", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_call_raises_clear_error(world1, make, exc, message):
    kw = make()
    before = _clone(list(kw.values()))
    with pytest.raises(exc, match=message):
        _call(kw)
    _assert_unchanged(before, list(kw.values()))


def test_errors_raise_before_any_collective(world1):
    """Every invalid call raises on its own rank without starting a collective."""
    from torch.profiler import profile

    with profile() as prof:
        for _, make, exc, _ in INVALID:
            with pytest.raises(exc):
                _call(make())
    assert not [e.name for e in prof.events() if e.name.startswith("c10d::")]


def test_default_group_requires_init():
    """hcomm=None with no default group: checked in a fresh process (this one has a group)."""
    code = ("import torch, gmm_allreduce as g\n"
            "try:\n"
            "    g.grouped_mat_mul_all_reduce([torch.ones(2, 2)], [torch.ones(2, 2)])\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("hcomm: None means the default process group"), out


def test_at_least_25_invalid_calls():
    assert len(INVALID) >= 25


def test_alias_is_the_same_function():
    assert gmm_allreduce.npu_grouped_mat_mul_all_reduce is gmm_allreduce.grouped_mat_mul_all_reduce
