"""kvcompile as a torch.compile backend, on SmolLM2-135M.

    python examples/compile_backend.py                       # inductor (first compile takes a while on CPU)
    python examples/compile_backend.py --compiler aot_eager  # same passes, quick to compile

Routes into the same two ops (kvcompile::quantize_kv_write_ and kvcompile::dequant_attention):

1. ``torch.compile(model, backend="kvcompile")`` on the unchanged model with transformers' StaticCache: the
   passes find each attention site and the ``index_copy_`` that writes its K/V buffer, and rewrite them into
   the kvcompile ops on packed storage that lives outside the graph (keyed to the buffer it replaces).
1b. The same compiled model with transformers' DynamicCache (``torch.cat`` of past and new K/V, stored back
   on the cache): the decode graphs append to packed storage and hand the cache layers handles to it, so
   the cache holds no full-precision K/V after the first decode step.
2. ``kvcompile.apply(model, scheme, compile=True)``: the cache itself is packed (no full-precision buffers);
   the compiled graph already holds the ops, and ``generate`` works as usual.

Prints the generated texts, what the passes matched and rewrote (``kvcompile.compile_report()``) and the
bytes the packed cache holds (``kvcompile.report``).
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from transformers import DynamicCache, StaticCache

import kvcompile
from kvcompile.assets import load_model, paul_graham_essays


def greedy(step, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a model call ``step(ids) -> logits`` that keeps its own cache."""
    out = []
    with torch.no_grad():
        logits = step(ids)
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = step(nxt)
    return torch.cat(out, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--scheme", default="skvq", help=f"one of {', '.join(kvcompile.scheme_names())}")
    p.add_argument("--bits", type=int, default=None, help="K and V bits (kivi / skvq); default: the scheme's")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--context-chars", type=int, default=2000,
                   help="essay text in the prompt (the default schemes keep 128 recent tokens in full precision)")
    args = p.parse_args()

    model, tok = load_model("smollm2")
    essay = paul_graham_essays()[: args.context_chars]
    messages = [{"role": "user", "content": f"{essay}\n\nIn one sentence, what is this essay about?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    capacity = ids.shape[1] + args.new_tokens + 8
    options = {"k_bits": args.bits, "v_bits": args.bits} if args.bits is not None else {}

    # -- full precision, uncompiled: the reference text
    fp_cache = StaticCache(config=model.config, max_cache_len=capacity)
    t0 = time.perf_counter()
    ref = greedy(lambda x: model(x, **{cache_kw: fp_cache}, use_cache=True).logits, ids, args.new_tokens)
    t_ref = time.perf_counter() - t0

    # -- route 1: the backend by name, on the unchanged model and a StaticCache. The by-name backend uses the
    #    default scheme; a factory picks another: kvcompile.backend(scheme, **options, compiler=...)
    by_name = args.compiler == "inductor" and args.scheme == "skvq" and not options
    backend = "kvcompile" if by_name else kvcompile.backend(args.scheme, compiler=args.compiler, capacity=capacity,
                                                            **options)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    t0 = time.perf_counter()
    out1 = greedy(lambda x: compiled(x, **{cache_kw: cache}, use_cache=True).logits, ids, args.new_tokens)
    t_1 = time.perf_counter() - t0
    report1 = kvcompile.compile_report()
    kvcompile.passes.clear_reports()

    # -- route 1b: the same compiled model with a DynamicCache (concatenation, returned on the cache)
    dyn = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out1b = greedy(lambda x: compiled(x, **{cache_kw: dyn}, use_cache=True).logits, ids, args.new_tokens)
    t_1b = time.perf_counter() - t0
    stores = [kvcompile.passes.packed_storage(t) for layer in dyn.layers for t in (layer.keys, layer.values)]
    packed_1b = sum(pk.storage_nbytes() for pk in stores)
    fp_1b = sum(pk.length * pk.shape[1] * pk.shape[0] * pk.head_dim * pk.kv_dtype.itemsize for pk in stores)
    report1b = kvcompile.compile_report().graphs[-1]
    kvcompile.passes.clear_reports()

    # -- route 2: apply(compile=True): a packed transformers cache, compiled forward, generate as usual
    kvcompile.apply(model, args.scheme, compile=True, max_cache_len=capacity,
                    compile_options={"fullgraph": True}, **options)
    t0 = time.perf_counter()
    out2 = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False)[:, ids.shape[1]:]
    t_2 = time.perf_counter() - t0
    report2 = kvcompile.compile_report()

    def text(t):
        return tok.decode(t[0], skip_special_tokens=True).strip()

    print(f"prompt: {ids.shape[1]} tokens, {args.new_tokens} new, "
          f"{kvcompile.get_scheme(args.scheme, **options).describe()}, compiler {args.compiler}")
    print(f"\n[full precision, eager]  ({t_ref:.1f} s)\n{text(ref)}")
    print(f"\n[torch.compile(backend=kvcompile), StaticCache rewritten]  ({t_1:.1f} s incl. compile)\n{text(out1)}")
    print(f"\n[torch.compile(backend=kvcompile), DynamicCache rewritten]  ({t_1b:.1f} s incl. compile)\n{text(out1b)}")
    print(f"\n[kvcompile.apply(compile=True) + generate]  ({t_2:.1f} s incl. compile)\n{text(out2)}")
    print("\nWhat the passes did (route 1):")
    print(report1.to_text())
    print("\nWhat the passes did (route 1b, the last decode graph):")
    print(report1b.to_text())
    print(f"route 1b cache: {len(stores)} packed storages, {packed_1b:,} bytes (capacity {capacity} tokens each) "
          f"for {stores[0].length} tokens that take {fp_1b:,} bytes in full precision")
    print("\nWhat the passes did (route 2):")
    print(report2.to_text())
    print("\nKV cache held by route 2 (bytes measured from the storage tensors):")
    print(kvcompile.report(model).to_text())


if __name__ == "__main__":
    main()
