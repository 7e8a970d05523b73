"""Fused split-K flash-decoding attention over packed low-bit KV (docs/format.md).

One launch of ``_decode_split_kernel`` runs a program per (batch, KV head, split); each program serves
*all* query rows of its KV head (the ``r = Hq // Hkv`` query heads times the ``Nq`` new tokens), so every
packed tile is read and unpacked once and shared through ``tl.dot``. A split is a contiguous range of the
logical sequence ``sink ++ middle ++ window``; the program walks whichever of the three parts fall in its
range. ``_merge_kernel`` combines the partial outputs with their log-sum-exp (flash-decoding; the split /
merge structure follows the lightllm / SGLang / vLLM decode kernels, the packed-tile tricks follow the
feasibility probe in KERNEL-NOTES.md).

Packed tiles are never re-ordered into channel order. A byte holds ``PER = 8 // bits`` codes of channels
``PER * i + j``; "plane" ``j`` of a ``[tokens, D // PER]`` byte tile is ``(byte >> j * bits) & mask``, i.e.
the channels ``j, j + PER, j + 2 * PER, ...``. q is loaded in the same planes (strided pointers, free) and
``q . k = sum_j q_j . k_j``; the output accumulators are kept per plane and stored with strided pointers.

Codes become floats without a conversion instruction: ``code | MAGIC`` read as fp16 is ``1024 + code``
(``0x6400``; for bf16 ``0x4300`` is ``128 + code``). On the K side the offset is folded into the zero
point (``s * (q . (M + c)) + (z - M s) * sum(q)``, float32); on the V side it is subtracted in the model
dtype, which is exact. For fp16 the code bits stay in place (``1024 + 4**j * c``; the exact power-of-two
factor is folded into the q planes and the output planes), and on the GPU a few lines of PTX spread four
bytes into fp16 lanes with two PRMTs and one LOP3 per two codes (``FAST_ASM``; the interpreter runs the
same math in plain Triton). With one group per token (``G == D``) scales and zeros stay out of the inner
products: ``score = s * (q . c) + z * sum(q)`` and ``out = (p * s) . C + sum(p * z)``. Smaller groups
(``G`` in {16, 32, 64}) keep that form through "group fill" (``GFILL``): the MMA rows are (channel group, query
row), V's probabilities are scaled per row by its group's scale and each row stores its group's columns; K's
q rows hold one group's channels each and the rows of one query are summed. Where the rows do not fit (or
with ``group_fill=False``) the codes are dequantized in registers (slower, a constexpr branch).

Lengths come either as host ints (the split partition chosen on the host) or (``DEV_LENS``) as a device
``[3]`` / ``[B, 3]`` tensor per sequence: the grid is sized from the capacities and each program derives its
row's chunk, so the launcher never synchronises and a decode step can be captured in a CUDA graph.
Per-channel keys (``K_CHANNEL``, KIVI) dequantize each key tile in registers with its token group's
per-channel scale and zero (``KC_DEQ``, default; NOTES.md v12), or fold the scale into q (``q' = q * s_g``)
and add ``q . z_g`` per row (v10); ``KV_MIXED`` lets V's packed middle run ahead of K's (KIVI's per-token V). NOTES.md v9, v10.
The packed loop loads each tile's scales and zeros one tile ahead (``PREFETCH``, default; v14): only the code
tiles go through Triton's asynchronous copies, and the scale loads had sat on every tile's critical path.
``HFILL`` (head fill, off by default; v13) puts several KV heads' query rows into one program's MMA rows.
8-bit codes (v15; affine, or ``k_format`` / ``v_format`` "int8" / "fp8" with one absmax scale per token and no
zero) take one group per token: the code tiles are read as int16 words, two planes as for 4-bit, and one PRMT
per two codes (int8: sign bits flipped first; fp8: the hardware's e4m3x2 -> f16x2 conversion) makes the planes.
NF4 codebook codes (v16; ``*_format="nf"``, an absmax scale per group, no zero) keep the 4-bit planes; PTX looks
each code's fp16 codebook value up (``_nf4_asm``), and blocks below D go through group fill.
Keys quantized before RoPE (v20; ``k_rope``, ``K_ROPE``): each key tile is dequantized per element and rotated by
its tokens' positions through two products per plane, q . (k cos) + qb . (k sin), with qb q's rotate-half partner
(``_rope_operands``); slower than the plain loop (0.35-0.6x fp16 SDPA), much faster than dequantize + SDPA. v22
(``ROPE_TAB``, angle addition): the tile's base angle rotates q once per tile and the in-tile offsets' cos / sin come
from a [BLOCK_N] table, the per-element products in fp16 pairs (0.7-0.85x fp16 SDPA where it is the default).
Ternary values (v21; ``v_bits=1.5``, 5 base-3 digits per byte, SKVQ's default V) are dequantized per element into
one output plane in natural channel order (PER_V == 1).
One group per head of 128 channels at 2 or 4 bits (fp16 scales) runs by default in a Gluon kernel
(``gluon_decode.py``, explicit register layouts, nothing through shared memory; NOTES.md v27) where the splits are
long enough; this module's launcher builds its plan and its partials go through the same merge kernel.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch's wait (sm_90); a Triton without it keeps the merge a plain launch
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    _gdc_wait = None

from . import gluon_decode as _gl
from .launch import Launch, PlanCache

__all__ = [
    "decode_attention",
    "fused_decode_is_profitable",
    "choose_num_splits",
    "SUPPORTED_BITS",
    "SUPPORTED_FORMATS",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_GROUP_SIZES",
    "SUPPORTED_TOKEN_GROUPS",
]

SUPPORTED_BITS = (2, 4, 8)  # 8: one group (scale) per token only
SUPPORTED_V_BITS = SUPPORTED_BITS + (1.5,)  # 1.5: ternary values (5 codes per byte), affine, per-token groups
# int8 / fp8 (e4m3): 8 bits, one absmax scale per token, no zero; nf: NF4 codebook (4 bits), absmax scale per group
SUPPORTED_FORMATS = ("affine", "int8", "fp8", "nf")
_FMT_CODE = {"affine": 0, "int8": 1, "fp8": 2, "nf": 3}
# 8-bit planes are 1024 + code in fp16; int8's flipped sign bit adds 128; fp8 planes are values (no offset)
_MAGIC_VAL_8BIT = {"affine": 1024.0, "int8": 1152.0, "fp8": 0.0}


def _nf4_fp16_bits() -> list[int]:
    """The NF4 codebook (kvcompile.quant.nf, QLoRA's table) as fp16 bit patterns, ascending."""
    from ..quant.nf import nf_codebook

    return [x & 0xFFFF for x in nf_codebook(4).half().view(torch.int16).tolist()]


def _nf4_asm(j: int) -> str:
    """PTX for plane j (the low nibbles for j == 0) of four packed bytes -> four fp16 NF4 codebook values
    (two f16x2 registers). The four indices are gathered into one PRMT selector; PRMT picks table bytes by
    the index's low 3 bits from the entries 0-7 and 8-15 (lo and hi bytes of each fp16 separately), a byte
    mask from the index's bit 3 (PRMT's sign-replicate mode) chooses between them, and two PRMTs interleave
    the lo and hi bytes into fp16 lanes: 15 instructions per four codes."""
    bits = _nf4_fp16_bits()
    lo = [sum((bits[4 * r + k] & 0xFF) << (8 * k) for k in range(4)) for r in range(4)]
    hi = [sum((bits[4 * r + k] >> 8) << (8 * k) for k in range(4)) for r in range(4)]
    src = "$2" if j == 0 else "x"
    return (
        "{ .reg .b32 x, t, u, s, m, y, la, lb, ha, hb, lo, hi, l0, l1, l2, l3, h0, h1, h2, h3; "
        + "".join(f"mov.b32 l{r}, {lo[r]:#x}; mov.b32 h{r}, {hi[r]:#x}; " for r in range(4))
        + ("" if j == 0 else "shr.b32 x, $2, 4; ")
        + f"and.b32 t, {src}, 0x0F0F0F0F; shr.b32 u, t, 4; or.b32 u, u, t; prmt.b32 s, u, 0, 0x0020; "
        + "and.b32 s, s, 0x7777; "
        + ("shl.b32 y, $2, 4; prmt.b32 m, y, 0, 0xBA98; " if j == 0 else "prmt.b32 m, $2, 0, 0xBA98; ")
        + "prmt.b32 la, l0, l1, s; prmt.b32 lb, l2, l3, s; prmt.b32 ha, h0, h1, s; prmt.b32 hb, h2, h3, s; "
        + "lop3.b32 lo, la, lb, m, 0xD8; lop3.b32 hi, ha, hb, m, 0xD8; "
        + "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; }"
    )


_NF4_ASM_J0 = tl.constexpr(_nf4_asm(0))
_NF4_ASM_J1 = tl.constexpr(_nf4_asm(1))
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128)  # and G == D
SUPPORTED_TOKEN_GROUPS = (16, 32, 64, 128)  # per-channel keys (k_axis="channel"): tokens per group
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_META_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_ROWS = 64  # r * Nq query rows per KV head
# Variant defaults from the H100 measurements (kvcompile/kernels/NOTES.md v6..v8):
# - one query row per KV head (MHA decode): the 16-row MMA path with row fill (8 token sub-blocks x 2
#   rows), BLOCK_N 64: 303 -> 202 us. GQA (2..8 rows): row fill measured no better (156 vs 138 us at
#   BLOCK_N 64, 134 at 32, within noise), so it stays off there (FILL_ROWS_DEFAULT).
# - sink / window: one extra program per KV head takes the full-precision parts (177.5 -> 165.2 us).
# - contiguous fp tiles (FP_CONTIG): 365 us, spills; off at the packed loop's BLOCK_N. v24 (session 9): the fp
#   tiles at their own 16 tokens (FP_BN), loaded contiguously: the window builds no longer spill (offline triton
#   3.6: 64 bytes of stack at BLOCK_N, none at 16) and the sink + window rows drop 7-32% (K2V2 136 -> 112 us).
#   v25 (session 10): V ahead of K (KIVI) takes them too, its lag tiles at the same 16 tokens: 172-175 -> 152-155 us.
FILL_ROWS_DEFAULT = False
MHA_FILL_DEFAULT = True
FP_CONTIG_DEFAULT = True  # with FP_BLOCK_N_DEFAULT; at a 32- or 64-token fp tile the contiguous form spills
FP_BLOCK_N_DEFAULT = 16
FP_SPLIT_DEFAULT = True
# - per-token groups smaller than D (KIVI's V, groups of 16, 32 or 64 channels, for K and / or V): "group fill"
#   (GFILL), MMA rows (channel group, query row), up to _MAX_GFILL_ROWS rows, the per-token group scales loaded
#   once per group and broadcast to its rows (GF_BCAST); otherwise the codes are dequantized in registers.
#   NOTES.md v11: KIVI 376 -> 264 us, V groups of 32 295 -> 147 us, K4V4 groups of 32 2099 -> 246 us.
GROUP_FILL_DEFAULT = True
GROUP_BCAST_DEFAULT = True
KCHAN_DEQUANT_DEFAULT = True
_MAX_GFILL_ROWS = 64
# - head fill (HFILL): one program serves several KV heads, their (head, query row) pairs filling the 16 MMA
#   rows (GQA-4: 4 heads); off by default until timed on the GPU (NOTES.md v13). HEAD_FILL_MAX caps the heads
#   per program (each is an unrolled copy of the unpack code).
HEAD_FILL_DEFAULT = False
HEAD_FILL_MAX = 8
# - PREFETCH: the per-token scales / zeros (group fill: per group; KIVI: the key group's per-channel rows) loaded
#   one tile ahead instead of inside the tile (NOTES.md v14): H100 K2V2 32k 131.6 -> 109-122 us, KIVI 229 -> 178,
#   V in groups of 32 146 -> 129, K4V4 in groups of 32 227 -> 169 (with BLOCK_N 32 for grouped keys)
PREFETCH_DEFAULT = True
LAZY_RESCALE_DEFAULT = True
BALANCE_DEFAULT = True
# - keys before RoPE (K_ROPE): ROPE_TAB, angle addition (v22): the tile's base angle rotates q once per tile and the
#   in-tile offsets' cos / sin come from a [BLOCK_N] table, products in fp16 pairs; otherwise (v20) every key element
#   takes its own angle, cos and sin in float32. Default where it measured faster (decode_attention's
#   rope_table=None): values not ternary, and one key group per token, or D = 128 with groups of 16 (there without
#   group fill)
ROPE_TAB_DEFAULT = True
# the packed values' codes as fp16 subnormals (no offset to subtract) where they keep their bits in place (session 11)
V_DEN_DEFAULT = True
# v27 (NOTES.md): the Gluon kernel (gluon_decode.py) for the layouts it takes, where each split has at least
# GLUON_MIN_TILES tiles of 64 tokens (below that its per-program setup costs more than it saves); its tokens-on-M form
# already from GLUON_TOKENS_MIN_TILES (v29, H100, B=8: 2 tiles per split at 2k tokens 14.4 against the Triton kernel's
# 15.6 us, 4k 17.8-18.0 against 20.9-21.5, MHA 2k 21.2-21.9 against 32.6-33.0; at 1 tile, 1k, 13.4 against 13.0)
GLUON_DEFAULT = True
GLUON_MIN_TILES = 8
GLUON_TOKENS_MIN_TILES = 2
# the tokens-on-M form for up to 8 query rows per KV head (v28; H100 K2V2 32k: 72 against 84 us in the 16-row form)
GLUON_TOKENS_DEFAULT = True
# v31 (NOTES.md): the tokens-on-M form's tiles through a shared-memory ring fed by bulk tensor copies (TMA) rather than
# loaded into registers (gluon_decode.py; decode_attention's gluon_tma)
GLUON_TMA_DEFAULT = True
# v31: with the TMA ring, the merge launched as a programmatic dependent launch (the split kernel lets it be placed as
# soon as every split program has started; it waits for the split's end in the kernel). H100: 0.4-1.2 us off with the
# ring; with the register loads the early merge programs cost up to 3% (K4V4), so there it stays a plain launch
GLUON_PDL_DEFAULT = True

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# Triton device functions
# --------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """a [M, K] @ b [K, N] -> float32 [M, N]."""
    if USE_DOT:
        if DOT_FP32:
            # The interpreter computes bf16 tl.dot wrongly: use float32 operands there.
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            return tl.dot(a, b)
    else:
        # Rows too few to fill an MMA (MHA decode): multiply and reduce on the CUDA cores.
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _asm_spread_mask_or(b8, MASK: tl.constexpr, OR: tl.constexpr):
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 lo, hi; prmt.b32 lo, $2, 0, 0x4140; prmt.b32 hi, $2, 0, 0x4342; "
            "lop3.b32 $0, lo, " + MASK + ", " + OR + ", 0xea; lop3.b32 $1, hi, " + MASK + ", " + OR + ", 0xea; }",
        constraints="=r,=r,r", args=[b8], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _spread_mask_or(b8, J: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr = 0x6400):
    """uint8 tile -> fp16 1024 + 2**(J * BITS) * code_J. Four bytes per 32-bit register: two PRMTs spread
    them into fp16 lanes, then one LOP3 per two codes masks plane J in place and ORs in 0x6400. MAGIC 0: nothing
    ORed in, the fp16 subnormal 2**-24 * 2**(J * BITS) * code_J (exact; V_DEN)."""
    OR: tl.constexpr = "0x64006400" if MAGIC == 0x6400 else "0x0"
    if BITS == 2 and J == 0:
        r = _asm_spread_mask_or(b8, "0x30003", OR)
    elif BITS == 2 and J == 1:
        r = _asm_spread_mask_or(b8, "0xc000c", OR)
    elif BITS == 2 and J == 2:
        r = _asm_spread_mask_or(b8, "0x300030", OR)
    elif BITS == 2 and J == 3:
        r = _asm_spread_mask_or(b8, "0xc000c0", OR)
    elif BITS == 4 and J == 0:
        r = _asm_spread_mask_or(b8, "0xf000f", OR)
    elif BITS == 4 and J == 1:
        r = _asm_spread_mask_or(b8, "0xf000f0", OR)
    return r


@triton.jit
def _asm_byte_plane(w16, J: tl.constexpr, FMT: tl.constexpr):
    """8-bit codes, int16 words of two codes -> fp16 plane J (the low bytes for J == 0), two words per 32-bit
    register. Affine / int8: one PRMT per two codes puts byte J of each word under 0x64 (1024 + code; int8
    flips the sign bits first: 1152 + code). fp8: the plane's two bytes, then the hardware's e4m3x2 -> f16x2
    conversion (the value itself, not times 2**-8 as the plain-Triton form)."""
    if FMT == 2:
        if J == 0:
            r = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; .reg .b16 h; prmt.b32 t, $1, 0, 0x20; cvt.u16.u32 h, t; "
                    "cvt.rn.f16x2.e4m3x2 $0, h; }",
                constraints="=r,r", args=[w16], dtype=tl.float16, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; .reg .b16 h; prmt.b32 t, $1, 0, 0x31; cvt.u16.u32 h, t; "
                    "cvt.rn.f16x2.e4m3x2 $0, h; }",
                constraints="=r,r", args=[w16], dtype=tl.float16, is_pure=True, pack=2)
    elif FMT == 1:
        if J == 0:
            r = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; xor.b32 t, $1, 0x80808080; prmt.b32 $0, t, 0x64, 0x4240; }",
                constraints="=r,r", args=[w16], dtype=tl.float16, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; xor.b32 t, $1, 0x80808080; prmt.b32 $0, t, 0x64, 0x4341; }",
                constraints="=r,r", args=[w16], dtype=tl.float16, is_pure=True, pack=2)
    else:
        if J == 0:
            r = tl.inline_asm_elementwise(asm="prmt.b32 $0, $1, 0x64, 0x4240;", constraints="=r,r", args=[w16],
                                          dtype=tl.float16, is_pure=True, pack=2)
        else:
            r = tl.inline_asm_elementwise(asm="prmt.b32 $0, $1, 0x64, 0x4341;", constraints="=r,r", args=[w16],
                                          dtype=tl.float16, is_pure=True, pack=2)
    return r


@triton.jit
def _nf4_plane(b8, J: tl.constexpr, FAST_ASM: tl.constexpr):
    """Plane J of a 4-bit code tile as fp16 NF4 codebook values. FAST_ASM (GPU): b8 is the raw uint8 tile and
    PTX looks the codes up (_nf4_asm); otherwise b8 is the int16 tile and a select chain does (the codebook
    rounded to fp16, the same values)."""
    if FAST_ASM:
        if J == 0:
            r = tl.inline_asm_elementwise(asm=_NF4_ASM_J0, constraints="=r,=r,r", args=[b8], dtype=tl.float16,
                                          is_pure=True, pack=4)
        else:
            r = tl.inline_asm_elementwise(asm=_NF4_ASM_J1, constraints="=r,=r,r", args=[b8], dtype=tl.float16,
                                          is_pure=True, pack=4)
    else:
        c = (b8 >> (J * 4)) & 0xF
        r = tl.where(c < 8,
                     tl.where(c < 4,
                              tl.where(c < 2, tl.where(c == 0, -1.0, -0.6962890625),
                                       tl.where(c == 2, -0.52490234375, -0.39501953125)),
                              tl.where(c < 6, tl.where(c == 4, -0.284423828125, -0.184814453125),
                                       tl.where(c == 6, -0.091064453125, 0.0))),
                     tl.where(c < 12,
                              tl.where(c < 10, tl.where(c == 8, 0.07958984375, 0.160888671875),
                                       tl.where(c == 10, 0.24609375, 0.337890625)),
                              tl.where(c < 14, tl.where(c == 12, 0.440673828125, 0.5625),
                                       tl.where(c == 14, 0.72314453125, 1.0)))).to(tl.float16)
    return r


@triton.jit
def _plane_magic(b16, J: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr,
                 SHIFTED: tl.constexpr, FAST_ASM: tl.constexpr = False, FMT: tl.constexpr = 0):
    """Plane J of an int16 byte tile as DTYPE values without an int->float conversion: MAGIC_VAL + code,
    or with SHIFTED (fp16 only: the code bits stay in place, inside the 10-bit mantissa) MAGIC_VAL +
    2**(J * BITS) * code, which saves the shift; callers fold the exact power-of-two factor elsewhere.
    With SHIFTED and FAST_ASM (GPU only), b16 is the raw uint8 tile and PTX does the spreading.

    8-bit codes (BITS == 8) come as int16 words of two codes (plane 0: the low byte, even channels), never
    shifted, fp16 only. FMT 1 (int8): the sign bit flipped, so the plane is 1024 + 128 + code (MAGIC_VAL
    1152). FMT 2 (fp8 e4m3): sign and the 7 exponent / mantissa bits moved into fp16's places, which is the
    value times 2**-8 exactly, subnormals included (MAGIC_VAL 0; callers scale by 256)."""
    if FMT == 3:
        out = _nf4_plane(b16, J, FAST_ASM)
    elif SHIFTED and FAST_ASM:
        out = _spread_mask_or(b16, J, BITS, MAGIC)
    elif BITS == 8 and FAST_ASM:
        out = _asm_byte_plane(b16, J, FMT)
    else:
        if SHIFTED:
            c = b16 & (((1 << BITS) - 1) << (J * BITS))
        else:
            c = (b16 >> (J * BITS)) & ((1 << BITS) - 1)
        if FMT == 2:
            out = (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(DTYPE, bitcast=True)
        elif FMT == 1:
            out = ((c ^ 0x80) | MAGIC).to(DTYPE, bitcast=True)
        else:
            out = (c | MAGIC).to(DTYPE, bitcast=True)
    return out


@triton.jit
def _v_plane_exact(b16, J: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VAL: tl.constexpr,
                   DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, SHIFTED: tl.constexpr, FAST_ASM: tl.constexpr,
                   FMT: tl.constexpr = 0):
    """Plane J as exact code values (times 2**(J * BITS) if SHIFTED): (MAGIC_VAL + c) - MAGIC_VAL is exact. MAGIC 0
    (V_DEN, SHIFTED fp16 only): the code bits alone, the subnormal 2**-24 * 2**(J * BITS) * c, no subtraction."""
    v = _plane_magic(b16, J, BITS, MAGIC, DTYPE, SHIFTED, FAST_ASM, FMT)
    if FMT >= 2 or MAGIC == 0:  # fp8 (the value, or times 2**-8), NF4 (the codebook value), subnormals: no offset
        if DOT_FP32:
            return v.to(tl.float32)
        else:
            return v
    if DOT_FP32:
        # the interpreter gets bf16 arithmetic wrong: subtract in float32 there
        return v.to(tl.float32) - MAGIC_VAL
    else:
        return v - MAGIC_VAL


@triton.jit
def _plane_f32(b16, J: tl.constexpr, BITS: tl.constexpr):
    return ((b16 >> (J * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _load_q_plane(q_base, rows_off, rmask, J: tl.constexpr, PER: tl.constexpr, DP: tl.constexpr, sq_d):
    offs_c = tl.arange(0, DP) * PER + J
    return tl.load(q_base + rows_off[:, None] + offs_c[None, :].to(tl.int64) * sq_d, mask=rmask[:, None], other=0.0)


@triton.jit
def _rope_q_operands(qb_base, q_rows, rmask, sq_d, rw_row, PER: tl.constexpr, DP: tl.constexpr):
    """Keys before RoPE: the planes of q's rotate-half partners (``_rope_operands``' qb, q's rows and strides) and of
    the stored columns' frequencies (``rw_row``: this KV head's [D] float32), as (qb0..qb3, w0..w3); with two
    planes the last two repeat the first (unused)."""
    wc = tl.arange(0, DP) * PER
    qb0 = _load_q_plane(qb_base, q_rows, rmask, 0, PER, DP, sq_d)
    qb1 = _load_q_plane(qb_base, q_rows, rmask, 1, PER, DP, sq_d)
    w0 = tl.load(rw_row + wc)
    w1 = tl.load(rw_row + wc + 1)
    if PER == 4:
        qb2 = _load_q_plane(qb_base, q_rows, rmask, 2, PER, DP, sq_d)
        qb3 = _load_q_plane(qb_base, q_rows, rmask, 3, PER, DP, sq_d)
        w2 = tl.load(rw_row + wc + 2)
        w3 = tl.load(rw_row + wc + 3)
    else:
        qb2 = qb0
        qb3 = qb1
        w2 = w0
        w3 = w1
    return qb0, qb1, qb2, qb3, w0, w1, w2, w3


@triton.jit
def _q_group(qp, grow, J: tl.constexpr, PER: tl.constexpr, DP: tl.constexpr, K_GROUP: tl.constexpr):
    """Group fill with grouped keys: row (g, m) of q plane J keeps the channels of group g (zeros elsewhere)."""
    ch = tl.arange(0, DP) * PER + J
    return tl.where((ch // K_GROUP)[None, :] == grow[:, None], qp, tl.zeros_like(qp))


@triton.jit
def _load_fp_plane(base, offs_t, tmask, st, sc, J: tl.constexpr, PER: tl.constexpr, DP: tl.constexpr):
    offs_c = tl.arange(0, DP) * PER + J
    return tl.load(base + offs_t[:, None].to(tl.int64) * st + offs_c[None, :].to(tl.int64) * sc,
                   mask=tmask[:, None], other=0.0)


@triton.jit
def _load_fp_planes(base, offs_t, tmask, st, sc, PER: tl.constexpr, D: tl.constexpr):
    """A full-precision [tokens, D] tile loaded contiguously (16-byte loads), split into its PER channel
    planes in registers (plane j = channels j, j + PER, ...); FP_CONTIG. With PER == 2 the last two are
    the first two again (unused)."""
    offs_c = tl.arange(0, D)
    x = tl.load(base + offs_t[:, None].to(tl.int64) * st + offs_c[None, :].to(tl.int64) * sc,
                mask=tmask[:, None], other=0.0)
    if PER == 4:
        # channel 4 i + 2 j1 + j0 -> [i, j1, j0]; split j0, then j1
        e, o = tl.split(tl.reshape(x, [x.shape[0], D // 4, 2, 2]))
        p0, p2 = tl.split(e)
        p1, p3 = tl.split(o)
    else:
        p0, p1 = tl.split(tl.reshape(x, [x.shape[0], D // 2, 2]))
        p2 = p0
        p3 = p1
    return p0, p1, p2, p3


@triton.jit
def _load_fp_tile(base, offs_t, tmask, st, sc, PER: tl.constexpr, D: tl.constexpr, FP_CONTIG: tl.constexpr):
    """The PER channel planes of a full-precision [tokens, D] tile: one strided load per plane, or (FP_CONTIG)
    one contiguous load split in registers. With PER == 2 the last two are the first two again (unused)."""
    if PER == 1:  # ternary V: one plane in natural channel order (x1..x3 unused)
        x0 = _load_fp_plane(base, offs_t, tmask, st, sc, 0, 1, D)
        x1 = x0
        x2 = x0
        x3 = x0
    elif FP_CONTIG:
        x0, x1, x2, x3 = _load_fp_planes(base, offs_t, tmask, st, sc, PER, D)
    else:
        DP: tl.constexpr = D // PER
        x0 = _load_fp_plane(base, offs_t, tmask, st, sc, 0, PER, DP)
        x1 = _load_fp_plane(base, offs_t, tmask, st, sc, 1, PER, DP)
        if PER == 4:
            x2 = _load_fp_plane(base, offs_t, tmask, st, sc, 2, PER, DP)
            x3 = _load_fp_plane(base, offs_t, tmask, st, sc, 3, PER, DP)
        else:
            x2 = x0
            x3 = x1
    return x0, x1, x2, x3


@triton.jit
def _bc(x, SUB: tl.constexpr):
    """Score-domain per-token vectors: [BLOCK_N] broadcast over rows (SUB == 1) or already [M, BLOCK_N // SUB]."""
    if SUB == 1:
        return x[None, :]
    else:
        return x


@triton.jit
def _rows_select(raw, sbr, SUB: tl.constexpr):
    """Row-filled tiles (SUB > 1): rows are (token sub-block, query row); row (b, r) keeps only the
    columns of its own sub-block: [M, BLOCK_N] -> [M, BLOCK_N // SUB]."""
    if SUB == 1:
        return raw
    else:
        M: tl.constexpr = raw.shape[0]
        BN_S: tl.constexpr = raw.shape[1] // SUB
        # (a binary where-tree over the bits of sb after a permute measured worse: +81 instructions, the
        # permuted layout sent the P operand through shared memory)
        r3 = tl.reshape(raw, [M, SUB, BN_S])
        sel = sbr[:, None, None] == tl.arange(0, SUB)[None, :, None]
        return tl.sum(tl.where(sel, r3, 0.0), axis=1)


@triton.jit
def _rows_expand(p, sbr, SUB: tl.constexpr):
    """Inverse of _rows_select: [M, BLOCK_N // SUB] -> [M, BLOCK_N], zeros outside the row's sub-block
    (the block-diagonal probability operand of the V product)."""
    if SUB == 1:
        return p
    else:
        M: tl.constexpr = p.shape[0]
        BN_S: tl.constexpr = p.shape[1]
        sel = sbr[:, None, None] == tl.arange(0, SUB)[None, :, None]
        p3 = tl.where(sel, p[:, None, :], tl.zeros_like(p)[:, None, :])
        return tl.reshape(p3, [M, SUB * BN_S])


@triton.jit
def _group_allreduce(x, GFILL: tl.constexpr):
    """Group fill with grouped keys: rows (g, m) hold the channel group g part of query row m's scores; every
    row gets the sum over g of its query row's parts: [M, N] -> [M, N]."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    t = tl.sum(tl.reshape(x, [GFILL, M // GFILL, N]), 0)
    return tl.reshape(tl.broadcast_to(t[None, :, :], [GFILL, M // GFILL, N]), [M, N])


@triton.jit
def _group_bcast(x, M: tl.constexpr, GFILL: tl.constexpr):
    """[GFILL, N] per-group values -> [M, N] float32, each group's row repeated for its M // GFILL MMA rows."""
    N: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x.to(tl.float32)[:, None, :], [GFILL, M // GFILL, N]), [M, N])


@triton.jit
def _group_rows_load(base, offs_s64, st, sg, smask, grow, M: tl.constexpr, GFILL: tl.constexpr,
                     GF_BCAST: tl.constexpr):
    """Per-token scale (or zero) of each row's channel group for a tile, [M, BLOCK_N] float32: loaded per row
    (a 2D gather, M x BLOCK_N loads), or (GF_BCAST) once per group [GFILL, BLOCK_N] and broadcast to the
    M // GFILL rows of each group."""
    if GF_BCAST:
        gidx = tl.arange(0, GFILL).to(tl.int64)
        x = _group_bcast(tl.load(base + offs_s64[None, :] * st + gidx[:, None] * sg, mask=smask[None, :], other=0.0),
                         M, GFILL)
    else:
        x = tl.load(base + offs_s64[None, :] * st + grow.to(tl.int64)[:, None] * sg, mask=smask[None, :],
                    other=0.0).to(tl.float32)
    return x


@triton.jit
def _softmax_step(s, m_i, l_i):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _mask_scores(s, tmask, pos, row_lim, CAUSAL: tl.constexpr, SUB: tl.constexpr = 1):
    s = tl.where(_bc(tmask, SUB), s, float("-inf"))
    if CAUSAL:
        s = tl.where(_bc(pos, SUB) <= row_lim[:, None], s, float("-inf"))
    return s


@triton.jit
def _elem_meta(s_base, s_t, s_g, z_base, z_t, z_g, offs_t64, tmask, offs_g, DT: tl.constexpr = tl.float32):
    """Per-element scale and zero of a tile whose columns sit in the groups ``offs_g``: [tokens, columns] in DT
    (float32 unless given), 0 on masked tokens (KIVI's V in K's window; with one column per group, the loads of
    ``_group_meta``, which the other register-dequantizing forms use)."""
    m = tmask[:, None]
    sc = tl.load(s_base + offs_t64[:, None] * s_t + offs_g[None, :] * s_g, mask=m, other=0.0).to(DT)
    zr = tl.load(z_base + offs_t64[:, None] * z_t + offs_g[None, :] * z_g, mask=m, other=0.0).to(DT)
    return sc, zr


@triton.jit
def _group_meta(s_base, s_t, s_g, z_base, z_t, z_g, offs_t64, tmask, BN: tl.constexpr, NG: tl.constexpr,
                GP: tl.constexpr, DT: tl.constexpr = tl.float32):
    """Per-element scale and zero of a [BN, NG * GP] tile whose column i sits in group i // GP: the tile's [BN, NG]
    scales / zeros loaded once (contiguous per token) and each repeated over its GP columns by a broadcast and
    reshape, instead of one gathered load per element (``_elem_meta``)."""
    s, z = _elem_meta(s_base, s_t, s_g, z_base, z_t, z_g, offs_t64, tmask, tl.arange(0, NG).to(tl.int64), DT)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], [BN, NG, GP]), [BN, NG * GP])
    z = tl.reshape(tl.broadcast_to(z[:, :, None], [BN, NG, GP]), [BN, NG * GP])
    return s, z


@triton.jit
def _v_mixed_plane(vb, vs, vz, w, in_mid, J: tl.constexpr, V_BITS: tl.constexpr, DTYPE: tl.constexpr):
    return tl.where(in_mid[:, None], _plane_f32(vb, J, V_BITS) * vs + vz, w.to(tl.float32)).to(DTYPE)


@triton.jit
def _load_v_mixed(vw_base, svt, svc, offs_t, tmask, v_lag, v_wcap, vc_base, svc_t, svc_c, vs_base, svs_t, svs_g,
                  vz_base, svz_t, svz_g, v_mid0, PER_V: tl.constexpr, D: tl.constexpr, V_GROUP: tl.constexpr,
                  DTYPE: tl.constexpr, RING: tl.constexpr = False, vrow=0):
    """The V planes of a tile of K's window (KV_MIXED): V quantizes earlier than K (KIVI: keys flush a
    whole token group at a time, values every token), so the first ``v_lag`` tokens of K's window are
    still packed in V's middle (at ``v_mid0 + t``, dequantized here in float32) and the rest sit in V's
    window at ``t - v_lag`` (RING: at the ring rows ``vrow``, see _decode_split_kernel's window loop)."""
    V_BITS: tl.constexpr = 8 // PER_V
    DPV: tl.constexpr = D // PER_V
    in_win = tmask & (offs_t >= v_lag) & (offs_t - v_lag < v_wcap)
    if RING:
        w0, w1, w2, w3 = _load_fp_tile(vw_base, vrow, in_win, svt, svc, PER_V, D, False)
    else:
        w0, w1, w2, w3 = _load_fp_tile(vw_base, offs_t - v_lag, in_win, svt, svc, PER_V, D, False)
    in_mid = tmask & (offs_t < v_lag)
    tm = (v_mid0 + offs_t).to(tl.int64)
    vb = tl.load(vc_base + tm[:, None] * svc_t + tl.arange(0, DPV)[None, :] * svc_c, mask=in_mid[:, None],
                 other=0).to(tl.int16)
    if V_GROUP == D:
        vs = tl.load(vs_base + tm * svs_t, mask=in_mid, other=0.0).to(tl.float32)[:, None]
        vz = tl.load(vz_base + tm * svz_t, mask=in_mid, other=0.0).to(tl.float32)[:, None]
    else:
        offs_g = (tl.arange(0, DPV) // (V_GROUP // PER_V)).to(tl.int64)
        vs, vz = _elem_meta(vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, tm, in_mid, offs_g)
    v0 = _v_mixed_plane(vb, vs, vz, w0, in_mid, 0, V_BITS, DTYPE)
    v1 = _v_mixed_plane(vb, vs, vz, w1, in_mid, 1, V_BITS, DTYPE)
    if PER_V == 4:
        v2 = _v_mixed_plane(vb, vs, vz, w2, in_mid, 2, V_BITS, DTYPE)
        v3 = _v_mixed_plane(vb, vs, vz, w3, in_mid, 3, V_BITS, DTYPE)
    else:
        v2 = v0
        v3 = v1
    return v0, v1, v2, v3


@triton.jit
def _acc_init(M: tl.constexpr, DP: tl.constexpr, PER_V: tl.constexpr):
    """The output accumulators, one [M, DP] float32 plane per V plane; ternary values (PER_V 1) have one
    natural-order plane and acc1..3 become unused [M, 2] stand-ins."""
    acc0 = tl.zeros([M, DP], tl.float32)
    if PER_V >= 2:
        acc1 = tl.zeros([M, DP], tl.float32)
        acc2 = tl.zeros([M, DP], tl.float32)
        acc3 = tl.zeros([M, DP], tl.float32)
    else:
        acc1 = tl.zeros([M, 2], tl.float32)
        acc2 = acc1
        acc3 = acc1
    return acc0, acc1, acc2, acc3


@triton.jit
def _acc_rescale(acc0, acc1, acc2, acc3, alpha, PER_V: tl.constexpr, LAZY: tl.constexpr = False):
    """The output planes' online-softmax rescale by the tile's alpha (planes 2 and 3 exist for 2-bit V only).
    LAZY: skipped when no row's running max grew (every alpha is exactly 1, so the skip changes no bit)."""
    if LAZY:
        if tl.min(alpha, 0) < 1.0:
            acc0, acc1, acc2, acc3 = _acc_scale(acc0, acc1, acc2, acc3, alpha[:, None], PER_V)
    else:
        acc0, acc1, acc2, acc3 = _acc_scale(acc0, acc1, acc2, acc3, alpha[:, None], PER_V)
    return acc0, acc1, acc2, acc3


@triton.jit
def _acc_scale(acc0, acc1, acc2, acc3, f, PER_V: tl.constexpr):
    """The output planes times ``f`` (a row's alpha as [rows, 1], or a scalar)."""
    acc0 = acc0 * f
    if PER_V >= 2:
        acc1 = acc1 * f
    if PER_V == 4:
        acc2 = acc2 * f
        acc3 = acc3 * f
    return acc0, acc1, acc2, acc3


@triton.jit
def _fp_k_dot(q0, q1, q2, q3, k_base, offs_t, tmask, skt, skc, PER_K: tl.constexpr, D: tl.constexpr,
              FP_CONTIG: tl.constexpr, KF1: tl.constexpr, KF2: tl.constexpr, KF3: tl.constexpr,
              USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """q . k over the channel planes of a full-precision key tile (KF_j undo the shifted q planes)."""
    k0, k1, k2, k3 = _load_fp_tile(k_base, offs_t, tmask, skt, skc, PER_K, D, FP_CONTIG)
    raw = _mm(q0, tl.trans(k0), USE_DOT, DOT_FP32)
    raw += KF1 * _mm(q1, tl.trans(k1), USE_DOT, DOT_FP32)
    if PER_K == 4:
        raw += KF2 * _mm(q2, tl.trans(k2), USE_DOT, DOT_FP32)
        raw += KF3 * _mm(q3, tl.trans(k3), USE_DOT, DOT_FP32)
    return raw


@triton.jit
def _fp_tile(q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
             k_base, skt, skc, v_base, svt, svc, offs_t, tmask, offs_s, smask, pos_s, sbr, row_lim, qk_scale,
             PER_K: tl.constexpr, PER_V: tl.constexpr, D: tl.constexpr, K_SHIFTED: tl.constexpr,
             V_SHIFTED: tl.constexpr, CAUSAL: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
             DTYPE: tl.constexpr, SUB: tl.constexpr, FP_CONTIG: tl.constexpr,
             v_lag=0, v_wcap=0, vc_base=None, svc_t=0, svc_c=0, vs_base=None, svs_t=0, svs_g=0,
             vz_base=None, svz_t=0, svz_g=0, v_mid0=0, V_MIXED: tl.constexpr = False, V_GROUP: tl.constexpr = 0,
             K_GF: tl.constexpr = False, GFILL: tl.constexpr = 1, hrow=0, HFILL: tl.constexpr = 1, skh=0, svh=0,
             RING: tl.constexpr = False, krow=0, vrow=0):
    """One tile of full-precision tokens (sink or window). With K_SHIFTED the q planes hold
    q_j * 2**-(j * bits): each plane's product is scaled back in float32; with V_SHIFTED the output
    planes hold 2**(j * bits) * out_j, so p is scaled by that (exact) factor. offs_s / smask / pos_s are
    the score-domain tokens (see _bc); with FP_CONTIG the tile is loaded contiguously and split into
    planes in registers instead of one strided load per plane. V_MIXED (K's window when V quantized
    more of the sequence than K): V comes from _load_v_mixed. HFILL > 1 (head fill): rows (KV head hg, query
    row m), head hg's K / V at ``base + hg * skh / svh``. RING (a ring window): the tile's K / V rows are
    ``krow`` / ``vrow`` instead of ``offs_t`` (which still names the tokens for the lag masks)."""
    if RING:
        k_rows = krow
        v_rows = vrow
    else:
        k_rows = offs_t
        v_rows = offs_t
    KB: tl.constexpr = 8 // PER_K
    VB: tl.constexpr = 8 // PER_V
    KF1: tl.constexpr = (1 << KB) if K_SHIFTED else 1
    KF2: tl.constexpr = (1 << (2 * KB)) if K_SHIFTED else 1
    KF3: tl.constexpr = (1 << (3 * KB)) if K_SHIFTED else 1
    if HFILL > 1:
        raw = tl.zeros([q0.shape[0], offs_t.shape[0]], tl.float32)
        for hg in tl.static_range(HFILL):
            rh = _fp_k_dot(q0, q1, q2, q3, k_base + hg * skh, k_rows, tmask, skt, skc, PER_K, D, FP_CONTIG, KF1, KF2,
                           KF3, USE_DOT, DOT_FP32)
            raw = tl.where(hrow[:, None] == hg, rh, raw)
    else:
        raw = _fp_k_dot(q0, q1, q2, q3, k_base, k_rows, tmask, skt, skc, PER_K, D, FP_CONTIG, KF1, KF2, KF3, USE_DOT,
                        DOT_FP32)
    if K_GF:  # the q rows hold one channel group each: sum the groups of each query row
        raw = _group_allreduce(raw, GFILL)
    raw = _rows_select(raw, sbr, SUB)
    s = _mask_scores(raw * qk_scale, smask, pos_s, row_lim, CAUSAL, SUB)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
    VF1: tl.constexpr = (1 << VB) if V_SHIFTED else 1
    VF2: tl.constexpr = (1 << (2 * VB)) if V_SHIFTED else 1
    VF3: tl.constexpr = (1 << (3 * VB)) if V_SHIFTED else 1
    if HFILL > 1:
        acc0, acc1, acc2, acc3 = _acc_rescale(acc0, acc1, acc2, acc3, alpha, PER_V)
        p0 = p.to(DTYPE)
        p1 = (p * VF1).to(DTYPE)
        p2 = (p * VF2).to(DTYPE)
        p3 = (p * VF3).to(DTYPE)
        for hg in tl.static_range(HFILL):
            v0, v1, v2, v3 = _load_fp_tile(v_base + hg * svh, v_rows, tmask, svt, svc, PER_V, D, FP_CONTIG)
            mine = hrow[:, None] == hg
            acc0 += _mm(tl.where(mine, p0, tl.zeros_like(p0)), v0, USE_DOT, DOT_FP32)
            acc1 += _mm(tl.where(mine, p1, tl.zeros_like(p1)), v1, USE_DOT, DOT_FP32)
            if PER_V == 4:
                acc2 += _mm(tl.where(mine, p2, tl.zeros_like(p2)), v2, USE_DOT, DOT_FP32)
                acc3 += _mm(tl.where(mine, p3, tl.zeros_like(p3)), v3, USE_DOT, DOT_FP32)
        return m_i, l_i, alpha, acc0, acc1, acc2, acc3
    if V_MIXED:
        v0, v1, v2, v3 = _load_v_mixed(v_base, svt, svc, offs_t, tmask, v_lag, v_wcap, vc_base, svc_t, svc_c,
                                       vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, v_mid0, PER_V, D, V_GROUP,
                                       DTYPE, RING, vrow)
    else:
        v0, v1, v2, v3 = _load_fp_tile(v_base, v_rows, tmask, svt, svc, PER_V, D, FP_CONTIG)
    acc0 = acc0 * alpha[:, None] + _mm(_rows_expand(p.to(DTYPE), sbr, SUB), v0, USE_DOT, DOT_FP32)
    if PER_V >= 2:
        acc1 = acc1 * alpha[:, None] + _mm(_rows_expand((p * VF1).to(DTYPE), sbr, SUB), v1, USE_DOT, DOT_FP32)
    if PER_V == 4:
        acc2 = acc2 * alpha[:, None] + _mm(_rows_expand((p * VF2).to(DTYPE), sbr, SUB), v2, USE_DOT, DOT_FP32)
        acc3 = acc3 * alpha[:, None] + _mm(_rows_expand((p * VF3).to(DTYPE), sbr, SUB), v3, USE_DOT, DOT_FP32)
    return m_i, l_i, alpha, acc0, acc1, acc2, acc3


@triton.jit
def _kf(J: tl.constexpr, BITS: tl.constexpr, SHIFTED: tl.constexpr):
    F: tl.constexpr = (1 << (J * BITS)) if SHIFTED else 1
    return F


@triton.jit
def _kc_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, t0, end, K_GROUP: tl.constexpr, DPK: tl.constexpr,
             PER_K: tl.constexpr):
    """PREFETCH with per-channel keys: the scale and zero of every channel plane ([DPK] float32 each, planes 2
    and 3 repeat 0 and 1 for 4-bit keys) of the key token group holding the tile at t0 (zeros past ``end``)."""
    gi = t0 // K_GROUP
    chan = tl.arange(0, DPK).to(tl.int64) * PER_K
    m = (t0 + chan * 0) < end  # (a vector mask: the interpreter takes no scalar one)
    ks_row = ks_base + gi * sks_t
    kz_row = kz_base + gi * skz_t
    s0 = tl.load(ks_row + chan * sks_g, mask=m, other=0.0).to(tl.float32)
    z0 = tl.load(kz_row + chan * skz_g, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(ks_row + (chan + 1) * sks_g, mask=m, other=0.0).to(tl.float32)
    z1 = tl.load(kz_row + (chan + 1) * skz_g, mask=m, other=0.0).to(tl.float32)
    if PER_K == 4:
        s2 = tl.load(ks_row + (chan + 2) * sks_g, mask=m, other=0.0).to(tl.float32)
        z2 = tl.load(kz_row + (chan + 2) * skz_g, mask=m, other=0.0).to(tl.float32)
        s3 = tl.load(ks_row + (chan + 3) * sks_g, mask=m, other=0.0).to(tl.float32)
        z3 = tl.load(kz_row + (chan + 3) * skz_g, mask=m, other=0.0).to(tl.float32)
    else:
        s2 = s0
        z2 = z0
        s3 = s1
        z3 = z1
    return s0, z0, s1, z1, s2, z2, s3, z3


@triton.jit
def _kc_deq(kb, s, z, J: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VAL: tl.constexpr,
            DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, FAST_ASM: tl.constexpr):
    """Plane J of a per-channel-key tile with its channels' scale s and zero z ([DP] float32)."""
    SHIFTED: tl.constexpr = MAGIC == 0x6400
    c = _v_plane_exact(kb, J, BITS, MAGIC, MAGIC_VAL, DTYPE, DOT_FP32, SHIFTED, FAST_ASM)
    sc = s * (1.0 / _kf(J, BITS, SHIFTED))
    if DOT_FP32:
        return c * sc[None, :] + z[None, :]
    else:
        return c * sc.to(DTYPE)[None, :] + z.to(DTYPE)[None, :]


@triton.jit
def _sincos(x, FAST: tl.constexpr):
    """(cos x, sin x) of float32 angles. FAST (GPU): x reduced to [-pi, pi] (Cody-Waite: 2 pi = 6.28125 + a
    float32 remainder; k * 6.28125 is exact for |k| < 2**16, i.e. angles below 4e5 rad) and the hardware's
    cos.approx / sin.approx (absolute error about 1e-6 there): a few instructions where libdevice's cosf / sinf
    (tl.cos / tl.sin) compile to hundreds with a slow path that spills. Elsewhere tl.cos / tl.sin."""
    if FAST:
        k = (x * 0.15915494309189535 + 12582912.0) - 12582912.0
        r = x - k * 6.28125
        r = r - k * 0.0019353071795864769
        c = tl.inline_asm_elementwise(asm="cos.approx.ftz.f32 $0, $1;", constraints="=f,f", args=[r],
                                      dtype=tl.float32, is_pure=True, pack=1)
        sn = tl.inline_asm_elementwise(asm="sin.approx.ftz.f32 $0, $1;", constraints="=f,f", args=[r],
                                       dtype=tl.float32, is_pure=True, pack=1)
    else:
        c = tl.cos(x)
        sn = tl.sin(x)
    return c, sn


@triton.jit
def _rope_plane(kb, J: tl.constexpr, ks, kz, pos, w, qa, qb, BITS: tl.constexpr, DTYPE: tl.constexpr,
                USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, FAST: tl.constexpr):
    """Keys quantized before RoPE (K_ROPE), plane J: the dequantized key k (its group's scale ks and zero kz per
    element, float32) at token positions ``pos`` and stored-channel frequencies ``w``; q . R(pos) k in stored order
    is qa . (k cos) + qb . (k sin) with qb the rotate-half partner of q with its sign (``_rope_operands``). The angle
    is the reference's float32 pos * w (kvcompile.cache.packed.rotate)."""
    k = _plane_f32(kb, J, BITS) * ks + kz
    c, sn = _sincos(pos[:, None] * w[None, :], FAST)
    kc = (k * c).to(DTYPE)
    kn = (k * sn).to(DTYPE)
    return _mm(qa, tl.trans(kc), USE_DOT, DOT_FP32) + _mm(qb, tl.trans(kn), USE_DOT, DOT_FP32)


@triton.jit
def _rope_tab_plane(kb, J: tl.constexpr, ks, kz, qa, qb, c0, s0, tab, tmask, BN: tl.constexpr, DP: tl.constexpr,
                    PER: tl.constexpr, BITS: tl.constexpr, RC: tl.constexpr, RM: tl.constexpr, RMV: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Keys quantized before RoPE by angle addition (ROPE_TAB, NOTES.md v22), plane J. Token t0 + u of the tile has
    angle (p0 + u) w: cos / sin of p0 w (c0, s0 [DP] float32, once per tile) rotate q, qa' = qa c0 + qb s0 and
    qb' = qb c0 - qa s0, and the in-tile part cos / sin of u w comes from ``tab`` ([2, PER, BN, DP]: cos then sin,
    plane-major), so q . R(p0 + u) k = qa' . (k cos(u w)) + qb' . (k sin(u w)) with no per-element angle. The key
    k = c * ks + kz and the products run in RC (fp16 or bf16 pairs on the GPU; float32 on the interpreter)."""
    # masked by the tile's tokens: loads that depend on the loop, so they are not hoisted out of it into registers
    offs = tl.arange(0, BN)[:, None] * DP + tl.arange(0, DP)[None, :]
    tc = tl.load(tab + J * (BN * DP) + offs, mask=tmask[:, None], other=0.0)
    ts = tl.load(tab + (PER + J) * (BN * DP) + offs, mask=tmask[:, None], other=0.0)
    if DOT_FP32:
        qa = qa.to(tl.float32)
        qb = qb.to(tl.float32)
        cr = c0
        sr = s0
        tc = tc.to(tl.float32)
        ts = ts.to(tl.float32)
    else:
        qa = qa.to(RC)
        qb = qb.to(RC)
        cr = c0.to(RC)
        sr = s0.to(RC)
    qa_r = qa * cr[None, :] + qb * sr[None, :]
    qb_r = qb * cr[None, :] - qa * sr[None, :]
    k = _v_plane_exact(kb, J, BITS, RM, RMV, RC, DOT_FP32, False, False) * ks + kz
    return _mm(qa_r, tl.trans(k * tc), USE_DOT, DOT_FP32) + _mm(qb_r, tl.trans(k * ts), USE_DOT, DOT_FP32)


@triton.jit
def _ternary_digit(b, j):
    """Digit j (0..4) of base-3 bytes b (float32 in [0, 242]) as float32: floor(b / 3**j) mod 3, exact (each
    quotient sits at least 1 / 162 from the next integer, far above float32 rounding)."""
    inv = tl.where(j == 0, 1.0, tl.where(j == 1, 1.0 / 3, tl.where(j == 2, 1.0 / 9, tl.where(j == 3, 1.0 / 27,
                                                                                           1.0 / 81))))
    qt = tl.floor((b + 0.5) * inv)
    return qt - 3.0 * tl.floor((qt + 0.5) * (1.0 / 3))


@triton.jit
def _load_codes(base, offs_t64, tmask, st, sc, DP: tl.constexpr, RAW: tl.constexpr):
    """A [tokens, DP] uint8 code tile; as int16 unless the PTX unpack takes the raw bytes (RAW)."""
    cb = tl.load(base + offs_t64[:, None] * st + tl.arange(0, DP)[None, :] * sc, mask=tmask[:, None], other=0)
    if not RAW:
        cb = cb.to(tl.int16)
    return cb


@triton.jit
def _k_magic_dot(kb, q0, q1, q2, q3, K_BITS: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr,
                 K_SHIFTED: tl.constexpr, FAST_ASM: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                 FMT: tl.constexpr = 0):
    """q . (MAGIC_VAL + c) over the planes of a key code tile (scales and the offset are the caller's)."""
    raw = _mm(q0, tl.trans(_plane_magic(kb, 0, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM, FMT)), USE_DOT, DOT_FP32)
    raw += _mm(q1, tl.trans(_plane_magic(kb, 1, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM, FMT)), USE_DOT, DOT_FP32)
    if K_BITS == 2:
        raw += _mm(q2, tl.trans(_plane_magic(kb, 2, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), USE_DOT, DOT_FP32)
        raw += _mm(q3, tl.trans(_plane_magic(kb, 3, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), USE_DOT, DOT_FP32)
    return raw


@triton.jit
def _v_exact_dot(pv, vb, acc0, acc1, acc2, acc3, V_BITS: tl.constexpr, V_MAGIC: tl.constexpr,
                 V_MAGIC_VAL: tl.constexpr, V_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, V_SHIFTED: tl.constexpr,
                 FAST_ASM: tl.constexpr, USE_DOT: tl.constexpr, FMT: tl.constexpr = 0):
    """acc_j += pv . plane_j(vb) with the exact codes ((MAGIC_VAL + c) - MAGIC_VAL is exact in V_DTYPE;
    leaving the offset in accumulates error)."""
    acc0 += _mm(pv, _v_plane_exact(vb, 0, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM, FMT),
                USE_DOT, DOT_FP32)
    acc1 += _mm(pv, _v_plane_exact(vb, 1, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM, FMT),
                USE_DOT, DOT_FP32)
    if V_BITS == 2:
        acc2 += _mm(pv, _v_plane_exact(vb, 2, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM), USE_DOT, DOT_FP32)
        acc3 += _mm(pv, _v_plane_exact(vb, 3, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM), USE_DOT, DOT_FP32)
    return acc0, acc1, acc2, acc3


@triton.jit
def _meta_load(base, st, sg, o64, m, NG: tl.constexpr):
    """Per-token values of a tile: [BLOCK_N] (NG == 1) or [NG, BLOCK_N] (NG groups at stride sg), float32."""
    if NG == 1:
        x = tl.load(base + o64 * st, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.arange(0, NG).to(tl.int64)
        x = tl.load(base + o64[None, :] * st + g[:, None] * sg, mask=m[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _tile_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, t0, end,
               BLOCK_N: tl.constexpr, KG: tl.constexpr = 1, VG: tl.constexpr = 1, K_META: tl.constexpr = True):
    """The per-token scales and zeros of the K and V tile at t0, float32: [BLOCK_N] for one group per token,
    [KG / VG, BLOCK_N] for a side grouped by group fill (broadcast to its rows by the tile). PREFETCH loads
    them one tile ahead, so their global-memory latency overlaps the tile before instead of stalling the tile
    that needs them (they are plain loads; only the code tiles go through async copies). Without K_META (keys
    per channel: _kc_meta) the K part is zeros."""
    offs = t0 + tl.arange(0, BLOCK_N)
    m = offs < end
    o64 = offs.to(tl.int64)
    if K_META:
        ks = _meta_load(ks_base, sks_t, sks_g, o64, m, KG)
        kz = _meta_load(kz_base, skz_t, skz_g, o64, m, KG)
    else:
        ks = tl.zeros([BLOCK_N], tl.float32)
        kz = ks
    vs = _meta_load(vs_base, svs_t, svs_g, o64, m, VG)
    vz = _meta_load(vz_base, svz_t, svz_g, o64, m, VG)
    return ks, kz, vs, vz


@triton.jit
def _packed_tile(q0, q1, q2, q3, qsum, qsum_mag, m_i, l_i, acc0, acc1, acc2, acc3, zacc,
                 kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                 vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g,
                 offs_t, tmask, offs_s, smask, pos_s, sbr, row_lim, qk_scale,
                 K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
                 D: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VAL: tl.constexpr,
                 V_MAGIC: tl.constexpr, V_MAGIC_VAL: tl.constexpr, V_DTYPE: tl.constexpr,
                 K_SHIFTED: tl.constexpr, V_SHIFTED: tl.constexpr, FAST_ASM: tl.constexpr, CAUSAL: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, DTYPE: tl.constexpr,
                 SUB: tl.constexpr, t0=0, K_CHANNEL: tl.constexpr = False, grow=0, GFILL: tl.constexpr = 1,
                 K_GF: tl.constexpr = False, V_GF: tl.constexpr = False, GF_BCAST: tl.constexpr = False,
                 KC_DEQ: tl.constexpr = False, hrow=0, HFILL: tl.constexpr = 1, skc_h=0, sks_h=0, skz_h=0,
                 svc_h=0, svs_h=0, svz_h=0, PREFETCH: tl.constexpr = False, pks=None, pkz=None, pvs=None, pvz=None,
                 pkc=None, K_FMT: tl.constexpr = 0, V_FMT: tl.constexpr = 0, prope=None, K_ROPE: tl.constexpr = False,
                 ROPE_TAB: tl.constexpr = 0, LAZY: tl.constexpr = False, V_DEN: tl.constexpr = False):
    """One tile of packed middle tokens. Codes load per token (offs_t, tmask); scales, zeros and the softmax
    run in the score domain (offs_s, smask, pos_s: see _bc and _rows_select). K_CHANNEL (per-channel keys,
    KIVI): the tile [t0, t0 + BLOCK_N) lies inside one token group of K_GROUP tokens, whose per-channel
    scale s and zero z fold into q: q . (c * s + z) = (q * s) . c + q . z. HFILL > 1 ("head fill", one group
    per token): the rows are (KV head hg, query row m) of HFILL heads (``*_h`` strides from the bases): each
    head's tile is unpacked once and multiplied by all rows, and each row keeps its own head's product.
    8-bit codes (one group per token only): the code tiles are int16 words of two codes (PER 2, like 4-bit);
    K_FMT / V_FMT 1 (int8) and 2 (fp8) have no zero point, fp8's planes carry a 2**-8 the scales undo."""
    PER_K: tl.constexpr = 2 if K_BITS == 8 else 8 // K_BITS
    PER_V: tl.constexpr = 1 if V_BITS == 15 else (2 if V_BITS == 8 else 8 // V_BITS)
    DPK: tl.constexpr = D // PER_K
    DPV: tl.constexpr = D // PER_V
    offs_t64 = offs_t.to(tl.int64)
    offs_s64 = offs_s.to(tl.int64)

    # ---- K: scores --------------------------------------------------------------------------------
    # the PTX unpack takes the raw bytes (fp16 magic, shifted codes); the other forms work on int16
    # V_DEN (V_SHIFTED only): the value codes as fp16 subnormals 2**-24 * 2**(J * bits) * c, nothing to subtract; the
    # caller holds the accumulators scaled by 2**-24 around the packed loop
    VMG: tl.constexpr = 0 if V_DEN else V_MAGIC
    VMV: tl.constexpr = 0.0 if V_DEN else V_MAGIC_VAL
    K_RAW: tl.constexpr = FAST_ASM and (K_SHIFTED or (K_CHANNEL and KC_DEQ and V_MAGIC == 0x6400) or K_FMT == 3)
    if HFILL == 1:
        kb = _load_codes(kc_base, offs_t64, tmask, skc_t, skc_c, DPK, K_RAW)
    if K_ROPE:
        # keys quantized before RoPE: dequantized per element (each plane element's group scale / zero) and
        # rotated by their positions S + t through two products per plane (_rope_plane)
        qb0, qb1, qb2, qb3, w0, w1, w2, w3, rpos0, rtab = prope
        if ROPE_TAB:
            # angle addition (v22): the tile's base angle rotates q, the in-tile offsets come from the table
            RC: tl.constexpr = tl.float16 if ROPE_TAB == 1 else tl.bfloat16  # the codes' magic-number dtype
            RD: tl.constexpr = tl.float32 if DOT_FP32 else RC  # the per-element math (float32 on the interpreter)
            RM: tl.constexpr = 0x6400 if ROPE_TAB == 1 else 0x4300
            RMV: tl.constexpr = 1024.0 if ROPE_TAB == 1 else 128.0
            BNK: tl.constexpr = offs_t.shape[0]
            if K_GROUP == D:
                ks = tl.load(ks_base + offs_t64 * sks_t, mask=tmask, other=0.0).to(RD)[:, None]
                kz = tl.load(kz_base + offs_t64 * skz_t, mask=tmask, other=0.0).to(RD)[:, None]
            else:
                ks, kz = _group_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, offs_t64, tmask, BNK, D // K_GROUP,
                                     K_GROUP // PER_K, RD)
            p0 = (rpos0 + t0).to(tl.float32)
            c0, s0 = _sincos(p0 * w0, FAST_ASM)
            raw = _rope_tab_plane(kb, 0, ks, kz, q0, qb0, c0, s0, rtab, tmask, BNK, DPK, PER_K, K_BITS, RC, RM, RMV,
                                  USE_DOT, DOT_FP32)
            c0, s0 = _sincos(p0 * w1, FAST_ASM)
            raw += _rope_tab_plane(kb, 1, ks, kz, q1, qb1, c0, s0, rtab, tmask, BNK, DPK, PER_K, K_BITS, RC, RM, RMV,
                                   USE_DOT, DOT_FP32)
            if PER_K == 4:
                c0, s0 = _sincos(p0 * w2, FAST_ASM)
                raw += _rope_tab_plane(kb, 2, ks, kz, q2, qb2, c0, s0, rtab, tmask, BNK, DPK, PER_K, K_BITS, RC, RM,
                                       RMV, USE_DOT, DOT_FP32)
                c0, s0 = _sincos(p0 * w3, FAST_ASM)
                raw += _rope_tab_plane(kb, 3, ks, kz, q3, qb3, c0, s0, rtab, tmask, BNK, DPK, PER_K, K_BITS, RC, RM,
                                       RMV, USE_DOT, DOT_FP32)
        else:
            ks, kz = _group_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, offs_t64, tmask, offs_t.shape[0],
                                 D // K_GROUP, K_GROUP // PER_K)
            pos = (rpos0 + offs_t).to(tl.float32)
            raw = _rope_plane(kb, 0, ks, kz, pos, w0, q0, qb0, K_BITS, DTYPE, USE_DOT, DOT_FP32, FAST_ASM)
            raw += _rope_plane(kb, 1, ks, kz, pos, w1, q1, qb1, K_BITS, DTYPE, USE_DOT, DOT_FP32, FAST_ASM)
            if PER_K == 4:
                raw += _rope_plane(kb, 2, ks, kz, pos, w2, q2, qb2, K_BITS, DTYPE, USE_DOT, DOT_FP32, FAST_ASM)
                raw += _rope_plane(kb, 3, ks, kz, pos, w3, q3, qb3, K_BITS, DTYPE, USE_DOT, DOT_FP32, FAST_ASM)
        s = _rows_select(raw, sbr, SUB) * qk_scale
    elif HFILL > 1:
        # head fill: every row gets its own head's q . (M + c) (one unpack per head, shared by all rows),
        # then the same per-token scale / zero form as one head, with the scales broadcast per head
        MH: tl.constexpr = q0.shape[0]
        ks = _group_rows_load(ks_base, offs_s64, sks_t, sks_h, smask, hrow, MH, HFILL, True)
        kz = _group_rows_load(kz_base, offs_s64, skz_t, skz_h, smask, hrow, MH, HFILL, True)
        raw = tl.zeros([MH, offs_t.shape[0]], tl.float32)
        for hg in tl.static_range(HFILL):
            kbh = _load_codes(kc_base + hg * skc_h, offs_t64, tmask, skc_t, skc_c, DPK, K_RAW)
            rh = _k_magic_dot(kbh, q0, q1, q2, q3, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM, USE_DOT, DOT_FP32)
            raw = tl.where(hrow[:, None] == hg, rh, raw)
        s = ((raw - MAGIC_VAL * qsum_mag[:, None]) * ks + qsum[:, None] * kz) * qk_scale
    elif K_CHANNEL and KC_DEQ:
        # dequantize the key tile per plane (c_j * s + z per channel, see _kc_deq) in the V product's dtype
        # (fp16 where the scales are: 3 more mantissa bits than bf16 for bf16 models, q converted per tile);
        # with K_SHIFTED the q planes hold q_j * 2**-(j bits), undone on each plane's product
        if PREFETCH:  # the tile's key group's per-channel scale / zero, loaded one tile ahead (_kc_meta)
            s0, z0, s1, z1, s2, z2, s3, z3 = pkc
        else:
            s0, z0, s1, z1, s2, z2, s3, z3 = _kc_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, t0, t0 + 1, K_GROUP,
                                                      DPK, PER_K)
        k0 = _kc_deq(kb, s0, z0, 0, K_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, FAST_ASM)
        raw = _mm(q0.to(V_DTYPE), tl.trans(k0), USE_DOT, DOT_FP32)
        k1 = _kc_deq(kb, s1, z1, 1, K_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, FAST_ASM)
        raw += _kf(1, K_BITS, K_SHIFTED) * _mm(q1.to(V_DTYPE), tl.trans(k1), USE_DOT, DOT_FP32)
        if PER_K == 4:
            k2 = _kc_deq(kb, s2, z2, 2, K_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, FAST_ASM)
            raw += _kf(2, K_BITS, K_SHIFTED) * _mm(q2.to(V_DTYPE), tl.trans(k2), USE_DOT, DOT_FP32)
            k3 = _kc_deq(kb, s3, z3, 3, K_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, FAST_ASM)
            raw += _kf(3, K_BITS, K_SHIFTED) * _mm(q3.to(V_DTYPE), tl.trans(k3), USE_DOT, DOT_FP32)
        s = _rows_select(raw, sbr, SUB) * qk_scale
    elif K_CHANNEL:
        # q planes hold q_j * 2**-(j * bits) when K_SHIFTED (KF_j undoes it for the zero term); plane j's
        # element i is channel PER_K * i + j
        KB: tl.constexpr = K_BITS
        KF1: tl.constexpr = (1 << KB) if K_SHIFTED else 1
        KF2: tl.constexpr = (1 << (2 * KB)) if K_SHIFTED else 1
        KF3: tl.constexpr = (1 << (3 * KB)) if K_SHIFTED else 1
        gi = t0 // K_GROUP  # int32: group row offsets stay far below 2**31
        chan = tl.arange(0, DPK).to(tl.int64) * PER_K
        ks_row = ks_base + gi * sks_t
        kz_row = kz_base + gi * skz_t
        # per query row, q . z - MAGIC_VAL * sum(q s) summed elementwise over the planes, reduced once
        qs0 = (q0.to(tl.float32) * tl.load(ks_row + chan * sks_g).to(tl.float32)[None, :]).to(DTYPE)
        qs1 = (q1.to(tl.float32) * tl.load(ks_row + (chan + 1) * sks_g).to(tl.float32)[None, :]).to(DTYPE)
        off = q0.to(tl.float32) * tl.load(kz_row + chan * skz_g).to(tl.float32)[None, :] - MAGIC_VAL * qs0.to(tl.float32)
        off += (KF1 * q1.to(tl.float32)) * tl.load(kz_row + (chan + 1) * skz_g).to(tl.float32)[None, :] - MAGIC_VAL * qs1.to(tl.float32)
        raw = _mm(qs0, tl.trans(_plane_magic(kb, 0, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), USE_DOT, DOT_FP32)
        raw += _mm(qs1, tl.trans(_plane_magic(kb, 1, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), USE_DOT, DOT_FP32)
        if PER_K == 4:
            qs2 = (q2.to(tl.float32) * tl.load(ks_row + (chan + 2) * sks_g).to(tl.float32)[None, :]).to(DTYPE)
            qs3 = (q3.to(tl.float32) * tl.load(ks_row + (chan + 3) * sks_g).to(tl.float32)[None, :]).to(DTYPE)
            off += (KF2 * q2.to(tl.float32)) * tl.load(kz_row + (chan + 2) * skz_g).to(tl.float32)[None, :] - MAGIC_VAL * qs2.to(tl.float32)
            off += (KF3 * q3.to(tl.float32)) * tl.load(kz_row + (chan + 3) * skz_g).to(tl.float32)[None, :] - MAGIC_VAL * qs3.to(tl.float32)
            raw += _mm(qs2, tl.trans(_plane_magic(kb, 2, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), USE_DOT, DOT_FP32)
            raw += _mm(qs3, tl.trans(_plane_magic(kb, 3, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), USE_DOT, DOT_FP32)
        # raw = (q s) . c + MAGIC_VAL * sum(q s): the offset and the zero term are per query row
        s = (_rows_select(raw, sbr, SUB) + tl.sum(off, 1)[:, None]) * qk_scale
    elif K_GF or K_GROUP == D:
        if K_GF:
            # group fill: row (g, m)'s q planes hold query row m's channel group g only (zeros elsewhere), so
            # the dots give that group's part, scaled by its per-token scale and summed over the row's groups
            MK: tl.constexpr = q0.shape[0]
            if PREFETCH:  # [GFILL, BLOCK_N], loaded one tile ahead
                ks = _group_bcast(pks, MK, GFILL)
                kz = _group_bcast(pkz, MK, GFILL)
            else:
                ks = _group_rows_load(ks_base, offs_s64, sks_t, sks_g, smask, grow, MK, GFILL, GF_BCAST)
                kz = _group_rows_load(kz_base, offs_s64, skz_t, skz_g, smask, grow, MK, GFILL, GF_BCAST)
        else:
            if PREFETCH:  # loaded one tile ahead by the caller (_tile_meta)
                ks = pks
                kz = pkz
            else:
                ks = tl.load(ks_base + offs_s64 * sks_t, mask=smask, other=0.0).to(tl.float32)
                kz = tl.load(kz_base + offs_s64 * skz_t, mask=smask, other=0.0).to(tl.float32)
        if K_BITS == 8 or K_FMT == 3:
            # 1024 + code is exact in fp16 only, and the NF4 planes are fp16 values (bf16 models: q converted, exact
            # in fp16's normal range)
            raw = _k_magic_dot(kb, q0.to(tl.float16), q1.to(tl.float16), q2, q3, K_BITS, MAGIC, tl.float16,
                               K_SHIFTED, FAST_ASM, USE_DOT, DOT_FP32, K_FMT)
        else:
            raw = _k_magic_dot(kb, q0, q1, q2, q3, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM, USE_DOT, DOT_FP32)
        # raw = q . c + MAGIC_VAL * qsum_mag, so s * (raw - MAGIC_VAL * qsum_mag) + z * sum(q) == q . (c s + z)
        if K_GF:
            if K_FMT == 0:
                e = (raw - MAGIC_VAL * qsum_mag[:, None]) * ks + qsum[:, None] * kz
            else:  # NF4: codebook values times the group's scale, no zero
                e = raw * ks
            s = _group_allreduce(e, GFILL) * qk_scale
        else:
            raw = _rows_select(raw, sbr, SUB)
            if K_FMT == 0:
                a = ks * qk_scale
                bz = kz * qk_scale
                s = (raw - MAGIC_VAL * qsum_mag[:, None]) * _bc(a, SUB) + qsum[:, None] * _bc(bz, SUB)
            else:  # int8 (MAGIC_VAL holds the sign offset), fp8 (plain-Triton planes times 2**-8), NF4: no zero point
                a = ks * (qk_scale * (256.0 if (K_FMT == 2 and not FAST_ASM) else 1.0))
                s = (raw - MAGIC_VAL * qsum_mag[:, None]) * _bc(a, SUB)
    else:
        # plane element i holds channel PER * i + j, which is in group i // (K_GROUP // PER_K). The keys are rounded
        # to the V product's dtype (fp16 where the scales are, also for bf16 models, q converted as KC_DEQ does):
        # rounded to bf16 they cost a bf16 model 2.5% output error at large scores (hypothesis, session 9)
        KD: tl.constexpr = V_DTYPE
        ks, kz = _group_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, offs_t64, tmask, offs_t.shape[0],
                             D // K_GROUP, K_GROUP // PER_K)
        raw = _mm(q0.to(KD), tl.trans((_plane_f32(kb, 0, K_BITS) * ks + kz).to(KD)), USE_DOT, DOT_FP32)
        raw += _mm(q1.to(KD), tl.trans((_plane_f32(kb, 1, K_BITS) * ks + kz).to(KD)), USE_DOT, DOT_FP32)
        if PER_K == 4:
            raw += _mm(q2.to(KD), tl.trans((_plane_f32(kb, 2, K_BITS) * ks + kz).to(KD)), USE_DOT, DOT_FP32)
            raw += _mm(q3.to(KD), tl.trans((_plane_f32(kb, 3, K_BITS) * ks + kz).to(KD)), USE_DOT, DOT_FP32)
        s = _rows_select(raw, sbr, SUB) * qk_scale
    s = _mask_scores(s, smask, pos_s, row_lim, CAUSAL, SUB)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)

    # ---- V: output ----------------------------------------------------------------------------------
    V_RAW: tl.constexpr = FAST_ASM and (V_SHIFTED or V_FMT == 3)
    if HFILL == 1 and V_BITS != 15:
        vb = _load_codes(vc_base, offs_t64, tmask, svc_t, svc_c, DPV, V_RAW)
    if V_BITS == 15:
        # ternary codes (1.5 bits: byte u of a token holds channels 5u .. 5u + 4 as base-3 digits): dequantized
        # per element in natural channel order (PER_V == 1, one output plane), each with its group's scale / zero
        cc = tl.arange(0, D)
        b3 = tl.load(vc_base + offs_t64[:, None] * svc_t + (cc // 5).to(tl.int64)[None, :] * svc_c,
                     mask=tmask[:, None], other=0).to(tl.float32)
        d3 = _ternary_digit(b3, (cc % 5)[None, :])
        vs, vz = _group_meta(vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_t64, tmask, offs_t.shape[0],
                             D // V_GROUP, V_GROUP)
        zacc = zacc * alpha
        pv = _rows_expand(p.to(DTYPE), sbr, SUB)
        acc0 = acc0 * alpha[:, None] + _mm(pv, (d3 * vs + vz).to(DTYPE), USE_DOT, DOT_FP32)
    elif HFILL > 1:
        # head fill: the rows of head hg take p (scaled by their head's per-token scale) against that
        # head's codes; the other rows' probabilities are zero in its product
        MV: tl.constexpr = q0.shape[0]
        vs = _group_rows_load(vs_base, offs_s64, svs_t, svs_h, smask, hrow, MV, HFILL, True)
        vz = _group_rows_load(vz_base, offs_s64, svz_t, svz_h, smask, hrow, MV, HFILL, True)
        zacc = zacc * alpha + tl.sum(p * vz, 1)
        pv = (p * vs).to(V_DTYPE)
        acc0, acc1, acc2, acc3 = _acc_rescale(acc0, acc1, acc2, acc3, alpha, PER_V)
        for hg in tl.static_range(HFILL):
            vbh = _load_codes(vc_base + hg * svc_h, offs_t64, tmask, svc_t, svc_c, DPV, V_RAW)
            pvh = tl.where(hrow[:, None] == hg, pv, tl.zeros_like(pv))
            acc0, acc1, acc2, acc3 = _v_exact_dot(pvh, vbh, acc0, acc1, acc2, acc3, V_BITS, VMG, VMV,
                                                  V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM, USE_DOT)
    elif V_GROUP == D or V_GF:
        if V_GF:
            # group fill: MMA row (g, m) carries query row m with V's channel group g: its probabilities
            # are scaled by that group's per-token scale, and only group g's output columns are kept
            MV: tl.constexpr = q0.shape[0]
            if PREFETCH:
                vs = _group_bcast(pvs, MV, GFILL)
                vz = _group_bcast(pvz, MV, GFILL)
            else:
                vs = _group_rows_load(vs_base, offs_s64, svs_t, svs_g, smask, grow, MV, GFILL, GF_BCAST)
                vz = _group_rows_load(vz_base, offs_s64, svz_t, svz_g, smask, grow, MV, GFILL, GF_BCAST)
        else:
            if PREFETCH:
                vs = _bc(pvs, SUB)
                vz = _bc(pvz, SUB)
            else:
                vs = _bc(tl.load(vs_base + offs_s64 * svs_t, mask=smask, other=0.0).to(tl.float32), SUB)
                vz = _bc(tl.load(vz_base + offs_s64 * svz_t, mask=smask, other=0.0).to(tl.float32), SUB)
        if V_FMT == 0:
            zacc = zacc * alpha + tl.sum(p * vz, 1)
            pv = _rows_expand((p * vs).to(V_DTYPE), sbr, SUB)
        else:  # int8 / fp8: no zero point; fp8's plain-Triton planes hold the value times 2**-8
            zacc = zacc * alpha
            pv = _rows_expand((p * (vs * (256.0 if (V_FMT == 2 and not FAST_ASM) else 1.0))).to(V_DTYPE), sbr, SUB)
        acc0, acc1, acc2, acc3 = _acc_rescale(acc0, acc1, acc2, acc3, alpha, PER_V, LAZY)
        acc0, acc1, acc2, acc3 = _v_exact_dot(pv, vb, acc0, acc1, acc2, acc3, V_BITS, VMG, VMV, V_DTYPE,
                                              DOT_FP32, V_SHIFTED, FAST_ASM, USE_DOT, V_FMT)
    else:
        vs, vz = _group_meta(vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_t64, tmask, offs_t.shape[0],
                             D // V_GROUP, V_GROUP // PER_V)
        zacc = zacc * alpha
        pv = _rows_expand(p.to(DTYPE), sbr, SUB)
        acc0 = acc0 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 0, V_BITS) * vs + vz).to(DTYPE), USE_DOT, DOT_FP32)
        acc1 = acc1 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 1, V_BITS) * vs + vz).to(DTYPE), USE_DOT, DOT_FP32)
        if PER_V == 4:
            acc2 = acc2 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 2, V_BITS) * vs + vz).to(DTYPE), USE_DOT, DOT_FP32)
            acc3 = acc3 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 3, V_BITS) * vs + vz).to(DTYPE), USE_DOT, DOT_FP32)
    return m_i, l_i, acc0, acc1, acc2, acc3, zacc


@triton.jit
def _store_plane(acc, zacc, inv_l, o_base, rows_off, rmask, J: tl.constexpr, PER: tl.constexpr,
                 DP: tl.constexpr, OUT_DTYPE: tl.constexpr, SHIFTED: tl.constexpr, grow, GFILL: tl.constexpr,
                 V_GROUP: tl.constexpr, V_GF: tl.constexpr):
    if SHIFTED:
        acc = acc * (1.0 / (1 << (J * (8 // PER))))
    o = (acc + zacc[:, None]) * inv_l[:, None]
    offs_c = (tl.arange(0, DP) * PER + J).to(tl.int64)
    if V_GF:  # row (g, m) holds the output of channel group g only
        mask = rmask[:, None] & ((offs_c // V_GROUP)[None, :] == grow[:, None])
    elif GFILL > 1:  # the copies of a query row hold the same output: the first stores it
        mask = rmask[:, None] & (grow == 0)[:, None]
    else:
        mask = rmask[:, None]
    tl.store(o_base + rows_off[:, None] + offs_c[None, :], o.to(OUT_DTYPE), mask=mask)


@triton.jit
def _store_planes(acc0, acc1, acc2, acc3, zacc, inv_l, o_base, rows_off, rmask, PER: tl.constexpr,
                  DP: tl.constexpr, OUT_DTYPE: tl.constexpr, SHIFTED: tl.constexpr, grow=0,
                  GFILL: tl.constexpr = 1, V_GROUP: tl.constexpr = 0, V_GF: tl.constexpr = False):
    _store_plane(acc0, zacc, inv_l, o_base, rows_off, rmask, 0, PER, DP, OUT_DTYPE, SHIFTED, grow, GFILL, V_GROUP, V_GF)
    if PER >= 2:
        _store_plane(acc1, zacc, inv_l, o_base, rows_off, rmask, 1, PER, DP, OUT_DTYPE, SHIFTED, grow, GFILL, V_GROUP,
                     V_GF)
    if PER == 4:
        _store_plane(acc2, zacc, inv_l, o_base, rows_off, rmask, 2, PER, DP, OUT_DTYPE, SHIFTED, grow, GFILL,
                     V_GROUP, V_GF)
        _store_plane(acc3, zacc, inv_l, o_base, rows_off, rmask, 3, PER, DP, OUT_DTYPE, SHIFTED, grow, GFILL,
                     V_GROUP, V_GF)


@triton.jit
def _balance_table(lens_ptr, slen_b, slen_p, s_cap, q_cap, w_cap, n_rows, progs, MID_ONLY: tl.constexpr,
                   B_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Ragged batches (BALANCE): ``progs`` programs per KV head share the batch's rows by their work (the packed
    middle with MID_ONLY, else the whole length; lengths clamped to the capacities): every program takes ``t`` tiles
    of BLOCK_N tokens, t near the smallest with sum over rows of cdiv(tiles_b, t) <= progs (below), so the longest
    chunk is about as short as the tile grain allows. Returns per row (a [B_P2] vector) its program count n (0 for an
    empty row) and the exclusive prefix of the counts (row b's first program is excl[b]), and t. Equal rows get the
    fixed split's chunk."""
    rb = tl.arange(0, B_P2)
    rm = rb < n_rows
    lp = lens_ptr + rb.to(tl.int64) * slen_b
    work = tl.minimum(tl.maximum(tl.load(lp + slen_p, mask=rm, other=0).to(tl.int32), 0), q_cap)
    if not MID_ONLY:
        work += tl.minimum(tl.maximum(tl.load(lp, mask=rm, other=0).to(tl.int32), 0), s_cap)
        work += tl.minimum(tl.maximum(tl.load(lp + 2 * slen_p, mask=rm, other=0).to(tl.int32), 0), w_cap)
    tiles = tl.where(rm, (work + BLOCK_N - 1) // BLOCK_N, 0)
    total = tl.sum(tiles, 0)
    busy = tl.sum((tiles > 0).to(tl.int32), 0)  # <= n_rows <= progs
    # no t below cdiv(total, progs) fits; t_hi >= total / (progs - busy) always does (each row's cdiv adds < 1), and
    # where progs == busy every row takes one program (t = the longest row). Take the first of t_lo, t_lo + 1, t_hi
    # that fits (straight-line: a search loop here made the build spill, offline triton 3.6). Equal rows fit at t_lo.
    t_lo = tl.maximum((total + progs - 1) // progs, 1)
    t_hi = tl.where(progs > busy, (total + tl.maximum(progs - busy, 1) - 1) // tl.maximum(progs - busy, 1),
                    tl.max(tiles, 0))
    t_hi = tl.maximum(t_hi, t_lo)
    fits0 = tl.sum((tiles + t_lo - 1) // t_lo, 0) <= progs
    fits1 = tl.sum((tiles + t_lo) // (t_lo + 1), 0) <= progs
    t = tl.where(fits0, t_lo, tl.where(fits1, tl.minimum(t_lo + 1, t_hi), t_hi))
    n = (tiles + t - 1) // t
    excl = tl.cumsum(n, 0) - n
    return n, excl, rb, t


@triton.jit
def _balanced_program(lens_ptr, slen_b, slen_p, s_cap, q_cap, w_cap, n_rows, progs, f, MID_ONLY: tl.constexpr,
                      B_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program f (0 <= f < progs) of a KV head under _balance_table: (its row, its index among the row's programs,
    its chunk of tokens); the row is n_rows (none) where the rows took fewer than progs programs."""
    n, excl, rb, t = _balance_table(lens_ptr, slen_b, slen_p, s_cap, q_cap, w_cap, n_rows, progs, MID_ONLY, B_P2,
                                    BLOCK_N)
    row = tl.minimum(tl.sum((excl + n <= f).to(tl.int32), 0), n_rows)
    return row, f - tl.sum(tl.where(rb == row, excl, 0), 0), t * BLOCK_N


@triton.jit(do_not_specialize=["n_sink", "n_quant", "n_window", "chunk", "v_cap", "v_wcap", "n_rows", "wk_rows",
                               "wv_rows"])
def _decode_split_kernel(
    q_ptr, sq_b, sq_h, sq_n, sq_d,
    # K parts
    ksk_ptr, sksk_b, sksk_h, sksk_t, sksk_d,
    kc_ptr, skc_b, skc_h, skc_t, skc_c,
    ks_ptr, sks_b, sks_h, sks_t, sks_g,
    kz_ptr, skz_b, skz_h, skz_t, skz_g,
    kw_ptr, skw_b, skw_h, skw_t, skw_d,
    # V parts
    vsk_ptr, svsk_b, svsk_h, svsk_t, svsk_d,
    vc_ptr, svc_b, svc_h, svc_t, svc_c,
    vs_ptr, svs_b, svs_h, svs_t, svs_g,
    vz_ptr, svz_b, svz_h, svz_t, svz_g,
    vw_ptr, svw_b, svw_h, svw_t, svw_d,
    # outputs: partials [B*Hkv, NUM_SPLITS, ROWS, D] fp32 + lse2 [B*Hkv, NUM_SPLITS, ROWS], or final out/lse
    op_ptr, lp_ptr, out_ptr, lse_ptr,
    # valid lengths: host scalars, or (DEV_LENS) per-batch-row device tensors [B or 1, 3] of (n_sink, n_quant,
    # n_window); then the scalars n_sink / n_quant / n_window are the capacities the loaded lengths are
    # clamped to (never a read out of bounds) and chunk is derived per row in the kernel
    lens_ptr, slen_b, slen_p, vlens_ptr, svlen_b, svlen_p,
    n_sink, n_quant, n_window, chunk, v_cap, v_wcap, qk_scale,
    # K_ROPE: q's rotate-half partners with their signs (q's shape and strides) and each stored key channel's
    # rotary frequency [H_KV, D] float32 (see _rope_operands)
    qb_ptr, rw_ptr, rt_ptr,
    H_KV: tl.constexpr, GQA: tl.constexpr, NQ: tl.constexpr, D: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_MID: tl.constexpr, HAS_WINDOW: tl.constexpr,
    CAUSAL: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    DTYPE: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VAL: tl.constexpr,
    V_DTYPE: tl.constexpr, V_MAGIC: tl.constexpr, V_MAGIC_VAL: tl.constexpr, DIRECT_OUT: tl.constexpr,
    FAST_ASM: tl.constexpr = False, SUB: tl.constexpr = 1, FP_CONTIG: tl.constexpr = False,
    FP_SPLIT: tl.constexpr = False, DEV_LENS: tl.constexpr = False, KV_MIXED: tl.constexpr = False,
    K_CHANNEL: tl.constexpr = False, GFILL: tl.constexpr = 1, K_GF: tl.constexpr = False,
    V_GF: tl.constexpr = False, GF_BCAST: tl.constexpr = False, KC_DEQ: tl.constexpr = False,
    HFILL: tl.constexpr = 1, PREFETCH: tl.constexpr = False, K_FMT: tl.constexpr = 0, V_FMT: tl.constexpr = 0,
    K_ROPE: tl.constexpr = False, ROPE_TAB: tl.constexpr = 0, LAZY: tl.constexpr = False,
    BALANCE: tl.constexpr = False, n_rows=1, B_P2: tl.constexpr = 1, FP_BN: tl.constexpr = 0,
    # WRING: the windows are rings (PackedKV, docs/format.md): window token t at row (n_quant + t) % rows of the K
    # (wk_rows) and V (wv_rows) window tensors
    WRING: tl.constexpr = False, wk_rows=1, wv_rows=1,
    # V_DEN: the packed values' codes become fp16 subnormals (no 1024 offset to subtract; see _v_plane_exact)
    V_DEN: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    # HFILL > 1 ("head fill"): a program serves HFILL consecutive KV heads h .. h + HFILL - 1 (H_KV % HFILL == 0)
    b_slot = (pid_bh // (H_KV // HFILL)).to(tl.int64)  # the row whose partial-output slots this program writes
    b = b_slot
    if BALANCE:
        # ragged rows (DEV_LENS, per-row lengths): the (row, split) programs of a KV head are shared out by work
        # (_balance_table) rather than a fixed number per row, so the longest row no longer sets the time. Each
        # program still writes its own slot; the merge finds a row's slots the same way. With FP_SPLIT each row
        # keeps its own full-precision program (the last split) and the middle programs are shared out.
        if FP_SPLIT:
            n_mid_progs = tl.num_programs(1) - 1
            is_mid = split != n_mid_progs
        else:
            n_mid_progs = tl.num_programs(1)
            is_mid = split >= 0
        bal_row, bal_s, bal_chunk = _balanced_program(lens_ptr, slen_b, slen_p, n_sink, n_quant, n_window, n_rows,
                                                      n_rows * n_mid_progs, b_slot * n_mid_progs + split, FP_SPLIT,
                                                      B_P2, BLOCK_N)
        bal_idle = (bal_row >= n_rows) & is_mid
        b = tl.where(is_mid, tl.minimum(bal_row, n_rows - 1).to(tl.int64), b_slot)
    h = (pid_bh % (H_KV // HFILL)).to(tl.int64) * HFILL
    # 8-bit codes come as int16 words of two codes: two planes, as for 4-bit
    PER_K: tl.constexpr = 2 if K_BITS == 8 else 8 // K_BITS
    PER_V: tl.constexpr = 1 if V_BITS == 15 else (2 if V_BITS == 8 else 8 // V_BITS)
    DPK: tl.constexpr = D // PER_K
    DPV: tl.constexpr = D // PER_V
    ROWS: tl.constexpr = GQA * NQ

    # query rows m = head_in_group * NQ + new_token. With SUB > 1 ("row fill", M_PAD == 16, SUB <= 8) the
    # 16 MMA rows are (token sub-block sb, query row m): q is replicated per sub-block and each row only
    # keeps the scores of its own BLOCK_N // SUB tokens, so the softmax runs on real rows; the sub-rows
    # of one query row are merged (log-sum-exp) once at the end. MMA row = 8 mh + G sb + ml with
    # m = G mh + ml, G = 8 // SUB: a thread holds rows i and i + 8 of the m16n8k16 fragments, and this
    # order gives both the same sub-block, so the block-diagonal P operand has no compile-time zeros
    # (those made ptxas rebuild the A fragment with 4 MOVs per HMMA: +216 instructions per tile).
    R_PAD: tl.constexpr = M_PAD // SUB
    BN_S: tl.constexpr = BLOCK_N // SUB
    G: tl.constexpr = 8 // SUB if SUB <= 8 else 1
    mrow = tl.arange(0, M_PAD)
    # GFILL > 1 ("group fill", per-token groups of D // GFILL channels, SUB == 1): the MMA rows are (channel
    # group g, query row m), M_PAD // GFILL rows per group, so the magic-number codes stay unscaled as for
    # one group per head. Grouped V (V_GF): every copy of a query row has the same scores and softmax; the
    # V product scales its probabilities by its own group's per-token scale and only its group's output
    # columns are stored. Grouped K (K_GF): row (g, m) holds only group g's channels of q; its dot is scaled
    # by group g's scale and zero and the rows of one query row are summed (_group_allreduce). Costs no
    # extra MMA while the copies fit the 16 rows.
    grow = mrow // (M_PAD // GFILL)
    # HFILL > 1 ("head fill", one group per token, SUB == GFILL == 1): the rows are (KV head hg, query row m),
    # M_PAD // HFILL rows per head. Each head's packed tile is unpacked once and multiplied by all 16 rows;
    # each row keeps its own head's scores, and head hg's V product sees only its rows' probabilities. The
    # softmax, the accumulator rescaling and the scale / zero terms then run once for HFILL heads instead of
    # on 16 rows of which r * Nq are real.
    hrow = mrow // (M_PAD // HFILL)
    if HFILL > 1:
        rows = mrow % (M_PAD // HFILL)
        sbr = mrow  # unused
    elif GFILL > 1:
        rows = mrow % (M_PAD // GFILL)
        sbr = mrow  # unused
    elif SUB == 1:
        rows = mrow
        sbr = mrow  # unused
    else:
        rows = (mrow // 8) * G + mrow % G
        sbr = (mrow % 8) // G
    rmask = rows < ROWS
    hl = (rows // NQ).to(tl.int64)
    qi = rows % NQ
    q_base = q_ptr + b * sq_b
    hh = h + hrow.to(tl.int64)  # each row's KV head
    q_rows = (hh * GQA + hl) * sq_h + qi.to(tl.int64) * sq_n
    # fp16 codes keep their bits in place (K_SHIFTED / V_SHIFTED, see _plane_magic); the exact
    # power-of-two factors go into the q planes (K) and the output planes (V).
    K_SHIFTED: tl.constexpr = ((MAGIC == 0x6400) and (K_CHANNEL or K_GROUP == D or K_GF) and K_BITS != 8 and K_FMT == 0
                               and not K_ROPE)
    V_SHIFTED: tl.constexpr = ((V_MAGIC == 0x6400) and (V_GROUP == D or V_GF) and V_BITS != 8 and V_FMT == 0
                               and V_BITS != 15)
    V_DEN_ON: tl.constexpr = V_DEN and V_SHIFTED
    KB: tl.constexpr = K_BITS
    q0 = _load_q_plane(q_base, q_rows, rmask, 0, PER_K, DPK, sq_d)
    q1 = _load_q_plane(q_base, q_rows, rmask, 1, PER_K, DPK, sq_d)
    if K_GF:
        q0 = _q_group(q0, grow, 0, PER_K, DPK, K_GROUP)
        q1 = _q_group(q1, grow, 1, PER_K, DPK, K_GROUP)
    qsum = tl.sum(q0.to(tl.float32), 1) + tl.sum(q1.to(tl.float32), 1)
    if K_SHIFTED:
        q1 = (q1.to(tl.float32) * (1.0 / (1 << KB))).to(DTYPE)
    if PER_K == 4:
        q2 = _load_q_plane(q_base, q_rows, rmask, 2, PER_K, DPK, sq_d)
        q3 = _load_q_plane(q_base, q_rows, rmask, 3, PER_K, DPK, sq_d)
        if K_GF:
            q2 = _q_group(q2, grow, 2, PER_K, DPK, K_GROUP)
            q3 = _q_group(q3, grow, 3, PER_K, DPK, K_GROUP)
        qsum += tl.sum(q2.to(tl.float32), 1) + tl.sum(q3.to(tl.float32), 1)
        if K_SHIFTED:
            q2 = (q2.to(tl.float32) * (1.0 / (1 << (2 * KB)))).to(DTYPE)
            q3 = (q3.to(tl.float32) * (1.0 / (1 << (3 * KB)))).to(DTYPE)
    else:
        q2 = q0
        q3 = q0
    qsum_mag = tl.sum(q0.to(tl.float32), 1) + tl.sum(q1.to(tl.float32), 1)
    if PER_K == 4:
        qsum_mag += tl.sum(q2.to(tl.float32), 1) + tl.sum(q3.to(tl.float32), 1)
    if K_ROPE:
        # the middle's token t sits at position S + t (S: the sink capacity, the scalar n_sink before DEV_LENS)
        # ROPE_TAB: this head's in-tile cos / sin table [2, PER_K, BLOCK_N, DPK] (_rope_table)
        prope = _rope_q_operands(qb_ptr + b * sq_b, q_rows, rmask, sq_d, rw_ptr + h * D, PER_K, DPK) + (
            n_sink, rt_ptr + h * (2 * D * BLOCK_N))
    else:
        prope = None

    v_lag = 0
    if DEV_LENS:
        # this row's lengths, clamped to the capacities (the scalar arguments in this mode)
        lp = lens_ptr + b * slen_b
        n_sink = tl.minimum(tl.maximum(tl.load(lp).to(tl.int32), 0), n_sink)
        n_quant = tl.minimum(tl.maximum(tl.load(lp + slen_p).to(tl.int32), 0), n_quant)
        n_window = tl.minimum(tl.maximum(tl.load(lp + 2 * slen_p).to(tl.int32), 0), n_window)
        if KV_MIXED:
            # V's packed middle runs v_lag tokens past K's (only its n_quant is read: the same n_sink and
            # total length are the caller's contract)
            nq_v = tl.load(vlens_ptr + b * svlen_b + svlen_p).to(tl.int32)
            v_lag = tl.minimum(tl.maximum(nq_v - n_quant, 0), tl.minimum(v_cap - n_quant, n_window))
    L = n_sink + n_quant + n_window
    row_lim = L - NQ + qi  # new token i sees logical positions <= L - NQ + i
    if FP_SPLIT:
        # the last program takes the full-precision sink + window, the others the packed middle in chunks
        # (separate branches: the short fp loops add no live registers to the packed loop)
        run_fp = split == tl.num_programs(1) - 1
        run_mid = split != tl.num_programs(1) - 1
        mid_split = split
        if BALANCE:  # the balanced chunk, this program's place among its row's
            chunk = bal_chunk
            mid_split = bal_s
        elif DEV_LENS:  # this row's middle spread over all middle programs (the grid is sized for capacity)
            n_mid_prog = tl.num_programs(1) - 1
            chunk = ((n_quant + n_mid_prog - 1) // n_mid_prog + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = tl.where(run_fp, 0, n_sink + mid_split * chunk)
        hi = tl.where(run_fp, L, tl.minimum(lo + chunk, n_sink + n_quant))
        if BALANCE:
            hi = tl.where(bal_idle, lo, hi)
    else:
        run_fp = True
        run_mid = True
        if BALANCE:  # the balanced chunk, this program's place among its row's
            lo = bal_s * bal_chunk
            hi = tl.where(bal_idle, lo, tl.minimum(lo + bal_chunk, L))
        else:
            if DEV_LENS:  # this row's length spread over all splits; splits past it do no tile
                n_prog = tl.num_programs(1)
                chunk = ((L + n_prog - 1) // n_prog + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            lo = split * chunk
            hi = tl.minimum(lo + chunk, L)

    m_i = tl.full([M_PAD], -1.0e30, tl.float32)  # finite: fully masked tiles give p = 0, alpha = 1
    l_i = tl.zeros([M_PAD], tl.float32)
    zacc = tl.zeros([M_PAD], tl.float32)
    acc0, acc1, acc2, acc3 = _acc_init(M_PAD, DPV, PER_V)
    arange_n = tl.arange(0, BLOCK_N)
    if SUB == 1:
        score_n = arange_n
    else:
        score_n = sbr[:, None] * BN_S + tl.arange(0, BN_S)[None, :]
    # the full-precision tiles (sink, window) may take their own size FP_BN (SUB == 1 only: the launcher's check)
    if FP_BN == BLOCK_N:
        arange_fp = arange_n
        score_fp = score_n
    else:
        arange_fp = tl.arange(0, FP_BN)
        score_fp = arange_fp

    if HAS_SINK:
        if run_fp:
            k_base = ksk_ptr + b * sksk_b + h * sksk_h
            v_base = vsk_ptr + b * svsk_b + h * svsk_h
            end = tl.minimum(hi, n_sink)
            for t0 in range(lo, end, FP_BN):
                offs_t = t0 + arange_fp
                tmask = offs_t < end
                offs_s = t0 + score_fp
                smask = offs_s < end
                m_i, l_i, alpha, acc0, acc1, acc2, acc3 = _fp_tile(
                    q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
                    k_base, sksk_t, sksk_d, v_base, svsk_t, svsk_d, offs_t, tmask, offs_s, smask, offs_s, sbr,
                    row_lim, qk_scale, PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, USE_DOT, DOT_FP32, DTYPE,
                    SUB, FP_CONTIG, K_GF=K_GF, GFILL=GFILL, hrow=hrow, HFILL=HFILL, skh=sksk_h, svh=svsk_h)
                zacc = zacc * alpha

    if HAS_MID:
        if run_mid:
            kc_base = kc_ptr + b * skc_b + h * skc_h
            ks_base = ks_ptr + b * sks_b + h * sks_h
            kz_base = kz_ptr + b * skz_b + h * skz_h
            vc_base = vc_ptr + b * svc_b + h * svc_h
            vs_base = vs_ptr + b * svs_b + h * svs_h
            vz_base = vz_ptr + b * svz_b + h * svz_h
            start = tl.maximum(lo, n_sink) - n_sink
            end = tl.minimum(hi, n_sink + n_quant) - n_sink
            if K_CHANNEL:
                # tiles aligned to BLOCK_N in the middle (a divisor of the key token group), so each tile
                # has one per-channel scale / zero; the first may start before this split's range (masked)
                t_first = start // BLOCK_N * BLOCK_N
            else:
                t_first = start
            KG: tl.constexpr = GFILL if K_GF else 1
            VG: tl.constexpr = GFILL if V_GF else 1
            # PREFETCH (SUB == 1: the score-domain tokens are the tile's tokens): the next tile's scales / zeros
            # are loaded while this one computes; n* hold the next tile's, c* this tile's
            nks, nkz, nvs, nvz = _tile_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, vs_base, svs_t, svs_g,
                                            vz_base, svz_t, svz_g, t_first, tl.where(PREFETCH, end, t_first), BLOCK_N,
                                            KG, VG, not K_CHANNEL)
            ns0, nz0, ns1, nz1, ns2, nz2, ns3, nz3 = _kc_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, t_first,
                                                              tl.where(PREFETCH and K_CHANNEL, end, t_first), K_GROUP,
                                                              DPK, PER_K)
            if V_DEN_ON:  # the packed loop's value products come 2**-24 small: hold the accumulators there
                acc0, acc1, acc2, acc3 = _acc_scale(acc0, acc1, acc2, acc3, 1.0 / (1 << 24), PER_V)
            for t0 in range(t_first, end, BLOCK_N):
                cks, ckz, cvs, cvz = nks, nkz, nvs, nvz
                cs0, cz0, cs1, cz1, cs2, cz2, cs3, cz3 = ns0, nz0, ns1, nz1, ns2, nz2, ns3, nz3
                if PREFETCH:
                    nks, nkz, nvs, nvz = _tile_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, vs_base, svs_t,
                                                    svs_g, vz_base, svz_t, svz_g, t0 + BLOCK_N, end, BLOCK_N, KG, VG,
                                                    not K_CHANNEL)
                    if K_CHANNEL:
                        ns0, nz0, ns1, nz1, ns2, nz2, ns3, nz3 = _kc_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                                                                          t0 + BLOCK_N, end, K_GROUP, DPK, PER_K)
                offs_t = t0 + arange_n
                offs_s = t0 + score_n
                if K_CHANNEL:
                    tmask = (offs_t < end) & (offs_t >= start)
                    smask = (offs_s < end) & (offs_s >= start)
                else:
                    tmask = offs_t < end
                    smask = offs_s < end
                m_i, l_i, acc0, acc1, acc2, acc3, zacc = _packed_tile(
                    q0, q1, q2, q3, qsum, qsum_mag, m_i, l_i, acc0, acc1, acc2, acc3, zacc,
                    kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                    vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g,
                    offs_t, tmask, offs_s, smask, offs_s + n_sink, sbr, row_lim, qk_scale,
                    K_BITS, V_BITS, K_GROUP, V_GROUP, D, MAGIC, MAGIC_VAL, V_MAGIC, V_MAGIC_VAL, V_DTYPE,
                    K_SHIFTED, V_SHIFTED, FAST_ASM, CAUSAL, USE_DOT, DOT_FP32, DTYPE, SUB, t0, K_CHANNEL,
                    grow, GFILL, K_GF, V_GF, GF_BCAST, KC_DEQ, hrow, HFILL, skc_h, sks_h, skz_h, svc_h, svs_h, svz_h,
                    PREFETCH, cks, ckz, cvs, cvz, (cs0, cz0, cs1, cz1, cs2, cz2, cs3, cz3), K_FMT, V_FMT,
                    prope=prope, K_ROPE=K_ROPE, ROPE_TAB=ROPE_TAB, LAZY=LAZY, V_DEN=V_DEN_ON)
            if V_DEN_ON:
                acc0, acc1, acc2, acc3 = _acc_scale(acc0, acc1, acc2, acc3, float(1 << 24), PER_V)

    if HAS_WINDOW:
        if run_fp:
            k_base = kw_ptr + b * skw_b + h * skw_h
            v_base = vw_ptr + b * svw_b + h * svw_h
            w0 = n_sink + n_quant
            start = tl.maximum(lo, w0) - w0
            end = tl.minimum(hi, L) - w0
            if KV_MIXED:
                # the tiles holding V's first v_lag (< one key token group) tokens, which V already packed,
                # in their own loop: its registers stay out of the plain window loop below
                t_plain = start + tl.maximum(v_lag - start + FP_BN - 1, 0) // FP_BN * FP_BN
                for t0 in range(start, tl.minimum(t_plain, end), FP_BN):
                    offs_t = t0 + arange_fp
                    tmask = offs_t < end
                    offs_s = t0 + score_fp
                    smask = offs_s < end
                    m_i, l_i, alpha, acc0, acc1, acc2, acc3 = _fp_tile(
                        q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
                        k_base, skw_t, skw_d, v_base, svw_t, svw_d, offs_t, tmask, offs_s, smask, offs_s + w0, sbr,
                        row_lim, qk_scale, PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, USE_DOT, DOT_FP32, DTYPE,
                        SUB, FP_CONTIG, v_lag, v_wcap,
                        vc_ptr + b * svc_b + h * svc_h, svc_t, svc_c, vs_ptr + b * svs_b + h * svs_h, svs_t, svs_g,
                        vz_ptr + b * svz_b + h * svz_h, svz_t, svz_g, n_quant, True, V_GROUP,
                        RING=WRING, krow=(n_quant + offs_t) % wk_rows, vrow=(n_quant + offs_t) % wv_rows)
                    zacc = zacc * alpha
                start = t_plain
                end = tl.minimum(end, v_wcap + v_lag)  # only binds for lengths that break the contract
                if not WRING:
                    v_base = v_base - v_lag.to(tl.int64) * svw_t  # past the lag, V's window is K's shifted by v_lag
            for t0 in range(start, end, FP_BN):
                offs_t = t0 + arange_fp
                tmask = offs_t < end
                offs_s = t0 + score_fp
                smask = offs_s < end
                # a ring window: token t at row (n_quant + t) % rows; V's (ahead of K's by v_lag in KV_MIXED) at the
                # same expression, since V's window starts v_lag tokens later at V's n_quant = n_quant + v_lag
                m_i, l_i, alpha, acc0, acc1, acc2, acc3 = _fp_tile(
                    q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
                    k_base, skw_t, skw_d, v_base, svw_t, svw_d, offs_t, tmask, offs_s, smask, offs_s + w0, sbr,
                    row_lim, qk_scale, PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, USE_DOT, DOT_FP32, DTYPE,
                    SUB, FP_CONTIG, K_GF=K_GF, GFILL=GFILL, hrow=hrow, HFILL=HFILL, skh=skw_h, svh=svw_h,
                    RING=WRING, krow=(n_quant + offs_t) % wk_rows, vrow=(n_quant + offs_t) % wv_rows)
                zacc = zacc * alpha

    if SUB > 1:
        # merge the SUB sub-rows of each query row (same log-sum-exp rule as the split merge)
        m3 = tl.reshape(m_i, [2, SUB, G])
        m_new = tl.max(m3, 1)
        w = tl.exp2(m3 - m_new[:, None, :])
        l_i = tl.reshape(tl.sum(w * tl.reshape(l_i, [2, SUB, G]), 1), [R_PAD])
        zacc = tl.reshape(tl.sum(w * tl.reshape(zacc, [2, SUB, G]), 1), [R_PAD])
        acc0 = tl.reshape(tl.sum(w[:, :, :, None] * tl.reshape(acc0, [2, SUB, G, DPV]), 1), [R_PAD, DPV])
        if PER_V >= 2:
            acc1 = tl.reshape(tl.sum(w[:, :, :, None] * tl.reshape(acc1, [2, SUB, G, DPV]), 1), [R_PAD, DPV])
        if PER_V == 4:
            acc2 = tl.reshape(tl.sum(w[:, :, :, None] * tl.reshape(acc2, [2, SUB, G, DPV]), 1), [R_PAD, DPV])
            acc3 = tl.reshape(tl.sum(w[:, :, :, None] * tl.reshape(acc3, [2, SUB, G, DPV]), 1), [R_PAD, DPV])
        m_i = tl.reshape(m_new, [R_PAD])
        rows = tl.arange(0, R_PAD)
        rmask = rows < ROWS
        grow = rows // R_PAD  # zeros: no group fill with row fill
        hh = h  # no head fill with row fill
        hl = (rows // NQ).to(tl.int64)
        qi = rows % NQ
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    if DIRECT_OUT:
        # one split: write the final output ([B, Hq, NQ, D], q's dtype) and natural-log lse
        orow = (b * (H_KV * GQA) + hh * GQA + hl) * NQ + qi
        tl.store(lse_ptr + orow, lse2 * 0.6931471805599453, mask=rmask & (grow == 0))
        _store_planes(acc0, acc1, acc2, acc3, zacc, inv_l, out_ptr, orow * D, rmask, PER_V, DPV, DTYPE, V_SHIFTED,
                      grow, GFILL, V_GROUP, V_GF)
    else:
        prow = ((b_slot * H_KV + hh) * tl.num_programs(1) + split) * ROWS + rows  # its own slot (BALANCE)
        tl.store(lp_ptr + prow, lse2, mask=rmask & (grow == 0))
        _store_planes(acc0, acc1, acc2, acc3, zacc, inv_l, op_ptr, prow * D, rmask, PER_V, DPV, tl.float32,
                      V_SHIFTED, grow, GFILL, V_GROUP, V_GF)


@triton.jit(do_not_specialize=["NUM_SPLITS", "n_rows", "s_cap", "q_cap", "w_cap"])
def _merge_kernel(op_ptr, lp_ptr, out_ptr, lse_ptr, NUM_SPLITS,
                  H_KV: tl.constexpr, GQA: tl.constexpr, NQ: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr,
                  DTYPE: tl.constexpr, BALANCE: tl.constexpr = False, FP_SPLIT: tl.constexpr = False,
                  lens_ptr=None, slen_b=0, slen_p=0, s_cap=0, q_cap=0, w_cap=0, n_rows=1, B_P2: tl.constexpr = 1,
                  BLOCK_N: tl.constexpr = 16, PDL: tl.constexpr = False):
    """Combine the splits of one query row (and one BLOCK_D slice of the head dim). BALANCE: the row's splits are
    the programs _balance_table gave it (and with FP_SPLIT its own full-precision program), read SPLITS_P2 at a
    time with a running log-sum-exp. PDL: launched as a programmatic dependent launch (``launch_pdl``), it waits for
    the split kernel's end here."""
    if PDL:
        _gdc_wait()
    ROWS: tl.constexpr = GQA * NQ
    row = tl.program_id(0).to(tl.int64)  # (b * H_KV + h) * ROWS + m
    pid_d = tl.program_id(1)
    bh = row // ROWS
    m = row % ROWS
    b = bh // H_KV
    h = bh % H_KV
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if BALANCE:
        n_mid = NUM_SPLITS - (1 if FP_SPLIT else 0)
        n, excl, rb, _ = _balance_table(lens_ptr, slen_b, slen_p, s_cap, q_cap, w_cap, n_rows, n_rows * n_mid,
                                        FP_SPLIT, B_P2, BLOCK_N)
        first = tl.sum(tl.where(rb == b, excl, 0), 0)
        cnt = tl.sum(tl.where(rb == b, n, 0), 0)
        n_all = cnt + (1 if FP_SPLIT else 0)
        mx = tl.full([], -1.0e30, tl.float32)  # finite: empty splits (lse -inf) weigh 0
        denom = tl.zeros([], tl.float32)
        o = tl.zeros([BLOCK_D], tl.float32)
        for i0 in range(0, n_all, SPLITS_P2):
            i = i0 + offs_s
            valid = i < n_all
            f = first + i  # the head's middle program f sits in slot (f // n_mid, f % n_mid)
            sb = (f // n_mid).to(tl.int64)
            ss = f % n_mid
            if FP_SPLIT:  # the row's own full-precision program comes after its middle ones
                sb = tl.where(i == cnt, b, sb)
                ss = tl.where(i == cnt, NUM_SPLITS - 1, ss)
            prow = ((sb * H_KV + h) * NUM_SPLITS + ss) * ROWS + m
            lse = tl.load(lp_ptr + prow, mask=valid, other=float("-inf"))
            mx_new = tl.maximum(mx, tl.max(lse, 0))
            alpha = tl.exp2(mx - mx_new)
            w = tl.where(valid, tl.exp2(lse - mx_new), 0.0)
            part = tl.load(op_ptr + prow[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
            o = o * alpha + tl.sum(part * w[:, None], 0)
            denom = denom * alpha + tl.sum(w, 0)
            mx = mx_new
        o = o / tl.where(denom == 0.0, 1.0, denom)
    else:
        smask = offs_s < NUM_SPLITS
        prow = (bh * NUM_SPLITS + offs_s) * ROWS + m
        lse = tl.load(lp_ptr + prow, mask=smask, other=float("-inf"))
        mx = tl.max(lse, 0)
        # a row that sees no token at all (every split empty: per-row lengths) gives out 0 and lse -inf
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.where(smask, tl.exp2(lse - mx), 0.0)
        denom = tl.sum(w, 0)
        o = tl.load(op_ptr + prow[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    hq = h * GQA + m // NQ
    qi = m % NQ
    orow = (b * (H_KV * GQA) + hq) * NQ + qi
    tl.store(out_ptr + orow * D + offs_d, o.to(DTYPE))
    if pid_d == 0:
        tl.store(lse_ptr + orow, tl.where(denom == 0.0, float("-inf"), (mx + tl.log2(denom)) * 0.6931471805599453))


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # an H100; only shapes the grid under the interpreter


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def choose_num_splits(*, batch: int, kv_heads: int, seq_len: int, block_n: int, num_sms: int,
                      programs_per_sm: int = 8) -> int:
    """Splits per (batch, KV head): as many as fit in ONE wave of programs_per_sm resident programs per
    SM (the default one-warp configs use ~250 registers, so 8 fit on an H100 SM: 1056 programs). Rounding
    up instead spilled a few programs into a second, nearly empty wave: 1088 programs ran 1.2-1.5x
    slower than 832 on the H100 (NOTES.md). Never a split shorter than one tile."""
    if seq_len <= 0:
        return 1
    tiles = _cdiv(seq_len, block_n)
    want = (programs_per_sm * num_sms) // max(1, batch * kv_heads)
    return max(1, min(tiles, want))


def fused_decode_is_profitable(*, batch: int, kv_heads: int, head_dim: int, seq_len: int,
                               k_bits: int = 2, v_bits: int = 2, cuda_graph: bool = False,
                               dtype_bytes: int = 2) -> bool:
    """Whether the fused kernel over packed KV is expected to beat SDPA over a full-precision (fp16) cache of this
    shape: the comparison of the issue's speed targets, reported by the benchmarks. It is not the op's choice:
    the op's alternative is dequantize + SDPA over the packed cache, which the fused kernel beats at every length
    (``benchmarks/bench_eager.py``), so ``kvcompile.ops`` takes the kernel wherever it supports the layout. A fixed
    cost plus per-element cost model fitted to H100 measurements (BENCHMARKS.md): the fused kernel costs per KV
    element, SDPA is memory bound (~3.1 TB/s). Eagerly, an ``ops.attention`` call costs ~60 us of host time (a cached
    plan and direct launches, BENCHMARKS.md "Eager host cost"), so short contexts only win inside a CUDA graph."""
    elems = 2 * batch * kv_heads * seq_len * head_dim  # K and V
    # fitted 2026-11-27 (session 16; the Gluon kernel with the TMA ring, H100 graph timings, BENCHMARKS.md v31 and
    # NOTES.md v32): K2V2 B=8 32k 63 us, K4V4 110 us, B=8 1k 13.3 us (the Triton kernel); it then predicts 128k B=1
    # 37.3 (measured 36.4-37.6) and 4k 18.1 (15.9-17.0). The 2026-11-26 fit, before the Gluon kernel:
    # 9.8e-6 + elems * (0.112e-12 + 0.0186e-12 * bits), from K2V2 110 us, K4V4 150, 128k B=1 60, 1k 13
    fused_gpu = 11.7e-6 + elems * (0.0080e-12 + 0.0219e-12 * (k_bits + v_bits))
    sdpa_gpu = 8e-6 + elems * dtype_bytes / 3.1e12
    if cuda_graph:
        fused_s, sdpa_s = fused_gpu, sdpa_gpu
    else:  # the host enqueues while the GPU runs: the slower of the two sets the pace
        fused_s, sdpa_s = max(60e-6, fused_gpu), max(25e-6, sdpa_gpu)
    return fused_s * 1.1 < sdpa_s


def _fail(msg: str):
    raise ValueError(f"decode_attention: {msg}")


def _lengths_arg(name: str, t, B: int, dev) -> tuple[torch.Tensor, int, int]:
    """(tensor, batch stride, part stride) of a [3] or [B, 3] int tensor of (n_sink, n_quant, n_window)."""
    if not torch.is_tensor(t):
        _fail(f"{name} must be a [3] or [B, 3] int32/int64 tensor of (n_sink, n_quant, n_window), got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        _fail(f"{name} dtype {t.dtype} unsupported (int32 or int64)")
    if t.device != dev:
        _fail(f"{name} must be on q's device {dev} (the kernel reads it there, no host sync), found {t.device}")
    if t.shape == (3,):
        return t, 0, t.stride(0)
    if t.shape == (B, 3):
        return t, t.stride(0), t.stride(1)
    _fail(f"{name} shape {tuple(t.shape)} must be (3,) (one length for the batch) or ({B}, 3) (per sequence)")


def group_fill_groups(*, head_dim: int, k_group_size: int, v_group_size: int, k_channel: bool, rows: int) -> int:
    """How many channel groups group fill puts on the MMA rows of one KV head: 1 where no side has per-token groups
    below the head dim, 0 where it would be needed but cannot run (grouped K and V of different sizes, or more
    than 64 rows: groups x the query rows rounded up to a power of two), else head_dim // the smaller group."""
    k_grouped = not k_channel and k_group_size < head_dim
    if not (k_grouped or v_group_size < head_dim):
        return 1
    g_min = min(k_group_size if k_grouped else head_dim, v_group_size)
    if (k_grouped and k_group_size != g_min) or (head_dim // g_min) * _next_pow2(rows) > _MAX_GFILL_ROWS:
        return 0
    return head_dim // g_min


def _check_formats(D: int, *sides, fail=_fail) -> None:
    """The code formats of K and V (``sides``: (name, format, bits, channel group size, zero tensor or None)), for both
    attention launchers: int8 / fp8 take 8 bits, NF 4, 8-bit codes one group per token, and only affine codes have a
    zero point. ``fail`` raises (the calling launcher's, so the message names it)."""
    for name, fmt, bits, g, zero in sides:
        if fmt not in SUPPORTED_FORMATS:
            fail(f"{name}_format={fmt!r} unsupported (supported: {SUPPORTED_FORMATS})")
        if fmt in ("int8", "fp8") and bits != 8:
            fail(f"{name}_format={fmt!r} needs {name}_bits=8, got {bits}")
        if fmt == "nf" and bits != 4:
            fail(f"{name}_format='nf' takes 4-bit codes (NF4), got {name}_bits={bits}")
        if bits == 8 and g != D:
            fail(f"8-bit {name} codes take one group per token ({name}_group_size={D}), got {g}")
        if (zero is None) != (fmt != "affine"):
            fail(f"{name}_zero must be {'None' if fmt != 'affine' else 'a tensor'} for {name}_format={fmt!r}")


def _check_packed(B: int, Hkv: int, D: int, cap: int, cap_v: int, k_bits, v_bits, k_channel: bool, k_group_size: int,
                  v_group_size: int, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fail=_fail) -> None:
    """Dtypes and shapes of the packed middles (codes uint8; scales / zeros in a meta dtype, per token and channel
    group, or for per-channel keys per token group and channel; a None zero is the formats' own check), for both
    attention launchers."""
    for name, t, want in (("k_codes", k_codes, (B, Hkv, cap, D * k_bits // 8)),
                          ("v_codes", v_codes, (B, Hkv, cap_v, -(-D // 5) if v_bits == 1.5 else int(D * v_bits) // 8))):
        if t.dtype != torch.uint8:
            fail(f"{name} must be uint8, got {t.dtype}")
        if tuple(t.shape) != want:
            fail(f"{name} shape {tuple(t.shape)} != {want}")
    if k_channel:
        if cap % k_group_size:
            fail(f"k_axis='channel': the key capacity {cap} must be a multiple of the token group {k_group_size}")
        k_meta_shape = (B, Hkv, cap // k_group_size, D)
    else:
        k_meta_shape = (B, Hkv, cap, D // k_group_size)
    for name, t, want in (("k_scale", k_scale, k_meta_shape), ("k_zero", k_zero, k_meta_shape),
                          ("v_scale", v_scale, (B, Hkv, cap_v, D // v_group_size)),
                          ("v_zero", v_zero, (B, Hkv, cap_v, D // v_group_size))):
        if t is None:  # int8 / fp8 / NF: no zero point
            continue
        if t.dtype not in _META_DTYPES:
            fail(f"{name} dtype {t.dtype} unsupported ({_META_DTYPES})")
        if tuple(t.shape) != want:
            fail(f"{name} shape {tuple(t.shape)} != {want}")


def _code_args(q, k_bits, v_bits, k_format, v_format, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fail=_fail):
    """The code constants of both attention launchers: q's Triton dtype, K's magic number and value, V's product dtype,
    magic and value; the zero tensors with the scales standing in where a format has none; 8-bit codes as int16
    words. Returns (tl_dtype, magic, magic_val, v_dtype, v_magic, v_magic_val, k_codes, k_zero, v_codes, v_zero)."""
    tl_dtype = tl.float16 if q.dtype == torch.float16 else tl.bfloat16
    magic, magic_val = (0x6400, 1024.0) if q.dtype == torch.float16 else (0x4300, 128.0)
    # 8-bit codes: 1024 + code is exact in fp16 only (the K product converts q; int8's flipped sign bit adds 128;
    # fp8's planes are values, no offset)
    if k_bits == 8:
        magic, magic_val = 0x6400, _MAGIC_VAL_8BIT[k_format]
    if k_format == "nf":  # fp16 codebook values: no offset
        magic, magic_val = 0x6400, 0.0
    # The packed V product (p * scale) . codes runs in fp16 whenever the scales are fp16 (p * s <= max
    # scale then fits fp16): 3 more mantissa bits than bf16 for bf16 models. 8-bit codes need fp16.
    v_fp16 = v_scale.dtype == torch.float16 or q.dtype == torch.float16 or v_bits == 8 or v_format == "nf"
    # (not fp16: a bf16 model, whose magic is bf16's own even where K's 8-bit / NF4 codes took fp16's above)
    v_dtype, v_magic, v_magic_val = (tl.float16, 0x6400, 1024.0) if v_fp16 else (tl.bfloat16, 0x4300, 128.0)
    if v_bits == 8:
        v_magic_val = _MAGIC_VAL_8BIT[v_format]
    if v_format == "nf":
        v_magic_val = 0.0
    # int8 / fp8 have no zero point: the scale stands in for the pointer (never used)
    if k_zero is None:
        k_zero = k_scale
    if v_zero is None:
        v_zero = v_scale
    # 8-bit codes are read as int16 words of two codes (two planes, as for 4-bit)
    if k_bits == 8:
        k_codes = _int16_words("k_codes", k_codes, fail)
    if v_bits == 8:
        v_codes = _int16_words("v_codes", v_codes, fail)
    return tl_dtype, magic, magic_val, v_dtype, v_magic, v_magic_val, k_codes, k_zero, v_codes, v_zero


def _int16_words(name: str, t: torch.Tensor, fail=_fail) -> torch.Tensor:
    """8-bit codes [B, H, cap, D] as int16 words [B, H, cap, D // 2] (plane 0: the low bytes, even channels)."""
    if t.stride(-1) != 1 or t.storage_offset() % 2 or any(st % 2 for st in t.stride()[:-1]):
        fail(f"8-bit {name} must have contiguous channels at even byte offsets (strides {t.stride()}); "
             "pass a contiguous tensor")
    return t.view(torch.int16)


def _rope_operands(q: torch.Tensor, inv_freq: torch.Tensor, perm: torch.Tensor | None, hkv: int):
    """Keys quantized before RoPE (K_ROPE): for q in the keys' stored channel order (``perm[h, j]``: the model
    channel stored at column j of KV head h; None: the identity), qb [B, Hq, NQ, D] with qb[j] = +-q[partner of
    j] (the rotate-half partner, + below rotary_dim / 2, - from there to rotary_dim, 0 past it) and each stored
    column's frequency w [Hkv, D] float32 (0 past rotary_dim), so that q . R(p) k = sum_j k_j (q_j cos(p w_j) +
    qb_j sin(p w_j)) for the un-rotated k in stored order (transformers' rotate-half convention, as
    kvcompile.cache.packed.rotate)."""
    B, Hq, NQ, D = q.shape
    half = inv_freq.numel()
    dev = q.device
    o = (torch.arange(D, device=dev).expand(hkv, D) if perm is None else perm.to(device=dev, dtype=torch.int64))
    rot = o < 2 * half
    partner = torch.where(o < half, o + half, o - half)
    partner = torch.where(rot, partner, o)
    sign = torch.where(o < half, 1.0, torch.where(rot, -1.0, 0.0))
    inv = torch.argsort(o, dim=-1)
    p_stored = torch.gather(inv, -1, partner)
    w = torch.where(rot, inv_freq.to(device=dev, dtype=torch.float32)[o % half], 0.0).contiguous()
    r = Hq // hkv
    idx = p_stored.repeat_interleave(r, dim=0)[None, :, None, :].expand(B, Hq, NQ, D)
    qb = torch.gather(q, -1, idx) * sign.repeat_interleave(r, dim=0)[None, :, None, :].to(q.dtype)
    return qb.contiguous(), w


def _rope_check(q: torch.Tensor, k_rope: torch.Tensor, k_perm: torch.Tensor | None, hkv: int, fail) -> None:
    """Checks ``k_rope`` / ``k_perm`` (keys before RoPE) against q; ``fail`` raises with the caller's name."""
    D, dev = q.shape[-1], q.device
    if k_rope.dim() != 1 or k_rope.dtype != torch.float32 or not 1 <= k_rope.numel() <= D // 2 or k_rope.device != dev:
        fail(f"k_rope must be float32 [rotary_dim / 2 <= {D // 2}] on {dev}, got {k_rope.dtype} "
             f"{tuple(k_rope.shape)} on {k_rope.device}")
    if k_perm is not None and (tuple(k_perm.shape) != (hkv, D) or k_perm.device != dev):
        fail(f"k_perm must be [Hkv={hkv}, D={D}] on {dev}, got {tuple(k_perm.shape)} on {k_perm.device}")


def _rope_args(q: torch.Tensor, k_rope: torch.Tensor, k_perm: torch.Tensor | None, hkv: int, fail):
    """Checks ``k_rope`` / ``k_perm`` (keys before RoPE; ``fail`` raises with the caller's name) and returns q made
    contiguous with its rotate-half partners and the stored columns' frequencies (``_rope_operands``)."""
    _rope_check(q, k_rope, k_perm, hkv, fail)
    q = q.contiguous()
    qb, rw = _rope_operands(q, k_rope, k_perm, hkv)
    return q, qb, rw


def _rope_table(w: torch.Tensor, block_n: int, per: int, dtype: torch.dtype) -> torch.Tensor:
    """ROPE_TAB (angle addition): cos / sin of u * w for the in-tile offsets u < block_n, w the stored columns'
    frequencies [Hkv, D] (``_rope_operands``), as [Hkv, 2, per, block_n, D // per] in ``dtype``: cos then sin, plane
    j holding columns per * i + j (the key code planes' order), so each plane's tile is one contiguous load."""
    hkv, D = w.shape
    u = torch.arange(block_n, device=w.device, dtype=torch.float32)
    ang = u[None, :, None] * w[:, None, :]  # [Hkv, block_n, D], float32 u * w as the reference's pos * w
    tab = torch.stack((torch.cos(ang), torch.sin(ang)), 1)  # [Hkv, 2, block_n, D]
    return tab.view(hkv, 2, block_n, D // per, per).permute(0, 1, 4, 2, 3).contiguous().to(dtype)


def decode_attention(
    *,
    q: torch.Tensor,
    k_sink: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor | None,
    k_window: torch.Tensor,
    v_sink: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor | None,
    v_window: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    n_quant: int | None = None,
    n_window: int | None = None,
    lengths: torch.Tensor | None = None,
    v_lengths: torch.Tensor | None = None,
    k_axis: str = "token",
    k_format: str = "affine",
    v_format: str = "affine",
    sm_scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    programs_per_sm: int | None = None,
    fast_asm: bool = True,
    fill_rows: bool | None = None,
    fp_contig: bool | None = None,
    fp_split: bool | None = None,
    group_fill: bool | None = None,
    group_bcast: bool | None = None,
    kchan_dequant: bool | None = None,
    head_fill: bool | int | None = None,
    prefetch: bool | None = None,
    k_rope: torch.Tensor | None = None,
    k_perm: torch.Tensor | None = None,
    rope_table: bool | None = None,
    lazy_rescale: bool | None = None,
    balance: bool | None = None,
    fp_block_n: int | None = None,
    window_ring: bool = False,
    v_denormal: bool | None = None,
    gluon: bool | str | None = None,
    gluon_l2: int | None = None,
    gluon_tma: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the packed KV ``sink ++ middle[:n_quant] ++ window[:n_window]``.

    q: [B, Hq, Nq, D] fp16/bf16, any strides; the Nq new tokens are the last Nq logical tokens and are
    causal among themselves. ``*_sink`` [B, Hkv, S, D] and ``*_window`` [B, Hkv, W, D] in q's dtype;
    ``*_codes`` uint8 [B, Hkv, cap, D * bits / 8] (little-endian within the byte); ``*_scale`` / ``*_zero``
    [B, Hkv, cap, D // group_size] (per-token affine groups: x = c * scale + zero), or for keys with
    ``k_axis="channel"`` (KIVI: groups of ``k_group_size`` tokens per channel) [B, Hkv, cap // k_group_size, D].
    ``k_format`` / ``v_format``: "affine" (the above), or 8-bit "int8" / "fp8" (e4m3) codes with one absmax
    scale per token (``group_size == D``, ``*_zero`` None: x = int8(c) * scale, or fp8(c) * scale), or "nf":
    4-bit NF4 codebook codes with an absmax scale per group (``*_zero`` None: x = NF4[c] * scale; groups below
    D through group fill). 8-bit affine codes also take one group per token only. ``v_bits=1.5``: ternary
    values (affine, per-token groups; ``v_codes`` [B, Hkv, cap, ceil(D / 5)], byte u holding channels 5u .. 5u + 4
    as base-3 digits, docs/format.md).

    Lengths, one of:
    - ``n_quant``, ``n_window`` (host ints): every sequence holds all S sink tokens, ``n_quant`` packed and
      ``n_window`` window tokens; the split partition is chosen from this length.
    - ``lengths``: a device int tensor [3] or [B, 3] of (n_sink, n_quant, n_window) per sequence (PackedKV's
      ``counts`` is the [3] form); the sink / middle / window tensors are capacity-sized. The kernel reads
      the lengths on the device: no host synchronisation, so a decode step can be captured in a CUDA graph.
      The grid is sized from the capacities; each program derives its row's chunk from the row's length
      (splits past it do no tile), and a row that sees no token gets out 0 and lse -inf. Lengths outside
      [0, capacity] are clamped, never read out of bounds. ``v_lengths`` (same form): V's lengths where
      V quantized more of the sequence than K (KIVI: keys flush a token group at a time, values every
      token); the same n_sink and total length, V's n_quant >= K's n_quant.
      ``balance`` (per-row [B, 3] lengths, B > 1, more than one split): a KV head's B x splits programs are shared
      out over the rows by their work (every program takes about the same number of tiles, a long row gets more
      programs than a short one) instead of the same number per row, so the batch's total tokens set the time
      rather than its longest row; a row's full-precision program (``fp_split``) stays its own. None: on (H100,
      rows of 32k down to 4k tokens: 73 against 102 us; equal rows in the [B, 3] form: 112 against 105 us, so a
      batch whose rows are equal is better passed in the [3] form, as PackedKV's ``counts`` is). The Gluon kernel
      takes it too (its packed-middle programs shared out the same way); unlike the other Triton tunings, an
      explicit ``balance`` does not send the call to the Triton kernel.

    ``window_ring``: the windows are rings, as PackedKV holds them (docs/format.md): a sequence's window token j sits
    at row ``(n_quant + j) % W`` of ``k_window`` (``W`` its rows), and of ``v_window`` at ``(v_n_quant + j') % W_v``
    for V's own window token j' (V's own n_quant). Otherwise window token j is row j.

    ``fp_block_n`` / ``fp_contig``: the sink and window tiles' token count and whether they load contiguously (split
    into channel planes in registers) rather than one strided load per plane. None: 16 and contiguous (NOTES.md v24;
    row fill and V ahead of K keep the packed loop's tile, by plane).

    ``lazy_rescale``: skip the output accumulators' online-softmax rescale on tiles where no row's running max
    grew (exact: every alpha is 1 there). None: on for one-warp builds outside ``balance`` (NOTES.md v23).

    ``gluon``: run the split in the Gluon kernel (kvcompile/kernels/gluon_decode.py, NOTES.md v27; CUDA only) for
    the layouts it takes: one group per head of 128 channels, 2 or 4 bits (K and V each: K4V2 too), affine fp16 scales
    and zeros, an fp16 or bf16 model, one new token, up to 16 query heads per KV head, K and V packed as far (no
    ``v_lengths``), scale / zero rows starting at even tokens (PackedKV aligns them; sink and window tokens go to one
    extra program per KV head).
    None: there, where each split gets at least ``GLUON_MIN_TILES`` tiles of 64 tokens, in the tokens-on-M form
    ``GLUON_TOKENS_MIN_TILES`` (H100: 5.1x fp16 SDPA against the Triton kernel's 3.6x for K2V2 at 32k), unless a
    tuning only the Triton kernel has is given (block_n, num_warps, ..., v_denormal, fast_asm=False); True: always
    (an error says why a layout cannot); False: never.
    ``"tokens"`` / ``"rows"`` force one of its two forms: the tokens on the MMA's M side (S^T = K q^T, up to 8 query
    heads per KV head; the default there, NOTES.md v28) or the query heads on it (16 rows, up to 16 heads).
    ``gluon_l2``: how many tiles ahead the Gluon kernel's packed loop prefetches into L2 (0: none; None: its choice,
    one tile after the next for 4-bit codes, NOTES.md v29; taken only on sm_90 and later, where the rows start 16-byte
    aligned, without the TMA ring, and where K and V share their code width and strides: elsewhere it is dropped
    without an error).
    ``gluon_tma``: in the Gluon kernel's tokens-on-M form, the packed tiles come through a ring of this many
    shared-memory stages fed by bulk tensor copies (TMA, sm_90 and later; NOTES.md v31) instead of register loads
    (0: not; None: ``GLUON_TMA_DEFAULT``, then ``TMA_DEFAULT_STAGES`` stages where the storage allows: 128-byte code
    rows, scale / zero rows evenly spaced).

    Keys quantized before RoPE (SKVQ's ``pre_rope``): ``k_rope`` the model's rotary inverse frequencies (float32
    [rotary_dim / 2]) and ``k_perm`` the keys' channel order ([Hkv, D], the model channel at each stored column;
    None: the identity; q is in that stored order, as for any permuted layout). The packed middle's token t then
    holds the un-rotated key of position S + t (PackedKV's convention) and the kernel rotates it per element
    (affine 2- / 4-bit keys in per-token groups; sink and window hold rotated keys and need nothing).
    ``rope_table``: rotate by angle addition (the tile's base angle folded into q once per tile, the in-tile offsets'
    cos / sin from a small table, NOTES.md v22) instead of one angle per key element; None picks the form measured
    faster for the layout.

    Returns (out [B, Hq, Nq, D] in q's dtype, contiguous; lse [B, Hq, Nq] float32, natural log of the
    softmax denominator of ``sm_scale * q . k``).
    """
    # An eager decode step calls this once per layer with the same storage: the checks and decisions below run once
    # per layout (a plan, kvcompile/kernels/launch.py), later calls only fill in their tensors. Host lengths change
    # every step and are not cached.
    storage = (k_sink, k_codes, k_scale, k_zero, k_window, v_sink, v_codes, v_scale, v_zero, v_window, lengths,
               v_lengths, k_rope, k_perm)
    key = None
    if lengths is not None:
        try:
            key = PlanCache.key((q,), storage, (
                k_bits, v_bits, k_group_size, v_group_size, n_quant, n_window, k_axis, k_format, v_format, sm_scale,
                num_splits, block_n, num_warps, num_stages, use_dot, programs_per_sm, fast_asm, fill_rows,
                fp_contig, fp_split, group_fill, group_bcast, kchan_dequant, head_fill, prefetch, rope_table,
                lazy_rescale, balance, fp_block_n, window_ring, v_denormal, gluon, gluon_l2, gluon_tma,
            ))
        except (AttributeError, TypeError):  # not tensors: the plan's checks say what is wrong
            key = None
        else:
            plan = _DECODE_PLANS.get(key, storage)
            if plan is not None:
                return plan(q, storage)
    # Not cached (host lengths, or a layout / storage not seen yet): the checks (messages formatted only on failure)
    # and decisions, then the plan, run once and kept.
    if q.dim() != 4:
        _fail(f"q must be [B, Hq, Nq, D], got shape {tuple(q.shape)}")
    B, Hq, NQ, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        _fail(f"q dtype {q.dtype} unsupported (float16, bfloat16)")
    if D not in SUPPORTED_HEAD_DIMS:
        _fail(f"head dim {D} unsupported (supported: {SUPPORTED_HEAD_DIMS})")
    if k_bits not in SUPPORTED_BITS or v_bits not in SUPPORTED_V_BITS:
        _fail(f"bits k={k_bits} v={v_bits} unsupported (supported: keys {SUPPORTED_BITS}, values {SUPPORTED_V_BITS})")
    ternary = v_bits == 1.5
    if ternary and (v_format != "affine" or k_axis != "token"):
        _fail("ternary values (v_bits=1.5) take the affine format beside per-token keys")
    _check_formats(D, ("k", k_format, k_bits, k_group_size, k_zero), ("v", v_format, v_bits, v_group_size, v_zero))
    k_channel = k_axis == "channel"
    if k_axis not in ("token", "channel"):
        _fail(f"k_axis={k_axis!r} unsupported ('token' or 'channel')")
    if k_channel and (k_bits == 8 or k_format != "affine"):
        _fail("k_axis='channel' takes 2- or 4-bit affine keys")
    if k_channel:
        if k_group_size not in SUPPORTED_TOKEN_GROUPS:
            _fail(f"key token group k_group_size={k_group_size} unsupported for k_axis='channel' "
                  f"(supported: {SUPPORTED_TOKEN_GROUPS})")
    elif not (k_group_size == D or k_group_size in (16, 32, 64)):
        _fail(f"group sizes k={k_group_size} v={v_group_size} unsupported (D={D}, 16, 32 or 64)")
    if not (v_group_size == D or v_group_size in (16, 32, 64)):
        _fail(f"group sizes k={k_group_size} v={v_group_size} unsupported (D={D}, 16, 32 or 64)")
    if NQ < 1:
        _fail("q must hold at least one new token")
    if k_codes.dim() != 4 or v_codes.dim() != 4:
        _fail(f"k_codes / v_codes must be [B, Hkv, cap, D * bits / 8], got shapes {tuple(k_codes.shape)}, "
              f"{tuple(v_codes.shape)}")
    Hkv, cap, cap_v = k_codes.shape[1], k_codes.shape[2], v_codes.shape[2]
    if Hkv == 0 or Hq % Hkv:
        _fail(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    r = Hq // Hkv
    if r * NQ > _MAX_ROWS:
        _fail(f"GQA ratio x new tokens = {r * NQ} > {_MAX_ROWS}")
    _check_packed(B, Hkv, D, cap, cap_v, k_bits, v_bits, k_channel, k_group_size, v_group_size,
                  k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    if k_sink.dim() != 4 or k_window.dim() != 4 or v_window.dim() != 4:
        _fail(f"sink and window must be [B, Hkv, n, D], got {tuple(k_sink.shape)}, {tuple(k_window.shape)}, "
              f"{tuple(v_window.shape)}")
    S, W, W_v = k_sink.shape[2], k_window.shape[2], v_window.shape[2]
    for name, t, want in (("k_sink", k_sink, (B, Hkv, S, D)), ("v_sink", v_sink, (B, Hkv, S, D)),
                          ("k_window", k_window, (B, Hkv, W, D)), ("v_window", v_window, (B, Hkv, W_v, D))):
        if t.shape != want:
            _fail(f"{name} shape {tuple(t.shape)} != {want}")
        if t.dtype != q.dtype:
            _fail(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    dev = q.device
    for t in (k_sink, k_codes, k_scale, k_zero, k_window, v_sink, v_codes, v_scale, v_zero, v_window):
        if t is not None and t.device != dev:
            _fail(f"all inputs must be on q's device {dev}, found one on {t.device}")
    rope = k_rope is not None
    if rope:
        if k_channel or k_format != "affine" or k_bits not in (2, 4):
            _fail("k_rope (keys before RoPE) takes affine 2- or 4-bit keys in per-token groups")
        _rope_check(q, k_rope, k_perm, Hkv, _fail)
        if rope_table is None:
            # (H100, 32k, NOTES.md v22) the table wins with one key group per token (K2V2 g128, 8B shape: 409-418
            # against 536-541 us) and for groups of 16 at D = 128 without group fill (512 against 775-780 with it, the
            # per-element default); it lost for groups of 16 at D = 64 (194-201 against 180-182) and beside ternary
            # values (skvq's defaults: 1375-1404 against 1160-1181 at D = 128, 244-245 against 216-218 at D = 64)
            # (groups of 32 / 64 were not timed: they keep the per-element form)
            rope_table = ROPE_TAB_DEFAULT and not ternary and (k_group_size == D
                                                               or (D == 128 and k_group_size == 16))
    dev_lens = lengths is not None
    kv_mixed = False
    if dev_lens:
        if n_quant is not None or n_window is not None:
            _fail("pass either lengths= (device tensor) or n_quant= / n_window= (host ints), not both")
        lens, slen_b, slen_p = _lengths_arg("lengths", lengths, B, dev)
        vlens, svlen_b, svlen_p = lens, slen_b, slen_p
        if v_lengths is not None and v_lengths is not lengths:
            vlens, svlen_b, svlen_p = _lengths_arg("v_lengths", v_lengths, B, dev)
            kv_mixed = True
        # capacities: the kernel clamps each row's lengths to them
        mid_cap = min(cap, cap_v)
        win_cap = W if kv_mixed else min(W, W_v)
        n_quant_arg, n_window_arg, L_grid = mid_cap, win_cap, S + mid_cap + win_cap
    else:
        if n_quant is None or n_window is None:
            _fail("pass n_quant= and n_window= (host ints) or lengths= (a [3] / [B, 3] device int tensor)")
        if v_lengths is not None:
            _fail("v_lengths= needs lengths= (device tensors)")
        n_quant, n_window = int(n_quant), int(n_window)
        if not 0 <= n_quant <= min(cap, cap_v):
            _fail(f"n_quant={n_quant} outside [0, {min(cap, cap_v)}]")
        if not 0 <= n_window <= min(W, W_v):
            _fail(f"n_window={n_window} outside [0, {min(W, W_v)}]")
        if S + n_quant + n_window < NQ:
            _fail(f"sequence length {S + n_quant + n_window} < new tokens {NQ}")
        lens, slen_b, slen_p, vlens, svlen_b, svlen_p = q, 0, 0, q, 0, 0  # unused
        mid_cap, n_quant_arg, n_window_arg, L_grid = n_quant, n_quant, n_window, S + n_quant + n_window
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)

    interp = _interpreting() or dev.type != "cuda"
    # a tuning only the Triton kernel has, given explicitly, asks for the Triton kernel (gluon=None)
    triton_tuned = fast_asm is not True or any(x is not None for x in (
        block_n, num_warps, num_stages, use_dot, fill_rows, fp_contig, fp_split, group_fill, group_bcast, kchan_dequant,
        head_fill, prefetch, rope_table, lazy_rescale, fp_block_n, v_denormal))
    if gluon is None and GLUON_DEFAULT and not triton_tuned or gluon:
        plan = _gluon_plan(q, storage, gluon, interp, B, Hq, NQ, D, Hkv, r, S, W, W_v, mid_cap, n_quant_arg,
                           n_window_arg, dev_lens, kv_mixed, lens, slen_b, slen_p, k_bits, v_bits, k_group_size,
                           v_group_size, k_axis, k_format, v_format, rope, sm_scale, num_splits, programs_per_sm,
                           window_ring, gluon_l2, balance, gluon_tma)
        if plan is not None:
            if key is not None:
                _DECODE_PLANS.put(key, storage, plan)
            return plan(q, storage)
    if programs_per_sm is None:
        programs_per_sm = 8
    # Defaults from the H100 sweep (kvcompile/kernels/NOTES.md): one warp per program; one query row
    # (MHA decode) is faster as multiply-and-reduce on CUDA cores than as a 16-row MMA.
    mha_fill = use_dot is None and fill_rows is None and r * NQ == 1 and MHA_FILL_DEFAULT
    if mha_fill:
        use_dot, fill_rows = True, True
    if use_dot is None:
        use_dot = r * NQ >= 2
    m_pad = _next_pow2(r * NQ)
    if fill_rows is None:
        fill_rows = FILL_ROWS_DEFAULT
    fp_contig_default = fp_contig is None
    fp_split_default = fp_split is None
    if fp_split is None:
        fp_split = FP_SPLIT_DEFAULT
    sub = 1
    gfill, k_gf, v_gf = 1, False, False
    if group_fill is None:
        # the angle-addition table with groups of keys below D measured faster without group fill (v22)
        group_fill = GROUP_FILL_DEFAULT and not (rope and rope_table and k_group_size < D)
    k_grouped = not k_channel and k_group_size < D
    if use_dot and group_fill:
        # per-token groups below D: MMA rows (channel group, query row) instead of dequantizing in registers
        # (keys before RoPE are dequantized per element: only V's groups can fill rows)
        # (ternary values are dequantized per element too)
        n_groups = group_fill_groups(head_dim=D, k_group_size=k_group_size,
                                     v_group_size=D if ternary else v_group_size, k_channel=k_channel or rope,
                                     rows=r * NQ)
        if n_groups > 1:
            gfill, k_gf, v_gf = n_groups, k_grouped and not rope, v_group_size == D // n_groups and not ternary
            m_pad = gfill * m_pad
            fill_rows = False
    # head fill: one group per token, fewer than 16 rows per KV head; the heads per program divide Hkv
    hfill = 1
    if head_fill is None:
        head_fill = HEAD_FILL_DEFAULT
    if head_fill and use_dot and gfill == 1 and not k_channel and not kv_mixed and k_group_size == D and not rope \
            and not ternary \
            and v_group_size == D and m_pad < 16 and 8 not in (k_bits, v_bits) and k_format == v_format == "affine":
        hfill = min(16 // m_pad, HEAD_FILL_MAX if head_fill is True else int(head_fill))
        while Hkv % hfill:
            hfill //= 2
        if hfill > 1:
            fill_rows = False
            m_pad = 16
    # NF4 codes in groups below D need group fill (the register-dequantizing form is affine only)
    if (k_format == "nf" and k_grouped and not k_gf) or (v_format == "nf" and v_group_size < D and not v_gf):
        _fail(f"NF4 codes in groups of k={k_group_size} / v={v_group_size} channels need group fill: equal group "
              f"sizes where both sides are grouped, (D / group) x GQA ratio x new tokens <= {_MAX_GFILL_ROWS}, "
              "group_fill not False")
    if use_dot:
        if fill_rows and m_pad < 16:
            sub = 16 // max(2, m_pad)  # rows = (token sub-block, query row): no padding rows in the softmax
        m_pad = max(16, m_pad)
    block_n_default = block_n is None
    if block_n is None:
        block_n = 64 if use_dot else 32
        if k_channel:
            block_n = min(block_n, k_group_size)
        if k_gf:
            # grouped keys (group fill on both sides): the prefetched [groups, 64] scale / zero tiles spill at
            # BLOCK_N 64 (H100, K4V4 in groups of 32: 309 against 169 us at 32; NOTES.md v14)
            block_n = 32
        if 8 in (k_bits, v_bits) or "nf" in (k_format, v_format):
            # 8-bit code tiles: [64, D] int16 words of K and V spill one warp's registers at BLOCK_N 64 (offline
            # triton 3.6 SASS: 64 bytes of stack, 144 with row fill; none at 32); NF4 with one group per token: 8
            block_n = 32
        if (4 in (k_bits, v_bits) and gfill == 1 and hfill == 1 and sub == 1 and use_dot and prefetch is not False
                and PREFETCH_DEFAULT and (k_channel or k_group_size == D) and v_group_size == D):
            # 4-bit codes, one group per head, scales prefetched: BLOCK_N 32 with three stages (238 registers, no
            # stack) against 64 with two (255, 8 bytes of stack). H100 K4V4 g128 32k: 135.7 against 148.4-149.0 us,
            # bf16 with sink + window 185.5 against 223.0-228.6 (NOTES.md v18)
            block_n = min(block_n, 32)
        if (q.dtype == torch.bfloat16 and k_bits == v_bits == 2 and gfill == 1 and hfill == 1 and sub == 1
                and use_dot and not k_channel and k_group_size == D and v_group_size == D):
            # a bf16 model's 2-bit codes, one group per head: BLOCK_N 32 (H100, sink 4 + window 128 at 32k: 165.1
            # against 177.7-178.1 us at 64; fp16 keeps 64: 108.5 against 118.6; NOTES.md v18)
            block_n = min(block_n, 32)
        if rope or ternary:
            # keys before RoPE / ternary values: per-element float32 keys, scales, zeros and angles; BLOCK_N 32 spills (offline triton
            # 3.6: 400 bytes of stack, g128 keys), 16 does not (255 registers; 254 for groups of 16 with two warps)
            block_n = 16
    if block_n % sub:
        _fail(f"block_n={block_n} must be a multiple of the {sub} row-fill sub-blocks")
    if k_channel and k_group_size % block_n:
        _fail(f"k_axis='channel': block_n={block_n} must divide the key token group {k_group_size} "
              "(one per-channel scale per tile)")
    if num_warps is None:
        num_warps = 1
        if m_pad >= 32 and gfill >= 8 and programs_per_sm == 8:
            # groups of 16 at D = 128 (group fill: 8 groups x the query rows): one warp spills the 32-64 MMA rows'
            # accumulators (offline: 336 bytes of stack); two warps need 226 registers, 4 programs per SM (H100, K2V2
            # 32k: 297 against 414 us, V alone in groups of 16 266 against 548; NOTES.md v17)
            num_warps, programs_per_sm = 2, 4
        elif ternary and D == 128 and programs_per_sm == 8:
            # ternary values dequantized per element in natural order at D = 128: one warp spills (offline triton
            # 3.6: 768 bytes of stack for skvq's defaults), two need 242 registers (4 programs per SM)
            num_warps, programs_per_sm = 2, 4
        elif (k_bits == v_bits == 8 and block_n_default and programs_per_sm == 8 and use_dot and sub == 1
              and gfill == 1 and hfill == 1):
            # 8-bit codes, several query rows (GQA): memory bound; four warps at BLOCK_N 64, 3 programs per SM (161
            # registers) reach 95% of the copy bandwidth (H100 int8 32k: 190.6-191.2 against 201.6-204.7 us, three
            # runs; fp8 190.6 against 201.3). MHA's row fill keeps one warp (four: 500.9 against 376.8; NOTES.md v18)
            num_warps, programs_per_sm, block_n = 4, 3, 64
    if block_n_default and num_warps == 1 and k_gf and k_group_size == 16:
        # groups of 16 with 16 rows (D = 64, SmolLM2's shape): BLOCK_N 32 spills (H100: 65.6 against 54.1 us at 16)
        block_n = 16
    num_stages_default = num_stages is None
    if num_stages is None:
        num_stages = 3 if use_dot else 2
    # fp_split: one extra program per (batch, KV head) takes the full-precision sink + window, the other
    # splits only the packed middle (the window no longer lengthens one split, and the packed loop does
    # not carry the fp loops' registers).
    fp_split = bool(fp_split) and mid_cap > 0 and (S > 0 or n_window_arg > 0)
    if fp_split and fp_split_default and num_splits is None:
        # by default only where the extra program still fits the one wave (programs_per_sm x SMs)
        fp_split = 2 * B * (Hkv // hfill) <= programs_per_sm * _num_sms(dev)
    # With device lengths the grid is sized for the capacities (fixed for a CUDA graph) and each program
    # derives its row's chunk in the kernel; with host lengths the chunk is computed here.
    chunk = 0
    if fp_split:
        if num_splits is None:
            want = max(1, (programs_per_sm * _num_sms(dev)) // max(1, B * (Hkv // hfill)))
            mid_splits = max(1, min(_cdiv(mid_cap, block_n), want - 1))
        else:
            mid_splits = max(1, num_splits - 1)
        if dev_lens:
            num_splits = mid_splits + 1
        else:
            chunk = _cdiv(_cdiv(n_quant, mid_splits), block_n) * block_n
            num_splits = _cdiv(n_quant, chunk) + 1
    else:
        if num_splits is None:
            num_splits = choose_num_splits(batch=B, kv_heads=Hkv // hfill, seq_len=L_grid, block_n=block_n,
                                           num_sms=_num_sms(dev), programs_per_sm=programs_per_sm)
        if dev_lens:
            num_splits = max(1, min(num_splits, _cdiv(L_grid, block_n)))
        else:
            chunk = _cdiv(_cdiv(L_grid, num_splits), block_n) * block_n
            num_splits = _cdiv(L_grid, chunk)

    direct = num_splits == 1
    has_sink, has_mid, has_window = S > 0, mid_cap > 0, n_window_arg > 0
    tl_dtype, magic, magic_val, v_dtype, v_magic, v_magic_val, _, k_zero, _, v_zero = _code_args(
        q, k_bits, v_bits, k_format, v_format, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    grid = (B * (Hkv // hfill), num_splits)
    rope_tab, rt_dtype = 0, None
    if rope and rope_table:
        # angle addition (v22): the per-element key math in fp16 pairs where the scales are fp16 (as the V product)
        k16 = k_scale.dtype == torch.float16 or q.dtype == torch.float16
        rope_tab = 1 if k16 else 2
        rt_dtype = torch.float16 if k16 else torch.bfloat16
    gf_bcast = GROUP_BCAST_DEFAULT if group_bcast is None else bool(group_bcast)
    kc_deq = k_channel and (KCHAN_DEQUANT_DEFAULT if kchan_dequant is None else bool(kchan_dequant))
    # scales / zeros one tile ahead: per-token groups (one per head, or group fill with per-group loads) and
    # per-channel keys dequantized per tile
    prefetch = bool(PREFETCH_DEFAULT if prefetch is None else prefetch) and use_dot and sub == 1 and hfill == 1 \
        and (kc_deq if k_channel else (k_group_size == D or k_gf)) and (v_group_size == D or v_gf) \
        and (gfill == 1 or gf_bcast) and not rope and not ternary
    if num_stages_default and prefetch and gfill == 1 and 4 in (k_bits, v_bits) and block_n >= 64:
        # 4-bit codes with the prefetched scales at BLOCK_N 64 (no longer the default, see above): two stages (H100,
        # K4V4 per token at 32k: fp16 154 -> 150 us, bf16 with sink + window 269 -> 222 us, the three-stage build
        # spills; NOTES.md v14)
        num_stages = 2
    # the full-precision tiles' token count (sink, window; v24): FP_BLOCK_N_DEFAULT, loaded contiguously. Row fill
    # keeps BLOCK_N there (its score tiles are split by sub-block). V ahead of K (KIVI through the op, kv_mixed) takes
    # them too since v25, its lag tiles at the same size: before, those tiles kept BLOCK_N, and the two tile shapes
    # in one build needed 30 KB of shared memory (7 one-warp programs per SM, not 8) and 440 bytes of stack (offline
    # triton 3.6), 207-211 us against 172-175 with the old tiles everywhere (H100, KIVI at 32k, NOTES.md v25)
    fp_bn = block_n if sub > 1 else (FP_BLOCK_N_DEFAULT if fp_block_n is None else int(fp_block_n))
    if fp_bn not in (16, 32, 64, 128):
        _fail(f"fp_block_n={fp_bn} unsupported (16, 32, 64 or 128)")
    if fp_contig_default:
        fp_contig = FP_CONTIG_DEFAULT and fp_bn <= 16
    # per-row device lengths: a KV head's programs shared out over the rows by their work (_balance_table)
    bal = bool(BALANCE_DEFAULT if balance is None else balance) and dev_lens and slen_b != 0 and B > 1 and not direct
    # skip the accumulators' rescale on tiles where no row's max grew (exact: alpha is 1 there). By default for
    # one-warp builds, where the test over the rows stays inside the warp (H100: -4% for 2-bit codes), and not beside
    # the balanced split, whose build then spills (offline triton 3.6: 64 bytes of stack; NOTES.md v23)
    lazy = bool(LAZY_RESCALE_DEFAULT and num_warps == 1 and not bal if lazy_rescale is None else lazy_rescale)
    # the call's tensors: its inputs, then what each call derives from them (_DecodePlan.derive); every tensor argument
    # below is one of them (Launch maps each to its place in ``sources``)
    plan = _DecodePlan(out_shape=(B, Hq, NQ, D), dtype=q.dtype, hkv=Hkv, rope=rope, rt_dtype=rt_dtype,
                       block_n=block_n, k_bits=k_bits, v_bits=v_bits,
                       parts=None if direct else (B * Hkv, num_splits, r * NQ, D))
    derived = plan.derive(q, storage)
    qc, qb, rw, rt, k_codes, v_codes, out, lse, o_part, l_part = derived
    sources = (q, *storage, *derived)

    # Empty parts get a stand-in pointer (an empty CUDA tensor may have a null pointer); never read.
    def part(t: torch.Tensor, used: bool):
        if used:
            return (t, *t.stride())
        return (qc, 0, 0, 0, 0)

    plan.split = Launch(_decode_split_kernel, grid, (
        qc, *qc.stride(),
        *part(k_sink, has_sink), *part(k_codes, has_mid), *part(k_scale, has_mid), *part(k_zero, has_mid),
        *part(k_window, has_window),
        *part(v_sink, has_sink), *part(v_codes, has_mid), *part(v_scale, has_mid), *part(v_zero, has_mid),
        *part(v_window, has_window and W_v > 0),
        o_part, l_part, out, lse,
        lens, slen_b, slen_p, vlens, svlen_b, svlen_p,
        S, n_quant_arg, n_window_arg, chunk, cap_v, W_v, float(sm_scale) * _LOG2E,
        qb, rw, rt,
    ), dict(
        H_KV=Hkv, GQA=r, NQ=NQ, D=D, K_BITS=k_bits, V_BITS=15 if ternary else v_bits, K_GROUP=k_group_size,
        V_GROUP=v_group_size,
        M_PAD=m_pad, BLOCK_N=block_n,
        HAS_SINK=has_sink, HAS_MID=has_mid, HAS_WINDOW=has_window,
        CAUSAL=NQ > 1, USE_DOT=use_dot, DOT_FP32=interp, DTYPE=tl_dtype, MAGIC=magic, MAGIC_VAL=magic_val,
        V_DTYPE=v_dtype, V_MAGIC=v_magic, V_MAGIC_VAL=v_magic_val, DIRECT_OUT=direct,
        FAST_ASM=fast_asm and not interp, SUB=sub, FP_CONTIG=bool(fp_contig), FP_SPLIT=fp_split,
        DEV_LENS=dev_lens, KV_MIXED=kv_mixed, K_CHANNEL=k_channel, GFILL=gfill, K_GF=k_gf,
        V_GF=v_gf, GF_BCAST=gf_bcast,
        KC_DEQ=kc_deq,
        HFILL=hfill, PREFETCH=prefetch, K_FMT=_FMT_CODE[k_format], V_FMT=_FMT_CODE[v_format], K_ROPE=rope,
        ROPE_TAB=rope_tab, LAZY=lazy, BALANCE=bal, n_rows=B, B_P2=_next_pow2(B) if bal else 1, FP_BN=fp_bn,
        WRING=bool(window_ring) and has_window, wk_rows=max(W, 1), wv_rows=max(W_v, 1),
        V_DEN=bool(V_DEN_DEFAULT if v_denormal is None else v_denormal),
        num_warps=num_warps, num_stages=num_stages,
    ), sources, stable=_STORAGE_SOURCES)
    if not direct:
        plan.merge = _merge_launch(Hkv, num_splits, derived, sources, **_merge_balance(
            bal, fp_split=fp_split, lens=lens, slen_b=slen_b, slen_p=slen_p, s_cap=S, q_cap=n_quant_arg,
            w_cap=n_window_arg, n_rows=B, block_n=block_n))
    plan.run(sources)
    if key is not None:
        _DECODE_PLANS.put(key, storage, plan)
    return out, lse


def _gluon_plan(q, storage, gluon, interp, B, Hq, NQ, D, Hkv, r, S, W, W_v, mid_cap, n_quant_arg, n_window_arg,
                dev_lens, kv_mixed, lens, slen_b, slen_p, k_bits, v_bits, k_group_size, v_group_size, k_axis, k_format,
                v_format, rope, sm_scale, num_splits, programs_per_sm, window_ring, gluon_l2=None, balance=None,
                gluon_tma=None):
    """The Gluon kernel's plan (gluon_decode.py: split kernel, then the merge), or None where it does not take the
    layout (``gluon=True`` then fails with the reason) or, by default, where its splits would be too short."""
    k_sink, k_codes, k_scale, k_zero, k_window, v_sink, v_codes, v_scale, v_zero, v_window = storage[:10]
    metas = tuple(t.dtype for t in (k_scale, k_zero, v_scale, v_zero) if t is not None)
    reason = _gl.gluon_unsupported_reason(
        D=D, r=r, NQ=NQ, k_bits=k_bits, v_bits=v_bits, k_group=k_group_size, v_group=v_group_size, k_axis=k_axis,
        k_format=k_format, v_format=v_format, dtype=q.dtype, rope=rope, meta_dtypes=metas,
        kv_mixed=kv_mixed or W != W_v)
    if reason is None and interp:
        reason = "Gluon kernels run on CUDA only (not under the Triton interpreter)"
    if reason is None and mid_cap == 0:
        reason = "no packed tokens"
    if gluon not in (None, True, False, "rows", "tokens"):
        _fail(f"gluon={gluon!r}: None, True, False, 'rows' or 'tokens'")
    if gluon_l2 is not None and (not isinstance(gluon_l2, int) or isinstance(gluon_l2, bool) or gluon_l2 < 0):
        _fail(f"gluon_l2={gluon_l2!r}: None or a number of tiles >= 0 (0: no L2 prefetch)")
    if gluon_tma is not None and (not isinstance(gluon_tma, int) or isinstance(gluon_tma, bool) or not
                                  0 <= gluon_tma <= _gl.TMA_MAX_STAGES):
        _fail(f"gluon_tma={gluon_tma!r}: None or a number of ring stages from 0 (no ring) to {_gl.TMA_MAX_STAGES}")
    tokens_on_m = gluon == "tokens" or (gluon in (None, True) and GLUON_TOKENS_DEFAULT and r * NQ <= _gl.TOKM_MAX_ROWS)
    if reason is None and tokens_on_m and r * NQ > _gl.TOKM_MAX_ROWS:
        reason = f"gluon='tokens' takes at most {_gl.TOKM_MAX_ROWS} query heads per KV head"
    if reason is None:
        reason = _gl.storage_unsupported_reason(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                                (k_sink, v_sink, k_window, v_window))
    if reason is not None:
        if gluon:
            _fail(f"gluon={gluon!r}: {reason}")
        return None
    bn = _gl.BLOCK_N
    has_fp = S > 0 or W > 0  # the last split of each (batch, KV head) is its full-precision program
    maxnreg, pps, l2pf = _gl.occupancy(r=r * NQ, bits=k_bits, has_fp=has_fp, tokens_on_m=tokens_on_m,
                                       v_bits=v_bits)
    if programs_per_sm is None:
        programs_per_sm = pps
    if gluon_l2 is not None:
        l2pf = int(gluon_l2)
    tma = 0
    if gluon_tma or (gluon_tma is None and GLUON_TMA_DEFAULT):
        why = (_gl.tma_unsupported_reason(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) if tokens_on_m else
               "the TMA ring is written for the tokens-on-M form (at most 8 query rows per KV head)")
        fit = _gl.tma_stages(k_bits, programs_per_sm, v_bits)
        tma = gluon_tma or min(_gl.TMA_DEFAULT_STAGES, fit)
        if why is None and fit < tma:
            why = (f"{tma} ring stages of {_gl.tma_stage_bytes(k_bits, v_bits)} bytes do not fit {programs_per_sm} "
                   "programs per SM in shared memory")
        if why is not None:
            if gluon_tma:
                _fail(f"gluon_tma={gluon_tma}: {why}")
            tma = 0
    # the merge as a programmatic dependent launch (with the ring, which has already required sm_90)
    pdl = bool(GLUON_PDL_DEFAULT and tma and _gdc_wait is not None)
    if num_splits is None:
        num_splits = choose_num_splits(batch=B, kv_heads=Hkv, seq_len=mid_cap, block_n=bn, num_sms=_num_sms(q.device),
                                       programs_per_sm=programs_per_sm)
    mid = max(1, min(num_splits - (1 if has_fp and num_splits > 1 else 0), _cdiv(mid_cap, bn)))
    chunk = _cdiv(_cdiv(mid_cap, mid), bn) * bn
    if not dev_lens:
        mid = _cdiv(mid_cap, chunk)
    num_splits = mid + (1 if has_fp else 0)
    if gluon is None and chunk < (GLUON_TOKENS_MIN_TILES if tokens_on_m else GLUON_MIN_TILES) * bn:
        return None
    # per-row device lengths: each KV head's packed-middle programs shared out over the rows by their work, as the
    # Triton kernel's balanced split (the same partition, _balance_table; the merge finds a row's programs with it)
    bal = bool(BALANCE_DEFAULT if balance is None else balance) and dev_lens and slen_b != 0 and B > 1 and mid > 1
    plan = _DecodePlan(out_shape=(B, Hq, NQ, D), dtype=q.dtype, hkv=Hkv, rope=False, rt_dtype=None, block_n=bn,
                       k_bits=k_bits, v_bits=v_bits, parts=(B * Hkv, num_splits, r * NQ, D))
    derived = plan.derive(q, storage)
    o_part, l_part = derived[8], derived[9]
    sources = (q, *storage, *derived)
    args, kwargs = _gl.launch_args(
        q=q, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes, v_scale=v_scale, v_zero=v_zero,
        k_sink=k_sink, v_sink=v_sink, k_window=k_window, v_window=v_window, o_part=o_part, l_part=l_part,
        lens=lens if dev_lens else q, slen_b=slen_b, slen_p=slen_p, n_tok=n_quant_arg, cap=mid_cap, chunk=chunk,
        n_sink=S, n_window=n_window_arg, qk_scale=float(sm_scale) * _LOG2E, H_KV=Hkv, R=r, num_splits=num_splits,
        bits=k_bits, dev_lens=dev_lens, window_ring=window_ring, tokens_on_m=tokens_on_m, maxnreg=maxnreg,
        l2_prefetch=l2pf, balance=bal, tma_stages=tma, pdl=pdl, v_bits=v_bits)
    plan.split = Launch(_gl._gluon_split_kernel, (num_splits, B * Hkv), args, kwargs, sources,
                        stable=_STORAGE_SOURCES)
    plan.merge = _merge_launch(Hkv, num_splits, derived, sources, pdl=pdl, **_merge_balance(
        bal, fp_split=has_fp, lens=lens, slen_b=slen_b, slen_p=slen_p, s_cap=S, q_cap=mid_cap, w_cap=n_window_arg,
        n_rows=B, block_n=bn))
    return plan


def _merge_balance(bal, *, fp_split, lens, slen_b, slen_p, s_cap, q_cap, w_cap, n_rows, block_n) -> dict:
    """The merge kernel's arguments for a balanced split (``_balance_table`` over the rows' lengths, clamped to the
    split's capacities, in tiles of ``block_n``; with ``fp_split`` each row's full-precision program after its middle
    ones), or {} where the split is not balanced."""
    if not bal:
        return {}
    return dict(BALANCE=True, FP_SPLIT=fp_split, lens_ptr=lens, slen_b=slen_b, slen_p=slen_p, s_cap=s_cap, q_cap=q_cap,
                w_cap=w_cap, n_rows=n_rows, B_P2=_next_pow2(n_rows), BLOCK_N=block_n)


def _merge_launch(Hkv, num_splits, derived, sources, pdl=False, **balance) -> Launch:
    """The merge kernel's launch over the splits' partials (``derived``'s out, lse, o_part, l_part; the shape, dtype and
    device come from out [B, Hq, NQ, D]): one program per query row, and per 64 channels where the rows alone would not
    fill the GPU. ``balance``: the balanced split's arguments (:func:`_merge_balance`), if any."""
    out, lse, o_part, l_part = derived[6:10]
    B, Hq, NQ, D = out.shape
    r = Hq // Hkv
    tl_dtype = tl.bfloat16 if out.dtype == torch.bfloat16 else tl.float16
    block_d = 64 if B * Hkv * r * NQ < 4 * _num_sms(out.device) else D
    return Launch(_merge_kernel, (B * Hkv * r * NQ, D // block_d), (o_part, l_part, out, lse, num_splits), dict(
        H_KV=Hkv, GQA=r, NQ=NQ, D=D, SPLITS_P2=_next_pow2(num_splits), BLOCK_D=block_d, DTYPE=tl_dtype, **balance,
        num_warps=4 if block_d * num_splits >= 4096 else 2, **({"PDL": True, "launch_pdl": True} if pdl else {})),
        sources, stable=_STORAGE_SOURCES)


class _DecodePlan:
    """A ``decode_attention`` layout's launches (``split``, ``merge`` or None; kvcompile/kernels/launch.py) and what
    each call derives from its tensors (``derive``)."""

    __slots__ = ("out_shape", "dtype", "hkv", "rope", "rt_dtype", "block_n", "k_bits", "v_bits", "parts", "split",
                 "merge")

    def __init__(self, *, out_shape, dtype, hkv, rope, rt_dtype, block_n, k_bits, v_bits, parts):
        self.out_shape, self.dtype, self.hkv, self.rope, self.rt_dtype = out_shape, dtype, hkv, rope, rt_dtype
        self.block_n, self.k_bits, self.v_bits, self.parts = block_n, k_bits, v_bits, parts
        self.split = self.merge = None

    def derive(self, q: torch.Tensor, storage: tuple) -> tuple:
        """(q contiguous where keys are before RoPE, q's rotate-half partners, the stored columns' frequencies, the
        angle table, the key / value codes as the kernel reads them, out, lse, the splits' partial outputs and
        log-sum-exps): stand-ins (q, the codes, out / lse) where the layout has no use for one."""
        k_codes, v_codes, k_rope, k_perm = storage[1], storage[6], storage[12], storage[13]
        qc = qb = rw = rt = q
        if self.rope:
            qc = q.contiguous()
            qb, rw = _rope_operands(qc, k_rope, k_perm, self.hkv)
            rt = qc if self.rt_dtype is None else _rope_table(rw, self.block_n, 8 // self.k_bits, self.rt_dtype)
        if self.k_bits == 8:
            k_codes = _int16_words("k_codes", k_codes)
        if self.v_bits == 8:
            v_codes = _int16_words("v_codes", v_codes)
        dev = q.device
        out = torch.empty(self.out_shape, device=dev, dtype=self.dtype)
        lse = torch.empty(self.out_shape[:3], device=dev, dtype=torch.float32)
        if self.parts is None:
            o_part, l_part = out, lse  # unused
        else:
            o_part = torch.empty(self.parts, device=dev, dtype=torch.float32)
            l_part = torch.empty(self.parts[:3], device=dev, dtype=torch.float32)
        return qc, qb, rw, rt, k_codes, v_codes, out, lse, o_part, l_part

    def run(self, sources: tuple) -> None:
        self.split(sources)
        if self.merge is not None:
            self.merge(sources)

    def __call__(self, q: torch.Tensor, storage: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        derived = self.derive(q, storage)
        self.run((q, *storage, *derived))
        return derived[6], derived[7]


_DECODE_PLANS = PlanCache()
# sources = (q, *storage, *derived): the storage's 14 entries are the plan's own tensors (its key)
_STORAGE_SOURCES = range(1, 15)
