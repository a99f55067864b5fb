"""Two gloo ranks whose calls all-reduce buffers of different sizes (rank 0: [10, 3], rank 1:
[12, 3]) without check_ranks. Each rank writes its outcome to a file of its own, if it lives to,
and the parent prints one JSON line per report (two ranks printing to one pipe could interleave);
used by test_disagree.test_size_mismatch_without_check_ranks in a fresh process."""

import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, tmpdir):
    import gmm_allreduce

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmpdir, 'rv')}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=5))
    rows = 10 if rank == 0 else 12
    start = time.monotonic()
    try:
        (y,) = gmm_allreduce.grouped_mat_mul_all_reduce(
            [torch.ones(rows, 4)], [torch.ones(4, 3)], group_list=[rows], split_item=3)
        report = {"outcome": "returned", "message": str(tuple(y.shape))}
    except Exception as e:  # noqa: BLE001 - the outcome is what is reported
        report = {"outcome": "raised", "message": f"{type(e).__name__}: {e}"}
    report.update(rank=rank, seconds=time.monotonic() - start)
    path = os.path.join(tmpdir, f"report{rank}.json")
    with open(path + ".part", "w") as f:  # renamed whole: an abort mid-write leaves no report
        json.dump(report, f)
    os.replace(path + ".part", path)
    os._exit(0)  # the group is broken: skip its teardown


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(rank_main, args=(d,), nprocs=2)
        except mp.ProcessExitedException as e:  # a rank aborted: reported by its absence
            print(f"a rank exited: {e}", file=sys.stderr)
        for rank in range(2):
            path = os.path.join(d, f"report{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    print(json.dumps(json.load(f)))
