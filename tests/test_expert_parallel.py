"""Expert parallelism (all_to_all_grouped_mat_mul, grouped_mat_mul_all_to_all and Ascend's
spellings): against the float64 reference (gmm_allreduce.reference.expert_parallel) at world sizes
1, 2, 3 and 4, in every float dtype, through shared memory and through the process group, with
empty experts, ranks that send nothing, unequal counts, rounds larger than the shared-memory slot,
the shared expert and the combine at the owner; gradients against float64 autograd; bad inputs
raised on every rank before any data moves, counts that disagree between ranks, a rank killed mid
call; inputs unchanged; opcheck and torch.compile."""

import os
import re

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.reference import expert_parallel

BOUND = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def case(world: int, e: int, seed: int = 0, k: int = 8, n: int = 6, most: int = 4,
         silent: int | None = None, tokens: int = 5):
    """Every rank's inputs in float64 (each rank builds the same): counts per (sender, receiver,
    expert) with zeros, rank `silent` sending nothing, weights, and a combine per sender."""
    g = torch.Generator().manual_seed(seed)
    counts = [torch.randint(0, most + 1, (world * e,), generator=g).tolist() for _ in range(world)]
    if world * e > 1:
        for c in counts:  # one expert of the last rank gets nothing from anyone
            c[-1] = 0
    for c in counts:  # every rank but the silent one sends something
        c[0] += sum(c) == 0
    if silent is not None:
        counts[silent] = [0] * (world * e)
    xs = [torch.randn(sum(c), k, generator=g, dtype=torch.float64) for c in counts]
    ws = [torch.randn(e, k, n, generator=g, dtype=torch.float64) for _ in range(world)]
    recv = [[counts[s][r * e + i] for s in range(world) for i in range(e)] for r in range(world)]
    combine = [(torch.randint(0, tokens, (sum(c),), generator=g),
                torch.rand(sum(c), generator=g, dtype=torch.float64), tokens) for c in counts]
    return counts, recv, xs, ws, combine


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def _pair(group_shm: str | None, e: int, seeds, combine: bool, dtypes=DTYPES):
    """Both ops on this rank, in every dtype: errors against the reference."""
    from dist_utils import new_group_with_shm

    group = dist.group.WORLD if group_shm is None else new_group_with_shm(group_shm)
    r, n = dist.get_rank(), dist.get_world_size()
    errors = []
    for seed in seeds:
        counts, recv, xs, ws, comb = case(n, e, seed, silent=seed % n if seed % 2 else None)
        ys, outs = expert_parallel(xs, ws, counts, comb if combine else None)
        for dtype in dtypes:
            y, _, perm = gmm_allreduce.all_to_all_grouped_mat_mul(
                xs[r].to(dtype), ws[r].to(dtype), group, send_counts=counts[r],
                recv_counts=recv[r], return_permuted=True)
            assert y.dtype == dtype and y.shape == ys[r].shape
            idx, w, tokens = comb[r]
            kw = dict(combine_index=idx, combine_weight=w.to(dtype), num_tokens=tokens) \
                if combine else {}
            # The return's x: the dispatch's received rows times nothing, i.e. the reference's
            # permuted rows, here the permuted x itself (the products are then checked against
            # the reference of the whole trip).
            out, shared = gmm_allreduce.grouped_mat_mul_all_to_all(
                perm, ws[r].to(dtype), group, send_counts=recv[r], recv_counts=counts[r], **kw)
            assert shared is None and out.dtype == dtype and out.shape == outs[r].shape
            errors.append((str(dtype), seed, rel(y, ys[r]), rel(out, outs[r])))
    return errors


def _check(results):
    for rank_errors in results:
        for dtype, seed, e1, e2 in rank_errors:
            bound = BOUND[getattr(torch, dtype.split(".")[1])]
            assert e1 < bound and e2 < bound, (dtype, seed, e1, e2)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pair_matches_reference(pools, world):
    _check(pools(world).run(_pair, None, 2, [0, 1, 2], False))


@pytest.mark.parametrize("world", [2, 4])
def test_combine_at_the_owner(pools, world):
    _check(pools(world).run(_pair, None, 3, [3, 4], True))


@pytest.mark.parametrize("world", [2, 3])
def test_process_group_path(pools, world):
    """GMM_ALLREDUCE_SHM=0: the rows go through the backend's all-to-all (gloo here)."""
    _check(pools(world).run(_pair, "0", 2, [0, 1], True, (torch.bfloat16, torch.float32)))


def _rounds():
    """Rows larger than a 64 KiB segment's slots: many rounds, regions cut inside rows."""
    from dist_utils import new_group_with_shm

    os.environ["GMM_ALLREDUCE_SHM_BYTES"] = "64k"
    try:
        group = new_group_with_shm("1")
    finally:
        del os.environ["GMM_ALLREDUCE_SHM_BYTES"]
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, comb = case(n, 2, seed=7, k=33, most=300)
    ys, outs = expert_parallel(xs, ws, counts)
    _, combined = expert_parallel(xs, ws, counts, comb)
    y, _, perm = gmm_allreduce.all_to_all_grouped_mat_mul(
        xs[r].float(), ws[r].float(), group, send_counts=counts[r], recv_counts=recv[r],
        return_permuted=True)
    out, _ = gmm_allreduce.grouped_mat_mul_all_to_all(perm, ws[r].float(), group,
                                                      send_counts=recv[r], recv_counts=counts[r])
    # The combine taken from the slots as the rows arrive, round by round.
    idx, w, tokens = comb[r]
    summed, _ = gmm_allreduce.grouped_mat_mul_all_to_all(
        perm, ws[r].float(), group, send_counts=recv[r], recv_counts=counts[r],
        combine_index=idx, combine_weight=w.float(), num_tokens=tokens)
    return (sum(counts[r]) * 33 * 4, rel(y, ys[r]), rel(out, outs[r]),
            rel(summed, combined[r]))


def test_rounds_larger_than_the_slot(pools):
    for sent, e1, e2, e3 in pools(2).run(_rounds):
        assert sent > 64 * 1024 and e1 < 1e-5 and e2 < 1e-5 and e3 < 1e-5


def _shared_and_unchanged():
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, comb = case(n, 2, seed=5)
    g = torch.Generator().manual_seed(r)
    sx, sw = torch.randn(5, 8, generator=g), torch.randn(8, 3, generator=g)
    x, w = xs[r].float(), ws[r].float()
    idx, cw, tokens = comb[r]
    before = [t.clone() for t in (x, w, sx, sw, idx, cw)]
    y, shared, perm = gmm_allreduce.all_to_all_grouped_mat_mul(
        x, w, send_counts=counts[r], recv_counts=recv[r], shared_x=sx, shared_weight=sw)
    assert perm is None
    assert torch.allclose(shared, sx @ sw, atol=1e-5)
    out, shared2 = gmm_allreduce.grouped_mat_mul_all_to_all(
        y, torch.randn(2, 4, 6, generator=g).transpose(1, 2), send_counts=recv[r],
        recv_counts=counts[r], shared_x=sx, shared_weight=sw, combine_index=idx,
        combine_weight=cw.float(), num_tokens=tokens)
    assert torch.allclose(shared2, sx @ sw, atol=1e-5)
    assert out.shape == (tokens, 4)
    return all(torch.equal(a, b) for a, b in zip(before, (x, w, sx, sw, idx, cw)))


def test_shared_expert_and_inputs_unchanged(pools):
    assert all(pools(2).run(_shared_and_unchanged))


def _gradients(e: int):
    """Dispatch -> return with the combine, its gradients against float64 autograd of the same
    trip written with the reference's pieces (every rank computes every rank's)."""
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, comb = case(n, e, seed=11)
    g = torch.Generator().manual_seed(100 + r)
    w_out = [torch.randn(e, 6, 4, generator=torch.Generator().manual_seed(100 + s),
                         dtype=torch.float64) for s in range(n)]
    sx = torch.randn(3, 8, generator=g, dtype=torch.float64)
    sw = torch.randn(8, 4, generator=g, dtype=torch.float64)

    def trip(x, w1, w2, cw, shared_x, shared_w):
        y, shared, _ = gmm_allreduce.all_to_all_grouped_mat_mul(
            x, w1, send_counts=counts[r], recv_counts=recv[r], shared_x=shared_x,
            shared_weight=shared_w)
        out, _ = gmm_allreduce.grouped_mat_mul_all_to_all(
            torch.tanh(y), w2, send_counts=recv[r], recv_counts=counts[r],
            combine_index=comb[r][0], combine_weight=cw, num_tokens=comb[r][2])
        return out, shared

    leaves = [t.clone().requires_grad_() for t in (xs[r], ws[r], w_out[r], comb[r][1], sx, sw)]
    out, shared = trip(*leaves)
    gen = torch.Generator().manual_seed(7)
    grad_out = [torch.randn(comb[s][2], 4, generator=gen, dtype=torch.float64) for s in range(n)]
    (out * grad_out[r]).sum().add((shared * 2).sum()).backward()

    # The reference: the whole world's trip in one process, float64 autograd.
    ref = [[t.clone().requires_grad_() for t in (xs[s], ws[s], w_out[s], comb[s][1])]
           for s in range(n)]
    e_rows = [list(torch.split(ref[s][0], counts[s])) for s in range(n)]
    hidden = {}
    for q in range(n):  # rank q's experts
        for i in range(e):
            for s in range(n):
                hidden[(s, q, i)] = torch.tanh(e_rows[s][q * e + i] @ ref[q][1][i]) @ ref[q][2][i]
    loss = 0
    for s in range(n):
        rows = torch.cat([hidden[(s, q, i)] for q in range(n) for i in range(e)])
        combined = torch.zeros(comb[s][2], 4, dtype=torch.float64).index_add(
            0, comb[s][0], rows * ref[s][3].unsqueeze(1))
        loss = loss + (combined * grad_out[s]).sum()
    loss.backward()
    mine = ref[r]
    errs = [rel(leaves[j].grad, mine[j].grad) for j in range(4)]
    errs.append(rel(leaves[4].grad, 2 * sw.sum(1).expand(3, 8)))
    errs.append(rel(leaves[5].grad, 2 * sx.sum(0).unsqueeze(1).expand(8, 4)))
    return errs


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gradients(pools, world):
    for errs in pools(world).run(_gradients, 2):
        assert max(errs) < 1e-10, errs


BAD = [
    ({"x": "x"}, TypeError, "x: expected None or a tensor"),
    (lambda a: {"x": a["x"].reshape(-1)}, ValueError, "x: expected a 2-D tensor"),
    (lambda a: {"x": a["x"].int()}, TypeError, "x: expected float32"),
    (lambda a: {"weight": []}, ValueError, "weight: expected this rank's e >= 1"),
    (lambda a: {"weight": a["weight"][0]}, ValueError, "weight: expected a 3-D"),
    (lambda a: {"weight": a["weight"][:, :5]}, ValueError, r"weight\[0\]: expected 8 rows"),
    (lambda a: {"weight": a["weight"].double()}, TypeError, r"weight\[0\]: expected x's dtype"),
    (lambda a: {"weight": [a["weight"][0], a["weight"][1][:, :4]]}, ValueError,
     r"weight\[1\]: expected 6 columns"),
    (lambda a: {"send_counts": a["send_counts"][:-1]}, ValueError,
     "send_counts: expected one count per"),
    (lambda a: {"recv_counts": a["recv_counts"] + [0]}, ValueError,
     "recv_counts: expected one count per"),
    (lambda a: {"send_counts": [-1] + a["send_counts"][1:]}, ValueError,
     r"send_counts\[0\]: expected a count >= 0"),
    (lambda a: {"send_counts": [c + 1 for c in a["send_counts"]]}, ValueError,
     "send_counts: expected counts that sum to x's"),
    ({"send_counts": "1"}, TypeError, "send_counts: expected a list of ints"),
    (lambda a: {"send_counts": torch.tensor(a["send_counts"], dtype=torch.float)}, TypeError,
     "send_counts: expected a list of ints or a 1-D integer tensor"),
    (lambda a: {"send_counts": [1.5] * len(a["send_counts"])}, TypeError,
     r"send_counts\[0\]: expected an int"),
    ({"shared_x": torch.zeros(2, 8)}, ValueError, "shared_weight: expected shared_x and"),
    ({"shared_x": torch.zeros(2, 8), "shared_weight": torch.zeros(7, 3)}, ValueError,
     "shared_weight: expected 8 rows"),
    ({"shared_x": torch.zeros(2, 8), "shared_weight": torch.zeros(8, 3).half()}, TypeError,
     "shared_x, shared_weight: expected x's dtype"),
    ({"return_permuted": 1}, TypeError, "return_permuted: expected True or False"),
    ({"check_ranks": "yes"}, TypeError, "check_ranks: expected True or False"),
    ({"hcomm": "no_such_group"}, ValueError, "hcomm: no process group"),
]

BAD_RETURN = [
    (lambda a: {"combine_index": a["combine_index"][:-1]}, ValueError,
     "combine_index: expected a 1-D tensor of the"),
    (lambda a: {"combine_index": a["combine_index"].float()}, TypeError,
     "combine_index: expected int64 or int32"),
    (lambda a: {"combine_index": a["combine_index"] + 5}, ValueError,
     r"combine_index: expected values in \[0, 5\)"),
    (lambda a: {"num_tokens": None}, ValueError, "num_tokens: expected the combined output"),
    (lambda a: {"combine_weight": a["combine_weight"][1:]}, ValueError,
     "combine_weight: expected shape"),
    (lambda a: {"combine_weight": a["combine_weight"].long()}, TypeError,
     "combine_weight: expected a float dtype"),
    (lambda a: {"combine_index": None}, ValueError, "combine_weight: given without combine_index"),
]


def _bad_calls(check_ranks: bool):
    """Every bad call on every rank: each raises its error here, and a good call follows (nothing
    hangs)."""
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, comb = case(n, 2, seed=3)
    base = dict(x=xs[r].float(), weight=ws[r].float(), send_counts=counts[r],
                recv_counts=recv[r])
    seen = []
    for table, op, extra in ((BAD, gmm_allreduce.all_to_all_grouped_mat_mul, {}),
                             (BAD_RETURN, gmm_allreduce.grouped_mat_mul_all_to_all,
                              dict(send_counts=recv[r], recv_counts=counts[r],
                                   x=torch.randn(sum(recv[r]), 8),
                                   combine_index=comb[r][0][:sum(counts[r])],
                                   combine_weight=comb[r][1].float()[:sum(counts[r])],
                                   num_tokens=5))):
        for over, exc, pattern in table:
            a = {**base, **extra, "check_ranks": check_ranks}
            a.update(over(a) if callable(over) else over)
            hcomm = a.pop("hcomm", None)
            try:
                op(a.pop("x"), a.pop("weight"), hcomm, **a)
            except exc as err:
                assert re.search(pattern, str(err)), (pattern, str(err))
                seen.append(pattern)
            else:
                raise AssertionError(f"no error for {pattern}")
    y, _, _ = gmm_allreduce.all_to_all_grouped_mat_mul(**base, check_ranks=check_ranks)
    return len(seen), y.shape[0] == sum(recv[r])


@pytest.mark.parametrize("check_ranks", [False, True])
def test_bad_inputs_raise_on_every_rank(pools, check_ranks):
    for seen, ok in pools(2).run(_bad_calls, check_ranks):
        assert seen == len(BAD) + len(BAD_RETURN) and ok


def _one_rank_bad():
    """check_ranks: only rank 1's call is bad; every rank raises its error, naming it."""
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, _ = case(n, 2, seed=3)
    x = xs[r].float() if r != 1 else xs[r].float()[:, :5]
    try:
        gmm_allreduce.all_to_all_grouped_mat_mul(x, ws[r].float(), send_counts=counts[r],
                                                 recv_counts=recv[r], check_ranks=True)
    except ValueError as err:
        return str(err)
    return None


def _disagree(check_ranks: bool, shm: str):
    """Rank 0 sends one more row to expert 0 of rank 1 than rank 1 expects."""
    from dist_utils import new_group_with_shm

    group = new_group_with_shm(shm)
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, _ = case(n, 2, seed=3)
    send = list(counts[r])
    x = xs[r].float()
    if r == 0:
        send[2] += 1
        x = torch.cat([x, torch.zeros(1, 8)])
    try:
        gmm_allreduce.all_to_all_grouped_mat_mul(x, ws[r].float(), group, send_counts=send,
                                                 recv_counts=recv[r], check_ranks=check_ranks)
    except ValueError as err:
        msg = str(err)
    else:
        msg = None
    # The group stays usable: a good call after.
    y, _, _ = gmm_allreduce.all_to_all_grouped_mat_mul(
        xs[r].float(), ws[r].float(), group, send_counts=counts[r], recv_counts=recv[r])
    return msg, y.shape[0] == sum(recv[r])


def test_one_rank_bad_call_with_check_ranks(pools):
    msgs = pools(3).run(_one_rank_bad)
    assert all(m is not None and "rank 1 rejected the call" in m and "x's K" in m or
               m is not None and "rank 1 rejected" in m for m in msgs), msgs
    assert len(set(msgs)) == 1


@pytest.mark.parametrize("check_ranks,shm", [(True, "1"), (True, "0"), (False, "1")])
def test_counts_that_disagree_raise_on_every_rank(pools, check_ranks, shm):
    results = pools(3).run(_disagree, check_ranks, shm)
    msgs = [m for m, _ in results]
    assert all(ok for _, ok in results)
    assert len(set(msgs)) == 1 and msgs[0] is not None, msgs
    if check_ranks:
        assert "rank 0's send_counts[2] is" in msgs[0] and "rank 1's recv_counts[0]" in msgs[0]
    else:
        assert "rank 0 sends" in msgs[0] and "rows to rank 1" in msgs[0]


def test_a_killed_rank_fails_the_others():
    """Rank 2 of 3 dies by SIGKILL; the others, inside the all-to-all with their rows copied in,
    find it dead and raise within seconds (not at the group's 30 s timeout); nothing is left in
    /dev/shm."""
    from test_shm import run_script, segments

    ranks, left, log = run_script("a2akill", "3", "")
    assert [r["rank"] for r in ranks] == [0, 1], log
    for r in ranks:  # the first to see it names the dead rank; the other may name that one
        assert r["shared"] and r["outcome"] == "raised" and r["seconds"] < 10, r
        assert r["message"].startswith("shared-memory all-to-all: rank "), r
    assert any("rank 2 of the group" in r["message"] and "died during the all-to-all" in
               r["message"] for r in ranks), ranks
    assert left == [] and segments() == []


def _ascend(trans: bool):
    r, n = dist.get_rank(), dist.get_world_size()
    counts, recv, xs, ws, _ = case(n, 2, seed=9)
    ys, outs = expert_parallel(xs, ws, counts)
    w = ws[r].float()
    gw = w.transpose(1, 2).contiguous() if trans else w
    sx, sw = torch.randn(3, 8), torch.randn(8, 2)
    y, mm_y, perm = gmm_allreduce.npu_alltoallv_gmm(
        xs[r].float(), gw, dist.group.WORLD, n, counts[r], recv[r],
        send_counts_tensor=torch.tensor(counts[r]), mm_x=sx,
        mm_weight=sw.t().contiguous() if trans else sw, trans_gmm_weight=trans,
        trans_mm_weight=trans, permute_out_flag=True)
    back, none = gmm_allreduce.npu_gmm_alltoallv(perm, gw, dist.group.WORLD.group_name, n, recv[r],
                                                 counts[r], trans_gmm_weight=trans)
    try:
        gmm_allreduce.npu_gmm_alltoallv(perm, gw, dist.group.WORLD, n + 1, recv[r], counts[r])
    except ValueError as err:
        wrong = str(err)
    return (rel(y, ys[r]), rel(back, outs[r]), float((mm_y - sx @ sw).abs().max()), none, wrong)


@pytest.mark.parametrize("trans", [False, True])
def test_ascend_spellings(pools, trans):
    for e1, e2, e3, none, wrong in pools(2).run(_ascend, trans):
        assert e1 < 1e-5 and e2 < 1e-5 and e3 < 1e-5 and none is None
        assert "ep_world_size: expected the group's size 2, got 3" in wrong


def test_opcheck_and_compile(world1):
    counts, recv, xs, ws, comb = case(1, 3, seed=2)
    x, w = xs[0].float(), list(ws[0].float().unbind(0))
    name = world1.group_name
    torch.library.opcheck(torch.ops.gmm_allreduce.all_to_all_grouped_mat_mul,
                          (x, w, name, counts[0], recv[0], None, None, True, False))
    idx, cw, tokens = comb[0]
    torch.library.opcheck(torch.ops.gmm_allreduce.grouped_mat_mul_all_to_all,
                          (x, w, name, recv[0], counts[0], None, None, idx, cw.float(), tokens,
                           True, False))

    def trip(x, w):
        y, _, _ = gmm_allreduce.all_to_all_grouped_mat_mul(x, w, world1, send_counts=counts[0],
                                                           recv_counts=recv[0])
        return gmm_allreduce.grouped_mat_mul_all_to_all(
            y, torch.ones(3, 6, 4), world1,
            send_counts=recv[0], recv_counts=counts[0], combine_index=idx,
            combine_weight=cw.float(), num_tokens=tokens)[0]

    w3 = ws[0].float()
    eager = trip(x, w3)
    assert torch.equal(torch.compile(trip, fullgraph=True)(x, w3), eager)


def test_one_rank_through_the_backend(world1):
    """At world size 1 the rows stay put, unless the tests ask the collectives to run: then gloo's
    all-to-all and the sink path carry them, with the same results."""
    counts, recv, xs, ws, comb = case(1, 3, seed=4)
    ys, outs = expert_parallel(xs, ws, counts, comb)
    idx, w, tokens = comb[0]
    got = []
    for through_backend in (False, True):
        torch.ops.gmm_allreduce._collectives_at_world_size_1(through_backend)
        try:
            y, _, perm = gmm_allreduce.all_to_all_grouped_mat_mul(
                xs[0], ws[0], world1, send_counts=counts[0], recv_counts=recv[0],
                return_permuted=True)
            out, _ = gmm_allreduce.grouped_mat_mul_all_to_all(
                perm, ws[0], world1, send_counts=recv[0], recv_counts=counts[0],
                combine_index=idx, combine_weight=w, num_tokens=tokens)
        finally:
            torch.ops.gmm_allreduce._collectives_at_world_size_1(False)
        assert rel(y, ys[0]) < 1e-12 and rel(out, outs[0]) < 1e-12
        got.append(out)
    assert torch.equal(got[0], got[1])
