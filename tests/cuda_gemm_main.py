"""Runs the CUDA cases of test_cuda with one GEMM strategy forced (GMM_CUDA_GEMM, read once per
process, hence a process of its own) at world size 1 over gloo, against the float64 reference.
Prints "ok <cases>"; any mismatch raises. Used by test_cuda.test_every_strategy_matches_reference."""

import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    from test_cuda import STRATEGY_CASES, call

    from gmm_allreduce.cases import check

    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=0,
                                world_size=1)
        for case, stacked in STRATEGY_CASES:
            check(case, call(case, 0, 1, dist.group.WORLD, stacked), 1)
        dist.destroy_process_group()
    print(f"ok {len(STRATEGY_CASES)}")
