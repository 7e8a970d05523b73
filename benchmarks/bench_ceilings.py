"""Where the decode kernel's time goes: its own work with the inputs in L2, and what plain loads of its format reach.

    python benchmarks/bench_ceilings.py [--out DIR] [--cases NAME,...]

For each ``bench_attention.CASES`` row (per-token affine codes, one group per head), in one run with CUDA-graph
replays over rotating input copies (``_timing``):

- ``fused``: ``decode_attention`` as it is (its default kernel), and the same with some inputs broadcast over batch and
  heads (one KV head's tensor expanded with stride 0, so the cache the kernel walks is a few MB that stay in L2): the
  scales and zeros, the codes, or everything. "all in L2" is the kernel's own work without HBM: its compute floor.
- ``load-only``: a Triton kernel that reads the same bytes in the same order (per (batch, KV head), splits of 64-token
  tiles: K's and V's code rows, then the per-token scales and zeros) and does nothing else, in three storage forms
  of the scales and zeros: four fp16 arrays (PackedKV's), (scale, zero) interleaved per token for K and for V (two
  arrays), and none; over a few launch shapes (warps per program, splits), the fastest kept. It is the read ceiling
  of the format for loads issued this plainly. ``TMA ring``: the fused kernel's own load path (gluon_decode's TMA
  ring, v31: bulk copies into two shared-memory stages, then into the operand registers) with nothing else.

Prints a table and writes bench_ceilings.{md,json,png} to --out (kvcompile/kernels/NOTES.md v29 has the first
numbers, taken with an earlier form of this script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # noqa: E402
from _timing import bench_graph, copies_for, pyplot  # noqa: E402

# the load-only kernel's scale / zero forms: 1 = four fp16 arrays, 2 = (scale, zero) pairs per token for K and for V,
# 0 = none
META_FORMS = {"four arrays": 1, "interleaved": 2, "no scales": 0}
# (warps per program, splits per (batch, KV head)) tried for each load-only form; the fastest is reported
LAUNCH_SHAPES = ((1, 16), (2, 16), (4, 8))


@triton.jit
def _load_only_kernel(kc, vc, m0, m1, m2, m3, out, cap, chunk, W: tl.constexpr, META: tl.constexpr):
    """Program (split, batch x head) reads tokens [split * chunk, +chunk) of its row in 64-token tiles: W int32 words
    of K's and of V's codes per token, then the scales and zeros (META 1: four int16 arrays m0..m3; 2: two int32
    arrays m0, m1 of (scale, zero) pairs; 0: none). Stores a checksum (the wrapping int32 sum of the tiles' XOR) so
    the loads stay."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    ar = tl.arange(0, 64)
    aw = tl.arange(0, W)
    acc = tl.zeros([64, W], tl.int32)
    macc = tl.zeros([64], tl.int32)
    for t in range(pid_s * chunk, pid_s * chunk + chunk, 64):
        row = bh * cap + t + ar
        acc ^= tl.load(kc + row[:, None] * W + aw[None, :])
        acc ^= tl.load(vc + row[:, None] * W + aw[None, :])
        if META == 1:
            macc ^= (tl.load(m0 + row) ^ tl.load(m1 + row) ^ tl.load(m2 + row) ^ tl.load(m3 + row)).to(tl.int32)
        if META == 2:
            macc ^= tl.load(m0 + row) ^ tl.load(m1 + row)
    tl.store(out + tl.program_id(1) * tl.num_programs(0) + pid_s, tl.sum(tl.sum(acc, 1), 0) + tl.sum(macc, 0))


def load_only(bufs, out, cap, splits, meta, warps):
    """Launch :func:`_load_only_kernel` over ``bufs`` = (K words [rows, W] int32, V words, m0, m1, m2, m3) for
    ``out.numel() // splits`` rows of ``cap`` tokens; ``cap // splits`` must be a multiple of 64."""
    kc, vc, *ms = bufs
    chunk = cap // splits
    if chunk % 64 or cap % splits:
        raise ValueError(f"cap {cap} must split into {splits} chunks of a multiple of 64 tokens")
    rows = out.numel() // splits
    _load_only_kernel[(splits, rows)](kc, vc, *ms, out, cap, chunk, kc.shape[-1], meta, num_warps=warps)
    return out


def load_only_reference(bufs, cap, splits, meta):
    """:func:`load_only`'s checksums in PyTorch (int64 arithmetic, wrapped to int32 at the end)."""
    kc, vc, *ms = bufs
    rows, tiles = kc.shape[0] // cap, cap // splits // 64

    def xor_sum(x):  # each program's tiles XORed together, then summed: [rows * splits]
        x = x.reshape(rows, splits, tiles, 64, -1)
        acc = x[:, :, 0]
        for i in range(1, tiles):
            acc = acc ^ x[:, :, i]
        return acc.to(torch.int64).sum(dim=(2, 3))

    tot = xor_sum(kc ^ vc)
    if meta:
        tot = tot + xor_sum(ms[0] ^ ms[1] if meta == 2 else (ms[0] ^ ms[1] ^ ms[2] ^ ms[3]).to(torch.int32))
    return (((tot + 2**31) % 2**32) - 2**31).to(torch.int32).flatten()


def _tma_kernel():
    """The fused kernel's load path alone (gluon_decode's TMA ring, v31): per (batch x head) row and split, each
    64-token tile's code rows and four scale / zero rows by bulk copies into a two-stage shared-memory ring, read from
    there into the registers the fused kernel reads them into, XORed into a checksum."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from kvcompile.kernels import gluon_decode as gd

    @gluon.jit
    def kernel(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, out, cap, chunk, BITS: gl.constexpr, STAGES: gl.constexpr):
        W: gl.constexpr = 4 * BITS
        KW: gl.constexpr = gd._kw_layout_t(BITS)
        VW: gl.constexpr = gd._vw_layout(BITS)
        PL: gl.constexpr = gd._pair_layout_t()
        pid_s = gl.program_id(0)
        bh = gl.program_id(1)
        start = pid_s * chunk
        n_t = chunk // 64
        row0 = bh.to(gl.int64) * cap * W // 32
        kc_s, vc_s, m_s, bars = gd._ring_start(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, start, n_t, row0, bh, STAGES, W)
        kacc = gl.zeros([W, 64], gl.int32, KW)
        eacc = gl.zeros([32, W], gl.int32, VW)
        oacc = gl.zeros([32, W], gl.int32, VW)
        macc = gl.zeros([32], gl.int32, PL)
        for i in range(0, n_t):
            kw, ve, vo, k_s, k_z, v_s, v_z = gd._ring_read(kc_s, vc_s, m_s, bars, i, STAGES, BITS, BITS, KW, VW, PL)
            kacc ^= kw
            eacc ^= ve
            oacc ^= vo
            macc ^= k_s ^ k_z ^ v_s ^ v_z
            gd._cta_barrier()
            gd._ring_issue(kc_d, vc_d, ks_d, kz_d, vs_d, vz_d, kc_s, vc_s, m_s, bars, i + STAGES, start, row0, bh,
                           i + STAGES < n_t, STAGES, W)
        tot = (gl.sum(gl.sum(kacc, axis=1), axis=0) + gl.sum(gl.sum(eacc, axis=1), axis=0)
               + gl.sum(gl.sum(oacc, axis=1), axis=0) + gl.sum(macc, axis=0))
        gl.store(out + bh * gl.num_programs(0) + pid_s, tot)

    return kernel


def tma_load_only(bufs, out, cap, splits, bits, stages=2):
    """Launch the TMA ring's load-only kernel over ``bufs`` = (K words [rows * cap, W] int32, V words, four int16
    scale / zero arrays [rows * cap]); ``cap // splits`` must be a multiple of 64 and cap of 4."""
    from kvcompile.kernels import gluon_decode as gd

    kc, vc, *ms = bufs
    chunk, rows = cap // splits, out.numel() // splits
    if chunk % 64 or cap % splits or cap % 4:
        raise ValueError(f"cap {cap} must split into {splits} chunks of a multiple of 64 tokens")
    # the fused kernel's descriptors, over the buffers seen as its storage: codes [rows, 1, cap, bytes], scales and
    # zeros [rows, 1, cap, 1]
    codes = [c.view(torch.uint8).view(rows, 1, cap, -1) for c in (kc, vc)]
    meta = [m.view(torch.float16).view(rows, 1, cap, 1) for m in ms]
    d = gd._tma_descriptors(codes[0], meta[0], meta[1], codes[1], meta[2], meta[3], bits)
    if "tma" not in _KERNELS:
        _KERNELS["tma"] = _tma_kernel()
    _KERNELS["tma"][(splits, rows)](*d, out, cap, chunk, bits, stages, num_warps=1)
    return out


_KERNELS: dict = {}


def tma_load_only_reference(bufs, cap, splits):
    """:func:`tma_load_only`'s checksums in PyTorch: per program, each position's words XORed over its tiles, summed
    (the scale / zero arrays as int32 pairs, the four XORed together)."""
    kc, vc, *ms = bufs
    rows, tiles = kc.shape[0] // cap, cap // splits // 64

    def xor_sum(x, per_tile):
        x = x.reshape(rows, splits, tiles, per_tile)
        acc = x[:, :, 0]
        for i in range(1, tiles):
            acc = acc ^ x[:, :, i]
        return acc.to(torch.int64).sum(dim=2)

    W = kc.shape[-1]
    m = ms[0].view(torch.int32) ^ ms[1].view(torch.int32) ^ ms[2].view(torch.int32) ^ ms[3].view(torch.int32)
    tot = xor_sum(kc, 64 * W) + xor_sum(vc, 64 * W) + xor_sum(m, 32)
    return (((tot + 2**31) % 2**32) - 2**31).to(torch.int32).flatten()


def broadcast(kw, names):
    """``kw`` with the tensors ``names`` replaced by their first (batch, KV head) expanded over all of them."""
    kw = dict(kw)
    for n in names:
        kw[n] = kw[n][:1, :1].contiguous().expand(kw[n].shape)
    return kw


def run_case(name, spec, log=print):
    from bench_attention import make_case, packed_bytes, sdpa_calls

    from kvcompile.kernels.decode_attention import decode_attention

    B, Hq, Hkv, D, L, kb, vb, g, _ = spec
    sm_scale = 1.0 / math.sqrt(D)
    kw = make_case(B, Hq, Hkv, D, L, kb, vb, g)
    nbytes = packed_bytes(kw)
    kws = [kw] + [make_case(B, Hq, Hkv, D, L, kb, vb, g, seed=i) for i in range(1, copies_for(nbytes))]
    t_sdpa = bench_graph(sdpa_calls(kw["q"], Hkv, L, sm_scale))
    meta, codes = ["k_scale", "k_zero", "v_scale", "v_zero"], ["k_codes", "v_codes"]
    fused = {}
    for label, names in (("as is", []), ("scales in L2", meta), ("codes in L2", codes), ("all in L2", meta + codes)):
        cs = [broadcast(c, names) for c in kws]
        fused[label] = bench_graph([lambda c=c: decode_attention(**c, sm_scale=sm_scale) for c in cs])
        log(f"  {name} fused, {label}: {fused[label]:.1f} us")
    del kws, kw
    torch.cuda.empty_cache()

    W = D * kb // 8 // 4  # int32 words per token
    rows = B * Hkv
    copies = copies_for(rows * L * (8 * W + 8))
    gen = torch.Generator(device="cuda").manual_seed(0)
    bufs = [[torch.randint(0, 1 << 30, (rows * L, W), dtype=torch.int32, device="cuda", generator=gen)
             for _ in range(2)] + [torch.randint(0, 1 << 30, (rows * L * 2,), dtype=torch.int32, device="cuda",
                                                 generator=gen) for _ in range(4)] for _ in range(copies)]
    loads = {}
    for label, form in META_FORMS.items():
        shaped = [b[:2] + ([m.view(torch.int16)[: rows * L] for m in b[2:]] if form == 1 else
                           [m[: rows * L] for m in b[2:]]) for b in bufs]
        best = None
        for warps, splits in LAUNCH_SHAPES:
            out = torch.empty(rows * splits, dtype=torch.int32, device="cuda")
            t = bench_graph([lambda b=b: load_only(b, out, L, splits, form, warps) for b in shaped])
            log(f"  {name} load-only, {label}, {warps} warps x {splits} splits: {t:.1f} us")
            best = t if best is None else min(best, t)
        loads[label] = best
    # the fused kernel's TMA ring reading the four-array form (2-bit and 4-bit codes; checked against PyTorch once)
    splits = 16
    out = torch.empty(rows * splits, dtype=torch.int32, device="cuda")
    shaped = [b[:2] + [m.view(torch.int16)[: rows * L] for m in b[2:]] for b in bufs]
    tma_load_only(shaped[0], out, L, splits, kb)
    ok = torch.equal(out.cpu(), tma_load_only_reference([t.cpu() for t in shaped[0]], L, splits))
    loads["TMA ring"] = bench_graph([lambda b=b: tma_load_only(b, out, L, splits, kb) for b in shaped])
    log(f"  {name} load-only, TMA ring (four arrays), 1 warp x {splits} splits: {loads['TMA ring']:.1f} us, "
        f"checksum {'matches' if ok else 'DIFFERS'}")
    del bufs
    torch.cuda.empty_cache()
    # GB/s: the codes (8 W bytes a token, K and V) and 8 bytes of scales and zeros a token where the form has them
    return dict(case=name, B=B, Hq=Hq, Hkv=Hkv, D=D, L=L, k_bits=kb, v_bits=vb, sdpa_us=t_sdpa, fused_us=fused,
                load_only_us=loads, packed_MB=nbytes / 1e6,
                load_only_GBps={k: rows * L * (8 * W + (8 if META_FORMS.get(k, 1) else 0)) / (v * 1e-6) / 1e9
                                for k, v in loads.items()}, tma_checksum_ok=ok)


def table(rows, bw):
    hdr = ("| case | fp16 SDPA us | fused us | scales in L2 | codes in L2 | all in L2 (compute floor) | load-only, "
           "four arrays us (GB/s) | interleaved | no scales | TMA ring, four arrays |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        f, lo, gb = r["fused_us"], r["load_only_us"], r["load_only_GBps"]
        lines.append(f"| {r['case']} | {r['sdpa_us']:.1f} | {f['as is']:.1f} ({r['sdpa_us'] / f['as is']:.2f}x) | "
                     f"{f['scales in L2']:.1f} | {f['codes in L2']:.1f} | {f['all in L2']:.1f} | "
                     + " | ".join(f"{lo[k]:.1f} ({gb[k]:.0f})" for k in [*META_FORMS, "TMA ring"]) + " |")
    return "\n".join(lines) + f"\n\ncopy bandwidth {bw:.0f} GB/s (read + write)"


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bars = [("fused", lambda r: r["fused_us"]["as is"]), ("fused, all in L2", lambda r: r["fused_us"]["all in L2"])]
    bars += [(f"load-only, {k}", lambda r, k=k: r["load_only_us"][k]) for k in [*META_FORMS, "TMA ring"]]
    w = 0.8 / len(bars)
    for j, (label, get) in enumerate(bars):
        ax.bar([i + (j - len(bars) / 2 + 0.5) * w for i in range(len(rows))], [get(r) for r in rows], w, label=label)
    ax.set_xticks(list(range(len(rows))), [r["case"] for r in rows], fontsize=7)
    ax.set_ylabel("us per call (lower is faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    from bench_attention import CASES, copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default="k2v2_b8_gqa4_32k,k2v2_b8_mha_16k,k4v4_b8_gqa4_32k")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_ceilings.py times CUDA kernels: run it on the GPU")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.cases.split(","):
        if CASES[name][7] != CASES[name][3]:
            sys.exit(f"{name}: bench_ceilings.py takes one group per head (its load-only kernel reads one scale and "
                     "zero per token)")
        rows.append(run_case(name, CASES[name]))
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name(0)
    t = table(rows, bw)
    print(f"\n{dev}; command: python {' '.join(sys.argv)}\n{t}")
    with open(os.path.join(args.out, "bench_ceilings.md"), "w") as f:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        f.write(f"{dev}; torch {torch.__version__}, triton {triton.__version__}; {stamp}; graph replays "
                f"{'queued behind a spin kernel' if _timing.QUEUED else 'isolated'}\n"
                f"command: python {' '.join(sys.argv)}\n\n{t}\n")
    with open(os.path.join(args.out, "bench_ceilings.json"), "w") as f:
        json.dump(dict(device=dev, copy_GBps=bw, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, "bench_ceilings.png"))


if __name__ == "__main__":
    main()
