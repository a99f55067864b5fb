"""Quantised inputs: int8 W8A8 (scale, per_token_scale, output_dtype), float8_e4m3fn W8A8 and
weight-only int8 (antiquant_scale, antiquant_offset). Against a float64 reference of the
dequantised math at world sizes 1, 2 and 4 (exact for small integers and power-of-two scales), every
split mode, with and without bias, the combine, the reduce-scatter, comm_turn, async_op,
check_ranks and reduce_dtype; the weight-only kernel on both sides of its row crossover; errors
before any communication; inference only; opcheck and torch.compile; the helpers and the layer."""

import ctypes
import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.nn import GroupedRowParallelLinear

KINDS = ("int8", "fp8", "wo_bf16", "wo_fp16_offset", "wo_fp32")


@dataclasses.dataclass(frozen=True)
class QCase:
    kind: str
    split_item: int
    m: tuple = (3, 0, 40, 5)  # 40 rows: the weight-only dequantise-then-GEMM path; <= 32: ours
    k: int = 32
    n: int = 16
    bias: bool = False
    integers: bool = True
    combine: bool = False
    tokens: int = 8
    comm_turn: int = 0
    output_dtype: torch.dtype | None = torch.float32
    seed: int = 0

    @property
    def name(self):
        return (f"{self.kind}-s{self.split_item}-b{int(self.bias)}-i{int(self.integers)}"
                f"-c{int(self.combine)}-t{self.comm_turn}-{self.output_dtype}")


def _x_dtype(kind):
    return {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "wo_bf16": torch.bfloat16,
            "wo_fp16_offset": torch.float16, "wo_fp32": torch.float32}[kind]


def _layout(w, i):
    """Half of the weights (even groups) as transposes of [N, K] tensors: quantize_weights'
    layout, the one the CPU's int8 kernels (AMX, VNNI) read in place."""
    return w if i % 2 else w.t().contiguous().t()


def make(case, rank):
    """This rank's inputs: dequantised float64 operands and the call's quantised ones."""
    g = torch.Generator().manual_seed(case.seed * 1000 + rank)
    groups, k, n = len(case.m), case.k, case.n
    rows = sum(case.m)

    def ints(*shape, lo=-4, hi=5):
        return torch.randint(lo, hi, shape, generator=g).double()

    def pow2(*shape):  # exact scales
        return torch.pow(2.0, ints(*shape, lo=-3, hi=2))

    def rand(*shape):
        return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1

    xq = ints(rows, k) if case.integers else torch.randint(-127, 128, (rows, k), generator=g).double()
    wq = [ints(k, n) if case.integers else torch.randint(-127, 128, (k, n), generator=g).double()
          for _ in range(groups)]
    col = [pow2(n) if case.integers else rand(n).abs() / 64 + 1e-3 for _ in range(groups)]
    bias = [ints(n) for _ in range(groups)] if case.bias else None
    kw = {}
    if case.kind in ("int8", "fp8"):
        if case.kind == "fp8":  # e4m3: small integers exact; random ones within its 3 mantissa bits
            xq = xq.clamp(-15, 15)
            wq = [w.clamp(-15, 15) for w in wq]
        row = pow2(rows) if case.integers else rand(rows).abs() / 64 + 1e-3
        dx = xq * row[:, None]
        dw = [w * s for w, s in zip(wq, col)]
        qt = _x_dtype(case.kind)
        x_all = xq.to(qt)
        weight = [_layout(w.to(qt), i) for i, w in enumerate(wq)]
        kw.update(scale=[s.float() for s in col], per_token_scale=row.float(),
                  output_dtype=case.output_dtype)
    else:
        xt = _x_dtype(case.kind)
        x_all = (ints(rows, k) if case.integers else rand(rows, k)).to(xt)
        dx = x_all.double()
        offset = [ints(n, lo=-2, hi=3) for _ in range(groups)] if "offset" in case.kind else None
        dw = [(w + (offset[i] if offset else 0)) * col[i] for i, w in enumerate(wq)]
        weight = [_layout(w.to(torch.int8), i) for i, w in enumerate(wq)]
        kw.update(antiquant_scale=[s.float() for s in col],
                  antiquant_offset=[o.float() for o in offset] if offset else None)
    ends = torch.tensor(case.m).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    if case.split_item in (1, 3):
        x = [x_all]
        kw["group_list"] = ends
    else:
        x = [x_all[a:b] for a, b in zip(starts, ends)]
    if bias is not None:
        kw["bias"] = [b.float() for b in bias]
    if case.combine:
        kw.update(combine_index=torch.randint(0, case.tokens, (rows,), generator=torch.Generator()
                                              .manual_seed(case.seed)),
                  combine_weight=torch.pow(2.0, torch.randint(-1, 2, (rows,), generator=torch.Generator()
                                                              .manual_seed(case.seed + 1)).float()),
                  num_tokens=case.tokens)
    parts = [dx[a:b] @ dw[i] for i, (a, b) in enumerate(zip(starts, ends))]
    return x, weight, kw, parts, bias


def expected(case, world):
    """The float64 sum over ranks of each rank's dequantised products, bias counted once."""
    total = None
    for r in range(world):
        _, _, kw, parts, bias = make(case, r)
        if bias is not None:
            parts = [p + b / world for p, b in zip(parts, bias)]
        total = parts if total is None else [t + p for t, p in zip(total, parts)]
    if case.combine:
        rows = torch.cat(total)
        out = torch.zeros(case.tokens, case.n, dtype=torch.float64)
        out.index_add_(0, kw["combine_index"], rows * kw["combine_weight"].double()[:, None])
        return [out]
    return [torch.cat(total)] if case.split_item in (2, 3) else total


def run(cases, op="all_reduce", extra=None):
    rank = dist.get_rank()
    fn = {"all_reduce": gmm_allreduce.grouped_mat_mul_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mat_mul_reduce_scatter}[op]
    out = []
    for case in cases:
        x, weight, kw, _, _ = make(case, rank)
        before = [t.clone() for t in (*x, *weight)]
        ys = fn(x, weight, dist.group.WORLD, split_item=case.split_item, comm_turn=case.comm_turn,
                **kw, **(extra or {}))
        if (extra or {}).get("async_op"):
            ys = gmm_allreduce.wait(ys)
        assert all(torch.equal(a, b) for a, b in zip(before, (*x, *weight))), case.name
        out.append([y.clone() for y in ys])
    return out


def check(case, outputs, want, rows=None):
    assert len(outputs) == len(want), case.name
    out_dtype = case.output_dtype or torch.bfloat16
    for y, w in zip(outputs, want):
        if rows is not None:
            w = w[rows]
        expect_dtype = out_dtype if case.kind in ("int8", "fp8") else _x_dtype(case.kind)
        assert y.dtype == expect_dtype, case.name
        assert tuple(y.shape) == tuple(w.shape), case.name
        if case.integers and y.dtype == torch.float32:
            assert torch.equal(y.double(), w), case.name
        else:  # one rounding to the output dtype, and ATen's bf16/fp16 scales and GEMMs
            tol = 2 ** -6 if y.dtype in (torch.bfloat16, torch.float16) else 1e-5
            torch.testing.assert_close(y.double(), w, atol=tol * float(w.abs().max()) + 1e-6 if w.numel() else 0,
                                       rtol=tol, msg=case.name)


def cases_for(kind):
    out = []
    for split_item in range(4):
        for bias in (False, True):
            for integers in (True, False):
                out.append(QCase(kind, split_item, bias=bias, integers=integers,
                                 comm_turn=2 * integers,
                                 output_dtype=torch.float32 if integers else None))
    out.append(QCase(kind, 1, k=24, bias=True))  # K that ATen's int8-weight kernel does not take
    # K a multiple of 64, N of 16 but not 32: int8 on AMX, with a half pair of column tiles.
    out.append(QCase(kind, 3, m=(3, 0, 40, 17), k=128, n=48, bias=True))
    out.append(QCase(kind, 2, k=128, n=48, integers=False, output_dtype=None, combine=True))
    for split_item in (2, 3):
        out.append(QCase(kind, split_item, bias=True, combine=True))
        out.append(QCase(kind, split_item, combine=True, integers=False, output_dtype=None,
                         comm_turn=3))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_all_reduce_matches_reference(pools, world, kind):
    cases = cases_for(kind)
    per_rank = pools(world).run(run, cases)
    for case, outputs in zip(cases, per_rank[0]):
        check(case, outputs, expected(case, world))
    for rank_outputs in per_rank[1:]:
        for a, b in zip(per_rank[0], rank_outputs):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ("int8", "wo_bf16"))
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_reduce_scatter_matches_reference(pools, world, kind):
    cases = [c for c in cases_for(kind) if c.split_item in (2, 3)]
    cases = [dataclasses.replace(c, m=(3, 0, 9, 4)) for c in cases]  # 16 rows, 8 tokens
    per_rank = pools(world).run(run, cases, "reduce_scatter")
    for rank, outputs in enumerate(per_rank):
        for case, ys in zip(cases, outputs):
            (want,) = expected(case, world)
            block = want.shape[0] // world
            check(case, ys, [want], rows=slice(rank * block, (rank + 1) * block))


def test_async_check_ranks_and_reduce_dtype(pools):
    cases = [QCase("int8", 3, bias=True, integers=False, output_dtype=None),
             QCase("wo_bf16", 2, bias=True, integers=False, combine=True)]
    pool = pools(2)
    sync = pool.run(run, cases)
    for extra in ({"async_op": True}, {"check_ranks": True}):
        again = pool.run(run, cases, "all_reduce", extra)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(sync[0], again[0]))
    fp32 = pool.run(run, cases, "all_reduce", {"reduce_dtype": torch.float32})
    for case, outputs in zip(cases, fp32[0]):
        check(case, outputs, expected(case, 2))


def test_weight_layouts_and_the_row_crossover_agree(world1):
    """The weight-only call reads [K, N] weights in either layout (rows or columns contiguous, or
    neither), at M below and above the crossover, K and N of whole and partial vector tiles, with
    the same result (exact small integers; fp32 x, and bf16 x, which the kernel multiplies as it is
    with the columns layout's weight where the CPU has AVX512-BF16)."""
    torch.manual_seed(0)
    for m, k, n in itertools.product((1, 3, 8, 9, 32, 33), (16, 37), (24, 150)):
        x = torch.randint(-4, 5, (m, k)).float()
        wq = torch.randint(-4, 5, (k, n), dtype=torch.int8)
        s, o = torch.pow(2.0, torch.randint(-2, 2, (n,)).float()), torch.randint(-2, 3, (n,)).float()
        want = x.double() @ ((wq.double() + o.double()) * s.double())
        wide = torch.zeros(k, 2 * n, dtype=torch.int8)
        wide[:, ::2] = wq
        for xx, w in itertools.product((x, x.bfloat16()), (wq, wq.t().contiguous().t(), wide[:, ::2])):
            (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([xx], [w], world1, antiquant_scale=[s],
                                                            antiquant_offset=[o])
            assert torch.equal(y, want.to(y.dtype)), (m, k, n, w.stride(), xx.dtype)


def _tier_at_least(tier):
    """GMM_CPU_ISA (when set) leaves the kernels of `tier` and above."""
    from gmm_allreduce.cpu import TIERS

    return TIERS.index(gmm_allreduce.cpu_capabilities()["tier"]) >= TIERS.index(tier)


def _cpu_has_amx():
    """The CPU has AMX (int8 and bf16), Linux lets this process use its tiles, and GMM_CPU_ISA
    (when set) leaves them."""
    if not _tier_at_least("amx"):
        return False
    try:
        flags = open("/proc/cpuinfo").read().split()
        if not all(f in flags for f in ("amx_int8", "amx_bf16", "avx512_bf16")):
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # x86-64 Linux
        return libc.syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except OSError:
        return False


def test_amx_kernels_match_aten():
    """The CPU's AMX kernels, called directly, give ATen's sums: int8 x (exact against
    torch._int_mm, full-range int8) and bf16 x with an int8 weight (exact for small integers in x),
    over row counts around their tiles (16, 32) and column counts around their tiles and chunks
    (16, 32, 256), weights in the columns layout (and for bf16 x the rows layout) with and without
    padded rows. They do not take what they cannot read; on a host with AMX the op must take
    them."""
    takes, mm = torch.ops.gmm_allreduce._amx_takes, torch.ops.gmm_allreduce._amx_mm
    probe = (torch.zeros(1, 64, dtype=torch.int8), torch.zeros(16, 64, dtype=torch.int8).t())
    if _cpu_has_amx():
        assert takes(*probe) and takes(probe[0].bfloat16(), probe[1])
    if not takes(*probe):
        pytest.skip("no AMX here")
    g = torch.Generator().manual_seed(0)
    for r, k, n in itertools.product((0, 1, 15, 16, 17, 33, 100), (64, 192), (16, 48, 272)):
        xs = (torch.randint(-128, 128, (r, k), generator=g, dtype=torch.int8),
              torch.randint(-8, 9, (r, k), generator=g).bfloat16(),
              torch.randint(-8, 9, (r, k), generator=g).bfloat16()[:, 32:])  # K of 32s, padded
        wt = torch.randint(-128, 128, (n, k + 64), generator=g, dtype=torch.int8)
        wr = torch.randint(-128, 128, (k, n + 64), generator=g, dtype=torch.int8)
        columns = (wt[:, :k].contiguous().t(), wt[:, :k].t())
        rows = (wr[:, :n].contiguous(), wr[:, :n])
        pairs = [(xs[0], w) for w in columns] + list(itertools.product(xs[1:], columns + rows))
        for x, w in pairs:
            w = w[:x.shape[1]]
            assert takes(x, w), (x.dtype, r, k, n)
            want = (x.double() @ w.double()).to(torch.int32 if x.dtype == torch.int8 else torch.float)
            assert torch.equal(mm(x, w), want), (x.dtype, r, k, n)
    zeros = torch.zeros(4, 64, dtype=torch.int8)
    assert not takes(zeros, torch.zeros(64, 16, dtype=torch.int8))  # int8 x, rows layout
    assert not takes(zeros.bfloat16(), torch.zeros(64, 32, dtype=torch.int8)[:, ::2])  # neither
    for x in (zeros, zeros.bfloat16()):
        assert not takes(x, torch.zeros(24, 64, dtype=torch.int8).t())  # N not a multiple of 16
        assert not takes(x.t().contiguous().t(), probe[1])  # x's rows not contiguous
    assert not takes(torch.zeros(4, 96, dtype=torch.int8), torch.zeros(16, 96, dtype=torch.int8).t())
    assert not takes(torch.zeros(4, 48).bfloat16(), torch.zeros(16, 48, dtype=torch.int8).t())
    assert not takes(torch.zeros(4, 64).half(), probe[1])


def test_vnni_kernel_matches_aten():
    """The CPU's int8 kernel for hosts without AMX (AVX512-VNNI), called directly, gives
    torch._int_mm's sums exactly (full-range int8, so that its unsigned x + 128 and the columns'
    sums it takes off are checked at their extremes), over row counts around its panels (16, 32),
    K of whole and partial 64-byte lines, column counts around its passes and chunks (8, 16, 256),
    the weight in the columns layout with and without padded rows. It does not take what it
    cannot read; on a host with VNNI it takes int8 pairs."""
    takes, mm = torch.ops.gmm_allreduce._vnni_takes, torch.ops.gmm_allreduce._vnni_mm
    probe = (torch.zeros(1, 64, dtype=torch.int8), torch.zeros(16, 64, dtype=torch.int8).t())
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        flags = []
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")) and \
            _tier_at_least("avx512"):
        assert takes(*probe)
    if not takes(*probe):
        pytest.skip("no AVX512-VNNI here")
    g = torch.Generator().manual_seed(0)
    for r, k, n in itertools.product((0, 1, 15, 16, 17, 33, 100), (4, 100, 192), (16, 48, 272)):
        x = torch.randint(-128, 128, (r, k), generator=g, dtype=torch.int8)
        x[:, :4] = -128  # the extremes in every row and column
        wt = torch.randint(-128, 128, (n, k + 64), generator=g, dtype=torch.int8)
        wt[:, 1] = -128
        wt[:, 2] = 127
        for w in (wt[:, :k].contiguous().t(), wt[:, :k].t()):
            assert takes(x, w), (r, k, n)
            assert torch.equal(mm(x, w), torch._int_mm(x, w) if r > 16 else
                               (x.double() @ w.double()).int()), (r, k, n, w.stride())
    zeros = torch.zeros(4, 64, dtype=torch.int8)
    assert not takes(zeros, torch.zeros(64, 16, dtype=torch.int8))  # rows layout
    assert not takes(zeros, torch.zeros(24, 64, dtype=torch.int8).t())  # N not a multiple of 16
    assert not takes(zeros.t().contiguous().t(), probe[1])  # x's rows not contiguous
    assert not takes(torch.zeros(4, 66, dtype=torch.int8), torch.zeros(16, 66, dtype=torch.int8).t())
    assert not takes(zeros.bfloat16(), probe[1])


def test_groups_over_several_row_blocks(world1):
    """Groups of more rows than one block of products (about 256K: 64 rows of N = 4096), above
    the weight-only kernel's rows: every block of each group exact, the weight dequantised for
    each group (exact small integers, fp32 x)."""
    torch.manual_seed(0)
    k, n, rows = 16, 4096, (200, 70)
    x = torch.randint(-4, 5, (sum(rows), k)).float()
    wq = [torch.randint(-4, 5, (k, n), dtype=torch.int8) for _ in rows]
    s = [torch.pow(2.0, torch.randint(-2, 2, (n,)).float()) for _ in rows]
    o = [torch.randint(-2, 3, (n,)).float() for _ in rows]
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], wq, world1, group_list=[rows[0], sum(rows)],
                                                    split_item=3, antiquant_scale=s,
                                                    antiquant_offset=o)
    want = torch.cat([xi.double() @ ((w.double() + oi.double()) * si.double())
                      for xi, w, si, oi in zip(x.split(rows), wq, s, o)])
    assert torch.equal(y.double(), want)


# ---- errors: clear, naming the argument, before any communication ----

def _int8_call(world1, **over):
    x, w = [torch.ones(6, 4, dtype=torch.int8)], [torch.ones(4, 3, dtype=torch.int8)] * 2
    kw = dict(group_list=[2, 6], split_item=3, scale=[torch.ones(3)] * 2,
              per_token_scale=torch.ones(6))
    kw.update(over)
    x = kw.pop("x", x)
    w = kw.pop("weight", w)
    return gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, **kw)


def _wo_call(world1, **over):
    x, w = [torch.ones(6, 4, dtype=torch.bfloat16)], [torch.ones(4, 3, dtype=torch.int8)] * 2
    kw = dict(group_list=[2, 6], split_item=3, antiquant_scale=[torch.ones(3)] * 2)
    kw.update(over)
    x = kw.pop("x", x)
    w = kw.pop("weight", w)
    return gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, **kw)


@pytest.mark.parametrize("call, over, error, match", [
    (_int8_call, dict(per_token_scale=None), ValueError, "per_token_scale: required for int8"),
    (_int8_call, dict(scale=None), ValueError, "scale: required for int8"),
    (_int8_call, dict(scale=[torch.ones(3)]), ValueError, "scale: expected 2 tensors"),
    (_int8_call, dict(scale=[torch.ones(3), torch.ones(4)]), ValueError,
     r"scale\[1\]: expected a 1-D tensor of 3 values"),
    (_int8_call, dict(scale=[torch.ones(3), torch.ones(3, dtype=torch.int32)]), TypeError,
     r"scale\[1\]: expected a floating-point dtype"),
    (_int8_call, dict(scale=torch.ones(3)), TypeError, "scale: expected a list of tensors"),
    (_int8_call, dict(per_token_scale=torch.ones(5)), ValueError,
     "per_token_scale: expected a 1-D tensor of 6 values"),
    (_int8_call, dict(per_token_scale=[1.0] * 6), TypeError, "per_token_scale: expected None or a"),
    (_int8_call, dict(per_token_scale=torch.ones(6, dtype=torch.int64)), TypeError,
     "per_token_scale: expected a floating-point dtype"),
    (_int8_call, dict(antiquant_scale=[torch.ones(3)] * 2), ValueError,
     "antiquant_scale: given for a call of int8 x and weight"),
    (_int8_call, dict(output_dtype=torch.int32), ValueError, "output_dtype: expected None, "
                                                              "torch.bfloat16"),
    (_int8_call, dict(output_dtype="bf16"), TypeError, "output_dtype: expected None or a torch"),
    (_int8_call, dict(weight=[torch.ones(4, 3)] * 2), TypeError,
     r"weight\[0\]: expected dtype Char like x\[0\], got Float"),
    (_int8_call, dict(weight=[torch.ones(4, 3, dtype=torch.int8), torch.ones(4, 3).to(
        torch.float8_e4m3fn)]), TypeError, r"weight\[1\]: expected dtype Char"),
    (_wo_call, dict(antiquant_scale=None), ValueError, "antiquant_scale: required for int8 "
                                                       "weights with float x"),
    (_wo_call, dict(antiquant_offset=[torch.ones(2)] * 2), ValueError,
     r"antiquant_offset\[0\]: expected a 1-D tensor of 3 values"),
    (_wo_call, dict(scale=[torch.ones(3)] * 2), ValueError, "scale: given for a call of int8 "
                                                           "weights with float x"),
    (_wo_call, dict(per_token_scale=torch.ones(6)), ValueError, "per_token_scale: given for"),
    (_wo_call, dict(output_dtype=torch.float32), ValueError,
     "output_dtype: the outputs of a call of int8 weights with float x have x's dtype"),
    (_wo_call, dict(weight=[torch.ones(4, 3, dtype=torch.int8), torch.ones(4, 3,
                                                                            dtype=torch.bfloat16)]),
     TypeError, r"weight\[1\]: expected dtype Char like weight\[0\], got BFloat16"),
    (_wo_call, dict(x=[torch.ones(6, 4, dtype=torch.float64)]), TypeError,
     r"weight\[0\]: int8 weights take float16, bfloat16 or float32 x"),
    (_wo_call, dict(x=[torch.ones(6, 4)], antiquant_scale=None, scale=[torch.ones(3)] * 2,
                    weight=[torch.ones(4, 3)] * 2), ValueError,
     "scale: given for a call of float x and weight"),
    (_wo_call, dict(bias=[torch.ones(3, requires_grad=True)] * 2), RuntimeError,
     "quantised calls .* are inference-only"),
])
def test_bad_quantisation_arguments(world1, call, over, error, match):
    with pytest.raises(error, match=match):
        call(world1, **over)


def test_the_op_called_directly_refuses_grad(world1):
    """torch.ops' own entry, past the front's checks: its autograd glue refuses too."""
    x, w = [torch.ones(6, 4, dtype=torch.bfloat16)], [torch.ones(4, 3, dtype=torch.int8)] * 2
    bias = [torch.ones(3, requires_grad=True)] * 2
    with pytest.raises(RuntimeError, match="quantised calls .* are inference-only"):
        torch.ops.gmm_allreduce.grouped_mat_mul.default(
            x, w, bias, [2, 6], None, 3, 0, 2, None, None, None, None, None, None,
            [torch.ones(3)] * 2, None, None)


def _bad_scale_on_one_rank():
    """Rank 1 passes a bad scale: it raises before any communication, rank 0 then finds the
    ranks disagree (check_ranks), and neither hangs."""
    rank = dist.get_rank()
    kw = dict(group_list=[2, 6], split_item=3, per_token_scale=torch.ones(6), check_ranks=True,
              scale=[torch.ones(3), torch.ones(3 if rank == 0 else 2)])
    try:
        gmm_allreduce.grouped_mat_mul_all_reduce([torch.ones(6, 4, dtype=torch.int8)],
                                                 [torch.ones(4, 3, dtype=torch.int8)] * 2,
                                                 dist.group.WORLD, **kw)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


def test_a_bad_scale_on_one_rank_fails_every_rank(pools):
    messages = pools(2).run(_bad_scale_on_one_rank)
    assert all(m is not None for m in messages)
    assert any(r"scale[1]: expected a 1-D tensor of 3 values" in m for m in messages)


def test_opcheck_and_compile(world1):
    case = QCase("int8", 3, bias=True, integers=False, output_dtype=None)
    x, w, kw, _, _ = make(case, 0)
    args = (x, w, kw["bias"], kw["group_list"], None, 3, world1.group_name, "sum", 0, 0, False,
            None, False, None, None, None, None, kw["scale"], kw["per_token_scale"], None, None,
            None)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce.default, args)
    wo = QCase("wo_fp16_offset", 1, bias=True)
    xw, ww, kww, _, _ = make(wo, 0)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul.default,
                          (xw, ww, kww["bias"], kww["group_list"], None, 1, 0, 2, None, None, None,
                           None, None, None, kww["antiquant_scale"], kww["antiquant_offset"], None))
    call = {k: v for k, v in kw.items()}
    compiled = torch.compile(
        lambda x, w: gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, split_item=3, **call),
        fullgraph=True)
    eager = gmm_allreduce.grouped_mat_mul_all_reduce(x, w, world1, split_item=3, **call)
    got = compiled(x, w)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], eager[0])


def test_the_helpers_round_trip():
    torch.manual_seed(0)
    w = [torch.randn(64, 48), torch.randn(32, 16, dtype=torch.bfloat16)]
    q, s = gmm_allreduce.quantize_weights(w)
    for wi, qi, si in zip(w, q, s):
        assert qi.dtype == torch.int8 and qi.shape == wi.shape and qi.t().is_contiguous()
        assert si.shape == (wi.shape[1],) and si.dtype == torch.float32
        assert qi.abs().max() == 127
        torch.testing.assert_close(qi.float() * si, wi.float(), atol=float(si.max()) / 2 + 1e-6,
                                   rtol=0)
    x = torch.randn(10, 64)
    xq, ps = gmm_allreduce.quantize_per_token(x)
    assert xq.dtype == torch.int8 and ps.shape == (10,)
    torch.testing.assert_close(xq.float() * ps[:, None], x, atol=float(ps.max()) / 2 + 1e-6, rtol=0)
    q8, s8 = gmm_allreduce.quantize_weights(w[:1], dtype=torch.float8_e4m3fn)
    torch.testing.assert_close(q8[0].float() * s8[0], w[0], atol=0, rtol=2 ** -3)
    with pytest.raises(ValueError, match="dtype: expected torch.int8 or torch.float8_e4m3fn"):
        gmm_allreduce.quantize_weights(w, dtype=torch.int16)


def test_an_int8_model_end_to_end(world1):
    """A bf16 layer's call against its W8A8 and weight-only quantisations: close, in bf16."""
    torch.manual_seed(0)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    w = [torch.randn(64, 32, dtype=torch.bfloat16) / 8 for _ in range(3)]
    gl = [10, 10, 40]
    (ref,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], w, world1, group_list=gl, split_item=3)
    q, s = gmm_allreduce.quantize_weights(w)
    xq, ps = gmm_allreduce.quantize_per_token(x)
    (w8a8,) = gmm_allreduce.grouped_mat_mul_all_reduce([xq], q, world1, group_list=gl,
                                                       split_item=3, scale=s, per_token_scale=ps)
    (wo,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], q, world1, group_list=gl, split_item=3,
                                                     antiquant_scale=s)
    for y in (w8a8, wo):
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref.float()).norm() / ref.float().norm() < 0.02


@pytest.mark.parametrize("activations", [False, True], ids=["weight_only", "w8a8"])
def test_the_layer_holds_quantised_weights(world1, activations):
    torch.manual_seed(0)
    layer = GroupedRowParallelLinear(4, 64, 32, group=world1, dtype=torch.bfloat16)
    x = torch.randn(24, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x, [6, 12, 18, 24])
        layer.quantize_weights(activations=activations)
        assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
        y = layer(x, [6, 12, 18, 24])
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref.float()).norm() / ref.float().norm() < 0.02
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x.requires_grad_(), [6, 12, 18, 24])


@pytest.mark.parametrize("rows", [3, 40])
def test_an_int32_bias_is_added_before_dequantisation(tier, world1, rows):
    """W8A8 with an int32 bias (Ascend's npu_grouped_matmul): (x @ w + b) * row * scale, b added
    to the exact int32 sums, on every CPU kernel; one rank only (a share b / n is no integer)."""
    g = torch.Generator().manual_seed(rows)
    k, n = 64, 48
    x = torch.randint(-128, 128, (2 * rows, k), dtype=torch.int8, generator=g)
    w = [torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).t() for _ in range(2)]
    b = [torch.randint(-2**20, 2**20, (n,), dtype=torch.int32, generator=g) for _ in range(2)]
    scale = [torch.rand(n, generator=g) + 0.5 for _ in range(2)]
    pts = torch.rand(2 * rows, generator=g) + 0.5
    kw = dict(bias=b, scale=scale, per_token_scale=pts, group_list=[rows, rows],
              group_list_type=1, split_item=3, output_dtype=torch.float32)
    want = torch.cat([((x[i * rows:(i + 1) * rows].double() @ w[i].double() + b[i].double())
                       * pts[i * rows:(i + 1) * rows, None].double() * scale[i].double())
                      for i in range(2)])
    for got in (gmm_allreduce.grouped_mat_mul([x], w, **kw)[0],
                gmm_allreduce.grouped_mat_mul_all_reduce([x], w, world1, **kw)[0]):
        torch.testing.assert_close(got, want.float(), rtol=3e-7, atol=0)  # fp32 roundings
    with pytest.raises(ValueError, match=r"^bias: an int32 bias joins the int32 sums whole"):
        gmm_allreduce.grouped_mat_mul([x], w, world_size=2, **kw)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.ones(4, 8)), TypeError, r"^bias\[0\]: expected a floating-point dtype, got Int"),
    (dict(bias=[torch.zeros(6, dtype=torch.int32), torch.zeros(6)]), TypeError,
     r"^bias: expected every tensor int32 \(added to the int32 sums\) or every one floating"),
    (dict(combine_index=torch.zeros(4, dtype=torch.int64), num_tokens=1), ValueError,
     r"^bias: an int32 bias is not supported with combine_index"),
])
def test_int32_bias_errors(change, error, match):
    kw = dict(x=torch.ones(4, 8, dtype=torch.int8),
              weight=[torch.ones(8, 6, dtype=torch.int8)] * 2,
              bias=[torch.zeros(6, dtype=torch.int32)] * 2, scale=[torch.ones(6)] * 2,
              per_token_scale=torch.ones(4), group_list=[2, 4], split_item=3)
    kw.update(change)
    if kw["x"].dtype != torch.int8:
        kw = {k: v for k, v in kw.items() if k not in ("scale", "per_token_scale")}
        kw["weight"] = [torch.ones(8, 6)] * 2
    x = kw.pop("x")
    with pytest.raises(error, match=match):
        gmm_allreduce.grouped_mat_mul([x], **kw)
