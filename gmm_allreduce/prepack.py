"""Weights packed once for inference on the CPU (the packing itself is C++: csrc/cpu/prepack.h)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.gmm_allreduce)


class PackedWeights(tuple):
    """The weights, as a tuple of the same tensors, with copies packed for the CPU engine.

    Every op takes it in place of its weight list. Calls with it give the same bits as calls
    with the weights themselves; the engine only skips the conversion it would make at each call.
    For inference: a call that would record gradients for a weight raises a RuntimeError, and so
    does a call after a weight changed in place (pack it again).
    """

    def __new__(cls, weight, packs, versions):
        self = super().__new__(cls, weight)
        self._packs = tuple(packs)  # keeps the packs alive: the engine holds them weakly
        self._versions = tuple(versions)
        return self

    @property
    def packed(self) -> list[bool]:
        """Whether each weight got a pack (the others are read as they are)."""
        return [p is not None for p in self._packs]

    def check(self) -> None:
        """Raises where a call with these packs would be wrong or wasted."""
        if torch.is_grad_enabled() and any(w.requires_grad for w in self):
            raise RuntimeError(
                "weight: prepacked weights serve inference only; call under torch.no_grad() or "
                "torch.inference_mode(), or pass the weights themselves")
        if torch.compiler.is_compiling():  # a traced version is data-dependent; the engine
            return                         # still reads no pack of a weight changed since
        for i, (w, v) in enumerate(zip(self, self._versions)):
            if v is not None and w._version != v:
                raise RuntimeError(
                    f"weight[{i}]: changed in place since prepack_weights packed it; pack it again")


def prepack_weights(weight: Sequence[torch.Tensor]) -> PackedWeights:
    """Packs the weights once for the CPU engine at this host's tier (GMM_CPU_ISA included).

    What is packed: an int8 weight (W8A8 calls) where the CPU has AVX2 but neither VNNI nor AMX,
    widened once to the int16 pairs that the AVX2 kernel multiplies (twice the weight's bytes).
    Other weights gain nothing from a copy and are read as they are (VNNI and AMX read int8 weights
    in place; a 16-bit weight converted in cache beats an fp32 copy read from memory); ``packed``
    says which got one. The result is a tuple of the same weights that every op takes as
    ``weight``, for inference (see PackedWeights).
    """
    if isinstance(weight, torch.Tensor) or not isinstance(weight, Sequence):
        raise TypeError(f"weight: expected a list of tensors, got {type(weight).__name__}")
    weight = list(weight)
    for i, w in enumerate(weight):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weight[{i}]: expected a tensor, got {type(w).__name__}")
    with torch.no_grad():  # the weights themselves: the engine finds their packs by identity
        packs = torch.ops.gmm_allreduce._prepack_weights(weight)
    versions = [None if w.is_inference() else w._version for w in weight]
    return PackedWeights(weight, packs, versions)
