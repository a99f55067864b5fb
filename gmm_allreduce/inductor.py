"""The op as a collective in Inductor's eyes.

Inductor lowers a custom op as a plain fallback kernel, which its communication passes take for
compute: simple_overlap (on by default since torch 2.14) moves a functional collective earlier
over it, so that the collectives of the compiled code no longer run in program order around the
op's own all-reduce (pytorch/pytorch#189454; tests/test_compile_order.py shows it). On ranks
whose graphs differ that pairs unrelated collectives or hangs. Lowering the op as Inductor's
collective kernel (a fallback kernel of the class those passes recognise and keep in order) makes
it one of them. The op still returns finished outputs, so nothing waits on it.

Registered from the fake kernel, i.e. the first time a graph with the op is traced, so that
`import gmm_allreduce` does not import Inductor.
"""

from __future__ import annotations

import torch

_registered = False


def register_lowering() -> None:
    """Registers the ops' Inductor lowerings (the all-reduce and the reduce-scatter op) once; a
    torch without the hooks keeps the default."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from torch._inductor import ir
        from torch._inductor.lowering import register_lowering as register
    except ImportError:
        return
    collective = getattr(ir, "_CollectiveKernel", None)
    if collective is None:
        return

    def wrap(node):
        if not isinstance(node, ir.IRNode):
            return node
        return node.wrap_for_lowering() if hasattr(node, "wrap_for_lowering") else ir.TensorBox.create(node)

    for op in (torch.ops.gmm_allreduce.grouped_mat_mul_all_reduce.default,
               torch.ops.gmm_allreduce.grouped_mat_mul_reduce_scatter.default):
        def lower(*args, op=op, **kwargs):
            return torch.utils._pytree.tree_map(wrap, collective.create(op, *args, **kwargs))

        register(op, type_promotion_kind=None)(lower)
