"""reduce_dtype=torch.float32: the partials stay in fp32, the ranks sum fp32 and each output is
rounded once to x's dtype. Against the float64 reference in every split mode, dtype and comm_turn;
bitwise equal to the float64 sum rounded once on inputs where the 16-bit partials are not (through
shared memory and through gloo); identical on every rank; its errors; its fake kernel."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from dist_utils import new_group_with_shm
from test_semantics import DTYPES, assert_all_ranks_identical, cases_for

import gmm_allreduce
from gmm_allreduce.cases import call_kwargs, check, make_inputs


def run_cases_fp32(cases, comm_turn):
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        inputs = make_inputs(case, rank, world)
        kw = {**call_kwargs(case, inputs), "comm_turn": comm_turn, "reduce_dtype": torch.float32}
        outputs = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], **kw)
        assert all(o.dtype == case.dtype for o in outputs), case.name
        results.append([o.clone() for o in outputs])
    return results


@pytest.mark.parametrize("comm_turn", [0, 3])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_matches_reference(pools, world, split_item, dtype_id, comm_turn):
    cases = cases_for(split_item, dtype_id, with_bias=split_item % 2 == 0)
    per_rank = pools(world).run(run_cases_fp32, cases, comm_turn)
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, world)
    assert_all_ranks_identical(cases, per_rank)


# Ranks 0-2 hold x = [256, 1], w = [1, 1]: a partial of 257, exact in fp32 and rounded to 256 in
# bf16; rank 3 holds zeros. The float64 sum, 771, rounds once to 772 in bf16; the sum of the
# rounded partials is 768. In fp16 the same with 2048 + 1: 6147 rounds to 6148, against 6144.
ONE_ROUNDING = {torch.bfloat16: (256.0, 772.0, 768.0), torch.float16: (2048.0, 6148.0, 6144.0)}


def one_rounding(dtype, shm):
    """The op at world 4 on a new group (shared memory on or off), with and without reduce_dtype."""
    group = new_group_with_shm(shm, timeout=timedelta(seconds=60))
    big = ONE_ROUNDING[dtype][0]
    x = torch.tensor([[big, 1.0]] if dist.get_rank() < 3 else [[0.0, 0.0]], dtype=dtype)
    w = torch.ones(2, 1, dtype=dtype)
    out = {}
    for reduce_dtype in (torch.float32, None):
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(
            [x], [w], group, group_list=[1], split_item=3, reduce_dtype=reduce_dtype)
        out[str(reduce_dtype)] = y.item()
    out["shared"] = torch.ops.gmm_allreduce._shared_memory(group.group_name)
    return out


@pytest.mark.parametrize("shm", ["1", "0"], ids=["shm", "gloo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounded_once_where_the_partials_are_not(pools, dtype, shm):
    _, once, twice = ONE_ROUNDING[dtype]
    assert torch.tensor(771.0 if dtype == torch.bfloat16 else 6147.0, dtype=torch.float64).to(dtype) == once
    for r in pools(4).run(one_rounding, dtype, shm):
        assert r["shared"] == (shm == "1")
        assert r["torch.float32"] == once, r
        assert r["None"] == twice, r  # the inputs tell the two apart


def test_errors(world1):
    x, w = [torch.ones(4, 3, dtype=torch.bfloat16)], [torch.ones(3, 2, dtype=torch.bfloat16)]
    call = gmm_allreduce.grouped_mat_mul_all_reduce
    with pytest.raises(ValueError, match=r"reduce_dtype: expected None or torch.float32, got Half"):
        call(x, w, world1, reduce_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"reduce_dtype: expected None or a torch.dtype, got str"):
        call(x, w, world1, reduce_dtype="float32")
    with pytest.raises(ValueError, match=r"reduce_dtype: float32 would sum the float64 partials"):
        call([x[0].double()], [w[0].double()], world1, reduce_dtype=torch.float32)


def test_fp32_x_is_unchanged(world1):
    x, w = [torch.randn(5, 3)], [torch.randn(3, 4)]
    a = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1)[0]
    b = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, reduce_dtype=torch.float32)[0]
    assert torch.equal(a, b)


def test_opcheck_and_gradients(world1):
    x = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    w = [torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    args = ([x], w, None, [2, 6], None, 3, world1.group_name, "sum", 0, 0, False, torch.float32, False,
            None, None, None, None, None, None, None, None, None)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce.default, args)
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], w, world1, group_list=[2, 6],
                                                    split_item=3, reduce_dtype=torch.float32)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    torch.testing.assert_close(x.grad.float()[:2], w[0].float().sum(1).expand(2, 4), atol=0.1, rtol=0.02)


def disagree_on_reduce_dtype():
    x, w = [torch.ones(4, 3, dtype=torch.bfloat16)], [torch.ones(3, 2, dtype=torch.bfloat16)]
    reduce_dtype = torch.float32 if dist.get_rank() == 1 else None
    try:
        gmm_allreduce.grouped_mat_mul_all_reduce(x, w, check_ranks=True, reduce_dtype=reduce_dtype)
        return "returned"
    except ValueError as e:
        return str(e)


def test_check_ranks_names_a_rank_with_another_reduce_dtype(pools):
    messages = pools(2).run(disagree_on_reduce_dtype)
    assert messages[0] == messages[1] and "rank 1" in messages[0], messages
    assert "reduce_dtype=Float" in messages[0], messages[0]
