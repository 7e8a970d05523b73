"""Argument checks shared by the reference quantizers (ValueError with the valid values named)."""

from __future__ import annotations

import torch

META_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(x: torch.Tensor, name: str = "x", min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, ...), got {got}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


def check_meta_dtype(meta_dtype: torch.dtype) -> None:
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"meta_dtype must be one of torch.float16, torch.bfloat16, torch.float32; got {meta_dtype}")


def check_group(size: int, group_size: int, what: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if size % group_size:
        raise ValueError(f"{what} ({size}) must be divisible by group_size ({group_size})")


def scale_eps(meta_dtype: torch.dtype) -> float:
    """Smallest scale the references store: the smallest normal number of ``meta_dtype``.

    It keeps a constant (or all-zero) group's scale positive and finite after rounding to
    ``meta_dtype`` (float16: 6.1035e-05), so ``x / scale`` never divides by zero.
    """
    return torch.finfo(meta_dtype).tiny


def to_meta(t: torch.Tensor, meta_dtype: torch.dtype) -> torch.Tensor:
    """Round float32 metadata to ``meta_dtype`` (round to nearest even); the codes use the rounded value."""
    return t.to(meta_dtype)
