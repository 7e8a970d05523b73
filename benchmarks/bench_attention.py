"""Decode attention over a packed KV cache: fused Triton kernel vs fp16 SDPA vs dequantize-then-SDPA.

    python benchmarks/bench_attention.py [--out DIR] [--sweep] [--cases NAME,...]

Times are GPU time per call from CUDA-graph replays over rotating input copies (together > 4x L2), the
way a decode step captured in a graph runs; the "eager" column adds Python launch overhead
(``do_bench`` median, L2 flushed). Per case: fp16 SDPA on full-precision KV (``enable_gqa``), "dequantize then SDPA" (the whole packed cache
dequantized to fp16 every step, as transformers' QuantizedCache does), and the fused kernel, all measured
in this run on random (not zero) data. GB/s counts the packed bytes the fused kernel must read (codes + scales + zeros + q),
against a large device-to-device copy measured in the same run (read + write bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton

import _timing
from _timing import bench_graph, copies_for, do_bench_us, pyplot
from kvcompile.kernels.decode_attention import decode_attention, fused_decode_is_profitable

CASES = {
    # name: (B, Hq, Hkv, D, L, k_bits, v_bits, group, target vs SDPA)
    "k2v2_b8_gqa4_32k": (8, 32, 8, 128, 32768, 2, 2, 128, 6.0),
    "k2v2_b8_mha_16k": (8, 32, 32, 128, 16384, 2, 2, 128, 6.0),
    "k4v4_b8_gqa4_32k": (8, 32, 8, 128, 32768, 4, 4, 128, 3.3),
    "k2v2_b1_gqa4_128k": (1, 32, 8, 128, 131072, 2, 2, 128, None),
    "k2v2_b8_gqa4_1k": (8, 32, 8, 128, 1024, 2, 2, 128, None),
    # a mid-length context: 4 tiles per split, where the Gluon kernel's tokens-on-M form now takes over (NOTES.md v29)
    "k2v2_b8_gqa4_4k": (8, 32, 8, 128, 4096, 2, 2, 128, None),
    # SmolLM2-135M's attention shape (9 q / 3 kv heads of 64; the quality model), for its layouts (--extra)
    "k2v2_b8_smollm_32k": (8, 9, 3, 64, 32768, 2, 2, 64, None),
}

# --extra rows (NOTES.md v9, v10): per-channel keys and lengths read on the device.
# name: (CASES row it derives from, run_case keywords)
EXTRA_CASES = {
    # KIVI's layout: K per channel in groups of 32 tokens, V per token in groups of 32 channels, 128 recent
    "kivi_k2v2_b8_gqa4_32k_w128": ("k2v2_b8_gqa4_32k", dict(k_axis="channel", k_group=32, v_group=32, window=128)),
    # per-channel K alone (V as the first row: one group per token)
    "kchan32_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(k_axis="channel", k_group=32)),
    # per-token groups of 32 channels for V (group fill, timed against group_fill=False) and for K and V
    "vg32_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(v_group=32)),
    "g32_k4v4_b8_gqa4_32k": ("k4v4_b8_gqa4_32k", dict(k_group=32, v_group=32)),
    "vg32_k2v2_b8_mha_16k": ("k2v2_b8_mha_16k", dict(v_group=32)),
    # lengths as a [B, 3] device tensor, every row full: the CUDA-graph-capturable launch of the first row
    "devlen_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(lens="full")),
    # per-sequence lengths 32k, 28k, ..., 4k in a 32k-capacity cache (mean 18k): each row's length spread
    # over the splits; SDPA / dequant+SDPA columns are at the full 32k (a padded batch)
    "ragged_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(lens="ragged")),
    # the same with 4 sink + 128 window tokens (the full-precision program per row, fp_split) and KIVI's layout
    "ragged_k2v2_b8_gqa4_32k_s4_w128": ("k2v2_b8_gqa4_32k", dict(lens="ragged", sink=4, window=128)),
    "ragged_kivi_k2v2_b8_gqa4_32k_w128": ("k2v2_b8_gqa4_32k", dict(lens="ragged", k_axis="channel", k_group=32,
                                                                   v_group=32, window=128)),
    # a bf16 model (the whole-model benchmark's dtype): the bf16 magic number, V product in fp16; sink + window
    "bf16_k2v2_b8_gqa4_32k_s4_w128": ("k2v2_b8_gqa4_32k", dict(dtype=torch.bfloat16, sink=4, window=128)),
    "bf16_k4v4_b8_gqa4_32k_s4_w128": ("k4v4_b8_gqa4_32k", dict(dtype=torch.bfloat16, sink=4, window=128)),
    "bf16_kivi_k2v2_b8_gqa4_32k_w128": ("k2v2_b8_gqa4_32k", dict(dtype=torch.bfloat16, k_axis="channel", k_group=32,
                                                                 v_group=32, window=128)),
    # 4-bit codes in one group per head with KIVI's 128 recent tokens (no sink): the Gluon kernel's layout with the best
    # quality measured (README, "Which layout runs fastest at what quality"); against KIVI's 4-bit layout (Triton)
    "k4v4_b8_gqa4_32k_w128": ("k4v4_b8_gqa4_32k", dict(window=128)),
    "bf16_k4v4_b8_gqa4_32k_w128": ("k4v4_b8_gqa4_32k", dict(dtype=torch.bfloat16, window=128)),
    "kivi_k4v4_b8_gqa4_32k_w128": ("k4v4_b8_gqa4_32k", dict(k_axis="channel", k_group=32, v_group=32, window=128)),
    # 4-bit keys, 2-bit values in one group per head (the Gluon kernel since session 20): on SmolLM2 +2.3% perplexity
    # at 5.57 bits with 4 sink + 128 recent tokens (README); byte ceiling 2 * 256 / (64 + 32 + 8) = 4.92x
    "k4v2_b8_gqa4_32k_s4_w128": ("k4v4_b8_gqa4_32k", dict(v_bits=2, sink=4, window=128)),
    "k4v2_b8_gqa4_32k": ("k4v4_b8_gqa4_32k", dict(v_bits=2)),
    "bf16_k4v2_b8_gqa4_32k_s4_w128": ("k4v4_b8_gqa4_32k", dict(v_bits=2, sink=4, window=128, dtype=torch.bfloat16)),
    "k4v2_b8_mha_16k": ("k2v2_b8_mha_16k", dict(bits=4, v_bits=2)),
    # 8-bit codes, one absmax scale per token (the int8 / fp8 schemes) and affine 8-bit; the byte ceiling
    # against fp16 is 2 * 128 / (128 + 2) = 1.97x (int8 / fp8) and 1.94x (affine: scale + zero)
    "int8_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(bits=8, fmt="int8")),
    "fp8_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(bits=8, fmt="fp8")),
    "k8v8_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(bits=8)),
    "int8_b8_mha_16k": ("k2v2_b8_mha_16k", dict(bits=8, fmt="int8")),
    "bf16_int8_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(bits=8, fmt="int8", dtype=torch.bfloat16)),
    "bf16_fp8_b8_gqa4_32k_s4_w128": ("k2v2_b8_gqa4_32k", dict(bits=8, fmt="fp8", dtype=torch.bfloat16, sink=4,
                                                              window=128)),
    # per-token groups of 16 channels (SKVQ's group size; here with keys after RoPE): group fill with 8 groups x 4
    # query rows = 32 MMA rows per KV head, which spills one warp at BLOCK_N 32 (offline: 336 bytes of stack)
    "g16_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(k_group=16, v_group=16)),
    "g16_k2v2_b8_gqa4_32k_s4_w128": ("k2v2_b8_gqa4_32k", dict(k_group=16, v_group=16, sink=4, window=128)),
    "vg16_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(v_group=16)),
    # SmolLM2's shape in groups of 16 (skvq's group size there; keys after RoPE, V 2-bit): 4 groups x 4 rows = 16
    "g16_smollm_32k_s4_w128": ("k2v2_b8_smollm_32k", dict(k_group=16, v_group=16, sink=4, window=128)),
    # keys quantized before RoPE (skvq's pre_rope, with its channel order): rotated per element in the kernel
    "rope_g16_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(k_group=16, v_group=16, rope=True)),
    "rope_k2v2_b8_gqa4_32k": ("k2v2_b8_gqa4_32k", dict(rope=True)),
    "rope_g16_smollm_32k_s4_w128": ("k2v2_b8_smollm_32k", dict(k_group=16, v_group=16, sink=4, window=128, rope=True)),
    # skvq's defaults: keys before RoPE (2-bit, groups of 16, channel order), ternary values in groups of 16
    "skvq_smollm_32k_s4_w128": ("k2v2_b8_smollm_32k", dict(k_group=16, v_group=16, sink=4, window=128, rope=True,
                                                            v_bits=1.5)),
    "skvq_b8_gqa4_32k_s4_w128": ("k2v2_b8_gqa4_32k", dict(k_group=16, v_group=16, sink=4, window=128, rope=True,
                                                          v_bits=1.5)),
    "smollm_32k_s4_w128": ("k2v2_b8_smollm_32k", dict(sink=4, window=128)),
    # NF4 codebook codes (the nqkv scheme: blocks of 64 channels through group fill; and one block per head), timed
    # with the affine 4-bit layout of the same groups; byte ceiling 2 * 128 / (64 + 2 * 2) = 3.76x (blocks of 64)
    "nf4_b8_gqa4_32k": ("k4v4_b8_gqa4_32k", dict(fmt="nf", k_group=64, v_group=64)),
    "g64_k4v4_b8_gqa4_32k": ("k4v4_b8_gqa4_32k", dict(k_group=64, v_group=64)),
    "nf4g128_b8_gqa4_32k": ("k4v4_b8_gqa4_32k", dict(fmt="nf")),
    "bf16_nf4_b8_gqa4_32k_s4_w128": ("k4v4_b8_gqa4_32k", dict(fmt="nf", k_group=64, v_group=64, dtype=torch.bfloat16,
                                                              sink=4, window=128)),
}


def bench(fn, reps=200):
    return do_bench_us(fn, reps, warmup=25)


def copy_bandwidth():
    return _timing.copy_bandwidth(bench)


def make_case(B, Hq, Hkv, D, L, kb, vb, g, sink=0, window=0, dtype=torch.float16, seed=0, k_axis="token",
              k_group=None, v_group=None, lens=None, bits=None, fmt="affine", rope=False, v_bits=None):
    """Random packed KV. lens: None (host ints n_quant / n_window), "full" (a [B, 3] device lengths tensor,
    every row full) or "ragged" (row i holds L * (B - i) / B tokens, window full). bits: both sides' bits
    instead of the row's (8: one group per token); fmt "int8" / "fp8": 8-bit codes with one absmax scale per
    token and no zero (fp8 codes drawn without NaN); "nf": NF4 codebook codes, an absmax scale per group, no zero.
    rope: keys quantized before RoPE (skvq's pre_rope: Llama-3's inverse frequencies, a random channel order per
    KV head)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_quant = L - sink - window
    if bits is not None:
        kb = vb = bits
        if bits == 8:
            g = D
    if v_bits is not None:  # the values' bits alone (1.5: ternary)
        vb = v_bits
    k_group, v_group = k_group or g, v_group or g

    # per-token rows allocated in multiples of 32 tokens (views of n_quant): PackedKV pads its scale / zero rows so (the
    # Gluon kernel's pairs and TMA ring need it); its code rows are whole 128-byte lines for these rows' n_quant anyway
    rows = -(-n_quant // 32) * 32

    def packed(bits, axis, grp):
        width = -(-D // 5) if bits == 1.5 else D * bits // 8  # ternary: 5 base-3 digits per byte
        codes = torch.randint(0, 243 if bits == 1.5 else 256, (B, Hkv, rows, width), dtype=torch.uint8,
                              device="cuda", generator=gen)[:, :, :n_quant]
        if fmt == "fp8":
            codes &= 0xF7  # e4m3's NaN is 0x7F / 0xFF
        shape = (B, Hkv, n_quant // grp, D) if axis == "channel" else (B, Hkv, rows, D // grp)
        scale = (torch.rand(*shape, device="cuda", generator=gen) * 0.5 + 0.05).half()[:, :, :n_quant]
        zero = None if fmt != "affine" else (torch.randn(*shape, device="cuda", generator=gen)).half()[:, :, :n_quant]
        if fmt == "nf":
            nf4_table(codes.device)
        return codes, scale, zero

    kw = dict(q=torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype, generator=gen))
    for n, bits, axis, grp in (("k", kb, k_axis, k_group), ("v", vb, "token", v_group)):
        c, s, z = packed(bits, axis, grp)
        kw.update({f"{n}_codes": c, f"{n}_scale": s, f"{n}_zero": z,
                   f"{n}_sink": torch.randn(B, Hkv, sink, D, device="cuda", dtype=dtype, generator=gen),
                   f"{n}_window": torch.randn(B, Hkv, window, D, device="cuda", dtype=dtype, generator=gen)})
    kw.update(k_bits=kb, v_bits=vb, k_group_size=k_group, v_group_size=v_group)
    if fmt != "affine":
        kw.update(k_format=fmt, v_format=fmt)
    if k_axis != "token":
        kw["k_axis"] = k_axis
    if rope:
        kw["k_rope"] = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
        kw["k_perm"] = torch.stack([torch.randperm(D, device="cuda", generator=gen) for _ in range(Hkv)])
    if lens is None:
        kw.update(n_quant=n_quant, n_window=window)
    else:
        # ragged rows; per-channel keys fill whole token groups (a KIVI cache flushes a group at a time)
        grain = k_group if k_axis == "channel" and k_group else 1
        rows = [(sink, n_quant if lens == "full" else (n_quant * (B - i)) // B // grain * grain, window)
                for i in range(B)]
        kw["lengths"] = torch.tensor(rows, dtype=torch.int32, device="cuda")
    return kw


def row_lengths(kw):
    """[(n_sink, n_quant, n_window)] per batch row (host ints; for the benchmark's own checks)."""
    B = kw["q"].shape[0]
    if "lengths" in kw:
        return [tuple(r) for r in kw["lengths"].tolist()]
    return [(kw["k_sink"].shape[2], kw["n_quant"], kw["n_window"])] * B


def packed_bytes(kw):
    """Bytes the fused kernel must read: the valid tokens' codes, scales / zeros, sink and window, + q / out."""
    rows = row_lengths(kw)
    n = 0
    for nm in "kv":
        codes, scale, window = kw[f"{nm}_codes"], kw[f"{nm}_scale"], kw[f"{nm}_window"]
        per_row = lambda t: t[0].numel() * t.element_size()  # noqa: E731
        for n_s, n_q, n_w in rows:
            frac = n_q / max(1, codes.shape[2])
            n += per_row(codes) * frac + (1 if kw.get(f"{nm}_format", "affine") != "affine" else 2) * per_row(scale) * frac
            n += per_row(window) * n_w / max(1, window.shape[2]) + per_row(kw[f"{nm}_sink"])
    return n + 2 * kw["q"].numel() * kw["q"].element_size()  # q in, out


_NF4_TABLES = {}


def nf4_table(device):
    """The NF4 codebook in fp16 on ``device``, made once (a host copy is not allowed inside graph capture)."""
    if device not in _NF4_TABLES:
        from kvcompile.quant import nf_codebook

        _NF4_TABLES[device] = nf_codebook(4, device).half()
    return _NF4_TABLES[device]


def dequantize_fp16(codes, scale, zero, bits, g, fmt="affine"):
    """The unfused path: unpack + dequantize the whole middle to fp16 (what a QuantizedCache does)."""
    if fmt == "nf":  # NF4: codebook values times the group's scale (the table made outside graph capture)
        c = torch.stack([codes & 0xF, codes >> 4], -1).reshape(*codes.shape[:-1], -1).long()
        c = nf4_table(codes.device)[c].reshape(*codes.shape[:-1], -1, g)
        return (c * scale[..., None]).reshape(*c.shape[:-2], -1)
    if fmt != "affine":  # int8 / fp8: one scale per token
        return codes.view(torch.int8 if fmt == "int8" else torch.float8_e4m3fn).to(torch.float16) * scale
    if bits == 1.5:  # ternary: base-3 digits, 5 per byte
        from kvcompile.quant import unpack_codes

        c = unpack_codes(codes, 1.5, scale.shape[-1] * g).to(torch.float16)
    else:
        per = 8 // bits
        shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
        c = (codes[..., None] >> shifts) & ((1 << bits) - 1)
        c = c.reshape(*codes.shape[:-1], -1).to(torch.float16)
    c = c.reshape(*c.shape[:-1], -1, g)
    return (c * scale[..., None] + zero[..., None]).reshape(*c.shape[:-2], -1)


def dequantize_fp16_channel(codes, scale, zero, bits, g):
    """Per-channel keys (KIVI): scale / zero [B, H, T // g, D] over groups of g tokens."""
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    c = ((codes[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*codes.shape[:-1], -1).to(torch.float16)
    return (c * scale.repeat_interleave(g, dim=2) + zero.repeat_interleave(g, dim=2))


def dequant_sdpa(kw, sm_scale):
    """The whole packed cache dequantized to fp16, then SDPA (every row full). Reads no device lengths:
    it runs inside CUDA-graph capture (make_case's device-length rows always hold their full window)."""
    n_w = kw["n_window"] if "n_window" in kw else kw["k_window"].shape[2]
    deq_k = dequantize_fp16_channel if kw.get("k_axis") == "channel" else dequantize_fp16
    dt = kw["q"].dtype
    fk, fv = ({"fmt": kw[f"{n}_format"]} if f"{n}_format" in kw else {} for n in "kv")
    k_mid = deq_k(kw["k_codes"], kw["k_scale"], kw["k_zero"], kw["k_bits"], kw["k_group_size"], **fk)
    if "k_rope" in kw:  # keys before RoPE: rotated by their positions (the kernel reference's rule)
        from kvcompile.kernels.reference import rotate_stored

        k_mid = rotate_stored(k_mid.float(), kw["k_rope"], kw["k_perm"], kw["k_sink"].shape[2])
    ks = [kw["k_sink"], k_mid.to(dt), kw["k_window"][:, :, :n_w]]
    vs = [kw["v_sink"], dequantize_fp16(kw["v_codes"], kw["v_scale"], kw["v_zero"], kw["v_bits"],
                                        kw["v_group_size"], **fv).to(dt), kw["v_window"][:, :, :n_w]]
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    return F.scaled_dot_product_attention(kw["q"], k, v, scale=sm_scale, enable_gqa=True)


def dequant_sdpa_rows(kw, sm_scale):
    """Reference output with per-row lengths: dequant + SDPA on each row's valid tokens."""
    outs = []
    for b, (n_s, n_q, n_w) in enumerate(row_lengths(kw)):
        one = {k: (v[b : b + 1] if torch.is_tensor(v) and k != "lengths" else v) for k, v in kw.items()}
        for nm in "kv":
            one[f"{nm}_codes"] = one[f"{nm}_codes"][:, :, :n_q]
            one[f"{nm}_window"] = one[f"{nm}_window"][:, :, :n_w]
            grp = kw[f"{nm}_group_size"] if (nm == "k" and kw.get("k_axis") == "channel") else 1
            for p in ("scale", "zero"):
                if one[f"{nm}_{p}"] is not None:
                    one[f"{nm}_{p}"] = one[f"{nm}_{p}"][:, :, : n_q // grp]
        one.pop("lengths", None)
        one.update(n_quant=n_q, n_window=n_w)
        outs.append(dequant_sdpa(one, sm_scale))
    return torch.cat(outs, 0)


def kernel_resources():
    """Registers / spills of the compiled split kernels (best effort; Triton internals)."""
    from kvcompile.kernels import decode_attention as da

    out = []
    try:
        for cache in da._decode_split_kernel.device_caches.values():
            for k in cache[0].values():
                out.append(f"{k.metadata.num_warps}w regs={k.n_regs} spills={k.n_spills}")
    except Exception as e:  # noqa: BLE001
        out.append(f"n/a ({type(e).__name__})")
    return out


# --variants: the constexpr-flag variants of NOTES.md v6..v8, timed against the default in the same run
VARIANTS = {
    "gqa": {"fill": dict(fill_rows=True), "fill_bn32": dict(fill_rows=True, block_n=32),
            "fill_bn32_pps10": dict(fill_rows=True, block_n=32, programs_per_sm=10)},
    "mha": {"v5_nodot_bn32": dict(use_dot=False, block_n=32),  # the v5 default
            "dot_fill_bn32": dict(use_dot=True, fill_rows=True, block_n=32),
            "dot_fill_bn32_pps12": dict(use_dot=True, fill_rows=True, block_n=32, programs_per_sm=12)},
    "window": {"v5_no_fp_split": dict(fp_split=False),  # the v5 default
               "fp_split_ns17": dict(fp_split=True, num_splits=17),
               "fp_split_fill": dict(fp_split=True, fill_rows=True), "fp_contig": dict(fp_split=False, fp_contig=True)},
}


# per-token groups below D (NOTES.md v11): group fill against dequantizing in registers, and its load / tile options
GROUP_VARIANTS = {"no_group_fill": dict(group_fill=False), "gf_bcast": dict(group_bcast=True),
                  "gf_bn32": dict(block_n=32), "gf_bcast_bn32": dict(group_bcast=True, block_n=32),
                  "gf_bcast_w2": dict(group_bcast=True, num_warps=2)}
# per-channel keys (NOTES.md v12): the key tile dequantized per plane instead of q scaled per tile
KCHAN_VARIANTS = {"kc_dequant": dict(kchan_dequant=True), "kc_scale_q": dict(kchan_dequant=False)}
# head fill (NOTES.md v13): several KV heads per program fill the 16 MMA rows (GQA-4: 4 heads); tile and
# pipeline options, since each program now holds HFILL heads' code tiles in shared memory
HEAD_VARIANTS = {"no_head_fill": dict(head_fill=False), "hf_bn64": dict(head_fill=True),
                 "hf_bn64_st2": dict(head_fill=True, num_stages=2),
                 "hf_bn32_st2": dict(head_fill=True, block_n=32, num_stages=2),
                 "hf_bn32_st3": dict(head_fill=True, block_n=32, num_stages=3),
                 "hf2_bn64_st2": dict(head_fill=2, num_stages=2),
                 "hf2_bn32_st2": dict(head_fill=2, block_n=32, num_stages=2),
                 "hf_bn32_st2_pps6": dict(head_fill=True, block_n=32, num_stages=2, programs_per_sm=6)}


# more warps per program (NOTES.md v14): the 1-warp build holds ~250 registers, so 8 programs (8 warps) share an
# SM; 2 / 4 warps split the tile across warps at fewer registers each. Every variant sets programs_per_sm to the
# occupancy its registers allow (offline triton 3.6 builds: sass_probe), so the splits fill exactly one wave
# (the sweeps of 2026-11-25 kept 8 per SM, which sent 2- and 4-warp builds into a second wave).
def warp_variants(case):
    """name -> launcher kwargs for one bench case (its layout decides the register counts)."""
    if case.startswith("k4v4"):  # 2w 198 regs -> 5 / SM, 4w BN128 168 -> 3
        return {"w2_pps5": dict(num_warps=2, programs_per_sm=5), "w2_st2_pps5": dict(num_warps=2, num_stages=2,
                programs_per_sm=5), "w4_bn128_pps3": dict(num_warps=4, block_n=128, programs_per_sm=3)}
    if "mha" in case:  # 2w 127 regs -> 8, 4w BN128 142 -> 3
        return {"w2_pps8": dict(num_warps=2, programs_per_sm=8), "w2_pps7": dict(num_warps=2, programs_per_sm=7),
                "w4_bn128_pps3": dict(num_warps=4, block_n=128, programs_per_sm=3)}
    if case.startswith("kivi"):  # 2w 144 -> 7
        return {"w2_pps7": dict(num_warps=2, programs_per_sm=7), "w2_pps6": dict(num_warps=2, programs_per_sm=6)}
    if case.startswith("vg32"):  # 2w 168 -> 6
        return {"w2_pps6": dict(num_warps=2, programs_per_sm=6), "w2_pps5": dict(num_warps=2, programs_per_sm=5)}
    if case.startswith("g32"):  # 2w 212 -> 4
        return {"w2_pps4": dict(num_warps=2, programs_per_sm=4)}
    # K2V2 one group per head: 2w BN64 162 regs -> 6 / SM; 2w BN32 128 -> 8; 4w BN64 96 -> 5; 4w BN128 128 -> 4
    return {"w2_pps6": dict(num_warps=2, programs_per_sm=6), "w2_st2_pps6": dict(num_warps=2, num_stages=2, programs_per_sm=6),
            "w2_pps5": dict(num_warps=2, programs_per_sm=5), "w2_bn32_pps8": dict(num_warps=2, block_n=32, programs_per_sm=8),
            "w4_pps5": dict(num_warps=4, programs_per_sm=5), "w4_pps4": dict(num_warps=4, programs_per_sm=4),
            "w4_bn128_pps4": dict(num_warps=4, block_n=128, programs_per_sm=4),
            "w2_bn128_pps4": dict(num_warps=2, block_n=128, programs_per_sm=4)}


# with the scales prefetched (v14), BLOCK_N 32 needs 168 registers (one group per token; V in groups of 32: 204),
# so 12 (10) one-warp programs fit an SM instead of 8; and a fourth pipeline stage for the code tiles
def occupancy_variants(case):
    if case.startswith("vg32"):
        return {"bn32_pps10": dict(block_n=32, programs_per_sm=10)}
    if case.startswith("k2v2"):
        return {"bn32_pps12": dict(block_n=32, programs_per_sm=12), "bn32_pps10": dict(block_n=32, programs_per_sm=10),
                "bn32_pps12_st4": dict(block_n=32, programs_per_sm=12, num_stages=4), "st4": dict(num_stages=4)}
    return {"st4": dict(num_stages=4)}


# scales / zeros loaded one tile ahead (NOTES.md v14; the default since), against the loads in the tile
PREFETCH_VARIANTS = {"no_prefetch": dict(prefetch=False), "prefetch_st2": dict(prefetch=True, num_stages=2)}


def sdpa_calls(q, Hkv, L, sm_scale):
    """The baseline: closures calling ``F.scaled_dot_product_attention`` for ``q`` [B, Hq, Nq, D] over full-precision
    caches of L tokens in q's dtype (fp16 unless the row says bf16), one per rotating copy (together beyond L2)."""
    B, _, _, D = q.shape
    kvs = [(torch.randn(B, Hkv, L, D, device="cuda", dtype=q.dtype), torch.randn(B, Hkv, L, D, device="cuda",
                                                                                 dtype=q.dtype))
           for _ in range(copies_for(2 * B * Hkv * L * D * q.element_size()))]
    return [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=sm_scale, enable_gqa=True)
            for k, v in kvs]


def run_case(name, spec, bw, sweep, sink=0, window=0, log=print, variants=None, **layout):
    B, Hq, Hkv, D, L, kb, vb, g, target = spec
    sm_scale = 1.0 / math.sqrt(D)
    kw = make_case(B, Hq, Hkv, D, L, kb, vb, g, sink=sink, window=window, **layout)
    kb, vb, g = kw["k_bits"], kw["v_bits"], kw["v_group_size"]  # a layout may change them (bits=8)
    if layout.get("bits") == 8 or layout.get("v_bits") is not None:
        target = None  # the targets are for 2- and 4-bit codes of one width; 8-bit's byte ceiling is 1.97x
    nbytes = packed_bytes(kw)
    fp_bytes = 2 * B * Hkv * L * D * 2
    kws = [kw] + [make_case(B, Hq, Hkv, D, L, kb, vb, g, sink=sink, window=window, seed=i, **layout)
                  for i in range(1, copies_for(nbytes))]
    # fp16 SDPA on a same-length full-precision cache
    sdpa = sdpa_calls(kw["q"], Hkv, L, sm_scale)
    t_sdpa = bench_graph(sdpa)
    t_sdpa_eager = bench(sdpa[0])
    del sdpa
    deq = [lambda c=c: dequant_sdpa(c, sm_scale) for c in kws[: copies_for(fp_bytes, most=8)]]
    t_deq = bench_graph(deq, reps=10)
    ref = (dequant_sdpa_rows(kw, sm_scale) if "lengths" in kw else dequant_sdpa(kw, sm_scale)).float()
    out, _ = decode_attention(**kw, sm_scale=sm_scale)
    rel = ((out.float() - ref).norm() / ref.norm()).item()

    def fused(**tuning):
        return bench_graph([lambda c=c: decode_attention(**c, sm_scale=sm_scale, **tuning) for c in kws])

    extra_variants = variants
    t_fused = fused()
    t_fused_eager = bench(lambda: decode_attention(**kw, sm_scale=sm_scale))
    variants = {"default": t_fused}
    if sweep:
        sweep_cfgs = {
            "bn128_w4": dict(block_n=128, num_warps=4),
            "bn128_w1": dict(block_n=128, num_warps=1),
            "bn64_w1_st2": dict(block_n=64, num_warps=1, num_stages=2),
            "bn64_w2": dict(block_n=64, num_warps=2),
            "pps6": dict(programs_per_sm=6),
            "pps12": dict(programs_per_sm=12),
            "no_asm_unpack": dict(fast_asm=False),
        }
        if Hq == Hkv:
            sweep_cfgs.update(nodot_bn64_w1=dict(use_dot=False, block_n=64, num_warps=1),
                              nodot_bn16_w1=dict(use_dot=False, block_n=16, num_warps=1),
                              nodot_bn32_w2=dict(use_dot=False, block_n=32, num_warps=2),
                              dot_bn32_w1=dict(use_dot=True, block_n=32, num_warps=1))
        for key, cfg in sweep_cfgs.items():
            try:
                variants[key] = fused(**cfg)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is just skipped
                log(f"  {key}: {type(e).__name__}: {str(e)[:120]}")
    for key, cfg in (extra_variants or {}).items():
        try:
            variants[key] = fused(**cfg)
            o, _ = decode_attention(**kw, sm_scale=sm_scale, **cfg)
            log(f"  {name} {key}: {variants[key]:.1f} us, rel err {((o.float() - ref).norm() / ref.norm()).item():.1e}")
        except Exception as e:  # noqa: BLE001
            log(f"  {key}: {type(e).__name__}: {str(e)[:200]}")
    if extra_variants:  # the default once more, after the variants: the run-to-run spread inside the row
        variants["default_again"] = fused()
        log(f"  {name} default_again: {variants['default_again']:.1f} us (first {t_fused:.1f})")
    best_key = min(variants, key=variants.get)
    row = dict(case=name, B=B, Hq=Hq, Hkv=Hkv, D=D, L=L, k_bits=kb, v_bits=vb, group=g, sink=sink, window=window,
               layout={k: v for k, v in layout.items() if v is not None},
               copies=len(kws), sdpa_us=t_sdpa, sdpa_eager_us=t_sdpa_eager, dequant_sdpa_us=t_deq,
               fused_us=t_fused, fused_eager_us=t_fused_eager, best_variant=best_key,
               best_us=variants[best_key], vs_sdpa=t_sdpa / t_fused, vs_dequant=t_deq / t_fused,
               packed_MB=nbytes / 1e6, fused_GBps=nbytes / (t_fused * 1e-6) / 1e9, copy_GBps=bw,
               rel_err_vs_dequant_sdpa=rel, target_vs_sdpa=target,
               profitable_eager=fused_decode_is_profitable(batch=B, kv_heads=Hkv, head_dim=D, seq_len=L,
                                                           k_bits=kb, v_bits=vb),
               profitable_graph=fused_decode_is_profitable(batch=B, kv_heads=Hkv, head_dim=D, seq_len=L,
                                                           k_bits=kb, v_bits=vb, cuda_graph=True),
               variants=variants)
    del kw, kws
    torch.cuda.empty_cache()
    return row


def table(rows):
    hdr = ("| case | SDPA fp16 us | dequant+SDPA us | fused us | vs SDPA | vs dequant+SDPA | packed GB/s "
           "| % of copy | target | eager: SDPA / fused us | best variant (us) | rel err |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        tgt = f">= {r['target_vs_sdpa']}x" if r["target_vs_sdpa"] else ("fallback" if r["L"] <= 2048 else "-")
        lines.append(
            f"| {r['case']} | {r['sdpa_us']:.1f} | {r['dequant_sdpa_us']:.1f} | {r['fused_us']:.1f} | "
            f"{r['vs_sdpa']:.2f}x | {r['vs_dequant']:.1f}x | {r['fused_GBps']:.0f} | "
            f"{100 * r['fused_GBps'] / r['copy_GBps']:.0f}% | {tgt} | {r['sdpa_eager_us']:.0f} / {r['fused_eager_us']:.0f} | "
            f"{r['best_variant']} ({r['best_us']:.1f}) | "
            f"{r['rel_err_vs_dequant_sdpa']:.1e} |")
    return "\n".join(lines)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["case"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["vs_sdpa"] for r in rows], 0.4, label="fused / fp16 SDPA")
    ax.bar([i + 0.2 for i in x], [r["sdpa_us"] / r["dequant_sdpa_us"] for r in rows], 0.4,
           label="dequant+SDPA / fp16 SDPA")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(list(x), names, rotation=15, fontsize=7)
    ax.set_ylabel("speed vs fp16 SDPA (higher is faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def with_flag_variants(var, name, args):
    """The variant sets the command-line flags add to a --cases row (NOTES.md v13, v14)."""
    for on, more in ((args.head_fill, lambda: HEAD_VARIANTS), (args.warps, lambda: warp_variants(name)),
                     (args.prefetch, lambda: PREFETCH_VARIANTS), (args.occupancy, lambda: occupancy_variants(name)),
                     (args.stages, lambda: STAGE_VARIANTS), (args.warps4bit, lambda: WARPS4_VARIANTS),
                     (args.lazy, lambda: LAZY_VARIANTS), (args.balance, lambda: BALANCE_VARIANTS),
                     (args.fp_bn, lambda: FPBN_VARIANTS), (args.denormal, lambda: DEN_VARIANTS),
                     (args.gluon, lambda: GLUON_VARIANTS), (args.l2, lambda: L2_VARIANTS),
                     (args.tma, lambda: TMA_VARIANTS)):
        if on:
            var = dict(var or {}, **more())
    return var


# --lazy: the accumulators' rescale skipped on tiles where no row's max grew (NOTES.md v23), against the default
# measured again in the same row
LAZY_VARIANTS = {"lazy": dict(lazy_rescale=True), "eager_rescale": dict(lazy_rescale=False)}
# --balance: per-row device lengths with the programs shared out by the rows' work (the default) or a fixed number
# per row (NOTES.md, ragged batches)
BALANCE_VARIANTS = {"balanced": dict(balance=True), "fixed_split": dict(balance=False)}
# --fp-bn: the sink / window tiles at their own size, by plane or contiguous loads (NOTES.md v24)
FPBN_VARIANTS = {"fp64": dict(fp_block_n=64), "fp16": dict(fp_block_n=16),
                 "fp16_contig": dict(fp_block_n=16, fp_contig=True), "fp32": dict(fp_block_n=32),
                 "fp16_contig_nosplit": dict(fp_block_n=16, fp_contig=True, fp_split=False),
                 "fp64_nosplit": dict(fp_block_n=64, fp_split=False)}

# --denormal: the packed values' codes as fp16 subnormals, nothing to subtract (the default, session 11), against
# 1024 + code and an exact subtraction
DEN_VARIANTS = {"v_den": dict(v_denormal=True), "v_offset": dict(v_denormal=False)}

# --gluon: the Gluon kernel (kvcompile/kernels/gluon_decode.py) in its two forms, tokens on the MMA's M side (v28) and
# query rows on it (v27), against the Triton kernel, each forced (rows a form does not take report its error, skipped)
GLUON_VARIANTS = {"gluon_tokens": dict(gluon="tokens"), "gluon_rows": dict(gluon="rows"), "triton": dict(gluon=False)}
# --l2: the Gluon kernel's L2 prefetch distance and programs per SM (v29: 1 tile for 4-bit codes, 12 programs per SM for
# the one-row 2-bit build); each row's default is one of these
L2_VARIANTS = {"l2pf0": dict(gluon_l2=0), "l2pf1": dict(gluon_l2=1), "l2pf2": dict(gluon_l2=2),
               "pps8": dict(programs_per_sm=8), "pps12": dict(programs_per_sm=12)}
# --tma: the Gluon kernel's tokens-on-M tiles through a shared-memory ring fed by bulk tensor copies (v31), by stages
# and programs per SM, against the register loads (tma0)
TMA_VARIANTS = {"tma0": dict(gluon_tma=0), "tma1": dict(gluon_tma=1), "tma3": dict(gluon_tma=3),
                "tma2_pps12": dict(gluon_tma=2, programs_per_sm=12), "tma2_pps8": dict(gluon_tma=2, programs_per_sm=8)}

# --stages: BLOCK_N 32 with 2-4 pipeline stages (offline triton 3.6, K4V4 g128: 238 registers and no stack at 32,
# against 255 and 8 bytes of stack for the 4-bit default BLOCK_N 64 with two stages)
STAGE_VARIANTS = {"bn32_st2": dict(block_n=32, num_stages=2), "bn32_st3": dict(block_n=32, num_stages=3),
                  "bn32_st4": dict(block_n=32, num_stages=4), "bn64_st3": dict(block_n=64, num_stages=3)}


# --warps4bit: more warps or smaller tiles around the 4-bit default (BLOCK_N 32, 3 stages, one warp, 8 programs per
# SM), the grid sized to each build's occupancy (offline triton 3.6 registers: 2 warps at 64 214, at 32 168; 4 warps
# at 64 161; one warp at 16 204)
WARPS4_VARIANTS = {"w2_bn64_pps4": dict(num_warps=2, block_n=64, num_stages=3, programs_per_sm=4),
                   "w2_bn32_pps6": dict(num_warps=2, block_n=32, num_stages=3, programs_per_sm=6),
                   "w4_bn64_pps3": dict(num_warps=4, block_n=64, num_stages=3, programs_per_sm=3),
                   "bn16_st3_pps10": dict(block_n=16, num_stages=3, programs_per_sm=10),
                   "bn16_st4_pps10": dict(block_n=16, num_stages=4, programs_per_sm=10)}


# 8-bit rows: the launcher's BLOCK_N 32 (BLOCK_N 64 spilled offline) against 64 / 16 and two pipeline stages
BITS8_VARIANTS = {"bn64": dict(block_n=64), "bn16": dict(block_n=16), "st2": dict(num_stages=2),
                  "bn64_st2": dict(block_n=64, num_stages=2)}


# 32 or more MMA rows per program (groups of 16): more warps per program, the grid sized to their occupancy (offline
# triton 3.6: 2 or 4 warps at BLOCK_N 32 need 226 registers and no stack; one warp spills at 32 and 16)
ROWS32_VARIANTS = {"w1_bn16": dict(block_n=16), "w2_pps4": dict(num_warps=2, programs_per_sm=4),
                   "w4_pps2": dict(num_warps=4, programs_per_sm=2), "w2_bn16_pps6": dict(num_warps=2, block_n=16,
                                                                                         programs_per_sm=6),
                   "w4_pps2_bn64": dict(num_warps=4, programs_per_sm=2, block_n=64)}


# NF4 rows: the PTX codebook lookup against the plain-Triton select chain, and BLOCK_N around the default 32
NF4_VARIANTS = {"plain_select": dict(fast_asm=False), "bn64": dict(block_n=64), "bn16": dict(block_n=16),
                "no_prefetch": dict(prefetch=False)}


# --rope: keys before RoPE (rows with rope=True): the angle-addition table (v22) against the per-element angles (v20),
# each with and without group fill (the table alone turns group fill off for grouped keys: "table" is without it)
ROPE_VARIANTS = {"per_element": dict(rope_table=False), "table": dict(rope_table=True),
                 "per_element_no_gf": dict(rope_table=False, group_fill=False),
                 "table_gf": dict(rope_table=True, group_fill=True)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time block/warp/split variants")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--window", action="store_true", help="add a sink=4 + window=128 row for the first case")
    ap.add_argument("--variants", action="store_true", help="also time the VARIANTS flags (NOTES.md v6..v8)")
    ap.add_argument("--extra", default="", help="comma-separated EXTRA_CASES rows (NOTES.md v9, v10), or 'all'")
    ap.add_argument("--head-fill", action="store_true", help="time the HEAD_VARIANTS on the --cases rows (NOTES.md v13)")
    ap.add_argument("--warps", action="store_true", help="time warp_variants() on every row (NOTES.md v14)")
    ap.add_argument("--prefetch", action="store_true", help="time PREFETCH_VARIANTS on every row (NOTES.md v14)")
    ap.add_argument("--occupancy", action="store_true", help="time occupancy_variants() on every row (NOTES.md v14)")
    ap.add_argument("--stages", action="store_true", help="time STAGE_VARIANTS on every row (BLOCK_N 32, 2-4 stages)")
    ap.add_argument("--warps4bit", action="store_true", help="time WARPS4_VARIANTS on every row (4-bit occupancy)")
    ap.add_argument("--rope", action="store_true", help="time ROPE_VARIANTS on the keys-before-RoPE rows (NOTES.md v22)")
    ap.add_argument("--lazy", action="store_true", help="time LAZY_VARIANTS on every row (NOTES.md v23)")
    ap.add_argument("--balance", action="store_true", help="time BALANCE_VARIANTS on every row (ragged batches)")
    ap.add_argument("--fp-bn", action="store_true", help="time FPBN_VARIANTS on every row (sink / window tiles)")
    ap.add_argument("--denormal", action="store_true", help="time DEN_VARIANTS on every row (value codes as subnormals)")
    ap.add_argument("--gluon", action="store_true", help="time GLUON_VARIANTS on every row (the Gluon kernel, v27)")
    ap.add_argument("--l2", action="store_true", help="time L2_VARIANTS on every row (the Gluon kernel, v29)")
    ap.add_argument("--tma", action="store_true", help="time TMA_VARIANTS on every row (the Gluon kernel's ring, v31)")
    ap.add_argument("--defaults-only", action="store_true", help="--extra rows: time the defaults only, no variants")
    ap.add_argument("--isolated", action="store_true",
                    help="time each graph replay from an idle GPU, its launch latency inside the sample (the method "
                         "of sessions 1-18; the default queues each replay behind a spin kernel: _timing.bench_graph)")
    args = ap.parse_args(argv)
    _timing.QUEUED = not args.isolated
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "bench_attention.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dev = torch.cuda.get_device_name()
    log(f"# {datetime.date.today()} {dev}, torch {torch.__version__}, triton {triton.__version__}; graph replays "
        + ("isolated (launch latency inside each sample)" if args.isolated else "queued behind a spin kernel"))
    bw = copy_bandwidth()
    log(f"copy bandwidth (1 GiB device-to-device, read+write): {bw:.0f} GB/s")
    rows = []
    for name in [c for c in args.cases.split(",") if c]:
        var = None
        if args.variants:
            var = VARIANTS["mha"] if CASES[name][1] == CASES[name][2] else VARIANTS["gqa"]
            if not (name.startswith("k2v2_b8_gqa4_32k") or "mha" in name):
                var = dict(list(var.items())[:1])  # one variant on the other rows
        var = with_flag_variants(var, name, args)
        row = run_case(name, CASES[name], bw, args.sweep, log=log, variants=var)
        rows.append(row)
        log(json.dumps(row, default=str))
        if args.window and name == "k2v2_b8_gqa4_32k":
            var = with_flag_variants(VARIANTS["window"] if args.variants else None, name, args)
            row = run_case(name + "_s4_w128", CASES[name], bw, False, sink=4, window=128, log=log, variants=var)
            rows.append(row)
            log(json.dumps(row, default=str))
    extra = list(EXTRA_CASES) if args.extra == "all" else [e for e in args.extra.split(",") if e]
    for name in extra:
        base, layout = EXTRA_CASES[name]
        layout = dict(layout)
        sink, window = layout.pop("sink", 0), layout.pop("window", 0)
        grouped = (layout.get("v_group") or CASES[base][7]) < CASES[base][3] or (
            layout.get("k_axis") != "channel" and (layout.get("k_group") or CASES[base][7]) < CASES[base][3])
        var = dict(GROUP_VARIANTS) if grouped else {}  # NOTES.md v11
        if layout.get("k_axis") == "channel":
            var.update(KCHAN_VARIANTS)
        if layout.get("bits") == 8:
            var.update(BITS8_VARIANTS)
        if layout.get("fmt") == "nf":
            var = dict(NF4_VARIANTS)
        if 16 in (layout.get("k_group"), layout.get("v_group")):
            var = dict(ROWS32_VARIANTS)
        if args.warps:
            var = warp_variants(name)
        if args.prefetch:
            var = dict(var, **PREFETCH_VARIANTS)
        if args.occupancy:
            var = occupancy_variants(name)
        if args.stages:
            var = dict(STAGE_VARIANTS)
        if args.warps4bit:
            var = dict(WARPS4_VARIANTS)
        if args.rope and layout.get("rope"):
            var = dict(ROPE_VARIANTS)
        if args.lazy:
            var = dict(LAZY_VARIANTS)
        if args.balance:
            var = dict(var, **BALANCE_VARIANTS)
        if args.fp_bn:
            var = dict(FPBN_VARIANTS)
        if args.denormal:
            var = dict(var, **DEN_VARIANTS)
        if args.gluon:
            var = dict(var, **GLUON_VARIANTS)
        if args.l2:
            var = dict(var, **L2_VARIANTS)
        if args.tma:
            var = dict(var, **TMA_VARIANTS)
        if args.defaults_only:
            var = {}
        row = run_case(name, CASES[base], bw, False, sink=sink, window=window, log=log, variants=var, **layout)
        rows.append(row)
        log(json.dumps(row, default=str))
    log("split kernels compiled: " + "; ".join(kernel_resources()))
    t = table(rows)
    timing = "isolated graph replays" if args.isolated else "graph replays queued behind a spin kernel"
    log(f"\n{dev}; copy {bw:.0f} GB/s; {timing}; command: python {' '.join(sys.argv)}\n{t}")
    with open(os.path.join(args.out, "bench_attention.md"), "w") as f:
        f.write(f"{dev}; copy {bw:.0f} GB/s; {datetime.date.today()}; {timing}\n"
                f"command: python {' '.join(sys.argv)}\n\n{t}\n")
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(dict(device=dev, copy_GBps=bw, timing=timing, rows=rows), f, indent=1, default=str)
    plot(rows, os.path.join(args.out, "bench_attention.png"))


if __name__ == "__main__":
    main()
