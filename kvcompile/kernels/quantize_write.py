"""Quantize-on-write: append new K or V tokens to packed storage in one Triton launch (docs/format.md).

The launch does what ``PackedKV.append`` (kvcompile/cache/packed.py, the pure-PyTorch reference and spec) does,
on the plain storage tensors, reading the valid lengths from the ``counts`` tensor on the device, so a decode
step's write needs no host synchronisation and can be captured in a CUDA graph:

1. the first ``min(T, n_sink - n_sink_filled)`` new tokens fill the sink;
2. the rest enter the window; of the pending sequence (the window's ``n_window`` tokens ++ rest) the oldest
   ``n_move = floor((n_window + rest - window) / flush) * flush`` tokens leave it. Per-token layouts (flush 1)
   quantize every new token on entry, at codes row ``n_quant + n_window + k``, so the tokens that leave the window
   have their codes already; per-channel layouts (KIVI keys) quantize the ``n_move`` leaving tokens at ``n_quant``
   (codes, scale, zero);
3. the new tokens that stay are stored into the window, a ring: pending token ``p`` at row ``(n_quant + p) % WB``
   (``WB``: the window tensor's rows), so no stored row moves;
4. ``counts`` becomes ``[n_sink_filled', n_quant + n_move, pending - n_move]``.

Every part is stored in the channel order ``perm`` (when there is one), as the reference does; window rows are
already in that order, new rows are gathered through ``perm``.

Grid: one program per (batch, KV head, channel block). A program owns its columns for all tokens; inside a program
a barrier separates the quantize loads of the window's leaving tokens (per-channel layouts) from the ring stores
that may overwrite their rows. Per-token groups keep a group inside one channel block; ternary codes (5 per byte)
and int8 / fp8 (one scale per token) use one block spanning the head dim.

Counts without a second launch: every program reads each word of ``counts`` with an atomic add of ``2**32``, its
"arrival" at that word (the low 32 bits are the value it reads), all three words in one vector atomic: one round
trip. The program that arrives last at a word (it sees ``n_programs - 1`` earlier arrivals there) knows every
program has read that word and writes its new value with a plain store, clearing the arrival bits (the "last block"
pattern of CUDA's threadFenceReduction sample; here it orders reads before the write instead of partial sums before
the merge). Every program computes the same new values from the same reads, so the three words may be written by
different programs. Between launches ``counts`` holds the plain values. (``parallel_arrivals=False``: the
programs read ``counts[1:3]`` and then arrive at ``counts[0]`` with acq_rel, the form before 2026-11-26; scalar
atomics, each one round trip of its own, see below.)

Scalar atomics cost a round trip each, in sequence: Triton broadcasts a scalar atomic's result to the program's
threads through shared memory behind a barrier, which waits for the result before the next instruction. The three
scalar arrivals of sessions 6-19 (documented then as one round trip) and the last arriver's three atomic exchanges
were six round trips in a row; one vector atomic and one vector store took the g128 pair's write from 4.6-4.8 to
2.4 us (H100, session 20). The PTX shows it: each scalar ``atom.global`` is followed by a shared-memory store of its
result and a ``bar.sync``; tests/test_kernels_write.py counts the build's atomics.

Loads before the counts (``preload``): the first new rows do not depend on the counts, so they are issued first
and their round trips overlap the atomics'. A decode step that moves no new row into the sink quantizes and stores
them from registers; other steps load what they need after the counts. (Before the ring window, 2026-11-26 session
10, the whole window was loaded here too, for its shift down by one row per step.)

Measured (H100, torch 2.11, triton 3.6, ``python benchmarks/bench_write.py``, B=8 Hkv=8 D=128, one new token,
K and V of a layer from CUDA-graph replays): 15.2 us for 2-bit groups of 128 with a 128-token window (11.8% of
that layer's fused K2V2 attention at 32k tokens, 128.7 us; the target is 5%), 13.2 us for groups of 32,
11.5 us for KIVI (per-channel K), 16.1 us without a window; ``PackedKV.append`` took 0.9-3.0 ms per layer.
The launch is latency-bound (64 programs of a dependent chain: counts atomics, loads, a scale round trip,
stores), not bandwidth-bound. (Timed before the switch to the reciprocal multiplication below, which
replaces one division per group.) Since then (2026-11-26, same device): the per-token scale / zero reach the code
planes in registers (``REG_META``; no store / barrier / reload), and ``pair`` writes a layer's K and V in one
launch (grid axis 2; ``kvcompile.ops.write_pair``): 7.7 us for both at groups of 128 (6.0% of the attention),
7.3 us at groups of 32 (4.2%), against 14.1 / 12.1 us for two launches (BENCHMARKS.md). Then (2026-11-26, session 6)
the loads before the counts, the parallel arrivals, codes packed from the natural tile, a one-token tile with 4
warps for a decode step, and one launch for two layouts: 6.3-6.7 us for the g128 pair with its 128-token window
(5.8-6.2% of the layer's 108-us attention; 8.0-8.1 us for the old kernel and launcher defaults in the same runs),
5.1 us without a window (4.7%), 6.5 us at groups of 32 (4.8%), KIVI 6.1 us in one launch (10.1 in two), SKVQ's
layouts (post-RoPE keys) 6.7 us (11.9 in two); an empty launch of that grid takes 1.1-1.2 us. What is left with a
window is mostly its shift (every row moves down by one each step: 2 x 2 MB through L2 for the pair, about 1 us);
a ring-buffer window would remove it but changes the storage format every reader knows (docs/format.md). Session 10
(2026-11-26) made that change: the window is a ring and per-token layouts quantize on entry, so a decode step reads
only the new token: 5.0 us for the g128 pair with its window (4.6% of the layer's 110-us attention), 6.1-6.2 us
before in the same run; KIVI 5.3, SKVQ's layouts 7.45 (BENCHMARKS.md). Session 19 (2026-11-27): that layer's attention
now takes 62 us (the Gluon kernel), so 5.0 us is 8% of it; one warp for the one-token tile gave 4.85 us (KIVI 4.60
against 5.10), against an empty launch's 1.05. Session 20 (2026-11-27): the arrivals in one vector atomic and the
count updates as plain stores (above): 2.42 us for the g128 pair (3.9% of its layer's 62.3-us attention, target
met), KIVI 2.77 (1.9%), ``skvq``'s defaults 5.01 (BENCHMARKS.md, "Quantize-on-write v36").

Codes are computed as the float32 references do (docs/format.md "Rounding rules"): true IEEE divisions where
the reference divides two tensors (``div_rn``; Triton's ``/`` is approximate on the GPU); where it divides by a
Python number (the level count, 127, 448) it does what PyTorch does on the data's device: on CUDA a
multiplication by the float32 reciprocal (PyTorch's div_true_kernel_cuda), on CPU a division
(``scalar_division``; found by the H100 tests: with clip ratio 0.95 and an IEEE division, 1 of 19,200 scales
in a 300-token prefill differed by one fp16 ulp); no FMA contraction (the launch passes
``enable_fp_fusion=False``), scale and zero rounded to the meta dtype (round to nearest even; by hand for
bfloat16, which the interpreter truncates) before the codes, round-half-to-even via the float32
``(v + 1.5 * 2**23) - 1.5 * 2**23`` identity on values clamped to a small range first, fp8 bits
assembled by hand (the interpreter's float8 conversion is wrong where rounding carries into the exponent). So the stored bytes
are bit-identical to the reference's (the tests compare them with ``torch.equal``).

Capacity: the host checks it where it knows the length (``kvcompile.ops.write``); the kernel itself never
writes out of bounds: when the codes rows it would fill (``n_quant + n_window + rest`` for per-token layouts,
``n_quant + n_move`` for per-channel ones) exceed the middle's capacity, the launch writes nothing and leaves
``counts`` as it was (the reference raises ``CacheCapacityError`` there).

Keys quantized before RoPE (``rope``: the model's inverse frequencies, SKVQ's ``pre_rope``): the rows being quantized
are un-rotated by their middle positions ``n_sink + n_quant + i`` on the natural tile before their statistics, in the
reference's float32 arithmetic (``tl.cos`` / ``tl.sin`` are libdevice's, as PyTorch's CUDA kernels; the CPU
interpreter's numpy cos / sin can differ from PyTorch's by one float32 ulp, so there a code can land one level
off at a rounding tie); one block spans the head dim, since a channel's rotate-half partner may sit anywhere in the
stored order (the partner's column is found by comparing against ``perm``).

Not covered here (the op falls back to the reference, see ``unsupported_reason``): keys before RoPE in ternary,
3-bit or per-channel layouts, and the call that calibrates an SKVQ channel order (a host-side search;
``kvcompile.ops`` decides, see ``_write_fused`` there).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import Launch, PlanCache

__all__ = ["quantize_write", "pair_compatible", "unsupported_reason", "SUPPORTED_KV_DTYPES", "SUPPORTED_META_DTYPES"]

SUPPORTED_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_META_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AFFINE_BITS = (1, 1.5, 2, 3, 4, 8)
_NF_BITS = (2, 3, 4)
_KINDS = {"affine": 0, "nf": 1, "int8": 2, "fp8": 3}
_META_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_MAX_HEAD_DIM = 256
_MAX_FLUSH = 128  # per-channel token groups: one [flush, channels] tile in registers



def _fail(msg: str):
    raise ValueError(f"quantize_write: {msg}")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _unit(bits: float) -> tuple[int, int]:
    """(codes, bytes) of one packing unit (docs/format.md, "Bit packing")."""
    if bits == 1.5:
        return 5, 1
    if bits == 3:
        return 8, 3
    return 8 // int(bits), 1


@functools.lru_cache(maxsize=1024)  # pure; asked for every layer of every eager step
def unsupported_reason(*, kind: str, bits: float, group_size: int, axis: str, head_dim: int,
                       kv_dtype: torch.dtype, meta_dtype: torch.dtype, has_rope: bool) -> str | None:
    """Why the write kernel cannot run this layout (None: it can). The caller falls back to the reference."""
    if has_rope and (axis == "channel" or (kind in ("affine", "nf") and bits not in (1, 2, 4, 8))):
        return (f"keys quantized before RoPE in {bits}-bit codes along the {axis} axis (the write kernel un-rotates "
                "per-token layouts of 1, 2, 4 or 8 bits, int8 and fp8)")
    if kind not in _KINDS:
        return f"quantization kind {kind!r}"
    if kind == "affine" and bits not in _AFFINE_BITS:
        return f"affine {bits}-bit codes"
    if kind == "nf" and bits not in _NF_BITS:
        return f"NF {bits}-bit codes"
    if not (_pow2(head_dim) and 8 <= head_dim <= _MAX_HEAD_DIM):
        return f"head dim {head_dim} (the write kernel takes powers of two from 8 to {_MAX_HEAD_DIM})"
    if kv_dtype not in SUPPORTED_KV_DTYPES:
        return f"K/V dtype {kv_dtype}"
    if meta_dtype not in SUPPORTED_META_DTYPES:
        return f"scale dtype {meta_dtype}"
    if axis == "channel" and not (_pow2(group_size) and group_size <= _MAX_FLUSH):
        return f"per-channel groups of {group_size} tokens (the write kernel takes powers of two up to {_MAX_FLUSH})"
    return None


@functools.lru_cache(maxsize=None)
def _reciprocal(x: float) -> float:
    """float32 ``1 / x`` (what PyTorch's CUDA division by a Python number multiplies by), as a Python float."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(x, dtype=torch.float32))


@functools.lru_cache(maxsize=None)
def _codebook(bits: int, device: str) -> torch.Tensor:
    from ..quant import nf_codebook

    return nf_codebook(bits, device=device)


# --------------------------------------------------------------------------------------------------
# Triton device functions
# --------------------------------------------------------------------------------------------------


@triton.jit
def _to_meta(x, META: tl.constexpr):
    """float32 -> the meta dtype, round to nearest even (bfloat16 by hand: the interpreter truncates)."""
    if META == 0:
        return x.to(tl.float16)
    elif META == 1:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x


@triton.jit
def _div_scalar(a, QDIV: tl.constexpr, INV: tl.constexpr, RECIP: tl.constexpr):
    """``a / QDIV`` as the reference's ``tensor / python_number`` computes it on the data's device: on CUDA,
    PyTorch multiplies by the float32 reciprocal (div_true_kernel_cuda, for CPU-scalar divisors); on CPU it
    divides (IEEE)."""
    if RECIP:
        return a * INV
    else:
        return tl.math.div_rn(a, QDIV)


@triton.jit
def _rint(v):
    """Round half to even for |v| < 2**22 (callers clamp first): exact in float32 round-to-nearest."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _e4m3_bits(v):
    """float32 (|v| <= 448) -> float8_e4m3fn bits, round to nearest even, as torch converts. By hand: the
    interpreter's conversion is wrong where rounding carries into the exponent (-127.99 gave -64)."""
    sign = (v.to(tl.int32, bitcast=True) >> 24) & 128
    a = tl.abs(v)
    ab = a.to(tl.int32, bitcast=True)
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)  # (exponent - 127 + 7) << 3 | 3 mantissa bits
    sub = _rint(a * 512.0).to(tl.int32)  # below 2**-6: multiples of 2**-9 (8 -> 0x08, the smallest normal)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.uint8)


@triton.jit
def _load_new(new_base, perm_row, rows, cols, rmask, cmask, take, snt, snd, HAS_PERM: tl.constexpr):
    """New tokens ``take + rows`` at stored channels ``cols`` (gathered through perm), in the K/V dtype."""
    if HAS_PERM:
        src = tl.load(perm_row + cols, mask=cmask, other=0)
    else:
        src = cols
    return tl.load(new_base + (take + rows)[:, None].to(tl.int64) * snt + src[None, :].to(tl.int64) * snd,
                   mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _load_pending(new_base, win_base, perm_row, rows, cols, rmask, cmask, n_w, take, snt, snd, swt, swd,
                  HAS_PERM: tl.constexpr, ring0, WB):
    """Pending tokens ``rows`` (the window's n_w tokens ++ new[take:]) at stored channels ``cols``, in the K/V
    dtype. The window is a ring: its token j at row ``(ring0 + j) % WB`` (ring0: n_quant). Window rows are stored
    in perm order already; new rows are gathered through perm."""
    from_win = rows < n_w
    wrow = (ring0 + rows) % WB
    xw = tl.load(win_base + wrow[:, None].to(tl.int64) * swt + cols[None, :].to(tl.int64) * swd,
                 mask=(rmask & from_win)[:, None] & cmask[None, :], other=0.0)
    xn = _load_new(new_base, perm_row, rows - n_w, cols, rmask & (rows >= n_w), cmask, take, snt, snd, HAS_PERM)
    return tl.where(from_win[:, None], xw, xn)


@triton.jit
def _new_tile(xn0, fast, new_base, perm_row, rows, cols, rmask, cmask, take, snt, snd, HAS_PERM: tl.constexpr,
              PRELOAD: tl.constexpr):
    """New rows ``take + rows`` (the per-token layouts quantize each token on entry), or with PRELOAD in the common
    step (``fast``: no new row went to the sink and the first tile is rows 0 .. BT - 1) the tile loaded before the
    counts."""
    if PRELOAD:
        if fast:
            x = xn0
        else:
            x = _load_new(new_base, perm_row, rows, cols, rmask, cmask, take, snt, snd, HAS_PERM)
    else:
        x = _load_new(new_base, perm_row, rows, cols, rmask, cmask, take, snt, snd, HAS_PERM)
    return x


@triton.jit
def _unrotate(x, xp, o, wf, pos, RD: tl.constexpr):
    """Undo RoPE at positions ``pos`` [R] on a float32 tile ``x`` [R, C] whose column j holds original channel
    ``o[j]``; ``xp`` holds the rotate-half partners, ``wf`` the inverse frequency of each column. The reference's
    float32 arithmetic (kvcompile.cache.packed.rotate with inverse=True): x cos + partner sin below RD / 2,
    x cos - partner sin from RD / 2 to RD, each product rounded (the launch disables FMA contraction)."""
    HALF: tl.constexpr = RD // 2
    ang = pos.to(tl.float32)[:, None] * wf[None, :]
    t1 = x * tl.cos(ang)
    t2 = xp * tl.sin(ang)
    r = tl.where((o < HALF)[None, :], t1 + t2, t1 - t2)
    return tl.where((o < RD)[None, :], r, x)


@triton.jit
def _affine_code(x, s, z, LEVELS: tl.constexpr):
    v = tl.math.div_rn(x - z, s)
    v = tl.minimum(tl.maximum(v, -1.0), LEVELS + 1.0)
    return tl.minimum(tl.maximum(_rint(v), 0.0), LEVELS * 1.0).to(tl.int32)


@triton.jit
def _nf_code(x, s, cb_ptr, BITS: tl.constexpr):
    """Nearest codebook entry to x / s; ties keep the lower index (strict <, ascending scan)."""
    y = tl.math.div_rn(x, s)
    best = tl.full(y.shape, float("inf"), tl.float32)
    idx = tl.zeros(y.shape, tl.int32)
    for i in tl.static_range(1 << BITS):
        d = tl.abs(y - tl.load(cb_ptr + i))
        better = d < best
        best = tl.where(better, d, best)
        idx = tl.where(better, i, idx)
    return idx


@triton.jit
def _store_units(codes_row_ptr, acc, rows_out, rmask, u, umask, sct, scc, NBY: tl.constexpr):
    """Store packing units ``acc`` [R, NU] (one byte, or a 24-bit word as three bytes for 3-bit codes)."""
    base = codes_row_ptr + rows_out[:, None].to(tl.int64) * sct
    m = rmask[:, None] & umask[None, :]
    if NBY == 1:
        tl.store(base + u[None, :].to(tl.int64) * scc, acc.to(tl.uint8), mask=m)
    else:
        for bb in tl.static_range(NBY):
            tl.store(base + (u * NBY + bb)[None, :].to(tl.int64) * scc, ((acc >> (8 * bb)) & 255).to(tl.uint8), mask=m)


@triton.jit
def _write_side(
    new_ptr, codes_ptr, scale_ptr, zero_ptr, sink_ptr, win_ptr, perm_ptr, counts_ptr, cb_ptr, rope_ptr,
    T, H, cap, WB, n_prog,
    snb, snh, snt, snd,
    scb, sch, sct, scc,
    smb, smh, smt, smc,
    ssb, ssh, sst, ssd,
    swb, swh, swt, swd,
    sph,
    D: tl.constexpr, S: tl.constexpr, W: tl.constexpr, F: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
    NC: tl.constexpr, NBY: tl.constexpr, NUNITS: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr,
    AXIS_CH: tl.constexpr, CLIP: tl.constexpr, EPS: tl.constexpr, META: tl.constexpr, HAS_PERM: tl.constexpr,
    QDIV: tl.constexpr, INV: tl.constexpr, RECIP: tl.constexpr, BC: tl.constexpr, NU: tl.constexpr, BT: tl.constexpr,
    PRELOAD: tl.constexpr, ARRIVE3: tl.constexpr,
    PACK_NAT: tl.constexpr, RD: tl.constexpr,
):
    """One storage's write by program (program_id(0) = b * H + h, program_id(1) = channel block)."""
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    b = pid // H
    h = pid % H

    new_base = new_ptr + b.to(tl.int64) * snb + h.to(tl.int64) * snh
    win_base = win_ptr + b.to(tl.int64) * swb + h.to(tl.int64) * swh
    perm_row = perm_ptr + h.to(tl.int64) * sph
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < D
    if HAS_PERM:
        src = tl.load(perm_row + cols, mask=cmask, other=0)
    else:
        src = cols
    if RD > 0:
        # keys quantized before RoPE (one block spans D): column j holds original channel src[j]; its rotate-half
        # partner po is original channel src +- RD / 2, stored at column ps (perm's inverse, by comparison)
        in_rot = src < RD
        po = tl.where(in_rot, tl.where(src < RD // 2, src + RD // 2, src - RD // 2), src)
        if HAS_PERM:
            dall = tl.arange(0, BC)
            pall = tl.load(perm_row + dall)
            ps = tl.sum(tl.where(pall[None, :] == po[:, None], dall[None, :], 0), 1)
        else:
            ps = po
        wf = tl.load(rope_ptr + src % (RD // 2), mask=in_rot, other=0.0)
    else:
        ps = cols
        wf = 0.0
    ENTRY: tl.constexpr = F == 1  # per-token layouts quantize every token on entry (docs/format.md)
    if PRELOAD:
        # loads that do not depend on the counts, issued before them so that their round trips overlap: the first
        # BT new rows (the common decode step quantizes them on entry and stores them into the window ring)
        r0 = tl.arange(0, BT)
        xn0 = tl.load(new_base + r0[:, None].to(tl.int64) * snt + src[None, :].to(tl.int64) * snd,
                      mask=(r0 < T)[:, None] & cmask[None, :], other=0.0)
        if RD > 0:  # the partners of those rows
            xn0p = tl.load(new_base + r0[:, None].to(tl.int64) * snt + po[None, :].to(tl.int64) * snd,
                           mask=(r0 < T)[:, None] & cmask[None, :], other=0.0)
        else:
            xn0p = 0.0
    else:
        xn0 = 0.0  # unused stand-ins
        xn0p = 0.0

    # ---- counts, read on the device; then arrive (see the module docstring)
    w4 = tl.arange(0, 4)  # the three counts words (and a masked fourth lane)
    if ARRIVE3:
        # each word's read is its own arrival, all three in one vector atomic: one round trip. (Three scalar
        # atomics are three round trips: Triton broadcasts each scalar's result through shared memory behind a
        # barrier that waits for it; H100, session 20: the g128 pair's write 4.6-4.8 -> 4.1 us.)
        olds = tl.atomic_add(counts_ptr + w4, tl.full([4], 4294967296, tl.int64), mask=w4 < 3, sem="relaxed")
        old0 = tl.sum(tl.where(w4 == 0, olds, 0), 0)
        old1 = tl.sum(tl.where(w4 == 1, olds, 0), 0)
        old2 = tl.sum(tl.where(w4 == 2, olds, 0), 0)
        n_q = (old1 & 4294967295).to(tl.int32)
        n_w = (old2 & 4294967295).to(tl.int32)
        last1 = (old1 >> 32) == n_prog - 1
        last2 = (old2 >> 32) == n_prog - 1
    else:
        n_q = tl.atomic_add(counts_ptr + 1, 0, sem="relaxed").to(tl.int32)
        n_w = tl.atomic_add(counts_ptr + 2, 0, sem="relaxed").to(tl.int32)
        old0 = tl.atomic_add(counts_ptr, 4294967296, sem="acq_rel")  # one arrival (2**32); ordered after the reads
    n_s = (old0 & 4294967295).to(tl.int32)
    arrived = old0 >> 32

    take = tl.minimum(T, S - n_s)
    rest = T - take
    pend = n_w + rest
    n_move = tl.where(rest > 0, tl.maximum(pend - W, 0) // F * F, 0)
    if ENTRY:
        # the new tokens past the sink get their codes now, at rows n_q + n_w + k; the n_move tokens that leave the
        # window have theirs already
        q0 = n_q + n_w
        n_enc = rest
    else:
        # per-channel token groups: the oldest n_move pending tokens (the window's, then new ones) are quantized
        q0 = n_q
        n_enc = n_move
    ok = q0 + n_enc <= cap  # else: write nothing, keep counts (never out of bounds)
    take = tl.where(ok, take, 0)
    n_move = tl.where(ok, n_move, 0)
    rest = tl.where(ok, rest, 0)
    n_enc = tl.where(ok, n_enc, 0)
    # the common decode step (PRELOAD): no new row goes to the sink and the rows to quantize fit one tile; then
    # the preloaded tile holds them
    fast = (take == 0) & (n_enc <= BT)

    # ---- 1. sink
    if S > 0:
        sink_base = sink_ptr + b.to(tl.int64) * ssb + h.to(tl.int64) * ssh
        for j0 in range(0, take, BT):
            rows = j0 + tl.arange(0, BT)
            rm = rows < take
            x = tl.load(new_base + rows[:, None].to(tl.int64) * snt + src[None, :].to(tl.int64) * snd,
                        mask=rm[:, None], other=0.0)
            tl.store(sink_base + (n_s + rows)[:, None].to(tl.int64) * sst + cols[None, :].to(tl.int64) * ssd, x,
                     mask=(rm & (n_s + rows < S))[:, None])

    # ---- 2. quantize into the middle's codes at q0
    codes_base = codes_ptr + b.to(tl.int64) * scb + h.to(tl.int64) * sch
    scale_base = scale_ptr + b.to(tl.int64) * smb + h.to(tl.int64) * smh
    zero_base = zero_ptr + b.to(tl.int64) * smb + h.to(tl.int64) * smh
    u = tl.arange(0, NU)
    ug = cb * NU + u  # packing unit index within the row
    umask = ug < NUNITS
    if KIND >= 2:
        # int8 / fp8: one absmax scale per token, one byte per element (BC == D)
        for i0 in range(0, n_enc, BT):
            rows = i0 + tl.arange(0, BT)
            rm = rows < n_enc
            x = _new_tile(xn0, fast & (i0 == 0), new_base, perm_row, rows, cols, rm, cmask, take, snt, snd, HAS_PERM,
                          PRELOAD).to(tl.float32)
            if RD > 0:
                xq = _new_tile(xn0p, fast & (i0 == 0), new_base, perm_row, rows, ps, rm, cmask, take, snt, snd,
                               HAS_PERM, PRELOAD).to(tl.float32)
                x = _unrotate(x, xq, src, wf, S + q0 + rows, RD)
            amax = tl.max(tl.abs(x), 1)
            s = _to_meta(tl.maximum(_div_scalar(amax, QDIV, INV, RECIP), EPS), META)
            tl.store(scale_base + (q0 + rows).to(tl.int64) * smt, s, mask=rm)
            v = tl.math.div_rn(x, s.to(tl.float32)[:, None])
            if KIND == 2:
                v = tl.minimum(tl.maximum(v, -128.0), 128.0)
                q = tl.minimum(tl.maximum(_rint(v), -127.0), 127.0).to(tl.int8).to(tl.uint8, bitcast=True)
            else:
                q = _e4m3_bits(tl.minimum(tl.maximum(v, -448.0), 448.0))
            tl.store(codes_base + (q0 + rows)[:, None].to(tl.int64) * sct + cols[None, :].to(tl.int64) * scc, q,
                     mask=rm[:, None])
    elif AXIS_CH:
        # per-channel groups of F tokens (KIVI keys): stats per channel over the group, plane by plane; the
        # window's tokens come from their ring rows
        for gi in range(0, n_move // F):
            rows = gi * F + tl.arange(0, F)
            rm = rows < n_move
            grow = n_q // F + gi
            acc = tl.zeros([F, NU], tl.int32)
            for j in tl.static_range(NC):
                c = cb * BC + u * NC + j
                cm = (c < D) & umask
                x = _load_pending(new_base, win_base, perm_row, rows, c, rm, cm, n_w, take, snt, snd, swt, swd,
                                  HAS_PERM, n_q, WB).to(tl.float32)
                mn = tl.min(x, 0) * CLIP
                mx = tl.max(x, 0) * CLIP
                s = _to_meta(tl.maximum(_div_scalar(mx - mn, QDIV, INV, RECIP), EPS), META)
                z = _to_meta(mn, META)
                tl.store(scale_base + grow.to(tl.int64) * smt + c.to(tl.int64) * smc, s, mask=cm)
                tl.store(zero_base + grow.to(tl.int64) * smt + c.to(tl.int64) * smc, z, mask=cm)
                code = _affine_code(x, s.to(tl.float32)[None, :], z.to(tl.float32)[None, :], LEVELS)
                code = tl.where(cm[None, :], code, 0)
                if BITS == 15:
                    acc += code * (3 ** j)
                else:
                    acc |= code << (BITS * j)
            _store_units(codes_base, acc, n_q + rows, rm, ug, umask, sct, scc, NBY)
    else:
        # per-token groups of G channels (affine, NF): stats on the natural tile, stored (rounded to the meta
        # dtype); then the codes plane by plane (plane j = channels NC * u + j), scale/zero read back per channel
        NGB: tl.constexpr = BC // G
        # plane element u holds channel NC u + j of the block, in group u // (G // NC) when NC divides G: the
        # stored scale / zero are broadcast to the planes in registers; otherwise read back from memory
        REG_META: tl.constexpr = G % NC == 0
        gcols = cb * NGB + tl.arange(0, NGB)
        for i0 in range(0, n_enc, BT):
            rows = i0 + tl.arange(0, BT)
            rm = rows < n_enc
            mrow = (q0 + rows).to(tl.int64)
            x = _new_tile(xn0, fast & (i0 == 0), new_base, perm_row, rows, cols, rm, cmask, take, snt, snd, HAS_PERM,
                          PRELOAD).to(tl.float32)
            if RD > 0:
                xq = _new_tile(xn0p, fast & (i0 == 0), new_base, perm_row, rows, ps, rm, cmask, take, snt, snd,
                               HAS_PERM, PRELOAD).to(tl.float32)
                x = _unrotate(x, xq, src, wf, S + q0 + rows, RD)
            xg = tl.reshape(x, [BT, NGB, G])
            if KIND == 0:
                mn = tl.min(xg, 2) * CLIP
                mx = tl.max(xg, 2) * CLIP
                s = _to_meta(tl.maximum(_div_scalar(mx - mn, QDIV, INV, RECIP), EPS), META)
                zm = _to_meta(mn, META)
                tl.store(zero_base + mrow[:, None] * smt + gcols[None, :].to(tl.int64) * smc, zm, mask=rm[:, None])
            else:
                s = _to_meta(tl.maximum(tl.max(tl.abs(xg), 2), EPS), META)
                zm = s  # unused
            tl.store(scale_base + mrow[:, None] * smt + gcols[None, :].to(tl.int64) * smc, s, mask=rm[:, None])
            if PACK_NAT:
                # codes on the natural tile, each group's scale / zero broadcast to its G channels (the stored
                # values); unit u packs channels NC u .. NC u + NC - 1, code j at bit BITS j
                s_nat = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], [BT, NGB, G]), [BT, BC])
                if KIND == 0:
                    z_nat = tl.reshape(tl.broadcast_to(zm.to(tl.float32)[:, :, None], [BT, NGB, G]), [BT, BC])
                    code = _affine_code(x, s_nat, z_nat, LEVELS)
                else:
                    code = _nf_code(x, s_nat, cb_ptr, BITS)
                code = tl.where(cmask[None, :], code, 0)
                sh = (tl.arange(0, NC) * BITS)[None, None, :]
                acc = tl.sum(tl.reshape(code, [BT, NU, NC]) << sh, 2)
                _store_units(codes_base, acc, q0 + rows, rm, ug, umask, sct, scc, NBY)
            elif REG_META:
                # [BT, NGB] -> [BT, NU]: each group's value to its G // NC plane elements (exact: the stored values)
                sp_r = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], [BT, NGB, G // NC]), [BT, NU])
                zp_r = tl.reshape(tl.broadcast_to(zm.to(tl.float32)[:, :, None], [BT, NGB, G // NC]), [BT, NU])
            else:
                tl.debug_barrier()  # scale / zero visible to every thread of the program
            if not PACK_NAT:
                acc = tl.zeros([BT, NU], tl.int32)
                for j in tl.static_range(NC):
                    c = cb * BC + u * NC + j
                    cm = (c < D) & umask
                    xp = _load_new(new_base, perm_row, rows, c, rm, cm, take, snt, snd, HAS_PERM).to(tl.float32)
                    m2 = rm[:, None] & cm[None, :]
                    gi = (c // G).to(tl.int64)
                    if REG_META:
                        sp = sp_r
                        zp = zp_r
                    else:
                        sp = tl.load(scale_base + mrow[:, None] * smt + gi[None, :] * smc, mask=m2,
                                     other=1.0).to(tl.float32)
                        if KIND == 0:
                            zp = tl.load(zero_base + mrow[:, None] * smt + gi[None, :] * smc, mask=m2, other=0.0)
                        else:
                            zp = sp  # unused
                    if KIND == 0:
                        code = _affine_code(xp, sp, zp.to(tl.float32), LEVELS)
                    else:
                        code = _nf_code(xp, sp, cb_ptr, BITS)
                    code = tl.where(cm[None, :], code, 0)
                    if BITS == 15:
                        acc += code * (3 ** j)
                    else:
                        acc |= code << (BITS * j)
                _store_units(codes_base, acc, q0 + rows, rm, ug, umask, sct, scc, NBY)

    # ---- 3. new tokens that stay in the window: pending token p (= n_w + k for new token k) at ring row
    # (n_q + p) % WB; no stored row moves. Where that row held a token leaving the window, the quantize loads above
    # read it first (per-channel groups; per-token layouts never read the window)
    if not ENTRY:
        tl.debug_barrier()
    k0 = tl.maximum(n_move - n_w, 0)
    if PRELOAD:
        if (take == 0) & (k0 == 0):  # the first BT of them were loaded before the counts
            ks = tl.arange(0, BT)
            wrow = (n_q + n_w + ks) % WB
            km = ks < rest
            tl.store(win_base + wrow[:, None].to(tl.int64) * swt + cols[None, :].to(tl.int64) * swd, xn0,
                     mask=km[:, None] & cmask[None, :])
            k0 = k0 + BT
    for kk in range(k0, rest, BT):
        ks = kk + tl.arange(0, BT)
        wrow = (n_q + n_w + ks) % WB
        km = ks < rest
        x = tl.load(new_base + (take + ks)[:, None].to(tl.int64) * snt + src[None, :].to(tl.int64) * snd,
                    mask=km[:, None] & cmask[None, :], other=0.0)
        tl.store(win_base + wrow[:, None].to(tl.int64) * swt + cols[None, :].to(tl.int64) * swd, x,
                 mask=km[:, None] & cmask[None, :])

    # ---- 5. counts: the last program to arrive writes them (and clears the arrival bits)
    last = arrived == n_prog - 1
    if not ARRIVE3:
        last1 = last
        last2 = last
    new_w = tl.where(rest > 0, pend - n_move, n_w)
    # plain stores, one vector: every other program has arrived at the word before its last arriver (the
    # arrivals' order), and this store follows that arrival's result. (Three scalar atomic exchanges cost the
    # last arriver three more round trips, as above; H100, session 20: 4.1 -> 2.4 us with the vector arrivals.)
    vals = tl.where(w4 == 0, (n_s + take).to(tl.int64),
                    tl.where(w4 == 1, (n_q + n_move).to(tl.int64), new_w.to(tl.int64)))
    # (int32 flags: the interpreter's masked store rejects a mask built by tl.where from scalar booleans)
    lw = tl.where(w4 == 0, last.to(tl.int32), tl.where(w4 == 1, last1.to(tl.int32), last2.to(tl.int32)))
    tl.store(counts_ptr + w4, vals, mask=(lw != 0) & (w4 < 3))



@triton.jit
def _quantize_write_kernel(
    new_ptr, codes_ptr, scale_ptr, zero_ptr, sink_ptr, win_ptr, perm_ptr, counts_ptr, cb_ptr, rope_ptr,
    # PAIR: a second storage of the same layout, shapes and strides (a layer's V beside its K), written by the
    # programs with program_id(2) == 1 (its own counts and arrivals)
    new2_ptr, codes2_ptr, scale2_ptr, zero2_ptr, sink2_ptr, win2_ptr, perm2_ptr, counts2_ptr, rope2_ptr,
    T, H, cap, WB, n_prog,
    snb, snh, snt, snd,
    scb, sch, sct, scc,
    smb, smh, smt, smc,
    ssb, ssh, sst, ssd,
    swb, swh, swt, swd,
    sph,
    D: tl.constexpr, S: tl.constexpr, W: tl.constexpr, F: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
    NC: tl.constexpr, NBY: tl.constexpr, NUNITS: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr,
    AXIS_CH: tl.constexpr, CLIP: tl.constexpr, EPS: tl.constexpr, META: tl.constexpr, HAS_PERM: tl.constexpr,
    QDIV: tl.constexpr, INV: tl.constexpr, RECIP: tl.constexpr, BC: tl.constexpr, NU: tl.constexpr, BT: tl.constexpr,
    PRELOAD: tl.constexpr, ARRIVE3: tl.constexpr,
    PACK_NAT: tl.constexpr, RD: tl.constexpr,
    PAIR: tl.constexpr = False,
):
    if PAIR:
        if tl.program_id(2) == 1:
            new_ptr = new2_ptr
            codes_ptr = codes2_ptr
            scale_ptr = scale2_ptr
            zero_ptr = zero2_ptr
            sink_ptr = sink2_ptr
            win_ptr = win2_ptr
            perm_ptr = perm2_ptr
            counts_ptr = counts2_ptr
            rope_ptr = rope2_ptr
    _write_side(
        new_ptr, codes_ptr, scale_ptr, zero_ptr, sink_ptr, win_ptr, perm_ptr, counts_ptr, cb_ptr, rope_ptr, T, H, cap,
        WB,
        n_prog, snb, snh, snt, snd, scb, sch, sct, scc, smb, smh, smt, smc, ssb, ssh, sst, ssd, swb, swh, swt,
        swd, sph, D, S, W, F, KIND, BITS, NC, NBY, NUNITS, LEVELS, G, AXIS_CH, CLIP, EPS, META, HAS_PERM, QDIV,
        INV, RECIP, BC, NU, BT, PRELOAD, ARRIVE3, PACK_NAT, RD)


@triton.jit
def _quantize_write_mixed_kernel(
    # two storages of different layouts (KIVI: keys per channel, values per token; SKVQ: ternary values), each
    # with its own pointers, strides and constexprs (suffix 2: the storage of program_id(2) == 1); one grid
    new_ptr, codes_ptr, scale_ptr, zero_ptr, sink_ptr, win_ptr, perm_ptr, counts_ptr, cb_ptr, rope_ptr,
    T, H, cap, WB, n_prog,
    snb, snh, snt, snd,
    scb, sch, sct, scc,
    smb, smh, smt, smc,
    ssb, ssh, sst, ssd,
    swb, swh, swt, swd,
    sph,
    new2_ptr, codes2_ptr, scale2_ptr, zero2_ptr, sink2_ptr, win2_ptr, perm2_ptr, counts2_ptr, cb2_ptr, rope2_ptr,
    T2, H2, cap2, WB2, n_prog2,
    snb2, snh2, snt2, snd2,
    scb2, sch2, sct2, scc2,
    smb2, smh2, smt2, smc2,
    ssb2, ssh2, sst2, ssd2,
    swb2, swh2, swt2, swd2,
    sph2,
    D: tl.constexpr, S: tl.constexpr, W: tl.constexpr, F: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
    NC: tl.constexpr, NBY: tl.constexpr, NUNITS: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr,
    AXIS_CH: tl.constexpr, CLIP: tl.constexpr, EPS: tl.constexpr, META: tl.constexpr, HAS_PERM: tl.constexpr,
    QDIV: tl.constexpr, INV: tl.constexpr, RECIP: tl.constexpr, BC: tl.constexpr, NU: tl.constexpr, BT: tl.constexpr,
    PRELOAD: tl.constexpr, ARRIVE3: tl.constexpr,
    PACK_NAT: tl.constexpr, RD: tl.constexpr,
    D2: tl.constexpr, S2: tl.constexpr, W2: tl.constexpr, F2: tl.constexpr, KIND2: tl.constexpr, BITS2: tl.constexpr,
    NC2: tl.constexpr, NBY2: tl.constexpr, NUNITS2: tl.constexpr, LEVELS2: tl.constexpr, G2: tl.constexpr,
    AXIS_CH2: tl.constexpr, CLIP2: tl.constexpr, EPS2: tl.constexpr, META2: tl.constexpr, HAS_PERM2: tl.constexpr,
    QDIV2: tl.constexpr, INV2: tl.constexpr, RECIP2: tl.constexpr, BC2: tl.constexpr, NU2: tl.constexpr,
    BT2: tl.constexpr, PRELOAD2: tl.constexpr,
    ARRIVE32: tl.constexpr, PACK_NAT2: tl.constexpr, RD2: tl.constexpr,
):
    if tl.program_id(2) == 1:
        _write_side(
            new2_ptr, codes2_ptr, scale2_ptr, zero2_ptr, sink2_ptr, win2_ptr, perm2_ptr, counts2_ptr, cb2_ptr, rope2_ptr, T2,
            H2, cap2, WB2, n_prog2, snb2, snh2, snt2, snd2, scb2, sch2, sct2, scc2, smb2, smh2, smt2, smc2, ssb2,
            ssh2, sst2, ssd2, swb2, swh2, swt2, swd2, sph2, D2, S2, W2, F2, KIND2, BITS2, NC2, NBY2, NUNITS2,
            LEVELS2, G2, AXIS_CH2, CLIP2, EPS2, META2, HAS_PERM2, QDIV2, INV2, RECIP2, BC2, NU2, BT2, PRELOAD2,
            ARRIVE32, PACK_NAT2, RD2)
    else:
        _write_side(
            new_ptr, codes_ptr, scale_ptr, zero_ptr, sink_ptr, win_ptr, perm_ptr, counts_ptr, cb_ptr, rope_ptr, T, H,
            cap, WB, n_prog, snb, snh, snt, snd, scb, sch, sct, scc, smb, smh, smt, smc, ssb, ssh, sst, ssd, swb, swh, swt,
            swd, sph, D, S, W, F, KIND, BITS, NC, NBY, NUNITS, LEVELS, G, AXIS_CH, CLIP, EPS, META, HAS_PERM, QDIV,
            INV, RECIP, BC, NU, BT, PRELOAD, ARRIVE3, PACK_NAT, RD)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


_PAIR_KEYS = ("new", "codes", "scale", "zero", "sink", "window", "perm", "counts")


def pair_compatible(first: dict, second: dict) -> str | None:
    """Why two storages cannot share one write launch (None: they can): every tensor of ``second`` (keys
    ``new, codes, scale, zero, sink, window, perm, counts``) must match ``first``'s in presence, shape, dtype,
    strides and device (the kernel takes one set of strides); the layout arguments are the call's."""
    if set(second) != set(_PAIR_KEYS):
        return f"the pair needs exactly the keys {_PAIR_KEYS}, got {sorted(second)}"
    for k in _PAIR_KEYS:
        a, b = first[k], second[k]
        if (a is None) != (b is None):
            return f"{k} is None in one storage only"
        if a is None:
            continue
        if k == "new":  # converted to the K/V dtype like the first's
            if a.shape != b.shape or a.stride() != b.stride() or a.device != b.device:
                return f"new tokens {tuple(a.shape)} / {a.stride()} vs {tuple(b.shape)} / {b.stride()}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or (a.numel() and a.stride() != b.stride()):
            return (f"{k}: {a.dtype} {tuple(a.shape)} strides {a.stride()} vs {b.dtype} {tuple(b.shape)} strides "
                    f"{b.stride()}")
    return None


def _blocking(kind: str, bits: float, group: int, axis: str, d: int, whole: bool = False) -> tuple[int, int, int]:
    """(channels per program BC, packing units per program NU, units per row). ``whole``: one block spanning the
    head dim (a mixed pair whose two layouts would otherwise block differently)."""
    if kind in ("int8", "fp8"):
        return d, d, d
    nc, _ = _unit(bits)
    nunits = -(-d // nc)
    if not _pow2(nc) or whole:  # ternary: 5 codes per byte straddle groups; one block spans the head dim
        return d, _next_pow2(nunits), nunits
    base = min(d, 32)
    bc = max(nc, base) if axis == "channel" else max(group, nc, base)
    bc = min(bc, max(d, nc))
    if bc < nc or d % bc:
        return d, _next_pow2(nunits), nunits
    return bc, bc // nc, nunits


# a pair's own layout arguments (no tensor: a plan key must compare without tensor equality)
_LAYOUT_SCALARS = ("kind", "bits", "group_size", "axis", "clip_ratio", "n_sink", "window_size")


def quantize_write(
    *,
    new: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    sink: torch.Tensor,
    window: torch.Tensor,
    perm: torch.Tensor | None,
    counts: torch.Tensor,
    kind: str,
    bits: float,
    group_size: int,
    axis: str,
    clip_ratio: float,
    n_sink: int,
    window_size: int,
    block_t: int | None = None,
    num_warps: int | None = None,
    scalar_division: str | None = None,
    pair: dict | None = None,
    rope: torch.Tensor | None = None,
    preload: bool = True,
    parallel_arrivals: bool = True,
    pack_natural: bool = True,
) -> bool:
    """Append ``new`` [B, H, T, D] to the packed storage in place (``PackedKV.append`` on plain tensors).

    ``codes`` [B, H, cap, bytes per token] uint8; ``scale`` / ``zero`` ``[B, H, cap, D // group]`` (per-token
    groups), ``[B, H, cap // group_size, D]`` (``axis="channel"``) or ``[B, H, cap, 1]`` (int8 / fp8, no zero);
    ``sink`` [B, H, n_sink, D] and ``window`` [B, H, >= window_size + flush - 1, D] in the K/V dtype; ``perm``
    [H, D] int64 or None; ``counts`` int64 [3] (read and written on the device). ``group_size`` is the
    scheme's (0 or None: one group spanning D). No host synchronisation; the launch never writes out of bounds
    (an append past capacity leaves everything as it was).

    ``rope``: float32 [rotary_dim / 2], the inverse frequencies of keys quantized before RoPE (PackedKV's
    ``rope``); the rows to quantize are un-rotated by their positions first (per-token layouts of 1, 2, 4 or 8
    bits, int8, fp8).

    ``pair``: a second storage written by the same launch (a layer's V beside its K: one launch per layer and
    step), a dict of ``new, codes, scale, zero, sink, window, perm, counts`` (its own ``counts``) and optionally
    its own layout (``kind, bits, group_size, axis, clip_ratio, n_sink, window_size``, the first's where absent;
    ``rope``, None where absent).
    ``new`` must have the first's shape. With the first's layout, shapes, dtypes and strides (``pair_compatible``)
    the second storage's pointers ride on the first's arguments; otherwise (KIVI's per-channel keys beside
    per-token values, SKVQ's ternary values, other strides) each side has its own arguments and constexprs in one
    kernel (``_quantize_write_mixed_kernel``), and two layouts that block the channels differently both take one
    block spanning the head dim.

    Variants (constexprs of the one kernel; the defaults are the measured best, the others stay for the
    benchmark's comparison and the tests): ``preload`` issues the loads that do not depend on the counts (the
    first new and window rows, the window for its shift) before reading them; ``parallel_arrivals`` reads each
    counts word with its own arrival (one atomic round trip instead of two); ``pack_natural`` computes per-token
    group codes on the natural tile and packs them by a reshape instead of loading each code plane again.

    Returns whether a pair shared the first's layout (one set of arguments; True without a pair). The checks and
    decisions run once per layout and storage (a plan, kvcompile/kernels/launch.py); a later call with the same
    storage tensors only fills in its new tokens.
    """
    storage = (codes, scale, zero, sink, window, perm, counts, rope)
    news = (new,)
    scalars = (kind, bits, group_size, axis, clip_ratio, n_sink, window_size, block_t, num_warps, scalar_division,
               preload, parallel_arrivals, pack_natural)
    key = None
    try:
        if pair is not None:
            storage += tuple(pair[k] for k in _PAIR_KEYS[1:]) + (pair.get("rope"),)
            news += (pair["new"],)
            scalars += (tuple(pair),) + tuple(pair.get(k) for k in _LAYOUT_SCALARS)  # its rope: in storage
        key = PlanCache.key(news, storage, scalars)
    except (AttributeError, TypeError, KeyError):  # the plan's checks say what is wrong
        key = None
    else:
        plan = _WRITE_PLANS.get(key, storage)
        if plan is not None:
            plan(news, storage)
            return plan.same
    # Not cached (or a layout / storage not seen yet): the checks and decisions, then the plan, run once and kept.
    if new.dim() != 4:
        _fail(f"new must be 4-d [B, H, T, D], got {tuple(new.shape)}")
    first = dict(new=new, codes=codes, scale=scale, zero=zero, sink=sink, window=window, perm=perm, counts=counts)
    layout = dict(kind=kind, bits=bits, group_size=group_size, axis=axis, clip_ratio=clip_ratio, n_sink=n_sink,
                  window_size=window_size, rope=rope)
    tuning = dict(block_t=block_t, scalar_division=scalar_division, preload=preload,
                  parallel_arrivals=parallel_arrivals, pack_natural=pack_natural)
    second = None
    if pair is not None:
        pair = dict(pair)
        layout2 = {k: pair.pop(k, None if k == "rope" else v) for k, v in layout.items()}  # values: no RoPE
        if set(pair) != set(_PAIR_KEYS):
            _fail(f"pair needs the keys {_PAIR_KEYS} (and optionally its layout: {tuple(layout)}), got {sorted(pair)}")
        if tuple(pair["new"].shape) != tuple(new.shape) or pair["new"].device != new.device:
            _fail(f"pair: new tokens {tuple(pair['new'].shape)} on {pair['new'].device} vs {tuple(new.shape)} on "
                  f"{new.device}; write the two storages with two calls")
        same = (rope is None and layout2["rope"] is None
                and all(layout2[k] == layout[k] for k in layout if k != "rope") and pair_compatible(first, pair) is None)
        second = (pair, layout2, same)
    # the call's tensors: its new tokens and storages, then what each call derives from them (_WritePlan.derive)
    nf2 = second is not None and second[1]["kind"] == "nf"
    plan = _WritePlan(window.dtype, None if second is None else second[0]["window"].dtype, kind == "nf", nf2,
                      int(bits) if kind == "nf" else 0, int(second[1]["bits"]) if nf2 else 0)
    plan.same = second is None or second[2]
    _prepare(first, layout, tuning)  # the checks, before anything is derived from the tensors
    if second is not None and not second[2]:
        _prepare(second[0], second[1], tuning)
    derived = plan.derive(news, storage)
    sources = (*news, *storage, *derived)
    stable = range(len(news), len(news) + len(storage))  # the storage: the same tensors in every call of the plan
    a = _prepare(first, layout, tuning, derived=derived[0:3])
    if second is not None and not second[2]:
        b = _prepare(second[0], second[1], tuning, derived=derived[3:6])
        if b["ncb"] != a["ncb"]:  # one grid: both sides in one block spanning the head dim
            a = _prepare(first, layout, tuning, whole=True, derived=derived[0:3])
            b = _prepare(second[0], second[1], tuning, whole=True, derived=derived[3:6])
    if new.shape[2] == 0:  # nothing to launch (plan.launch stays None)
        if key is not None:
            _WRITE_PLANS.put(key, storage, plan)
        return plan.same
    B, H, T, D = new.shape
    if num_warps is None:
        num_warps = a["num_warps"] if second is None or second[2] else max(a["num_warps"], b["num_warps"])
    grid = (B * H, a["ncb"], 1 if second is None else 2)
    if second is None or second[2]:
        # one storage, or a pair of one layout: the second's pointers only (same strides and constexprs)
        if second is None:
            b_ptrs = a["ptrs"][:8] + a["ptrs"][9:]
        else:  # pair_compatible checked shapes, dtypes and strides against the first's (validated) tensors
            p2 = second[0]
            b_ptrs = [derived[3], p2["codes"], p2["scale"], p2["zero"] if p2["zero"] is not None else p2["scale"],
                      p2["sink"], p2["window"], p2["perm"] if p2["perm"] is not None else p2["counts"], p2["counts"],
                      p2["counts"]]  # derived[3]: its new tokens in the K/V dtype; no RoPE (a stand-in)
        plan.launch = Launch(_quantize_write_kernel, grid, (*a["ptrs"], *b_ptrs, *a["rt"], *a["strides"]),
                             dict(**a["consts"], PAIR=second is not None, num_warps=num_warps, enable_fp_fusion=False),
                             sources, stable=stable)
    else:
        consts2 = {k + "2": v for k, v in b["consts"].items()}
        plan.launch = Launch(_quantize_write_mixed_kernel, grid,
                             (*a["ptrs"], *a["rt"], *a["strides"], *b["ptrs"], *b["rt"], *b["strides"]),
                             dict(**a["consts"], **consts2, num_warps=num_warps, enable_fp_fusion=False), sources,
                             stable=stable)
    plan.launch(sources)
    if key is not None:
        _WRITE_PLANS.put(key, storage, plan)
    return plan.same


class _WritePlan:
    """A ``quantize_write`` layout's launch (None: nothing to write) and what each call derives from its tensors;
    ``same``: a pair shares the first's layout."""

    __slots__ = ("kv_dtypes", "nf", "bits", "same", "launch")

    def __init__(self, kv_dtype, kv_dtype2, nf, nf2, bits, bits2):
        self.kv_dtypes, self.nf, self.bits = (kv_dtype, kv_dtype2), (nf, nf2), (bits, bits2)
        self.same, self.launch = True, None

    def derive(self, news: tuple, storage: tuple) -> tuple:
        """Per side: the new tokens in the storage's K/V dtype (as PackedKV.append's ``x.to(kv_dtype)``; a device
        op, no sync), ``counts`` as [3], the NF codebook (``counts`` where the layout has none)."""
        out = []
        for side, new in enumerate(news):
            counts = storage[8 * side + 6].view(3)
            dtype = self.kv_dtypes[side]
            out += [new if new.dtype == dtype or not new.shape[2] else new.to(dtype), counts,
                    _codebook(self.bits[side], str(new.device)) if self.nf[side] else counts]
        return tuple(out)

    def __call__(self, news: tuple, storage: tuple) -> None:
        if self.launch is not None:
            self.launch((*news, *storage, *self.derive(news, storage)))


def _prepare(t: dict, layout: dict, tuning: dict, whole: bool = False, derived: tuple | None = None) -> dict:
    """Validate one storage (``t``: the ``_PAIR_KEYS`` tensors) and build its kernel arguments: ``ptrs`` (10),
    ``rt`` (T, H, cap, WB, n_prog), ``strides`` (21), ``consts`` (the constexprs of ``_write_side``), ``ncb``
    (channel blocks) and the default ``num_warps``."""
    new, codes, scale, zero, sink, window, perm, counts = (t[k] for k in _PAIR_KEYS)
    kind, bits, group_size, axis = layout["kind"], layout["bits"], layout["group_size"], layout["axis"]
    clip_ratio, n_sink, window_size = layout["clip_ratio"], layout["n_sink"], layout["window_size"]
    rope = layout["rope"]
    if new.dim() != 4 or sink.dim() != 4 or window.dim() != 4 or codes.dim() != 4:
        _fail(f"new, codes, sink and window must be 4-d, got {tuple(new.shape)}, {tuple(codes.shape)}, "
              f"{tuple(sink.shape)}, {tuple(window.shape)}")
    B, H, T, D = new.shape
    kv_dtype = window.dtype
    meta = scale.dtype
    reason = unsupported_reason(kind=kind, bits=bits, group_size=group_size or 0, axis=axis, head_dim=D,
                                kv_dtype=kv_dtype, meta_dtype=meta, has_rope=rope is not None)
    if reason is not None:
        _fail(f"unsupported layout: {reason}; use PackedKV.append (the reference) for it")
    flush = group_size if axis == "channel" else 1
    g = D if (not group_size or axis == "channel" or kind in ("int8", "fp8")) else group_size
    if D % g:
        _fail(f"group_size={g} must divide the head dim {D}")
    cap = codes.shape[2]
    nc, nby = _unit(bits) if kind in ("affine", "nf") else (1, 1)
    nbytes = -(-D // nc) * nby
    if tuple(codes.shape) != (B, H, cap, nbytes) or codes.dtype != torch.uint8:
        _fail(f"codes must be uint8 {(B, H, cap, nbytes)}, got {codes.dtype} {tuple(codes.shape)}")
    if kind in ("int8", "fp8"):
        want_meta = (B, H, cap, 1)
    elif axis == "channel":
        if cap % flush:
            _fail(f"capacity {cap} must be a multiple of the token group {flush}")
        want_meta = (B, H, cap // flush, D)
    else:
        want_meta = (B, H, cap, D // g)
    if tuple(scale.shape) != want_meta:
        _fail(f"scale must be {want_meta}, got {tuple(scale.shape)}")
    has_zero = kind == "affine"
    if has_zero:
        if zero is None or tuple(zero.shape) != want_meta or zero.dtype != meta or zero.stride() != scale.stride():
            _fail(f"affine layouts need zero shaped, typed and strided like scale {want_meta}, got "
                  f"{None if zero is None else (zero.dtype, tuple(zero.shape), zero.stride())}")
    if tuple(sink.shape) != (B, H, n_sink, D) or sink.dtype != kv_dtype:
        _fail(f"sink must be {kv_dtype} {(B, H, n_sink, D)}, got {sink.dtype} {tuple(sink.shape)}")
    WB = window.shape[2]
    if tuple(window.shape[:2]) != (B, H) or window.shape[3] != D or WB < window_size + flush - 1:
        _fail(f"window must be [B={B}, H={H}, >= {window_size + flush - 1}, D={D}], got {tuple(window.shape)}")
    if counts.dtype != torch.int64 or counts.numel() != 3:
        _fail(f"counts must be int64 [3], got {counts.dtype} {tuple(counts.shape)}")
    if perm is not None and (tuple(perm.shape) != (H, D) or perm.dtype != torch.int64):
        _fail(f"perm must be int64 [H={H}, D={D}], got {perm.dtype} {tuple(perm.shape)}")
    if rope is not None and (rope.dim() != 1 or rope.dtype != torch.float32 or not 1 <= rope.numel() <= D // 2
                             or rope.device != new.device):
        _fail(f"rope must be the float32 inverse frequencies [rotary_dim / 2 <= {D // 2}] on {new.device}, got "
              f"{rope.dtype} {tuple(rope.shape)} on {rope.device}")
    dev = new.device
    for x in (codes, scale, sink, window, counts) + ((zero,) if zero is not None else ()) + \
            ((perm,) if perm is not None else ()):
        if x.device != dev:
            _fail(f"all tensors must be on new's device {dev}, found one on {x.device}")
    if not counts.is_contiguous():
        _fail("counts must be contiguous")
    # (new in the K/V dtype, counts as [3], the NF codebook or a stand-in): _WritePlan.derive; None: checks only
    new, counts, cb = (new, counts, counts) if derived is None else derived

    bc, nu, nunits = _blocking(kind, bits, g, axis, D, whole or rope is not None)  # RoPE pairs span the head
    ncb = D // bc if bc <= D else 1
    levels = 2 if bits == 1.5 else ((1 << int(bits)) - 1 if kind in ("affine", "nf") else 127)
    # The reference divides by the level count (int8: 127, fp8: 448) with ``tensor / python_number``, which
    # PyTorch computes as a multiplication by the float32 reciprocal on CUDA and as a division on CPU; the
    # kernel follows the reference of the data's device (bit-identical there; the two references can differ
    # by one float32 ulp before the scale is rounded to the meta dtype, visible with clip ratios < 1).
    scalar_division = tuning["scalar_division"]
    if scalar_division is None:
        scalar_division = "reciprocal" if dev.type == "cuda" else "ieee"
    if scalar_division not in ("reciprocal", "ieee"):
        _fail(f"scalar_division must be 'reciprocal' or 'ieee', got {scalar_division!r}")
    qdiv = float(levels if kind in ("affine", "nf") else (127 if kind == "int8" else 448))
    # a decode step (T = 1) is a chain of dependent latencies: the smallest token tile and 4 warps measured
    # fastest (H100, bench_write.py variants: 6.2 against 6.8 us for a g128 pair with its window)
    block_t = tuning["block_t"]
    if block_t is None:
        block_t = min(16, _next_pow2(T))
    consts = dict(
        D=D, S=n_sink, W=window_size, F=flush,
        KIND=_KINDS[kind], BITS=15 if bits == 1.5 else int(bits), NC=nc, NBY=nby, NUNITS=nunits,
        LEVELS=levels, G=g, AXIS_CH=axis == "channel" and kind == "affine", CLIP=float(clip_ratio),
        EPS=float(torch.finfo(meta).tiny), META=_META_CODE[meta], HAS_PERM=perm is not None,
        QDIV=qdiv, INV=_reciprocal(qdiv), RECIP=scalar_division == "reciprocal",
        BC=bc, NU=nu, BT=block_t,
        PRELOAD=bool(tuning["preload"]), ARRIVE3=bool(tuning["parallel_arrivals"]),
        # RoPE is undone on the natural tile, so it always packs from there
        PACK_NAT=(bool(tuning["pack_natural"]) or rope is not None) and _pow2(nc) and nu * nc == bc
        and kind in ("affine", "nf") and axis == "token",
        RD=0 if rope is None else 2 * rope.numel(),
    )
    return dict(
        ptrs=[new, codes, scale, zero if zero is not None else scale, sink, window,
              perm if perm is not None else counts, counts, cb, rope if rope is not None else counts],
        rt=[T, H, cap, max(WB, 1), B * H * ncb],  # WB: the window ring's modulus
        strides=[*new.stride(), *codes.stride(), *scale.stride(), *(sink.stride() if sink.numel() else (0, 0, 0, 0)),
                 *window.stride(), perm.stride(0) if perm is not None else 0],
        consts=consts, ncb=ncb,
        # one warp for a decode step's one-token tile (its row's reductions stay in the warp; H100, session 19:
        # 4.85 against 4.98 us for the g128 pair, 4.60 against 5.10 for KIVI's); keys before RoPE keep 4 (their
        # partner search is a [D, D] tile)
        num_warps=(1 if rope is None else 4) if T == 1 else (4 if T <= 16 else 8),
    )


_WRITE_PLANS = PlanCache()
