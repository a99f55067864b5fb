"""The main job, as a user runs it: `python -m gmm_allreduce.demo` exits 0 with every row OK."""

import subprocess
import sys

from gmm_allreduce.demo import SCENARIOS


def test_demo_two_ranks():
    out = subprocess.run([sys.executable, "-m", "gmm_allreduce.demo", "--world-size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for case in SCENARIOS:
        row = [line for line in lines if line.startswith(case.name + " ")]
        assert len(row) == 1 and row[0].rstrip().endswith(" OK"), out.stdout
    assert lines[-1] == "all scenarios OK"
