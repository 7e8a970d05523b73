"""Split-K decode attention over 2- or 4-bit packed KV, written in Gluon (Triton's explicit-layout layer).

The Triton kernel (``decode_attention.py``) lets the compiler pick register layouts; it stages the code tiles
through shared memory and ldmatrix, and the V operand (consecutive tokens per register) through byte gathers
(NOTES.md lever 7). Here every layout is chosen by hand so that the code words go from global memory straight into
the registers of the MMA operands, with nothing in shared memory (in the register form; the TMA ring below stages the
raw tiles in shared memory and reads them into the same registers):

- **K** (the B operand of S = q . K^T, k = channel, n = token): a thread of the m16n8k16 MMA holds, per token,
  the k indices ``16 s + 8 h + 2 c + e`` (c = lane % 4). Each thread loads ``bits`` contiguous words of a token
  (8 or 16 bytes, one vector load) and the tensor is *relabelled* (reshape / permute: no data movement) so that
  k runs over exactly those bytes: k ``16 s + 8 h + 2 c + e`` is byte ``4 bits c + 4 s + 2 h + e``. q is loaded in
  the same permuted channel order, so q . k is unchanged. Two PRMTs per word put each byte under an fp16 lane, one
  LOP3 per two codes keeps a plane's bits in place.
- **V** (the B operand of O = P . V, k = token, n = channel): a register must hold two consecutive tokens of one
  channel. A thread loads the words of an even and an odd token; one PRMT per two bytes pairs them.
- **Token order**: the S tile's column n = ``e + 2 c + 8 t`` is token ``e + 2 t + 16 c`` of the tile, so the 16
  columns a thread holds are 16 consecutive tokens and the per-token scales and zeros load as two 16-byte vectors
  (read as int32 pairs of fp16, split in registers). K and V are loaded in that token order.
- Codes are read as fp16 **subnormals** (the code bits alone: ``2**-24 * 2**(bits * j) * code``, exact; the
  tensor cores keep fp16 subnormals, decode_attention's v26): no offset to subtract on either side. The power-of-two
  factors are folded into q's planes (K) and into the output planes (V).
- The next tile's words, scales and zeros are loaded before the current tile is computed (registers, one tile
  ahead). Full tiles run without masks; the last, partial tile of a split runs a masked copy of the tile body.
- Residency and L2 (NOTES.md v29, :func:`occupancy`): the one-query-row 2-bit build is capped at 168 registers so that
  12 programs run per SM (3 per sub-partition); the 4-bit builds, whose V words are not loaded a tile ahead, prefetch
  the tile after the next into L2 (one bulk prefetch per stream).
- TMA ring (tokens-on-M form, the default where the storage allows, NOTES.md v31): each 64-token tile's code rows
  and scale / zero rows come by six bulk tensor copies (TMA) into a two-stage shared-memory ring with one mbarrier per
  stage, and are read from there into the same registers the global loads fill (:func:`_ring_read`). The copies are
  whole 128-byte lines issued by one thread; the register form's 8- and 4-byte loads made about one L2 request per
  32-byte sector and their latency showed as the main stall (NOTES.md v30). The merge is then a programmatic
  dependent launch.
- The running maximum is updated lazily (only when some row's maximum grew by more than 8, in log2 units), so most
  tiles skip the accumulator rescale.

- Two forms. For up to 8 query heads per KV head (the default there, NOTES.md v28) the tokens sit on the MMA's M
  side: S^T = K q^T over [64 tokens, 8 rows], O^T = V^T P^T, with P^T made from S^T's accumulator by one movmatrix
  (an 8 x 8 transpose across the warp) per block: half the MMAs and half the softmax elements of the other form, the
  query heads on the M side (S = q K^T over [16 rows, 64 tokens], v27; up to 16 heads). The token order then differs
  (row m = g + 8 r is token 8 g + r) and so do the operands' relabellings; the loop, the loads and the unpack are
  shared.
- Sink and window tokens (full precision, the window possibly a ring) go to one extra program per (batch, KV head),
  the last split: plain MMAs over the natural channel order in the model's dtype, 16-token tiles.
- Ragged batches (per-row device lengths, decode_attention's ``balance``): a KV head's packed-middle programs are
  shared out over the rows by their work, the same partition as the Triton kernel's balanced split
  (:func:`_balanced_program`); the merge kernel finds a row's programs the same way.
- A bf16 model's q is rounded to fp16 for the packed products (as the Triton kernel does where scales are fp16).

Layouts taken: per-token affine groups of the whole head (G == D == 128), 2 or 4 bits for K and for V (each its own width),
fp16 scales and zeros, an fp16 or bf16 model, one new token (Nq == 1), up to 16 query heads per KV head, K and V
packed as far (no ``v_lengths``), host or device lengths, an even capacity. decode_attention routes those here
(``gluon=``); everything else runs the Triton kernel. The split partials go through decode_attention's merge kernel.

Gluon kernels do not run under the Triton interpreter: on CPU only their compilation for sm_90 is tested
(tests/test_kernels_gluon.py); on the GPU the same tests compare them with the float32 reference.
"""

from __future__ import annotations

import torch

try:  # Triton >= 3.5 ships Gluon; without it decode_attention keeps the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    HAVE_GLUON = True
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # (gl.barrier from Triton 3.7 on)
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False
try:  # Hopper's bulk tensor copies (TMA) with mbarriers, for the shared-memory ring (``tma_stages``)
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # the bulk tensor copy into shared memory: async_load from Triton 3.7 on, async_copy_global_to_shared before
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_TMA = HAVE_GLUON
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_TMA = False

__all__ = ["HAVE_GLUON", "gluon_unsupported_reason", "storage_unsupported_reason", "launch_args"]

BLOCK_N = 64  # tokens per tile (the token relabelling below is written for 64)
TOKM_MAX_ROWS = 8  # query rows per KV head the tokens-on-M form takes (its MMA's N side)
# ptxas's own choice for the tokens-on-M builds was 168 registers with a spill in the packed loop (R = 8 with device
# lengths; 48 bytes in the sink / window program); with the cap stated it takes 173-198 and spills nothing (the 16-row
# form keeps ptxas's choice: with the cap its loop grew 1044 -> 1081 instructions)
MAXNREG = 255
# Residency: an H100 SM's four sub-partitions hold 16384 registers each, so a one-warp build of 169-255 registers runs
# 2 programs per sub-partition (8 per SM) and one of at most 168 runs 3 (12 per SM). The one-query-row (MHA) 2-bit
# tokens-on-M build fits 168 without a spill (154-158 registers) and ran 6-7% faster at 12 per SM (NOTES.md v29); the
# GQA builds at 168 lengthened their loop or spilled and ran no faster, the sink / window build spilled in its loop.
OCC12_MAXNREG = 168


def occupancy(*, r: int, bits: int, has_fp: bool, tokens_on_m: bool, v_bits: int | None = None
              ) -> tuple[int | None, int, int]:
    """A build's (register cap, None for ptxas's choice; programs per SM its splits are sized for; L2 prefetch
    distance in tiles, 0 for none). The 4-bit builds prefetch the tile after the next one into L2 (one bulk prefetch
    per stream, NOTES.md v29): their V words are not loaded a tile ahead into registers (they would spill), and the
    prefetch took K4V4 at 32k from 114-115 to 108 us on the H100; two tiles ahead or more ran slower (the L2 thrashes),
    the 2-bit builds (all words a tile ahead in registers already) gained nothing beyond noise. ``v_bits`` (V's, where
    they differ from K's ``bits``): 8 programs per SM, no L2 prefetch (written for one width)."""
    if v_bits not in (None, bits):
        return (MAXNREG if tokens_on_m else None), 8, 0
    if tokens_on_m and r == 1 and bits == 2 and not has_fp:
        return OCC12_MAXNREG, 12, 0
    if tokens_on_m:
        return MAXNREG, 8, (1 if bits == 4 else 0)
    return None, 8, 0


# The shared memory an H100 SM gives its programs (227 KB, less 1 KB the hardware reserves per program) and what one
# stage of the TMA ring takes: a 64-token tile's K and V code rows (W int32 words a token each) and four 128-byte scale
# / zero rows
SMEM_PER_SM = 227 * 1024
TMA_MAX_STAGES = 4
# the ring's default depth (NOTES.md v31, H100: 2 stages ran faster than 1, 3 or 4 on the rows timed)
TMA_DEFAULT_STAGES = 2
# the ring builds' softmax without a cross-lane step in the common case (_softmax_local, NOTES.md v33; the register-load
# builds keep theirs: the one-row build capped for 12 programs per SM spills with it)
LOCAL_SOFTMAX = True


def _code_block(bits: int) -> list[int]:
    """A ring copy's block of code words: a 64-token tile's words (4 * bits int32 per token) as rows of 32."""
    return [64 * 4 * bits // 32, 32]


_META_BLOCK = (1, 32)  # a ring copy's block of scales or zeros: a 64-token tile's 32 int32 pairs


def tma_stage_bytes(bits: int, v_bits: int | None = None) -> int:
    """Shared memory per ring stage: its copies' blocks (:func:`_tma_descriptors`: K's code words (``bits``), V's
    (``v_bits``, None: ``bits``), four scale / zero rows; the kernel expects their bytes from the descriptors) and its
    8-byte mbarrier."""
    kc, vc, meta = _code_block(bits), _code_block(v_bits or bits), _META_BLOCK
    return 4 * (kc[0] * kc[1] + vc[0] * vc[1] + 4 * meta[0] * meta[1]) + 8


def _local_softmax(tokens_on_m: bool, tma_stages: int) -> bool:
    """Whether a build takes the softmax without cross-lane steps (the ring builds, :data:`LOCAL_SOFTMAX`)."""
    return bool(tokens_on_m and tma_stages) and LOCAL_SOFTMAX


def tma_stages(bits: int, programs_per_sm: int, v_bits: int | None = None) -> int:
    """The most TMA ring stages (at most TMA_MAX_STAGES) that let programs_per_sm programs stay resident by shared
    memory."""
    per = SMEM_PER_SM // programs_per_sm - 1024
    return max(0, min(TMA_MAX_STAGES, per // tma_stage_bytes(bits, v_bits)))


def max_registers(programs_per_sm: int) -> int:
    """The most registers per thread at which programs_per_sm one-warp programs stay resident on an H100 SM (registers
    are allocated 8 per thread at a time; 255 at most)."""
    return min(255, 16384 * 4 // programs_per_sm // 32 // 8 * 8)


def gluon_unsupported_reason(*, D: int, r: int, NQ: int, k_bits, v_bits, k_group: int, v_group: int,
                             k_axis: str, k_format: str, v_format: str, dtype: torch.dtype, rope: bool,
                             meta_dtypes: tuple, kv_mixed: bool) -> str | None:
    """Why the Gluon kernel cannot take this layout (None: it can)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon (triton.experimental.gluon)"
    if D != 128 or k_group != D or v_group != D:
        return "the Gluon kernel takes D 128 with one group per token"
    if k_bits not in (2, 4) or v_bits not in (2, 4):
        return "the Gluon kernel takes 2- or 4-bit codes (K and V each)"
    if k_axis != "token" or k_format != "affine" or v_format != "affine" or rope:
        return "the Gluon kernel takes per-token affine codes (no per-channel keys, codebooks or RoPE)"
    if dtype not in (torch.float16, torch.bfloat16) or any(t != torch.float16 for t in meta_dtypes):
        return "the Gluon kernel takes fp16 scales and zeros (and an fp16 or bf16 model)"
    if NQ != 1 or r > 16:
        return "the Gluon kernel takes one new token and up to 16 query heads per KV head"
    if kv_mixed:
        return "the Gluon kernel takes K and V packed as far (no v_lengths)"
    return None


if HAVE_GLUON:

    @gluon.jit
    def _x4(x):
        """x four times along two new minor dims (the same registers: a pack=4 asm then sees one 32-bit word)."""
        x2 = gl.join(x, x)
        return gl.join(x2, x2)

    @gluon.jit
    def _spread_k(kw):
        """int32 words [..] -> int16 [.., 2, 2]: element (a, b) holds byte 2 a + b of the word (two PRMTs)."""
        return gl.inline_asm_elementwise(
            asm="prmt.b32 $0, $2, 0, 0x4140; prmt.b32 $1, $2, 0, 0x4342;",
            constraints="=r,=r,r,r,r,r", args=[_x4(kw)], dtype=gl.int16, is_pure=True, pack=4)

    @gluon.jit
    def _spread_v(ve, vo, HI: gl.constexpr):
        """Words of an even (ve) and an odd (vo) token -> int16 [.., 2, 2]: element (a, b) holds byte 2 HI + a of
        the token of parity b (the asm pairs the two tokens' bytes into one register; its elements are not the
        inputs' elements, the caller relabels)."""
        if HI == 0:
            r = gl.inline_asm_elementwise(
                asm="prmt.b32 $0, $2, $6, 0x4400; prmt.b32 $1, $2, $6, 0x5511;",
                constraints="=r,=r,r,r,r,r,r,r,r,r", args=[_x4(ve), _x4(vo)], dtype=gl.int16, is_pure=True,
                pack=4)
        else:
            r = gl.inline_asm_elementwise(
                asm="prmt.b32 $0, $2, $6, 0x6622; prmt.b32 $1, $2, $6, 0x7733;",
                constraints="=r,=r,r,r,r,r,r,r,r,r", args=[_x4(ve), _x4(vo)], dtype=gl.int16, is_pure=True,
                pack=4)
        return r

    @gluon.jit
    def _plane(w16, MASK: gl.constexpr):
        """int16 (a byte in the low half) -> the fp16 subnormal of plane MASK's bits in place (one LOP3 per two)."""
        return gl.inline_asm_elementwise(asm="and.b32 $0, $1, " + MASK + ";", constraints="=r,r", args=[w16],
                                         dtype=gl.float16, is_pure=True, pack=2)

    @gluon.constexpr_function
    def _mask(bits, j):
        m = ((1 << bits) - 1) << (bits * j)
        return hex(m | (m << 16))

    @gluon.constexpr_function
    def _kw_layout(bits):
        """[4 bits words, 64 tokens] int32: thread (g, c) holds words bits * c ..+bits of tokens e' + 2 t + 16 c'
        with e', c' from g (lane bits 2, 3, 4) and t from the registers."""
        regs = [[1 << i, 0] for i in range(bits.bit_length() - 1)] + [[0, 2], [0, 4], [0, 8]]
        return gl.DistributedLinearLayout(regs, [[bits, 0], [2 * bits, 0], [0, 1], [0, 16], [0, 32]], [], [],
                                          [4 * bits, 64])

    @gluon.constexpr_function
    def _vw_layout(bits):
        """[32 token pairs, 4 bits words] int32: thread (g, c) holds words bits / 2 * g ..+bits/2 of pairs
        p = h + 2 s + 8 c (h, s from the registers)."""
        nw = bits // 2
        regs = [[0, 1 << i] for i in range(nw.bit_length() - 1)] + [[1, 0], [2, 0], [4, 0]]
        return gl.DistributedLinearLayout(regs, [[8, 0], [16, 0], [0, nw], [0, 2 * nw], [0, 4 * nw]], [], [],
                                          [32, 4 * bits])

    @gluon.constexpr_function
    def _pair_layout():
        """[32 token pairs] int32: thread c holds pairs 8 c .. 8 c + 7 (tokens 16 c .. 16 c + 15)."""
        return gl.DistributedLinearLayout([[1], [2], [4]], [[8], [16], [0], [0], [0]], [], [], [32])

    @gluon.jit
    def _pair_halves(x):
        """int32 pairs of fp16 [N] -> fp16 [N, 2] (the low half first)."""
        return gl.inline_asm_elementwise(asm="mov.b32 $0, $1;", constraints="=r,r,r", args=[gl.join(x, x)],
                                         dtype=gl.float16, is_pure=True, pack=2)

    @gluon.jit
    def _k_byte(k, BITS: gl.constexpr):
        """The byte of a token that K's MMA index k = 16 s + 8 h + 2 c + e reads: 4 BITS c + 4 s + 2 h + e (each
        thread's bytes contiguous; q's planes are loaded in this order)."""
        return 4 * BITS * ((k >> 1) & 3) + 4 * (k >> 4) + 2 * ((k >> 3) & 1) + (k & 1)

    @gluon.jit
    def _meta(x, COL: gl.constexpr):
        """int32 pairs of fp16 [32 pairs] -> float32 [64] by S column (n = e + 2 c + 8 t is token e + 2 t + 16 c)."""
        hv = _pair_halves(x)  # [32, 2]: token 2 p + e
        hv = gl.permute(gl.reshape(hv, [4, 8, 2]), [1, 0, 2])  # (c, t, e) -> (t, c, e)
        return gl.convert_layout(gl.reshape(hv, [64]), COL).to(gl.float32)

    @gluon.jit
    def _k_operand(kw, BITS: gl.constexpr, B_OP: gl.constexpr):
        """int32 words [4 BITS, 64 tokens] -> int16 bytes [16 BITS k, 64 n]: k = 16 s + 8 h + 2 c + e is byte
        4 BITS c + 4 s + 2 h + e; n = e' + 2 c' + 8 t is token e' + 2 t + 16 c'."""
        x = _spread_k(kw)  # [4 BITS, 64, 2, 2]
        x = gl.reshape(x, [4, BITS, 4, 8, 2, 2, 2])  # (c, s, c', t, e', h, e)
        x = gl.permute(x, [1, 5, 0, 6, 3, 2, 4])  # (s, h, c, e, t, c', e')
        return gl.convert_layout(gl.reshape(x, [16 * BITS, 64]), B_OP)

    @gluon.jit
    def _v_operand(ve, vo, BITS: gl.constexpr, OP: gl.constexpr, TRANS: gl.constexpr):
        """int32 words of each row's pair of tokens [32 rows p, 4 BITS] -> int16 V tile with k = e + 2 c + 8 h + 16 s
        (the pair member e of row p = h + 2 s + 8 c: the S columns' token order) and n = 8 t' + g (byte t' of the
        thread's BITS / 2 words: byte 2 BITS g + t' of the token): [64 k, 16 BITS n] as the B operand of P . V, or
        with TRANS [16 BITS n, 64 k] as the A operand of V^T . P^T (the tokens-on-M form)."""
        x = gl.join(_spread_v(ve, vo, 0), _spread_v(ve, vo, 1))  # [32 p, W, 2 a, 2 b, 2 w]: member b, byte 2 w + a
        if BITS == 2:
            x = gl.reshape(x, [4, 2, 2, 2, 8, 2, 2, 2])  # (c, s1, s0, h, g, a, b, w)
            if TRANS:
                x = gl.permute(x, [7, 5, 4, 1, 2, 3, 0, 6])  # (w, a, g, s1, s0, h, c, b)
            else:
                x = gl.permute(x, [1, 2, 3, 0, 6, 7, 5, 4])  # (s1, s0, h, c, b, w, a, g)
        else:
            x = gl.reshape(x, [4, 2, 2, 2, 8, 2, 2, 2, 2])  # (c, s1, s0, h, g, wl, a, b, w)
            if TRANS:
                x = gl.permute(x, [5, 8, 6, 4, 1, 2, 3, 0, 7])  # (wl, w, a, g, s1, s0, h, c, b)
            else:
                x = gl.permute(x, [1, 2, 3, 0, 7, 5, 8, 6, 4])  # (s1, s0, h, c, b, wl, w, a, g)
        if TRANS:
            x = gl.reshape(x, [16 * BITS, 64])
        else:
            x = gl.reshape(x, [64, 16 * BITS])
        return gl.convert_layout(x, OP)

    @gluon.jit
    def _q_plane(q_row_ptr, sq_d, rmask, BITS: gl.constexpr, J: gl.constexpr, FACT: gl.constexpr,
                 A_OP: gl.constexpr):
        """q's plane J as the A operand [16, 16 BITS] in the K operand's channel order, times FACT = 2**-(BITS J)
        (exact: the K codes' values are 2**(BITS J) too large in place); sm_scale is applied to the scores."""
        PER: gl.constexpr = 8 // BITS
        k = gl.arange(0, 16 * BITS, layout=gl.SliceLayout(0, A_OP))
        u = _k_byte(k, BITS)
        x = gl.load(q_row_ptr[:, None] + ((PER * u + J) * sq_d)[None, :], mask=rmask[:, None], other=0.0)
        return (x.to(gl.float32) * FACT).to(gl.float16)

    @gluon.jit
    def _tile(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i, z_i, o0, o1, o2, o3, n_valid, b_z, k_fac,
              BITS: gl.constexpr, VBITS: gl.constexpr, MASKED: gl.constexpr, MMA: gl.constexpr, A_OP: gl.constexpr,
              B_OP: gl.constexpr, COL: gl.constexpr):
        """One tile of 64 tokens. k_fac: 2**24 (the K codes are the fp16 subnormals 2**-24 * 2**(BITS j) * code)
        times sm_scale * log2(e); b_z: sum(q) * sm_scale * log2(e) per row. BITS: K's bits; VBITS: V's."""
        ksp = _k_operand(kw, BITS, B_OP)
        acc = gl.zeros([16, 64], gl.float32, MMA)
        acc = mma_v2(q0, _plane(ksp, _mask(BITS, 0)), acc)
        acc = mma_v2(q1, _plane(ksp, _mask(BITS, 1)), acc)
        if BITS == 2:
            acc = mma_v2(q2, _plane(ksp, _mask(BITS, 2)), acc)
            acc = mma_v2(q3, _plane(ksp, _mask(BITS, 3)), acc)
        s = (_meta(k_s, COL) * k_fac)[None, :] * acc + _meta(k_z, COL)[None, :] * b_z[:, None]
        vs_f = _meta(v_s, COL)
        vz_f = _meta(v_z, COL)
        if MASKED:
            n = gl.arange(0, 64, layout=COL)
            cm = ((n & 1) + 2 * (n >> 3) + 16 * ((n >> 1) & 3)) < n_valid
            s = gl.where(cm[None, :], s, float("-inf"))
            vs_f = gl.where(cm, vs_f, 0.0)  # past the end p is 0 and the scale may be anything
            vz_f = gl.where(cm, vz_f, 0.0)
        m_i, l_i, z_i, o0, o1, o2, o3, p = _online_softmax(s, m_i, l_i, z_i, vz_f, o0, o1, o2, o3, 1, VBITS)
        pa = gl.convert_layout((p * vs_f[None, :]).to(gl.float16), A_OP)
        vsp = _v_operand(ve, vo, VBITS, B_OP, False)
        o0 = mma_v2(pa, _plane(vsp, _mask(VBITS, 0)), o0)
        o1 = mma_v2(pa, _plane(vsp, _mask(VBITS, 1)), o1)
        if VBITS == 2:
            o2 = mma_v2(pa, _plane(vsp, _mask(VBITS, 2)), o2)
            o3 = mma_v2(pa, _plane(vsp, _mask(VBITS, 3)), o3)
        return m_i, l_i, z_i, o0, o1, o2, o3

    @gluon.jit
    def _load_v(v_base, v_off, vw_p, vw_i, t, n_valid, W: gl.constexpr, TOKM: gl.constexpr, MASKED: gl.constexpr):
        """V words of each row's pair of tokens of the tile at token t: row p holds tokens 2 p and 2 p + 1 (v_off:
        their words' offsets), or with TOKM 16 (p // 8) + p % 8 and 8 further (offsets computed here from the
        arange: hoisted, they did not fold into the loads' immediates; offline SASS)."""
        if TOKM:
            tok = 16 * (vw_p // 8) + vw_p % 8
            if MASKED:
                ve = gl.load(v_base + t * W + (tok * W)[:, None] + vw_i[None, :], mask=tok[:, None] < n_valid,
                             other=0)
                vo = gl.load(v_base + t * W + ((tok + 8) * W)[:, None] + vw_i[None, :],
                             mask=(tok + 8)[:, None] < n_valid, other=0)
            else:
                ve = gl.load(v_base + t * W + (tok * W)[:, None] + vw_i[None, :])
                vo = gl.load(v_base + t * W + ((tok + 8) * W)[:, None] + vw_i[None, :])
        elif MASKED:
            ve = gl.load(v_base + t * W + v_off, mask=(2 * vw_p)[:, None] < n_valid, other=0)
            vo = gl.load(v_base + t * W + W + v_off, mask=(2 * vw_p + 1)[:, None] < n_valid, other=0)
        else:
            ve = gl.load(v_base + t * W + v_off)
            vo = gl.load(v_base + t * W + W + v_off)
        return ve, vo

    @gluon.jit
    def _load_meta(ks_base, kz_base, vs_base, vz_base, pp, t, n_valid, MASKED: gl.constexpr):
        """K's and V's scales and zeros of the tile at token t, as int32 pairs."""
        p2 = t // 2  # (the scalar added to each base first: the per-element offsets then fold into the loads)
        if MASKED:
            m = 2 * pp < n_valid
            r = (gl.load(ks_base + p2 + pp, mask=m, other=0), gl.load(kz_base + p2 + pp, mask=m, other=0),
                 gl.load(vs_base + p2 + pp, mask=m, other=0), gl.load(vz_base + p2 + pp, mask=m, other=0))
        else:
            r = (gl.load(ks_base + p2 + pp), gl.load(kz_base + p2 + pp), gl.load(vs_base + p2 + pp),
                 gl.load(vz_base + p2 + pp))
        return r

    @gluon.jit
    def _fp_tile(qa, kt, vt, valid, m_i, l_i, o, qk_scale, A_OP: gl.constexpr, MMA: gl.constexpr):
        """One tile of full-precision keys kt [128, FBN] and values vt [FBN, 128] (the sink or the window)."""
        s = mma_v2(qa, kt, gl.zeros([16, kt.shape[1]], gl.float32, MMA)) * qk_scale
        s = gl.where(valid[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        o = mma_v2(gl.convert_layout(p.to(vt.dtype), A_OP), vt, o * alpha[:, None])
        return m_new, l_i, o

    @gluon.jit
    def _fp_program(q_ptr, sq_b, sq_h, sq_d, k_sink, v_sink, k_win, v_win, sks_b, sks_h, sks_t, svs_b, svs_h, svs_t,
                    skw_b, skw_h, skw_t, svw_b, svw_h, svw_t, n_s, n_q, n_w, w_rows, op_ptr, lp_ptr, prow0, b, h,
                    qk_scale, R: gl.constexpr, WRING: gl.constexpr, MMA: gl.constexpr, A_OP: gl.constexpr,
                    B_OP: gl.constexpr, ROW: gl.constexpr, COL: gl.constexpr):
        """The (batch, KV head)'s own program for its full-precision tokens: n_s sink tokens, then n_w window tokens
        (window token j at row (n_q + j) % w_rows with WRING, else row j), in tiles of FBN tokens; plain MMAs in the
        model's dtype over the natural channel order. Writes its normalised output and base-2 log-sum-exp at row prow0."""
        FBN: gl.constexpr = 16
        qm = gl.arange(0, 16, layout=gl.SliceLayout(1, A_OP))
        qd = gl.arange(0, 128, layout=gl.SliceLayout(0, A_OP))
        qa = gl.load(q_ptr + b * sq_b + (h * R + qm)[:, None] * sq_h + qd[None, :] * sq_d, mask=(qm < R)[:, None],
                     other=0.0)
        kd = gl.arange(0, 128, layout=gl.SliceLayout(1, B_OP))
        kt = gl.arange(0, FBN, layout=gl.SliceLayout(0, B_OP))
        vt = gl.arange(0, FBN, layout=gl.SliceLayout(1, B_OP))
        vd = gl.arange(0, 128, layout=gl.SliceLayout(0, B_OP))
        ct = gl.arange(0, FBN, layout=COL)
        m_i = gl.full([16], float("-inf"), gl.float32, ROW)
        l_i = gl.zeros([16], gl.float32, ROW)
        o = gl.zeros([16, 128], gl.float32, MMA)
        ks_base = k_sink + b * sks_b + h * sks_h
        vs_base = v_sink + b * svs_b + h * svs_h
        for t0 in range(0, n_s, FBN):
            kk = gl.load(ks_base + (t0 + kt)[None, :] * sks_t + kd[:, None], mask=(t0 + kt)[None, :] < n_s, other=0.0)
            vv = gl.load(vs_base + (t0 + vt)[:, None] * svs_t + vd[None, :], mask=(t0 + vt)[:, None] < n_s, other=0.0)
            m_i, l_i, o = _fp_tile(qa, kk, vv, (t0 + ct) < n_s, m_i, l_i, o, qk_scale, A_OP, MMA)
        kw_base = k_win + b * skw_b + h * skw_h
        vw_base = v_win + b * svw_b + h * svw_h
        for t0 in range(0, n_w, FBN):
            rk = t0 + kt
            rv = t0 + vt
            if WRING:
                rk = (n_q + rk) % w_rows
                rv = (n_q + rv) % w_rows
            kk = gl.load(kw_base + rk[None, :] * skw_t + kd[:, None], mask=(t0 + kt)[None, :] < n_w, other=0.0)
            vv = gl.load(vw_base + rv[:, None] * svw_t + vd[None, :], mask=(t0 + vt)[:, None] < n_w, other=0.0)
            m_i, l_i, o = _fp_tile(qa, kk, vv, (t0 + ct) < n_w, m_i, l_i, o, qk_scale, A_OP, MMA)
        om = gl.arange(0, 16, layout=ROW)
        on = gl.arange(0, 128, layout=COL)
        prow = prow0 * R + om
        inv = gl.where(l_i > 0.0, 1.0 / l_i, 0.0)
        gl.store(op_ptr + prow[:, None] * 128 + on[None, :], o * inv[:, None], mask=(om < R)[:, None])
        gl.store(lp_ptr + prow, gl.where(l_i > 0.0, m_i + gl.log2(l_i), float("-inf")), mask=om < R)

    # ------------------------------------------------------------------------------------------------------------
    # Tokens on the MMA's M side (TOKM): S^T = K . q^T over [64 tokens, 8 query rows], O^T = V^T . P^T. Half the MMAs
    # and half the softmax elements of the 16-row form for up to 8 query rows per KV head. The m index m = g + 8 r
    # (g: lane // 4) is token 8 g + r of the tile, so each thread's 8 tokens are consecutive.

    @gluon.constexpr_function
    def _kw_layout_t(bits):
        """[4 bits words, 64 tokens] int32: thread (g, c) holds words bits * c ..+bits of tokens 8 g .. 8 g + 7."""
        regs = [[1 << i, 0] for i in range(bits.bit_length() - 1)] + [[0, 1], [0, 2], [0, 4]]
        return gl.DistributedLinearLayout(regs, [[bits, 0], [2 * bits, 0], [0, 8], [0, 16], [0, 32]], [], [],
                                          [4 * bits, 64])

    @gluon.constexpr_function
    def _pair_layout_t():
        """[32 token pairs] int32: thread (g, c) holds pairs 4 g .. 4 g + 3 (tokens 8 g .. 8 g + 7)."""
        return gl.DistributedLinearLayout([[1], [2]], [[0], [0], [4], [8], [16]], [], [], [32])

    @gluon.jit
    def _meta_t(x, MROW: gl.constexpr):
        """int32 pairs [32] -> float32 [64] by m (m = g + 8 r is token 8 g + r)."""
        hv = _pair_halves(x)  # [32, 2]: token 2 p + e
        hv = gl.permute(gl.reshape(hv, [8, 8]), [1, 0])  # token 8 g + r: (g, r) -> (r, g)
        return gl.convert_layout(gl.reshape(hv, [64]), MROW).to(gl.float32)

    @gluon.jit
    def _k_operand_t(kw, BITS: gl.constexpr, A_OP: gl.constexpr):
        """int32 words [4 BITS, 64 tokens] -> int16 bytes [64 m, 16 BITS k] (the A operand): m = g + 8 r is token
        8 g + r; k = 16 s + 8 h + 2 c + e is byte 4 BITS c + 4 s + 2 h + e."""
        x = _spread_k(kw)  # [4 BITS, 64, 2, 2]
        x = gl.reshape(x, [4, BITS, 8, 8, 2, 2])  # (c, s, g, r, h, e)
        x = gl.permute(x, [3, 2, 1, 4, 0, 5])  # (r, g, s, h, c, e)
        return gl.convert_layout(gl.reshape(x, [64, 16 * BITS]), A_OP)

    @gluon.jit
    def _q_plane_t(q_ptr_b, sq_h, sq_d, h, R: gl.constexpr, BITS: gl.constexpr, J: gl.constexpr,
                   FACT: gl.constexpr, B_OP: gl.constexpr):
        """q's plane J as the B operand [16 BITS k, 8 rows] in the K operand's channel order, times FACT."""
        PER: gl.constexpr = 8 // BITS
        k = gl.arange(0, 16 * BITS, layout=gl.SliceLayout(1, B_OP))
        n = gl.arange(0, 8, layout=gl.SliceLayout(0, B_OP))
        u = _k_byte(k, BITS)
        x = gl.load(q_ptr_b + ((h * R + n) * sq_h)[None, :] + ((PER * u + J) * sq_d)[:, None],
                    mask=(n < R)[None, :], other=0.0)
        return (x.to(gl.float32) * FACT).to(gl.float16)

    @gluon.jit
    def _transpose8(p16):
        """fp16 [64 m, 8 n] in the accumulator layout -> the same values as the B operand [64 k, 8 n] (k = m): one
        movmatrix (8 x 8 transpose across the warp) per 8 x 8 block; the asm's elements are relabelled after."""
        t = gl.inline_asm_elementwise(asm="movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", constraints="=r,r",
                                      args=[p16], dtype=gl.float16, is_pure=True, pack=2)
        t = gl.permute(gl.reshape(t, [8, 8, 8]), [0, 2, 1])  # (b, g, c2e) holds (m 8 b + c2e, n g)
        return gl.reshape(t, [64, 8])

    @gluon.jit
    def _own_rows_sum(x):
        """[64, 8] in the accumulator layout -> [8, 8]: each thread's sum over its own rows m = g + 8 r (over r, in
        registers: no cross-lane step), by (g, n)."""
        return gl.sum(gl.reshape(x, [8, 8, 8]), axis=0)

    @gluon.jit
    def _scores_t(q0, q1, q2, q3, kw, BITS: gl.constexpr, MMA: gl.constexpr, A_OP: gl.constexpr):
        """S^T = K . q^T of a 64-token tile (K's codes in place: _tile_t's scaling applies)."""
        ksp = _k_operand_t(kw, BITS, A_OP)
        acc = gl.zeros([64, 8], gl.float32, MMA)
        acc = mma_v2(_plane(ksp, _mask(BITS, 0)), q0, acc)
        acc = mma_v2(_plane(ksp, _mask(BITS, 1)), q1, acc)
        if BITS == 2:
            acc = mma_v2(_plane(ksp, _mask(BITS, 2)), q2, acc)
            acc = mma_v2(_plane(ksp, _mask(BITS, 3)), q3, acc)
        return acc

    @gluon.jit
    def _metas_t(k_s, k_z, v_s, v_z, n_valid, k_fac, MASKED: gl.constexpr, MROW: gl.constexpr):
        """A tile's K scale (times k_fac), K zero, V scale and V zero per token (float32, by m) and its tokens' mask
        (n_valid tokens; with MASKED the V scale and zero past them are 0: p is 0 there and they may be anything)."""
        m = gl.arange(0, 64, layout=MROW)
        cm = (8 * (m & 7) + (m >> 3)) < n_valid
        vs_f = _meta_t(v_s, MROW)
        vz_f = _meta_t(v_z, MROW)
        if MASKED:
            vs_f = gl.where(cm, vs_f, 0.0)
            vz_f = gl.where(cm, vz_f, 0.0)
        return _meta_t(k_s, MROW) * k_fac, _meta_t(k_z, MROW), vs_f, vz_f, cm

    @gluon.jit
    def _scaled_scores(acc, ks_f, kz_f, b_z, cm, MASKED: gl.constexpr):
        """A tile's scores from S^T's accumulator: K's scale (times k_fac) and zero term per token, minus infinity past
        the n_valid tokens (cm) with MASKED."""
        s = ks_f[:, None] * acc + kz_f[:, None] * b_z[None, :]
        if MASKED:
            s = gl.where(cm[:, None], s, float("-inf"))
        return s

    @gluon.jit
    def _rescaled(o0, o1, o2, o3, alpha, AX: gl.constexpr, BITS: gl.constexpr):
        """The output accumulators times alpha per query row (the rows on axis 1 - AX: O^T's columns for AX = 0, O's
        rows for AX = 1)."""
        a = gl.expand_dims(alpha, AX)
        o0 = o0 * a
        o1 = o1 * a
        if BITS == 2:
            o2 = o2 * a
            o3 = o3 * a
        return o0, o1, o2, o3

    @gluon.jit
    def _online_softmax(s, m_i, l_i, z_i, vz_f, o0, o1, o2, o3, AX: gl.constexpr, BITS: gl.constexpr):
        """A tile's online softmax over the tokens (axis AX of the scores s; the query rows on the other): the running
        maximum m_i, raised lazily (only when some row's maximum grew by more than 2**8, so that most tiles skip the
        rescale of l_i, z_i and the outputs), the sums l_i of p and z_i of p times the V zero per token vz_f.
        Returns the state and p."""
        m_new = gl.maximum(m_i, gl.max(s, axis=AX))
        if gl.max(m_new - m_i, axis=0) > 8.0:
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha
            z_i = z_i * alpha
            o0, o1, o2, o3 = _rescaled(o0, o1, o2, o3, alpha, AX, BITS)
            m_i = m_new
        p = gl.exp2(s - gl.expand_dims(m_i, AX))
        l_i = l_i + gl.sum(p, axis=AX)
        z_i = z_i + gl.sum(p * gl.expand_dims(vz_f, 1 - AX), axis=AX)
        return m_i, l_i, z_i, o0, o1, o2, o3, p

    @gluon.jit
    def _softmax_local(acc, k_s, k_z, v_s, v_z, m_i, l_i, z_i, o0, o1, o2, o3, n_valid, b_z, k_fac,
                       BITS: gl.constexpr, MASKED: gl.constexpr, B_OP: gl.constexpr, MROW: gl.constexpr):
        """(BITS: V's, the output planes'.) _tile_t's softmax with no cross-lane step in the common case: the scores are
        formed less the running maximum m_i (one FFMA more per element, none less); l_i and z_i are each thread's
        partial sums over its own rows (:func:`_own_rows_sum`), reduced over the lanes once after the loop; the rescale
        test is one warp-wide integer maximum (REDUX) of the shifted scores' bit patterns (a float above 8.0 has a
        larger int32 pattern than 8.0's, a negative one a smaller). Only a tile that raises some row's maximum by more
        than 2**8 (the first one among them) takes the exact column maxima and the rescale of l_i, z_i and the outputs
        so far. Returns the state and P^T . diag(v scale) as P . V's B operand."""
        ks_f, kz_f, vs_f, vz_f, cm = _metas_t(k_s, k_z, v_s, v_z, n_valid, k_fac, MASKED, MROW)
        t = ks_f[:, None] * acc + (kz_f[:, None] * b_z[None, :] - m_i[None, :])
        if MASKED:
            t = gl.where(cm[:, None], t, float("-inf"))
        if gl.max(t.to(gl.int32, bitcast=True)) > 0x41000000:  # some t > 8.0 (or m_i still -inf)
            s = _scaled_scores(acc, ks_f, kz_f, b_z, cm, MASKED)
            m_new = gl.maximum(m_i, gl.max(s, axis=0))
            alpha = gl.exp2(m_i - m_new)
            a_l = gl.convert_layout(alpha, gl.SliceLayout(0, l_i.type.layout))
            l_i = l_i * a_l[None, :]
            z_i = z_i * a_l[None, :]
            o0, o1, o2, o3 = _rescaled(o0, o1, o2, o3, alpha, 0, BITS)
            m_i = m_new
            t = s - m_i[None, :]
        p = gl.exp2(t)
        l_i = l_i + _own_rows_sum(p)
        z_i = z_i + _own_rows_sum(p * vz_f[:, None])
        pb = gl.convert_layout(_transpose8((p * vs_f[:, None]).to(gl.float16)), B_OP)
        return m_i, l_i, z_i, o0, o1, o2, o3, pb

    @gluon.jit
    def _pv_t(pb, ve, vo, o0, o1, o2, o3, BITS: gl.constexpr, A_OP: gl.constexpr):
        """O^T += V^T . P^T of a tile (its V words, pb from :func:`_softmax_local`)."""
        vsp = _v_operand(ve, vo, BITS, A_OP, True)
        o0 = mma_v2(_plane(vsp, _mask(BITS, 0)), pb, o0)
        o1 = mma_v2(_plane(vsp, _mask(BITS, 1)), pb, o1)
        if BITS == 2:
            o2 = mma_v2(_plane(vsp, _mask(BITS, 2)), pb, o2)
            o3 = mma_v2(_plane(vsp, _mask(BITS, 3)), pb, o3)
        return o0, o1, o2, o3

    @gluon.jit
    def _tile_t(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i, z_i, o0, o1, o2, o3, n_valid, b_z, k_fac,
                BITS: gl.constexpr, VBITS: gl.constexpr, MASKED: gl.constexpr, MMA: gl.constexpr,
                A_OP: gl.constexpr, B_OP: gl.constexpr, MROW: gl.constexpr, LSM: gl.constexpr = False):
        """One tile of 64 tokens, tokens on M (as :func:`_tile`'s scaling). LSM: :func:`_softmax_local`'s softmax (l_i
        and z_i are then each thread's partial sums), else the row maxima and sums reduced across the lanes per tile.
        BITS: K's bits; VBITS: V's."""
        acc = _scores_t(q0, q1, q2, q3, kw, BITS, MMA, A_OP)
        if LSM:
            m_i, l_i, z_i, o0, o1, o2, o3, pb = _softmax_local(acc, k_s, k_z, v_s, v_z, m_i, l_i, z_i, o0, o1, o2, o3,
                                                               n_valid, b_z, k_fac, VBITS, MASKED, B_OP, MROW)
        else:
            ks_f, kz_f, vs_f, vz_f, cm = _metas_t(k_s, k_z, v_s, v_z, n_valid, k_fac, MASKED, MROW)
            s = _scaled_scores(acc, ks_f, kz_f, b_z, cm, MASKED)
            m_i, l_i, z_i, o0, o1, o2, o3, p = _online_softmax(s, m_i, l_i, z_i, vz_f, o0, o1, o2, o3, 0, VBITS)
            pb = gl.convert_layout(_transpose8((p * vs_f[:, None]).to(gl.float16)), B_OP)
        o0, o1, o2, o3 = _pv_t(pb, ve, vo, o0, o1, o2, o3, VBITS, A_OP)
        return m_i, l_i, z_i, o0, o1, o2, o3

    @gluon.jit
    def _l2_prefetch(kp, vp, p0, p1, p2, p3, TILE_BYTES: gl.constexpr):
        """One bulk L2 prefetch per stream of a tile (lane 0: K's codes, 1: V's, 2-5: the scales and zeros; 16-byte
        aligned addresses only)."""
        LANE: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        lane = gl.arange(0, 32, layout=LANE)
        z = lane * 0
        ptr = gl.where(lane == 0, kp + z, gl.where(lane == 1, vp + z, gl.where(lane == 2, p0 + z, gl.where(
            lane == 3, p1 + z, gl.where(lane == 4, p2 + z, p3 + z)))))
        size = gl.where(lane < 2, TILE_BYTES, gl.where(lane < 6, 128, 0))  # 0: the lane prefetches nothing
        gl.inline_asm_elementwise(
            asm="{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            constraints="=r,l,r", args=[ptr, size], dtype=gl.int32, is_pure=False, pack=1)

    # ------------------------------------------------------------------------------------------------------------
    # The TMA ring (TMA_STAGES > 0, tokens-on-M form): each 64-token tile's code rows (K's, V's: 2 W int32 rows of 128
    # bytes each, 128-byte swizzle) and its four scale / zero rows (128 bytes each) come from global memory by bulk
    # tensor copies into a ring of TMA_STAGES shared-memory stages, one mbarrier per stage; the tile is read from
    # shared memory into the same registers the global loads fill (layouts below: the operand layouts mapped through
    # token t word w -> row (t W + w) // 32, column (t W + w) % 32).

    @gluon.constexpr_function
    def _code_smem():
        return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)

    @gluon.constexpr_function
    def _meta_smem():
        return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)

    @gluon.constexpr_function
    def _rows_layout(regs, lanes, bits):
        """A layout over a tile's [64 tokens, W words] given by its bases, as one over its [2 W, 32] shared rows."""
        W = 4 * bits

        def m(b):
            f = b[0] * W + b[1]
            return [f // 32, f % 32]
        return gl.DistributedLinearLayout([m(b) for b in regs], [m(b) for b in lanes], [], [], [2 * W, 32])

    @gluon.constexpr_function
    def _k_rows_layout(bits):
        """:func:`_kw_layout_t` over the shared rows (bases as (token, word))."""
        return _rows_layout([[0, 1 << i] for i in range(bits.bit_length() - 1)] + [[1, 0], [2, 0], [4, 0]],
                            [[0, bits], [0, 2 * bits], [8, 0], [16, 0], [32, 0]], bits)

    @gluon.constexpr_function
    def _v_rows_layout(bits):
        """:func:`_vw_layout`'s tokens-on-M form over the shared rows: pair p = h + 2 s + 8 c is token 16 c + h + 2 s
        (even member) and 8 further (odd member, the last register basis)."""
        nw = bits // 2
        return _rows_layout([[0, 1 << i] for i in range(nw.bit_length() - 1)] + [[1, 0], [2, 0], [4, 0], [8, 0]],
                            [[16, 0], [32, 0], [0, nw], [0, 2 * nw], [0, 4 * nw]], bits)

    @gluon.constexpr_function
    def _m_rows_layout():
        """:func:`_pair_layout_t` over one 128-byte row."""
        return gl.DistributedLinearLayout([[0, 1], [0, 2]], [[0, 0], [0, 0], [0, 4], [0, 8], [0, 16]], [], [],
                                          [1, 32])

    @gluon.jit
    def _ring_issue(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, kc_s, vc_s, m_s, bars, k, start, code_row0, meta_row, pred,
                    STAGES: gl.constexpr, W: gl.constexpr, v_row0=None, WV: gl.constexpr = 0):
        """Tile k of the split (tokens start + 64 k ..) into stage k % STAGES: six bulk copies on its mbarrier. K's
        code rows from code_row0 (W words a token), V's from v_row0 (WV words a token; None, 0: K's)."""
        st = k % STAGES
        bar = bars.index(st)
        t = start + k * 64
        mbarrier.expect(bar, kc_d.block_type.nbytes + vc_d.block_type.nbytes + 4 * ks_d.block_type.nbytes, pred=pred)
        row = (code_row0 + t * W // 32).to(gl.int32)  # (TMA coordinates are 32-bit)
        if WV == 0:
            vrow = row
        else:
            vrow = (v_row0 + t * WV // 32).to(gl.int32)
        meta_row = meta_row.to(gl.int32)
        t = t.to(gl.int32)
        _tma_load(kc_d, [row, 0], bar, kc_s.index(st), pred=pred)
        _tma_load(vc_d, [vrow, 0], bar, vc_s.index(st), pred=pred)
        _tma_load(ks_d, [meta_row, t // 2], bar, m_s.index(4 * st), pred=pred)
        _tma_load(kz_d, [meta_row, t // 2], bar, m_s.index(4 * st + 1), pred=pred)
        _tma_load(vs_d, [meta_row, t // 2], bar, m_s.index(4 * st + 2), pred=pred)
        _tma_load(vz_d, [meta_row, t // 2], bar, m_s.index(4 * st + 3), pred=pred)

    @gluon.jit
    def _ring_start(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, start, n_t, code_row0, meta_row, STAGES: gl.constexpr,
                    W: gl.constexpr, v_row0=None, WV: gl.constexpr = 0):
        """The ring's shared memory (K's and V's code stages, the scale / zero rows, one mbarrier per stage), with its
        first STAGES tiles of the n_t issued: (kc_s, vc_s, m_s, bars) for :func:`_ring_read` / :func:`_ring_issue`."""
        CB: gl.constexpr = kc_d.block_type.shape  # a stage's blocks are the descriptors' (_code_block, _META_BLOCK)
        VCB: gl.constexpr = vc_d.block_type.shape
        MB: gl.constexpr = ks_d.block_type.shape
        kc_s = gl.allocate_shared_memory(gl.int32, [STAGES, CB[0], CB[1]], _code_smem())
        vc_s = gl.allocate_shared_memory(gl.int32, [STAGES, VCB[0], VCB[1]], _code_smem())
        m_s = gl.allocate_shared_memory(gl.int32, [4 * STAGES, MB[0], MB[1]], _meta_smem())
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(bars.index(j), count=1)
        fence_async_shared()
        for j in gl.static_range(STAGES):
            _ring_issue(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, kc_s, vc_s, m_s, bars, j, start, code_row0, meta_row,
                        j < n_t, STAGES, W, v_row0, WV)
        return kc_s, vc_s, m_s, bars

    @gluon.jit
    def _ring_read(kc_s, vc_s, m_s, bars, i, STAGES: gl.constexpr, BITS: gl.constexpr, VBITS: gl.constexpr,
                   KW: gl.constexpr, VW: gl.constexpr, PL: gl.constexpr):
        """Tile i's words, scales and zeros from its stage once its copies have landed, in the registers (layouts)
        the global loads give: kw [W, 64], ve / vo [32, WV], four int32 pair vectors [32]. BITS: K's bits; VBITS:
        V's."""
        W: gl.constexpr = 4 * BITS
        WV: gl.constexpr = 4 * VBITS
        st = i % STAGES
        mbarrier.wait(bars.index(st), (i // STAGES) & 1)
        x = gl.reshape(kc_s.index(st).load(_k_rows_layout(BITS)), [64, W])
        kw = gl.convert_layout(gl.permute(x, [1, 0]), KW)
        x = gl.reshape(vc_s.index(st).load(_v_rows_layout(VBITS)), [2, 2, 2, 8, WV])  # (t5, t4, t3, t2..0, w)
        x = gl.reshape(gl.permute(x, [0, 1, 3, 4, 2]), [32, WV, 2])  # pair p = 8 (2 t5 + t4) + t2..0; member t3
        ve, vo = gl.split(x)
        ML: gl.constexpr = _m_rows_layout()
        k_s = gl.convert_layout(gl.reshape(m_s.index(4 * st).load(ML), [32]), PL)
        k_z = gl.convert_layout(gl.reshape(m_s.index(4 * st + 1).load(ML), [32]), PL)
        v_s = gl.convert_layout(gl.reshape(m_s.index(4 * st + 2).load(ML), [32]), PL)
        v_z = gl.convert_layout(gl.reshape(m_s.index(4 * st + 3).load(ML), [32]), PL)
        return kw, gl.convert_layout(ve, VW), gl.convert_layout(vo, VW), k_s, k_z, v_s, v_z

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _launch_dependents():
        """Programmatic dependent launch: the next kernel on the stream (the merge, launched with ``launch_pdl``) may
        start once every program has passed this; its ``griddepcontrol.wait`` still waits for this grid's end."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _balanced_program(lens_ptr, slen_b, slen_p, q_cap, n_rows, progs, f, B_P2: gl.constexpr,
                          BN: gl.constexpr):
        """Ragged batches (BALANCE, decode_attention's ``balance``): program f (0 <= f < progs) of a KV head, when the
        head's ``progs`` packed-middle programs are shared out over the batch's rows by their work rather than the
        same number per row. The partition is decode_attention's ``_balance_table`` (MID_ONLY; the merge kernel
        recomputes it there to find a row's programs): every program takes ``t`` tiles of BN tokens, t near the
        smallest with sum over rows of cdiv(tiles_b, t) <= progs. Returns (the program's row, n_rows where the rows
        took fewer than progs programs; its index among the row's programs; its chunk of tokens; the row's packed
        length, 0 for none: taken from the table's loads, no second dependent load before the loop)."""
        LB: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        rb = gl.arange(0, B_P2, layout=LB)
        rm = rb < n_rows
        work = gl.load(lens_ptr + rb.to(gl.int64) * slen_b + slen_p, mask=rm, other=0).to(gl.int32)
        work = gl.minimum(gl.maximum(work, 0), q_cap)
        tiles = gl.where(rm, (work + BN - 1) // BN, 0)
        total = gl.sum(tiles, axis=0)
        busy = gl.sum((tiles > 0).to(gl.int32), axis=0)
        t_lo = gl.maximum((total + progs - 1) // progs, 1)
        free = gl.maximum(progs - busy, 1)
        t_hi = gl.where(progs > busy, (total + free - 1) // free, gl.max(tiles, axis=0))
        t_hi = gl.maximum(t_hi, t_lo)
        fits0 = gl.sum((tiles + t_lo - 1) // t_lo, axis=0) <= progs
        fits1 = gl.sum((tiles + t_lo) // (t_lo + 1), axis=0) <= progs
        t = gl.where(fits0, t_lo, gl.where(fits1, gl.minimum(t_lo + 1, t_hi), t_hi))
        n = (tiles + t - 1) // t
        incl = gl.associative_scan(n, 0, _add)
        row = gl.minimum(gl.sum((incl <= f).to(gl.int32), axis=0), n_rows)
        mine = rb == row
        return row, f - gl.sum(gl.where(mine, incl - n, 0), axis=0), t * BN, gl.sum(gl.where(mine, work, 0), axis=0)

    @gluon.jit
    def _packed_program(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, op_ptr, lp_ptr,
                        sq_b, sq_h, sq_d, skc_b, skc_h, sks_b, sks_h, svc_b, svc_h, svs_b, svs_h, start, end, prow0,
                        b, h, qk_scale, R: gl.constexpr, BITS: gl.constexpr, PREFETCH_V: gl.constexpr,
                        TOKM: gl.constexpr, MMA: gl.constexpr, A_OP: gl.constexpr, B_OP: gl.constexpr,
                        L2PF: gl.constexpr = 0, descs=None, code_row0=0, meta_row=0, TMA_STAGES: gl.constexpr = 0,
                        LSM: gl.constexpr = False, VB: gl.constexpr = 0, v_row0=0):
        """A split of the packed middle: tokens [start, end) of the (batch, KV head), all R query heads in the MMA.
        TOKM: the tokens on the MMA's M side (S^T = K q^T over [64 tokens, 8 rows], R <= 8), else the query rows
        (S = q K^T over [16 rows, 64 tokens]). Writes the split's normalised output and base-2 log-sum-exp at row
        prow0. BITS: K's bits; VB: V's (0: BITS; then V's code rows in the ring are K's: v_row0 unused)."""
        BN: gl.constexpr = 64
        VBITS: gl.constexpr = BITS if VB == 0 else VB
        W: gl.constexpr = 4 * BITS  # int32 words per token (K)
        WV: gl.constexpr = 4 * VBITS  # (V)
        PER: gl.constexpr = 8 // VBITS  # (the output's planes: V's)
        VW: gl.constexpr = _vw_layout(VBITS)
        gl.static_assert(L2PF == 0 or VB == 0, "the L2 prefetch is written for K and V of the same bits")
        if TOKM:
            KW: gl.constexpr = _kw_layout_t(BITS)
            PL: gl.constexpr = _pair_layout_t()
            RV: gl.constexpr = gl.SliceLayout(0, MMA)  # per query row
            TV: gl.constexpr = gl.SliceLayout(1, MMA)  # per token
            NR: gl.constexpr = 8
        else:
            KW: gl.constexpr = _kw_layout(BITS)
            PL: gl.constexpr = _pair_layout()
            RV: gl.constexpr = gl.SliceLayout(1, MMA)
            TV: gl.constexpr = gl.SliceLayout(0, MMA)
            NR: gl.constexpr = 16

        q_b = q_ptr + b * sq_b
        if TOKM:
            q0 = _q_plane_t(q_b, sq_h, sq_d, h, R, BITS, 0, 1.0, B_OP)
        else:
            qm = gl.arange(0, 16, layout=gl.SliceLayout(1, A_OP))
            q_rows = q_b + (h * R + qm) * sq_h
            qmask = qm < R
            q0 = _q_plane(q_rows, sq_d, qmask, BITS, 0, 1.0, A_OP)
        QAX: gl.constexpr = 0 if TOKM else 1  # the axis q's planes hold their channels on
        if BITS == 2:
            if TOKM:
                q1 = _q_plane_t(q_b, sq_h, sq_d, h, R, BITS, 1, 0.25, B_OP)
                q2 = _q_plane_t(q_b, sq_h, sq_d, h, R, BITS, 2, 0.0625, B_OP)
                q3 = _q_plane_t(q_b, sq_h, sq_d, h, R, BITS, 3, 0.015625, B_OP)
            else:
                q1 = _q_plane(q_rows, sq_d, qmask, BITS, 1, 0.25, A_OP)
                q2 = _q_plane(q_rows, sq_d, qmask, BITS, 2, 0.0625, A_OP)
                q3 = _q_plane(q_rows, sq_d, qmask, BITS, 3, 0.015625, A_OP)
            qz = (q0.to(gl.float32) + 4.0 * q1.to(gl.float32) + 16.0 * q2.to(gl.float32)
                  + 64.0 * q3.to(gl.float32))
        else:
            if TOKM:
                q1 = _q_plane_t(q_b, sq_h, sq_d, h, R, BITS, 1, 0.0625, B_OP)
            else:
                q1 = _q_plane(q_rows, sq_d, qmask, BITS, 1, 0.0625, A_OP)
            q2 = q0
            q3 = q0
            qz = q0.to(gl.float32) + 16.0 * q1.to(gl.float32)
        b_z = gl.convert_layout(gl.sum(qz, axis=QAX) * qk_scale, RV)  # the zero point's factor per row
        k_fac = qk_scale * 16777216.0

        kw_i = gl.arange(0, W, layout=gl.SliceLayout(1, KW))
        kw_t = gl.arange(0, BN, layout=gl.SliceLayout(0, KW))
        k_off = kw_t[None, :] * W + kw_i[:, None]
        k_base = kc_ptr + b * skc_b + h * skc_h
        vw_p = gl.arange(0, BN // 2, layout=gl.SliceLayout(1, VW))
        vw_i = gl.arange(0, WV, layout=gl.SliceLayout(0, VW))
        v_off = vw_p[:, None] * (2 * WV) + vw_i[None, :]  # (the 16-row form's token pairs 2 p, 2 p + 1)
        v_base = vc_ptr + b * svc_b + h * svc_h
        pp = gl.arange(0, BN // 2, layout=PL)
        ks_base = ks_ptr + b * sks_b + h * sks_h
        kz_base = kz_ptr + b * sks_b + h * sks_h
        vs_base = vs_ptr + b * svs_b + h * svs_h
        vz_base = vz_ptr + b * svs_b + h * svs_h

        m_i = gl.full([NR], float("-inf"), gl.float32, RV)
        if LSM:  # each thread's partial sums (_softmax_local), reduced over the lanes after the loop
            l_i = _own_rows_sum(gl.zeros([64, 8], gl.float32, MMA))
        else:
            l_i = gl.zeros([NR], gl.float32, RV)
        z_i = l_i
        if TOKM:
            o0 = gl.zeros([16 * VBITS, 8], gl.float32, MMA)
        else:
            o0 = gl.zeros([16, 16 * VBITS], gl.float32, MMA)
        o1 = o0
        o2 = o0
        o3 = o0

        n_full = gl.maximum(end - start, 0) // BN
        if TMA_STAGES > 0:  # the tiles come through the shared-memory ring (tokens on M only)
            kc_d, vc_d, ks_d, kz_d, vs_d, vz_d = descs
            n_t = (gl.maximum(end - start, 0) + BN - 1) // BN
            kc_s, vc_s, m_s, bars = _ring_start(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, start, n_t, code_row0, meta_row,
                                                TMA_STAGES, W, v_row0, 0 if VB == 0 else WV)
            for i in range(0, n_full):
                kw, ve, vo, k_s, k_z, v_s, v_z = _ring_read(kc_s, vc_s, m_s, bars, i, TMA_STAGES, BITS, VBITS, KW, VW,
                                                            PL)
                m_i, l_i, z_i, o0, o1, o2, o3 = _tile_t(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i,
                                                        z_i, o0, o1, o2, o3, BN, b_z, k_fac, BITS, VBITS, False, MMA,
                                                        A_OP, B_OP, TV, LSM)
                _cta_barrier()  # every lane's reads of the stage are done before it is refilled
                _ring_issue(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, kc_s, vc_s, m_s, bars, i + TMA_STAGES, start,
                            code_row0, meta_row, i + TMA_STAGES < n_t, TMA_STAGES, W, v_row0, 0 if VB == 0 else WV)
            if n_t > n_full:  # the split's last, partial tile (past its end: finite values, masked)
                kw, ve, vo, k_s, k_z, v_s, v_z = _ring_read(kc_s, vc_s, m_s, bars, n_full, TMA_STAGES, BITS, VBITS, KW,
                                                            VW, PL)
                m_i, l_i, z_i, o0, o1, o2, o3 = _tile_t(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i,
                                                        z_i, o0, o1, o2, o3, end - start - n_full * BN, b_z,
                                                        k_fac, BITS, VBITS, True, MMA, A_OP, B_OP, TV, LSM)
        elif n_full > 0:
            t = gl.multiple_of(start, BN)  # chunk is a multiple of BN
            kw = gl.load(k_base + t * W + k_off)
            ve, vo = _load_v(v_base, v_off, vw_p, vw_i, t, BN, WV, TOKM, False)
            k_s, k_z, v_s, v_z = _load_meta(ks_base, kz_base, vs_base, vz_base, pp, t, BN, False)
            last = start + (n_full - 1) * BN
            for i in range(0, n_full):
                # the next tile, loaded before this one is computed (at the end the last one again: in bounds)
                tn = gl.multiple_of(gl.minimum(start + (i + 1) * BN, last), BN)
                if L2PF > 0:  # every stream's tile L2PF ahead into L2 (the last full tile again at the end)
                    tp = gl.multiple_of(gl.minimum(start + (i + L2PF) * BN, last), BN)
                    _l2_prefetch(k_base + tp * W, v_base + tp * WV, ks_base + tp // 2, kz_base + tp // 2,
                                 vs_base + tp // 2, vz_base + tp // 2, BN * W * 4)
                kw_n = gl.load(k_base + tn * W + k_off)
                if PREFETCH_V:
                    ve_n, vo_n = _load_v(v_base, v_off, vw_p, vw_i, tn, BN, WV, TOKM, False)
                else:  # 4-bit: the next tile's V words would spill; this tile's are loaded now, used after softmax
                    ve, vo = _load_v(v_base, v_off, vw_p, vw_i, gl.multiple_of(start + i * BN, BN), BN, WV, TOKM, False)
                k_s_n, k_z_n, v_s_n, v_z_n = _load_meta(ks_base, kz_base, vs_base, vz_base, pp, tn, BN, False)
                if TOKM:
                    m_i, l_i, z_i, o0, o1, o2, o3 = _tile_t(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i,
                                                            l_i, z_i, o0, o1, o2, o3, BN, b_z, k_fac, BITS, VBITS,
                                                            False, MMA, A_OP, B_OP, TV, LSM)
                else:
                    m_i, l_i, z_i, o0, o1, o2, o3 = _tile(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i,
                                                          z_i, o0, o1, o2, o3, BN, b_z, k_fac, BITS, VBITS, False, MMA,
                                                          A_OP, B_OP, TV)
                kw = kw_n
                if PREFETCH_V:
                    ve = ve_n
                    vo = vo_n
                k_s = k_s_n
                k_z = k_z_n
                v_s = v_s_n
                v_z = v_z_n
        t = gl.multiple_of(start + n_full * BN, BN)
        if TMA_STAGES == 0:
            if t < end:  # the split's last, partial tile
                nv = end - t
                kw = gl.load(k_base + t * W + k_off, mask=kw_t[None, :] < nv, other=0)
                ve, vo = _load_v(v_base, v_off, vw_p, vw_i, t, nv, WV, TOKM, True)
                k_s, k_z, v_s, v_z = _load_meta(ks_base, kz_base, vs_base, vz_base, pp, t, nv, True)
                if TOKM:
                    m_i, l_i, z_i, o0, o1, o2, o3 = _tile_t(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i,
                                                            z_i, o0, o1, o2, o3, nv, b_z, k_fac, BITS, VBITS, True,
                                                            MMA, A_OP, B_OP, TV, LSM)
                else:
                    m_i, l_i, z_i, o0, o1, o2, o3 = _tile(q0, q1, q2, q3, kw, ve, vo, k_s, k_z, v_s, v_z, m_i, l_i, z_i,
                                                          o0, o1, o2, o3, nv, b_z, k_fac, BITS, VBITS, True, MMA,
                                                          A_OP, B_OP, TV)

        if LSM:
            l_i = gl.convert_layout(gl.sum(l_i, axis=0), RV)
            z_i = gl.convert_layout(gl.sum(z_i, axis=0), RV)
        # normalised partial output; plane j's channel index n = 8 i + g (n the MMA's N side for the 16-row form,
        # its M side for TOKM) is byte 2 VBITS g + i of the token: channel PER (2 VBITS g + i) + j
        inv = gl.where(l_i > 0.0, 1.0 / l_i, 0.0)
        zo = z_i * inv
        sc = inv * 16777216.0  # the V codes were fp16 subnormals (2**-24 * 2**(VBITS j) * code)
        rows = gl.arange(0, NR, layout=RV)
        cn = gl.arange(0, 16 * VBITS, layout=TV)
        ch = 16 * (cn % 8) + PER * (cn // 8)
        prow = prow0 * R + rows
        rmask = rows < R
        if TOKM:
            optr = op_ptr + prow[None, :] * 128 + ch[:, None]
            omask = rmask[None, :]
            sc2 = sc[None, :]
            zo2 = zo[None, :]
        else:
            optr = op_ptr + prow[:, None] * 128 + ch[None, :]
            omask = rmask[:, None]
            sc2 = sc[:, None]
            zo2 = zo[:, None]
        gl.store(optr, o0 * sc2 + zo2, mask=omask)
        if VBITS == 2:
            gl.store(optr + 1, o1 * (sc2 * 0.25) + zo2, mask=omask)
            gl.store(optr + 2, o2 * (sc2 * 0.0625) + zo2, mask=omask)
            gl.store(optr + 3, o3 * (sc2 * 0.015625) + zo2, mask=omask)
        else:
            gl.store(optr + 1, o1 * (sc2 * 0.0625) + zo2, mask=omask)
        lse = gl.where(l_i > 0.0, m_i + gl.log2(l_i), float("-inf"))
        gl.store(lp_ptr + prow, lse, mask=rmask)

    @gluon.jit
    def _gluon_split_kernel(q_ptr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, op_ptr, lp_ptr, lens_ptr,
                            k_sink, v_sink, k_win, v_win,
                            sq_b, sq_h, sq_d, skc_b, skc_h, sks_b, sks_h, svc_b, svc_h, svs_b, svs_h, slen_b, slen_p,
                            sfk_b, sfk_h, sfk_t, sfv_b, sfv_h, sfv_t, swk_b, swk_h, swk_t, swv_b, swv_h, swv_t,
                            n_tok, cap, chunk, n_sink, n_win, s_cap, w_rows, qk_scale,
                            H_KV: gl.constexpr, R: gl.constexpr, NUM_SPLITS: gl.constexpr, BITS: gl.constexpr,
                            DEV_LENS: gl.constexpr, PREFETCH_V: gl.constexpr, HAS_FP: gl.constexpr,
                            WRING: gl.constexpr, TOKM: gl.constexpr = False, L2PF: gl.constexpr = 0,
                            BALANCE: gl.constexpr = False, n_rows=1, B_P2: gl.constexpr = 1, kc_d=None, vc_d=None,
                            ks_d=None, kz_d=None, vs_d=None, vz_d=None, TMA_STAGES: gl.constexpr = 0,
                            PDL: gl.constexpr = False, LSM: gl.constexpr = False, VBITS: gl.constexpr = 0):
        """One program per (split, batch x KV head). The packed middle's splits: the codes (uint8, token rows
        contiguous) are read as int32 words (4 BITS per token), the fp16 per-token scales and zeros as int32 pairs
        of consecutive tokens (their strides come in those units). HAS_FP: the last split is the (batch, KV head)'s
        full-precision program (the sink, then the window; WRING: a ring of w_rows rows). DEV_LENS: each row's
        (n_sink, n_quant, n_window) is lens[b * slen_b + i * slen_p] (clamped to s_cap / cap / w_rows) and its chunk
        is derived from its n_quant; else n_sink / n_tok / n_win and chunk. BALANCE (DEV_LENS, n_rows rows of their
        own lengths): a KV head's packed-middle programs are shared out over the rows by their work
        (:func:`_balanced_program`); each program still writes its own slot, the full-precision one stays its row's.
        TMA_STAGES (tokens on M): the packed tiles come through a ring of that many shared-memory stages, filled by bulk
        tensor copies over the descriptors kc_d .. vz_d (:func:`launch_args`). PDL: the merge is a programmatic
        dependent launch, let go as each program starts. BITS: K's bits; VBITS: V's, 0 for BITS with V's code rows at
        K's (in the ring: the same strides), else V's own (words 4 VBITS per token).
        Writes each split's normalised output and base-2 log-sum-exp (decode_attention's merge kernel reads them)."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        ROW: gl.constexpr = gl.SliceLayout(1, MMA)
        COL: gl.constexpr = gl.SliceLayout(0, MMA)
        NUM_MID: gl.constexpr = NUM_SPLITS - 1 if HAS_FP else NUM_SPLITS
        BN: gl.constexpr = 64

        if PDL:  # every program has started: the merge's programs may take the SMs' free slots and wait there
            _launch_dependents()
        pid_s = gl.program_id(0)
        bh = gl.program_id(1)
        b = (bh // H_KV).to(gl.int64)
        h = (bh % H_KV).to(gl.int64)
        if DEV_LENS:
            n_q = gl.minimum(gl.maximum(gl.load(lens_ptr + b * slen_b + slen_p).to(gl.int32), 0), cap)
            chunk = ((n_q + NUM_MID - 1) // NUM_MID + BN - 1) // BN * BN
        else:
            n_q = n_tok
        prow0 = bh.to(gl.int64) * NUM_SPLITS + pid_s
        if HAS_FP and pid_s == NUM_SPLITS - 1:
            if DEV_LENS:
                n_s = gl.minimum(gl.maximum(gl.load(lens_ptr + b * slen_b).to(gl.int32), 0), s_cap)
                n_w = gl.minimum(gl.maximum(gl.load(lens_ptr + b * slen_b + 2 * slen_p).to(gl.int32), 0), w_rows)
            else:
                n_s = n_sink
                n_w = n_win
            _fp_program(q_ptr, sq_b, sq_h, sq_d, k_sink, v_sink, k_win, v_win, sfk_b, sfk_h, sfk_t, sfv_b, sfv_h,
                        sfv_t, swk_b, swk_h, swk_t, swv_b, swv_h, swv_t, n_s, n_q, n_w, w_rows, op_ptr, lp_ptr, prow0,
                        b, h, qk_scale, R, WRING, MMA, A_OP, B_OP, ROW, COL)
        else:
            if BALANCE:  # this program's row (b: the row it reads; its slot prow0 stays its own) and place in it
                row, idx, chunk, n_q = _balanced_program(lens_ptr, slen_b, slen_p, cap, n_rows, n_rows * NUM_MID,
                                                         (bh // H_KV) * NUM_MID + pid_s, B_P2, BN)
                b = gl.minimum(row, n_rows - 1).to(gl.int64)  # an idle program (row n_rows) has n_q 0: no tile
                start = idx * chunk
            else:
                start = pid_s * chunk
            _packed_program(q_ptr, k_codes.to(gl.pointer_type(gl.int32)), k_scale.to(gl.pointer_type(gl.int32)),
                            k_zero.to(gl.pointer_type(gl.int32)), v_codes.to(gl.pointer_type(gl.int32)),
                            v_scale.to(gl.pointer_type(gl.int32)), v_zero.to(gl.pointer_type(gl.int32)), op_ptr,
                            lp_ptr, sq_b, sq_h, sq_d, skc_b, skc_h, sks_b, sks_h, svc_b, svc_h, svs_b, svs_h, start,
                            gl.minimum(start + chunk, n_q), prow0, b, h, qk_scale, R, BITS, PREFETCH_V, TOKM, MMA,
                            A_OP, B_OP, L2PF, (kc_d, vc_d, ks_d, kz_d, vs_d, vz_d), (b * skc_b + h * skc_h) // 32,
                            b * H_KV + h, TMA_STAGES, LSM, VBITS, (b * svc_b + h * svc_h) // 32)


def storage_unsupported_reason(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, fp=()) -> str | None:
    """Why the kernel cannot read this storage as int32 words and pairs (None: it can): token rows of codes
    contiguous and whole words; per-token fp16 scales and zeros contiguous along tokens, 4-byte aligned, with an
    even capacity (pairs of consecutive tokens); the sink / window tensors ``fp`` with contiguous channels."""
    if any(t.shape[2] > 0 and t.stride(3) != 1 for t in fp):
        return "the Gluon kernel reads sink and window tokens with contiguous channels"
    for c in (k_codes, v_codes):
        if c.stride(-1) != 1 or c.stride(-2) != c.shape[-1] or c.shape[-1] % 4 or any(x % 4 for x in c.stride()[:2]):
            return "the Gluon kernel reads contiguous token rows of codes as int32 words"
    for x in (k_scale, k_zero, v_scale, v_zero):
        if x.shape[-1] != 1 or x.stride(-2) != 1 or x.data_ptr() % 4 or any(t % 2 for t in x.stride()[:2]):
            return "the Gluon kernel reads per-token scales and zeros as pairs (contiguous, rows at even tokens)"
        # an odd capacity: a row's last pair reads one element past it, which must exist (PackedKV pads its rows)
        last = x.storage_offset() + sum((n - 1) * t for n, t in zip(x.shape, x.stride())) + 1
        if x.shape[-2] % 2 and x.untyped_storage().nbytes() < (last + 1) * x.element_size():
            return "the Gluon kernel reads per-token scales and zeros as pairs (an odd capacity needs a padded row)"
    if k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        return "the Gluon kernel takes zeros laid out as their scales"
    return None


class _DescBase:
    """What a TensorDescriptor reads of its tensor (address, dtype), without holding it: a cached plan holds no
    tensor."""

    __slots__ = ("_ptr", "dtype")

    def __init__(self, t: torch.Tensor, dtype: torch.dtype):
        self._ptr, self.dtype = t.data_ptr(), dtype

    def data_ptr(self) -> int:
        return self._ptr


def tma_unsupported_reason(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero) -> str | None:
    """Why the TMA ring cannot read this storage (None: it can): code rows of 128 bytes (a (batch, head)'s rows start on
    one, the storage ends on one), scale / zero rows of the (batch, head)s evenly spaced at 16-byte multiples, on an
    sm_90 device. PackedKV's storage qualifies where its middle's capacity times the bytes per token is a multiple of
    128 (2-bit codes of 128 channels: a multiple of 4 tokens; 4-bit: of 2); its scale rows are padded already.
    kvcompile's transformers cache rounds its capacity up to that (``kvcompile.cache.packed.line_capacity``)."""
    if not HAVE_TMA:
        return "this Triton has no Gluon TMA (triton.experimental.gluon.language.nvidia.hopper.tma)"
    for c in (k_codes, v_codes):
        if c.data_ptr() % 16 or any(t % 128 for t in c.stride()[:2]) or _code_span(c) > _code_rows(c) * 128:
            return ("the TMA ring reads codes as 128-byte rows (the start 16-byte aligned, batch and head strides of "
                    "whole rows, the last row whole in the storage)")
    H = k_scale.shape[1]
    for x in (k_scale, k_zero, v_scale, v_zero):
        if x.data_ptr() % 16 or x.stride(1) % 8 or x.stride(0) != H * x.stride(1):
            return "the TMA ring reads scale / zero rows evenly spaced at 16-byte multiples"
    if k_codes.device.type != "cuda" or torch.cuda.get_device_capability(k_codes.device) < (9, 0):
        return "the TMA ring needs a CUDA device of sm_90 or later"
    return None


def _code_span(c) -> int:
    """Bytes from a uint8 code tensor's first element to its last."""
    return sum((n - 1) * t for n, t in zip(c.shape, c.stride())) + 1


def _code_rows(c) -> int:
    """The whole 128-byte rows of the storage from the code tensor's first element on."""
    return (c.untyped_storage().nbytes() - c.storage_offset()) // 128


def _tma_descriptors(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, v_bits=None):
    """The six tensor descriptors of the ring (:func:`tma_unsupported_reason` holds): codes as int32 rows of 32 words,
    a tile 2 W rows (128-byte swizzle); each scale / zero tensor as [batch x head, pairs] int32, a tile one row of
    32."""
    d = []
    for c, nb in ((k_codes, bits), (v_codes, v_bits or bits)):  # (past a row's end: the next row's codes, masked)
        d.append(TensorDescriptor(_DescBase(c, torch.int32), [_code_rows(c), 32], [32, 1], _code_block(nb),
                                  _code_smem()))
    for x in (k_scale, k_zero, v_scale, v_zero):
        d.append(TensorDescriptor(_DescBase(x, torch.int32), [x.shape[0] * x.shape[1], (x.shape[2] + 1) // 2],
                                  [x.stride(1) // 2, 1], list(_META_BLOCK), _meta_smem()))
    return d


def launch_args(*, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_sink, v_sink, k_window, v_window, o_part,
                l_part, lens, slen_b, slen_p, n_tok, cap, chunk, n_sink, n_window, qk_scale, H_KV, R, num_splits, bits,
                dev_lens, window_ring, tokens_on_m=False, maxnreg=None, l2_prefetch=0, balance=False, tma_stages=0,
                pdl=False, v_bits=None):
    """(args, kwargs) of the split kernel's launch over (num_splits, B * H_KV) programs; with sink or window rows
    (capacities above 0) the last split of each (batch, KV head) is its full-precision program. maxnreg: the register
    cap (:func:`occupancy`), None for ptxas's own choice; l2_prefetch: the L2 prefetch distance in tiles, taken only
    on sm_90 and later (the bulk prefetch is Hopper's) and where every tile of codes, scales and zeros starts 16-byte
    aligned (the bulk prefetch needs it; PackedKV's rows are), not with the TMA ring (its copies replace it), and not
    where K and V differ in width or in code strides (written for one width and one row base); elsewhere an asked
    distance is dropped without an error, as ``decode_attention(gluon_l2=)`` documents. balance: share each KV head's
    packed-middle programs out over the batch's rows by their work (device lengths per row; the merge must be launched
    balanced too). bits: K's code width; v_bits: V's (None: bits)."""
    import triton

    v_bits = v_bits or bits
    # V's code rows at K's (VBITS 0: one row computation serves both in the ring) only where they are laid out alike
    vbits = 0 if v_bits == bits and k_codes.stride()[:2] == v_codes.stride()[:2] else v_bits
    if vbits:
        l2_prefetch = 0  # written for one width and one row base (occupancy gives 0 for mixed widths already)
    B = q.shape[0]
    if l2_prefetch and (torch.cuda.get_device_capability(q.device) < (9, 0) or not all(
            t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:2])
            for t in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero))):
        l2_prefetch = 0
    S, W = k_sink.shape[2], k_window.shape[2]
    has_fp = S > 0 or W > 0
    tma = {}
    if tma_stages:
        if not tokens_on_m:
            raise ValueError("the TMA ring is written for the tokens-on-M form")
        tma = dict(zip(("kc_d", "vc_d", "ks_d", "kz_d", "vs_d", "vz_d"),
                       _tma_descriptors(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, v_bits)),
                   TMA_STAGES=int(tma_stages))
        l2_prefetch = 0

    def fp(t):  # an empty part gets a stand-in pointer (an empty CUDA tensor may have a null pointer); never read
        return (t, t.stride(0), t.stride(1), t.stride(2)) if t.shape[2] > 0 else (q, 0, 0, 0)

    (ks, *sks), (vs, *svs), (kw, *skw), (vw, *svw) = fp(k_sink), fp(v_sink), fp(k_window), fp(v_window)
    return (
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, o_part, l_part, lens, ks, vs, kw, vw,
        q.stride(0), q.stride(1), q.stride(3), k_codes.stride(0) // 4, k_codes.stride(1) // 4,
        k_scale.stride(0) // 2, k_scale.stride(1) // 2, v_codes.stride(0) // 4, v_codes.stride(1) // 4,
        v_scale.stride(0) // 2, v_scale.stride(1) // 2, slen_b, slen_p, *sks, *svs, *skw, *svw,
        n_tok, cap, chunk, n_sink, n_window, S, max(W, 1), qk_scale,
    ), dict(H_KV=H_KV, R=R, NUM_SPLITS=num_splits, BITS=bits, VBITS=vbits, DEV_LENS=dev_lens,
            PREFETCH_V=bits == 2 and v_bits == 2,
            HAS_FP=has_fp, WRING=bool(window_ring) and W > 0, TOKM=bool(tokens_on_m), L2PF=l2_prefetch,
            BALANCE=bool(balance), n_rows=B, B_P2=triton.next_power_of_2(B) if balance else 1, PDL=bool(pdl),
            LSM=_local_softmax(tokens_on_m, tma_stages), num_warps=1,
            **({} if maxnreg is None else {"maxnreg": maxnreg}), **tma)


def compile_sm90(bits: int, dev_lens: bool, r: int, has_fp: bool = False, dtype: str = "fp16", tokm: bool = False,
                 balance: bool = False, tma_stages: int = 0, pdl: bool = False, v_bits: int | None = None):
    """The split kernel compiled for sm_90 on this machine (no GPU needed; not under the Triton interpreter), with
    strides divisible by 16 as the runtime specialises them for the benchmark shapes, under the register cap the
    launch states (:func:`occupancy`): a triton CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _gluon_split_kernel
    maxnreg, _, l2pf = occupancy(r=r, bits=bits, has_fp=has_fp, tokens_on_m=tokm, v_bits=v_bits)
    v_bits = v_bits or bits
    ptrs = {"q_ptr": "*" + dtype, "k_codes": "*u8", "v_codes": "*u8", "k_scale": "*fp16", "k_zero": "*fp16",
            "v_scale": "*fp16", "v_zero": "*fp16", "op_ptr": "*fp32", "lp_ptr": "*fp32", "lens_ptr": "*i32",
            "k_sink": "*" + dtype, "v_sink": "*" + dtype, "k_win": "*" + dtype, "v_win": "*" + dtype}
    const = dict(H_KV=8, R=r, NUM_SPLITS=16, BITS=bits, VBITS=0 if v_bits == bits else v_bits, DEV_LENS=dev_lens,
                 PREFETCH_V=bits == 2 and v_bits == 2, HAS_FP=has_fp,
                 WRING=has_fp, TOKM=tokm, L2PF=0 if tma_stages else l2pf, BALANCE=balance, B_P2=8 if balance else 1,
                 sq_d=1, TMA_STAGES=tma_stages, PDL=pdl, LSM=_local_softmax(tokm, tma_stages))
    descs = {}
    for name in ("kc_d", "vc_d", "ks_d", "kz_d", "vs_d", "vz_d"):
        if not tma_stages:
            const[name] = None
        elif name in ("kc_d", "vc_d"):
            descs[name] = f"tensordesc<i32{_code_block(bits if name == 'kc_d' else v_bits)},{_code_smem()!r}>"
        else:
            descs[name] = f"tensordesc<i32{list(_META_BLOCK)},{_meta_smem()!r}>"
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            sig[name] = descs[name]
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in const:
            sig[name], consts[name] = "constexpr", const[name]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in ("n_tok", "cap", "chunk", "slen_b", "slen_p", "n_sink", "n_win", "s_cap", "w_rows",
                            "n_rows"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1, num_stages=1, **({} if maxnreg is None else {"maxnreg": maxnreg})))


def sm90_resources(bits: int, dev_lens: bool, r: int, has_fp: bool = False, dtype: str = "fp16",
                   tokm: bool = False, balance: bool = False, tma_stages: int = 0, v_bits: int | None = None) -> dict:
    """:func:`compile_sm90`'s build and what the design relies on: registers, stack, shared memory, the hot loop's
    length, and ``forbidden``: any shared-memory instruction (with the TMA ring: any store to shared memory, the
    copies fill it), or a local-memory one (a spill) inside the hot loop (the packed tiles'); ``programs_per_sm``:
    what the launch sizes its splits for (:func:`occupancy`), which the registers must allow (:func:`max_registers`);
    ``tma_copies``: the bulk tensor copies in the hot loop. tests/test_kernels_gluon.py checks it."""
    import triton

    from .sass_probe import sass_summary

    s = sass_summary(compile_sm90(bits, dev_lens, r, has_fp, dtype, tokm, balance, tma_stages, pdl=tma_stages > 0,
                                  v_bits=v_bits))
    if s is None:
        return {"skip": "this Triton ships no cuobjdump"}
    ins = s["ins"]
    lo, hi = max(s["loops"], key=lambda x: x[1] - x[0]) if s["loops"] else (0, -1)
    hot = [op.split(".")[0] for _, op, _ in ins[lo:hi + 1]]
    smem = ("STS",) if tma_stages else ("LDS", "STS", "LDSM", "BAR")
    return {"registers": s["registers"], "stack": s["stack"], "shared": int(s["shared"]), "triton": triton.__version__,
            "hot_loop": len(hot),
            "programs_per_sm": occupancy(r=r, bits=bits, has_fp=has_fp, tokens_on_m=tokm, v_bits=v_bits)[1],
            "l2_prefetches": sum(op.startswith("UBLKPF") for op in hot),
            "tma_copies": sum(op.startswith("UTMALDG") for op in hot),
            # shared memory anywhere; local memory (spills) in the hot loop, the packed tiles'
            "forbidden": sorted({op for _, op, _ in ins if op.split(".")[0] in smem}
                                | {op for op in hot if op in ("LDL", "STL")})}
