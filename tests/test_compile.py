"""The "kvcompile" torch.compile backend: registration, the rewrite of index-written caches (gpt-fast, and
transformers' StaticCache in six architectures, sdpa and eager attention), the cache-API route
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
    from models.nanogpt import NanoGPT
except ImportError:
    from tests.models.gptfast import GPTFast
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


def test_backend_is_registered_by_name_and_made_by_a_factory():
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


# ---------------------------------------------------------------- nanoGPT: the returned "present" (not rewritten yet)


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_nanogpt_is_found_reported_and_stays_correct(flash):
    torch.manual_seed(0)
    model = NanoGPT(flash=flash).eval()
    ids = _ids(vocab=64)
    compiled = torch.compile(model, backend=kvcompile.backend("kivi", compiler="eager", **EIGHT), fullgraph=True)
    with torch.no_grad():
        ref, _ = model(ids[:, :PROMPT + 3])
        _, past = compiled(ids[:, :PROMPT])
        outs = []
        for t in range(PROMPT, PROMPT + 3):
            logits, past = compiled(ids[:, t:t + 1], past)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, PROMPT:], rtol=1e-4, atol=1e-4)
    decode = compile_report().graphs[-1]
    assert len(decode.sites) == 2 and decode.counts["unmatched"] == 2
    assert all(s.matched.startswith("K: cat") for s in decode.sites)
    assert all(any("returned 'present'" in r for r in s.reasons) for s in decode.sites), decode.to_text()


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
    # 2 bits: the same as the eager packed cache (kvcompile.make_cache, the model's own attention); the buffers
    # are allocated ahead, so the compiled prefill writes the packed cache and attends over it as eagerly
    torch._dynamo.reset()
    clear_reports()
    got2, counter = _static_run(model, cfg, kvcompile.backend("kivi", compiler="aot_eager", **TWO), early=True)
    assert counter.frame_count == 2 and compile_report().count("rewritten") == 4
    eager2 = _decode(model, _ids(), **{_cache_key(model): kvcompile.make_cache(model, "kivi", **TWO)},
                     use_cache=True)
    torch.testing.assert_close(got2, eager2, rtol=1e-4, atol=1e-4)
    assert _rel(got2, full) > _rel(got, full)  # 2 bits really is quantized


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
        assert rep.count("packed") == 4 and rep.count("unmatched") == 0
        for g in rep.graphs:
            _ops_in(g.code)
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
