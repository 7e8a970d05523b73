"""On a CUDA device: a tiny fp16 Llama generates through the packed cache with the fused attention kernel,
and its logits match the dequantize route. Skipped without CUDA (CI is CPU-only; run on the GPU machine)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch._dynamo.utils import counters

import kvcompile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()


def _decode_logits(model, ids, cache, prefill):
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.inference_mode():
        o = model(ids[:, :prefill], use_cache=True, **{kw: cache})
        cache = getattr(o, kw, None) or o.past_key_values
        for i in range(prefill, ids.shape[1]):
            o = model(ids[:, i : i + 1], use_cache=True, **{kw: cache})
            cache = getattr(o, kw, None) or o.past_key_values
            out.append(o.logits.float())
    return torch.cat(out, 1)


@pytest.mark.parametrize("scheme,overrides", [
    ("skvq", {"v_bits": 2, "group_size": 32, "pre_rope": False}),
    ("skvq", {"v_bits": 2}),  # keys quantized before RoPE (rotated per element in the kernel), groups of 16, order
    ("skvq", {}),  # the defaults: keys before RoPE and ternary values (dequantized per element in the kernel)
    ("skvq", {"v_bits": 2, "group_size": 32, "reorder": False, "k_bits": 4, "pre_rope": False}),
    ("kivi", {}),  # per-channel keys (the kernel's K_CHANNEL variant) and values flushed ahead of keys
    ("int8", {}),  # 8-bit codes, one absmax scale per token, no zero point (K_FMT / V_FMT)
    ("fp8", {}),
    ("nqkv", {}),  # NF4 codebook codes, one block per head (head dim 64)
    ("nqkv", {"block_size": 32}),  # blocks of 32 channels: group fill
])
def test_fused_route_matches_dequantize_route(scheme, overrides, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_FUSED", "always")  # the default too (the op takes the kernel where supported)
    model = _model()
    ids = torch.randint(0, 512, (4, 6100), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    base = _decode_logits(model, ids, kvcompile.make_cache(model, scheme, **overrides), 6096)
    kvcompile.apply(model, scheme, **overrides)  # on CUDA: packed attention by default
    assert model.config._attn_implementation == "kvcompile"
    before = counters["kvcompile"]["fused_attention_calls"]
    fused = _decode_logits(model, ids, None, 6096)
    ran = counters["kvcompile"]["fused_attention_calls"] - before
    assert ran > 0
    rel = ((fused - base).norm() / base.norm()).item()
    assert rel < 1e-2, rel
    gen = model.generate(ids[:1, :300], attention_mask=torch.ones(1, 300, dtype=torch.long, device="cuda"),
                         max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 308)


def test_skvq_defaults_write_kernel_matches_reference(monkeypatch):
    """skvq's defaults (keys quantized before RoPE in a channel order, ternary values): the decode steps' writes
    run the kernel (K and V in one launch, keys un-rotated in it); the logits match a run whose writes all take
    the PyTorch reference."""
    from kvcompile import ops

    model = _model()
    ids = torch.randint(0, 512, (2, 700), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    before = counters["kvcompile"]["fused_write_mixed_pair_launches"]
    fused = _decode_logits(model, ids, kvcompile.make_cache(model, "skvq"), 600)
    assert counters["kvcompile"]["fused_write_mixed_pair_launches"] - before >= 90
    monkeypatch.setattr(ops, "_write_pair_fused", lambda *a: "forced reference (test)")
    monkeypatch.setattr(ops, "_write_fused", lambda *a: "forced reference (test)")
    ref = _decode_logits(model, ids, kvcompile.make_cache(model, "skvq"), 600)
    rel = ((fused - ref).norm() / ref.norm()).item()
    assert rel < 1e-3, rel
