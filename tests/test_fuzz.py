"""Property-based tests: random calls (group counts, shapes, split modes, dtypes, bias dtypes,
group_list forms, layouts, comm_turn, check_ranks, world sizes 1 to 4) equal the float64
reference within tolerance (exactly for small-integer inputs), are identical on every rank, and
leave the inputs unchanged.

CI runs GMM_FUZZ_EXAMPLES (300) examples from a fixed seed; `make fuzz` runs many more from a
random one (docs/testing.md has the last figures).
"""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_semantics import assert_all_ranks_identical, run_cases

from gmm_allreduce.cases import Case, check

EXAMPLES = int(os.environ.get("GMM_FUZZ_EXAMPLES", "300"))
RANDOM_SEED = os.environ.get("GMM_FUZZ_RANDOM") == "1"

# (x / weight dtype, bias dtypes it is tried with)
DTYPES = [
    (torch.float16, [torch.float16, torch.float32]),
    (torch.bfloat16, [torch.float32, torch.bfloat16]),
    (torch.float32, [torch.float32, torch.float16]),
    (torch.float64, [torch.float64]),
]


@st.composite
def lead_dims(draw, m):
    """Leading dims of a split_item=0 x whose product is m: (m,), or 2 to 4 dims."""
    dims = [m]
    for _ in range(draw(st.integers(0, 3))):
        divisors = [d for d in range(1, dims[0] + 1) if dims[0] % d == 0] or [1]
        d = draw(st.sampled_from(divisors))
        dims = [d, dims[0] // d if d else 0, *dims[1:]]
    return tuple(dims)


@st.composite
def cases(draw):
    split_item = draw(st.integers(0, 3))
    groups = draw(st.one_of(st.integers(1, 6), st.just(17)))
    dims = st.integers(0, 9)
    m = tuple(draw(dims) for _ in range(groups))
    k = (draw(st.integers(0, 16)),) * groups if split_item in (1, 3) else tuple(
        draw(st.integers(0, 16)) for _ in range(groups))
    n = (draw(st.integers(1, 12)),) * groups if split_item in (2, 3) else tuple(
        draw(st.integers(0, 12)) for _ in range(groups))
    dtype, bias_dtypes = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(lead_dims(mi)) for mi in m) if split_item == 0 else None
    return Case(
        name="fuzz",
        split_item=split_item, m=m, k=k, n=n, dtype=dtype,
        bias_dtype=draw(st.one_of(st.none(), st.sampled_from(bias_dtypes))),
        integers=draw(st.booleans()),
        group_list_form=draw(st.sampled_from(["list", "tensor", "tensor32"])),
        group_list_type=draw(st.integers(0, 1)),
        lead=lead,
        seed=draw(st.integers(0, 2**16)),
        comm_turn=draw(st.one_of(st.just(0), st.integers(1, 5))),
        check_ranks=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "strided"])),
    )


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM_SEED, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), world=st.integers(1, 4))
def test_random_calls_match_reference(pools, case, world):
    per_rank = pools(world).run(run_cases, [case])  # run_cases also checks inputs are unchanged
    check(case, per_rank[0][0], world)
    assert_all_ranks_identical([case], per_rank)
