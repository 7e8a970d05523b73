"""Quality benchmark: perplexity of KV-cache schemes on real text (kvcompile.eval protocol).

    python benchmarks/quality.py                                  # SmolLM2-135M, 8 x 2048, all rows
    python benchmarks/quality.py --windows 2 --length 1024 --prefill 512 --schemes kivi,skvq
    python benchmarks/quality.py --schemes kivi --scheme-args kivi:k_bits=4,v_bits=4 --scheme-args kivi:k_bits=2,v_bits=2

Rows: full precision (the model's own DynamicCache), transformers' QuantizedCache with the quanto
backend (int4/int2, axis_key 0 and -1; needs optimum-quanto), and one row per kvcompile scheme via
``kvcompile.make_cache(model, scheme, **overrides)``. A scheme named in ``--scheme-args`` gets one row per
``--scheme-args`` entry (labelled e.g. ``kivi k4v4``) instead of its default row. When ``make_cache``
accepts ``max_cache_len``, it gets the window length (unless an override sets it).

Bits per element are measured from each cache's stored tensors at the end of a window (codes +
scales/zeros + full-precision parts; kvcompile caches report their own via ``bits_per_element()``).

Writes ``<out>/quality.md`` (the table), ``<out>/quality.json`` (raw numbers), ``<out>/quality.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("kvcompile.benchmarks.quality")

DEFAULT_SCHEMES = ["kivi", "skvq", "nqkv", "kvmix", "int8", "fp8"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ parsing


def parse_value(text: str):
    """``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"true"``/``"false"`` -> bool, ``"none"`` -> None, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_scheme_args(spec: str) -> tuple[str, dict]:
    """``"kivi:k_bits=4,v_bits=4"`` -> ``("kivi", {"k_bits": 4, "v_bits": 4})``."""
    scheme, _, rest = spec.partition(":")
    scheme = scheme.strip()
    if not scheme:
        raise argparse.ArgumentTypeError(f"--scheme-args {spec!r}: expected SCHEME:key=value,...")
    overrides: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"--scheme-args {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = parse_value(value)
    return scheme, overrides


def row_label(scheme: str, overrides: dict) -> str:
    """``("kivi", {"k_bits": 4, "v_bits": 4, "group_size": 32})`` -> ``"kivi k4v4 group_size=32"``."""
    bits = "".join(f"{k[:-5]}{v}" for k, v in overrides.items() if k.endswith("_bits"))
    rest = [f"{k}={v}" for k, v in overrides.items() if not k.endswith("_bits")]
    return " ".join([scheme] + ([bits] if bits else []) + rest)


def available_schemes() -> list[str]:
    """Scheme names from kvcompile's registry if it exposes one, else the planned list."""
    try:
        import kvcompile
        import kvcompile.schemes as schemes
    except Exception:
        return list(DEFAULT_SCHEMES)
    fn = getattr(kvcompile, "scheme_names", None)
    if callable(fn):
        try:
            return list(fn())
        except Exception:
            pass
    for attr in ("available_schemes", "list_schemes", "scheme_names"):
        fn = getattr(schemes, attr, None)
        if callable(fn):
            try:
                return list(fn())
            except Exception:
                pass
    for attr in ("REGISTRY", "SCHEMES", "registry"):
        reg = getattr(schemes, attr, None)
        if isinstance(reg, dict) and reg:
            return list(reg)
    return list(DEFAULT_SCHEMES)


# ------------------------------------------------------------------------------------------ rows


def plan_rows(args) -> list[dict]:
    rows: list[dict] = [{"kind": "fp", "label": "full precision", "params": {}}]
    if not args.no_quanto:
        for bits in (4, 2):
            for axis_key in (0, -1):
                rows.append({
                    "kind": "quanto",
                    "label": f"quanto int{bits} axis_key={axis_key}",
                    "params": {"bits": bits, "axis_key": axis_key, "axis_value": 0,
                               "q_group_size": args.quanto_group_size,
                               "residual_length": args.quanto_residual_length},
                })
    with_args: dict[str, list[dict]] = {}
    for scheme, overrides in args.scheme_args:
        with_args.setdefault(scheme, []).append(overrides)
    names = list(args.schemes) + [s for s in with_args if s not in args.schemes]
    for scheme in names:
        for overrides in with_args.get(scheme, [{}]):
            rows.append({"kind": "kvcompile", "label": row_label(scheme, overrides),
                         "params": {"scheme": scheme, "overrides": overrides}})
            if getattr(args, "backend_route", False):
                rows.append({"kind": "backend", "label": row_label(scheme, overrides) + " [torch.compile backend]",
                             "params": {"scheme": scheme, "overrides": overrides}})
    return rows


def compiled_for(row: dict, model, capacity: int):
    """The model compiled with the kvcompile backend for this row's scheme: the unchanged model with its own
    DynamicCache, whose concatenations the backend rewrites (aot_eager: the same passes, quick to compile)."""
    import torch._dynamo

    import kvcompile

    torch._dynamo.reset()
    backend = kvcompile.backend(row["params"]["scheme"], compiler="aot_eager", capacity=capacity,
                                **row["params"]["overrides"])
    return torch.compile(model, backend=backend, fullgraph=True)


def cache_factory_for(row: dict, model, max_cache_len: int | None = None):
    """``(factory_or_None, note)``; a note (and no factory) means the row cannot run here."""
    if row["kind"] in ("fp", "backend"):
        return None, None
    if row["kind"] == "quanto":
        from kvcompile.eval import quanto_cache_factory

        p = row["params"]
        try:
            return quanto_cache_factory(model, p["bits"], axis_key=p["axis_key"], axis_value=p["axis_value"],
                                        q_group_size=p["q_group_size"],
                                        residual_length=p["residual_length"]), None
        except ImportError as e:
            return None, str(e)
    # kvcompile scheme
    import kvcompile

    make_cache = getattr(kvcompile, "make_cache", None)
    if make_cache is None:
        return None, "not available yet (kvcompile.make_cache does not exist)"
    scheme, overrides = row["params"]["scheme"], row["params"]["overrides"]
    extra = {}
    if max_cache_len is not None and "max_cache_len" not in overrides:
        try:
            if "max_cache_len" in inspect.signature(make_cache).parameters:
                extra["max_cache_len"] = max_cache_len  # capacity = one window, nothing preallocated beyond it
        except (TypeError, ValueError):
            pass

    def factory():
        return make_cache(model, scheme, **extra, **overrides)

    try:
        factory()  # fail early: unknown scheme, bad override, unsupported model
    except NotImplementedError as e:
        return None, f"not available yet ({e})"
    except Exception as e:
        return None, f"not available: {type(e).__name__}: {e}"
    return factory, None


def has_quanto() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no `optimum` package at all
        return False


def estimated_quanto_bits(row: dict, dtype: torch.dtype) -> float:
    """Fallback when quanto's storage cannot be measured: codes + float scale and shift per group
    (the full-precision residual is ignored)."""
    p = row["params"]
    meta_bits = 2 * torch.finfo(dtype).bits
    return p["bits"] + meta_bits / p["q_group_size"]


# ------------------------------------------------------------------------------------------ output


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Perplexity of {meta['model']} ({meta['dtype']}) on Paul Graham essays: {meta['windows']} windows of "
        f"{meta['length']} tokens, prefill {meta['prefill']}, decode scored in chunks of {meta['chunk']}.",
        "",
        "| method | PPL | delta vs full precision (%) | avg stored bits per K/V element |",
        "|---|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        if r.get("note"):
            short = r["note"].split(" (")[0].split(":")[0]  # "not available yet", "failed", ...
            lines.append(f"| {r['label']} | {short} | - | - |")
            if short != r["note"]:
                notes.append(f"{r['label']}: {r['note']}")
            continue
        bits = fmt(r["bits_per_element"], ".2f")
        if r.get("bits_estimated"):
            bits += " (est.)"
        delta = r.get("delta_pct")
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {'-' if delta is None else f'{delta:+.2f}'} | {bits} |")
    if any(r["kind"] == "quanto" and not r.get("note") for r in results):
        notes.append("quanto bits are measured at the end of a window: packed codes + per-group scale and shift "
                     f"in the model dtype + the full-precision residual (up to {meta.get('quanto_residual_length')} "
                     "tokens).")
    if meta.get("quanto_missing"):
        notes.append(f"quanto rows skipped: {meta['quanto_missing']}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def bar_plot(results: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("delta_pct") is not None]
    if not done:
        return
    labels = [r["label"] for r in done]
    deltas = [r["delta_pct"] for r in done]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(done) + 2), 4.5))
    colors = ["#888888" if r["kind"] == "fp" else "#4c72b0" if r["kind"] == "quanto" else "#dd8452" for r in done]
    bars = ax.bar(range(len(done)), deltas, color=colors)
    ax.set_xticks(range(len(done)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("PPL increase vs full precision (%)")
    big = max(abs(d) for d in deltas)
    small = sorted(abs(d) for d in deltas if d != 0)
    if small and big > 50 * small[len(small) // 2]:
        ax.set_yscale("symlog", linthresh=1.0)
    for b, d in zip(bars, deltas):
        ax.annotate(f"{d:+.2f}" if abs(d) < 10 else f"{d:+.0f}", (b.get_x() + b.get_width() / 2, d), ha="center",
                    va="bottom" if d >= 0 else "top", fontsize=7)
    ax.margins(y=0.12)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(f"{meta['model']}: delta PPL ({meta['windows']}x{meta['length']}, prefill {meta['prefill']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled GGUF) or a hub id / local path")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--schemes", default=None,
                   help="comma-separated kvcompile schemes (default: all registered; '' or 'none' for none)")
    p.add_argument("--scheme-args", action="append", default=[], type=parse_scheme_args, metavar="SCHEME:K=V,...",
                   help="overrides for one row of SCHEME, e.g. kivi:k_bits=4,v_bits=4 (repeatable)")
    p.add_argument("--no-quanto", action="store_true", help="skip the transformers/quanto QuantizedCache rows")
    p.add_argument("--backend-route", action="store_true",
                   help="add, for each scheme, a row through torch.compile(model, backend=kvcompile.backend(...)) "
                        "on the model's own DynamicCache (the prefill stays full precision there)")
    p.add_argument("--quanto-group-size", type=int, default=64)
    p.add_argument("--quanto-residual-length", type=int, default=128)
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.schemes is None:
        args.schemes = available_schemes()
    elif args.schemes.strip().lower() in ("", "none"):
        args.schemes = []
    else:
        args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]

    from kvcompile.assets import load_model
    from kvcompile.eval import essay_token_ids, evaluate_perplexity, make_windows

    quanto_missing = None
    if not args.no_quanto and not has_quanto():
        quanto_missing = "optimum-quanto is not installed (`pip install optimum-quanto`)"
        args.no_quanto = True

    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    ids = essay_token_ids(tokenizer)
    windows = make_windows(ids, args.windows, args.length)
    logger.info("model %s loaded in %.1fs; %d tokens of text, windows %s", args.model,
                time.perf_counter() - t0, ids.numel(), tuple(windows.shape))

    meta = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "windows": args.windows,
        "length": args.length, "prefill": args.prefill, "chunk": args.chunk, "text_tokens": ids.numel(),
        "quanto_group_size": args.quanto_group_size, "quanto_residual_length": args.quanto_residual_length,
        "quanto_missing": quanto_missing, "torch": torch.__version__, "python": platform.python_version(),
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except Exception:
        pass

    results: list[dict] = []
    fp_ppl = None
    for row in plan_rows(args):
        res = {"label": row["label"], "kind": row["kind"], "params": row["params"]}
        factory, note = cache_factory_for(row, model, max_cache_len=args.length)
        if note is not None:
            logger.info("%s: %s", row["label"], note)
            res["note"] = note
            results.append(res)
            continue
        logger.info("running %s ...", row["label"])
        try:
            target = compiled_for(row, model, args.length) if row["kind"] == "backend" else model
            r = evaluate_perplexity(target, windows, factory, prefill=args.prefill, chunk=args.chunk,
                                    progress=not args.no_progress)
        except Exception as e:  # one broken scheme must not lose the other rows
            if row["kind"] == "fp":
                raise
            logger.exception("%s failed", row["label"])
            res["note"] = f"failed: {type(e).__name__}: {e}"
            results.append(res)
            continue
        bits, estimated = r.bits_per_element, r.bits_estimated
        if bits is None and row["kind"] == "quanto":
            bits, estimated = estimated_quanto_bits(row, dtype), True
        res.update(ppl=r.ppl, mean_nll=r.mean_nll, n_tokens=r.n_tokens, window_ppl=r.window_ppl,
                   seconds=r.seconds, bits_per_element=bits, bits_estimated=estimated)
        if row["kind"] == "fp":
            fp_ppl = r.ppl
        res["delta_pct"] = None if fp_ppl is None else 100.0 * (r.ppl / fp_ppl - 1.0)
        logger.info("%s: PPL %.3f  bits %s  (%.0fs)", row["label"], r.ppl, fmt(bits, ".2f"), r.seconds)
        results.append(res)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, meta)
    sys.stdout.write(table)
    (out / "quality.md").write_text(table)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    bar_plot(results, out / "quality.png", meta)
    logger.info("wrote %s, %s, %s", out / "quality.md", out / "quality.json", out / "quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
