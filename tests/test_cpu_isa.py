"""The CPU engine's policy per tier (GMM_CPU_ISA): what cpu_capabilities() reports, which kernel
each dtype's product runs under every cap this host supports (a silent fallback to another kernel
fails), every tier's products against the float64 reference in both weight layouts, and bad
GMM_CPU_ISA values."""

import pytest
import torch
from cpu_tiers import HERE, HOST, VNNI, at_least, taken

import gmm_allreduce
from gmm_allreduce.cases import TOLERANCE
from gmm_allreduce.cpu import emulation_env


def _draw(m, k, n, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).t() / k**0.5
    if layout == "kn":
        w = w.contiguous()
    return x, w, x.to(dtype), w.to(dtype)


# ---- what the policy says and runs, per tier ----

def test_the_tier_is_the_cap_or_the_host(tier):
    caps = gmm_allreduce.cpu_capabilities()
    assert (caps["host"], caps["tier"]) == (HOST, tier)
    assert set(caps) >= {"float32", "float64", "bfloat16", "float16", "int8", "float8_e4m3fn",
                         "weight_int8"}
    native_bf16 = at_least(tier, "avx512_bf16")
    assert ("oneDNN" in caps["bfloat16"]) == native_bf16
    assert "fp32 GEMM" in caps["float16"]


def test_a_cap_above_the_host_leaves_the_host(monkeypatch):
    monkeypatch.setenv("GMM_CPU_ISA", "amx")
    assert gmm_allreduce.cpu_capabilities()["tier"] == HOST


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_float_products_take_the_tier_s_kernel(tier, layout):
    big = (64, 256, 128)  # 2^21 multiply-adds: oneDNN's bf16 GEMM where native
    for dtype, expect in [(torch.float32, "native"), (torch.float64, "native"),
                          (torch.float16, "upcast"),
                          (torch.bfloat16, "native" if at_least(tier, "avx512_bf16") else "upcast")]:
        _, _, x, w = _draw(*big, dtype, layout)
        got = taken(lambda x=x, w=w: gmm_allreduce.grouped_mat_mul([x], [w], split_item=0))
        assert got == {expect}, (dtype, got)
    # A small bf16 product takes fp32 on every tier (oneDNN's overhead is more than its products).
    _, _, x, w = _draw(16, 32, 16, torch.bfloat16, layout)
    assert taken(lambda: gmm_allreduce.grouped_mat_mul([x], [w], split_item=0)) == {"upcast"}


def test_the_combine_and_the_backward_take_it_too(tier):
    native = at_least(tier, "avx512_bf16")
    _, _, x, w = _draw(64, 256, 128, torch.bfloat16, "kn")
    index = torch.arange(64) % 16
    got = taken(lambda: gmm_allreduce.grouped_mat_mul(
        [x], [w], split_item=3, group_list=[64], combine_index=index, num_tokens=16))
    assert got == {"native" if native else "upcast"}
    x.requires_grad_(True)
    w.requires_grad_(True)
    (y,) = gmm_allreduce.grouped_mat_mul([x], [w], split_item=0)
    got = taken(lambda: y.sum().backward())
    assert got == {"native" if native else "upcast"}


def _int8_call(rows, k=128, n=64, layout="nk", seed=0):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t()
    if layout == "kn":
        wq = wq.contiguous()
    ones_n, ones_m = torch.ones(n), torch.ones(rows)
    ref = (xq.long() @ wq.long()).double()

    def call():
        return gmm_allreduce.grouped_mat_mul([xq], [wq], split_item=3, group_list=[rows],
                                             scale=[ones_n], per_token_scale=ones_m,
                                             output_dtype=torch.float32)[0]
    return call, ref


@pytest.mark.parametrize("rows", [3, 16, 45])
def test_int8_takes_the_tier_s_kernel_and_is_exact(tier, rows):
    call, ref = _int8_call(rows)
    if at_least(tier, "amx"):
        expect = "int8_amx"
    elif at_least(tier, "avx512") and VNNI:
        expect = "int8_vnni" if rows >= 9 else "int8_int_mm"
    else:
        expect = "int8_avx2"
    got = taken(lambda: torch.testing.assert_close(call().double(), ref, atol=0, rtol=0))
    assert got == {expect}


@pytest.mark.parametrize("rows", [3, 20])
def test_int8_in_the_rows_layout_without_vnni_is_never_the_reference_kernel(tier, rows):
    if at_least(tier, "avx512") and VNNI:
        pytest.skip("VNNI: torch._int_mm is fast here")
    call, ref = _int8_call(rows, layout="kn")
    got = taken(lambda: torch.testing.assert_close(call().double(), ref, atol=0, rtol=0))
    assert got == {"int8_avx2"}


@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("k, n", [(128, 64), (100, 37), (7, 300), (2048, 16), (33, 256)])
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 24, 25, 50])
def test_the_avx2_int8_kernel_alone(monkeypatch, k, n, rows, layout):
    """Exact int32 sums, in place (a few rows, the columns layout), from panels widened at the call
    (from 8 rows, or any rows in the rows layout) and from a pack made once."""
    if not HERE:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setenv("GMM_CPU_ISA", "avx2")
    g = torch.Generator().manual_seed(rows * 7 + k)
    x = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t()
    x[0, :] = -128  # int8's extremes in a row and a column
    w[:, 0] = -128
    if layout == "kn":
        w = w.contiguous()
    assert torch.ops.gmm_allreduce._avx2_int8_takes(x, w)
    got = torch.ops.gmm_allreduce._avx2_int8_mm(x, w)
    torch.testing.assert_close(got, (x.long() @ w.long()).int(), atol=0, rtol=0)
    torch.testing.assert_close(torch.ops.gmm_allreduce._avx2_int8_packed_mm(x, w), got, atol=0,
                               rtol=0)
    # A padded x (rows apart by more than k) and a padded weight.
    xp = torch.zeros(rows, k + 5, dtype=torch.int8)[:, :k].copy_(x)
    if layout == "kn":
        wp = torch.zeros(k, n + 3, dtype=torch.int8)[:, :n].copy_(w)
    else:
        wp = torch.zeros(n, k + 3, dtype=torch.int8)[:, :k].copy_(w.t()).t()
    torch.testing.assert_close(torch.ops.gmm_allreduce._avx2_int8_mm(xp, wp), got, atol=0, rtol=0)
    torch.testing.assert_close(torch.ops.gmm_allreduce._avx2_int8_packed_mm(xp, wp), got, atol=0,
                               rtol=0)


@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_weight_only_takes_the_tier_s_kernel(tier, rows, dtype, layout):
    x64, w64, x, w = _draw(rows, 96, 48, dtype, layout, seed=rows)
    wq = torch.round(w64 * 20).clamp(-127, 127)
    ref = x.double() @ wq / 20
    w8 = wq.to(torch.int8) if layout == "kn" else wq.t().contiguous().to(torch.int8).t()
    scale = torch.full((48,), 1 / 20)

    def call():
        (y,) = gmm_allreduce.grouped_mat_mul([x], [w8], split_item=0, antiquant_scale=[scale])
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(y.double(), ref, atol=atol * 4, rtol=rtol)

    got = taken(call)
    if rows > 32:
        expect = "weight_amx" if at_least(tier, "amx") and dtype == torch.bfloat16 else "weight_dequant"
    elif at_least(tier, "amx") and dtype == torch.bfloat16 and rows >= 5:
        expect = "weight_amx"
    elif at_least(tier, "avx512_bf16") and dtype == torch.bfloat16 and layout == "nk":
        expect = "weight_bf16_dot"
    else:
        expect = "weight_avx512" if at_least(tier, "avx512") else "weight_avx2"
    assert got == {expect}


def test_fp8_is_an_fp32_product(tier):
    g = torch.Generator().manual_seed(3)
    xq = torch.randint(-8, 9, (12, 32), generator=g).to(torch.float8_e4m3fn)
    wq = torch.randint(-8, 9, (32, 16), generator=g).to(torch.float8_e4m3fn)

    def call():
        (y,) = gmm_allreduce.grouped_mat_mul([xq], [wq], split_item=3, group_list=[12],
                                             scale=[torch.ones(16)], per_token_scale=torch.ones(12),
                                             output_dtype=torch.float32)
        torch.testing.assert_close(y.double(), xq.double() @ wq.double(), atol=0, rtol=0)

    assert taken(call) == {"fp8_float"}


# ---- every tier's products against the float64 reference ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_products_match_the_reference(tier, dtype, layout):
    shapes = [(1, 8, 8), (33, 70, 19), (128, 256, 160), (600, 64, 40)]
    xs, ws, refs = [], [], []
    for i, (m, k, n) in enumerate(shapes):
        x64, w64, x, w = _draw(m, k, n, dtype, layout, seed=i)
        xs.append(x)
        ws.append(w)
        refs.append(x.double() @ w.double())
    bias = [torch.randn(n, dtype=torch.float64).to(dtype if dtype != torch.bfloat16 else torch.float32)
            for _, _, n in shapes]
    got = gmm_allreduce.grouped_mat_mul(xs, ws, bias=bias, split_item=0)
    atol, rtol = TOLERANCE[dtype]
    for y, ref, b in zip(got, refs, bias):
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref + b.double(), atol=atol * 2, rtol=rtol)


def test_reduce_dtype_float32_through_the_collective(tier, world1):
    _, _, x, w = _draw(40, 64, 24, torch.bfloat16, "nk")
    (y,) = gmm_allreduce.grouped_mat_mul_all_reduce([x], [w], world1, split_item=0,
                                                    reduce_dtype=torch.float32)
    atol, rtol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(y.double(), x.double() @ w.double(), atol=atol, rtol=rtol)


# ---- the switch itself ----

@pytest.mark.parametrize("value", ["sse4", "avx", "avx-512", "AVX2,amx", "1"])
def test_a_bad_gmm_cpu_isa_is_a_value_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("GMM_CPU_ISA", value)
    with pytest.raises(ValueError, match="GMM_CPU_ISA: expected avx2, avx512, avx512_bf16 or amx"):
        gmm_allreduce.cpu_capabilities()
    _, _, x, w = _draw(4, 8, 8, torch.bfloat16, "kn")
    with pytest.raises(ValueError, match="GMM_CPU_ISA"):
        gmm_allreduce.grouped_mat_mul([x], [w], split_item=0)


@pytest.mark.parametrize("value", ["", "  ", " AVX2 ", "Avx512_BF16"])
def test_case_and_spaces_are_ignored_and_empty_is_no_cap(monkeypatch, value):
    monkeypatch.setenv("GMM_CPU_ISA", value)
    tier = gmm_allreduce.cpu_capabilities()["tier"]
    want = value.strip().lower() or HOST
    assert tier == (want if want in HERE else HOST)


def test_the_emulation_environment_names_every_library():
    env = emulation_env("avx2")
    assert env["GMM_CPU_ISA"] == "avx2"
    assert {"ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"} <= set(env)
    with pytest.raises(ValueError, match="tier"):
        emulation_env("sse")
