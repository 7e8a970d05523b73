"""Timing helpers shared by the GPU benchmarks (bench_attention, bench_prefill, bench_write).

Method (the device folder's METHOD.md): time with CUDA events, report medians; replay captured CUDA graphs to
see GPU time without Python launch overhead, each timed replay queued behind a spin kernel so that its launch
latency falls outside the events (since session 19); rotate input copies that together exceed L2 so every call
reads HBM; measure the copy-bandwidth ceiling in the same run.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def do_bench_us(fn: Callable, reps: int, warmup: int) -> float:
    """``triton.testing.do_bench`` median in microseconds (eager calls, L2 flushed, host overhead included)."""
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=reps, return_mode="median") * 1e3


# A sample's start event, replay and end event are enqueued behind a spin kernel of about this long (GPU cycles at
# 1.98 GHz: 300 us), so the GPU reaches them only once all three are queued: the sample holds no launch gap.
SPIN_CYCLES = 600_000
# bench_graph's default sampling (benchmarks' --isolated flag sets False: the sessions 1-18 method)
QUEUED = True


def bench_graph(fns: Sequence[Callable], reps: int = 30, warmup_fns: Sequence[Callable] | None = None,
                warmup_ms: float = 30.0, queued: bool | None = None) -> float:
    """Median GPU time (us) per call of ``fns`` (e.g. one closure per rotating input copy) captured in order in
    one CUDA graph and replayed ``reps`` times, one replay per sample between CUDA events. ``warmup_fns`` (default
    ``fns``) run once on a side stream before the capture; the graph is replayed for about ``warmup_ms`` before the
    timed replays (the H100 read the first configuration of each bench_attention row 5-8% slower than the same
    configuration timed again later in the row with a single warm-up replay: BENCHMARKS.md, head fill).

    queued (default :data:`QUEUED`, True since session 19): each sample is enqueued behind a spin kernel
    (``SPIN_CYCLES``), so the GPU finds the replay queued when the start event fires. With ``queued=False`` (sessions
    1-18) the host synchronises after each sample and the GPU is idle when the next one is launched: the sample then
    also holds the replay's launch latency (about 18 us on the H100 machine for an empty graph), divided over the
    calls in the graph, so a row's share of it depended on its number of input copies (BENCHMARKS.md, "Decode kernel
    v35")."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in (fns if warmup_fns is None else warmup_fns):
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    g.replay()
    en.record()
    en.synchronize()
    for _ in range(min(200, int(warmup_ms / max(st.elapsed_time(en), 1e-3)))):
        g.replay()
    torch.cuda.synchronize()
    times = []
    spin = QUEUED if queued is None else queued
    if spin and not hasattr(torch.cuda, "_sleep"):  # the samples would silently be isolated ones
        raise RuntimeError("bench_graph's queued samples need torch.cuda._sleep, which this torch lacks: time with "
                           "queued=False (bench_attention.py --isolated)")
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin:
            torch.cuda._sleep(SPIN_CYCLES)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en))
    del g
    return sorted(times)[len(times) // 2] * 1e3 / len(fns)


def copies_for(nbytes: int, total: float = 256e6, most: int = 64) -> int:
    """How many input copies to rotate through so that together they hold about ``total`` bytes."""
    return int(max(1, min(most, math.ceil(total / nbytes))))


def copy_bandwidth(bench: Callable[[Callable], float]) -> float:
    """Device-to-device copy bandwidth in GB/s (1 GiB, read + write), timed with ``bench`` (us per call)."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (t * 1e-6) / 1e9


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or None where matplotlib is not installed (the
    benchmarks then write their tables without the plot)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
