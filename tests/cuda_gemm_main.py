"""The CUDA cases of test_cuda in a process of their own, at world size 1 over gloo, against the
float64 reference; a profile of each call checks that the GEMM the engine's rule names for it
(GMM_CUDA_GEMM, read once per process, may force one) is the one that ran. Prints "ok" and a JSON
count of the GEMMs that ran; any mismatch raises.

    python tests/cuda_gemm_main.py            every case of test_cuda's strategy list (used by
                                              test_cuda.test_every_strategy_matches_reference)
    python tests/cuda_gemm_main.py smoke      one case, printing the rule's choice and kernels
    python tests/cuda_gemm_main.py memcheck   a handful of small cases that reach all three GEMMs
                                              under the default rule (for compute-sanitizer)

Some cases run with reduce_dtype=torch.float32 (fp32 partials, which the tiled kernel writes
unrounded and the grouped GEMM cannot).
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
    """(case, stacked weights, reduce_dtype) triples."""
    from test_cuda import STRATEGY_CASES, grouped_cases, tiled_cases

    from gmm_allreduce.cases import Case

    # Few groups in fp32: the per-group loop under the default rule.
    loop = Case(name="loop-fp32", split_item=0, m=(5, 0, 7), k=(16, 8, 16), n=(8, 8, 24),
                dtype=torch.float32, bias_dtype=torch.float32, integers=True)
    fp32 = torch.float32
    tiled, grouped = tiled_cases(), grouped_cases()
    if mode == "smoke":
        forced = os.environ.get("GMM_CUDA_GEMM", "auto")
        return [(grouped[0], True, None)] if forced == "grouped" else [(tiled[0], False, None)]
    if mode == "memcheck":
        return [(loop, False, None), (tiled[0], False, None), (tiled[-1], False, None),
                (grouped[0], True, None), (grouped[7], True, None), (tiled[1], False, fp32),
                (grouped[0], True, fp32)]
    return [(c, stacked, None) for c, stacked in STRATEGY_CASES] + [
        (tiled[1], False, fp32), (tiled[3], False, fp32), (grouped[0], True, fp32)]


def main(mode: str) -> None:
    from test_cuda import GEMM_KERNELS, expected_gemm, kernel_names, on_cuda

    import gmm_allreduce
    from gmm_allreduce.cases import call_kwargs, check, make_inputs

    torch.cuda.set_device(0)
    ran = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rv')}", rank=0,
                                world_size=1)
        group = dist.group.WORLD
        for case, stacked, reduce_dtype in cases(mode):
            inputs = on_cuda(make_inputs(case, 0, 1), stacked)
            kw = dict(call_kwargs(case, inputs), reduce_dtype=reduce_dtype)

            def run(kw=kw, inputs=inputs):
                return gmm_allreduce.grouped_mat_mul_all_reduce(inputs["x"], inputs["weight"],
                                                                group, **kw)

            check(case, [o.cpu() for o in run()], 1)
            choice = expected_gemm(inputs["x"], inputs["weight"], kw)
            gemm = choice.split("+")[0]
            names = kernel_names(run)
            if mode == "smoke":
                print(f"GMM_CUDA_GEMM={os.environ.get('GMM_CUDA_GEMM', 'auto')} {case.name}: "
                      f"rule {choice}; kernels {sorted(set(names))}")
            assert any(GEMM_KERNELS[gemm] in n for n in names), (case.name, choice, names)
            ran[gemm] += 1
        dist.destroy_process_group()
    print("ok", json.dumps(ran))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
