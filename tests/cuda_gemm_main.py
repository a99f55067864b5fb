"""Runs the CUDA cases of test_cuda with one GEMM strategy forced (GMM_CUDA_GEMM, read once per
process, hence a process of its own) at world size 1 over gloo, against the float64 reference, and
checks in a profile of each call that the GEMM the engine's rule names for it ran (the forced one
where it can take the call). Prints "ok" and a JSON count of the GEMMs that ran; any mismatch
raises. Used by test_cuda.test_every_strategy_matches_reference."""

import collections
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    from test_cuda import GEMM_KERNELS, STRATEGY_CASES, call, expected_gemm, kernel_names, on_cuda

    import gmm_allreduce
    from gmm_allreduce.cases import call_kwargs, check, make_inputs

    torch.cuda.set_device(0)
    ran = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=0,
                                world_size=1)
        group = dist.group.WORLD
        for case, stacked in STRATEGY_CASES:
            check(case, call(case, 0, 1, group, stacked), 1)
            inputs = on_cuda(make_inputs(case, 0, 1), stacked)
            kw = call_kwargs(case, inputs)
            gemm = expected_gemm(inputs["x"], inputs["weight"], kw).split("+")[0]
            names = kernel_names(lambda kw=kw, inputs=inputs: gmm_allreduce.grouped_mat_mul_all_reduce(
                inputs["x"], inputs["weight"], group, **kw))
            assert any(GEMM_KERNELS[gemm] in n for n in names), (case.name, gemm, names)
            ran[gemm] += 1
        dist.destroy_process_group()
    print("ok", json.dumps(ran))
