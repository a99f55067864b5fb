"""grouped_mat_mul: the op without its collective (one rank's part), on the same C++ plan."""

import pytest
import torch
from test_semantics import SHAPES

import gmm_allreduce
from gmm_allreduce.cases import Case, call_kwargs, make_inputs
from gmm_allreduce.reference import assemble, group_operands


@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("world_size", [1, 3])
def test_one_ranks_part(split_item, world_size):
    for i, shape in enumerate(SHAPES[split_item]):
        case = Case(split_item=split_item, dtype=torch.float32, bias_dtype=torch.float32,
                    integers=True, group_list_type=i % 2, seed=i, **shape)
        inputs = make_inputs(case, 0, world_size)
        kw = call_kwargs(case, inputs, collective=False)
        y = gmm_allreduce.grouped_mat_mul(inputs["x"], inputs["weight"], world_size=world_size, **kw)
        assert len(y) == len(expected := _one_rank(case, inputs, world_size))
        for a, b in zip(y, expected):
            torch.testing.assert_close(a.double(), b, atol=0, rtol=0)


def _one_rank(case, inputs, world_size):
    """x_i @ W_i + bias_i / world_size in float64, assembled as the split mode returns it."""
    xs, shapes = group_operands(inputs["x"], inputs["weight"], inputs["group_list"],
                                case.split_item, case.group_list_type)
    ys = [xi.double() @ wi.double() + bi.double() / world_size
          for xi, wi, bi in zip(xs, inputs["weight"], inputs["bias"])]
    return assemble(ys, shapes, case.split_item)


def test_checks_its_arguments():
    with pytest.raises(ValueError, match=r"^world_size: expected an integer >= 1, got 0"):
        gmm_allreduce.grouped_mat_mul([torch.ones(2, 2)], [torch.ones(2, 2)], world_size=0)
    with pytest.raises(ValueError, match=r"^weight\[0\]: expected 2 rows"):
        gmm_allreduce.grouped_mat_mul([torch.ones(2, 2)], [torch.ones(3, 2)])


def test_no_collective(world1):
    from torch.profiler import profile

    with profile() as prof:
        gmm_allreduce.grouped_mat_mul([torch.ones(4, 3)], [torch.ones(3, 2)])
    assert not [e.name for e in prof.events() if e.name.startswith("c10d::")]


@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
def test_gradcheck(split_item):
    """Differentiable like the op; its bias gradient carries the 1 / world_size of its forward."""
    shape = SHAPES[split_item][0]
    case = Case(split_item=split_item, dtype=torch.float64, bias_dtype=torch.float64, **shape)
    inputs = make_inputs(case, 0, 1)
    nx, nw = len(inputs["x"]), len(inputs["weight"])
    leaves = [t.requires_grad_() for t in [*inputs["x"], *inputs["weight"], *inputs["bias"]]]
    kw = {k: v for k, v in call_kwargs(case, inputs, collective=False).items() if k != "bias"}

    def f(*flat):
        return tuple(gmm_allreduce.grouped_mat_mul(list(flat[:nx]), list(flat[nx:nx + nw]),
                                                   bias=list(flat[nx + nw:]), world_size=3, **kw))

    assert torch.autograd.gradcheck(f, leaves)
