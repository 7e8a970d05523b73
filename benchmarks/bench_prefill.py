"""Chunked-prefill attention over a packed KV cache: fused Triton kernel vs dequantize + SDPA vs fp16 SDPA.

    python benchmarks/bench_prefill.py [--out DIR] [--cases NAME,...] [--variants all|NAME,...]

(``--cases`` also takes the SKVQ_CASES rows: skvq's default layout, keys before RoPE and ternary values; and the
SCHEME_CASES rows: the kivi, nqkv, int8 and fp8 schemes' default layouts, built by appending random K/V to the
schemes' own PackedKV (kivi's V middle then runs ahead of K's), the kernel's arguments from ``ops.prefill_kwargs``.)

A chunk of Nq new tokens (64 or 512) attends to a history of 4k or 32k tokens plus itself (causal), the
chunk's own K/V already written to the cache (sink 4 + quantized middle + window 128, as a model writes
them). Hq=32, Hkv=8, D=128; K2V2 and K4V4, one group per token (128 channels), fp16 scales/zeros.
Per case, all measured in this run on random (not zero) data:

- ``fused``: ``prefill_attention`` (median of ``triton.testing.do_bench``, which flushes L2 before every
  call, over rotating input copies; the "graph" column replays a CUDA graph of the calls, GPU time only);
- ``dequant+SDPA``: ``kvcompile.ops._dequant_sdpa`` on the same PackedKV (what the op ran before this
  kernel: the whole cache dequantized each chunk, then SDPA with the causal chunk mask);
- ``SDPA fp16 (mask)``: SDPA on full-precision fp16 K/V of the same length with the same boolean causal
  mask and ``enable_gqa`` (the same call dequant+SDPA makes, minus the dequantization);
- ``SDPA fp16 (flash, no mask)``: SDPA on the same fp16 K/V without any mask (flash backend; it computes
  the whole Nq x Nq block unmasked, slightly MORE work than the causal chunk: a floor for fp16 attention).

GB/s counts the bytes the fused kernel must move (packed codes + scales + zeros + sink + window + q + out);
TFLOP/s counts the causal work (4 * B * Hq * D * sum_i (L - Nq + i + 1)). Both ceilings (a 1 GiB
device-to-device copy, an fp16 8192^3 matmul) are measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

import _timing
from _timing import do_bench_us
from kvcompile import ops
from kvcompile.cache import PackedKV
from kvcompile.kernels.prefill_attention import choose_prefill_config, prefill_attention, prefill_is_profitable
from kvcompile.schemes import TensorQuant

HQ, HKV, D, SINK, WINDOW = 32, 8, 128, 4, 128
CASES = {  # name: (B, Nq, history, bits[, "skvq"])
    f"k{b}v{b}_b{B}_c{c}_h{h // 1024}k": (B, c, h, b)
    for b in (2, 4) for B in (1, 8) for c in (64, 512) for h in (4096, 32768)
}
# skvq's default layout (not in the default --cases): keys 2-bit in groups of 16 quantized before RoPE in a random
# channel order (Llama-3's inverse frequencies, theta 500000), ternary values in groups of 16, both reordered
SKVQ_CASES = {f"skvq_b{B}_c{c}_h{h // 1024}k": (B, c, h, 2, "skvq") for B, c, h in ((1, 64, 32768), (8, 64, 4096),
                                                                                 (1, 512, 4096))}
# the other schemes' default layouts (not in the default --cases), from kvcompile's scheme registry
SCHEME_CASES = {f"{sch}_b{B}_c{c}_h{h // 1024}k": (B, c, h, 0, sch) for sch in ("kivi", "nqkv", "int8", "fp8")
                for B, c, h in ((1, 64, 32768), (8, 64, 4096), (1, 512, 4096))}
# launcher overrides timed against the default on the same inputs (--variants)
VARIANTS = {
    "default_again": dict(),  # the default timed a second time: the spread between the two is noise
    "m64_n64_w4": dict(block_m=64, block_n=64, num_warps=4),
    "m128_n32_w4": dict(block_m=128, block_n=32, num_warps=4),
    "m128_n32_w8": dict(block_m=128, block_n=32, num_warps=8),
    "pps2": dict(programs_per_sm=2),  # twice the splits (two waves) where the launcher splits
    "m128_n64_w8_st3": dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "nosplit": dict(num_splits=1),
    "prefetch": dict(prefetch=True),
    "no_asm": dict(fast_asm=False),
}


# skvq's layout (per-element keys before RoPE and ternary values: the launcher's BLOCK_N 16) against other tiles
SKVQ_VARIANTS = {"default_again": dict(), "n32": dict(block_n=32), "m32_n16": dict(block_m=32, block_n=16),
                 "m128_n16_w8": dict(block_m=128, block_n=16, num_warps=8)}


def bench(fn, reps=100):
    return do_bench_us(fn, reps, warmup=10)


def rotating(fns):
    """One closure that calls the next input copy each time (do_bench also flushes L2 between calls)."""
    i = [0]

    def f():
        fns[i[0] % len(fns)]()
        i[0] += 1
    return f


def bench_graph(fns, reps=20):
    """Median GPU time per call of fns replayed from one CUDA graph (no host launch overhead)."""
    return _timing.bench_graph(fns, reps=reps)


def copies_for(nbytes, total=256e6, most=32):
    return _timing.copies_for(nbytes, total=total, most=most)


def copy_bandwidth():
    return _timing.copy_bandwidth(bench)


def matmul_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t = bench(lambda: a @ b)
    return 2 * 8192**3 / (t * 1e-6) / 1e12


def make_case(B, NQ, hist, bits, layout=None, seed=0, dtype=torch.float16):
    """Kernel keyword arguments + the two PackedKVs over the same storage (random codes, scales, zeros).
    layout "skvq": K before RoPE in groups of 16 with a channel order, V ternary in groups of 16 (SKVQ_CASES)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    L = hist + NQ
    n_quant = L - SINK - WINDOW
    skvq = layout == "skvq"
    g = 16 if skvq else D
    kw = dict(q=torch.randn(B, HQ, NQ, D, device="cuda", dtype=dtype, generator=gen))
    pks = []
    for n in "kv":
        nb = 1.5 if (skvq and n == "v") else bits
        qt = TensorQuant("affine", nb, g, "token", permute=skvq)
        width = -(-D // 5) if nb == 1.5 else D * bits // 8
        levels = 2 if nb == 1.5 else 2**bits - 1
        codes = torch.randint(0, 243 if nb == 1.5 else 256, (B, HKV, n_quant, width), dtype=torch.uint8,
                              device="cuda", generator=gen)
        scale = (torch.rand(B, HKV, n_quant, D // g, device="cuda", generator=gen) * 0.5 / levels + 0.01).half()
        zero = (torch.randn(B, HKV, n_quant, D // g, device="cuda", generator=gen) * 0.3 - 0.25).half()
        sink = torch.randn(B, HKV, SINK, D, device="cuda", dtype=dtype, generator=gen)
        window = torch.randn(B, HKV, WINDOW, D, device="cuda", dtype=dtype, generator=gen)
        kw.update({f"{n}_codes": codes, f"{n}_scale": scale, f"{n}_zero": zero, f"{n}_sink": sink, f"{n}_window": window})
        counts = torch.tensor([SINK, n_quant, WINDOW], dtype=torch.int64, device="cuda")
        perm = torch.stack([torch.randperm(D, device="cuda", generator=gen) for _ in range(HKV)]) if skvq else None
        rope = None
        if skvq and n == "k":
            rope = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
            kw.update(k_rope=rope, k_perm=perm)
        pk = PackedKV(codes, scale, zero, sink, window, perm, counts, rope, qt, D, SINK, WINDOW, dtype)
        pk._host = [SINK, n_quant, WINDOW]
        pks.append(pk)
    kw.update(n_quant=n_quant, n_window=WINDOW, k_bits=bits, v_bits=1.5 if skvq else bits, k_group_size=g,
              v_group_size=g)
    # the kernel takes q in the keys' stored channel order and gives the output in the values' (ops folds both);
    # the model-order q stays beside it for dequantize + SDPA, which un-permutes the cache
    kw["q_model"] = kw["q"]
    kw["q"] = ops._fold_key_order(kw["q"], pks[0], HQ // HKV)
    return kw, pks[0], pks[1]


def make_scheme_case(B, NQ, hist, scheme, seed=0, dtype=torch.float16):
    """A scheme's default layout (kvcompile.get_scheme(scheme).layer_spec): its PackedKV pair filled by appending
    hist + NQ random tokens (the cache's own write path), kernel keywords from ops.prefill_kwargs."""
    from kvcompile.schemes import get_scheme

    spec = get_scheme(scheme).layer_spec(0, 1)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    L = hist + NQ
    pks = []
    for qt in (spec.k, spec.v):
        pk = PackedKV.empty(B, HKV, D, qt, capacity=L + 64, n_sink=spec.n_sink, window=spec.window, dtype=dtype,
                            device="cuda")
        x = (torch.randn(B, HKV, L, D, device="cuda", generator=gen)
             + torch.randn(B, HKV, 1, D, device="cuda", generator=gen)).to(dtype)
        pk.append(x)
        pk.lengths()
        pks.append(pk)
    q = torch.randn(B, HQ, NQ, D, device="cuda", dtype=dtype, generator=gen)
    kw = ops.prefill_kwargs(q, pks[0], pks[1])
    kw["q_model"] = q
    return kw, pks[0], pks[1]


def fused_bytes(kw):
    t = [kw[f"{n}_{p}"] for n in "kv" for p in ("codes", "scale", "zero", "sink", "window")] + [kw["q"], kw["q"]]
    return sum(x.numel() * x.element_size() for x in t if x is not None)


def causal_flops(B, NQ, L):
    return 4.0 * B * HQ * D * (NQ * (L - NQ) + NQ * (NQ + 1) / 2)


def run_case(name, spec, bw, tf, log, variants):
    B, NQ, hist, bits, *layout = spec
    layout = layout[0] if layout else None
    L = hist + NQ
    sm_scale = 1.0 / math.sqrt(D)
    t0 = time.time()
    make = ((lambda seed: make_scheme_case(B, NQ, hist, layout, seed)) if layout in ("kivi", "nqkv", "int8", "fp8")
            else (lambda seed: make_case(B, NQ, hist, bits, layout, seed=seed)))
    kw, kp, vp = make(0)
    nbytes = fused_bytes(kw)
    cases = [(kw, kp, vp)] + [make(i) for i in range(1, copies_for(nbytes))]
    # fused kernel
    kargs = [{k: v for k, v in c[0].items() if k != "q_model"} for c in cases]
    fused_fns = [lambda a=a: prefill_attention(**a, sm_scale=sm_scale) for a in kargs]
    out, lse = fused_fns[0]()
    out = ops._unfold_value_order(out, vp, HQ // HKV)  # model order, as dequantize + SDPA gives it
    t_fused = bench(rotating(fused_fns))
    t_fused_graph = bench_graph(fused_fns)
    cfg = choose_prefill_config(batch=B, kv_heads=HKV, rows=(HQ // HKV) * NQ, seq_len=L, head_dim=D,
                                num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
    # dequantize + SDPA through the op's own fallback (few copies: each dequantizes to new memory anyway)
    deq_fns = [lambda c=c: ops._dequant_sdpa(c[0]["q_model"], c[1], c[2], sm_scale, None, True) for c in cases[:4]]
    ref = deq_fns[0]().float()
    t_deq = bench(rotating(deq_fns), reps=50)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    del deq_fns
    # fp16 SDPA on full-precision K/V of the same length
    fp_bytes = 2 * B * HKV * L * D * 2
    kvs = [(torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16),
            torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16)) for _ in range(copies_for(fp_bytes, most=8))]
    mask = torch.ones(NQ, L, dtype=torch.bool, device="cuda").tril(L - NQ)
    q = kw["q"]
    sdpa_mask = [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True)
                 for k, v in kvs]
    sdpa_flash = [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=sm_scale, enable_gqa=True)
                  for k, v in kvs]
    t_sdpa_mask = bench(rotating(sdpa_mask))
    t_sdpa_flash = bench(rotating(sdpa_flash))
    del kvs, sdpa_mask, sdpa_flash
    var_times = {}
    for key, tuning in (variants or {}).items():
        try:
            fns = [lambda a=a: prefill_attention(**a, sm_scale=sm_scale, **tuning) for a in kargs]
            o = ops._unfold_value_order(fns[0]()[0], vp, HQ // HKV)
            err = ((o.float() - ref).norm() / ref.norm()).item()
            var_times[key] = bench(rotating(fns))
            log(f"  {name} {key}: {var_times[key]:.1f} us (rel err vs dequant+SDPA {err:.1e})")
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            log(f"  {name} {key}: {type(e).__name__}: {str(e)[:300]}")
    flops = causal_flops(B, NQ, L)
    row = dict(case=name, B=B, Hq=HQ, Hkv=HKV, D=D, Nq=NQ, history=hist, L=L, bits=bits, layout=layout,
               group=16 if layout == "skvq" else D, sink=kp.n_sink,
               window=kp.window_size, k_lengths=kp.lengths(), v_lengths=vp.lengths(), copies=len(cases), config=cfg,
               fused_us=t_fused, fused_graph_us=t_fused_graph, dequant_sdpa_us=t_deq,
               sdpa_mask_us=t_sdpa_mask, sdpa_flash_nomask_us=t_sdpa_flash,
               vs_dequant=t_deq / t_fused, vs_sdpa_mask=t_sdpa_mask / t_fused, vs_sdpa_flash=t_sdpa_flash / t_fused,
               fused_MB=nbytes / 1e6, fused_GBps=nbytes / (t_fused * 1e-6) / 1e9,
               fused_graph_GBps=nbytes / (t_fused_graph * 1e-6) / 1e9,
               fused_TFLOPs=flops / (t_fused * 1e-6) / 1e12, sdpa_flash_TFLOPs=flops / (t_sdpa_flash * 1e-6) / 1e12,
               copy_GBps=bw, matmul_TFLOPs=tf, rel_err_vs_dequant_sdpa=rel, variants=var_times,
               profitable=prefill_is_profitable(batch=B, kv_heads=HKV, rows=(HQ // HKV) * NQ, new_tokens=NQ,
                                                seq_len=L, head_dim=D, per_element=layout == "skvq"),
               seconds=time.time() - t0)
    del cases, kw, kp, vp
    torch.cuda.empty_cache()
    return row


def table(rows):
    hdr = ("| case | fused us (graph) | dequant+SDPA us | SDPA fp16 mask us | SDPA fp16 flash no-mask us | "
           "vs dequant+SDPA | vs SDPA mask | vs SDPA flash | fused GB/s | fused TFLOP/s | splits | rel err |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['fused_us']:.1f} ({r['fused_graph_us']:.1f}) | {r['dequant_sdpa_us']:.1f} | "
            f"{r['sdpa_mask_us']:.1f} | {r['sdpa_flash_nomask_us']:.1f} | {r['vs_dequant']:.2f}x | "
            f"{r['vs_sdpa_mask']:.2f}x | {r['vs_sdpa_flash']:.2f}x | {r['fused_GBps']:.0f} | "
            f"{r['fused_TFLOPs']:.0f} | {r['config']['num_splits']} | {r['rel_err_vs_dequant_sdpa']:.1e} |")
    return "\n".join(lines)


def plot(rows, path):
    """Speed against fp16 SDPA (masked, the same call dequantize + SDPA makes) per case: the fused kernel and
    dequantize + SDPA, log scale (1 = as fast as fp16 attention)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 3.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["vs_sdpa_mask"] for r in rows], 0.4, label="fused kernel / fp16 SDPA (mask)")
    ax.bar([i + 0.2 for i in x], [r["sdpa_mask_us"] / r["dequant_sdpa_us"] for r in rows], 0.4,
           label="dequantize + SDPA / fp16 SDPA (mask)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [r["case"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("speed vs fp16 SDPA (higher is faster)")
    ax.set_title("chunked prefill over packed KV", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default="", help="'all', or case names (comma separated) to time VARIANTS on")
    ap.add_argument("--replot", metavar="JSON", help="only draw the plot of an earlier run's bench_prefill.json "
                    "(next to it, same name .png); no GPU needed")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["rows"], os.path.splitext(args.replot)[0] + ".png")
        return
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "bench_prefill.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dev = torch.cuda.get_device_name()
    cmd = "python " + " ".join(sys.argv)
    log(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC {dev}, torch {torch.__version__}, "
        f"triton {triton.__version__}; {cmd}")
    bw, tf = copy_bandwidth(), matmul_tflops()
    log(f"copy bandwidth (1 GiB device-to-device, read+write): {bw:.0f} GB/s; fp16 matmul 8192^3: {tf:.0f} TFLOP/s")
    var_cases = set(CASES) if args.variants == "all" else set(filter(None, args.variants.split(",")))
    rows = []
    md_path = os.path.join(args.out, "bench_prefill.md")
    for name in args.cases.split(","):
        try:
            var = (SKVQ_VARIANTS if name in SKVQ_CASES else VARIANTS) if name in var_cases else None
            row = run_case(name, {**CASES, **SKVQ_CASES, **SCHEME_CASES}[name], bw, tf, log, var)
        except Exception as e:  # noqa: BLE001 - keep the other cases' numbers
            log(f"{name}: FAILED {type(e).__name__}: {str(e)[:500]}")
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        log(json.dumps(row))
        # rewrite the outputs after every case: a run cut short still leaves its numbers
        with open(md_path, "w") as f:
            f.write(f"{dev}; copy {bw:.0f} GB/s; fp16 matmul {tf:.0f} TFLOP/s; "
                    f"{datetime.date.today()}; torch {torch.__version__}, triton {triton.__version__}\n"
                    f"command: {cmd}\n\n{table(rows)}\n")
        with open(os.path.join(args.out, "bench_prefill.json"), "w") as f:
            json.dump(dict(device=dev, copy_GBps=bw, matmul_TFLOPs=tf, command=cmd, rows=rows), f, indent=1)
        plot(rows, os.path.join(args.out, "bench_prefill.png"))
    log(f"\n{dev}; copy {bw:.0f} GB/s; matmul {tf:.0f} TFLOP/s; command: {cmd}\n{table(rows)}")


if __name__ == "__main__":
    main()
