"""Fused chunked-prefill attention over packed low-bit KV (docs/format.md).

A chunk of ``Nq`` new query tokens attends to the packed history ``sink ++ middle ++ window`` and causally
to itself: the chunk's own K/V are the LAST ``Nq`` logical tokens (they were written to the cache before
attention, so they sit in the window and / or the quantized middle), and new token ``i`` sees logical
positions ``<= L - Nq + i``. Same storage, same math, same reference as the decode kernel
(:func:`kvcompile.kernels.reference.decode_attention_reference`, which already covers ``Nq > 1``).

Flash-attention layout: ``_prefill_kernel`` runs a program per (block of ``BLOCK_M`` query rows, batch x KV
head, split). The query rows of one KV head are the ``r = Hq // Hkv`` query heads of its GQA group times
the ``Nq`` new tokens, folded into M **token-major** (row ``m = i * r + head_in_group``), so a block holds
whole consecutive tokens and its causal limit is tight: the program walks the logical tokens
``[0, L - Nq + last_token_of_block]`` only. Each K/V tile is loaded and unpacked once per program and
shared by all ``BLOCK_M`` rows through ``tl.dot``; the online softmax runs per row.

The tile math is the decode kernel's (``_packed_tile`` / ``_fp_tile`` from decode_attention.py, imported,
not copied): codes stay in their packed "planes" (plane ``j`` = channels ``j, j + PER, ...``, q loaded in
the same planes with strided pointers), magic-number code -> fp16/bf16 conversion, scales and zeros kept
out of the inner products when one group spans the head (``G == D``), in-register dequantization for
``G`` in {16, 32, 64}. Keys quantized before RoPE (``K_ROPE``) are rotated per element by their positions (the
decode kernel's ``_rope_plane``) and ternary values (``v_bits=1.5``) are decoded per element into one natural-order
output plane, as in the decode kernel's v20 / v21 (skvq's layout: 40-41 TFLOP/s on the H100, 2.4-5.3x faster than
dequantize + SDPA, benchmarks/results/bench_prefill_skvq.md). With few query blocks (small chunks, small batch)
the KV range of each block is cut into ``num_splits`` parts whose partial results are merged by
``_prefill_merge_kernel`` (log-sum-exp, flash-decoding), so the grid still fills the GPU. The chunk length ``Nq``
and the number of splits are runtime arguments of both kernels: a new chunk length does not recompile.

Every scheme's default layout runs here (``kvmix`` aside; 2026-11-26, session 8): 8-bit codes (``int8``, ``fp8`` e4m3,
affine 8-bit; one scale per token, int16 words of two codes as in the decode kernel's v15), NF4 codebook codes
(``nqkv``; blocks of the head size keep the planes, smaller blocks are dequantized in registers, their scales loaded
once per block and broadcast), per-channel keys
(``kivi``; ``K_CHANNEL``: each key element dequantized in registers with its token group's channel scale / zero) with
V's packed middle running up to a token group ahead of K's (``KV_MIXED``: K's window tiles below the lag read V
packed, through the decode kernel's ``_load_v_mixed``). Windows stored as rings (``window_ring``, PackedKV's layout:
window token j at row ``(n_quant + j) % W``) load each token from its ring row, K's and V's each with their own
``n_quant`` and row count; scores, masks and positions keep the logical index.
H100 (benchmarks/results/bench_prefill_schemes.md, Hq=32 Hkv=8 D=128, 64- and 512-token chunks over 4k / 32k; nqkv
from bench_prefill_nqkv.md): against dequantize + SDPA
4.6-6.5x (kivi), 7.2-10x (nqkv), 4.4-6.9x (int8 / fp8) for 64-token chunks, 1.2-2.1x for 512-token chunks over 4k;
against masked fp16 SDPA 1.9-3.4x for B=1 64-token chunks over 32k, 0.24-1.0x otherwise. 88-93 TFLOP/s for kivi's
per-channel keys (scales and zeros gathered per element), 128-140 for NF4, 148-184 for 8-bit codes.

Loading the scales of groups below the head once per group and broadcasting them (decode_attention._group_meta)
doubled NF4's speed (505-560 -> 245-271 us on the three nqkv rows), but the same change for affine groups gave wrong
outputs (kivi's values: 0.74 relative error) and illegal addresses on the H100 that the CPU interpreter does not show
(Triton 3.6; not diagnosed): affine groups keep the per-element gathered loads.

Triton 3.6 miscompiles one tile set on the H100: at D = 64, keys dequantized in registers as two 32-column planes
(4-bit per-channel keys, 4-bit groups below the head, NF4 blocks of 32 / 16) beside values in whole-head planes,
with 64+ rows x 64+ tokens per program: wrong outputs, and with 128-token tiles an out-of-bounds
shared-memory read (compute-sanitizer: 1024-byte ``__shared__`` reads past the allocation). 64 x 32 tiles, 32-row
blocks and 8 warps measured correct; the launcher caps that set at 64 x 32 (GPU test
``test_gpu_head_dim_64_two_plane_keys``).

Measured (H100, triton 3.6, benchmarks/results/bench_prefill.md; Hq=32 Hkv=8 D=128, eager, 128-row blocks):
1.2-8.2x faster than dequantize + SDPA on all 16 cases. Against fp16 SDPA on full-precision K/V: faster only
for B=1 with 64-token chunks over 32k tokens (2.35-2.65x masked SDPA, 1.4-1.6x flash without a mask; the KV
splits fill the GPU there); B=8 64-token chunks 0.86-0.96x masked / 0.51-0.63x flash; 512-token chunks
(compute bound) 0.45-0.57x masked / 0.23-0.33x flash: 120-185 TFLOP/s against flash SDPA's ~650. Estimated
from the offline SASS count (~850-920 instructions per warp per tile) the issue slots are mostly idle: latency
bound (only 8 warps fit an SM at ~255 registers, and Triton does not software-pipeline the packed loads).
64-row blocks (the default) measured 11-17% faster than 128-row blocks on the two cases timed both ways.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import decode_attention as _da
from .decode_attention import (_acc_init, _group_meta, _load_q_plane, _load_v_mixed, _mm, _nf4_plane, _plane_f32,
                               _plane_magic, _rope_plane, _rope_q_operands, _softmax_step, _store_planes,
                               _ternary_digit, _v_plane_exact)
from .reference import decode_attention_reference

__all__ = [
    "prefill_attention",
    "prefill_attention_reference",
    "choose_prefill_config",
    "prefill_is_profitable",
    "SUPPORTED_BITS",
    "SUPPORTED_FORMATS",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_GROUP_SIZES",
    "SUPPORTED_DTYPES",
]

SUPPORTED_BITS = (2, 4, 8)  # 8: one group (scale) per token only
SUPPORTED_V_BITS = SUPPORTED_BITS + (1.5,)  # 1.5: ternary values (5 base-3 digits per byte), dequantized per element
SUPPORTED_FORMATS = _da.SUPPORTED_FORMATS  # affine, int8, fp8 (8-bit, one absmax scale per token), nf (NF4)
SUPPORTED_HEAD_DIMS = _da.SUPPORTED_HEAD_DIMS  # (64, 128)
SUPPORTED_GROUP_SIZES = (16, 32, 64)  # and G == D
SUPPORTED_DTYPES = _da.SUPPORTED_DTYPES
_LOG2E = 1.4426950408889634



def prefill_attention_reference(*, causal: bool = True, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-PyTorch float32 spec of :func:`prefill_attention` (same keywords; returns float32 out, lse).

    Causal: the decode reference already computes Nq new tokens that are the last Nq logical tokens, causal
    among themselves. Without ``causal`` every new token sees all L tokens: the Nq tokens are folded into the
    batch as single-token queries (which the reference does not mask). ``v_n_quant`` (V's middle ahead of K's)
    becomes the reference's ``lengths`` / ``v_lengths``."""
    v_n_quant = kw.pop("v_n_quant", None)
    if v_n_quant is not None:
        S, nq, nw = kw["k_sink"].shape[2], int(kw.pop("n_quant")), int(kw.pop("n_window"))
        lag = int(v_n_quant) - nq
        kw["lengths"] = torch.tensor([S, nq, nw])
        kw["v_lengths"] = torch.tensor([S, nq + lag, nw - lag])
    if causal or kw["q"].shape[2] == 1:
        return decode_attention_reference(**kw)
    q = kw["q"]
    B, Hq, NQ, D = q.shape
    # not per sequence: the rotary frequencies, the per-head channel order and the lengths' [3] form (all rows)
    per_batch = ("q", "k_rope", "k_perm", "lengths", "v_lengths")
    kw = {k: (v.repeat_interleave(NQ, dim=0) if torch.is_tensor(v) and k not in per_batch else v)
          for k, v in kw.items()}
    kw["q"] = q.permute(0, 2, 1, 3).reshape(B * NQ, Hq, 1, D)
    out, lse = decode_attention_reference(**kw)
    return (out.reshape(B, NQ, Hq, D).permute(0, 2, 1, 3), lse.reshape(B, NQ, Hq).permute(0, 2, 1))


# --------------------------------------------------------------------------------------------------
# Tiles. The decode kernel's tile math (decode_attention._packed_tile / _fp_tile, SUB = 1, USE_DOT) with one
# change for prefill: MASKED is a constexpr. Most tiles of a query block lie entirely inside the valid range
# and below the block's first causal limit; those run without any load mask or score mask (the masked
# version only runs on the last tile of a part and on the causal band of the chunk's own tokens).
# --------------------------------------------------------------------------------------------------


@triton.jit
def _ld_rows(base, offs_t, tmask, st, offs_c, sc, MASKED: tl.constexpr):
    """A [tokens, channels] tile (rows offs_t, columns offs_c), masked by token only when MASKED."""
    ptrs = base + offs_t.to(tl.int64)[:, None] * st + offs_c.to(tl.int64)[None, :] * sc
    if MASKED:
        x = tl.load(ptrs, mask=tmask[:, None], other=0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _ld_vec(base, offs_t, tmask, st, MASKED: tl.constexpr):
    ptrs = base + offs_t.to(tl.int64) * st
    if MASKED:
        x = tl.load(ptrs, mask=tmask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def _mask(s, tmask, pos, row_lim, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        s = tl.where(tmask[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(pos[None, :] <= row_lim[:, None], s, float("-inf"))
    return s


@triton.jit
def _fp_planes(base, offs_t, tmask, st, sc, PER: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """The PER channel planes (plane j = channels j, j + PER, ...) of a full-precision [tokens, D] tile."""
    DP: tl.constexpr = D // PER
    x0 = _ld_rows(base, offs_t, tmask, st, tl.arange(0, DP) * PER, sc, MASKED)
    if PER >= 2:
        x1 = _ld_rows(base, offs_t, tmask, st, tl.arange(0, DP) * PER + 1, sc, MASKED)
    else:  # one natural-order plane (ternary values' accumulator)
        x1 = x0
    if PER == 4:
        x2 = _ld_rows(base, offs_t, tmask, st, tl.arange(0, DP) * PER + 2, sc, MASKED)
        x3 = _ld_rows(base, offs_t, tmask, st, tl.arange(0, DP) * PER + 3, sc, MASKED)
    else:
        x2 = x0
        x3 = x1
    return x0, x1, x2, x3


@triton.jit
def _ring_rows(r0, offs_t, cap):
    """Rows ``r0 + t`` of a ring window of ``cap`` rows, wrapped once (WRING; the kernel's window section sets r0 so
    that every token to load lies in [0, 2 cap); masked tokens' rows may not, and are never loaded)."""
    rows = r0 + offs_t
    return tl.where(rows >= cap, rows - cap, rows)


@triton.jit
def _fp_tile(q0, q1, q2, q3, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
             k_base, skt, skc, v_base, svt, svc, offs_t, end, pos, row_lim, qk_scale,
             PER_K: tl.constexpr, PER_V: tl.constexpr, D: tl.constexpr, K_SHIFTED: tl.constexpr,
             V_SHIFTED: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
             DTYPE: tl.constexpr, V_MIXED: tl.constexpr = False, pvm=None, V_GROUP: tl.constexpr = 0,
             WRING: tl.constexpr = False, pring=None):
    """One tile of full-precision tokens (sink or window); see decode_attention._fp_tile for the shifted planes.
    V_MIXED (KIVI: V's packed middle runs ``v_lag`` tokens into K's window): the V planes come from
    decode_attention._load_v_mixed (tokens below the lag dequantized from V's middle, the rest from V's window);
    ``v_base`` is then V's window itself and ``pvm`` the packed side's pointers. WRING (ring windows): ``offs_t``
    stays the logical token (masks, positions, the lag); K and V load from their own ring rows (``_ring_rows`` with
    ``pring`` = K's start, K's capacity, V's start, V's capacity, see the kernel's window section)."""
    KB: tl.constexpr = 8 // PER_K
    VB: tl.constexpr = 8 // PER_V  # (PER_V 1, ternary values: never shifted)
    KF1: tl.constexpr = (1 << KB) if K_SHIFTED else 1
    KF2: tl.constexpr = (1 << (2 * KB)) if K_SHIFTED else 1
    KF3: tl.constexpr = (1 << (3 * KB)) if K_SHIFTED else 1
    tmask = offs_t < end
    if WRING:
        k_r0, k_cap, v_r0, v_cap = pring
        k_rows = _ring_rows(k_r0, offs_t, k_cap)
        v_rows = _ring_rows(v_r0, offs_t, v_cap)
    else:
        k_rows = offs_t
        v_rows = offs_t
    k0, k1, k2, k3 = _fp_planes(k_base, k_rows, tmask, skt, skc, PER_K, D, MASKED)
    raw = _mm(q0, tl.trans(k0), True, DOT_FP32)
    raw += KF1 * _mm(q1, tl.trans(k1), True, DOT_FP32)
    if PER_K == 4:
        raw += KF2 * _mm(q2, tl.trans(k2), True, DOT_FP32)
        raw += KF3 * _mm(q3, tl.trans(k3), True, DOT_FP32)
    s = _mask(raw * qk_scale, tmask, pos, row_lim, CAUSAL, MASKED)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
    VF1: tl.constexpr = (1 << VB) if V_SHIFTED else 1
    VF2: tl.constexpr = (1 << (2 * VB)) if V_SHIFTED else 1
    VF3: tl.constexpr = (1 << (3 * VB)) if V_SHIFTED else 1
    if V_MIXED:
        v_lag, v_wcap, vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, v_mid0 = pvm
        v0, v1, v2, v3 = _load_v_mixed(v_base, svt, svc, offs_t, tmask, v_lag, v_wcap, vc_base, svc_t, svc_c,
                                       vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, v_mid0, PER_V, D, V_GROUP, DTYPE,
                                       WRING, v_rows)
    else:
        v0, v1, v2, v3 = _fp_planes(v_base, v_rows, tmask, svt, svc, PER_V, D, MASKED)
    acc0 = acc0 * alpha[:, None] + _mm(p.to(DTYPE), v0, True, DOT_FP32)
    if PER_V >= 2:
        acc1 = acc1 * alpha[:, None] + _mm((p * VF1).to(DTYPE), v1, True, DOT_FP32)
    if PER_V == 4:
        acc2 = acc2 * alpha[:, None] + _mm((p * VF2).to(DTYPE), v2, True, DOT_FP32)
        acc3 = acc3 * alpha[:, None] + _mm((p * VF3).to(DTYPE), v3, True, DOT_FP32)
    return m_i, l_i, zacc * alpha, acc0, acc1, acc2, acc3


@triton.jit
def _packed_load(kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                 vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_t, tmask,
                 K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
                 D: tl.constexpr, MASKED: tl.constexpr, K_CHANNEL: tl.constexpr = False, K_FMT: tl.constexpr = 0,
                 V_FMT: tl.constexpr = 0):
    """The packed bytes, scales and zeros of one tile of middle tokens (as stored: uint8, or int16 words of two
    8-bit codes; meta dtype). Formats without a zero point get the scales again (never used)."""
    PER_K: tl.constexpr = 2 if K_BITS == 8 else 8 // K_BITS
    PER_V: tl.constexpr = 1 if V_BITS == 15 else (2 if V_BITS == 8 else 8 // V_BITS)
    DPK: tl.constexpr = D // PER_K
    DPV: tl.constexpr = D // PER_V
    kb = _ld_rows(kc_base, offs_t, tmask, skc_t, tl.arange(0, DPK), skc_c, MASKED)
    if V_BITS == 15:  # ternary: each channel's byte (channel // 5), natural channel order
        vb = _ld_rows(vc_base, offs_t, tmask, svc_t, tl.arange(0, D) // 5, svc_c, MASKED)
    else:
        vb = _ld_rows(vc_base, offs_t, tmask, svc_t, tl.arange(0, DPV), svc_c, MASKED)
    if K_CHANNEL:  # per-channel keys: each plane's scales / zeros load in _packed_tile (_kc_plane)
        ks = offs_t.to(tl.float32)
        kz = ks
    elif K_GROUP == D:
        ks = _ld_vec(ks_base, offs_t, tmask, sks_t, MASKED)
        kz = _ld_vec(kz_base, offs_t, tmask, skz_t, MASKED)
    elif K_FMT == 3:  # NF4: the tile's [BLOCK_N, D // G] scales loaded once and broadcast (see the note below)
        ks, kz = _group_meta(ks_base, sks_t, sks_g, kz_base, skz_t, skz_g, offs_t.to(tl.int64), tmask,
                             offs_t.shape[0], D // K_GROUP, K_GROUP // PER_K)
    else:
        # plane element i is in group i // (G // PER). The broadcast form above gave wrong results / illegal
        # addresses on the H100 for affine groups (kivi's values, test_matches_reference; Triton 3.6, session 8) and is
        # kept for NF4 only, where the GPU tests passed and it doubled the speed
        offs_g = tl.arange(0, DPK) // (K_GROUP // PER_K)
        ks = _ld_rows(ks_base, offs_t, tmask, sks_t, offs_g, sks_g, MASKED).to(tl.float32)
        kz = _ld_rows(kz_base, offs_t, tmask, skz_t, offs_g, skz_g, MASKED).to(tl.float32)
    if V_GROUP == D:
        vs = _ld_vec(vs_base, offs_t, tmask, svs_t, MASKED)
        vz = _ld_vec(vz_base, offs_t, tmask, svz_t, MASKED)
    elif V_FMT == 3:
        vs, vz = _group_meta(vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_t.to(tl.int64), tmask,
                             offs_t.shape[0], D // V_GROUP, V_GROUP // PER_V)
    else:
        offs_g = tl.arange(0, DPV) // (V_GROUP // PER_V)  # (ternary: PER_V 1, natural order)
        vs = _ld_rows(vs_base, offs_t, tmask, svs_t, offs_g, svs_g, MASKED).to(tl.float32)
        vz = _ld_rows(vz_base, offs_t, tmask, svz_t, offs_g, svz_g, MASKED).to(tl.float32)
    return kb, ks, kz, vb, vs, vz


@triton.jit
def _kc_plane(kb, J: tl.constexpr, pkc, grp, tmask, BITS: tl.constexpr, PER: tl.constexpr, DP: tl.constexpr,
              DTYPE: tl.constexpr):
    """Plane J of a key tile quantized per channel (KIVI: scale / zero [groups of K_GROUP tokens, D]) dequantized in
    registers: each element's scale and zero gathered by its token's group ``grp`` and its channel PER * i + J."""
    ks_base, sks_t, sks_c, kz_base, skz_t, skz_c = pkc
    ch = (tl.arange(0, DP) * PER + J).to(tl.int64)
    m = tmask[:, None]
    sc = tl.load(ks_base + grp[:, None] * sks_t + ch[None, :] * sks_c, mask=m, other=0.0).to(tl.float32)
    zr = tl.load(kz_base + grp[:, None] * skz_t + ch[None, :] * skz_c, mask=m, other=0.0).to(tl.float32)
    return (_plane_f32(kb, J, BITS) * sc + zr).to(DTYPE)


@triton.jit
def _nf_deq(kb, J: tl.constexpr, s, DTYPE: tl.constexpr, FAST_ASM: tl.constexpr):
    """Plane J of an NF4 code tile dequantized in registers: codebook value times its group's scale, in DTYPE."""
    return (_nf4_plane(kb, J, FAST_ASM).to(tl.float32) * s).to(DTYPE)


@triton.jit
def _packed_tile(q0, q1, q2, q3, qsum, qsum_mag, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                 kb, ks, kz, vb, vs, vz, offs_t, end, pos, row_lim, qk_scale,
                 K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
                 D: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VAL: tl.constexpr,
                 V_MAGIC: tl.constexpr, V_MAGIC_VAL: tl.constexpr, V_DTYPE: tl.constexpr,
                 K_SHIFTED: tl.constexpr, V_SHIFTED: tl.constexpr, FAST_ASM: tl.constexpr, CAUSAL: tl.constexpr,
                 MASKED: tl.constexpr, DOT_FP32: tl.constexpr, DTYPE: tl.constexpr, prope=None,
                 K_ROPE: tl.constexpr = False, K_FMT: tl.constexpr = 0, V_FMT: tl.constexpr = 0,
                 K_CHANNEL: tl.constexpr = False, pkc=None):
    """One tile of packed middle tokens, from its loaded bytes / scales / zeros (_packed_load), with
    decode_attention._packed_tile's math: magic-number planes, scale and zero outside the products when
    G == D, in-register dequantization for smaller groups. K_ROPE (keys quantized before RoPE): each key element
    rotated by its position (decode_attention._rope_plane, the v20 form); ternary values (V_BITS 15): each element's
    base-3 digit, dequantized in natural channel order (one output plane, acc0). K_FMT / V_FMT (decode_attention's
    _FMT_CODE): 1 int8, 2 fp8 (8-bit codes as int16 words, one absmax scale per token, no zero), 3 NF4 (codebook
    values times the group's absmax scale, no zero; groups below D dequantized in registers). K_CHANNEL (KIVI keys,
    scales and zeros per channel over K_GROUP tokens): each key element dequantized in registers (_kc_plane)."""
    PER_K: tl.constexpr = 2 if K_BITS == 8 else 8 // K_BITS
    PER_V: tl.constexpr = 1 if V_BITS == 15 else (2 if V_BITS == 8 else 8 // V_BITS)
    DPK: tl.constexpr = D // PER_K
    tmask = offs_t < end

    # ---- K: scores --------------------------------------------------------------------------------
    if not (FAST_ASM and (K_SHIFTED or K_FMT == 3)):
        kb = kb.to(tl.int16)
    if K_ROPE:
        qb0, qb1, qb2, qb3, w0, w1, w2, w3 = prope
        if K_GROUP == D:
            ks = ks[:, None]
            kz = kz[:, None]
        posf = pos.to(tl.float32)
        raw = _rope_plane(kb, 0, ks, kz, posf, w0, q0, qb0, K_BITS, DTYPE, True, DOT_FP32, FAST_ASM)
        raw += _rope_plane(kb, 1, ks, kz, posf, w1, q1, qb1, K_BITS, DTYPE, True, DOT_FP32, FAST_ASM)
        if PER_K == 4:
            raw += _rope_plane(kb, 2, ks, kz, posf, w2, q2, qb2, K_BITS, DTYPE, True, DOT_FP32, FAST_ASM)
            raw += _rope_plane(kb, 3, ks, kz, posf, w3, q3, qb3, K_BITS, DTYPE, True, DOT_FP32, FAST_ASM)
        s = raw * qk_scale
    elif K_CHANNEL:
        grp = (offs_t // K_GROUP).to(tl.int64)
        raw = _mm(q0, tl.trans(_kc_plane(kb, 0, pkc, grp, tmask, K_BITS, PER_K, DPK, DTYPE)), True, DOT_FP32)
        raw += _mm(q1, tl.trans(_kc_plane(kb, 1, pkc, grp, tmask, K_BITS, PER_K, DPK, DTYPE)), True, DOT_FP32)
        if PER_K == 4:
            raw += _mm(q2, tl.trans(_kc_plane(kb, 2, pkc, grp, tmask, K_BITS, PER_K, DPK, DTYPE)), True, DOT_FP32)
            raw += _mm(q3, tl.trans(_kc_plane(kb, 3, pkc, grp, tmask, K_BITS, PER_K, DPK, DTYPE)), True, DOT_FP32)
        s = raw * qk_scale
    elif K_GROUP == D:
        if K_BITS == 8 or K_FMT == 3:
            # 1024 + code is exact in fp16 only, and the NF4 planes are fp16 values (bf16 models: q converted, exact
            # in fp16's normal range); MAGIC / MAGIC_VAL are the launcher's fp16 ones (int8: 1152, fp8 / NF4: 0)
            raw = _mm(q0.to(tl.float16), tl.trans(_plane_magic(kb, 0, K_BITS, MAGIC, tl.float16, False, FAST_ASM, K_FMT)),
                      True, DOT_FP32)
            raw += _mm(q1.to(tl.float16), tl.trans(_plane_magic(kb, 1, K_BITS, MAGIC, tl.float16, False, FAST_ASM, K_FMT)),
                       True, DOT_FP32)
        else:
            raw = _mm(q0, tl.trans(_plane_magic(kb, 0, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), True, DOT_FP32)
            raw += _mm(q1, tl.trans(_plane_magic(kb, 1, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), True, DOT_FP32)
        if PER_K == 4:
            raw += _mm(q2, tl.trans(_plane_magic(kb, 2, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), True, DOT_FP32)
            raw += _mm(q3, tl.trans(_plane_magic(kb, 3, K_BITS, MAGIC, DTYPE, K_SHIFTED, FAST_ASM)), True, DOT_FP32)
        # raw = q . c + MAGIC_VAL * qsum_mag, so s * (raw - MAGIC_VAL * qsum_mag) + z * sum(q) == q . (c s + z)
        if K_FMT == 0:
            s = (raw - MAGIC_VAL * qsum_mag[:, None]) * (ks * qk_scale)[None, :] + qsum[:, None] * (kz * qk_scale)[None, :]
        else:  # int8 (MAGIC_VAL holds the sign offset), fp8 (plain-Triton planes hold the value times 2**-8), NF4
            a = ks * (qk_scale * (256.0 if (K_FMT == 2 and not FAST_ASM) else 1.0))
            s = (raw - MAGIC_VAL * qsum_mag[:, None]) * a[None, :]
    elif K_FMT == 3:
        raw = _mm(q0, tl.trans(_nf_deq(kb, 0, ks, DTYPE, FAST_ASM)), True, DOT_FP32)
        raw += _mm(q1, tl.trans(_nf_deq(kb, 1, ks, DTYPE, FAST_ASM)), True, DOT_FP32)
        s = raw * qk_scale
    else:
        raw = _mm(q0, tl.trans((_plane_f32(kb, 0, K_BITS) * ks + kz).to(DTYPE)), True, DOT_FP32)
        raw += _mm(q1, tl.trans((_plane_f32(kb, 1, K_BITS) * ks + kz).to(DTYPE)), True, DOT_FP32)
        if PER_K == 4:
            raw += _mm(q2, tl.trans((_plane_f32(kb, 2, K_BITS) * ks + kz).to(DTYPE)), True, DOT_FP32)
            raw += _mm(q3, tl.trans((_plane_f32(kb, 3, K_BITS) * ks + kz).to(DTYPE)), True, DOT_FP32)
        s = raw * qk_scale
    s = _mask(s, tmask, pos, row_lim, CAUSAL, MASKED)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)

    # ---- V: output ----------------------------------------------------------------------------------
    if not (FAST_ASM and (V_SHIFTED or V_FMT == 3)):
        vb = vb.to(tl.int16)
    if V_BITS == 15:
        cc = tl.arange(0, D)
        d3 = _ternary_digit(vb.to(tl.float32), (cc % 5)[None, :])
        if V_GROUP == D:
            vs = vs[:, None]
            vz = vz[:, None]
        zacc = zacc * alpha
        acc0 = acc0 * alpha[:, None] + _mm(p.to(DTYPE), (d3 * vs + vz).to(DTYPE), True, DOT_FP32)
    elif V_GROUP == D:
        if V_FMT == 0:
            zacc = zacc * alpha + tl.sum(p * vz[None, :], 1)
            pv = (p * vs[None, :]).to(V_DTYPE)
        else:  # int8 / fp8 / NF4: no zero point; fp8's plain-Triton planes hold the value times 2**-8
            zacc = zacc * alpha
            pv = (p * (vs * (256.0 if (V_FMT == 2 and not FAST_ASM) else 1.0))[None, :]).to(V_DTYPE)
        # (MAGIC_VAL + c) - MAGIC_VAL is exact in DTYPE; leaving the offset in accumulates error.
        acc0 = acc0 * alpha[:, None] + _mm(pv, _v_plane_exact(vb, 0, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM, V_FMT), True, DOT_FP32)
        acc1 = acc1 * alpha[:, None] + _mm(pv, _v_plane_exact(vb, 1, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM, V_FMT), True, DOT_FP32)
        if PER_V == 4:
            acc2 = acc2 * alpha[:, None] + _mm(pv, _v_plane_exact(vb, 2, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM), True, DOT_FP32)
            acc3 = acc3 * alpha[:, None] + _mm(pv, _v_plane_exact(vb, 3, V_BITS, V_MAGIC, V_MAGIC_VAL, V_DTYPE, DOT_FP32, V_SHIFTED, FAST_ASM), True, DOT_FP32)
    elif V_FMT == 3:
        zacc = zacc * alpha
        pv = p.to(DTYPE)
        acc0 = acc0 * alpha[:, None] + _mm(pv, _nf_deq(vb, 0, vs, DTYPE, FAST_ASM), True, DOT_FP32)
        acc1 = acc1 * alpha[:, None] + _mm(pv, _nf_deq(vb, 1, vs, DTYPE, FAST_ASM), True, DOT_FP32)
    else:
        zacc = zacc * alpha
        pv = p.to(DTYPE)
        acc0 = acc0 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 0, V_BITS) * vs + vz).to(DTYPE), True, DOT_FP32)
        acc1 = acc1 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 1, V_BITS) * vs + vz).to(DTYPE), True, DOT_FP32)
        if PER_V == 4:
            acc2 = acc2 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 2, V_BITS) * vs + vz).to(DTYPE), True, DOT_FP32)
            acc3 = acc3 * alpha[:, None] + _mm(pv, (_plane_f32(vb, 3, V_BITS) * vs + vz).to(DTYPE), True, DOT_FP32)
    return m_i, l_i, zacc, acc0, acc1, acc2, acc3


@triton.jit
def _full_tiles_end(start, end, lim, off, BLOCK_N: tl.constexpr):
    """End of the run of whole tiles from ``start`` that lie inside [start, end) and at logical positions
    (part offset ``off``) <= ``lim``, the causal limit of the block's first row: those need no mask."""
    fe = tl.minimum(end, lim + 1 - off)
    return start + (tl.maximum(fe - start, 0) // BLOCK_N) * BLOCK_N


@triton.jit(do_not_specialize=["n_sink", "n_quant", "n_window", "NQ", "NUM_SPLITS", "v_lag", "v_wcap", "k_wcap"])
def _prefill_kernel(
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
    n_sink, n_quant, n_window, qk_scale, NQ, NUM_SPLITS,
    # K_ROPE: q's rotate-half partners with their signs (q's shape and strides) and each stored key column's rotary
    # frequency [H_KV, D] float32 (decode_attention._rope_operands)
    qb_ptr, rw_ptr,
    # KV_MIXED (KIVI): V's packed middle holds the first v_lag tokens of K's window; V's and K's window capacities
    # (rows: the ring's modulus with WRING)
    v_lag, v_wcap, k_wcap,
    H_KV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_MID: tl.constexpr, HAS_WINDOW: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    DTYPE: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VAL: tl.constexpr,
    V_DTYPE: tl.constexpr, V_MAGIC: tl.constexpr, V_MAGIC_VAL: tl.constexpr,
    FAST_ASM: tl.constexpr = False, PREFETCH: tl.constexpr = False, K_ROPE: tl.constexpr = False,
    K_FMT: tl.constexpr = 0, V_FMT: tl.constexpr = 0, K_CHANNEL: tl.constexpr = False,
    KV_MIXED: tl.constexpr = False, WRING: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    PER_K: tl.constexpr = 2 if K_BITS == 8 else 8 // K_BITS  # 8-bit codes: int16 words, two planes
    PER_V: tl.constexpr = 1 if V_BITS == 15 else (2 if V_BITS == 8 else 8 // V_BITS)  # ternary: one natural plane
    DPK: tl.constexpr = D // PER_K
    DPV: tl.constexpr = D // PER_V
    ROWS = GQA * NQ  # NQ and NUM_SPLITS are runtime values: a new chunk length does not recompile

    # rows of this block, token-major: row m is new token m // GQA of query head h * GQA + m % GQA
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < ROWS
    qi = rows // GQA
    hl = (rows % GQA).to(tl.int64)
    q_base = q_ptr + b * sq_b
    q_rows = (h * GQA + hl) * sq_h + qi.to(tl.int64) * sq_n
    # fp16 codes keep their bits in place (see decode_attention._plane_magic); the exact power-of-two
    # factors go into the q planes (K) and the output planes (V).
    K_SHIFTED: tl.constexpr = ((MAGIC == 0x6400) and (K_GROUP == D) and not K_ROPE and not K_CHANNEL and K_BITS != 8
                               and K_FMT == 0)
    V_SHIFTED: tl.constexpr = (V_MAGIC == 0x6400) and (V_GROUP == D) and V_BITS != 15 and V_BITS != 8 and V_FMT == 0
    KB: tl.constexpr = K_BITS
    q0 = _load_q_plane(q_base, q_rows, rmask, 0, PER_K, DPK, sq_d)
    q1 = _load_q_plane(q_base, q_rows, rmask, 1, PER_K, DPK, sq_d)
    qsum = tl.sum(q0.to(tl.float32), 1) + tl.sum(q1.to(tl.float32), 1)
    if K_SHIFTED:
        q1 = (q1.to(tl.float32) * (1.0 / (1 << KB))).to(DTYPE)
    if PER_K == 4:
        q2 = _load_q_plane(q_base, q_rows, rmask, 2, PER_K, DPK, sq_d)
        q3 = _load_q_plane(q_base, q_rows, rmask, 3, PER_K, DPK, sq_d)
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
        # the middle's token t sits at position n_sink + t (the sink holds all its tokens once the middle has any)
        prope = _rope_q_operands(qb_ptr + b * sq_b, q_rows, rmask, sq_d, rw_ptr + h * D, PER_K, DPK)
    else:
        prope = None

    L = n_sink + n_quant + n_window
    if CAUSAL:
        row_lim = L - NQ + qi  # new token i sees logical positions <= L - NQ + i
        last_tok = tl.minimum(NQ - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // GQA)
        kv_end = L - NQ + last_tok + 1  # the block's last token bounds the tokens it must read
        lim_lo = L - NQ + (pid_m * BLOCK_M) // GQA  # the block's first row: below it no causal mask
    else:
        row_lim = L + qi * 0
        kv_end = L
        lim_lo = L
    if not SPLIT:
        lo = 0
        hi = kv_end
    else:
        # this block's causal range, cut into NUM_SPLITS whole tiles (the last splits may be empty)
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, kv_end)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: fully masked tiles give p = 0, alpha = 1
    l_i = tl.zeros([BLOCK_M], tl.float32)
    zacc = tl.zeros([BLOCK_M], tl.float32)
    acc0, acc1, acc2, acc3 = _acc_init(BLOCK_M, DPV, PER_V)
    arange_n = tl.arange(0, BLOCK_N)

    if HAS_SINK:
        k_base = ksk_ptr + b * sksk_b + h * sksk_h
        v_base = vsk_ptr + b * svsk_b + h * svsk_h
        end = tl.minimum(hi, n_sink)
        mid = _full_tiles_end(lo, end, lim_lo, 0, BLOCK_N)
        for t0 in range(lo, mid, BLOCK_N):
            offs_t = t0 + arange_n
            m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _fp_tile(
                q0, q1, q2, q3, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                k_base, sksk_t, sksk_d, v_base, svsk_t, svsk_d, offs_t, end, offs_t, row_lim, qk_scale,
                PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, False, DOT_FP32, DTYPE)
        for t0 in range(mid, end, BLOCK_N):
            offs_t = t0 + arange_n
            m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _fp_tile(
                q0, q1, q2, q3, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                k_base, sksk_t, sksk_d, v_base, svsk_t, svsk_d, offs_t, end, offs_t, row_lim, qk_scale,
                PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, True, DOT_FP32, DTYPE)

    vc_base = vc_ptr + b * svc_b + h * svc_h
    vs_base = vs_ptr + b * svs_b + h * svs_h
    vz_base = vz_ptr + b * svz_b + h * svz_h
    if HAS_MID:
        kc_base = kc_ptr + b * skc_b + h * skc_h
        ks_base = ks_ptr + b * sks_b + h * sks_h
        kz_base = kz_ptr + b * skz_b + h * skz_h
        # per-channel keys: the scale / zero rows are token groups, the columns channels (_kc_plane)
        pkc = (ks_base, sks_t, sks_g, kz_base, skz_t, skz_g)
        start = tl.maximum(lo, n_sink) - n_sink
        end = tl.minimum(hi, n_sink + n_quant) - n_sink
        mid = _full_tiles_end(start, end, lim_lo, n_sink, BLOCK_N)
        if PREFETCH:
            # the next tile's bytes, scales and zeros load while this tile computes (register double
            # buffer; indices clamped into [0, end - 1], so the prefetch past the last tile stays in bounds)
            last = tl.maximum(end - 1, 0)
            offs_n = tl.minimum(start + arange_n, last)
            kb_n, ks_n, kz_n, vb_n, vs_n, vz_n = _packed_load(
                kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_n, offs_n < end,
                K_BITS, V_BITS, K_GROUP, V_GROUP, D, False, K_CHANNEL, K_FMT, V_FMT)
            for t0 in range(start, mid, BLOCK_N):
                kb, ks, kz, vb, vs, vz = kb_n, ks_n, kz_n, vb_n, vs_n, vz_n
                offs_n = tl.minimum(t0 + BLOCK_N + arange_n, last)
                kb_n, ks_n, kz_n, vb_n, vs_n, vz_n = _packed_load(
                    kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                    vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_n, offs_n < end,
                    K_BITS, V_BITS, K_GROUP, V_GROUP, D, False, K_CHANNEL, K_FMT, V_FMT)
                offs_t = t0 + arange_n
                m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _packed_tile(
                    q0, q1, q2, q3, qsum, qsum_mag, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                    kb, ks, kz, vb, vs, vz, offs_t, end, offs_t + n_sink, row_lim, qk_scale,
                    K_BITS, V_BITS, K_GROUP, V_GROUP, D, MAGIC, MAGIC_VAL, V_MAGIC, V_MAGIC_VAL, V_DTYPE,
                    K_SHIFTED, V_SHIFTED, FAST_ASM, CAUSAL, False, DOT_FP32, DTYPE, prope, K_ROPE, K_FMT, V_FMT, K_CHANNEL, pkc)
        else:
            for t0 in range(start, mid, BLOCK_N):
                offs_t = t0 + arange_n
                kb, ks, kz, vb, vs, vz = _packed_load(
                    kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                    vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_t, offs_t < end,
                    K_BITS, V_BITS, K_GROUP, V_GROUP, D, False, K_CHANNEL, K_FMT, V_FMT)
                m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _packed_tile(
                    q0, q1, q2, q3, qsum, qsum_mag, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                    kb, ks, kz, vb, vs, vz, offs_t, end, offs_t + n_sink, row_lim, qk_scale,
                    K_BITS, V_BITS, K_GROUP, V_GROUP, D, MAGIC, MAGIC_VAL, V_MAGIC, V_MAGIC_VAL, V_DTYPE,
                    K_SHIFTED, V_SHIFTED, FAST_ASM, CAUSAL, False, DOT_FP32, DTYPE, prope, K_ROPE, K_FMT, V_FMT, K_CHANNEL, pkc)
        for t0 in range(mid, end, BLOCK_N):
            offs_t = t0 + arange_n
            kb, ks, kz, vb, vs, vz = _packed_load(
                kc_base, skc_t, skc_c, ks_base, sks_t, sks_g, kz_base, skz_t, skz_g,
                vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, offs_t, offs_t < end,
                K_BITS, V_BITS, K_GROUP, V_GROUP, D, True, K_CHANNEL, K_FMT, V_FMT)
            m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _packed_tile(
                q0, q1, q2, q3, qsum, qsum_mag, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                kb, ks, kz, vb, vs, vz, offs_t, end, offs_t + n_sink, row_lim, qk_scale,
                K_BITS, V_BITS, K_GROUP, V_GROUP, D, MAGIC, MAGIC_VAL, V_MAGIC, V_MAGIC_VAL, V_DTYPE,
                K_SHIFTED, V_SHIFTED, FAST_ASM, CAUSAL, True, DOT_FP32, DTYPE, prope, K_ROPE, K_FMT, V_FMT, K_CHANNEL, pkc)

    if HAS_WINDOW:
        k_base = kw_ptr + b * skw_b + h * skw_h
        v_base = vw_ptr + b * svw_b + h * svw_h
        w0 = n_sink + n_quant
        start = tl.maximum(lo, w0) - w0
        end = tl.minimum(hi, L) - w0
        if WRING:
            # ring windows (PackedKV): K's window token t sits at K's row (n_quant + t) % k_wcap and, past the lag, at
            # V's row (v_n_quant + t - v_lag) % v_wcap (v_n_quant = n_quant + v_lag: V's own window token t - v_lag).
            # The starts are reduced once here; a token to load then wraps at most once (t < n_window <= k_wcap,
            # t - v_lag < v_wcap), so no division per token. No V window (v_wcap 0): every token of K's window is
            # in V's middle and V's rows are never loaded
            v_cap = tl.maximum(v_wcap, 1)
            pring = (n_quant % k_wcap, k_wcap, (n_quant + v_lag) % v_cap - v_lag, v_cap)
        else:
            pring = None
        if KV_MIXED:
            # K's window token t: V packed at V's middle row n_quant + t below v_lag, else V's window row t - v_lag
            # (WRING: its ring row, pring)
            pvm = (v_lag, v_wcap, vc_base, svc_t, svc_c, vs_base, svs_t, svs_g, vz_base, svz_t, svz_g, n_quant)
            mend = tl.minimum(end, start + tl.cdiv(tl.maximum(v_lag - start, 0), BLOCK_N) * BLOCK_N)
            for t0 in range(start, mend, BLOCK_N):
                offs_t = t0 + arange_n
                m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _fp_tile(
                    q0, q1, q2, q3, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                    k_base, skw_t, skw_d, v_base, svw_t, svw_d, offs_t, end, offs_t + w0, row_lim, qk_scale,
                    PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, True, DOT_FP32, DTYPE, True, pvm, V_GROUP,
                    WRING, pring)
            start = mend
            if not WRING:  # (ring rows carry the lag themselves)
                v_base = v_base - v_lag * svw_t  # the plain tiles past the lag: V's window row t - v_lag
        mid = _full_tiles_end(start, end, lim_lo, w0, BLOCK_N)
        for t0 in range(start, mid, BLOCK_N):
            offs_t = t0 + arange_n
            m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _fp_tile(
                q0, q1, q2, q3, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                k_base, skw_t, skw_d, v_base, svw_t, svw_d, offs_t, end, offs_t + w0, row_lim, qk_scale,
                PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, False, DOT_FP32, DTYPE, WRING=WRING, pring=pring)
        for t0 in range(mid, end, BLOCK_N):
            offs_t = t0 + arange_n
            m_i, l_i, zacc, acc0, acc1, acc2, acc3 = _fp_tile(
                q0, q1, q2, q3, m_i, l_i, zacc, acc0, acc1, acc2, acc3,
                k_base, skw_t, skw_d, v_base, svw_t, svw_d, offs_t, end, offs_t + w0, row_lim, qk_scale,
                PER_K, PER_V, D, K_SHIFTED, V_SHIFTED, CAUSAL, True, DOT_FP32, DTYPE, WRING=WRING, pring=pring)

    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    if not SPLIT:
        # final output ([B, Hq, NQ, D], q's dtype) and natural-log lse
        orow = (b * (H_KV * GQA) + h * GQA + hl) * NQ + qi
        tl.store(lse_ptr + orow, lse2 * 0.6931471805599453, mask=rmask)
        _store_planes(acc0, acc1, acc2, acc3, zacc, inv_l, out_ptr, orow * D, rmask, PER_V, DPV, DTYPE, V_SHIFTED)
    else:
        # partial rows in the decode merge kernel's (head-major) order: m = head_in_group * NQ + token
        prow = (pid_bh.to(tl.int64) * NUM_SPLITS + split) * ROWS + hl * NQ + qi
        tl.store(lp_ptr + prow, lse2, mask=rmask)
        _store_planes(acc0, acc1, acc2, acc3, zacc, inv_l, op_ptr, prow * D, rmask, PER_V, DPV, tl.float32, V_SHIFTED)


@triton.jit(do_not_specialize=["NQ", "NUM_SPLITS"])
def _prefill_merge_kernel(op_ptr, lp_ptr, out_ptr, lse_ptr, NQ, NUM_SPLITS,
                          H_KV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr,
                          BLOCK_D: tl.constexpr, DTYPE: tl.constexpr):
    """Combine the splits of one query row (and one BLOCK_D slice of the head dim): the decode kernel's
    _merge_kernel with the number of new tokens and splits as runtime values."""
    ROWS = GQA * NQ
    row = tl.program_id(0).to(tl.int64)  # (b * H_KV + h) * ROWS + m, m = head_in_group * NQ + token
    pid_d = tl.program_id(1)
    bh = row // ROWS
    m = row % ROWS
    offs_s = tl.arange(0, SPLITS_P2)
    smask = offs_s < NUM_SPLITS
    prow = (bh * NUM_SPLITS + offs_s) * ROWS + m
    lse = tl.load(lp_ptr + prow, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.where(smask, tl.exp2(lse - mx), 0.0)
    denom = tl.sum(w, 0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o = tl.load(op_ptr + prow[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0) / denom
    # output row: (b * Hq + h * GQA + head_in_group) * NQ + token == bh * ROWS + m
    tl.store(out_ptr + row * D + offs_d, o.to(DTYPE))
    if pid_d == 0:
        tl.store(lse_ptr + row, (mx + tl.log2(denom)) * 0.6931471805599453)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

# Defaults: see choose_prefill_config; kvcompile/kernels/NOTES.md (prefill section) for the H100 sweep.
# H100 (benchmarks/bench_prefill.py --variants, 2026-11-25): 64 rows x 4 warps per program beat 128 rows x 8
# warps by 11% (B=1, 64-token chunk, 32k history: 237.9 vs 268.5 us) and 17% (B=8, 512-token chunk, 32k:
# 11.2 vs 13.5 ms); BLOCK_N 32 was slower (305 / 12334), so were the register-double-buffered prefetch
# (308 / 14629: it spills) and the portable unpack without PTX (470 / 13516).
_DEFAULT_BLOCK_M = 64
_DEFAULT_BLOCK_N = 64
PREFETCH_DEFAULT = False  # register double buffer of the next packed tile (launcher keyword prefetch=)
_MAX_PARTIAL_BYTES = 256 << 20  # split only while the fp32 partials stay below this


def _fail(msg: str):
    raise ValueError(f"prefill_attention: {msg}")


# Cost model of prefill_is_profitable, fitted to the H100 measurements of benchmarks/bench_prefill.py
# (2026-11-25, eager calls, Hq=32 Hkv=8 D=128, chunks 64/512 over 4k/32k histories, B=1/8):
# - the kernel: ~250 us of host time per eager call (two launches + validation; 81 us of GPU time in a
#   graph for the smallest case) or its GPU time, whichever is larger; GPU time = causal work at 123-164
#   TFLOP/s measured with 128-row blocks (140 used; the 64-row default measured 145-197);
# - dequantize + SDPA: ~900 us of host time (PackedKV.dequantize is a chain of float32 ops) or ~20 ps per
#   dequantized K/V element (537 M elements: 10.9 ms), whichever is larger, plus the masked SDPA, which
#   computes the whole Nq x L score block (42-314 TFLOP/s measured; 60 us + 300 TFLOP/s used).
_KERNEL_HOST_S = 250e-6
_KERNEL_FIXED_S = 15e-6
_KERNEL_FLOPS = 140e12
# keys before RoPE / ternary values (per-element rotation and digits): 40-41 TFLOP/s measured (H100, skvq's layout,
# 64- and 512-token chunks over 4k / 32k, benchmarks/bench_prefill.py SKVQ_CASES)
_KERNEL_FLOPS_PER_ELEMENT = 40e12
# per-channel keys (kivi) dequantized per element in registers, their scales / zeros gathered per element: 88-93
# TFLOP/s (H100, bench_prefill.py SCHEME_CASES, 2026-11-26); NF4 in blocks below the head (scales loaded per group and
# broadcast) measured 128-140, int8 / fp8 148-184: those take _KERNEL_FLOPS
_KERNEL_FLOPS_REGISTER = 88e12
_DEQ_HOST_S = 900e-6
_DEQ_S_PER_ELEM = 20e-12
_SDPA_FIXED_S = 60e-6
_SDPA_FLOPS = 300e12


def prefill_is_profitable(*, batch: int, kv_heads: int, rows: int, new_tokens: int, seq_len: int,
                          head_dim: int, per_element: bool = False, register_dequant: bool = False) -> bool:
    """Whether the prefill kernel is expected to beat dequantize + SDPA (``ops._dequant_sdpa``, eager) on
    this shape. Dequantize + SDPA pays for every K/V element of the whole cache at each chunk and a masked
    SDPA over the full Nq x L block; the kernel reads the packed bytes once per query block and does only
    the causal work, but at a lower matrix rate than SDPA's (see the constants above: every shape of the
    H100 benchmark was faster through the kernel, 1.2-8.2x; chunks of several thousand tokens over long
    histories are where the model hands back to SDPA). ``per_element``: keys before RoPE or ternary values, which
    the kernel rotates / decodes per element (a lower matrix rate); ``register_dequant``: per-channel keys (KIVI),
    dequantized per element in registers (between the two)."""
    q_heads = kv_heads * (rows // max(1, new_tokens))
    causal_len = seq_len - (new_tokens - 1) / 2 if new_tokens > 1 else seq_len
    rate = (_KERNEL_FLOPS_PER_ELEMENT if per_element else _KERNEL_FLOPS_REGISTER if register_dequant
            else _KERNEL_FLOPS)
    kernel_gpu = _KERNEL_FIXED_S + 4.0 * batch * q_heads * new_tokens * causal_len * head_dim / rate
    kernel = max(_KERNEL_HOST_S, kernel_gpu)
    elems = 2 * batch * kv_heads * seq_len * head_dim
    sdpa = _SDPA_FIXED_S + 4.0 * batch * q_heads * new_tokens * seq_len * head_dim / _SDPA_FLOPS
    deq = max(_DEQ_HOST_S, elems * _DEQ_S_PER_ELEM) + sdpa
    return kernel < deq


def choose_prefill_config(*, batch: int, kv_heads: int, rows: int, seq_len: int, head_dim: int,
                          num_sms: int, block_m: int | None = None, block_n: int | None = None,
                          num_splits: int | None = None, num_warps: int | None = None,
                          programs_per_sm: int | None = None) -> dict:
    """Block sizes, warps and KV splits for ``rows = GQA ratio x new tokens`` query rows per KV head.

    BLOCK_M: the rows of one program (16..128, a power of two); BLOCK_N: tokens per tile. Splits: with fewer
    programs than one wave (``programs_per_sm x num_sms``; by default 8 warps' worth per SM, the register
    budget of ~250 registers per thread), each query block's KV range is cut into as many parts as still
    fit that one wave (rounding down: a nearly empty second wave cost the decode kernel 1.2-1.5x), never a
    part shorter than one tile, and never more fp32 partial bytes than _MAX_PARTIAL_BYTES."""
    if block_m is None:
        block_m = min(_DEFAULT_BLOCK_M, max(16, _da._next_pow2(rows)))
    if block_n is None:
        block_n = _DEFAULT_BLOCK_N
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if programs_per_sm is None:
        programs_per_sm = max(1, 8 // num_warps)
    q_blocks = _da._cdiv(rows, block_m)
    programs = q_blocks * batch * kv_heads
    if num_splits is None:
        tiles = max(1, _da._cdiv(seq_len, block_n))
        want = (programs_per_sm * num_sms) // programs
        num_splits = max(1, min(tiles, want))
        per_split = batch * kv_heads * rows * head_dim * 4
        num_splits = max(1, min(num_splits, _MAX_PARTIAL_BYTES // max(1, per_split)))
    return dict(block_m=block_m, block_n=block_n, num_splits=num_splits, q_blocks=q_blocks, num_warps=num_warps)


def prefill_attention(
    *,
    q: torch.Tensor,
    k_sink: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_window: torch.Tensor,
    v_sink: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_window: torch.Tensor,
    n_quant: int,
    n_window: int,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    sm_scale: float | None = None,
    causal: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs_per_sm: int | None = None,
    fast_asm: bool = True,
    prefetch: bool | None = None,
    k_rope: torch.Tensor | None = None,
    k_perm: torch.Tensor | None = None,
    k_format: str = "affine",
    v_format: str = "affine",
    k_axis: str = "token",
    v_n_quant: int | None = None,
    window_ring: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of ``Nq`` new queries over the packed KV ``sink ++ middle[:n_quant] ++ window[:n_window]``.

    Same arguments as :func:`decode_attention` (any number of query rows): q [B, Hq, Nq, D] fp16/bf16, any
    strides; the Nq new tokens are the last Nq logical tokens and, with ``causal`` (default), new token i
    sees logical positions <= L - Nq + i (without it every new token sees all L tokens).
    ``*_sink`` [B, Hkv, S, D] (S may be 0) and ``*_window`` [B, Hkv, W, D] in q's dtype; ``*_codes`` uint8
    [B, Hkv, cap, D * bits / 8] (little-endian within the byte); ``*_scale`` / ``*_zero``
    [B, Hkv, cap, D // group_size] (per-token affine groups: x = c * scale + zero). A channel permutation is
    the caller's to fold into q and the output (as ``kvcompile.ops`` does). ``v_bits=1.5``: ternary values
    (``v_codes`` [B, Hkv, cap, ceil(D / 5)], 5 base-3 digits per byte), dequantized per element. Keys quantized
    before RoPE: ``k_rope`` / ``k_perm`` as for :func:`decode_attention` (the middle's token t at position S + t,
    rotated per element). ``k_format`` / ``v_format`` as for :func:`decode_attention`: "int8" / "fp8" 8-bit codes
    with one absmax scale per token (``*_zero`` None), "nf" NF4 codes with an absmax scale per group (``*_zero``
    None; groups below D dequantized in registers); 8-bit affine codes take one group per token too.
    ``k_axis="channel"`` (KIVI keys): affine 2/4-bit keys with scale / zero [B, Hkv, cap // k_group_size, D] per
    channel over ``k_group_size`` tokens (the key capacity a multiple of it), dequantized in registers.
    ``v_n_quant`` (default ``n_quant``): V's packed middle may run ahead of K's (KIVI quantizes V every token, K a
    token group at a time): V then holds ``v_n_quant`` packed tokens and ``n_window - (v_n_quant - n_quant)`` window
    tokens (V's own capacities, ``v_codes`` [B, Hkv, cap_v, ...], ``v_window`` [B, Hkv, W_v, D]); the first
    ``v_n_quant - n_quant`` tokens of K's window are read from V's middle (affine 2/4-bit values).
    ``window_ring``: the windows are rings (PackedKV's layout, docs/format.md): window token j sits at row
    ``(n_quant + j) % W`` of ``k_window`` and at row ``(v_n_quant + j) % W_v`` of ``v_window`` (each side's own
    packed length and row capacity ``window.shape[2]``); otherwise window token j is row j.
    Returns (out [B, Hq, Nq, D] in q's dtype, contiguous; lse [B, Hq, Nq] float32, natural log of the
    softmax denominator of ``sm_scale * q . k``).
    """
    if q.dim() != 4:
        _fail(f"q must be [B, Hq, Nq, D], got shape {tuple(q.shape)}")
    B, Hq, NQ, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        _fail(f"q dtype {q.dtype} unsupported (float16, bfloat16): cast q and the full-precision K/V parts")
    if D not in SUPPORTED_HEAD_DIMS:
        _fail(f"head dim {D} unsupported (supported: {SUPPORTED_HEAD_DIMS}); use dequantize + SDPA")
    if k_bits not in SUPPORTED_BITS or v_bits not in SUPPORTED_V_BITS:
        _fail(f"bits k={k_bits} v={v_bits} unsupported (supported: keys {SUPPORTED_BITS}, values {SUPPORTED_V_BITS})")
    ternary = v_bits == 1.5
    if k_axis not in ("token", "channel"):
        _fail(f"k_axis={k_axis!r} unsupported ('token' or 'channel')")
    k_channel = k_axis == "channel"
    if k_channel and (k_bits not in (2, 4) or k_format != "affine" or k_rope is not None):
        _fail(f"k_axis='channel' takes affine 2- or 4-bit keys after RoPE, got {k_format} {k_bits}-bit"
              + (" before RoPE" if k_rope is not None else ""))
    if k_channel and k_group_size not in _da.SUPPORTED_TOKEN_GROUPS:
        _fail(f"key token group k_group_size={k_group_size} unsupported for k_axis='channel' "
              f"(supported: {_da.SUPPORTED_TOKEN_GROUPS})")
    k_g = D if k_channel else k_group_size  # per-channel keys: token groups (checked above), one scale per channel
    for name, g in (("k", k_g), ("v", v_group_size)):
        if not (g == D or g in SUPPORTED_GROUP_SIZES):
            _fail(f"{name} group size {g} unsupported (D={D}, 16, 32 or 64 channels per group)")
    _da._check_formats(D, ("k", k_format, k_bits, k_g, k_zero), ("v", v_format, v_bits, v_group_size, v_zero),
                       fail=_fail)
    if k_rope is not None and (k_bits == 8 or k_format != "affine"):
        _fail(f"keys quantized before RoPE take affine 2/4-bit codes, got {k_format} {k_bits}-bit")
    if NQ < 1:
        _fail("q must hold at least one new token")
    if k_codes.dim() != 4:
        _fail(f"k_codes must be [B, Hkv, cap, D * bits / 8], got shape {tuple(k_codes.shape)}")
    Hkv, cap = k_codes.shape[1], k_codes.shape[2]
    cap_v = v_codes.shape[2] if v_codes.dim() == 4 else -1
    if Hkv == 0 or Hq % Hkv:
        _fail(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    r = Hq // Hkv
    _da._check_packed(B, Hkv, D, cap, cap_v, k_bits, v_bits, k_channel, k_group_size, v_group_size,
                      k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fail=_fail)
    if k_sink.dim() != 4 or k_window.dim() != 4:
        _fail(f"sink and window must be [B, Hkv, n, D], got {tuple(k_sink.shape)}, {tuple(k_window.shape)}")
    S, W, W_v = k_sink.shape[2], k_window.shape[2], v_window.shape[2] if v_window.dim() == 4 else -1
    for name, t, want in (("k_sink", k_sink, (B, Hkv, S, D)), ("v_sink", v_sink, (B, Hkv, S, D)),
                          ("k_window", k_window, (B, Hkv, W, D)), ("v_window", v_window, (B, Hkv, W_v, D))):
        if tuple(t.shape) != want:
            _fail(f"{name} shape {tuple(t.shape)} != {want}")
        if t.dtype != q.dtype:
            _fail(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    dev = q.device
    for t in (k_sink, k_codes, k_scale, k_zero, k_window, v_sink, v_codes, v_scale, v_zero, v_window):
        if t is not None and t.device != dev:
            _fail(f"all inputs must be on q's device {dev}, found one on {t.device}")
    rope = k_rope is not None
    if rope:
        q, qb, rw = _da._rope_args(q, k_rope, k_perm, Hkv, _fail)
    else:
        qb, rw = q, q  # unused
    n_quant, n_window = int(n_quant), int(n_window)
    if not 0 <= n_quant <= cap:
        _fail(f"n_quant={n_quant} outside [0, {cap}]")
    if not 0 <= n_window <= W:
        _fail(f"n_window={n_window} outside [0, {W}]")
    v_n_quant = n_quant if v_n_quant is None else int(v_n_quant)
    v_lag = v_n_quant - n_quant
    if not (0 <= v_lag <= n_window and v_n_quant <= cap_v and n_window - v_lag <= W_v):
        _fail(f"v_n_quant={v_n_quant} must lie in [n_quant={n_quant}, n_quant + n_window={n_quant + n_window}] and fit "
              f"V's capacities (middle {cap_v}, window {W_v} for its n_window - {v_lag} tokens)")
    if v_lag and (ternary or v_bits not in (2, 4) or v_format != "affine"):
        _fail("V's middle ahead of K's (v_n_quant > n_quant) takes affine 2- or 4-bit values")
    L = S + n_quant + n_window
    if causal and L < NQ:
        _fail(f"sequence length {L} < new tokens {NQ}: the chunk's own K/V must be written before attention")
    if L < 1:
        _fail("no tokens to attend to")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        _fail(f"block_m={block_m} must be a power of two >= 16")
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        _fail(f"block_n={block_n} must be a power of two >= 16")

    interp = _da._interpreting() or dev.type != "cuda"
    rows = r * NQ
    if block_n is None and (rope or ternary):
        # per-element keys before RoPE / ternary values: [tokens, channels] float32 temporaries per tile
        block_n = 16 if ternary else 32
    if (not interp and D == 64 and k_bits == 4 and not rope and (k_channel or k_group_size < D) and not ternary
            and v_group_size == D):
        # Triton 3.6 miscompiles this tile set on the H100 (2026-11-26): keys dequantized in registers as two
        # 32-column planes beside values in whole-head planes, at 64+ rows x 64+ tokens per program: wrong outputs,
        # or with 128-token tiles an out-of-bounds shared-memory read (compute-sanitizer). 64 rows x 32 tokens (and
        # 32 rows, or 8 warps) measured correct, so the tiles are capped there.
        block_n = 32 if block_n is None else min(block_n, 32)
        block_m = None if block_m is None else min(block_m, 64)
    cfg = choose_prefill_config(batch=B, kv_heads=Hkv, rows=rows, seq_len=L, head_dim=D,
                                num_sms=_da._num_sms(dev), block_m=block_m, block_n=block_n,
                                num_splits=num_splits, num_warps=num_warps, programs_per_sm=programs_per_sm)
    block_m, block_n, num_splits, q_blocks = cfg["block_m"], cfg["block_n"], cfg["num_splits"], cfg["q_blocks"]
    num_warps = cfg["num_warps"]
    if num_stages is None:
        num_stages = 2

    out = torch.empty((B, Hq, NQ, D), device=dev, dtype=q.dtype)
    lse = torch.empty((B, Hq, NQ), device=dev, dtype=torch.float32)
    if num_splits == 1:
        o_part, l_part = out, lse  # unused
    else:
        o_part = torch.empty((B * Hkv, num_splits, rows, D), device=dev, dtype=torch.float32)
        l_part = torch.empty((B * Hkv, num_splits, rows), device=dev, dtype=torch.float32)

    def part(t: torch.Tensor, used: bool):
        # an empty part gets a stand-in pointer (an empty CUDA tensor may have a null pointer); never read
        return (t, *t.stride()) if used else (q, 0, 0, 0, 0)

    has_sink, has_mid, has_window = S > 0, n_quant > 0, n_window > 0
    v_mid = has_mid or v_lag > 0  # V's packed middle is read by the mixed window tiles too
    # magic numbers, V's product dtype, zero stand-ins and 8-bit int16 words, as in the decode launcher
    tl_dtype, magic, magic_val, v_dtype, v_magic, v_magic_val, k_codes, k_zero, v_codes, v_zero = _da._code_args(
        q, k_bits, v_bits, k_format, v_format, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fail=_fail)
    grid = (q_blocks, B * Hkv, num_splits)
    _prefill_kernel[grid](
        q, *q.stride(),
        *part(k_sink, has_sink), *part(k_codes, has_mid), *part(k_scale, has_mid), *part(k_zero, has_mid),
        *part(k_window, has_window),
        *part(v_sink, has_sink), *part(v_codes, v_mid), *part(v_scale, v_mid), *part(v_zero, v_mid),
        *part(v_window, has_window and W_v > 0),
        o_part, l_part, out, lse,
        S, n_quant, n_window, float(sm_scale) * _LOG2E, NQ, num_splits,
        qb, rw, v_lag, W_v, W,
        H_KV=Hkv, GQA=r, D=D, K_BITS=k_bits, V_BITS=15 if ternary else v_bits, K_GROUP=k_group_size,
        V_GROUP=v_group_size,
        BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=num_splits > 1,
        HAS_SINK=has_sink, HAS_MID=has_mid, HAS_WINDOW=has_window,
        CAUSAL=bool(causal) and NQ > 1, DOT_FP32=interp, DTYPE=tl_dtype, MAGIC=magic, MAGIC_VAL=magic_val,
        V_DTYPE=v_dtype, V_MAGIC=v_magic, V_MAGIC_VAL=v_magic_val, FAST_ASM=fast_asm and not interp,
        PREFETCH=PREFETCH_DEFAULT if prefetch is None else bool(prefetch), K_ROPE=rope,
        K_FMT=_da._FMT_CODE[k_format], V_FMT=_da._FMT_CODE[v_format], K_CHANNEL=k_channel, KV_MIXED=v_lag > 0,
        WRING=bool(window_ring) and has_window, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        block_d = 64 if B * Hq * NQ < 4 * _da._num_sms(dev) else D
        _prefill_merge_kernel[(B * Hkv * rows, D // block_d)](
            o_part, l_part, out, lse, NQ, num_splits,
            H_KV=Hkv, GQA=r, D=D,
            SPLITS_P2=_da._next_pow2(num_splits), BLOCK_D=block_d, DTYPE=tl_dtype,
            num_warps=4 if block_d * num_splits >= 4096 else 2,
        )
    return out, lse
