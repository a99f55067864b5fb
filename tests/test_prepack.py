"""prepack_weights: what each tier packs, the same bits with and without the packs (through every
op), the packed kernel taken, the packs' lifetime (held by the returned object only), and the
errors of a call that would record gradients or read a weight changed since packing."""

import gc

import pytest
import torch
from cpu_tiers import VNNI, at_least, taken

import gmm_allreduce
from gmm_allreduce import PackedWeights, prepack_weights


def _w8a8(rows=(5, 40), k=100, n=72, layout="nk", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (sum(rows), k), generator=g, dtype=torch.int8)
    w = [torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t() for _ in rows]
    if layout == "kn":
        w = [t.contiguous() for t in w]
    kw = {"scale": [torch.rand(n, generator=g) + 0.5 for _ in rows],
          "per_token_scale": torch.rand(sum(rows), generator=g) + 0.5,
          "group_list": list(rows), "group_list_type": 1, "split_item": 3,
          "output_dtype": torch.float32}
    return x, w, kw


def _packs_here(tier) -> bool:
    return not at_least(tier, "amx") and not (at_least(tier, "avx512") and VNNI)


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_int8_weights_are_packed_where_the_avx2_kernel_runs(tier, layout):
    x, w, kw = _w8a8(layout=layout)
    plain = gmm_allreduce.grouped_mat_mul([x], w, **kw)[0]
    packed = prepack_weights(w)
    assert isinstance(packed, PackedWeights) and list(packed) == w
    assert packed.packed == [_packs_here(tier)] * len(w)
    got = taken(lambda: torch.testing.assert_close(
        gmm_allreduce.grouped_mat_mul([x], packed, **kw)[0], plain, atol=0, rtol=0))
    if _packs_here(tier):
        assert got == {"int8_avx2_packed"}


def test_float_weights_are_never_packed(tier):
    w = [torch.randn(64, 32).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    assert prepack_weights(w).packed == [False, False, False]


def test_every_op_takes_the_packs_with_the_same_bits(tier, world1):
    x, w, kw = _w8a8(rows=(24, 24))
    packed = prepack_weights(w)
    index = torch.arange(48) % 12
    combine = {"combine_index": index, "num_tokens": 12}
    for call in (
        lambda w: gmm_allreduce.grouped_mat_mul_all_reduce([x], w, world1, **kw),
        lambda w: gmm_allreduce.grouped_mat_mul_reduce_scatter([x], w, world1, **kw),
        lambda w: gmm_allreduce.npu_grouped_mat_mul_all_reduce([x], w, world1, **kw, **combine),
    ):
        torch.testing.assert_close(call(packed), call(w), atol=0, rtol=0)


def test_the_engine_holds_the_packs_weakly(tier):
    if not _packs_here(tier):
        pytest.skip("nothing is packed at this tier")
    x, w, kw = _w8a8(rows=(40,))
    packed = prepack_weights(w)
    assert taken(lambda: gmm_allreduce.grouped_mat_mul([x], w, **kw)) == {"int8_avx2_packed"}
    del packed
    gc.collect()
    assert taken(lambda: gmm_allreduce.grouped_mat_mul([x], w, **kw)) == {"int8_avx2"}


def test_a_weight_changed_in_place_is_an_error_and_its_pack_is_not_read(tier):
    x, w, kw = _w8a8(rows=(40,))
    packed = prepack_weights(w)
    w[0].neg_()
    with pytest.raises(RuntimeError, match=r"weight\[0\]: changed in place since prepack_weights"):
        gmm_allreduce.grouped_mat_mul([x], packed, **kw)
    # The plain list reads the changed weight, not its stale pack.
    got = taken(lambda: gmm_allreduce.grouped_mat_mul([x], w, **kw)[0])
    assert "int8_avx2_packed" not in got
    expected = (x.double() @ w[0].double()) * kw["per_token_scale"][:, None] * kw["scale"][0]
    torch.testing.assert_close(gmm_allreduce.grouped_mat_mul([x], w, **kw)[0].double(), expected,
                               rtol=1e-5, atol=1e-3)


def test_weights_that_record_gradients_are_an_error():
    w = [torch.randn(32, 16, requires_grad=True)]
    x = [torch.randn(4, 32)]
    packed = prepack_weights(w)
    with pytest.raises(RuntimeError, match="weight: prepacked weights serve inference only"):
        gmm_allreduce.grouped_mat_mul(x, packed)
    with torch.no_grad():
        torch.testing.assert_close(gmm_allreduce.grouped_mat_mul(x, packed)[0], x[0] @ w[0])
    with torch.inference_mode():
        torch.testing.assert_close(gmm_allreduce.grouped_mat_mul(x, packed)[0], x[0] @ w[0])


def test_inference_tensors_are_packed_too(tier):
    with torch.inference_mode():
        x, w, kw = _w8a8(rows=(40,))
        plain = gmm_allreduce.grouped_mat_mul([x], w, **kw)[0]
        packed = prepack_weights(w)
        torch.testing.assert_close(gmm_allreduce.grouped_mat_mul([x], packed, **kw)[0], plain,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("weight, message", [
    (torch.zeros(2, 3), "weight: expected a list of tensors, got Tensor"),
    (5, "weight: expected a list of tensors, got int"),
    ([torch.zeros(2, 3), "w"], r"weight\[1\]: expected a tensor, got str"),
])
def test_bad_weights_are_type_errors(weight, message):
    with pytest.raises(TypeError, match=message):
        prepack_weights(weight)


def test_torch_compile_takes_the_packs(tier):
    x, w, kw = _w8a8(rows=(24, 24))
    packed = prepack_weights(w)

    def f(x):
        return gmm_allreduce.grouped_mat_mul([x], packed, **kw)[0]

    with torch.no_grad():
        expected = f(x)
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        got = taken(lambda: torch.testing.assert_close(compiled(x), expected, atol=0, rtol=0))
    if _packs_here(tier):
        assert got == {"int8_avx2_packed"}
