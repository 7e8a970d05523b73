"""Sweep of scheme options on a few quality windows (the numbers behind SKVQ's defaults in the README).

    python benchmarks/skvq_sweep.py '[["k2v2 g16 pre-RoPE", {"v_bits": 2, "group_size": 16, "pre_rope": true}]]'
    python benchmarks/skvq_sweep.py --windows 1,5 '[["kivi", {"scheme": "kivi"}]]'

Each entry is [label, overrides]; "scheme" in the overrides picks the scheme (default skvq). Same protocol as
benchmarks/quality.py (prefill 1024, decode 1024 in chunks of 64) on a subset of its 8 windows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvcompile
from kvcompile.assets import load_model
from kvcompile.eval.perplexity import essay_windows, evaluate_perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", help="JSON list of [label, overrides]")
    p.add_argument("--windows", default="1,5", help="which of the 8 standard windows (comma-separated)")
    p.add_argument("--model", default="smollm2")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    wins = essay_windows(tok, n_windows=8, length=2048)[[int(i) for i in args.windows.split(",")]]
    rows = [("full precision", None)] + [tuple(c) for c in json.loads(args.configs)]
    for label, overrides in rows:
        factory = None
        if overrides is not None:
            kw = dict(overrides)
            scheme = kw.pop("scheme", "skvq")
            factory = lambda scheme=scheme, kw=kw: kvcompile.make_cache(model, scheme, **kw)  # noqa: E731
        t0 = time.perf_counter()
        r = evaluate_perplexity(model, wins, factory, prefill=1024, chunk=64, progress=False)
        bits = f"{r.bits_per_element:.2f}" if r.bits_per_element else "-"
        print(f"{label:40s} PPL {r.ppl:8.3f}  bits {bits:>6}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
