"""One decode step's quantize-on-write for a layer (K and V, T=1) vs that layer's fused decode attention.

    python benchmarks/bench_write.py [--out DIR] [--length 32768] [--steps 32]

Per case, on CUDA, measured in this run:
- ``one launch``: the Triton write kernel writing K and V in one launch (the kernel's ``pair``, what
  ``kvcompile.ops.write_pair`` runs; with two layouts, such as KIVI's, each side has its own), GPU time per step
  as below;
- ``kernel``: the Triton write kernel (kvcompile/kernels/quantize_write.py), K and V, GPU time per decode step
  from CUDA-graph replays of ``--steps`` consecutive steps (median of 30 replays / steps; per-channel K layouts
  flush every group_size steps, so the average over >= one group is what a decode loop pays);
- ``op eager``: ``kvcompile.ops.write_pair`` called from Python per step (launch and argument overhead included);
- ``reference``: ``PackedKV.append`` (the PyTorch reference, which reads the counts on the host), wall time;
- ``layout attention``: that layer's own attention, ``kvcompile.ops.attention`` (the path a model's decode step
  takes: the fused kernel where it applies, lengths on the device) over the case's two PackedKVs holding L tokens,
  sink and window included, from CUDA-graph replays; the target is the one-launch write <= 5% of it;
- ``attention``: the proxy the earlier runs used, ``decode_attention`` over a K2V2 cache with per-token groups of
  the case's ``attention group`` and no sink or window (B=8, Hq=32, Hkv=8, D=128, L=--length), also graph-timed.
The cache holds L tokens when the timing starts (random codes and scales, a full window).
Also printed: an empty launch with the pair's grid, timed the same way (the floor of any one-launch write), and
(unless ``--no-sweep``) the pair's time under the kernel's variants (``VARIANTS``: launcher keywords).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

import _timing
from _timing import bench_graph
from kvcompile import ops
from kvcompile.cache import PackedKV
from kvcompile.kernels.decode_attention import decode_attention
from kvcompile.kernels.quantize_write import quantize_write
from kvcompile.schemes import TensorQuant

B, HQ, HKV, D = 8, 32, 8, 128

CASES = {
    # name: (K quant, V quant, n_sink, window, attention group)
    "k2v2_g128_w128": (TensorQuant("affine", 2, 128), TensorQuant("affine", 2, 128), 0, 128, 128),
    "k2v2_g32_w128": (TensorQuant("affine", 2, 32), TensorQuant("affine", 2, 32), 0, 128, 32),
    "kivi_k2v2_g32_r128": (TensorQuant("affine", 2, 32, "channel"), TensorQuant("affine", 2, 32), 0, 128, 32),
    "k2v2_g128_w0": (TensorQuant("affine", 2, 128), TensorQuant("affine", 2, 128), 0, 0, 128),
    # 4-bit keys, 2-bit values, one group per head, 4 sink + 128 window (README, "Which layout runs fastest"): two
    # layouts, so one launch of the mixed kernel
    "k4v2_g128_s4_w128": (TensorQuant("affine", 4, 128), TensorQuant("affine", 2, 128), 4, 128, 128),
    "skvq_v1.5_g16_s4_w128": (TensorQuant("affine", 2, 16), TensorQuant("affine", 1.5, 16, permute=True), 4, 128, 32),
    # skvq's defaults: keys before RoPE (the kernel un-rotates them), both sides in a channel order
    "skvq_default_prerope": (TensorQuant("affine", 2, 16, clip_ratio=0.95, permute=True),
                             TensorQuant("affine", 1.5, 16, permute=True), 4, 128, 32),
}
ROPE_CASES = {"skvq_default_prerope"}  # K quantized before RoPE (Llama's inverse frequencies, base 500000)


def filled(q: TensorQuant, length: int, extra: int, n_sink: int, window: int, seed: int,
           rope: bool = False) -> PackedKV:
    """A PackedKV holding ``length`` tokens (random codes / scales, a full window) with room for ``extra`` more."""
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)) if rope else None
    pk = PackedKV.empty(B, HKV, D, q, capacity=length + extra, n_sink=n_sink, window=window, dtype=torch.float16,
                        device="cuda", rope_inv_freq=inv)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pk.codes.random_(0, 256, generator=gen)
    pk.scale.copy_(torch.rand(pk.scale.shape, device="cuda", generator=gen) * 0.1 + 0.01)
    if pk.zero is not None:
        pk.zero.copy_(torch.randn(pk.zero.shape, device="cuda", generator=gen))
    pk.sink.normal_(generator=gen)
    pk.window.normal_(generator=gen)
    most = window + q.flush - 1  # the window holds window .. window + flush - 1 tokens once filled
    n_q = -(-(length - n_sink - most) // q.flush) * q.flush
    n_w = length - n_sink - n_q
    if pk.perm is not None:  # a calibrated-looking order (a real one is a permutation per head)
        pk.perm.copy_(torch.stack([torch.randperm(D, device="cuda", generator=gen) for _ in range(HKV)]))
    pk._set_counts(n_sink, n_q, n_w)
    return pk


def kernel_args(pk: PackedKV) -> dict:
    q = pk.quant
    return dict(codes=pk.codes, scale=pk.scale, zero=pk.zero, sink=pk.sink, window=pk.window, perm=pk.perm,
                counts=pk.counts, kind=q.kind, bits=q.bits, group_size=q.group_size or 0, axis=q.axis,
                clip_ratio=q.clip_ratio, n_sink=pk.n_sink, window_size=pk.window_size, rope=pk.rope)


WARMUP_MS = 5.0  # graph replays before the timed ones (each replay appends `steps` tokens: see _extra)


def _extra(steps: int, timings: int = 2) -> int:
    """Capacity beyond the filled length for ``timings`` graph timings of ``steps`` one-token appends per
    replay: 1 warm-up call, at most 200 warm-up replays (bench_graph), 30 timed replays, plus a margin."""
    return timings * steps * (1 + 200 + 30) + 256


def graph_time(fn, steps: int, reps: int = 30, storages=()) -> float:
    """Median GPU time (us) per step of ``steps`` calls of fn captured in one CUDA graph (one warm-up call).
    ``storages``: the PackedKVs fn appends to; checked afterwards to be below capacity, since the kernel
    writes nothing past it and a timing of those no-op writes would look fast."""
    t = bench_graph([fn] * steps, reps=reps, warmup_fns=[fn], warmup_ms=WARMUP_MS)
    for pk in storages:
        pk._host = None
        if pk.codes_rows_after(0) >= pk.codes.shape[2] - 64:  # the codes rows in use (the window's too, per token)
            raise RuntimeError(f"bench_write: the storage filled up during the timing ({pk.lengths()}); raise _extra")
    return t


def wall_time(fn, reps: int = 30) -> float:
    """Median wall time (us) of fn followed by a device sync (eager calls: host overhead included)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def attention_time(length: int, group: int, seed: int = 0) -> float:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_q = length
    kw = dict(q=torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16, generator=gen))
    for n in "kv":
        kw[f"{n}_codes"] = torch.randint(0, 256, (B, HKV, n_q, D // 4), dtype=torch.uint8, device="cuda",
                                         generator=gen)
        kw[f"{n}_scale"] = (torch.rand(B, HKV, n_q, D // group, device="cuda", generator=gen) * 0.1 + 0.01).half()
        kw[f"{n}_zero"] = torch.randn(B, HKV, n_q, D // group, device="cuda", generator=gen).half()
        kw[f"{n}_sink"] = torch.zeros(B, HKV, 0, D, device="cuda", dtype=torch.float16)
        kw[f"{n}_window"] = torch.zeros(B, HKV, 0, D, device="cuda", dtype=torch.float16)
    kw.update(n_quant=n_q, n_window=0, k_bits=2, v_bits=2, k_group_size=group, v_group_size=group)
    return graph_time(lambda: decode_attention(**kw), steps=10)


VARIANTS = [  # launcher keywords of quantize_write; {} is the default (one-token tile, 1 warp for T = 1 since session 19)
    {}, {"num_warps": 8}, {"num_warps": 4}, {"num_warps": 2}, {"preload": False}, {"parallel_arrivals": False},
    {"pack_natural": False},
    {"block_t": 16, "num_warps": 8},  # the launcher's defaults before 2026-11-26 (session 6)
    {"block_t": 16, "num_warps": 8, "preload": False, "parallel_arrivals": False, "pack_natural": False},  # ditto, kernel too
]


def layout_attention_time(kq: TensorQuant, vq: TensorQuant, length: int, n_sink: int, window: int,
                          rope: bool) -> tuple[float, str]:
    """GPU time (us) of ``ops.attention`` for one new token over the case's own layouts holding ``length``
    tokens (sink and window full), from CUDA-graph replays, and the path it took."""
    k, v = filled(kq, length, 64, n_sink, window, 3, rope), filled(vq, length, 64, n_sink, window, 4)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16)
    why = ops._fused_unsupported(q, k, v, None, False)
    path = "fused decode kernel" if why is None else f"fallback ({why})"
    return graph_time(lambda: ops.attention(q, k, v), steps=10), path


@triton.jit
def _empty_kernel(ptr, n):
    pid = tl.program_id(0) + tl.program_id(1) * 0 + tl.program_id(2) * 0
    tl.store(ptr + pid, pid, mask=pid >= n)  # never true: a launch that does nothing


def floor_time(steps: int) -> float:
    """Graph time per step of an empty launch with the pair's grid and warps: what any one-launch write pays."""
    buf = torch.zeros(1, dtype=torch.int32, device="cuda")
    return graph_time(lambda: _empty_kernel[(B * HKV, 1, 2)](buf, 1 << 30, num_warps=8), steps)


def sweep(name: str, length: int, steps: int, variants) -> list[dict]:
    """Kernel time (graph) of one case's K and V write in one launch under launcher keywords."""
    kq, vq, n_sink, window, _ = CASES[name]
    out = []
    for tun in variants:
        k = filled(kq, length, _extra(steps, 1), n_sink, window, 1, name in ROPE_CASES)
        v = filled(vq, length, _extra(steps, 1), n_sink, window, 2)
        new_k = torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.float16)
        new_v = torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.float16)
        ka, va = kernel_args(k), kernel_args(v)
        second = dict(new=new_v, **va)

        def step():
            quantize_write(new=new_k, **ka, pair=second, **tun)

        out.append(dict(case=name, tuning=tun, kernel_us=graph_time(step, steps, storages=(k, v))))
        print(json.dumps(out[-1]), flush=True)
        del k, v
    return out


def run_case(name: str, length: int, steps: int) -> dict:
    kq, vq, n_sink, window, group = CASES[name]
    extra = _extra(steps)  # every replay appends `steps` tokens
    k, v = filled(kq, length, extra, n_sink, window, 1, name in ROPE_CASES), filled(vq, length, extra, n_sink, window, 2)
    new_k = torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.float16)
    new_v = torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.float16)
    ka, va = kernel_args(k), kernel_args(v)

    def step():
        quantize_write(new=new_k, **ka)
        quantize_write(new=new_v, **va)

    t_kernel = graph_time(step, steps, storages=(k, v))
    second = dict(new=new_v, **va)  # with V's layout: one launch for two layouts where they differ
    t_pair = graph_time(lambda: quantize_write(new=new_k, **ka, pair=second), steps, storages=(k, v))

    def op_step():
        ops.write_pair(k, new_k, v, new_v)

    t_op = wall_time(op_step)
    kr, vr = filled(kq, length, 64, n_sink, window, 1, name in ROPE_CASES), filled(vq, length, 64, n_sink, window, 2)

    def ref_step():
        kr.append(new_k)
        vr.append(new_v)

    t_ref = wall_time(ref_step, reps=20)
    del kr, vr
    try:
        t_attn = attention_time(length, group)
    except Exception as e:  # the attention kernel is not this script's subject: report, keep the write numbers
        print(f"attention timing failed: {e!r}", file=sys.stderr)
        t_attn = float("nan")
    try:
        t_layout, path = layout_attention_time(kq, vq, length, n_sink, window, name in ROPE_CASES)
    except Exception as e:
        print(f"layout attention timing failed: {e!r}", file=sys.stderr)
        t_layout, path = float("nan"), "failed"
    row = dict(case=name, k=repr(kq), v=repr(vq), n_sink=n_sink, window=window, length=length,
               kernel_us=t_kernel, pair_us=t_pair, op_eager_us=t_op, reference_us=t_ref, attention_us=t_attn, attention_group=group,
               ratio=t_kernel / t_attn, pair_ratio=t_pair / t_attn, layout_attention_us=t_layout,
               layout_attention_path=path, layout_ratio=t_pair / t_layout, target=0.05)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for bench_write.json and bench_write.md")
    p.add_argument("--length", type=int, default=32768, help="tokens in the cache (attention length)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per captured graph")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the kernel variants")
    p.add_argument("--sweep-cases", default="k2v2_g128_w128", help="comma-separated cases for the variants")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_write.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name()

    floor = floor_time(a.steps)
    print(json.dumps(dict(empty_launch_us=floor)), flush=True)
    rows = [run_case(c, a.length, a.steps) for c in a.cases.split(",")]
    tuned = [r for c in a.sweep_cases.split(",") for r in sweep(c, a.length, a.steps, VARIANTS)] if a.sweep else []
    head = (f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; B={B} Hq={HQ} Hkv={HKV} D={D}, "
            f"L={a.length}, one new token per step, K and V; graph replays "
            f"{'queued behind a spin kernel' if _timing.QUEUED else 'isolated'}")
    lines = [head, "",
             "| case | write kernel, K and V in one launch (graph) us | write kernel, two launches (graph) us | "
             "write op eager us | reference us | the layer's own attention us | one launch / own attention | "
             "proxy attention us (L, K2V2, g, no sink / window) | one launch / proxy | two launches / proxy | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        one, one_r = f"{r['pair_us']:.2f}", f"{100 * r['pair_ratio']:.2f}%"
        lines.append(f"| {r['case']} | {one} | {r['kernel_us']:.2f} | {r['op_eager_us']:.1f} | {r['reference_us']:.1f} | "
                     f"{r['layout_attention_us']:.1f} | {100 * r['layout_ratio']:.2f}% | "
                     f"{r['attention_us']:.1f} (g{r['attention_group']}) | {one_r} | {100 * r['ratio']:.2f}% | "
                     f"one launch <= 5% of own |")
    lines += ["", "Own attention paths: " + "; ".join(f"{r['case']}: {r['layout_attention_path']}" for r in rows)]
    lines += ["", f"An empty launch with the pair's grid (64 x 2 programs of 8 warps), graph-timed the same way: "
                  f"{floor:.2f} us per step (the floor of any one-launch write)."]
    if tuned:
        lines += ["", "kernel variants, K and V in one launch ({}: the default)", "",
                  "| case | launcher keywords | kernel us |", "|---|---|---:|"]
        lines += [f"| {t['case']} | {t['tuning']} | {t['kernel_us']:.2f} |" for t in tuned]
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_write.json"), "w") as f:
            json.dump(dict(device=dev, torch=torch.__version__, triton=triton.__version__, rows=rows, tuning=tuned,
                           empty_launch_us=floor),
                      f, indent=1)
        with open(os.path.join(a.out, "bench_write.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
