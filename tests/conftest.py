import os
import tempfile
from datetime import timedelta

import pytest
import testing_ops  # noqa: F401  (the test-only ops)
import torch
import torch.distributed as dist
from cpu_tiers import HERE
from dist_utils import close_pools, get_pool


@pytest.fixture(scope="session")
def world1():
    """A world-size-1 gloo default group in the pytest process itself, for fast in-process tests."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=0,
                                world_size=1, timeout=timedelta(seconds=60))
        yield dist.group.WORLD
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def pools():
    """get_pool(W): W spawned gloo ranks, started once per world size and kept for the session."""
    yield get_pool
    close_pools()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(params=HERE or [pytest.param(None, marks=pytest.mark.skip("no AVX2 on this CPU"))])
def tier(request, monkeypatch):
    """Each CPU tier this host supports, in turn, as the GMM_CPU_ISA cap."""
    monkeypatch.setenv("GMM_CPU_ISA", request.param)
    return request.param
