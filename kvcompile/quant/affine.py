"""Asymmetric min/max group quantization (docs/format.md, "affine").

Per group (float32 throughout)::

    mn, mx = clip_ratio * min(group), clip_ratio * max(group)
    scale  = max((mx - mn) / levels, scale_eps(meta_dtype))   -> rounded to meta_dtype
    zero   = mn                                               -> rounded to meta_dtype
    code   = clamp(round((x - zero) / scale), 0, levels)      # zero, scale: the rounded values
    x_hat  = code * scale + zero

``round`` is round-half-to-even (``torch.round``); ``/`` is a true float32 division.
Groups: ``axis="token"`` groups ``group_size`` consecutive channels of one token (scale, zero:
``[..., T, D // group_size]``); ``axis="channel"`` groups ``group_size`` consecutive tokens of one
channel (scale, zero: ``[..., T // group_size, D]``).
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_group, check_meta_dtype, scale_eps, to_meta
from .pack import levels as _levels

AXES = ("token", "channel")


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of 'token', 'channel'; got {axis!r}")


def _grouped(t: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """View ``[..., T, D]`` as groups: token -> ``[..., T, D/g, g]``; channel -> ``[..., T/g, g, D]``."""
    if axis == "token":
        return t.reshape(*t.shape[:-1], t.shape[-1] // group_size, group_size)
    return t.reshape(*t.shape[:-2], t.shape[-2] // group_size, group_size, t.shape[-1])


def _reduce_dim(axis: str) -> int:
    return -1 if axis == "token" else -2


def quantize_affine(
    x: torch.Tensor,
    bits: float,
    group_size: int,
    axis: str = "token",
    clip_ratio: float = 1.0,
    meta_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., T, D]``; returns unpacked uint8 ``codes [..., T, D]``, ``scale``, ``zero``."""
    top = _levels(bits)
    _check_axis(axis)
    check_float(x, min_dim=1 if axis == "token" else 2)
    check_meta_dtype(meta_dtype)
    if axis == "token":
        check_group(x.shape[-1], group_size, "D (the last dim of x)")
    else:
        check_group(x.shape[-2], group_size, "T (dim -2 of x)")
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")

    xg = _grouped(x.float(), group_size, axis)
    dim = _reduce_dim(axis)
    mn = xg.amin(dim, keepdim=True) * clip_ratio
    mx = xg.amax(dim, keepdim=True) * clip_ratio
    scale = to_meta(((mx - mn) / top).clamp_min(scale_eps(meta_dtype)), meta_dtype)
    zero = to_meta(mn, meta_dtype)
    codes = torch.round((xg - zero.float()) / scale.float()).clamp_(0, top).to(torch.uint8)
    return codes.reshape(x.shape), scale.squeeze(dim), zero.squeeze(dim)


def dequantize_affine(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    axis: str = "token",
) -> torch.Tensor:
    """``code * scale + zero`` per group, as float32 ``[..., T, D]`` (codes unpacked, uint8)."""
    _check_axis(axis)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be unpacked uint8 codes, got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() < (1 if axis == "token" else 2):
        raise ValueError(f"codes must be [..., T, D], got shape {tuple(codes.shape)}")
    if axis == "token":
        check_group(codes.shape[-1], group_size, "D (the last dim of codes)")
        want = (*codes.shape[:-1], codes.shape[-1] // group_size)
    else:
        check_group(codes.shape[-2], group_size, "T (dim -2 of codes)")
        want = (*codes.shape[:-2], codes.shape[-2] // group_size, codes.shape[-1])
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} for axis={axis!r}, got {tuple(t.shape)}")
    dim = _reduce_dim(axis)
    cg = _grouped(codes.float(), group_size, axis)
    x_hat = cg * scale.float().unsqueeze(dim) + zero.float().unsqueeze(dim)
    return x_hat.reshape(codes.shape)
