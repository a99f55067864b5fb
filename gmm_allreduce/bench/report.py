"""Summaries of the timed calls: one row per (scenario, method), printed, as CSV, as Markdown, and
as a PNG plot of the op's time against comm_turn with its two lower bounds."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from .methods import COMPOSITIONS
from .methods import GPU_ONLY as GPU_BASELINES
from .scenarios import flops


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def summarise(case, per_rank: list[dict]) -> list[dict]:
    """Rows for one scenario. A call's time is its slowest rank's. Ratios are paired: the median
    over iterations of the ratio of two calls of the same iteration, so shared-machine drift
    cancels. efficiency = max(compute, comm) / time: 1.0 is perfect overlap."""
    labels = [name for name in per_rank[0] if not name.startswith("host:")]
    slowest = {name: [max(ts) for ts in zip(*(r[name] for r in per_rank))] for name in per_rank[0]}
    median = {name: statistics.median(v) for name, v in slowest.items()}
    bound = max((median[m] for m in ("compute", "comm") if m in median), default=None)
    rows = []
    for name in labels:
        q1, med, q3 = _quartiles(slowest[name])
        row = {"scenario": case.name, "method": name.split("@")[0],
               "comm_turn": int(name.split("@")[1]) if "@" in name else "",
               "groups": case.groups, "split_item": case.split_item,
               "dtype": str(case.dtype).split(".")[-1], "gflop": flops(case) / 1e9,
               "ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
               "tflops": flops(case) / med / 1e12 if not name.startswith("comm") else "",
               "host_us": statistics.median(slowest["host:" + name]) * 1e6
               if "host:" + name in slowest else ""}
        if "unfused" in slowest and name.startswith(("fused@", *GPU_BASELINES)):
            row["speedup_vs_unfused"] = statistics.median(
                u / t for u, t in zip(slowest["unfused"], slowest[name]))
        best = [slowest[c] for c in COMPOSITIONS if c in slowest]
        if name.startswith(("fused@", "op_then_combine")) and best:  # against the best of each iteration
            row["vs_best"] = statistics.median(t / min(b) for t, *b in zip(slowest[name], *best))
        # Paired against its own baseline: the op's all-reduce against dist.all_reduce, the
        # reduce-scatter op against its composition, reduce_dtype=float32 against the default.
        base = {"comm_op": "comm", "rs": "rs_grouped_mm", "fused_fp32": "fused@0"}.get(name)
        if base in slowest:
            row["vs_best"] = statistics.median(t / c for t, c in zip(slowest[name], slowest[base]))
        op = name.startswith(("fused@", "prepacked"))
        if op and "float" in slowest:  # a quantised call over the float one
            row["vs_float"] = statistics.median(t / f for t, f in zip(slowest[name], slowest["float"]))
        if name == "block" and "fused@0" in slowest:  # the block op over the op composed
            row["vs_best"] = statistics.median(t / c for t, c in zip(slowest[name], slowest["fused@0"]))
        if name.startswith("ep") and "composed" in slowest:  # expert parallelism's fused ops
            row["vs_best"] = statistics.median(t / c for t, c in zip(slowest[name], slowest["composed"]))
        if name.startswith("block_") and "block" in slowest:  # int8 weights over the float block
            row["vs_float"] = statistics.median(t / f for t, f in zip(slowest[name], slowest["block"]))
        if name.startswith(("fused@", "block")) and "vllm" in slowest:  # over the peer (MLPs)
            row["vs_peer"] = statistics.median(t / p for t, p in zip(slowest[name], slowest["vllm"]))
        if op and "fp32" in slowest:  # over the same call in fp32
            row["vs_fp32"] = statistics.median(t / f for t, f in zip(slowest[name], slowest["fp32"]))
        if name.startswith("fused@") and "fused@0" in slowest:
            row["time_vs_turn0"] = statistics.median(
                t / t0 for t, t0 in zip(slowest[name], slowest["fused@0"]))
        if name.startswith("fused@") and bound is not None:
            row["efficiency"] = bound / med
        rows.append(row)
    return rows


FIELDS = ["scenario", "method", "comm_turn", "groups", "split_item", "dtype", "gflop", "ms",
          "q1_ms", "q3_ms", "tflops", "host_us", "speedup_vs_unfused", "vs_best", "vs_float",
          "vs_fp32", "vs_peer", "time_vs_turn0", "efficiency"]


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, float) else str(v)


def print_table(rows: list[dict]) -> None:
    print(f"{'scenario':<16} {'method':<10} {'turn':>4} {'ms':>9} {'IQR ms':>15} {'TFLOP/s':>8} "
          f"{'host us':>8} {'vs unfused':>10} {'vs best':>7} {'vs float':>8} {'vs fp32':>7} {'vs peer':>7} "
          f"{'vs turn0':>8} {'effic.':>6}")
    for r in rows:
        print(f"{r['scenario']:<16} {r['method']:<10} {r['comm_turn']!s:>4} {r['ms']:>9.3f} "
              f"{r['q1_ms']:>7.3f}-{r['q3_ms']:<7.3f} {_fmt(r['tflops'], '.4f'):>8} "
              f"{_fmt(r.get('host_us', ''), '.1f'):>8} "
              f"{_fmt(r.get('speedup_vs_unfused', ''), '.2f'):>10} "
              f"{_fmt(r.get('vs_best', ''), '.2f'):>7} "
              f"{_fmt(r.get('vs_float', ''), '.2f'):>8} "
              f"{_fmt(r.get('vs_fp32', ''), '.2f'):>7} "
              f"{_fmt(r.get('vs_peer', ''), '.2f'):>7} "
              f"{_fmt(r.get('time_vs_turn0', ''), '.3f'):>8} "
              f"{_fmt(r.get('efficiency', ''), '.2f'):>6}", flush=True)


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """Appends the rows. A file written with other columns is kept aside, renamed
    <name>.<n>.csv, and a new one started."""
    fields = [*meta, *FIELDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != fields:
            n = 1
            while (aside := path.with_suffix(f".{n}{path.suffix}")).exists():
                n += 1
            path.rename(aside)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| scenario | method | comm_turn | ms, median (IQR) | TFLOP/s | host µs | vs unfused | "
             "vs best (op / best composition; comm_op / comm; rs / rs_grouped_mm; ep / composed; "
             "fused_fp32 / fused; block / fused) | vs float (quantised op / float op) | "
             "vs fp32 (op / the call in fp32) | vs peer (op / vLLM) | time vs comm_turn=0 | efficiency |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['method']} | {r['comm_turn']} | {r['ms']:.3f} "
            f"({r['q1_ms']:.3f}-{r['q3_ms']:.3f}) | {_fmt(r['tflops'], '.4f')} | "
            f"{_fmt(r.get('host_us', ''), '.1f')} | {_fmt(r.get('speedup_vs_unfused', ''), '.2f')} | "
            f"{_fmt(r.get('vs_best', ''), '.2f')} | {_fmt(r.get('vs_float', ''), '.2f')} | "
            f"{_fmt(r.get('vs_fp32', ''), '.2f')} | {_fmt(r.get('vs_peer', ''), '.2f')} | "
            f"{_fmt(r.get('time_vs_turn0', ''), '.3f')} | {_fmt(r.get('efficiency', ''), '.2f')} |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], title: str) -> bool:
    """Time against comm_turn per scenario, with compute-only and comm-only (the lower bounds) and
    the unfused composition as lines. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.6), squeeze=False)
    for ax, name in zip(axes[0], scenarios):
        mine = [r for r in rows if r["scenario"] == name]
        fused = sorted((r for r in mine if r["method"] == "fused"), key=lambda r: r["comm_turn"])
        turns = [r["comm_turn"] for r in fused]
        ax.errorbar(range(len(turns)), [r["ms"] for r in fused],
                    yerr=[[r["ms"] - r["q1_ms"] for r in fused], [r["q3_ms"] - r["ms"] for r in fused]],
                    marker="o", capsize=3, label="fused op")
        styles = {"unfused": ("tab:red", "-."), "compute": ("tab:green", "--"), "comm": ("tab:purple", ":")}
        for method, (color, style) in styles.items():
            for r in mine:
                if r["method"] == method:
                    ax.axhline(r["ms"], color=color, linestyle=style, label=f"{method} only"
                               if method != "unfused" else "unfused")
        ax.set_xticks(range(len(turns)), [str(t) for t in turns])
        ax.set_xlabel("comm_turn")
        ax.set_ylabel("ms per call (median, IQR)")
        ax.set_title(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
