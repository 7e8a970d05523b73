"""Symmetric per-token int8 and fp8 (e4m3fn) references (docs/format.md, "int8", "fp8").

Per token (the last dim, float32)::

    int8: scale = max(absmax / 127, eps) -> meta_dtype;  code = clamp(round(x / scale), -127, 127)
    fp8:  scale = max(absmax / 448, eps) -> meta_dtype;  code = clamp(x / scale, -448, 448) -> float8_e4m3fn

``eps = scale_eps(meta_dtype)`` keeps all-zero tokens finite (they come back as exact zeros). The clamp
is a no-op except where rounding the scale to ``meta_dtype`` lowered it by an ulp. Codes are returned
as their raw bytes in a uint8 tensor (``codes.view(torch.int8)`` / ``.view(torch.float8_e4m3fn)``).
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_meta_dtype, scale_eps, to_meta

INT8_MAX = 127
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _absmax_scale(x: torch.Tensor, qmax: float, meta_dtype: torch.dtype) -> torch.Tensor:
    absmax = x.float().abs().amax(-1, keepdim=True)
    return to_meta((absmax / qmax).clamp_min(scale_eps(meta_dtype)), meta_dtype)


def _check_codes_scale(codes: torch.Tensor, scale: torch.Tensor) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() < 1:
        raise ValueError(f"codes must be a uint8 byte tensor [..., T, D], got {getattr(codes, 'dtype', codes)}")
    want = (*codes.shape[:-1], 1)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale must have shape {want}, got {tuple(scale.shape)}")


def quantize_int8(x: torch.Tensor, meta_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns int8 codes as uint8 bytes ``[..., T, D]`` and ``scale [..., T, 1]``."""
    check_float(x)
    check_meta_dtype(meta_dtype)
    scale = _absmax_scale(x, INT8_MAX, meta_dtype)
    q = torch.round(x.float() / scale.float()).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(torch.uint8), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_codes_scale(codes, scale)
    return codes.view(torch.int8).float() * scale.float()


def quantize_fp8(x: torch.Tensor, meta_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns float8_e4m3fn codes as uint8 bytes ``[..., T, D]`` and ``scale [..., T, 1]``."""
    check_float(x)
    check_meta_dtype(meta_dtype)
    scale = _absmax_scale(x, FP8_MAX, meta_dtype)
    q = (x.float() / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_codes_scale(codes, scale)
    return codes.view(torch.float8_e4m3fn).float() * scale.float()
