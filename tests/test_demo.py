"""The main job, as a user runs it: `python -m gmm_allreduce.demo` exits 0 with every row OK."""

import subprocess
import sys


def test_demo_two_ranks():
    out = subprocess.run([sys.executable, "-m", "gmm_allreduce.demo", "--world-size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.rstrip().endswith(("OK", "FAIL"))]
    assert len(rows) == 5 and all(r.rstrip().endswith("OK") for r in rows), out.stdout
    assert "all scenarios OK" in out.stdout
