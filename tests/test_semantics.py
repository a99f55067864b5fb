"""The op against the float64 reference, on CPU over gloo, at world sizes 1, 2, 4 and 8."""

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.cases import Case, call_kwargs, check, make_inputs

WORLDS = [1, 2, 4, 8]

# (x / weight dtype, bias dtype): the Ascend op's two combinations and our fp32 extension.
DTYPES = {
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.float32),
    "fp32": (torch.float32, torch.float32),
}

# Per split mode: uneven groups, an empty group, one group, K = 0; K and N not multiples of 8.
# K stays <= 24 so that small-integer sums over 8 ranks are exact even in bf16 (< 256).
SHAPES = {
    0: [
        dict(name="uneven_multidim", m=(7, 6, 12), k=(13, 17, 5), n=(9, 3, 33),
             lead=((7,), (2, 3), (2, 1, 2, 3))),
        dict(name="empty_group", m=(5, 0, 4), k=(6, 7, 8), n=(3, 5, 7)),
        dict(name="single", m=(19,), k=(24,), n=(17,)),
        dict(name="k0", m=(3, 4), k=(0, 5), n=(4, 6)),
    ],
    1: [
        dict(name="uneven_empty", m=(5, 0, 12, 1), k=(13,) * 4, n=(9, 3, 17, 4)),
        dict(name="single", m=(19,), k=(24,), n=(17,)),
        dict(name="k0", m=(3, 4), k=(0, 0), n=(4, 6)),
    ],
    2: [
        dict(name="uneven_empty", m=(5, 0, 12), k=(13, 17, 5), n=(9, 9, 9)),
        dict(name="single", m=(19,), k=(24,), n=(17,)),
        dict(name="k0", m=(3, 4), k=(0, 5), n=(6, 6)),
    ],
    3: [
        dict(name="uneven_empty", m=(5, 0, 12, 1), k=(13,) * 4, n=(9,) * 4),
        dict(name="single", m=(19,), k=(24,), n=(17,)),
        dict(name="k0", m=(3, 4), k=(0, 0), n=(6, 6)),
    ],
}
# group_list spellings, cycled over the shapes of split_item 1 and 3.
GROUP_LIST_FORMS = [("list", 0), ("tensor", 1), ("tensor32", 0), ("list", 1)]


def cases_for(split_item, dtype_id, with_bias):
    dtype, bias_dtype = DTYPES[dtype_id]
    out = []
    for i, shape in enumerate(SHAPES[split_item]):
        form, gl_type = GROUP_LIST_FORMS[i % len(GROUP_LIST_FORMS)]
        for integers in (True, False):
            out.append(Case(split_item=split_item, dtype=dtype,
                            bias_dtype=bias_dtype if with_bias else None, integers=integers,
                            group_list_form=form, group_list_type=gl_type, seed=i,
                            **{**shape, "name": f"{shape['name']}-{'int' if integers else 'rand'}"}))
    return out


def run_cases(cases):
    """On every rank: call the op on this rank's inputs; check the inputs were left unchanged."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        inputs = make_inputs(case, rank, world)
        before = [t.clone() for t in _tensors(inputs)]
        outputs = gmm_allreduce.grouped_mat_mul_all_reduce(
            inputs["x"], inputs["weight"], dist.group.WORLD.group_name, **call_kwargs(case, inputs))
        for a, b in zip(before, _tensors(inputs)):
            assert torch.equal(a, b), f"{case.name}: an input was modified"
        results.append([o.clone() for o in outputs])
    return results


def _tensors(inputs):
    gl = inputs["group_list"]
    return [*inputs["x"], *inputs["weight"], *(inputs["bias"] or []),
            *([gl] if isinstance(gl, torch.Tensor) else [])]


def assert_all_ranks_identical(cases, per_rank):
    for c, case in enumerate(cases):
        for r in range(1, len(per_rank)):
            for a, b in zip(per_rank[0][c], per_rank[r][c]):
                assert torch.equal(a, b), f"{case.name}: rank {r} differs from rank 0"


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"w{w}")
def test_matches_reference(pools, world, split_item, dtype_id, with_bias):
    cases = cases_for(split_item, dtype_id, with_bias)
    per_rank = pools(world).run(run_cases, cases)
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, world)
    assert_all_ranks_identical(cases, per_rank)


@pytest.mark.parametrize("split_item", [1, 3], ids=lambda s: f"split{s}")
def test_group_list_forms_agree(pools, split_item):
    """A list or an int64/int32 tensor, cumulative or counts: the same exact result."""
    base = Case(name="forms", split_item=split_item, m=(4, 0, 9), k=(11,) * 3,
                n=(5,) * 3 if split_item == 3 else (5, 2, 7), dtype=torch.float32,
                bias_dtype=torch.float32, integers=True)
    cases = [dataclasses.replace(base, name=f"forms-{form}-{t}", group_list_form=form,
                                 group_list_type=t)
             for form, t in itertools.product(["list", "tensor", "tensor32"], [0, 1])]
    per_rank = pools(2).run(run_cases, cases)
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, 2)
        for a, b in zip(outputs, per_rank[0][0]):
            assert torch.equal(a, b), case.name


def test_outputs_never_alias_each_other(world1):
    """One collective over one buffer, but several outputs are separate tensors (PyTorch's
    custom-op contract); a single output is the buffer itself."""
    x = [torch.randn(3, 4), torch.randn(5, 6)]
    w = [torch.randn(4, 2), torch.randn(6, 7)]
    y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1)
    assert y[0].untyped_storage().data_ptr() != y[1].untyped_storage().data_ptr()
    (y3,) = gmm_allreduce.grouped_mat_mul_all_reduce([torch.randn(8, 4)], [torch.randn(4, 2)] * 2,
                                                     world1, group_list=[3, 8], split_item=3)
    assert y3.is_contiguous() and y3.untyped_storage().nbytes() == y3.numel() * 4


def test_bias_counts_once_not_per_rank(pools):
    """sum_r bias / n == bias when every rank passes the same bias (Ascend gives n*bias)."""
    per_rank = pools(4).run(_same_bias_on_every_rank)
    for y in per_rank:
        torch.testing.assert_close(y, torch.full((2, 3), 5.0), atol=0, rtol=0)


def _same_bias_on_every_rank():
    x, w = [torch.zeros(2, 4)], [torch.zeros(4, 3)]
    return gmm_allreduce.grouped_mat_mul_all_reduce(x, w, None, bias=[torch.full((3,), 5.0)])[0]


@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
def test_fake_kernel_shapes(world1, split_item):
    """The fake (meta) kernel gives the real op's shapes and dtypes, so the op traces."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = SHAPES[split_item][0]
    case = Case(split_item=split_item, dtype=torch.bfloat16, bias_dtype=torch.float32,
                **{k: v for k, v in shape.items()})
    inputs = make_inputs(case, 0, 1)
    real = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], world1,
                                                    **call_kwargs(case, inputs))
    with FakeTensorMode() as mode:
        fake_inputs = {k: ([mode.from_tensor(t) for t in v] if isinstance(v, list)
                           and v and isinstance(v[0], torch.Tensor) else v)
                       for k, v in inputs.items()}
        fake = gmm_allreduce.grouped_mat_mul_all_reduce(
            fake_inputs["x"], fake_inputs["weight"], world1, **call_kwargs(case, fake_inputs))
    assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in real]


def test_split_item_none_is_the_op_s_default(world1):
    """Code ported from MindSpeed passes split_item=None: the op's default (0; 3 for the
    reduce-scatter op)."""
    x = [torch.randn(3, 4), torch.randn(5, 4)]
    w = [torch.randn(4, 2), torch.randn(4, 2)]
    for op in (gmm_allreduce.grouped_mat_mul_all_reduce, gmm_allreduce.npu_grouped_mat_mul_all_reduce):
        for got, want in zip(op(x, w, world1, split_item=None), op(x, w, world1, split_item=0)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(gmm_allreduce.grouped_mat_mul(x, w, split_item=None),
                         gmm_allreduce.grouped_mat_mul(x, w)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    xs, gl = torch.cat(x), [3, 8]
    (got,) = gmm_allreduce.grouped_mat_mul_reduce_scatter([xs], w, world1, group_list=gl,
                                                          split_item=None)
    (want,) = gmm_allreduce.grouped_mat_mul_reduce_scatter([xs], w, world1, group_list=gl)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
