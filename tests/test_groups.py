"""Several process groups: tensor-parallel and data-parallel subgroups of a world of 4 used
alternately, and a group destroyed and re-created under the same name, resolved afresh."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

import gmm_allreduce
from gmm_allreduce.cases import Case, call_kwargs, check, make_inputs

CASE = Case(name="groups", split_item=3, m=(5, 0, 9, 2), k=(12,) * 4, n=(7,) * 4,
            dtype=torch.float32, bias_dtype=torch.float32, integers=True, comm_turn=2)


def _call_in(group, case, hcomm=None):
    """The op over `group` (or over `hcomm`, a name for it), with inputs that depend on the rank
    within the group; checked against the reference of the group's members."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    inputs = make_inputs(case, rank, size)
    outputs = gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"],
                                                       hcomm or group, **call_kwargs(case, inputs))
    check(case, outputs, size)
    return outputs


def alternate_groups(rounds):
    """On each of 4 ranks: TP groups {0,1},{2,3}, DP groups {0,2},{1,3} and the world, called in
    turn; each group's data differs (its seed)."""
    rank = dist.get_rank()
    tp, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    dp, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    for i in range(rounds):
        _call_in(tp, dataclasses.replace(CASE, seed=10 + rank // 2, check_ranks=i % 2 == 0))
        _call_in(dp, dataclasses.replace(CASE, seed=20 + rank % 2, split_item=1, n=(7, 3, 5, 1)))
        _call_in(dist.group.WORLD, dataclasses.replace(CASE, seed=30, comm_turn=0))
    return rounds


def test_two_process_groups_alternately(pools):
    assert pools(4).run(alternate_groups, 10) == [10] * 4


def destroy_and_recreate():
    """On each of 4 ranks: its TP pair's group is used by name, destroyed (the name then
    resolves to nothing), and a new group is registered under the old name, as c10d's group
    registry allows; the op must use the new group.

    (Re-creating a group through new_group under the same name, as use_local_synchronization's
    rank-hashed names do, is flaky in PyTorch itself with gloo: its rendezvous may read the
    destroyed group's addresses from the store, and new_group hangs. So the new group is made
    under a fresh name and registered under the old one.)"""
    from torch._C._distributed_c10d import _register_process_group

    group, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    name = group.group_name
    _call_in(group, CASE, hcomm=name)
    dist.destroy_process_group(group)
    try:
        gmm_allreduce.grouped_mat_mul_all_reduce([torch.ones(2, 2)], [torch.ones(2, 2)], name)
        after_destroy = "returned"
    except ValueError as e:
        after_destroy = str(e)
    again, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    _register_process_group(name, again)
    _call_in(again, dataclasses.replace(CASE, seed=5), hcomm=name)
    return name, after_destroy


def test_group_recreated_by_name_is_resolved_afresh(pools):
    for name, after_destroy in pools(4).run(destroy_and_recreate, timeout=60):
        assert after_destroy.startswith(f'hcomm: no process group is registered under the name "{name}"')


@pytest.mark.parametrize("form", ["name", "object"])
def test_group_given_by_name_or_object(pools, form):
    assert pools(2).run(_by_name_or_object, form) == [True, True]


def _by_name_or_object(form):
    group = dist.new_group([0, 1])
    _call_in(group, CASE, hcomm=group.group_name if form == "name" else None)
    return True
