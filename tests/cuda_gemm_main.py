"""The CUDA cases of test_cuda in a process of their own, at world size 1 over gloo, against the
float64 reference; a profile of each call checks that the GEMM the engine's rule names for it
(GMM_CUDA_GEMM, read once per process, may force one) is the one that ran. Prints "ok" and a JSON
count of the GEMMs that ran; any mismatch raises.

    python tests/cuda_gemm_main.py            every case of test_cuda's strategy list (used by
                                              test_cuda.test_every_strategy_matches_reference)
    python tests/cuda_gemm_main.py smoke      one case, printing the rule's choice and kernels
    python tests/cuda_gemm_main.py memcheck   a handful of small cases that reach all three GEMMs
                                              under the default rule (for compute-sanitizer)
"""

import collections
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cases(mode: str) -> list:
    from test_cuda import STRATEGY_CASES, grouped_cases, tiled_cases

    from gmm_allreduce.cases import Case

    # Few groups in fp32: the per-group loop under the default rule.
    loop = Case(name="loop-fp32", split_item=0, m=(5, 0, 7), k=(16, 8, 16), n=(8, 8, 24),
                dtype=torch.float32, bias_dtype=torch.float32, integers=True)
    if mode == "smoke":
        forced = os.environ.get("GMM_CUDA_GEMM", "auto")
        return [(grouped_cases()[0], True)] if forced == "grouped" else [(tiled_cases()[0], False)]
    if mode == "memcheck":
        tiled, grouped = tiled_cases(), grouped_cases()
        return [(loop, False), (tiled[0], False), (tiled[-1], False), (grouped[0], True),
                (grouped[7], True)]
    return STRATEGY_CASES


def main(mode: str) -> None:
    from test_cuda import GEMM_KERNELS, call, expected_gemm, kernel_names, on_cuda

    import gmm_allreduce
    from gmm_allreduce.cases import call_kwargs, check, make_inputs

    torch.cuda.set_device(0)
    ran = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=0,
                                world_size=1)
        group = dist.group.WORLD
        for case, stacked in cases(mode):
            check(case, call(case, 0, 1, group, stacked), 1)
            inputs = on_cuda(make_inputs(case, 0, 1), stacked)
            kw = call_kwargs(case, inputs)
            choice = expected_gemm(inputs["x"], inputs["weight"], kw)
            gemm = choice.split("+")[0]
            names = kernel_names(lambda kw=kw, inputs=inputs: gmm_allreduce.grouped_mat_mul_all_reduce(
                inputs["x"], inputs["weight"], group, **kw))
            if mode == "smoke":
                print(f"GMM_CUDA_GEMM={os.environ.get('GMM_CUDA_GEMM', 'auto')} {case.name}: "
                      f"rule {choice}; kernels {sorted(set(names))}")
            assert any(GEMM_KERNELS[gemm] in n for n in names), (case.name, choice, names)
            ran[gemm] += 1
        dist.destroy_process_group()
    print("ok", json.dumps(ran))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
