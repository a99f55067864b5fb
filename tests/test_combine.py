"""The combine before the collective (combine_index, combine_weight, num_tokens, shared_input):
each expert row weighted and summed into its token row, a shared expert's partial added, then one
collective of [T, N]. Against the float64 reference at world sizes 1, 2, 4 and 8, on both
collective ops and the comm-free op; gradients (combine_weight and shared_input included) at world
sizes 1, 2 and 4; errors before any communication; opcheck and torch.compile."""

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist
from test_semantics import assert_all_ranks_identical

import gmm_allreduce
from gmm_allreduce.cases import TOLERANCE, Case, call_kwargs, check, combined, expected, make_inputs
from gmm_allreduce.reference import reference

DTYPES = {"fp16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.float32),
          "fp32": (torch.float32, torch.float32), "fp64": (torch.float64, torch.float64)}

# Expert rows of uneven, empty and single groups; T = 8 and 16 divide by every world size (the
# reduce-scatter) and leave some tokens with no row; T = 1 puts every row on one token.
SHAPES = {
    3: [dict(name="uneven_empty", m=(5, 0, 12, 1), k=(6,) * 4, n=(9,) * 4, tokens=8),
        dict(name="one_token", m=(3, 4), k=(5,) * 2, n=(6,) * 2, tokens=1),
        dict(name="many_rows", m=(20, 13, 0, 31), k=(7,) * 4, n=(10,) * 4, tokens=16)],
    2: [dict(name="uneven_empty", m=(5, 0, 7), k=(6, 3, 5), n=(9,) * 3, tokens=8),
        dict(name="single", m=(11,), k=(4,), n=(5,), tokens=16)],
}


def cases_for(split_item, dtype_id, comm_turn=0):
    dtype, bias_dtype = DTYPES[dtype_id]
    out = []
    for i, shape in enumerate(SHAPES[split_item]):
        for integers, weighted, shared in itertools.product((True, False), repeat=3):
            out.append(Case(split_item=split_item, dtype=dtype, integers=integers,
                            bias_dtype=bias_dtype if (i + integers) % 2 == 0 else None,
                            weighted=weighted, shared=shared, comm_turn=comm_turn, seed=i,
                            group_list_form=("list", "tensor")[i % 2],
                            **{**shape, "name": f"{shape['name']}-i{int(integers)}"
                               f"w{int(weighted)}s{int(shared)}"}))
    return out


def run(cases, op="all_reduce", extra=None):
    """On every rank: the op on this rank's inputs (left unchanged), through the world group, with
    the keyword arguments `extra`."""
    extra = extra or {}
    rank, world = dist.get_rank(), dist.get_world_size()
    fn = {"all_reduce": gmm_allreduce.grouped_mat_mul_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mat_mul_reduce_scatter}[op]
    out = []
    for case in cases:
        inputs = make_inputs(case, rank, world)
        kwargs = call_kwargs(case, inputs)
        before = [t.clone() for t in _tensors(kwargs, inputs)]
        ys = fn(inputs["x"], inputs["weight"], dist.group.WORLD, **kwargs, **extra)
        if extra.get("async_op"):
            ys = gmm_allreduce.wait(ys)
        assert all(torch.equal(a, b) for a, b in zip(before, _tensors(kwargs, inputs))), case.name
        out.append([y.clone() for y in ys])
    return out


def _tensors(kwargs, inputs):
    return [*inputs["x"], *inputs["weight"], *(inputs["bias"] or []),
            *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]


def check_scattered(case, y, world, rank):
    (ref,) = expected(case, world)
    rows = ref.shape[0] // world
    got = y.double()
    want = ref[rank * rows:(rank + 1) * rows]
    assert tuple(got.shape) == tuple(want.shape), (case.name, got.shape)
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(got, want, atol=atol * world ** 0.5, rtol=rtol, msg=case.name)


@pytest.mark.parametrize("comm_turn", [0, 3], ids=lambda t: f"turn{t}")
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("split_item", [2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("world", [1, 2, 4, 8], ids=lambda w: f"w{w}")
def test_all_reduce_matches_reference(pools, world, split_item, dtype_id, comm_turn):
    if world == 8 and (dtype_id == "fp64" or comm_turn):  # keep the 8-rank runs few
        pytest.skip("covered at smaller world sizes")
    cases = cases_for(split_item, dtype_id, comm_turn)
    per_rank = pools(world).run(run, cases)
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, world)
    assert_all_ranks_identical(cases, per_rank)


@pytest.mark.parametrize("comm_turn", [0, 2], ids=lambda t: f"turn{t}")
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("world", [1, 2, 4, 8], ids=lambda w: f"w{w}")
def test_reduce_scatter_matches_reference(pools, world, dtype_id, comm_turn):
    cases = cases_for(3, dtype_id, comm_turn) + cases_for(2, dtype_id, comm_turn)
    cases = [c for c in cases if c.tokens % world == 0]
    per_rank = pools(world).run(run, cases, "reduce_scatter")
    for rank, outputs in enumerate(per_rank):
        for case, (y,) in zip(cases, outputs):
            check_scattered(case, y, world, rank)


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_async_and_reduce_dtype(pools, world):
    """async_op (waited) gives the synchronous bytes; reduce_dtype=float32 the reference."""
    cases = cases_for(3, "bf16", 2)
    pool = pools(world)
    sync = pool.run(run, cases)
    waited = pool.run(run, cases, "all_reduce", {"async_op": True})
    for a, b in zip(sync[0], waited[0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    fp32 = pool.run(run, cases, "all_reduce", {"reduce_dtype": torch.float32})
    for case, outputs in zip(cases, fp32[0]):
        check(case, outputs, world)
    cases = [c for c in cases if c.tokens % world == 0]
    scattered = pool.run(run, cases, "reduce_scatter",
                         {"reduce_dtype": torch.float32, "async_op": True})
    for rank, outputs in enumerate(scattered):
        for case, (y,) in zip(cases, outputs):
            check_scattered(case, y, world, rank)


def test_comm_free_op_is_one_ranks_part(world1):
    """grouped_mat_mul with the combine gives one rank's part: x @ W + bias / world_size, combined,
    plus shared_input."""
    case = cases_for(3, "fp32")[4]  # random values, weighted, shared, a bias
    assert case.bias_dtype is not None and case.shared and not case.integers
    inputs = make_inputs(case, 0, 3)
    (y,) = gmm_allreduce.grouped_mat_mul(inputs["x"], inputs["weight"], world_size=3,
                                         **call_kwargs(case, inputs, collective=False))
    rows = reference([inputs], case.split_item)[0]  # bias / 1: subtract the rest of the bias
    if inputs["bias"]:
        rows = rows - torch.cat([b.double().expand(m, -1) * (2 / 3)
                                 for b, m in zip(inputs["bias"], case.m)])
    atol, rtol = TOLERANCE[case.dtype]
    torch.testing.assert_close(y.double(), combined(rows, [inputs], case.tokens), atol=atol,
                               rtol=rtol)


def test_the_index_and_weights_as_given(world1):
    """Duplicates, every row on one token, int32, a weight of 0, tokens with no rows (zeros, plus
    their shared_input), in exact small integers."""
    x = [torch.arange(12.).reshape(6, 2)]
    w = [torch.tensor([[1., 0., 2.], [0., 1., 1.]])] * 2
    index = torch.tensor([3, 0, 3, 3, 1, 0], dtype=torch.int32)
    weight = torch.tensor([1., 2., 0., -1., 1., 1.], dtype=torch.bfloat16)
    shared = torch.ones(5, 3)
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(
        x, w, world1, group_list=[2, 6], split_item=3, combine_index=index,
        combine_weight=weight, num_tokens=5, shared_input=shared)
    rows = x[0] @ w[0]
    want = torch.ones(5, 3)
    for j, t in enumerate(index.tolist()):
        want[t] += weight[j].float() * rows[j]
    assert torch.equal(y, want)
    assert torch.equal(y[2], torch.ones(3)) and torch.equal(y[4], torch.ones(3))


def test_a_call_gives_the_same_bytes_every_time(world1):
    """The fixed accumulation order: repeated calls, and comm_turn 1, are bitwise equal."""
    case = dataclasses.replace(cases_for(3, "bf16")[-1], comm_turn=0)
    inputs = make_inputs(case, 0, 1)
    first = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], world1,
                                                     **call_kwargs(case, inputs))[0]
    for turn in (0, 1, 0):
        again = gmm_allreduce.grouped_mat_mul_all_reduce(
            inputs["x"], inputs["weight"], world1,
            **call_kwargs(dataclasses.replace(case, comm_turn=turn), inputs))[0]
        assert torch.equal(first, again)


# ---- errors: clear, naming the argument, before any communication ----

def _call(world1, **over):
    x, w = [torch.randn(6, 4)], [torch.randn(4, 3)] * 2
    kw = dict(group_list=[2, 6], split_item=3, combine_index=torch.tensor([0, 1, 1, 2, 0, 3]),
              num_tokens=4)
    kw.update(over)
    return gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, **kw)


@pytest.mark.parametrize("over, error, match", [
    (dict(split_item=1), ValueError, "combine_index: .* expected split_item 2 or 3"),
    (dict(num_tokens=None), ValueError, "num_tokens: required with combine_index"),
    (dict(num_tokens=-1), ValueError, "num_tokens: expected an integer >= 0"),
    (dict(num_tokens=3), ValueError, r"combine_index\[5\]: expected a token row in \[0, "
                                     r"num_tokens = 3\), got 3"),
    (dict(combine_index=torch.tensor([0, 1, -1, 2, 0, 3])), ValueError, r"combine_index\[2\]"),
    (dict(combine_index=torch.tensor([0, 1, 2])), ValueError, "combine_index: expected a 1-D "
                                                             "tensor of 6 values"),
    (dict(combine_index=torch.zeros(6)), TypeError, "combine_index: expected an int64 or int32"),
    (dict(combine_index=[0, 1]), TypeError, "combine_index: expected None or a tensor"),
    (dict(combine_weight=torch.ones(5)), ValueError, "combine_weight: expected a 1-D tensor of 6"),
    (dict(combine_weight=torch.ones(6, dtype=torch.int64)), TypeError,
     "combine_weight: expected a floating-point dtype"),
    (dict(shared_input=torch.ones(4, 2)), ValueError, r"shared_input: expected a tensor "
                                                      r"\[num_tokens, N\] = \[4, 3\]"),
    (dict(shared_input=torch.ones(4, 3, dtype=torch.int32)), TypeError,
     "shared_input: expected a floating-point dtype"),
    (dict(combine_index=None), ValueError, "num_tokens: given without combine_index"),
    (dict(combine_index=None, num_tokens=None, combine_weight=torch.ones(6)), ValueError,
     "combine_weight: given without combine_index"),
    (dict(combine_index=None, num_tokens=None, shared_input=torch.ones(6, 3)), ValueError,
     "shared_input: given without combine_index"),
    (dict(num_tokens=2.0), TypeError, "num_tokens: expected an int"),
])
def test_bad_combine_arguments(world1, over, error, match):
    with pytest.raises(error, match=match):
        _call(world1, **over)


def test_reduce_scatter_needs_tokens_divisible_by_ranks(pools):
    errors = pools(2).run(_scatter_three_tokens)
    assert all("num_tokens: the output's 3 rows cannot be scattered evenly" in e for e in errors)


def _scatter_three_tokens():
    try:
        gmm_allreduce.grouped_mat_mul_reduce_scatter(
            [torch.randn(4, 2)], [torch.randn(2, 3)], group_list=[4], combine_index=torch.zeros(4,
            dtype=torch.long), num_tokens=3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_check_ranks_names_a_rank_with_another_combine(pools):
    """The plan's signature covers T and which combine arguments are given."""
    errors = pools(2).run(_differing_combine)
    assert all("rank 1" in e and "combine" in e for e in errors), errors


def _differing_combine():
    rank = dist.get_rank()
    weight = torch.ones(6) if rank == 1 else None
    try:
        gmm_allreduce.grouped_mat_mul_all_reduce(
            [torch.randn(6, 4)], [torch.randn(4, 3)] * 2, group_list=[2, 6], split_item=3,
            combine_index=torch.tensor([0, 1, 1, 2, 0, 3]), num_tokens=4, combine_weight=weight,
            check_ranks=True)
    except ValueError as e:
        return str(e)
    return "no error"


# ---- gradients ----

def grads_of(case, op="all_reduce"):
    """This rank's gradients of loss = <out, R> (R the same on every rank; with the
    reduce-scatter, each rank's rows of R) for x, weight, bias, combine_weight, shared_input."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = make_inputs(case, rank, world)
    leaves = {"x": inputs["x"][0], "weight": inputs["weight"], "bias": inputs["bias"],
              "combine_weight": inputs["combine_weight"], "shared_input": inputs["shared_input"]}
    for t in [leaves["x"], *leaves["weight"], *(leaves["bias"] or []), leaves["combine_weight"],
              leaves["shared_input"]]:
        if t is not None:
            t.requires_grad_()
    kw = call_kwargs(case, inputs)
    fn = {"all_reduce": gmm_allreduce.grouped_mat_mul_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mat_mul_reduce_scatter}[op]
    (y,) = fn([leaves["x"]], leaves["weight"], dist.group.WORLD, **kw)
    r = _probe(case)
    if op == "reduce_scatter":
        rows = case.tokens // world
        r = r[rank * rows:(rank + 1) * rows]
    (y.double() * r).sum().backward()
    return _grads(leaves)


def _probe(case):
    return torch.randn(case.tokens, case.n[0], generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64)


def _grads(leaves):
    def g(t):
        return None if t is None else t.grad.clone()
    return {"x": g(leaves["x"]), "weight": [g(w) for w in leaves["weight"]],
            "bias": [g(b) for b in leaves["bias"]] if leaves["bias"] else None,
            "combine_weight": g(leaves["combine_weight"]), "shared_input": g(leaves["shared_input"])}


def reference_grads(case, world):
    """Every rank's gradients in float64: the whole computation over all ranks' inputs, through
    PyTorch's autograd. The bias is one parameter replicated on every rank: its gradient is the
    sum of its copies' (each counted 1/n in the output)."""
    ranks = [make_inputs(case, r, world) for r in range(world)]
    leaves = []
    for inputs in ranks:
        leaves.append({
            "x": inputs["x"][0].double().requires_grad_(),
            "weight": [w.double().requires_grad_() for w in inputs["weight"]],
            "bias": [b.double().requires_grad_() for b in inputs["bias"]] if inputs["bias"] else None,
            "combine_weight": (inputs["combine_weight"].double().requires_grad_()
                               if inputs["combine_weight"] is not None else None),
            "shared_input": (inputs["shared_input"].double().requires_grad_()
                             if inputs["shared_input"] is not None else None)})
    out = torch.zeros(case.tokens, case.n[0], dtype=torch.float64)
    index = ranks[0]["combine_index"]
    for leaf in leaves:
        xs = torch.split(leaf["x"], list(case.m))
        rows = torch.cat([x @ w + (leaf["bias"][i] / world if leaf["bias"] else 0)
                          for i, (x, w) in enumerate(zip(xs, leaf["weight"]))])
        if leaf["combine_weight"] is not None:
            rows = rows * leaf["combine_weight"][:, None]
        out = out.index_add(0, index, rows)
        if leaf["shared_input"] is not None:
            out = out + leaf["shared_input"]
    (out * _probe(case)).sum().backward()
    grads = [_grads(leaf) for leaf in leaves]
    # Replicated parameters (bias, combine_weight: one value on every rank) get the sum.
    for name in ("bias", "combine_weight"):
        if grads[0][name] is None:
            continue
        if name == "bias":
            total = [sum(g[name][i] for g in grads) for i in range(len(case.m))]
        else:
            total = sum(g[name] for g in grads)
        for g in grads:
            g[name] = total
    return grads


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_grads_match_reference(pools, world, op):
    base = Case(name="grads", split_item=3, m=(5, 0, 9, 2), k=(6,) * 4, n=(7,) * 4,
                dtype=torch.float64, bias_dtype=torch.float64, tokens=8, group_list_form="list")
    cases = [dataclasses.replace(base, weighted=weighted, shared=shared, comm_turn=turn)
             for weighted, shared, turn in itertools.product((True, False), (True, False), (0, 2))]
    per_rank = [pools(world).run(grads_of, case, op) for case in cases]
    for case, got in zip(cases, per_rank):
        want = reference_grads(case, world)
        for rank in range(world):
            for name in ("x", "weight", "bias", "shared_input"):
                torch.testing.assert_close(got[rank][name], want[rank][name],
                                           msg=lambda m, n=name, r=rank, c=case: f"{c} {n} rank {r}: {m}")
            if case.weighted:  # float32 routing weights: a float32 gradient
                g = got[rank]["combine_weight"]
                assert g.dtype == torch.float32
                torch.testing.assert_close(g.double(), want[rank]["combine_weight"], atol=1e-5,
                                           rtol=1e-5)


def test_gradcheck_world1(world1):
    """gradcheck in float64 on the comm-free op and the all-reduce, every differentiable input."""
    case = Case(name="gc", split_item=3, m=(3, 0, 4), k=(3,) * 3, n=(4,) * 3, dtype=torch.float64,
                bias_dtype=torch.float64, tokens=4, shared=True, group_list_form="list")
    inputs = make_inputs(case, 0, 1)
    index = inputs["combine_index"]

    def f(x, w0, w1, w2, b0, b1, b2, cw, shared):
        return gmm_allreduce.grouped_mat_mul_all_reduce(
            [x], [w0, w1, w2], world1, bias=[b0, b1, b2], group_list=inputs["group_list"],
            split_item=3, combine_index=index, combine_weight=cw, num_tokens=4,
            shared_input=shared, comm_turn=2)[0]

    leaves = [inputs["x"][0], *inputs["weight"], *inputs["bias"], inputs["combine_weight"].double(),
              inputs["shared_input"]]
    assert torch.autograd.gradcheck(f, [t.detach().requires_grad_() for t in leaves])


def test_opcheck_and_compile(world1):
    case = cases_for(3, "fp32")[6]
    inputs = make_inputs(case, 0, 1)
    kw = call_kwargs(case, inputs)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["group_list"], None, 3,
            world1.group_name, "sum", 0, 0, False, None, False, kw["combine_index"],
            kw["combine_weight"], kw["num_tokens"], kw["shared_input"], None, None, None, None, None)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce, args)
    compiled = torch.compile(
        lambda x, w: gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, **kw), fullgraph=True)
    eager = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"], world1, **kw)
    assert torch.equal(compiled(inputs["x"], inputs["weight"])[0], eager[0])
