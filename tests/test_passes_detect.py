"""Detection pass: attention sites and the KV-cache writes feeding them, found in the graphs Dynamo hands a
backend, for tiny random transformers models (sdpa and eager), StaticCache, and hand-written models.

Assertions read counters and report objects, never stdout.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from kvcompile.passes import detect, make_detect_backend
from kvcompile.passes.debug import ENV_VAR

try:  # tests/ has no __init__.py: pytest's default import mode puts tests/ itself on sys.path
    from models.gptfast import GPTFast
    from models.nanogpt import NanoGPT
except ImportError:  # run as a package (python -m pytest with a tests/__init__.py)
    from tests.models.gptfast import GPTFast
    from tests.models.nanogpt import NanoGPT

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, StaticCache  # noqa: E402

N_LAYERS = 2
VOCAB = 96
PROMPT = 5


def _configs():
    t = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=N_LAYERS, max_position_embeddings=64)
    gqa = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(**gqa, **common)),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(**gqa, head_dim=8, sliding_window=4, **common)),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**gqa, **common)),
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config(**gqa, pad_token_id=0, **common)),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                    num_key_value_heads=1, head_dim=8, **common)),
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB,
                                                 n_positions=64)),
        "opt": (t.OPTForCausalLM, t.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                              **common)),
        "gpt_neox": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                           **common)),
    }


CONFIGS = _configs()
GQA = {"llama": 2, "mistral": 2, "qwen2": 2, "phi3": 2, "gemma": 4, "gpt2": 1, "opt": 1, "gpt_neox": 1}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.pop("kvcompile", None)
    yield
    torch._dynamo.reset()


def _model(arch: str, impl: str):
    cls, cfg = CONFIGS[arch]
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return cls(cfg).eval(), cfg


def _cache_key(model) -> str:
    """transformers 5.24 takes `cache=` (`past_key_values=` is deprecated); older versions only the latter."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _compile_once(fn, *args, **kwargs):
    """Compile ``fn`` with the detection backend, run it once, return (result, the one report)."""
    seen = []
    compiled = torch.compile(fn, backend=make_detect_backend(on_report=seen.append), fullgraph=True)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    assert len(seen) == 1, f"expected one graph, got {len(seen)}"
    return out, seen[0]


def _decode_report(arch, impl, cache="dynamic", mask=False):
    model, cfg = _model(arch, impl)
    key = _cache_key(model)
    ids = torch.randint(0, VOCAB, (1, PROMPT + 1), generator=torch.Generator().manual_seed(1))
    kv = DynamicCache(config=cfg) if cache == "dynamic" else StaticCache(config=cfg, max_cache_len=16)
    with torch.no_grad():
        model(ids[:, :PROMPT], **{key: kv}, use_cache=True)  # eager prefill fills the cache
    extra = {"attention_mask": torch.ones(1, PROMPT + 1, dtype=torch.long)} if mask else {}
    _, report = _compile_once(model, ids[:, PROMPT:], **{key: kv}, use_cache=True, **extra)
    return report


def _assert_all_matched(report, family: str, gqa: int | None = None):
    assert len(report.sites) == N_LAYERS, report.to_text()
    for site in report.sites:
        assert site.matched, report.to_text()
        assert site.k_write.family == site.v_write.family == family, report.to_text()
        assert site.k_write.storage != site.v_write.storage
        assert site.k_write.storage_input_index is not None
        assert site.reasons == ()
        if gqa is not None:
            assert site.gqa_ratio == gqa, report.to_text()
    c = counters["kvcompile"]
    assert c["attention_sites"] == N_LAYERS and c["unmatched"] == 0
    assert c[f"cache_writes_{family}"] == 2 * N_LAYERS


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_transformers_decode_dynamic_cache(arch, impl):
    report = _decode_report(arch, impl)
    _assert_all_matched(report, "cat", GQA[arch])
    c = counters["kvcompile"]
    assert c[f"{impl}_sites"] == N_LAYERS and c["graphs"] == 1
    layers = {s.k_write.storage_source for s in report.sites}
    # the cache argument is `cache` (transformers >= 5.24) or `past_key_values` (5.17)
    assert all(src and ("cache" in src or "past_key_values" in src) and "keys" in src for src in layers), layers
    for site in report.sites:
        assert site.k_write.dim == 2 and site.k_write.position is None
        assert site.effective_scale == pytest.approx(1 / math.sqrt(8))
        if impl == "eager":
            assert site.mask is not None and site.mask_kinds == ("additive",)
    if arch == "opt":  # OPT scales q before attention and passes scale 1.0 to it
        assert all(s.scale == 1.0 for s in report.sites)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_transformers_decode_with_mask_uses_repeat_kv(arch, impl):
    """With an attention mask, transformers' sdpa path expands K/V by repeat_kv instead of enable_gqa."""
    report = _decode_report(arch, impl, mask=True)
    _assert_all_matched(report, "cat", GQA[arch])
    for site in report.sites:
        assert site.repeat_kv == "expand_reshape" and not site.enable_gqa
        assert site.mask is not None


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_transformers_decode_static_cache(impl):
    report = _decode_report("llama", impl, cache="static")
    _assert_all_matched(report, "index", 2)
    for site in report.sites:
        assert site.k_write.kind == "index_copy" and site.k_write.in_place
        assert site.k_write.position is not None and site.k_write.dim == 2
        assert site.repeat_kv == "expand_reshape"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_steps_recompile_count(cache):
    """Several decode steps through one compiled model: DynamicCache grows, so Dynamo compiles a second,
    dynamic-shape graph (detection must work on symbolic sizes, without adding guards); StaticCache keeps
    one graph for all steps."""
    model, cfg = _model("llama", "sdpa")
    key = _cache_key(model)
    kv = DynamicCache(config=cfg) if cache == "dynamic" else StaticCache(config=cfg, max_cache_len=16)
    ids = torch.randint(0, VOCAB, (1, PROMPT + 4), generator=torch.Generator().manual_seed(1))
    seen = []
    compiled = torch.compile(model, backend=make_detect_backend(on_report=seen.append), fullgraph=True)
    with torch.no_grad():
        model(ids[:, :PROMPT], **{key: kv}, use_cache=True)
        for t in range(PROMPT, PROMPT + 4):
            compiled(ids[:, t : t + 1], **{key: kv}, use_cache=True)
    assert len(seen) == (2 if cache == "dynamic" else 1)
    for report in seen:
        assert len(report.matched_sites) == N_LAYERS, report.to_text()
        assert all(s.gqa_ratio == 2 for s in report.sites)


def test_static_cache_compiled_prefill_allocates_in_graph():
    """A compiled prefill with a fresh StaticCache allocates the buffers inside the graph (lazy init)."""
    model, cfg = _model("llama", "sdpa")
    ids = torch.randint(0, VOCAB, (1, PROMPT))
    kv = StaticCache(config=cfg, max_cache_len=16)
    _, report = _compile_once(model, ids, **{_cache_key(model): kv}, use_cache=True)
    assert len(report.sites) == N_LAYERS and not report.matched_sites
    assert all("created in this graph" in " ".join(s.reasons) for s in report.sites), report.to_text()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_transformers_prefill_reports_no_cache_write(arch):
    model, _ = _model(arch, "sdpa" if arch not in ("gpt_neox",) else "eager")
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    _, report = _compile_once(model, ids, use_cache=False)
    assert len(report.sites) == N_LAYERS, report.to_text()
    for site in report.sites:
        assert not site.matched and site.k_write is None and site.v_write is None
        assert any(r.startswith("k: no cache write") for r in site.reasons), site.reasons
        assert any(r.startswith("v: no cache write") for r in site.reasons), site.reasons
    c = counters["kvcompile"]
    assert c["attention_sites"] == c["unmatched"] == N_LAYERS
    assert c["cache_writes_cat"] == c["cache_writes_index"] == 0
    if arch == "gpt_neox":  # partial rotary: cat([k_rot, k_pass], dim=-1) must not pass for a cache append
        assert all("not the token dim" in " ".join(s.reasons) for s in report.sites)


# ---------------------------------------------------------------- hand-written models


def test_gptfast_decode_index_writes():
    model = GPTFast().eval()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, PROMPT)), torch.arange(PROMPT))
    _, report = _compile_once(model, torch.randint(0, 64, (1, 1)), torch.tensor([PROMPT]))
    _assert_all_matched(report, "index", 2)
    for site in report.sites:
        assert site.kind == "sdpa" and site.repeat_kv == "repeat_interleave" and site.mask is not None
        assert site.k_write.kind == "setitem_index" and site.k_write.position == "l_input_pos_"
        assert site.k_write.storage_source.endswith("._buffers['k_cache']")
        assert site.v_write.storage_source.endswith("._buffers['v_cache']")


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_nanogpt_decode_cat_and_prefill(flash):
    model = NanoGPT(flash=flash).eval()
    ids = torch.randint(0, 64, (1, PROMPT + 1))
    (_, past), prefill = _compile_once(model, ids[:, :PROMPT])
    assert len(prefill.sites) == N_LAYERS and not prefill.matched_sites
    assert all(s.is_causal == flash for s in prefill.sites)
    torch._dynamo.reset()
    counters.pop("kvcompile", None)
    _, report = _compile_once(model, ids[:, PROMPT:], past)
    _assert_all_matched(report, "cat", 1)
    for i, site in enumerate(report.sites):
        assert site.kind == ("sdpa" if flash else "eager")
        assert site.k_write.storage_source == f"L['past'][{i}][0]"
        assert site.effective_scale == pytest.approx(1 / math.sqrt(8))
        if not flash:
            assert site.mask_kinds == ("masked_fill",)


# ---------------------------------------------------------------- spellings, on small functions


def test_legacy_gpt2_eager_where_and_divide():
    """GPT-2's former eager attention: divide by a tensor, torch.where with a causal buffer slice, softmax,
    cast, dropout; KV in a [B, S, H, D] cache concatenated along dim 1 and transposed for attention."""
    bias = torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16)

    def attn(q, k_new, v_new, past_k, past_v):
        k = torch.cat((past_k, k_new), dim=1).transpose(1, 2)
        v = torch.cat((past_v, v_new), dim=1).transpose(1, 2)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
        L, T = k.size(-2), q.size(-2)
        w = torch.where(bias[:, :, L - T : L, :L], w, torch.finfo(w.dtype).min)
        w = torch.nn.functional.softmax(w, dim=-1).type(v.dtype)
        w = F.dropout(w, p=0.1, training=False)
        return torch.matmul(w, v)

    q = torch.randn(1, 2, 1, 8)
    new = torch.randn(1, 1, 2, 8)
    past = torch.randn(1, 4, 2, 8)
    _, report = _compile_once(attn, q, new, new.clone(), past, past.clone())
    (site,) = report.sites
    assert site.kind == "eager" and site.matched, report.to_text()
    assert site.mask_kinds == ("where",) and site.scale is None and site.scale_terms[0][0] == "div"
    assert site.k_write.kind == "cat" and site.k_write.dim == 1


def test_buffer_write_spellings():
    """Slice assignment, narrow().copy_(), functional index_copy, index_put_ into a token-major [S, H, D]
    buffer; a buffer read but never written; a softmax that feeds no matmul (a router) is no site."""

    def step(q, k_new, v_new, kb, vb, kb2, vb2, pos, router):
        kb[:, :, 5:6] = k_new
        vb.narrow(2, 5, 1).copy_(v_new)
        a = F.scaled_dot_product_attention(q, kb[:, :, :6], vb[:, :, :6])
        k2 = kb2.index_copy(2, pos, k_new)
        vb2.index_put_((pos,), v_new[0].transpose(0, 1))
        b = F.scaled_dot_product_attention(q, k2, vb2.transpose(0, 1).unsqueeze(0), is_causal=False)
        c = F.scaled_dot_product_attention(q, kb2, kb2)
        top = torch.softmax(router, dim=-1).topk(1)
        return a + b + c, top

    buf = lambda: torch.zeros(1, 2, 8, 4)  # noqa: E731
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    args = (q, k, v, buf(), buf(), buf(), torch.zeros(8, 2, 4), torch.tensor([5]), torch.randn(3, 4))
    _, report = _compile_once(step, *args)
    assert len(report.sites) == 3, report.to_text()
    first, second, third = report.sites
    assert first.matched and (first.k_write.kind, first.v_write.kind) == ("setitem_slice", "slice_copy")
    assert first.k_write.position == 5 and first.k_write.dim == 2
    assert second.matched and second.k_write.kind == "index_copy" and not second.k_write.in_place
    assert second.v_write.kind == "index_put" and second.v_write.dim == 0 and second.v_write.position == "l_pos_"
    assert not third.matched and "nothing in this graph writes" in " ".join(third.reasons)
    c = counters["kvcompile"]
    assert (c["cache_writes_slice"], c["cache_writes_index"], c["unmatched"]) == (2, 2, 1)


def test_detect_without_dynamo_meta_propagates_fake_tensors():
    def attn(q, past_k, past_v, k, v):
        k = torch.cat([past_k, k], dim=-2)
        v = torch.cat([past_v, v], dim=-2)
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))

    gm = torch.fx.symbolic_trace(attn)
    args = (torch.randn(1, 4, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
            torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    (site,) = detect(gm, args).sites
    assert site.matched and site.gqa_ratio == 2 and site.k_write.storage.name == "past_k"
    assert counters["kvcompile"]["repeat_kv"] == 1


def test_debug_graph_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))

    def attn(q, past_k, past_v, k, v):
        return F.scaled_dot_product_attention(q, torch.cat([past_k, k], -2), torch.cat([past_v, v], -2))

    x = torch.randn(1, 2, 1, 8)
    _, report = _compile_once(attn, x, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), x, x)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.split("_", 2)[-1] for n in names] == ["after.py", "before.py", "report.txt"], names
    assert "scaled_dot_product_attention" in next(tmp_path.glob("*before.py")).read_text()
    assert next(tmp_path.glob("*report.txt")).read_text() == report.to_text()
