"""Backward of the op (Megatron row-parallel convention: no collective in backward), opcheck and
torch.compile."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from test_semantics import DTYPES, SHAPES

import gmm_allreduce
from gmm_allreduce.cases import TOLERANCE, Case, call_kwargs, make_inputs, to_device
from gmm_allreduce.reference import assemble, group_operands

GL_FORMS = [("list", 0), ("tensor", 1), ("tensor32", 0)]


def all_cases(dtype, bias_dtype):
    out = []
    for split_item, shapes in SHAPES.items():
        for i, shape in enumerate(shapes):
            form, t = GL_FORMS[i % len(GL_FORMS)]
            out.append(Case(split_item=split_item, dtype=dtype, bias_dtype=bias_dtype, seed=i,
                            group_list_form=form, group_list_type=t,
                            **{**shape, "name": f"split{split_item}-{shape['name']}"}))
    return out


def _leaves(inputs):
    return [t.requires_grad_() for t in [*inputs["x"], *inputs["weight"], *(inputs["bias"] or [])]]


def _op_of_leaves(case, inputs, group):
    nx, nw = len(inputs["x"]), len(inputs["weight"])
    kw = call_kwargs(case, inputs)

    def f(*flat):
        kw["bias"] = list(flat[nx + nw:]) or None
        return tuple(gmm_allreduce.grouped_mat_mul_all_reduce(
            list(flat[:nx]), list(flat[nx:nx + nw]), group, **kw))

    return f


def gradcheck_cases(cases, fast):
    """gradcheck on each rank in turn. While rank `checker` perturbs its own x and weight, the
    other ranks call the op with fixed inputs once per call of the checker (told by a flag
    all-reduced before each call), so the numerical Jacobian is the one of the checker's inputs.
    The bias is left out at world size > 1: the convention treats it as one parameter
    replicated on all ranks (gradient: dy summed over rows), while a single rank's copy moves the
    output by 1/n; test_grads_match_reference_world4 checks the convention."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in cases:
        if world > 1:
            case = dataclasses.replace(case, bias_dtype=None)
        for checker in range(world):
            inputs = make_inputs(case, rank, world)
            op = _op_of_leaves(case, inputs, None)
            if rank != checker:
                while _flag(1 if rank == checker else 0):
                    op(*[*inputs["x"], *inputs["weight"], *(inputs["bias"] or [])])
                continue

            def f(*leaves, op=op):
                if world > 1:
                    _flag(1)
                return op(*leaves)

            ok = torch.autograd.gradcheck(f, _leaves(inputs), fast_mode=fast)
            if world > 1:
                _flag(0)
            assert ok, case.name
    return True


def _flag(value):
    """Sum over ranks of the checker's flag (the others pass 0): 1 means "call once more"."""
    t = torch.tensor([value])
    dist.all_reduce(t)
    return int(t.item())


def test_gradcheck_world1(world1):
    gradcheck_cases(all_cases(torch.float64, torch.float64), fast=False)


def test_gradcheck_world2(pools):
    pools(2).run(gradcheck_cases, all_cases(torch.float64, torch.float64), True)


def grads_against_reference(cases, device="cpu"):
    """On every rank: the op's gradients (inputs on `device`) against autograd through the local
    float64 CPU reference, with the same upstream gradient on all ranks and the bias added whole
    (one replicated parameter)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = []
    for case in cases:
        inputs = to_device(make_inputs(case, rank, world), device)
        leaves = _leaves(inputs)
        outputs = _op_of_leaves(case, inputs, None)(*leaves)
        gen = torch.Generator().manual_seed(case.seed + 77)  # the same dy on every rank
        dy = [torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in outputs]
        got = [g.cpu() for g in torch.autograd.grad(outputs, leaves, dy)]

        ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
        nx, nw = len(inputs["x"]), len(inputs["weight"])
        x, w, b = ref_leaves[:nx], ref_leaves[nx:nx + nw], ref_leaves[nx + nw:]
        gl = inputs["group_list"]
        xs, shapes = group_operands(x, w, gl.cpu() if isinstance(gl, torch.Tensor) else gl,
                                    case.split_item, case.group_list_type)
        ys = [xi @ wi + (b[i] if b else 0) for i, (xi, wi) in enumerate(zip(xs, w))]
        want = torch.autograd.grad(assemble(ys, shapes, case.split_item), ref_leaves,
                                   [d.cpu().double() for d in dy])
        atol, rtol = TOLERANCE[case.dtype]
        for i, (g, r) in enumerate(zip(got, want)):
            assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape, (case.name, i)
            scale = 1 + r.abs().max().item() if r.numel() else 1
            torch.testing.assert_close(g.double(), r, atol=atol * scale * 4, rtol=rtol * 4,
                                       msg=lambda m, c=case, i=i: f"{c.name} input {i}: {m}")
        errors.append(case.name)
    return errors


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_grads_match_reference_world4(pools, dtype_id):
    dtype, bias_dtype = DTYPES[dtype_id]
    cases = all_cases(dtype, bias_dtype)
    done = pools(4).run(grads_against_reference, cases)
    assert all(d == [c.name for c in cases] for d in done)


def test_backward_issues_no_collective(world1):
    from torch.profiler import profile

    x = [torch.randn(6, 4, requires_grad=True)]
    w = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, group_list=[2, 6], split_item=3)[0]
    with profile() as prof:
        y.sum().backward()
    assert not [e.name for e in prof.events() if e.name.startswith("c10d::")]
    assert x[0].grad is not None and all(wi.grad is not None for wi in w)


def test_only_what_needs_grad(world1):
    """Gradients flow to the inputs that require them; the others stay None."""
    x = [torch.randn(5, 4)]
    w = [torch.randn(4, 3, requires_grad=True)]
    b = [torch.randn(3)]
    y = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, bias=b, group_list=[5], split_item=1)
    y[0].sum().backward()
    assert x[0].grad is None and b[0].grad is None
    torch.testing.assert_close(w[0].grad, x[0].t() @ torch.ones(5, 3))


@pytest.mark.parametrize("split_item", [0, 1, 2, 3], ids=lambda s: f"split{s}")
def test_opcheck(world1, split_item):
    case = dataclasses.replace(all_cases(torch.float32, torch.float32)[
        [c.split_item for c in all_cases(torch.float32, None)].index(split_item)])
    inputs = make_inputs(case, 0, 1)
    leaves = _leaves(inputs)
    nx, nw = len(inputs["x"]), len(inputs["weight"])
    gl = inputs["group_list"]
    args = (leaves[:nx], leaves[nx:nx + nw], leaves[nx + nw:], gl if isinstance(gl, list) else None,
            gl if isinstance(gl, torch.Tensor) else None, split_item, world1.group_name, "sum", 0,
            case.group_list_type, False, None, False, None, None, None, None, None, None, None,
            None, None)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce.default, args)
