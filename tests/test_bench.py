"""The benchmark CLI runs end to end on a small scenario: a row per method and comm_turn."""

import csv
import subprocess
import sys

import pytest
import torch


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


def test_bench_at_a_lower_tier_in_bf16_and_the_nk_layout(tmp_path):
    import gmm_allreduce

    if gmm_allreduce.cpu_capabilities()["host"] == "baseline":
        pytest.skip("no AVX2 on this CPU")
    out = _bench(tmp_path, "--world-size", "1", "--cpu-isa", "avx2", "--dtype", "bfloat16",
                 "--weight-layout", "nk", "--methods", "fused", "fp32")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["method"] for r in rows] == ["fp32", "fused", "fused"]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    assert all(r["cpu_tier"].startswith("avx2 (host ") for r in rows)
    assert {r["weight_layout"] for r in rows} == {"nk"}
    assert float(rows[1]["vs_fp32"]) > 0 and rows[0]["vs_fp32"] == ""
    assert "tier           avx2" in out.stdout


def _small_mlp():
    import dataclasses

    from gmm_allreduce.bench.mlp import routing
    from gmm_allreduce.bench.scenarios import load

    case = next(c for c in load()["cpu"] if c.mlp)
    index, _ = routing(40, 2, 4, 0)
    m = tuple(torch.bincount(index.reshape(-1), minlength=4).tolist())
    return dataclasses.replace(case, m=m, k=(64,) * 4, n=(32,) * 4, tokens=40, top_k=2)


def _mlp_methods(methods):
    import torch.distributed as dist

    from gmm_allreduce.bench.mlp import make_mlp_methods

    return sorted(make_mlp_methods(_small_mlp(), methods, dist.get_world_size()))


def test_the_mlp_scenario_checks_its_methods(world1, pools):
    """An MLP scenario's methods on a small MLP: the block op, the composed op, fp32 and the
    PyTorch loop, each checked against the float64 reference (vLLM only where it is installed:
    make bench-peers); at world size 2 each rank's I-slice, the outputs summed."""
    methods = ["block", "fused", "fp32", "torch_loop"]
    assert _mlp_methods(methods) == ["block", "fp32", "fused@0", "torch_loop"]
    assert pools(2).run(_mlp_methods, methods) == [["block", "fp32", "fused@0", "torch_loop"]] * 2


def _ep_methods(kind: str):
    import dataclasses

    import torch.distributed as dist

    from gmm_allreduce.bench.ep import EP, make_ep_methods
    from gmm_allreduce.bench.scenarios import load

    case = next(c for c in load()["cpu"] if c.ep == kind)
    case = dataclasses.replace(case, m=(20,) * 4, k=(64,) * 4, n=(32,) * 4, tokens=40, top_k=2)
    return sorted(make_ep_methods(case, list(EP), dist.get_world_size()))


@pytest.mark.parametrize("kind", ["mlp", "down"])
def test_the_expert_parallel_scenarios_check_their_methods(pools, kind):
    """The expert-parallel scenarios' methods on small shapes at world size 2: the fused ops
    through shared memory and through gloo and the all_to_all_single composition, each checked
    against the float64 reference when made."""
    assert pools(2).run(_ep_methods, kind) == [["composed", "ep", "ep_gloo"]] * 2
