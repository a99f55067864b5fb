"""Each op's argument names, from its schema (csrc/registration.cpp): the one list of them, which the
Python front, the fake kernels and the autograd glue read arguments by."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.gmm_allreduce)

OPS = ("grouped_mat_mul_all_reduce", "grouped_mat_mul_reduce_scatter", "grouped_mat_mul",
       "grouped_mlp_all_reduce", "grouped_mlp_reduce_scatter", "grouped_mlp",
       "all_to_all_grouped_mat_mul", "grouped_mat_mul_all_to_all")

NAMES = {op: tuple(arg.name for arg in getattr(torch.ops.gmm_allreduce, op).default._schema.arguments)
         for op in OPS}


def arguments(op: str, args: tuple, kwargs: dict | None = None) -> dict:
    """A call's inputs by their schema's names, not by position."""
    named = dict(zip(NAMES[op], args))
    if kwargs:
        named.update(kwargs)
    return named


def positional(op: str, named: dict) -> tuple:
    """The schema's arguments of `op`, in order, from a dict that holds them (and maybe more)."""
    return tuple(named[name] for name in NAMES[op])
