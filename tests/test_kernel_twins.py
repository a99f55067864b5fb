"""The CUDA engine's logic, checked on the CPU through its test-only twins (csrc/kernel_twins.cpp),
which run the same source as the kernels or feed them:
- the raw GEMM blocks the tiled kernel reads (csrc/blocks.cpp): the flat buffer computed from them
  by the kernel's formula, chunk by chunk, equals the float64 reference, every element written;
- the tiled kernel's schedule, tile staging and epilogue (csrc/tiles.h) around a scalar MMA in
  place of its WMMA fragments: the reference again, for fp16 and bf16;
- the row offsets of a device group_list (write_row_ends, csrc/epilogue.h): exact for valid lists,
  in bounds, non-decreasing and ending at the chunk's rows for any list;
- the bias epilogue (bias_launches, add_bias_at): bias_i / world on exactly group i's elements, in
  the plan's layout and in the rows layout of split_item 3.
What stays unverified without a GPU is the device code around them: launches, WMMA fragments,
shared-memory synchronisation, the CUTLASS call."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cuda import tiled_cases
from test_fuzz import EXAMPLES, RANDOM_SEED, cases
from test_semantics import DTYPES, SHAPES, cases_for

import gmm_allreduce  # noqa: F401  (registers the ops)
from gmm_allreduce.cases import TOLERANCE, Case, call_kwargs, make_inputs
from gmm_allreduce.reference import reference

_REF = torch.ops.gmm_allreduce._gemm_blocks_reference


def blocks_flat(case: Case, world: int = 1, op=_REF) -> torch.Tensor:
    inputs = make_inputs(case, 0, world)
    kw = call_kwargs(case, inputs, collective=False)
    gl = kw["group_list"]
    return op(inputs["x"], inputs["weight"], kw["bias"],
                gl if isinstance(gl, list) else None, gl if isinstance(gl, torch.Tensor) else None,
                case.split_item, case.group_list_type, world, case.comm_turn)


def expected_flat(case: Case, world: int) -> torch.Tensor:
    """Rank 0's part of the op (its bias divided by world) in float64, as the flat buffer."""
    inputs = make_inputs(case, 0, world)
    if inputs["bias"] is not None:
        inputs["bias"] = [b.double() / world for b in inputs["bias"]]
    refs = reference([inputs], case.split_item, case.group_list_type)
    return torch.cat([r.flatten() for r in refs])


def all_cases() -> list[Case]:
    out = [c for s in SHAPES for d in DTYPES for c in cases_for(s, d, True)]
    out += [dataclasses.replace(c, comm_turn=t, name=f"{c.name}-turn{t}")
            for c in cases_for(0, "bf16", True) + cases_for(3, "fp16", True) for t in (1, 3, 1000)]
    out += [dataclasses.replace(c, layout="strided", name=f"{c.name}-strided")
            for c in cases_for(0, "fp32", True) + cases_for(1, "bf16", True)]
    return out + tiled_cases()


@pytest.mark.parametrize("world", [1, 3])
def test_blocks_compute_the_reference(world):
    for case in all_cases():
        got = blocks_flat(case, world)
        assert not got.isnan().any(), f"{case.name}: an element no block wrote"
        want = expected_flat(case, world)
        assert got.shape == want.shape, case.name
        if case.integers:  # small integers, and biases that divide by world: exact
            torch.testing.assert_close(got.double(), want, atol=0, rtol=0, msg=case.name)
        else:
            atol, rtol = TOLERANCE[case.dtype]
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                       msg=lambda m, c=case: f"{c.name}: {m}")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM_SEED, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), world=st.integers(1, 4))
def test_random_blocks_compute_the_reference(case, world):
    """The property-based calls of test_fuzz (lead dims, strided layouts, chunks, empty groups,
    K = 0, every dtype and group_list spelling), through the blocks."""
    got = blocks_flat(case, world)
    assert not got.isnan().any(), "an element no block wrote"
    want = expected_flat(case, world)
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


_ROW_ENDS = torch.ops.gmm_allreduce._row_ends_reference


def cumulative(counts):
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM_SEED, database=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=20), data=st.data(),
       dtype=st.sampled_from([torch.int64, torch.int32]), as_counts=st.booleans())
def test_row_ends_of_a_valid_list_are_exact(counts, data, dtype, as_counts):
    rows = sum(counts)
    rb = data.draw(st.integers(0, rows))
    re = data.draw(st.integers(rb, rows))
    values = torch.tensor(counts if as_counts else cumulative(counts), dtype=dtype)
    got = _ROW_ENDS(values, int(as_counts), rows, rb, re).tolist()
    assert got == [min(max(e, rb), re) - rb for e in cumulative(counts)]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM_SEED, database=None)
@given(values=st.lists(st.integers(-2**40, 2**40) | st.integers(-5, 30), min_size=1, max_size=20),
       rows=st.integers(0, 50), data=st.data(), as_counts=st.booleans(), strided=st.booleans())
def test_row_ends_of_any_list_stay_in_bounds(values, rows, data, as_counts, strided):
    """Whatever a device group_list holds: non-decreasing, within the chunk, the last at its end."""
    rb = data.draw(st.integers(0, rows))
    re = data.draw(st.integers(rb, rows))
    t = torch.tensor(values, dtype=torch.int64)
    if strided:  # a view with stride 2, as a slice of a larger tensor gives it
        t = torch.stack([t, torch.zeros_like(t)], 1).flatten()[::2]
    got = _ROW_ENDS(t, int(as_counts), rows, rb, re).tolist()
    assert all(0 <= e <= re - rb for e in got)
    assert all(a <= b for a, b in zip(got, got[1:]))
    assert got[-1] == re - rb


_BIAS = torch.ops.gmm_allreduce._bias_reference


def bias_flat(case: Case, world: int, rows_layout: bool) -> torch.Tensor:
    inputs = make_inputs(case, 0, world)
    gl = inputs["group_list"]
    return _BIAS(inputs["x"], inputs["weight"], inputs["bias"],
                 gl if isinstance(gl, list) else None, gl if isinstance(gl, torch.Tensor) else None,
                 case.split_item, case.group_list_type, world, case.comm_turn, rows_layout)


def expected_bias_flat(case: Case, world: int) -> torch.Tensor:
    """bias_i / world on every element of group i, in float64, as the flat buffer."""
    inputs = make_inputs(case, 0, world)
    inputs["x"] = [torch.zeros_like(t) for t in inputs["x"]]
    inputs["bias"] = [b.double() / world for b in inputs["bias"]]
    return torch.cat([r.flatten() for r in reference([inputs], case.split_item,
                                                     case.group_list_type)])


def bias_cases() -> list[Case]:
    out = [c for s in SHAPES for d in DTYPES for c in cases_for(s, d, True)]
    out += [dataclasses.replace(c, comm_turn=t, name=f"{c.name}-turn{t}")
            for c in out if c.split_item in (0, 3) for t in (2, 5)]
    many = Case(name="300-groups", split_item=3, m=tuple(i % 3 for i in range(300)), k=(4,) * 300,
                n=(5,) * 300, dtype=torch.float32, bias_dtype=torch.float16, integers=True)
    return [*out, many, dataclasses.replace(many, split_item=0, name="300-groups-split0")]


@pytest.mark.parametrize("world", [1, 4])
def test_bias_epilogue_in_the_plan_layout(world):
    for case in bias_cases():  # 300 groups take two launches of 256 and 44
        _check_bias(case, bias_flat(case, world, rows_layout=False), world)


@pytest.mark.parametrize("world", [1, 4])
def test_bias_epilogue_in_the_rows_layout(world):
    """split_item 3 with the group rows on the device: each row's group from the row ends."""
    for case in bias_cases():
        if case.split_item == 3 and case.groups <= 256:
            _check_bias(case, bias_flat(case, world, rows_layout=True), world)


def _check_bias(case, got, world):
    want = expected_bias_flat(case, world)
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{case.name}: {m}")


_TILED = torch.ops.gmm_allreduce._tiled_reference
HALF = (torch.float16, torch.bfloat16)


def _check_tiled(case, world):
    got = blocks_flat(case, world, op=_TILED)
    assert not got.isnan().any(), f"{case.name}: an element no tile wrote"
    want = expected_flat(case, world)
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{case.name}: {m}")


@pytest.mark.parametrize("world", [1, 3])
def test_tiles_compute_the_reference(world):
    big = Case(name="tiles-edges", split_item=0, m=(130, 64, 1), k=(70, 32, 33), n=(65, 128, 3),
               dtype=torch.bfloat16, bias_dtype=torch.float32)
    for case in [c for c in all_cases() if c.dtype in HALF] + [big, dataclasses.replace(
            big, integers=True, dtype=torch.float16, name="tiles-edges-int", comm_turn=3)]:
        _check_tiled(case, world)


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=not RANDOM_SEED, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), world=st.integers(1, 4))
def test_random_tiles_compute_the_reference(case, world):
    if case.dtype in HALF:
        _check_tiled(case, world)
