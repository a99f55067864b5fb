"""Checks that csrc/'s includes only point down its layers, and that no files include each other in
a circle (make lint). The layers, from the bottom:

  0  util/                  switches from the environment, 16-bit floats, multiversioned loops
  1  comm/, cpu/kernels/    the collectives (and the same-host group); the CPU's own kernels
  2  core/                  arguments, plan, epilogues, consensus, collective strategies, driver
  3  cpu/, cuda/host/       the CPU engine; the CUDA engine's device-free planning
  4  cuda/                  the CUDA engine and its kernels
  5  registration.cpp, testing/

A file may include headers of its own folder or of a lower layer, never of a higher or an equal
other one. Prints the structure with --print.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")
LAYERS = {"util": 0, "comm": 1, "comm/shm": 1, "cpu/kernels": 1, "core": 2, "cpu": 3,
          "cuda/host": 3, "cuda": 4, ".": 5, "testing": 5}
INCLUDE = re.compile(r'^#include "([^"]+)"', re.M)


def folder(path: str) -> str:
    d = os.path.dirname(path) or "."
    return d


def room(path: str) -> str:
    """The layer's folder of a file (comm/shm counts as comm)."""
    d = folder(path)
    return "comm" if d == "comm/shm" else d


def includes() -> dict[str, list[str]]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith((".h", ".cpp", ".cu", ".cuh")):
                path = os.path.relpath(os.path.join(dirpath, f), ROOT)
                with open(os.path.join(ROOT, path)) as fh:
                    out[path] = INCLUDE.findall(fh.read())
    return out


def main() -> int:
    graph = includes()
    errors = []
    for path, incs in sorted(graph.items()):
        if folder(path) not in LAYERS:
            errors.append(f"{path}: its folder has no layer (tools/layers.py)")
            continue
        for inc in incs:
            if inc not in graph:
                errors.append(f"{path}: includes {inc}, which is not a path from csrc/")
                continue
            a, b = room(path), room(inc)
            if a != b and LAYERS[folder(inc)] >= LAYERS[folder(path)]:
                errors.append(f"{path} (layer {LAYERS[folder(path)]}) includes {inc} "
                              f"(layer {LAYERS[folder(inc)]}): an arrow that does not point down")
    # Circles among files (headers and the sources that include them).
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                errors.append("a circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    if "--print" in sys.argv:
        edges = sorted({(room(p), room(i)) for p, incs in graph.items() for i in incs
                        if i in graph and room(p) != room(i)}, key=lambda e: (-LAYERS[e[0]], e))
        for a, b in edges:
            print(f"{a} -> {b}")
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
