"""The expert block (grouped_mlp_all_reduce, grouped_mlp_reduce_scatter, grouped_mlp): against the
float64 reference (gmm_allreduce.reference.expert_block, summed over the ranks' I-slices) at world
sizes 1, 2 and 4, in every float dtype and activation, both collective ops and the comm-free op,
comm_turn, async_op, empty experts, tokens with no expert, k = 1 and 8; every input's gradient
against float64 autograd; errors naming the argument before any communication; inputs unchanged;
the same bytes every call; every CPU tier; opcheck and torch.compile."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.reference import _GATES, expert_block

# Relative (norm) error bounds of the block's output, by dtype: the 16-bit ones round the inputs,
# the activations (where the GEMMs run natively) and the output.
BOUND = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Block:
    name: str
    tokens: int = 16
    top_k: int = 2
    experts: int = 4
    hidden: int = 12
    inter: int = 6  # a rank's I
    out: int = 12
    dtype: torch.dtype = torch.float32
    activation: str = "silu"
    biases: bool = True
    shared: bool = True
    none_ids: bool = True  # some (token, slot) with id -1
    empty_expert: bool = True  # the last expert gets no row
    seed: int = 0
    w13_scale: float = 1.0  # larger: gate_up products past swigluoai's clamps


SHAPES = [Block("small"), Block("k1", top_k=1, biases=False, shared=False),
          Block("k8", top_k=8, experts=9, none_ids=False, empty_expert=False),
          Block("one_token", tokens=4, top_k=3, experts=5, hidden=5, inter=3, out=7),
          Block("wide", tokens=32, experts=8, hidden=40, inter=24, out=16, shared=False)]


def inputs(b: Block, rank: int) -> dict:
    """Rank `rank`'s inputs in float64: the routing and hidden_states shared by every rank, its own
    I-slice of the weights and biases (and its own shared-expert partial)."""
    g = torch.Generator().manual_seed(b.seed)
    hidden = torch.randn(b.tokens, b.hidden, generator=g, dtype=torch.float64)
    live = b.experts - 1 if b.empty_expert else b.experts
    ids = torch.stack([torch.randperm(live, generator=g)[:b.top_k] for _ in range(b.tokens)])
    if b.none_ids:
        ids[torch.rand(ids.shape, generator=g) < 0.2] = -1
        ids[0] = -1  # a token with no expert at all
    weights = torch.rand(b.tokens, b.top_k, generator=g, dtype=torch.float64)
    g.manual_seed(b.seed * 1000 + rank + 1)
    e, h, i, n = b.experts, b.hidden, b.inter, b.out
    return dict(hidden_states=hidden, topk_ids=ids, topk_weights=weights,
                w13=torch.randn(e, h, 2 * i, generator=g, dtype=torch.float64) * b.w13_scale / h ** 0.5,
                w2=torch.randn(e, i, n, generator=g, dtype=torch.float64) / i ** 0.5,
                w13_bias=torch.randn(e, 2 * i, generator=g, dtype=torch.float64) if b.biases else None,
                w2_bias=torch.randn(e, n, generator=g, dtype=torch.float64) if b.biases else None,
                shared_input=torch.randn(b.tokens, n, generator=g, dtype=torch.float64) if b.shared else None)


def cast(a: dict, dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
            and k != "topk_weights" else v for k, v in a.items()} | {
        "topk_weights": a["topk_weights"].float() if dtype != torch.float64 else a["topk_weights"]}


def want(b: Block, world: int) -> torch.Tensor:
    w2_bias = inputs(b, 0)["w2_bias"]  # one parameter, replicated: the same on every rank
    total = 0
    for r in range(world):
        a = inputs(b, r)
        a["w2_bias"] = w2_bias
        total = total + expert_block(a["hidden_states"], a["w13"], a["w2"], a["topk_ids"],
                                     a["topk_weights"], b.activation, a["w13_bias"], w2_bias,
                                     a["shared_input"], world)
    return total


def call(b: Block, op: str, extra: dict | None = None) -> torch.Tensor:
    """On every rank: the op on this rank's inputs, checked unchanged afterwards."""
    rank = dist.get_rank()
    a = cast(inputs(b, rank), b.dtype)
    a["w2_bias"] = cast(inputs(b, 0), b.dtype)["w2_bias"]
    before = {k: v.clone() for k, v in a.items() if v is not None}
    kw = dict(topk_ids=a["topk_ids"], topk_weights=a["topk_weights"], activation=b.activation,
              w13_bias=a["w13_bias"], w2_bias=a["w2_bias"], shared_input=a["shared_input"],
              **(extra or {}))
    fn = {"all_reduce": gmm_allreduce.grouped_mlp_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mlp_reduce_scatter}[op]
    # w13 and w2 as [E, 2I, H] / [E, N, I] transposed views on odd seeds (vLLM's layout).
    w13, w2 = a["w13"], a["w2"]
    if b.seed % 2:
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
        w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    y = fn(a["hidden_states"], w13, w2, dist.group.WORLD, **kw)
    if (extra or {}).get("async_op"):
        (y,) = gmm_allreduce.wait([y])
    for k, v in before.items():
        assert torch.equal(v, a[k]), f"{b.name}: {k} was modified"
    return y.clone()


def check(b: Block, y: torch.Tensor, world: int, rank: int = 0, scattered: bool = False):
    ref = want(b, world)
    if scattered:
        rows = b.tokens // world
        ref = ref[rank * rows:(rank + 1) * rows]
    assert y.dtype == b.dtype and y.shape == ref.shape, (b.name, y.dtype, y.shape)
    error = float((y.double() - ref).norm() / ref.norm())
    assert error < BOUND[b.dtype] * world, f"{b.name} {b.dtype} {b.activation}: {error:.2e} off"


def blocks(dtype, activation):
    shapes = SHAPES + ([Block("clamped", w13_scale=8.0)] if activation == "swigluoai" else [])
    return [dataclasses.replace(s, dtype=dtype, activation=activation, seed=i)
            for i, s in enumerate(shapes)]


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_all_reduce_matches_reference(pools, world, dtype, activation):
    cases = blocks(dtype, activation)
    per_rank = pools(world).run(_run_all, cases, "all_reduce", {})
    for case, y in zip(cases, per_rank[0]):
        check(case, y, world)
    for other in per_rank[1:]:  # every rank the same bytes
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0], other))


@pytest.mark.parametrize("comm_turn", [0, 3], ids=lambda t: f"turn{t}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_reduce_scatter_matches_reference(pools, world, dtype, comm_turn):
    cases = [c for c in blocks(dtype, "silu") if c.tokens % world == 0]
    per_rank = pools(world).run(_run_all, cases, "reduce_scatter", {"comm_turn": comm_turn})
    for rank, outputs in enumerate(per_rank):
        for case, y in zip(cases, outputs):
            check(case, y, world, rank, scattered=True)


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"w{w}")
def test_comm_turn_async_and_reduce_dtype(pools, world):
    """comm_turn and async_op give the plain call's bytes; reduce_dtype=float32 the reference."""
    cases = blocks(torch.bfloat16, "silu")
    pool = pools(world)
    plain = pool.run(_run_all, cases, "all_reduce", {})
    for extra in ({"comm_turn": 3}, {"async_op": True}, {"comm_turn": 2, "async_op": True}):
        got = pool.run(_run_all, cases, "all_reduce", extra)
        assert all(torch.equal(a, b) for a, b in zip(plain[0], got[0])), extra
    fp32 = pool.run(_run_all, cases, "all_reduce", {"reduce_dtype": torch.float32})
    for case, y in zip(cases, fp32[0]):
        check(case, y, world)


def _run_all(cases, op, extra):
    return [call(case, op, extra) for case in cases]


def test_comm_free_op_is_one_ranks_part():
    b = Block("part", dtype=torch.float64)
    a = inputs(b, 0)
    y = gmm_allreduce.grouped_mlp(a["hidden_states"], a["w13"], a["w2"], topk_ids=a["topk_ids"],
                                  topk_weights=a["topk_weights"], w13_bias=a["w13_bias"],
                                  w2_bias=a["w2_bias"], shared_input=a["shared_input"],
                                  world_size=3)
    ref = expert_block(a["hidden_states"], a["w13"], a["w2"], a["topk_ids"], a["topk_weights"],
                       "silu", a["w13_bias"], a["w2_bias"], a["shared_input"], 3)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)


def test_lists_int32_ids_and_the_same_bytes_every_call():
    b = Block("lists", dtype=torch.bfloat16, tokens=64, hidden=32, inter=16, out=32)
    a = cast(inputs(b, 0), torch.bfloat16)
    kw = dict(topk_ids=a["topk_ids"].int(), topk_weights=a["topk_weights"])
    first = gmm_allreduce.grouped_mlp(a["hidden_states"], list(a["w13"]), list(a["w2"]), **kw)
    for _ in range(3):
        again = gmm_allreduce.grouped_mlp(a["hidden_states"], a["w13"], a["w2"], **kw)
        assert torch.equal(first, again)


def test_every_cpu_tier(tier):
    """Under each tier's cap (fp32 GEMMs of upcast operands below avx512_bf16), the reference."""
    for dtype in DTYPES:
        for case in blocks(dtype, "silu")[:3]:
            a = cast(inputs(case, 0), dtype)
            y = gmm_allreduce.grouped_mlp(a["hidden_states"], a["w13"], a["w2"],
                                          topk_ids=a["topk_ids"], topk_weights=a["topk_weights"],
                                          w13_bias=a["w13_bias"], w2_bias=a["w2_bias"],
                                          shared_input=a["shared_input"])
            check(case, y, 1)


# Gradients: every input against float64 autograd through the reference, summed over the ranks.
def grads_of(b: Block, op: str):
    rank = dist.get_rank()
    a = inputs(b, rank)
    a["w2_bias"] = inputs(b, 0)["w2_bias"]
    leaves = {k: v.clone().requires_grad_() for k, v in a.items()
              if v is not None and k != "topk_ids"}
    fn = {"all_reduce": gmm_allreduce.grouped_mlp_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mlp_reduce_scatter}[op]
    y = fn(leaves["hidden_states"], leaves["w13"], leaves["w2"], dist.group.WORLD,
           topk_ids=a["topk_ids"], topk_weights=leaves["topk_weights"], activation=b.activation,
           w13_bias=leaves.get("w13_bias"), w2_bias=leaves.get("w2_bias"),
           shared_input=leaves.get("shared_input"), comm_turn=2)
    probe = _probe(b)
    if op == "reduce_scatter":
        rows = b.tokens // dist.get_world_size()
        probe = probe[rank * rows:(rank + 1) * rows]
    (y * probe).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


def _probe(b: Block) -> torch.Tensor:
    return torch.randn(b.tokens, b.out, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


def reference_grads(b: Block, world: int) -> list[dict]:
    ranks = [inputs(b, r) for r in range(world)]
    shared = {k: ranks[0][k].clone().requires_grad_() for k in ("hidden_states", "topk_weights")}
    if b.biases:
        shared["w2_bias"] = ranks[0]["w2_bias"].clone().requires_grad_()
    own = [{k: a[k].clone().requires_grad_() for k in ("w13", "w2", "w13_bias", "shared_input")
            if a[k] is not None} for a in ranks]
    out = sum(expert_block(shared["hidden_states"], o["w13"], o["w2"], ranks[0]["topk_ids"],
                           shared["topk_weights"], b.activation, o.get("w13_bias"),
                           shared.get("w2_bias"), o.get("shared_input"), world) for o in own)
    (out * _probe(b)).sum().backward()
    return [{**{k: v.grad for k, v in shared.items()}, **{k: v.grad for k, v in o.items()}}
            for o in own]


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
@pytest.mark.parametrize("world", [1, 2, 4], ids=lambda w: f"w{w}")
def test_grads_match_reference(pools, world, op):
    shapes = [*SHAPES[:4], Block("clamped", w13_scale=8.0)]
    acts = ("silu", "gelu", "swigluoai", "gelu", "swigluoai")
    cases = [dataclasses.replace(s, dtype=torch.float64, activation=act, seed=i)
             for i, (s, act) in enumerate(zip(shapes, acts))]
    for case in cases:
        got = pools(world).run(grads_of, case, op)
        expected = reference_grads(case, world)
        for rank in range(world):
            for name, g in expected[rank].items():
                torch.testing.assert_close(got[rank][name], g, atol=1e-10, rtol=1e-10,
                                           msg=lambda m, n=name, r=rank, c=case.name: f"{c} {n} rank {r}: {m}")


def test_gradcheck_and_16bit_grads(world1):
    b = Block("gc", tokens=6, top_k=2, experts=3, hidden=4, inter=3, out=5, dtype=torch.float64)
    a = inputs(b, 0)

    def f(h, w13, w2, wt, b13, b2, sh):
        return gmm_allreduce.grouped_mlp_all_reduce(h, w13, w2, world1, topk_ids=a["topk_ids"],
                                                    topk_weights=wt, w13_bias=b13, w2_bias=b2,
                                                    shared_input=sh, activation="gelu")

    leaves = [a[k].clone().requires_grad_() for k in ("hidden_states", "w13", "w2", "topk_weights",
                                                        "w13_bias", "w2_bias", "shared_input")]
    assert torch.autograd.gradcheck(f, leaves)
    # bf16 inputs: gradients in their dtypes, near the float64 ones
    low = [t.detach().to(torch.bfloat16 if i != 3 else torch.float32).requires_grad_()
           for i, t in enumerate(leaves)]
    f(*low).float().sum().backward()
    f(*leaves).sum().backward()
    for lo, hi in zip(low, leaves):
        assert lo.grad.dtype == lo.dtype
        assert float((lo.grad.double() - hi.grad).norm() / hi.grad.norm()) < 3e-2


def test_opcheck_and_compile(world1):
    b = Block("compile")
    a = cast(inputs(b, 0), torch.float32)
    args = (a["hidden_states"], list(a["w13"]), list(a["w2"]), a["topk_ids"], a["topk_weights"],
            "silu", list(a["w13_bias"]), list(a["w2_bias"]), a["shared_input"], None, None, None,
            None, world1.group_name, 0, False, None, False)
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mlp_all_reduce, args)
    kw = dict(topk_ids=a["topk_ids"], topk_weights=a["topk_weights"], w13_bias=a["w13_bias"],
              w2_bias=a["w2_bias"], shared_input=a["shared_input"])
    compiled = torch.compile(
        lambda h, w13, w2: gmm_allreduce.grouped_mlp_all_reduce(h, w13, w2, world1, **kw),
        fullgraph=True)
    eager = gmm_allreduce.grouped_mlp_all_reduce(a["hidden_states"], a["w13"], a["w2"], world1, **kw)
    assert torch.equal(compiled(a["hidden_states"], a["w13"], a["w2"]), eager)


def _bad(over):
    b = Block("bad")
    a = cast(inputs(b, 0), torch.float32)
    kw = dict(hidden_states=a["hidden_states"], w13=a["w13"], w2=a["w2"], topk_ids=a["topk_ids"],
              topk_weights=a["topk_weights"], w13_bias=a["w13_bias"], w2_bias=a["w2_bias"],
              shared_input=a["shared_input"])
    kw.update(over(kw) if callable(over) else over)
    return kw


BAD = [
    ({"hidden_states": torch.zeros(16)}, ValueError, "hidden_states: expected a 2-D"),
    (lambda k: {"hidden_states": k["hidden_states"].int()}, TypeError, "hidden_states: expected a floating"),
    (lambda k: {"w13": k["w13"][:, :5]}, ValueError, r"w13\[0\]: expected 12 rows"),
    (lambda k: {"w13": k["w13"][:, :, :11]}, ValueError, r"w13\[0\]: expected an even"),
    (lambda k: {"w13": list(k["w13"][:3])}, ValueError, "w2: expected 3 tensors"),
    (lambda k: {"w13": [k["w13"][0], k["w13"][1][:, :10], *k["w13"][2:]]}, ValueError,
     r"w13\[1\]: expected 12 columns"),
    (lambda k: {"w13": k["w13"].double()}, TypeError, r"w13\[0\]: expected dtype Float like hidden_states, got Double"),
    (lambda k: {"w2": k["w2"][:, :4]}, ValueError, r"w2\[0\]: expected 6 rows"),
    (lambda k: {"w2": k["w2"].half()}, TypeError, r"w2\[0\]: expected dtype"),
    (lambda k: {"w2": [k["w2"][0], k["w2"][1][:, :5], *k["w2"][2:]]}, ValueError,
     r"w2\[1\]: expected 12 columns"),
    (lambda k: {"w2": k["w2"][0]}, ValueError, "w2: expected a 3-D"),
    ({"w2": "w"}, TypeError, "w2: expected a tensor or a list"),
    (lambda k: {"w13_bias": k["w13_bias"][:, :4]}, ValueError, r"w13_bias\[0\]: expected a 1-D tensor of 12"),
    (lambda k: {"w2_bias": k["w2_bias"][:2]}, ValueError, "w2_bias: expected 4 tensors"),
    (lambda k: {"w2_bias": k["w2_bias"].int()}, TypeError, r"w2_bias\[0\]: expected a floating"),
    (lambda k: {"topk_ids": k["topk_ids"].float()}, TypeError, "topk_ids: expected an int64"),
    (lambda k: {"topk_ids": k["topk_ids"][:5]}, ValueError, "topk_ids: expected a tensor .T, k. with T = 16"),
    (lambda k: {"topk_ids": k["topk_ids"].clamp(min=0) + 4}, ValueError,
     r"topk_ids\[0, 0\]: expected an expert in \[0, 4\)"),
    (lambda k: {"topk_ids": k["topk_ids"].clamp(min=-2) - 1}, ValueError, r"topk_ids\[\d+, \d\]: expected an expert"),
    (lambda k: {"topk_weights": k["topk_weights"][:, :1]}, ValueError, "topk_weights: expected the shape"),
    (lambda k: {"topk_weights": k["topk_weights"].long()}, TypeError, "topk_weights: expected a floating"),
    ({"topk_weights": [1.0]}, TypeError, "topk_weights: expected None or a tensor"),
    ({"activation": "relu"}, ValueError, "activation: expected \"silu\".*\"swigluoai\""),
    ({"activation": 1}, TypeError, "activation: expected a str"),
    (lambda k: {"shared_input": k["shared_input"][:3]}, ValueError, "shared_input: expected a tensor"),
    ({"comm_turn": -1}, ValueError, "comm_turn: expected an integer >= 0"),
    ({"comm_turn": 1.5}, TypeError, "comm_turn: expected an int"),
    ({"async_op": 1}, TypeError, "async_op: expected True or False"),
    ({"check_ranks": "yes"}, TypeError, "check_ranks: expected True or False"),
    ({"reduce_dtype": torch.float16}, ValueError, "reduce_dtype: expected None or torch.float32"),
    ({"hcomm": 3}, TypeError, "hcomm: expected a group name"),
]


@pytest.mark.parametrize("over, error, match", BAD)
def test_bad_arguments(world1, over, error, match):
    kw = _bad(over)
    hcomm = kw.pop("hcomm", world1)
    with pytest.raises(error, match=match):
        gmm_allreduce.grouped_mlp_all_reduce(kw.pop("hidden_states"), kw.pop("w13"), kw.pop("w2"),
                                             hcomm, **kw)


def test_reduce_scatter_needs_tokens_divisible(pools):
    assert pools(2).run(_raises_odd) == [True, True]


def _raises_odd():
    b = Block("odd", tokens=5)
    a = cast(inputs(b, dist.get_rank()), torch.float32)
    with pytest.raises(ValueError, match="hidden_states: the output's 5 token rows cannot be"):
        gmm_allreduce.grouped_mlp_reduce_scatter(a["hidden_states"], a["w13"], a["w2"],
                                                 topk_ids=a["topk_ids"],
                                                 topk_weights=a["topk_weights"])
    return True


# The paths a CPU-only host does not take by itself (test-only ops): the device form of the
# routing, the block composed as on a device that does not fuse it, the 16-bit few-rows kernel.
def test_the_device_routing_drops_what_the_host_routing_omits():
    ops = torch.ops.gmm_allreduce
    ids = torch.tensor([[0, 2], [-1, 1], [2, 0], [1, -1], [7, 2]])  # 7: out of range, dropped
    weights = torch.rand(5, 2)
    host_ids = ids.masked_fill(ids >= 3, -1)
    counts, slot, token, weight = ops._mlp_route(host_ids, weights, 3, False)
    d_counts, d_slot, d_token, d_weight = ops._mlp_route(ids, weights, 3, True)
    assert counts.tolist() == [2, 2, 3]
    m = int(counts.sum())
    # The same rows in the same order; the dropped ones last, in the last expert, weight 0, token T.
    assert torch.equal(slot, d_slot[:m]) and torch.equal(token, d_token[:m])
    assert torch.equal(weight, d_weight[:m])
    assert d_counts.tolist() == [2, 2, 3 + 3] and d_token[m:].tolist() == [5] * 3
    assert d_weight[m:].abs().sum() == 0


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_composed_path_matches(dtype, activation):
    for case in blocks(dtype, activation)[:4]:
        a = cast(inputs(case, 0), dtype)
        y = torch.ops.gmm_allreduce._grouped_mlp_composed(
            a["hidden_states"], list(a["w13"]), list(a["w2"]), a["topk_ids"], a["topk_weights"],
            activation, list(a["w13_bias"]) if case.biases else None,
            list(a["w2_bias"]) if case.biases else None, None, None)
        if a["shared_input"] is not None:  # the test op takes none: the reference's added here
            y = (y.double() + a["shared_input"].double()).to(dtype)
        check(case, y, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_few_rows_kernel(dtype):
    ops = torch.ops.gmm_allreduce
    import gmm_allreduce

    if gmm_allreduce.cpu_capabilities()["host"] == "baseline":
        pytest.skip("no AVX2 on this CPU")
    g = torch.Generator().manual_seed(3)
    # r 1 and 2 with a [k, n] weight: the streaming tile (2100 columns: two tiles at r 2, the
    # second's last columns short of a vector; k past 512: parts of the weight's rows summed
    # after); more rows: the register tiles.
    for r, k, n in ((1, 7, 5), (2, 35, 2100), (1, 1300, 40), (2, 1100, 2100), (3, 64, 40),
                    (8, 129, 33), (9, 16, 8), (32, 200, 17)):
        x = torch.randn(r, k, generator=g).to(dtype)
        for w in (torch.randn(k, n, generator=g).to(dtype),
                  torch.randn(n, k, generator=g).to(dtype).t()):
            assert ops._few_rows_takes(x, w)
            torch.testing.assert_close(ops._few_rows_mm(x, w), x.float() @ w.float(),
                                       atol=1e-4, rtol=1e-4)
    # the same bytes on one thread and two (the parts and tiles shared out differently)
    x, w = torch.randn(2, 1500, generator=g).to(dtype), torch.randn(1500, 300, generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ops._few_rows_mm(x, w))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert not ops._few_rows_takes(torch.randn(33, 4).to(dtype), torch.randn(4, 4).to(dtype))
    assert not ops._few_rows_takes(torch.randn(2, 4), torch.randn(4, 4))


# int8 weights (weight-only, inference): the reference on the dequantised weights, a few rows per
# expert (the decode kernels) and many (the weights dequantised once), every float dtype.
def int8_case(b: Block, rank: int):
    a = inputs(b, rank)
    q13, s13 = gmm_allreduce.quantize_weights(list(a["w13"]))
    q2, s2 = gmm_allreduce.quantize_weights(list(a["w2"]))
    a["w13"] = torch.stack([q.double() * s.double() for q, s in zip(q13, s13)])  # what it computes
    a["w2"] = torch.stack([q.double() * s.double() for q, s in zip(q2, s2)])
    return a, dict(w13=q13, w2=q2, w13_antiquant_scale=s13, w2_antiquant_scale=torch.stack(s2))


def _int8_block(b: Block, op: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    a, q = int8_case(b, rank)
    low = cast(a, b.dtype)
    fn = {"all_reduce": gmm_allreduce.grouped_mlp_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mlp_reduce_scatter}[op]
    with torch.no_grad():
        y = fn(low["hidden_states"], q["w13"], q["w2"], dist.group.WORLD,
               topk_ids=a["topk_ids"], topk_weights=low["topk_weights"], activation=b.activation,
               w13_bias=low["w13_bias"], w2_bias=cast(int8_case(b, 0)[0], b.dtype)["w2_bias"],
               shared_input=low["shared_input"], w13_antiquant_scale=q["w13_antiquant_scale"],
               w2_antiquant_scale=q["w2_antiquant_scale"], comm_turn=2)
    want = 0
    w2_bias = int8_case(b, 0)[0]["w2_bias"]
    for r in range(world):
        ar = int8_case(b, r)[0]
        want = want + expert_block(ar["hidden_states"], ar["w13"], ar["w2"], ar["topk_ids"],
                                   ar["topk_weights"], b.activation, ar["w13_bias"], w2_bias,
                                   ar["shared_input"], world)
    if op == "reduce_scatter":
        rows = b.tokens // world
        want = want[rank * rows:(rank + 1) * rows]
    return float((y.double() - want).norm() / want.norm())


INT8_BLOCKS = [Block("decode", tokens=8, top_k=4, experts=6, hidden=40, inter=24, out=40),
               Block("rows", tokens=96, top_k=2, experts=3, hidden=24, inter=16, out=20)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("world", [1, 2], ids=lambda w: f"w{w}")
def test_int8_weights(pools, world, dtype):
    for b in INT8_BLOCKS:
        for op in ("all_reduce", "reduce_scatter"):
            case = dataclasses.replace(b, dtype=dtype)
            errors = pools(world).run(_int8_block, case, op)
            assert max(errors) < BOUND[dtype] * world * 2, (case.name, op, errors)


def test_int8_weights_errors(world1):
    a, q = int8_case(Block("e"), 0)
    h = a["hidden_states"].float()
    kw = dict(topk_ids=a["topk_ids"], topk_weights=a["topk_weights"].float())
    with pytest.raises(ValueError, match="w13_antiquant_scale: required for int8 w13"):
        gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], **kw)
    with pytest.raises(ValueError, match="w2_antiquant_scale: given for float weights"):
        gmm_allreduce.grouped_mlp(h, a["w13"].float(), a["w2"].float(),
                                  w2_antiquant_scale=q["w2_antiquant_scale"], **kw)
    with pytest.raises(TypeError, match=r"w2\[0\]: expected dtype Char like w13\[0\]"):
        gmm_allreduce.grouped_mlp(h, q["w13"], a["w2"].float(), **kw,
                                  w13_antiquant_scale=q["w13_antiquant_scale"],
                                  w2_antiquant_scale=q["w2_antiquant_scale"])
    with pytest.raises(ValueError, match=r"w2_antiquant_scale\[0\]: expected a 1-D tensor of 12"):
        gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], **kw,
                                  w13_antiquant_scale=q["w13_antiquant_scale"],
                                  w2_antiquant_scale=q["w2_antiquant_scale"][:, :5])
    with pytest.raises(RuntimeError, match="int8 weights are inference-only"):
        gmm_allreduce.grouped_mlp(h.requires_grad_(), q["w13"], q["w2"], **kw,
                                  w13_antiquant_scale=q["w13_antiquant_scale"],
                                  w2_antiquant_scale=q["w2_antiquant_scale"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_weights_composed_path(dtype):
    for b in INT8_BLOCKS:
        a, q = int8_case(dataclasses.replace(b, shared=False), 0)
        low = cast(a, dtype)
        y = torch.ops.gmm_allreduce._grouped_mlp_composed(
            low["hidden_states"], q["w13"], q["w2"], a["topk_ids"], low["topk_weights"], "silu",
            list(low["w13_bias"]), list(low["w2_bias"]), q["w13_antiquant_scale"],
            list(q["w2_antiquant_scale"]))
        want = expert_block(a["hidden_states"], a["w13"], a["w2"], a["topk_ids"],
                            a["topk_weights"], "silu", a["w13_bias"], a["w2_bias"])
        assert float((y.double() - want).norm() / want.norm()) < BOUND[dtype] * 2, b.name


# W8A8 (int8 weights with w13_scale and w2_scale): hidden_states' rows and the activations
# quantised per row on the fly. The reference emulates that quantisation (the same scales and
# int8 values) and computes the rest in float64.
def _quantize_rows(t: torch.Tensor):
    s = t.float().abs().amax(1) / 127
    q = (t.float() / s.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).round().clamp(-127, 127)
    return q.double(), s.double()


def w8a8_part(a: dict, q13, s13, q2, s2, activation: str, world: int) -> torch.Tensor:
    """One rank's part, from its low-precision inputs `a` and int8 weights."""
    h, ids, weights = a["hidden_states"], a["topk_ids"], a["topk_weights"].double()
    out = torch.zeros(h.shape[0], q2[0].shape[1], dtype=torch.float64)
    for e in range(len(q13)):
        token, slot = torch.where(ids == e)
        xq, xs = _quantize_rows(h[token])
        pre = (xq @ q13[e].double()) * xs[:, None] * s13[e].double()
        if a["w13_bias"] is not None:
            pre = pre + a["w13_bias"][e].double()
        gate, up = pre.float().chunk(2, dim=-1)  # the activation in fp32, as the op's
        aq, as_ = _quantize_rows(_GATES[activation](gate, up))
        rows = (aq @ q2[e].double()) * as_[:, None] * s2[e].double()
        if a["w2_bias"] is not None:
            rows = rows + a["w2_bias"][e].double() / world
        out.index_add_(0, token, rows * weights[token, slot, None])
    return out if a["shared_input"] is None else out + a["shared_input"].double()


def _w8a8_block(b: Block, op: str):
    rank, world = dist.get_rank(), dist.get_world_size()

    def case(r):
        a = cast(inputs(b, r), b.dtype)
        a["w2_bias"] = cast(inputs(b, 0), b.dtype)["w2_bias"]  # one parameter, on every rank
        q13, s13 = gmm_allreduce.quantize_weights(list(inputs(b, r)["w13"]))
        q2, s2 = gmm_allreduce.quantize_weights(list(inputs(b, r)["w2"]))
        return a, q13, s13, q2, s2

    a, q13, s13, q2, s2 = case(rank)
    fn = {"all_reduce": gmm_allreduce.grouped_mlp_all_reduce,
          "reduce_scatter": gmm_allreduce.grouped_mlp_reduce_scatter}[op]
    with torch.no_grad():
        y = fn(a["hidden_states"], q13, q2, dist.group.WORLD, topk_ids=a["topk_ids"],
               topk_weights=a["topk_weights"], activation=b.activation, w13_bias=a["w13_bias"],
               w2_bias=a["w2_bias"], shared_input=a["shared_input"], w13_scale=s13,
               w2_scale=torch.stack(s2), comm_turn=2)
    assert y.dtype == b.dtype
    want = sum(w8a8_part(*case(r), b.activation, world) for r in range(world))
    if op == "reduce_scatter":
        rows = b.tokens // world
        want = want[rank * rows:(rank + 1) * rows]
    return float((y.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("world", [1, 2], ids=lambda w: f"w{w}")
def test_w8a8(pools, world, dtype):
    for b in INT8_BLOCKS + [Block("swiglu", activation="swigluoai", w13_scale=8.0)]:
        for op in ("all_reduce", "reduce_scatter"):
            if op == "reduce_scatter" and b.tokens % world:
                continue
            case = dataclasses.replace(b, dtype=dtype)
            errors = pools(world).run(_w8a8_block, case, op)
            # fp32: a rounding at an int8 boundary where the op's fp32 sums and the reference's
            # fp64 ones fall apart moves one value by a step; 16-bit: the output's rounding
            bound = 1e-4 if dtype == torch.float32 else BOUND[dtype] * 2
            assert max(errors) < bound, (case.name, op, errors)


def test_w8a8_against_the_float_block():
    """The quantisation's own error, against the unquantised block in float64: about 1 %."""
    b = INT8_BLOCKS[1]
    a = inputs(b, 0)
    q13, s13 = gmm_allreduce.quantize_weights(list(a["w13"].float()))
    q2, s2 = gmm_allreduce.quantize_weights(list(a["w2"].float()))
    with torch.no_grad():
        y = gmm_allreduce.grouped_mlp(a["hidden_states"].float(), q13, q2, topk_ids=a["topk_ids"],
                                      topk_weights=a["topk_weights"].float(), w13_scale=s13,
                                      w2_scale=s2)
    want = expert_block(a["hidden_states"], a["w13"], a["w2"], a["topk_ids"], a["topk_weights"])
    assert 1e-4 < float((y.double() - want).norm() / want.norm()) < 3e-2


def test_w8a8_opcheck_and_compile():
    a, q = int8_case(Block("oc"), 0)
    h, ids, w = a["hidden_states"].float(), a["topk_ids"], a["topk_weights"].float()
    s13, s2 = q["w13_antiquant_scale"], list(q["w2_antiquant_scale"])
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mlp.default,
                          (h, q["w13"], q["w2"], ids, w, "silu", None, None, None, None, None, s13,
                           s2, 1))
    kw = dict(topk_ids=ids, topk_weights=w, w13_scale=s13, w2_scale=s2)
    compiled = torch.compile(lambda h: gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], **kw),
                             fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(h), gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], **kw))


def test_w8a8_errors(world1):
    a, q = int8_case(Block("e"), 0)
    h = a["hidden_states"].float()
    s13, s2 = q["w13_antiquant_scale"], q["w2_antiquant_scale"]
    kw = dict(topk_ids=a["topk_ids"], topk_weights=a["topk_weights"].float())
    with pytest.raises(ValueError, match="w2_scale: required with the other W8A8 scale"):
        gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], w13_scale=s13, **kw)
    with pytest.raises(ValueError, match="w13_scale: given for float weights"):
        gmm_allreduce.grouped_mlp(h, a["w13"].float(), a["w2"].float(), w13_scale=s13, **kw)
    with pytest.raises(ValueError, match="w13_antiquant_scale: given with W8A8's w13_scale"):
        gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], w13_scale=s13, w2_scale=s2,
                                  w13_antiquant_scale=s13, w2_antiquant_scale=s2, **kw)
    with pytest.raises(ValueError, match=r"w2_scale\[0\]: expected a 1-D tensor of 12"):
        gmm_allreduce.grouped_mlp(h, q["w13"], q["w2"], w13_scale=s13, w2_scale=s2[:, :5], **kw)
    with pytest.raises(RuntimeError, match="int8 weights are inference-only"):
        gmm_allreduce.grouped_mlp(h.requires_grad_(), q["w13"], q["w2"], w13_scale=s13,
                                  w2_scale=s2, **kw)


def test_the_same_bytes_on_any_thread_count():
    """Blocks of rows run in parallel, their products added in a fixed order: the bytes of one
    thread on two (the block op with float and int8 weights, and a combined grouped call)."""
    b = Block("threads", tokens=256, top_k=4, experts=8, hidden=64, inter=48, out=64,
              dtype=torch.bfloat16)
    a = cast(inputs(b, 0), torch.bfloat16)
    kw = dict(topk_ids=a["topk_ids"], topk_weights=a["topk_weights"], w13_bias=a["w13_bias"],
              w2_bias=a["w2_bias"])
    x = torch.randn(300, 64).bfloat16()
    w = list(torch.randn(6, 64, 40).bfloat16())
    gkw = dict(group_list=[50, 0, 90, 60, 40, 60], group_list_type=1, split_item=3,
               combine_index=torch.randint(0, 37, (300,)), combine_weight=torch.rand(300),
               num_tokens=37)
    # int8 weights, a decode step's few rows per expert and many (the dequantised weight, one
    # per thread)
    qa, q = int8_case(dataclasses.replace(b, dtype=torch.float32), 0)
    qkw = dict(topk_ids=qa["topk_ids"], topk_weights=qa["topk_weights"].float(),
               w13_antiquant_scale=q["w13_antiquant_scale"],
               w2_antiquant_scale=q["w2_antiquant_scale"])
    few = dict(qkw, topk_ids=qa["topk_ids"][:8], topk_weights=qa["topk_weights"][:8].float())
    hq = qa["hidden_states"].float()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append((gmm_allreduce.grouped_mlp(a["hidden_states"], a["w13"], a["w2"], **kw),
                         gmm_allreduce.grouped_mat_mul([x], w, **gkw)[0],
                         gmm_allreduce.grouped_mlp(hq, q["w13"], q["w2"], **qkw),
                         gmm_allreduce.grouped_mlp(hq[:8], q["w13"], q["w2"], **few)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(one, two) for one, two in zip(*outs))


def _one_bad_rank():
    """Rank 1's topk_ids names an expert that does not exist; with check_ranks every rank raises
    its error (no rank is left waiting in the collective)."""
    b = Block("check")
    a = cast(inputs(b, dist.get_rank()), torch.float32)
    ids = a["topk_ids"].clone()
    if dist.get_rank() == 1:
        ids[2, 0] = 99
    with pytest.raises(ValueError, match=r"check_ranks: rank 1 rejected the call: topk_ids\[2, 0\]"):
        gmm_allreduce.grouped_mlp_all_reduce(a["hidden_states"], a["w13"], a["w2"],
                                             topk_ids=ids, topk_weights=a["topk_weights"],
                                             check_ranks=True)
    # the group still works: the next call agrees and sums
    y = gmm_allreduce.grouped_mlp_all_reduce(a["hidden_states"], a["w13"], a["w2"],
                                             topk_ids=a["topk_ids"], topk_weights=a["topk_weights"],
                                             check_ranks=True)
    return y


def test_check_ranks_names_a_rank_with_a_bad_block(pools):
    ys = pools(2).run(_one_bad_rank)
    assert torch.equal(ys[0], ys[1])
