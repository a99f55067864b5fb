"""The CUDA engine's logic, checked on the CPU through its test-only twins
(csrc/testing/kernel_twins.cpp), which run the same source as the kernels or feed them:
- the raw GEMM blocks the tiled kernel reads (csrc/cuda/host/blocks.cpp): the flat buffer computed
  from them by the kernel's formula, chunk by chunk, equals the float64 reference, every element
  written;
- the tiled kernel's schedule, tile staging and epilogue (csrc/cuda/host/tiles.h) around a scalar
  MMA in place of its WMMA fragments: the reference again, for fp16 and bf16, for host-planned
  blocks and for split_item 3 with its group rows on the device;
- the row offsets of a device group_list (write_row_ends, csrc/cuda/host/epilogue.h): exact for
  valid lists, in bounds, non-decreasing and ending at the chunk's rows for any list;
- the bias epilogue (bias_launches, add_bias_at): bias_i / world on exactly group i's elements, in
  the plan's layout and in the rows layout of split_item 3, and from the loop GEMM's fp32 products;
- the GEMM choice (csrc/cuda/host/choice.h) per arch, layout and forced strategy.
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


def blocks_flat(case: Case, world: int = 1, op=_REF, *extra) -> torch.Tensor:
    """op on rank 0's inputs of the case; `extra`: the op's arguments after comm_turn."""
    inputs = make_inputs(case, 0, world)
    kw = call_kwargs(case, inputs, collective=False)
    gl = kw["group_list"]
    return op(inputs["x"], inputs["weight"], kw["bias"],
              gl if isinstance(gl, list) else None, gl if isinstance(gl, torch.Tensor) else None,
              case.split_item, case.group_list_type, world, case.comm_turn, *extra)


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


def bias_flat(case: Case, world: int, rows_layout: bool, from_fp32: bool = False) -> torch.Tensor:
    return blocks_flat(case, world, _BIAS, rows_layout, from_fp32)


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


@pytest.mark.parametrize("world", [1, 4])
def test_bias_epilogue_rounds_the_fp32_products_once(world):
    """The loop GEMM's epilogue: each element is its fp32 product (here e % 4) plus the bias,
    rounded once; the buffer starts as NaN, so an element it does not write shows."""
    for case in bias_cases():
        got = bias_flat(case, world, rows_layout=False, from_fp32=True)
        assert not got.isnan().any(), f"{case.name}: an element the epilogue did not write"
        _check_bias(case, got, world, plus=torch.arange(got.numel(), dtype=torch.float64) % 4)


def _check_bias(case, got, world, plus=0):
    want = expected_bias_flat(case, world) + plus
    atol, rtol = (0, 0) if case.integers else TOLERANCE[case.dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{case.name}: {m}")


_TILED = torch.ops.gmm_allreduce._tiled_reference
HALF = (torch.float16, torch.bfloat16)


# fp32 partials: fp32 sums of exact 16-bit products, far inside a 16-bit rounding.
FP32_PARTIALS = (1e-4, 2e-5)


def _check_tiled(case, world, rows_layout=False, reduce_dtype=None):
    got = blocks_flat(case, world, _TILED, rows_layout, reduce_dtype)
    assert not got.isnan().any(), f"{case.name}: an element no tile wrote"
    assert got.dtype == (reduce_dtype or case.dtype), case.name
    want = expected_flat(case, world)
    atol, rtol = ((0, 0) if case.integers else FP32_PARTIALS if reduce_dtype
                  else TOLERANCE[case.dtype])
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{case.name}: {m}")


@pytest.mark.parametrize("world", [1, 3])
def test_tiles_compute_the_reference(world):
    big = Case(name="tiles-edges", split_item=0, m=(130, 64, 1), k=(70, 32, 33), n=(65, 128, 3),
               dtype=torch.bfloat16, bias_dtype=torch.float32)
    for case in [c for c in all_cases() if c.dtype in HALF] + [big, dataclasses.replace(
            big, integers=True, dtype=torch.float16, name="tiles-edges-int", comm_turn=3)]:
        _check_tiled(case, world)


@pytest.mark.parametrize("rows_layout", [False, True], ids=["blocks", "rows"])
def test_tiles_keep_fp32_partials_unrounded(rows_layout):
    """reduce_dtype float32: the epilogue writes acc + bias / world into an fp32 buffer, unrounded
    (a 16-bit rounding would be 100 times the tolerance), for both layouts and edge tiles."""
    big = Case(name="tiles-edges-fp32", split_item=3 if rows_layout else 0, m=(130, 64, 1),
               k=(70,) * 3 if rows_layout else (70, 32, 33), n=(65,) * 3 if rows_layout else
               (65, 128, 3), dtype=torch.bfloat16, bias_dtype=torch.float16)
    pool = rows_cases() if rows_layout else [c for c in all_cases() if c.dtype in HALF]
    for world in (1, 3):
        for case in [*pool, big, dataclasses.replace(big, dtype=torch.float16)]:
            _check_tiled(case, world, rows_layout, torch.float32)


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=not RANDOM_SEED, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), world=st.integers(1, 4))
def test_random_tiles_compute_the_reference(case, world):
    if case.dtype in HALF:
        _check_tiled(case, world)


def rows_cases() -> list[Case]:
    """split_item 3 in 16 bits: the tiled kernel's calls with the group rows on the device."""
    out = [c for d in ("fp16", "bf16") for c in cases_for(3, d, True) + cases_for(3, d, False)]
    out += [dataclasses.replace(c, comm_turn=t, name=f"{c.name}-turn{t}")
            for c in cases_for(3, "bf16", True) for t in (2, 1000)]
    edges = Case(name="rows-edges", split_item=3, m=(130, 0, 64, 1, 65), k=(70,) * 5, n=(65,) * 5,
                 dtype=torch.float16, bias_dtype=torch.float32, group_list_form="tensor")
    many = Case(name="rows-300-groups", split_item=3, m=tuple(i % 3 for i in range(300)),
                k=(8,) * 300, n=(5,) * 300, dtype=torch.bfloat16, bias_dtype=torch.float16,
                integers=True, group_list_type=1, group_list_form="tensor32", comm_turn=3)
    strided = Case(name="rows-strided", split_item=3, m=(9, 3, 40), k=(33,) * 3, n=(20,) * 3,
                   dtype=torch.bfloat16, bias_dtype=torch.float32, layout="strided")
    return [*out, edges, many, strided]


@pytest.mark.parametrize("world", [1, 3])
def test_tiles_in_the_rows_layout_compute_the_reference(world):
    """The device-rows schedule: each CTA finds its group and tile from the row ends; the grid is
    an upper bound, every element is written once (more than kMaxTileGroups groups take two
    launches)."""
    for case in rows_cases():
        _check_tiled(case, world, rows_layout=True)


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=not RANDOM_SEED, database=None)
@given(values=st.lists(st.integers(-40, 40) | st.integers(-2**40, 2**40), min_size=1,
                       max_size=12),
       rows=st.integers(0, 80), as_counts=st.booleans(), comm_turn=st.integers(0, 3))
def test_tiles_in_the_rows_layout_stay_in_bounds_for_any_list(values, rows, as_counts, comm_turn):
    """A device group_list is not validated: whatever it holds, the tiles write every output row
    exactly once, with the group that the clamped row ends give it (and read nothing outside x:
    the sanitizer build checks that)."""
    groups, n, k = len(values), 9, 12
    gen = torch.Generator().manual_seed(rows)
    x = torch.randint(-1, 2, (rows, k), generator=gen).half()
    w = [torch.randint(-1, 2, (k, n), generator=gen).half() for _ in range(groups)]
    gl = torch.tensor(values, dtype=torch.int64)
    got = _TILED([x], w, None, None, gl, 3, int(as_counts), 1, comm_turn, True)
    assert not got.isnan().any(), "an element no tile wrote"
    ends = _ROW_ENDS(gl, int(as_counts), rows, 0, rows).tolist()
    want = torch.cat([x[s:e].double() @ wi.double() for s, e, wi in zip([0, *ends[:-1]], ends, w)])
    torch.testing.assert_close(got.view(rows, n).double(), want, atol=0, rtol=0)


_CHOICE = torch.ops.gmm_allreduce._gemm_choice


def choice(x, weight, major, forced="auto", bias=None, group_list=None, split_item=3,
           reduce_dtype=None):
    gl = group_list
    return _CHOICE(x, weight, bias, gl if isinstance(gl, list) else None,
                   gl if isinstance(gl, torch.Tensor) else None, split_item, 1, major, forced,
                   reduce_dtype)


def stacked(groups, k=64, n=32, dtype=torch.bfloat16):
    return list(torch.zeros(groups, k, n, dtype=dtype).unbind(0))


def separate(groups, k=64, n=32, dtype=torch.bfloat16):
    return [torch.zeros(k, n, dtype=dtype) for _ in range(groups)]


def moe_args(groups, rows_per_group=4, k=64, n=32, dtype=torch.bfloat16, tensor=True):
    x = [torch.zeros(groups * rows_per_group, k, dtype=dtype)]
    counts = [rows_per_group] * groups
    return x, (torch.tensor(counts) if tensor else counts)


def test_gemm_choice_grouped_needs_its_arch_bf16_stacked_weights_and_fewer_than_1024_groups():
    x, gl = moe_args(16)
    for major, want in ((8, "tiled+rows_on_device"), (9, "grouped+rows_on_device"),
                        (10, "grouped+rows_on_device"), (12, "tiled+rows_on_device")):
        assert choice(x, stacked(16), major, group_list=gl) == want, major
    assert choice(x, separate(16), 9, group_list=gl) == "tiled+rows_on_device"
    # a host list: rows planned on the host; more than 8 groups: grouped, else the loop
    assert choice(x, stacked(16), 9, group_list=gl.tolist()) == "grouped"
    x8, gl8 = moe_args(8)
    assert choice(x8, stacked(8), 9, group_list=gl8.tolist()) == "loop"
    # 1024 groups: beyond torch's grouped GEMM (it refuses group_count >= 1024)
    x1k, gl1k = moe_args(1024, rows_per_group=1)
    assert choice(x1k, stacked(1024), 9, group_list=gl1k) == "tiled+rows_on_device"
    assert choice(x1k, stacked(1024), 9, group_list=gl1k.tolist()) == "tiled"
    x1023, gl1023 = moe_args(1023, rows_per_group=1)
    assert choice(x1023, stacked(1023), 9, group_list=gl1023) == "grouped+rows_on_device"


def test_gemm_choice_grouped_refuses_what_its_tma_cannot_read():
    x, gl = moe_args(16)
    # K or N not a multiple of 8; x padded by a row stride that is no multiple of 8; an expanded x
    # (row stride 0); x misaligned by one element
    for args in ((moe_args(16, k=60)[0], stacked(16, k=60)), (x, stacked(16, n=36)),
                 ([torch.zeros(64, 68, dtype=torch.bfloat16)[:, :64]], stacked(16)),
                 ([torch.zeros(1, 64, dtype=torch.bfloat16).expand(64, 64)], stacked(16)),
                 ([torch.zeros(64 * 64 + 1, dtype=torch.bfloat16)[1:].view(64, 64)], stacked(16))):
        assert choice(*args, 9, group_list=gl) == "tiled+rows_on_device"
    # column-major stacked weights (the backward passes w.t()): taken
    wt = list(torch.zeros(16, 32, 64, dtype=torch.bfloat16).transpose(1, 2).unbind(0))
    assert choice(x, wt, 9, group_list=gl) == "grouped+rows_on_device"
    # fp16 and fp32: never grouped; fp32 has no one-launch GEMM, so its rows are read on the host
    assert choice(moe_args(16, dtype=torch.half)[0], stacked(16, dtype=torch.half), 9,
                  group_list=gl) == "tiled+rows_on_device"
    assert choice(moe_args(16, dtype=torch.float)[0], stacked(16, dtype=torch.float), 9,
                  group_list=gl) == "loop"
    # below sm_80 there is no tiled kernel either
    assert choice(moe_args(16, dtype=torch.half)[0], stacked(16, dtype=torch.half), 7,
                  group_list=gl) == "loop"


def test_gemm_choice_bias_and_forced_strategies():
    x, gl = moe_args(300, rows_per_group=1)
    bias = [torch.zeros(32) for _ in range(300)]
    # the rows-layout bias epilogue takes 256 groups: beyond, the tiled kernel (bias fused)
    assert choice(x, stacked(300), 9, bias=bias, group_list=gl) == "tiled+rows_on_device"
    assert choice(x, stacked(300), 9, group_list=gl) == "grouped+rows_on_device"
    x16, gl16 = moe_args(16)
    assert choice(x16, stacked(16), 9, "loop", group_list=gl16) == "loop"
    assert choice(x16, stacked(16), 9, "tiled", group_list=gl16) == "tiled+rows_on_device"
    assert choice(x16, separate(16), 9, "grouped", group_list=gl16) == "tiled+rows_on_device"
    assert choice(x16, separate(16), 9, "grouped", group_list=gl16.tolist()) == "loop"
    assert choice(x16[:1], stacked(16), 8, "tiled", group_list=gl16.tolist()) == "tiled"
    # split_item 0 (ragged K and N) never takes the grouped GEMM; small groups go tiled
    xs = [torch.zeros(4, 8 * (i + 1), dtype=torch.bfloat16) for i in range(12)]
    ws = [torch.zeros(8 * (i + 1), 16, dtype=torch.bfloat16) for i in range(12)]
    assert choice(xs, ws, 9, split_item=0) == "tiled"
    assert choice(xs[:8], ws[:8], 9, split_item=0) == "loop"
    with pytest.raises(ValueError, match="GMM_CUDA_GEMM: expected auto, loop, grouped or tiled"):
        choice(x16, stacked(16), 9, "fast", group_list=gl16)


def test_gemm_choice_fp32_partials_take_the_tiled_kernel():
    """reduce_dtype float32 on 16-bit x: the grouped GEMM writes bf16 only, so the tiled kernel
    (fp32 output) serves what it would, device group_list included; fp32 x is unchanged."""
    fp32 = torch.float32
    x, gl = moe_args(16)
    assert choice(x, stacked(16), 9, group_list=gl, reduce_dtype=fp32) == "tiled+rows_on_device"
    assert choice(x, stacked(16), 9, group_list=gl.tolist(), reduce_dtype=fp32) == "tiled"
    assert choice(x, stacked(16), 9, "grouped", group_list=gl, reduce_dtype=fp32) == \
        "tiled+rows_on_device"
    assert choice(x, stacked(16), 9, "grouped", group_list=gl.tolist(), reduce_dtype=fp32) == "loop"
    assert choice(x, stacked(16), 9, "loop", group_list=gl, reduce_dtype=fp32) == "loop"
    x8, gl8 = moe_args(8, dtype=torch.half)
    assert choice(x8, stacked(8, dtype=torch.half), 8, group_list=gl8.tolist(),
                  reduce_dtype=fp32) == "loop"
    # below sm_80 no one-launch GEMM takes it: the rows are read on the host
    assert choice(x, stacked(16), 7, group_list=gl, reduce_dtype=fp32) == "loop"
    assert choice(moe_args(16, dtype=fp32)[0], stacked(16, dtype=fp32), 9, group_list=gl,
                  reduce_dtype=fp32) == "loop"


def test_signature_of_rows_on_device_names_no_device():
    """check_ranks compares plan signatures across ranks: a rows-on-device plan must not name its
    device, which differs between the ranks of a multi-GPU job (cuda:0, cuda:1, ...)."""
    x, w = [torch.zeros(6, 4)], [torch.zeros(4, 3)] * 2
    sig = torch.ops.gmm_allreduce._plan_signature
    on_device = sig(x, w, None, None, torch.tensor([2, 6]), 3, 0, 0, True)
    assert on_device.endswith("rows=on device") and "cpu" not in on_device, on_device
    # another device's rows give the same signature; rows read on the host are compared
    assert sig(x, w, None, None, torch.tensor([3, 6]), 3, 0, 0, True) == on_device
    assert sig(x, w, None, [2, 6], None, 3, 0, 0, False).endswith("rows=[2, 4]")
