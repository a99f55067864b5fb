"""The benchmark scenarios (shapes.json beside this file, shapes per rank) as test cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..cases import Case

SHAPES = Path(__file__).resolve().parent / "shapes.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def rows_per_group(total: int, groups: int, skew: float, seed: int, align: int = 16) -> list[int]:
    """Row counts drawn once from the seed: weights exp(skew * N(0,1)), counts in multiples of
    `align` by largest remainder, summing to total (any remainder below `align` goes last)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(skew * torch.randn(groups, generator=gen, dtype=torch.float64))
    units = total // align
    share = (weights / weights.sum() * units).tolist()
    counts = [math.floor(s) for s in share]
    by_remainder = sorted(range(groups), key=lambda i: share[i] - counts[i], reverse=True)
    for i in by_remainder[: units - sum(counts)]:
        counts[i] += 1
    rows = [c * align for c in counts]
    rows[-1] += total - sum(rows)
    return rows


def scenario_case(s: dict) -> Case:
    g = s["groups"]

    def per_group(v):
        return tuple(v) if isinstance(v, list) else (v,) * g

    if s.get("mlp") or s.get("ep"):  # the rows each expert gets from the router's top-k
        from .mlp import routing

        index, _ = routing(s["tokens"], s["top_k"], g, s["seed"])
        m = tuple(torch.bincount(index.reshape(-1), minlength=g).tolist())
    else:
        m = per_group(s["M"]) if isinstance(s["M"], list) else tuple(
            rows_per_group(s["M"], g, s["skew"], s["seed"]))
    # An MoE layer's down-projection: M = tokens * top_k expert rows, combined into token rows.
    combine = {"tokens": s["tokens"], "top_k": s["top_k"]} if "tokens" in s else {}
    return Case(name=s["name"], split_item=s["split_item"], m=m, k=per_group(s["K"]),
                n=per_group(s["N"]), dtype=DTYPES[s["dtype"]], seed=s["seed"],
                quant=s.get("quant"), mlp=bool(s.get("mlp")), ep=s.get("ep"), **combine)


def load(path: Path = SHAPES) -> dict[str, list[Case]]:
    """{"cpu": [...], "gpu": [...]}: every scenario of the file, by the device it is meant for."""
    data = json.loads(Path(path).read_text())
    return {kind: [scenario_case(s) for s in data[kind]] for kind in ("cpu", "gpu")}


def flops(case: Case) -> float:
    one = sum(2.0 * m * k * n for m, k, n in zip(case.m, case.k, case.n))
    # An MLP: gate_up (2N columns) and down; expert parallelism's "down": N is the expert's input.
    return 3 * one if case.mlp or case.ep == "mlp" else one
