"""The "kvcompile" torch.compile backend: registration, the rewrite of index-written caches (gpt-fast, and
transformers' StaticCache in six architectures, sdpa and eager attention), of concatenated caches returned to
the caller (nanoGPT's present; transformers' DynamicCache in the same six), the cache-API route
(``kvcompile.apply(..., compile=True)``), recompiles, graph breaks, the report, and logits.

Logits are compared with the uncompiled full-precision model at 8 bits and with the eager packed path at 2 bits.
The architecture matrix compiles the rewritten graph with aot_eager (the passes are the same; inductor on two
CPU cores costs seconds per graph); the gpt-fast and apply routes go through inductor.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters
from torch.testing import FileCheck

import kvcompile
from kvcompile.passes import clear_reports, clear_storage, compile_report, packed_storage
from kvcompile.passes.debug import ENV_VAR

try:  # tests/ has no __init__.py: pytest's default import mode puts tests/ itself on sys.path
    from models.gptfast import GPTFast
    from models.llamaref import LlamaRef
    from models.nanogpt import NanoGPT
except ImportError:
    from tests.models.gptfast import GPTFast
    from tests.models.llamaref import LlamaRef
    from tests.models.nanogpt import NanoGPT

transformers = pytest.importorskip("transformers")
from transformers import StaticCache  # noqa: E402

VOCAB, PROMPT, STEPS, CAP = 96, 5, 16, 32
EIGHT = dict(k_bits=8, v_bits=8, group_size=4, residual=4)  # kivi at 8 bits: per-channel keys, a residual window
TWO = dict(k_bits=2, v_bits=2, group_size=4, residual=4)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    counters.pop("kvcompile", None)
    clear_reports()
    clear_storage()
    yield
    torch._dynamo.reset()


def _configs():
    t = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64)
    gqa = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": (t.LlamaForCausalLM, lambda: t.LlamaConfig(**gqa, **common)),
        "qwen2": (t.Qwen2ForCausalLM, lambda: t.Qwen2Config(**gqa, **common)),
        "phi3": (t.Phi3ForCausalLM, lambda: t.Phi3Config(**gqa, pad_token_id=0, **common)),
        "gemma": (t.GemmaForCausalLM, lambda: t.GemmaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                             num_key_value_heads=1, head_dim=8, **common)),
        "gpt2": (t.GPT2LMHeadModel, lambda: t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                         n_positions=64)),
        "gpt_neox": (t.GPTNeoXForCausalLM, lambda: t.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                                                   num_attention_heads=4, **common)),
    }


CONFIGS = _configs()


def _model(arch: str, impl: str):
    cls, make = CONFIGS[arch]
    cfg = make()
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return cls(cfg).eval(), cfg


def _cache_key(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _ids(n=PROMPT + STEPS, vocab=VOCAB):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _decode(fn, ids, **kw):
    """Prefill PROMPT tokens, then STEPS one-token steps; the decode logits [1, STEPS, V]."""
    with torch.no_grad():
        fn(ids[:, :PROMPT], **kw)
        return torch.cat([fn(ids[:, t:t + 1], **kw).logits for t in range(PROMPT, PROMPT + STEPS)], dim=1)


def _ops_in(code: str):
    FileCheck().check("torch.ops.kvcompile.quantize_kv_write_").check("torch.ops.kvcompile.dequant_attention").run(code)


# ---------------------------------------------------------------- the backend by name and by factory


def _needs_installed_entry_point():
    """The name "kvcompile" comes from the package's entry point, which exists only where the package is
    installed (``pip install -e .``), not where it is merely importable (``PYTHONPATH=.``)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kvcompile")
    except PackageNotFoundError:
        pytest.skip("kvcompile is importable but not installed for this interpreter: no entry points "
                    "(run `python -m pip install -e .`)")


def test_backend_is_registered_by_name_and_made_by_a_factory():
    _needs_installed_entry_point()
    assert "kvcompile" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("kvcompile") is kvcompile.passes.kvcompile_backend
    a, b = kvcompile.backend("kivi", k_bits=4), kvcompile.backend("kivi", k_bits=4)
    assert a.uuid() == b.uuid() != kvcompile.backend("kivi", k_bits=2).uuid()
    assert a.options.scheme.k_bits == 4 and a.options.compiler == "inductor"
    with pytest.raises(ValueError, match="unknown compiler"):
        kvcompile.backend(compiler="tvm")
    with pytest.raises(TypeError, match="valid options"):
        kvcompile.backend("kivi", kbits=4)


def test_backend_by_name_on_a_model_without_a_cache_leaves_it_unchanged():
    """Prefill-only forward: every site found, none has a cache write; the report says why; logits unchanged."""
    _needs_installed_entry_point()
    model, _ = _model("llama", "sdpa")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="kvcompile")(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    rep = compile_report()
    assert rep.count("unmatched") == 2 and rep.count("rewritten") == 0
    assert all(any("no cache write" in r for r in s.reasons) for s in rep.sites), rep.to_text()
    assert counters["kvcompile"]["full_precision_sites"] == 2


# ---------------------------------------------------------------- gpt-fast: buffers written by index


def _gptfast_pair():
    torch.manual_seed(0)
    model = GPTFast(vocab=64, max_len=CAP).eval()
    ref = GPTFast(vocab=64, max_len=CAP).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _gptfast_run(fn, ids, start=0):
    with torch.no_grad():
        out = [fn(ids[:, start:PROMPT], torch.arange(start, PROMPT))]
        out += [fn(ids[:, t:t + 1], torch.tensor([t])) for t in range(PROMPT, PROMPT + STEPS)]
    return torch.cat(out[1:], dim=1)


def test_gptfast_rewrite_inductor_compiles_once_and_matches():
    model, ref = _gptfast_pair()
    ids = _ids(vocab=64)
    counter = torch._dynamo.testing.CompileCounterWithBackend(kvcompile.backend("kivi", **EIGHT))
    got = _gptfast_run(torch.compile(model, backend=counter, fullgraph=True), ids)
    expect = _gptfast_run(ref, ids)
    assert counter.frame_count == 2  # prefill shape, decode shape; no recompile over 16 decode steps
    assert _rel(got, expect) < 0.01
    c = counters["kvcompile"]
    assert c["attention_sites"] == c["rewritten_sites"] == 4 and c["rewritten_writes"] == 8 and c["unmatched"] == 0
    rep = compile_report()
    for graph in rep.graphs:
        _ops_in(graph.code)
        assert "scaled_dot_product_attention" not in graph.code and "repeat_interleave" not in graph.code
    site = rep.graphs[-1].sites[0]
    assert site.status == "rewritten" and site.k_bits == 8 and "setitem_index" in site.matched
    assert 0 < site.packed_bytes < site.full_precision_bytes
    buf = model.layers[0].kv_cache.k_cache
    assert packed_storage(buf).length == PROMPT + STEPS  # the state persists outside the graph


def test_gptfast_two_bit_matches_the_eager_packed_graph():
    model, _ = _gptfast_pair()
    ids = _ids(vocab=64)
    got = _gptfast_run(torch.compile(model, backend=kvcompile.backend("kivi", **TWO), fullgraph=True), ids)
    torch._dynamo.reset()
    clear_storage()
    eager = _gptfast_run(torch.compile(model, backend=kvcompile.backend("kivi", compiler="eager", **TWO)), ids)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_gptfast_zero_graph_breaks_and_positions_are_checked():
    model, _ = _gptfast_pair()
    ids = _ids(vocab=64)
    explained = torch._dynamo.explain(model)(ids[:, :1], torch.tensor([0]))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, backend=kvcompile.backend("int8", compiler="eager"), fullgraph=True)
    first = _gptfast_run(compiled, ids)
    again = _gptfast_run(compiled, ids)  # a new sequence at position 0 restarts the packed cache
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="continue the sequence"):
        with torch.no_grad():
            compiled(ids[:, :1], torch.tensor([3]))  # holds 21 tokens; 3 is neither 21 nor 0


def test_release_buffers_frees_the_full_precision_cache():
    """release_buffers=True: once packed storage holds a buffer's tokens the buffer's memory is given back (it
    keeps its shape, views one NaN); decoding stays correct, a new sequence restarts at position 0; transformers'
    StaticCache ends with its layers' buffers freed too."""
    model, ref = _gptfast_pair()
    ids = _ids(vocab=64)
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        kvcompile.backend("kivi", compiler="aot_eager", release_buffers=True, **EIGHT))
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    got = _gptfast_run(compiled, ids)
    assert _rel(got, _gptfast_run(ref, ids)) < 0.01
    buf = model.layers[0].kv_cache.k_cache
    assert buf.shape == (1, 2, 32, 8) and buf.untyped_storage().nbytes() == 4 and torch.isnan(buf).all()
    assert packed_storage(buf).length == PROMPT + STEPS
    torch.testing.assert_close(_gptfast_run(compiled, ids), got, rtol=0, atol=0)  # a new sequence
    # prefill, decode, and (torch >= 2.13) the prefill again for the buffers' new strides; torch 2.11 reuses the
    # prefill graph there (measured on the H100 machine)
    assert counter.frame_count in (2, 3)

    torch._dynamo.reset()
    hf, cfg = _model("llama", "sdpa")
    kv = StaticCache(config=cfg, max_cache_len=CAP)
    backend = kvcompile.backend("kivi", compiler="aot_eager", release_buffers=True, **EIGHT)
    got = _decode(torch.compile(hf, backend=backend, fullgraph=True), _ids(), **{_cache_key(hf): kv}, use_cache=True)
    with torch.no_grad():
        full = hf(_ids()).logits[:, PROMPT:]
    assert _rel(got, full) < 0.01
    assert all(t.untyped_storage().nbytes() <= 4 for layer in kv.layers for t in (layer.keys, layer.values))


def test_gptfast_compiled_decode_takes_over_an_eager_prefill():
    """Prefill eagerly (full-precision buffers), then decode compiled: the packed cache is seeded from the buffers."""
    model, ref = _gptfast_pair()
    ids = _ids(vocab=64)
    compiled = torch.compile(model, backend=kvcompile.backend("kivi", compiler="eager", **EIGHT), fullgraph=True)
    with torch.no_grad():
        model(ids[:, :PROMPT], torch.arange(PROMPT))
        ref(ids[:, :PROMPT], torch.arange(PROMPT))
        got = torch.cat([compiled(ids[:, t:t + 1], torch.tensor([t])) for t in range(PROMPT, PROMPT + 4)], 1)
        expect = torch.cat([ref(ids[:, t:t + 1], torch.tensor([t])) for t in range(PROMPT, PROMPT + 4)], 1)
    assert _rel(got, expect) < 0.01


# ---------------------------------------------------------------- Meta's reference Llama: slice writes, prefix reads


def _llamaref_pair():
    torch.manual_seed(0)
    model = LlamaRef().eval()
    ref = LlamaRef().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _llamaref_run(fn, ids):
    with torch.no_grad():
        fn(ids[:, :PROMPT], 0)
        return torch.cat([fn(ids[:, t:t + 1], t) for t in range(PROMPT, PROMPT + STEPS)], 1)


def test_llamaref_slice_writes_are_rewritten_and_match():
    """Token-major buffers [B, S, H, D] written by slice at an int start, read as the prefix [:start + T], eager
    attention after a head repeat: rewritten (prefill and decode), 16 steps, one recompile (the int start
    becomes dynamic), and the same logits as the uncompiled model at 8 bits."""
    model, ref = _llamaref_pair()
    ids = _ids(vocab=64)
    counter = torch._dynamo.testing.CompileCounterWithBackend(kvcompile.backend("kivi", **EIGHT))
    got = _llamaref_run(torch.compile(model, backend=counter, fullgraph=True), ids)
    assert counter.frame_count == 2
    assert _rel(got, _llamaref_run(ref, ids)) < 0.01
    rep = compile_report()
    assert all(g.counts["rewritten"] == 2 for g in rep.graphs)
    for graph in rep.graphs:
        _ops_in(graph.code)
    assert rep.graphs[-1].sites[0].matched.startswith("K: setitem_slice")
    pk = packed_storage(model.layers[0].cache_k)
    assert pk.length == PROMPT + STEPS and pk.shape[1] == 2  # [B, H_kv, S, D] although the buffer is token-major


def test_llamaref_two_bit_matches_the_eager_packed_graph_and_positions_are_checked():
    model, _ = _llamaref_pair()
    ids = _ids(vocab=64)
    got = _llamaref_run(torch.compile(model, backend=kvcompile.backend("kivi", compiler="aot_eager", **TWO),
                                      fullgraph=True), ids)
    torch._dynamo.reset()
    clear_storage()
    compiled = torch.compile(model, backend=kvcompile.backend("kivi", compiler="eager", **TWO), fullgraph=True)
    eager = _llamaref_run(compiled, ids)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    again = _llamaref_run(compiled, ids)  # start_pos 0 again: a new sequence (the counts reset on the host)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    with pytest.raises(ValueError, match="continue the sequence"):
        with torch.no_grad():
            compiled(ids[:, :1], 3)


# ---------------------------------------------------------------- concatenated caches returned to the caller


def _nanogpt_run(fn, ids, steps=STEPS):
    """Prefill PROMPT tokens, then `steps` one-token steps threading the returned presents; decode logits."""
    with torch.no_grad():
        _, past = fn(ids[:, :PROMPT])
        outs = []
        for t in range(PROMPT, PROMPT + steps):
            logits, past = fn(ids[:, t:t + 1], past)
            outs.append(logits)
    return torch.cat(outs, 1), past


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_nanogpt_present_is_rewritten_compiles_once_and_matches(flash):
    """nanoGPT's `cat([past, k])` returned as the present: rewritten into the ops; the caller gets handles that
    stand for packed storage and passes them back. Prefill, the first decode step (a full-precision past,
    taken over) and the decode steps with handles (dynamic length) are three frames; 16 steps, no more."""
    torch.manual_seed(0)
    model = NanoGPT(flash=flash).eval()
    ids = _ids(vocab=64)
    counter = torch._dynamo.testing.CompileCounterWithBackend(kvcompile.backend("kivi", capacity=CAP, **EIGHT))
    got, past = _nanogpt_run(torch.compile(model, backend=counter, fullgraph=True), ids)
    with torch.no_grad():
        ref, _ = model(ids)
    assert counter.frame_count == 3
    assert _rel(got, ref[:, PROMPT:]) < 0.01
    c = counters["kvcompile"]
    assert c["rewritten_sites"] == 4 and c["full_precision_sites"] == 2  # the prefill has no past to append to
    rep = compile_report()
    for graph in rep.graphs[1:]:
        _ops_in(graph.code)
        assert "torch.cat" not in graph.code
    site = rep.graphs[-1].sites[0]
    assert site.status == "rewritten" and site.matched.startswith("K: cat")
    assert 0 < site.packed_bytes < site.full_precision_bytes
    k = past[0][0]
    assert k.shape == (1, 4, PROMPT + STEPS, 8) and k.stride() == (0, 0, 0, 0) and torch.isnan(k).all()
    pk = packed_storage(k)
    assert pk.length == PROMPT + STEPS and pk.capacity >= CAP  # the tokens live here, packed
    with torch.no_grad():
        full = model(ids[:, :PROMPT + STEPS])[1][0][0]
    assert _rel(pk.dequantize(), full) < 0.01


def test_nanogpt_two_bit_matches_the_eager_packed_graph():
    torch.manual_seed(0)
    model = NanoGPT(flash=True).eval()
    ids = _ids(vocab=64)
    got, _ = _nanogpt_run(torch.compile(model, backend=kvcompile.backend("kivi", capacity=CAP, **TWO),
                                        fullgraph=True), ids)
    torch._dynamo.reset()
    clear_storage()
    eager, _ = _nanogpt_run(torch.compile(model, backend=kvcompile.backend("kivi", compiler="eager", capacity=CAP,
                                                                           **TWO)), ids)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_nanogpt_handles_are_checked():
    """A stale handle, a handle changed outside the graph, and a sequence past the capacity: clear errors."""
    torch.manual_seed(0)
    model = NanoGPT(flash=True).eval()
    ids = _ids(vocab=64)
    cap = CAP - 1  # 31 tokens of 8-byte int8 codes: not whole 128-byte lines, the storage rounds up to 32
    compiled = torch.compile(model, backend=kvcompile.backend("int8", compiler="eager", capacity=cap), fullgraph=True)
    with torch.no_grad():
        _, p0 = compiled(ids[:, :PROMPT])
        _, p1 = compiled(ids[:, PROMPT:PROMPT + 1], p0)
        _, p2 = compiled(ids[:, PROMPT + 1:PROMPT + 2], p1)
        with pytest.raises(ValueError, match="pass back the cache the previous call returned"):
            compiled(ids[:, PROMPT + 1:PROMPT + 2], p1)  # p1 is one token behind its storage now
        beams = tuple((k.index_select(0, torch.tensor([0])), v) for k, v in p2)  # beam-search style reorder
        with pytest.raises(ValueError, match="holds NaN"):
            compiled(ids[:, PROMPT + 2:PROMPT + 3], beams)
        torch._dynamo.reset()
        detect_only = torch.compile(model, backend=kvcompile.backend("int8", compiler="eager", rewrite=False))
        with pytest.raises(ValueError, match="holds no values"):
            detect_only(ids[:, PROMPT + 2:PROMPT + 3], p2)  # a graph that did not rewrite the site gets a handle
        _, p0 = compiled(ids[:, :PROMPT])  # a new sequence: a new storage, seeded from the full-precision prefill
        _, past = compiled(ids[:, PROMPT:PROMPT + 1], p0)
        with pytest.raises(kvcompile.CacheCapacityError, match="capacity=N"):
            for t in range(cap):
                _, past = compiled(ids[:, :1], past)
        # the backend's capacity holds (31 tokens), in storage rounded up to whole 128-byte code lines (the TMA ring's
        # read)
        pk = packed_storage(past[0][0])
        assert pk.length == cap and pk.codes.shape[2] * pk.codes.shape[3] % 128 == 0 and pk.capacity > cap


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_dynamic_cache_rewrite(arch, impl):
    """transformers' DynamicCache (cat, stored back on the layer: a graph output) without kvcompile.apply: the
    decode graphs are rewritten and the layers end up holding handles to packed storage."""
    from transformers import DynamicCache

    model, cfg = _model(arch, impl)
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        kvcompile.backend("kivi", compiler="aot_eager", capacity=CAP, **EIGHT))
    key = _cache_key(model)
    kv = DynamicCache(config=cfg)
    got = _decode(torch.compile(model, backend=counter, fullgraph=True), _ids(), **{key: kv}, use_cache=True)
    ref = _decode(model, _ids(), **{key: DynamicCache(config=cfg)}, use_cache=True)
    assert counter.frame_count == 3
    assert _rel(got, ref) < 0.01
    decode = compile_report().graphs[-1]
    assert decode.counts["rewritten"] == 2 and decode.counts["unmatched"] == 0, decode.to_text()
    assert packed_storage(kv.layers[0].keys).length == kv.get_seq_length() == PROMPT + STEPS
    if arch == "llama" and impl == "sdpa":  # storage is measured through the handles, not as their logical size
        from kvcompile.eval.storage import cache_bits_per_element

        stores = [packed_storage(t) for layer in kv.layers for t in (layer.keys, layer.values)]
        elems = sum(layer.keys.numel() + layer.values.numel() for layer in kv.layers)
        bits, _ = cache_bits_per_element(kv)
        assert bits == pytest.approx(8 * sum(pk.storage_nbytes() for pk in stores) / elems) and bits != 32.0


def test_generate_with_a_compiled_forward_rewrites_its_dynamic_cache():
    """model.forward = torch.compile(model.forward, backend=...), then generate(): generate's own DynamicCache is
    rewritten from the first decode step on; at 8 bits greedy decoding gives the same tokens."""
    model, _ = _model("llama", "sdpa")
    ids = _ids()[:, :PROMPT + 3]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)  # no early EOS
        ref = model.generate(ids, **kw)
        model.forward = torch.compile(model.forward, fullgraph=True,
                                      backend=kvcompile.backend("int8", compiler="aot_eager", capacity=CAP))
        out = model.generate(ids, **kw)
    del model.forward
    assert out.shape[1] == ids.shape[1] + 12 and out.tolist() == ref.tolist()
    assert compile_report().graphs[-1].counts["rewritten"] == 2


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("gpt2", "eager")])
def test_dynamic_cache_two_bit_matches_the_eager_packed_graph(arch, impl):
    from transformers import DynamicCache

    model, cfg = _model(arch, impl)
    key = _cache_key(model)
    runs = {}
    for compiler in ("aot_eager", "eager"):
        torch._dynamo.reset()
        clear_storage()
        backend = kvcompile.backend("kivi", compiler=compiler, capacity=CAP, **TWO)
        runs[compiler] = _decode(torch.compile(model, backend=backend, fullgraph=True), _ids(),
                                 **{key: DynamicCache(config=cfg)}, use_cache=True)
    torch.testing.assert_close(runs["aot_eager"], runs["eager"], rtol=1e-4, atol=1e-4)
    full = _decode(model, _ids(), **{key: DynamicCache(config=cfg)}, use_cache=True)
    assert _rel(runs["eager"], full) > 1e-3  # 2 bits really is quantized


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_pre_rope_keys_on_the_rewrite_routes(cache):
    """skvq's pre_rope on model-owned caches: the pass feeds the rotary `inv_freq` buffer to the key storage,
    which un-rotates keys before quantizing and rotates them back on read (exact at 8 bits)."""
    from transformers import DynamicCache

    model, cfg = _model("llama", "sdpa")
    key = _cache_key(model)
    backend = kvcompile.backend("skvq", compiler="eager", capacity=CAP, k_bits=8, v_bits=8, group_size=4, window=2,
                                n_sink=1)
    kv = DynamicCache(config=cfg) if cache == "dynamic" else StaticCache(config=cfg, max_cache_len=CAP)
    got = _decode(torch.compile(model, backend=backend, fullgraph=True), _ids(), **{key: kv}, use_cache=True)
    fresh = DynamicCache(config=cfg) if cache == "dynamic" else StaticCache(config=cfg, max_cache_len=CAP)
    ref = _decode(model, _ids(), **{key: fresh}, use_cache=True)
    assert _rel(got, ref) < 0.01
    pk = packed_storage(kv.layers[0].keys)
    inv_freq = model.model.rotary_emb.inv_freq
    assert pk.rope is not None and torch.equal(pk.rope, inv_freq.float())
    assert packed_storage(kv.layers[0].values).rope is None
    assert pk.length == PROMPT + STEPS and pk.lengths()[1] > 0  # tokens did reach the quantized middle


# ---------------------------------------------------------------- transformers StaticCache: six architectures


def _static_run(model, cfg, backend, early=False):
    key = _cache_key(model)
    kv = StaticCache(config=cfg, max_cache_len=CAP)
    if early:  # allocate the buffers before the compiled prefill, so that the prefill is rewritten too
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        kv.early_initialization(1, heads, 8, torch.float32, torch.device("cpu"))
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    logits = _decode(compiled, _ids(), **{key: kv}, use_cache=True)
    return logits, counter


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_static_cache_rewrite(arch, impl):
    model, cfg = _model(arch, impl)
    with torch.no_grad():
        full = model(_ids()).logits[:, PROMPT:]
    got, counter = _static_run(model, cfg, kvcompile.backend("kivi", compiler="aot_eager", **EIGHT))
    # prefill (StaticCache allocates inside it: left in full precision, reported) + decode, no recompiles
    assert counter.frame_count == 2
    prefill, decode = compile_report().graphs
    assert prefill.counts["unmatched"] == 2 and decode.counts["rewritten"] == 2, decode.to_text()
    assert all("created in this graph" in " ".join(s.reasons) for s in prefill.sites)
    _ops_in(decode.code)
    assert counters["kvcompile"]["rewritten_sites"] == 2 and counters["kvcompile"][f"{impl}_sites"] == 4
    assert _rel(got, full) < 0.01, _rel(got, full)
    # 2 bits: the same as the eager packed cache (kvcompile.make_cache, the model's own attention): the buffers
    # are allocated ahead, so the compiled prefill writes the packed cache; it attends over its own new K/V in
    # full precision (the write starts at position 0), as the eager cache does by default, and with
    # full_precision_prefill=False over the packed cache, as that eager cache does
    for fp_prefill in (True, False):
        torch._dynamo.reset()
        clear_reports()
        be = kvcompile.backend("kivi", compiler="aot_eager", full_precision_prefill=fp_prefill, **TWO)
        got2, counter = _static_run(model, cfg, be, early=True)
        assert counter.frame_count == 2 and compile_report().count("rewritten") == 4
        eager_cache = kvcompile.make_cache(model, "kivi", full_precision_prefill=fp_prefill, **TWO)
        eager2 = _decode(model, _ids(), **{_cache_key(model): eager_cache}, use_cache=True)
        torch.testing.assert_close(got2, eager2, rtol=1e-4, atol=1e-4)
        assert _rel(got2, full) > _rel(got, full)  # 2 bits really is quantized


@pytest.mark.parametrize("scheme,overrides", [("kivi", EIGHT), ("pertoken", dict(k_bits=8, v_bits=8, window=4))])
def test_static_cache_of_a_capacity_off_the_scale_rows_padding(scheme, overrides):
    """A capacity that is not a multiple of 32 tokens: the per-token scale / zero rows are views of allocations padded
    to 32 (PackedKV), fed to the graph by the backend. The decode graph, recompiled by Dynamo with dynamic shapes,
    once gave those views' sizes symbols with no source, and Dynamo failed building its guards ("sources must not be
    empty for symbol"; examples/compile_backend.py with its defaults, since session 12)."""
    model, cfg = _model("llama", "sdpa")
    key = _cache_key(model)
    with torch.no_grad():
        full = model(_ids()).logits[:, PROMPT:]
    kv = StaticCache(config=cfg, max_cache_len=37)
    counter = torch._dynamo.testing.CompileCounterWithBackend(kvcompile.backend(scheme, compiler="aot_eager",
                                                                                **overrides))
    got = _decode(torch.compile(model, backend=counter, fullgraph=True), _ids(), **{key: kv}, use_cache=True)
    assert counter.frame_count == 2 and compile_report().count("rewritten") == 2
    assert _rel(got, full) < 0.01, _rel(got, full)


# ---------------------------------------------------------------- the cache-API route: apply(compile=True)


def test_apply_compile_route_inductor():
    model, _ = _model("llama", "sdpa")
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits[:, PROMPT:]
    eager2 = _decode(model, ids, **{_cache_key(model): kvcompile.make_cache(model, "kivi", **TWO)}, use_cache=True)

    # zero graph breaks for a decode step over the packed cache (fresh model set up the same way)
    probe, _ = _model("llama", "sdpa")
    kvcompile.apply(probe, "kivi", max_cache_len=CAP, packed_attention=True, **EIGHT)
    cache = kvcompile.make_cache(probe, "kivi", max_cache_len=CAP, packed_attention=True, **EIGHT)
    cache.early_initialization(1, 2, 8, torch.float32, "cpu")
    with torch.no_grad():
        probe(ids[:, :PROMPT], **{_cache_key(probe): cache})
        explained = torch._dynamo.explain(probe.forward)(ids[:, PROMPT:PROMPT + 1], **{_cache_key(probe): cache})
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    for kw, check in ((EIGHT, "full"), (TWO, "eager")):
        torch._dynamo.reset()
        clear_reports()
        m, _ = _model("llama", "sdpa")
        kvcompile.apply(m, "kivi", compile=True, max_cache_len=CAP, compile_options={"fullgraph": True}, **kw)
        with torch.no_grad():
            out = m(ids[:, :PROMPT], use_cache=True)
            cache = getattr(out, _cache_key(m), None) or out.past_key_values
            logits = torch.cat([m(ids[:, t:t + 1], use_cache=True, **{_cache_key(m): cache}).logits
                                for t in range(PROMPT, PROMPT + STEPS)], 1)
        rep = compile_report()
        assert len(rep.graphs) == 2  # prefill and decode, no recompile as the sequence grows
        # the decode graph's two layers attend over the packed cache; the prefill's over its own full-precision
        # K/V (full_precision_prefill, as the eager cache does: eager2 below), which the report lists as
        # attention without a cache behind it
        prefill, decode = rep.graphs
        assert decode.counts["unmatched"] == 0 and prefill.counts["unmatched"] == 2
        assert rep.count("packed") == 2 and rep.count("unmatched") == 2
        _ops_in(decode.code)
        assert "kvcompile.quantize_kv_write_" in prefill.code
        assert int(cache.layers[0].get_seq_length()) == PROMPT + STEPS
        assert kvcompile.report(m).layers[0].tokens == PROMPT + STEPS
        if check == "full":
            assert _rel(logits, full) < 0.01
        else:
            torch.testing.assert_close(logits, eager2, rtol=1e-4, atol=1e-4)
        kvcompile.remove(m)
        assert "forward" not in vars(m)


# ---------------------------------------------------------------- report and graph dumps


def test_debug_dumps_and_report_text(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    model, _ = _gptfast_pair()
    compiled = torch.compile(model, backend=kvcompile.backend("kivi", compiler="eager", **TWO), fullgraph=True)
    with torch.no_grad():
        compiled(_ids(vocab=64)[:, :PROMPT], torch.arange(PROMPT))
    stages = sorted(p.name.split("_", 2)[-1] for p in tmp_path.iterdir())
    assert stages == ["after.py", "before.py", "report.txt"], stages
    after = next(tmp_path.glob("*after.py")).read_text()
    _ops_in(after)
    text = compile_report().to_text()
    assert "2 rewritten" in text and "kivi K2/V2-bit" in text and "packed" in text
    assert next(tmp_path.glob("*report.txt")).read_text() == compile_report().graphs[0].to_text()
