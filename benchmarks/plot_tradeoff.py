"""Speed against quality: each layout's decode-attention speedup (H100, bench_attention.py) beside its perplexity
increase (SmolLM2, quality.py), read from the measured result files in benchmarks/results. Nothing here is measured
again: the script joins the two benchmarks' JSON files by a fixed table of which quality row and which attention row
are the same layout (``LAYOUTS``), and writes a table and a plot.

    python benchmarks/plot_tradeoff.py [--results benchmarks/results] [--out benchmarks/results]

Writes ``<out>/tradeoff.md`` and ``<out>/tradeoff.png``. The two sides are measured on different models: quality on
SmolLM2 (head dim 64, so "one group per head" there is 64 channels), attention at the Llama-3-8B shape (B=8, 32 query /
8 KV heads of 128, 32k tokens). Each attention row's sink / window tokens match its quality row's, except where the
note says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import pyplot  # noqa: E402

# (label, quality file, quality row label, attention file, attention case, kernel, note)
LAYOUTS = [
    ("pertoken (K4V2, 4 sink + 128 recent)", "quality_v37_pertoken.json", "pertoken",
     "bench_attention_v36_k4v2.json", "k4v2_b8_gqa4_32k_s4_w128", "Gluon", ""),
    ("K4V4 per token, 128 recent", "quality_v36_gluon_layouts.json",
     "skvq k4v4 group_size=None reorder=False pre_rope=False k_clip_ratio=1.0 n_sink=0",
     "bench_attention_v36_k4.json", "k4v4_b8_gqa4_32k_w128", "Gluon", ""),
    ("K2V2 per token, 4 sink + 128 recent", "quality_v36_gluon_layouts.json",
     "skvq k2v2 group_size=None reorder=False pre_rope=False n_sink=4",
     "bench_attention_v35_queued.json", "k2v2_b8_gqa4_32k_s4_w128", "Gluon", "quality: key clip 0.95"),
    ("kivi K2V2", "quality.json", "kivi k2", "bench_attention_v36_k4.json", "kivi_k2v2_b8_gqa4_32k_w128", "Triton", ""),
    ("kivi K4V4", "quality.json", "kivi k4v4", "bench_attention_v36_k4.json", "kivi_k4v4_b8_gqa4_32k_w128", "Triton",
     ""),
    ("skvq (defaults)", "quality.json", "skvq v1.5", "bench_attention_v35_schemes.json", "skvq_b8_gqa4_32k_s4_w128",
     "Triton", ""),
    ("nqkv", "quality.json", "nqkv", "bench_attention_v35_schemes.json", "nf4_b8_gqa4_32k", "Triton",
     "attention row without sink / recent tokens"),
    ("int8", "quality.json", "int8", "bench_attention_v35_schemes.json", "int8_b8_gqa4_32k", "Triton", ""),
    ("fp8", "quality.json", "fp8", "bench_attention_v35_schemes.json", "fp8_b8_gqa4_32k", "Triton", ""),
]


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    """A result file, read once (several layouts come from the same file)."""
    with open(path) as f:
        return json.load(f)


def _quality(path: str, label: str) -> tuple[float, float, float]:
    """(perplexity, the same file's full-precision perplexity, stored bits per element) of one row."""
    rows = _load(path)["results"]
    fp = next(r for r in rows if r["label"] == "full precision")
    for r in rows:
        if r["label"] == label:
            return r["ppl"], fp["ppl"], r["bits_per_element"]
    raise KeyError(f"{path} has no quality row {label!r}; rows: {[r['label'] for r in rows]}")


def _attention(path: str, case: str) -> dict:
    data = _load(path)
    for r in data["rows"]:
        if r["case"] == case:
            return dict(r, device=data.get("device", "?"))
    raise KeyError(f"{path} has no attention case {case!r}; cases: {[r['case'] for r in data['rows']]}")


def collect(results: str) -> list[dict]:
    out = []
    for label, qf, ql, af, case, kernel, note in LAYOUTS:
        ppl, fp, bits = _quality(os.path.join(results, qf), ql)
        att = _attention(os.path.join(results, af), case)
        if qf == "quality.json":  # measured 2026-11-25, before session 10 kept the window's codes too
            note = "; ".join(x for x in (note, "bits stored before session 10's ring window (0.1-0.27 more now)") if x)
        out.append(dict(layout=label, ppl=ppl, ppl_fp=fp, ppl_delta=100 * (ppl / fp - 1), bits=bits,
                        fused_us=att["fused_us"], sdpa_us=att["sdpa_us"], speedup=att["sdpa_us"] / att["fused_us"],
                        kernel=kernel, device=att["device"], quality_file=qf, attention_file=af, case=case, note=note))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| layout | PPL (SmolLM2) | vs full precision | bits per element | attention us (32k) | vs fp16 SDPA | kernel "
             "| sources | note |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        lines.append(f"| {r['layout']} | {r['ppl']:.2f} | {r['ppl_delta']:+.2f}% | {r['bits']:.2f} | {r['fused_us']:.1f} "
                     f"| {r['speedup']:.2f}x | {r['kernel']} | {r['quality_file']}, {r['attention_file']} "
                     f"({r['case']}) | {r['note']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for kernel, marker in (("Gluon", "o"), ("Triton", "s")):
        sel = [r for r in rows if r["kernel"] == kernel]
        ax.scatter([r["ppl_delta"] for r in sel], [r["speedup"] for r in sel], marker=marker, s=50,
                   label=f"{kernel} kernel")
        for r in sel:
            right = r["ppl_delta"] > 50  # (the far right: label to the left of the point)
            ax.annotate(r["layout"], (r["ppl_delta"], r["speedup"]), textcoords="offset points",
                        xytext=(-6 if right else 6, -12 if right else 4), ha="right" if right else "left", fontsize=7)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("perplexity increase on SmolLM2, % (log scale; left is better)")
    ax.set_ylabel("decode attention vs fp16 SDPA, H100, 32k (up is better)")
    ax.set_title("kvcompile layouts: speed against quality")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=here, help="where the quality and attention JSON files are")
    p.add_argument("--out", default=here)
    args = p.parse_args(argv)
    rows = collect(args.results)
    os.makedirs(args.out, exist_ok=True)
    text = ("Decode-attention speed (H100, Llama-3-8B shape, B=8, 32k tokens) against perplexity (SmolLM2, "
            "8 windows of 2048) per layout, joined from the result files named in each row "
            "(`python benchmarks/plot_tradeoff.py`).\n\n" + table(rows) + "\n")
    with open(os.path.join(args.out, "tradeoff.md"), "w") as f:
        f.write(text)
    print(text)
    if plot(rows, os.path.join(args.out, "tradeoff.png")):
        print(f"wrote {os.path.join(args.out, 'tradeoff.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
