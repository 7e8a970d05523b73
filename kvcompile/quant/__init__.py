"""Pure-PyTorch float32 reference quantizers and bit packers: the spec of docs/format.md.

Codes are returned unpacked (uint8, one per element); :func:`pack_codes` packs them.
"""

from ._checks import scale_eps
from .affine import dequantize_affine, quantize_affine
from .fp import dequantize_fp8, dequantize_int8, quantize_fp8, quantize_int8
from .metrics import sqnr
from .nf import dequantize_nf, nf_codebook, quantize_nf
from .pack import SUPPORTED_BITS, levels, pack_codes, packed_dim, unpack_codes
from .permute import apply_perm, channel_perm_by_range, invert_perm, unapply_perm

__all__ = [
    "SUPPORTED_BITS",
    "apply_perm",
    "channel_perm_by_range",
    "dequantize_affine",
    "dequantize_fp8",
    "dequantize_int8",
    "dequantize_nf",
    "invert_perm",
    "levels",
    "nf_codebook",
    "pack_codes",
    "packed_dim",
    "quantize_affine",
    "quantize_fp8",
    "quantize_int8",
    "quantize_nf",
    "scale_eps",
    "sqnr",
    "unapply_perm",
    "unpack_codes",
]
