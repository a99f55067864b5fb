"""Quantisation helpers: the inputs of the ops' quantised calls, with no other library.

Symmetric scales: an int8 value v stands for v * scale (|v| <= 127), a float8_e4m3fn value for
v * scale (|v| <= 448).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_LIMIT = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


# The dtypes of a quantised x or weight.
QUANTISED = tuple(_LIMIT)


def is_quantised(tensors: Sequence[torch.Tensor], scales: Sequence) -> bool:
    """Whether a call is quantised: an int8 or float8 x or weight among `tensors`, or any of
    `scales` given."""
    return any(s is not None for s in scales) or any(t.dtype in QUANTISED for t in tensors)


def _check_dtype(dtype: torch.dtype) -> float:
    if dtype not in _LIMIT:
        raise ValueError(f"dtype: expected torch.int8 or torch.float8_e4m3fn, got {dtype}")
    return _LIMIT[dtype]


def _quantize(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    v = t.float() / scale
    if dtype == torch.int8:
        return v.round_().clamp_(-127, 127).to(torch.int8)
    return v.clamp_(-448, 448).to(dtype)


@torch.no_grad()
def quantize_weights(weight_list: Sequence[torch.Tensor], dtype: torch.dtype = torch.int8
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-output-channel symmetric quantisation of G weights [K_i, N_i]: returns (q, scale), q[i]
    [K_i, N_i] of `dtype`, scale[i] [N_i] fp32, with weight[i] ~= q[i] * scale[i].

    Pass scale as the ops' ``scale`` (W8A8 calls) or ``antiquant_scale`` (weight-only int8). Each
    q[i] is the transpose of an [N_i, K_i] contiguous tensor: the layout the CPU's int8 kernels
    read without a copy, and the only one its W8A8 kernels take (any layout is accepted).
    """
    limit = _check_dtype(dtype)
    q, scales = [], []
    for i, w in enumerate(weight_list):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"weight_list[{i}]: expected a 2-D floating-point tensor [K, N]")
        wt = w.t().float()  # [N, K]
        scale = wt.abs().amax(dim=1).clamp_(min=torch.finfo(torch.float32).tiny) / limit
        q.append(_quantize(wt, scale[:, None], dtype).contiguous().t())
        scales.append(scale)
    return q, scales


@torch.no_grad()
def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantisation of activations x [M, K]: returns (q, per_token_scale), q
    [M, K] of `dtype`, per_token_scale [M] fp32, with x ~= q * per_token_scale[:, None]."""
    limit = _check_dtype(dtype)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError("x: expected a 2-D floating-point tensor [M, K]")
    scale = x.float().abs().amax(dim=1).clamp_(min=torch.finfo(torch.float32).tiny) / limit
    return _quantize(x, scale[:, None], dtype).contiguous(), scale
