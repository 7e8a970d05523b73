"""Normal-float (NF-k) codebook quantization, per token blocks of channels (docs/format.md, "nf").

Per block of ``group_size`` channels of one token (float32)::

    scale = max(absmax(block), scale_eps(meta_dtype))  -> rounded to meta_dtype
    code  = argmin_i |x / scale - codebook[i]|           # ties: the lower index (torch.argmin)
    x_hat = codebook[code] * scale
"""

from __future__ import annotations

import functools

import torch

from ._checks import check_float, check_group, check_meta_dtype, scale_eps, to_meta

NF_BITS = (2, 3, 4)


def _check_nf_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in NF_BITS:
        raise ValueError(f"unsupported nf bits={bits!r}; supported: 2, 3, 4")


@functools.lru_cache(maxsize=None)
def _nf_values(bits: int) -> tuple[float, ...]:
    # QLoRA's construction (bitsandbytes create_normal_map, use_extra_value=True), for n = 2**bits:
    # n/2 positive quantiles of N(0, 1) on linspace(offset, 0.5, n/2 + 1)[:-1], n/2 - 1 negative ones on
    # linspace(offset, 0.5, n/2)[:-1], an exact 0, normalised by the largest value.
    # offset = mean of 1 - 1/(2(n-1)) and 1 - 1/(2n), rounded to 7 decimals: QLoRA's literal 0.9677083 for
    # n = 16. As in bitsandbytes, linspace is float32, the quantile float64, the result float32; this
    # reproduces its published NF4 table bit for bit.
    n = 2**bits
    offset = round(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))), 7)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float32)[:-1].double())
    v = torch.cat([pos.float(), torch.zeros(1), neg.float()]).sort().values
    v = v / v.max()
    return tuple(v.tolist())


def nf_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """NF-``bits`` codebook: float32 ``[2**bits]``, ascending, ``-1 .. 1``, with an exact 0."""
    _check_nf_bits(bits)
    return torch.tensor(_nf_values(bits), dtype=torch.float32, device=device)


def _blocks(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group_size, group_size)


def quantize_nf(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    meta_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., T, D]``; returns unpacked uint8 ``codes [..., T, D]`` and ``scale [..., T, D // g]``."""
    _check_nf_bits(bits)
    check_float(x)
    check_meta_dtype(meta_dtype)
    check_group(x.shape[-1], group_size, "D (the last dim of x)")
    xb = _blocks(x.float(), group_size)
    scale = to_meta(xb.abs().amax(-1, keepdim=True).clamp_min(scale_eps(meta_dtype)), meta_dtype)
    y = xb / scale.float()
    cb = nf_codebook(bits, device=x.device)
    codes = (y.unsqueeze(-1) - cb).abs().argmin(-1).to(torch.uint8)
    return codes.reshape(x.shape), scale.squeeze(-1)


def dequantize_nf(codes: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``codebook[code] * scale`` per block, as float32 ``[..., T, D]``."""
    _check_nf_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() < 1:
        raise ValueError(f"codes must be unpacked uint8 codes [..., T, D], got {getattr(codes, 'dtype', codes)}")
    check_group(codes.shape[-1], group_size, "D (the last dim of codes)")
    want = (*codes.shape[:-1], codes.shape[-1] // group_size)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale must have shape {want}, got {tuple(scale.shape)}")
    cb = nf_codebook(bits, device=codes.device)
    vals = _blocks(cb[codes.long()], group_size) * scale.float().unsqueeze(-1)
    return vals.reshape(codes.shape)
