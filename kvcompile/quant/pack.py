"""Bit packing of unpacked uint8 codes along the last dim (docs/format.md, "Bit packing").

Layouts, per row of ``d`` codes:

- bits 1, 2, 4, 8: ``8 // bits`` codes per byte, little-endian within the byte: element
  ``i * (8 // bits) + j`` sits at bits ``j * bits .. (j + 1) * bits - 1`` of byte ``i``.
- bits 3: groups of 8 codes in 3 bytes, one little-endian 24-bit word, code ``j`` at bits ``3j .. 3j + 2``.
- bits 1.5 (ternary, 3 levels): 5 trits per byte, ``byte = sum(c_j * 3**j)``.

Rows are padded with zero codes up to a whole number of bytes (or words); padding is never read back.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS: tuple[float, ...] = (1, 1.5, 2, 3, 4, 8)
_SUPPORTED_TEXT = "1, 1.5 (ternary), 2, 3, 4, 8"


def check_bits(bits: float) -> float:
    """Return ``bits`` if it is a supported width, else raise a ValueError naming the valid values."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}; supported bit widths: {_SUPPORTED_TEXT}")
    return bits


def levels(bits: float) -> int:
    """Largest code: ``2**bits - 1``, and 2 for ternary (``bits=1.5``, 3 levels)."""
    check_bits(bits)
    return 2 if bits == 1.5 else (1 << int(bits)) - 1


def _codes_per_unit(bits: float) -> tuple[int, int]:
    """(codes, bytes) of one packing unit: the smallest whole run of codes that fills whole bytes."""
    if bits == 1.5:
        return 5, 1
    if bits == 3:
        return 8, 3
    return 8 // int(bits), 1


def packed_dim(d: int, bits: float) -> int:
    """Bytes per row of ``d`` codes at ``bits`` bits (zero-code padding included)."""
    check_bits(bits)
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        raise ValueError(f"d must be a non-negative int, got {d!r}")
    n_codes, n_bytes = _codes_per_unit(bits)
    return math.ceil(d / n_codes) * n_bytes


def _check_codes(codes: torch.Tensor, bits: float) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a uint8 tensor, got {got}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dim (the packed dim is the last)")
    top = levels(bits)
    if top < 255 and codes.numel() and not torch.compiler.is_compiling():
        if int(codes.max()) > top:
            raise ValueError(f"codes exceed the largest code {top} of bits={bits}: max {int(codes.max())}")


def pack_codes(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """Pack uint8 codes in ``[0, levels(bits)]`` along the last dim into ``packed_dim(D, bits)`` bytes."""
    check_bits(bits)
    _check_codes(codes, bits)
    d = codes.shape[-1]
    lead = codes.shape[:-1]
    n_codes, n_bytes = _codes_per_unit(bits)
    n_units = math.ceil(d / n_codes)
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, n_units * n_codes - d))
    c = c.reshape(*lead, n_units, n_codes)
    j = torch.arange(n_codes, device=codes.device, dtype=torch.int32)
    if bits == 1.5:
        out = (c * 3**j).sum(-1)
    elif bits == 3:
        word = (c << (3 * j)).sum(-1)  # 24-bit little-endian word per 8 codes
        out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(n_bytes)], dim=-1)
    else:
        out = (c << (int(bits) * j)).sum(-1)  # disjoint bit fields: the sum is the bitwise or
    return out.reshape(*lead, n_units * n_bytes).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: float, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., packed_dim(d, bits)]`` uint8 -> ``[..., d]`` uint8 codes."""
    nbytes = packed_dim(d, bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a uint8 tensor, got {got}")
    if packed.dim() < 1 or packed.shape[-1] != nbytes:
        raise ValueError(
            f"packed last dim must be packed_dim({d}, {bits}) = {nbytes}, got shape {tuple(packed.shape)}"
        )
    lead = packed.shape[:-1]
    n_codes, n_bytes = _codes_per_unit(bits)
    p = packed.to(torch.int32).reshape(*lead, nbytes // n_bytes, n_bytes)
    j = torch.arange(n_codes, device=packed.device, dtype=torch.int32)
    if bits == 1.5:
        c = (p // 3**j) % 3
    elif bits == 3:
        word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
        c = (word[..., None] >> (3 * j)) & 0x7
    else:
        b = int(bits)
        c = (p >> (b * j)) & ((1 << b) - 1)
    return c.reshape(*lead, (nbytes // n_bytes) * n_codes)[..., :d].to(torch.uint8)
