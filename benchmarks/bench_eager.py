"""Eager decode attention through ``kvcompile.ops.attention``: the fused kernel against the fallback it replaces.

    python benchmarks/bench_eager.py [--out DIR] [--lengths 256,1024,4096,16384] [--batches 1,8] [--calls 50]

Called outside a CUDA graph (``model.generate`` without ``torch.compile``), a decode step pays the host cost of each
launch. The op's CUDA path then chooses between the fused Triton kernel and its fallback, which dequantizes the
valid cache to the model's dtype and runs SDPA (``kvcompile.ops._dequant_sdpa``: what ``QuantizedCache`` does every
step). Until 2026-11-26 the op chose between them by a cost model against SDPA over an fp16 cache
(``fused_decode_is_profitable``); the "old rule" column shows that rule's choice (``fused_decode_is_profitable`` on
the capacity, as the op saw it), measured here to be wrong for short caches (results before 2026-11-27 used that
rule's constants; the cost model has since been refitted to the Gluon kernel and the cached launches' host cost, so
a run now shows the refitted model's choice). The op now takes the kernel wherever it is supported. This script
measures both routes per call, on real ``PackedKV`` caches (filled by ``PackedKV.append``), with
``KVCOMPILE_FUSED=always`` and ``never``:

- wall time per call: ``--calls`` back-to-back calls, then one synchronisation, divided by the calls (the host
  enqueues while the GPU runs, so this is the slower of the two per call, as in a decode loop);
- the route the old rule took, and whether it was the faster one.

Layouts: per-token K2V2 in groups of 128 with 4 sink + 128 window tokens, and KIVI (per-channel K in groups of 32
tokens, V in groups of 32, 128 window). B x 32 q / 8 kv heads x 128, fp16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from kvcompile import ops
from kvcompile.cache import PackedKV
from kvcompile.kernels.decode_attention import fused_decode_is_profitable
from kvcompile.schemes import TensorQuant

HQ, HKV, D = 32, 8, 128
LAYOUTS = {
    "k2v2_g128_s4_w128": (TensorQuant("affine", 2, None, "token"), TensorQuant("affine", 2, None, "token"), 4, 128),
    "kivi_k2v2_w128": (TensorQuant("affine", 2, 32, "channel"), TensorQuant("affine", 2, 32, "token"), 0, 128),
}


def make_caches(kq, vq, n_sink, window, batch, length, device="cuda", spare=64):
    caches = []
    for q in (kq, vq):
        p = PackedKV.empty(batch, HKV, D, q, capacity=length + spare, n_sink=n_sink, window=window,
                           dtype=torch.float16, device=device)
        p.append(torch.randn(batch, HKV, length, D, device=device, dtype=torch.float16))
        caches.append(p)
    return caches


def per_call_us(fn, calls):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def breakdown(calls, out_dir):
    """Per-call wall time of each layer of an eager fused call; one line each, printed and written."""
    from kvcompile.kernels import decode_attention as da
    from kvcompile.kernels import quantize_write as qw

    kq, vq, n_sink, window = LAYOUTS["k2v2_g128_s4_w128"]
    k, v = make_caches(kq, vq, n_sink, window, 8, 4096, spare=16 * calls + 64)  # room for the writes below
    q = torch.randn(8, HQ, 1, D, device="cuda", dtype=torch.float16)
    new = torch.randn(8, HKV, 1, D, device="cuda", dtype=torch.float16)
    kw = dict(q=q, k_sink=k.sink, k_codes=k.codes, k_scale=k.scale, k_zero=k.zero, k_window=k.window, v_sink=v.sink,
              v_codes=v.codes, v_scale=v.scale, v_zero=v.zero, v_window=v.window, lengths=k.counts, k_bits=2,
              v_bits=2, k_group_size=D, v_group_size=D)
    os.environ["KVCOMPILE_FUSED"] = "always"
    steps = {
        "ops.attention (torch.ops dispatch + PackedKV rebuild + below)":
            lambda: ops.attention(q, k, v, scale=D**-0.5, is_causal=True),
        "ops._fused_cuda (checks, key order, launcher)": lambda: ops._fused_cuda(q, k, v, D**-0.5, None, True),
        "decode_attention (validation + split and merge launches)": lambda: da.decode_attention(**kw),
        "decode_attention, one split (no merge launch)": lambda: da.decode_attention(**kw, num_splits=1),
        "ops.write_pair (one write launch for K and V)": lambda: ops.write_pair(k, new, v, new),
        "empty torch op (torch.empty_like(q)) for scale": lambda: torch.empty_like(q),
    }
    lines = []
    saved = os.environ.get("KVCOMPILE_DIRECT_LAUNCH")
    try:
        for direct in ("1", "0"):  # the cached plans launch directly (kvcompile/kernels/launch.py), or dispatch
            os.environ["KVCOMPILE_DIRECT_LAUNCH"] = direct
            da._DECODE_PLANS.clear()
            qw._WRITE_PLANS.clear()
            for name, fn in steps.items():
                if direct == "0" and name.startswith("empty"):
                    continue
                how = "" if direct == "1" else ", direct launches off (Triton's dispatch)"
                lines.append(f"{per_call_us(fn, calls * 4):8.1f} us  {name}{how}")
                print(lines[-1], flush=True)
    finally:
        if saved is None:
            os.environ.pop("KVCOMPILE_DIRECT_LAUNCH", None)
        else:
            os.environ["KVCOMPILE_DIRECT_LAUNCH"] = saved
    with open(os.path.join(out_dir, "bench_eager_breakdown.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="256,1024,4096,16384")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="timings per route; the median is reported")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the layers of one eager fused call (B=8, 4096 tokens, K2V2 g128): the op, the op's "
                         "CUDA implementation, the kernel launcher, one split; and a layer's write pair; each with the "
                         "cached plans' direct launches on and off")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_eager.py needs CUDA (it times the op's CUDA routes)")
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    rows = []
    saved = os.environ.get("KVCOMPILE_FUSED")
    try:
        for layout, (kq, vq, n_sink, window) in LAYOUTS.items():
            for b in (int(x) for x in args.batches.split(",")):
                for n in (int(x) for x in args.lengths.split(",")):
                    k, v = make_caches(kq, vq, n_sink, window, b, n)
                    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.float16)
                    t = {}
                    for policy in ("always", "never"):
                        os.environ["KVCOMPILE_FUSED"] = policy
                        runs = sorted(per_call_us(lambda: ops.attention(q, k, v, scale=D**-0.5, is_causal=True),
                                                  args.calls) for _ in range(args.repeats))
                        t[policy] = runs[len(runs) // 2]
                    # the op's rule until 2026-11-26: the cost model on the capacity (inside the op the PackedKV
                    # is rebuilt from its tensors, so no host-known length)
                    auto_fused = fused_decode_is_profitable(batch=b, kv_heads=HKV, head_dim=D, seq_len=k.shape[2],
                                                            k_bits=2, v_bits=2)
                    faster = "fused" if t["always"] < t["never"] else "fallback"
                    row = dict(layout=layout, B=b, L=n, fused_us=t["always"], fallback_us=t["never"],
                               old_rule="fused" if auto_fused else "fallback", faster=faster,
                               auto_right=(auto_fused == (faster == "fused")))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del k, v
                    torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop("KVCOMPILE_FUSED", None)
        else:
            os.environ["KVCOMPILE_FUSED"] = saved
    if args.breakdown:
        breakdown(args.calls, args.out)
    lines = ["| layout | B | L | fused us / call | dequantize + SDPA us / call | faster | old rule picked | right |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['B']} | {r['L']} | {r['fused_us']:.1f} | {r['fallback_us']:.1f} | "
                     f"{r['faster']} | {r['old_rule']} | {'yes' if r['auto_right'] else 'NO'} |")
    table = "\n".join(lines)
    head = (f"{dev}; torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"command: python {' '.join(sys.argv)}")
    print(f"\n{head}\n{table}")
    with open(os.path.join(args.out, "bench_eager.md"), "w") as f:
        f.write(f"{head}\n\n{table}\n")
    with open(os.path.join(args.out, "bench_eager.json"), "w") as f:
        json.dump(dict(device=dev, rows=rows), f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(LAYOUTS), figsize=(10, 3.5), squeeze=False)
        for ax, layout in zip(axes[0], LAYOUTS):
            for b in sorted({r["B"] for r in rows}):
                rs = [r for r in rows if r["layout"] == layout and r["B"] == b]
                ax.plot([r["L"] for r in rs], [r["fused_us"] for r in rs], "o-", label=f"fused B={b}")
                ax.plot([r["L"] for r in rs], [r["fallback_us"] for r in rs], "s--", label=f"dequant+SDPA B={b}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens in the cache")
            ax.set_ylabel("us per eager call")
            ax.set_title(layout, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_eager.png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
