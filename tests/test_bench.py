"""The benchmark CLI runs end to end on a small scenario: a row per method and comm_turn."""

import csv
import subprocess
import sys

import pytest


def _bench(tmp_path, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "gmm_allreduce.bench", "--scenarios", "seed_example", "--runs", "3",
         "--warmup", "1", "--comm-turns", "0", "2", "--csv", str(tmp_path / "r.csv"), *extra],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_bench_csv_rows(tmp_path):
    out = _bench(tmp_path, "--markdown")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    # seed_example is split_item 0: no grouped_mm composition
    assert [(r["method"], r["comm_turn"]) for r in rows] == [
        ("fused", "0"), ("fused", "2"), ("unfused", ""), ("flat_loop", ""), ("compute", ""),
        ("comm", ""), ("comm_op", "")]
    assert all(float(r["ms"]) > 0 and float(r["host_us"]) > 0 for r in rows)
    assert float(rows[0]["time_vs_turn0"]) == 1.0
    assert float(rows[0]["vs_best"]) > 0 and rows[2]["vs_best"] == ""
    assert float(rows[-1]["vs_best"]) > 0  # comm_op against comm
    assert "| seed_example | fused | 2 |" in out.stdout


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    _bench(tmp_path, "--plot", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_scenario():
    out = subprocess.run([sys.executable, "-m", "gmm_allreduce.bench", "--scenarios", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--scenarios: unknown ['nope']" in out.stderr


def test_csv_of_other_columns_is_kept_aside(tmp_path):
    from gmm_allreduce.bench import report

    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    row = {f: 1 for f in report.FIELDS}
    report.write_csv(path, [row], {"date": "d"})
    report.write_csv(path, [row], {"date": "d"})
    assert (tmp_path / "r.1.csv").read_text() == "a,b\n1,2\n"
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["date", *report.FIELDS] and len(rows) == 2
