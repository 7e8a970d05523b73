"""kvcompile.apply / make_cache / report on tiny random-init transformers models, and the scheme registry."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import kvcompile
from kvcompile.schemes import Scheme, get_scheme, scheme_names


def _llama(**kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def _cache_kw(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill_then_decode(model, ids, cache, prefill):
    """Logits of the decode tokens, teacher-forced one by one through the cache."""
    kw = _cache_kw(model)
    with torch.inference_mode():
        out = model(ids[:, :prefill], use_cache=True, **{kw: cache})
        cache = getattr(out, kw, None) or out.past_key_values
        logits = []
        for i in range(prefill, ids.shape[1]):
            out = model(ids[:, i : i + 1], use_cache=True, **{kw: cache})
            cache = getattr(out, kw, None) or out.past_key_values
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(llama, ids):
    with torch.inference_mode():
        return llama(ids).logits[:, 64:]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "scheme,overrides,bound",
    [
        ("int8", {}, 0.01),
        ("kivi", {"k_bits": 8, "v_bits": 8, "residual": 16}, 0.01),
        ("skvq", {"k_bits": 8, "v_bits": 8, "window": 8}, 0.01),
        ("fp8", {}, 0.05),
        ("nqkv", {"window": 8, "block_size": 32}, 0.1),
        ("kivi", {"residual": 16}, 0.35),
        ("skvq", {"v_bits": 2, "window": 8}, 0.35),
        ("skvq", {"window": 8}, 0.5),
        ("pertoken", {"window": 8}, 0.2),
    ],
)
def test_packed_cache_logits_close_to_full_precision(llama, ids, reference, scheme, overrides, bound):
    cache = kvcompile.make_cache(llama, scheme, **overrides)
    logits = _prefill_then_decode(llama, ids, cache, 64)
    assert _rel(logits, reference) < bound
    # the middle really is packed: tokens past sink + window were quantized
    layer = cache.layers[0]
    assert layer.k.lengths()[1] > 0 and layer.get_seq_length() == ids.shape[1]


def test_two_bit_error_is_bounded_and_larger_than_eight_bit(llama, ids, reference):
    errs = {}
    for bits in (8, 2):
        cache = kvcompile.make_cache(llama, "kivi", k_bits=bits, v_bits=bits, residual=16)
        errs[bits] = _rel(_prefill_then_decode(llama, ids, cache, 64), reference)
    assert errs[8] < errs[2] < 0.35


def test_apply_makes_forward_and_generate_use_the_packed_cache(ids):
    model = _llama()
    kvcompile.apply(model, "kivi", residual=16)
    with torch.inference_mode():
        out = model(ids[:, :40], use_cache=True)
    cache = getattr(out, _cache_kw(model), None) or out.past_key_values
    assert isinstance(cache, kvcompile.KVCompileCache)
    gen = model.generate(ids[:1, :50], attention_mask=torch.ones(1, 50, dtype=torch.long), max_new_tokens=12,
                         do_sample=False)
    assert gen.shape == (1, 62)
    rep = kvcompile.report(model)
    assert rep.scheme == "kivi" and len(rep.layers) == 2
    assert rep.layers[0].tokens == 61  # the last generated token is never fed back
    assert "kivi" in rep.to_text()
    # same greedy tokens as a cache made by hand with the same scheme
    kvcompile.remove(model)
    gen2 = model.generate(ids[:1, :50], attention_mask=torch.ones(1, 50, dtype=torch.long), max_new_tokens=12,
                          do_sample=False, **{_cache_kw(model): kvcompile.make_cache(model, "kivi", residual=16)})
    assert torch.equal(gen, gen2)


def test_report_bytes_are_the_caches_measured_bytes(ids):
    model = _llama()
    cache = kvcompile.make_cache(model, "skvq", window=8)
    _prefill_then_decode(model, ids[:, :40], cache, 32)
    rep = kvcompile.report(cache)
    assert rep.packed_bytes == cache.storage_nbytes()
    assert rep.full_precision_bytes == 2 * 2 * 2 * 40 * 32 * 4 * 2  # layers * (K,V) * B * L * D * fp32 * heads
    assert rep.ratio > 1


def test_apply_twice_is_a_clear_error_and_remove_undoes_it():
    model = _llama()
    kvcompile.apply(model, "int8")
    with pytest.raises(RuntimeError, match="already applied"):
        kvcompile.apply(model, "kivi")
    kvcompile.remove(model)
    with torch.inference_mode():
        out = model(torch.randint(0, 256, (1, 8)), use_cache=True)
    cache = getattr(out, _cache_kw(model), None) or out.past_key_values
    assert not isinstance(cache, kvcompile.KVCompileCache)
    with pytest.raises(RuntimeError, match="not applied"):
        kvcompile.remove(model)


def test_bad_input_errors_name_the_fix():
    model = _llama()
    with pytest.raises(ValueError, match="valid schemes: .*kivi.*skvq"):
        kvcompile.apply(model, "skvqq")
    with pytest.raises(ValueError, match="does not divide the head dim 32"):
        kvcompile.apply(model, "skvq", group_size=24)
    with pytest.raises(TypeError, match="valid options"):
        kvcompile.apply(model, "kivi", kbits=4)
    with pytest.raises(NotImplementedError, match="calibration"):
        kvcompile.apply(model, "kvmix")
    with pytest.raises(TypeError, match="transformers model"):
        kvcompile.apply(torch.nn.Linear(2, 2), "kivi")


def test_gqa_model_of_another_family():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 60))
    with torch.inference_mode():
        ref = model(ids).logits[:, 40:]
    logits = _prefill_then_decode(model, ids, kvcompile.make_cache(model, "int8"), 40)
    assert _rel(logits, ref) < 0.01


@pytest.mark.parametrize("name", [n for n in scheme_names() if n != "kvmix"])
def test_every_scheme_round_trips_through_json(name):
    cfg = get_scheme(name)
    again = Scheme.from_json(cfg.to_json())
    assert again == cfg and json.loads(cfg.to_json())["scheme"] == name
    assert Scheme.from_json(get_scheme(name, n_sink=2).to_json()).n_sink == 2


def test_scheme_objects_and_overrides():
    assert kvcompile.apply is not None
    assert get_scheme(kvcompile.KIVI(k_bits=4)).k_bits == 4
    assert get_scheme("kivi", k_bits=4) == kvcompile.KIVI(k_bits=4)
    assert get_scheme(kvcompile.SKVQ(), v_bits=2).layer_spec(0, 1).v.bits == 2


def test_pertoken_preset_is_the_readme_k4v2_recipe():
    # the README's quality and speed rows for K4V2 were measured through these skvq overrides
    recipe = get_scheme("skvq", k_bits=4, v_bits=2, group_size=None, reorder=False, pre_rope=False, k_clip_ratio=1.0)
    assert get_scheme("pertoken").layer_spec(0, 30) == recipe.layer_spec(0, 30)
    assert get_scheme("pertoken", v_bits=4, n_sink=0).layer_spec(3, 30) == recipe.replace(
        v_bits=4, n_sink=0).layer_spec(3, 30)
    with pytest.raises(TypeError, match="valid options: .*group_size"):
        get_scheme("pertoken", reorder=True)


@pytest.mark.parametrize("scheme,overrides", [("skvq", {"window": 8}), ("kivi", {"residual": 16}), ("int8", {})])
def test_packed_attention_route_matches_the_dequantize_route(ids, scheme, overrides):
    model = _llama()
    base = _prefill_then_decode(model, ids, kvcompile.make_cache(model, scheme, **overrides), 64)
    kvcompile.apply(model, scheme, packed_attention=True, **overrides)
    assert model.config._attn_implementation == "kvcompile"
    packed = _prefill_then_decode(model, ids, None, 64)
    torch.testing.assert_close(packed, base, rtol=1e-4, atol=1e-4)
    # chunked decode (several new tokens at once, with a mask) and batched generate go through it too
    gen = model.generate(ids[:, :40], attention_mask=torch.ones(2, 40, dtype=torch.long), max_new_tokens=6,
                         do_sample=False)
    assert gen.shape == (2, 46)
    kvcompile.remove(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("packed_attention", [False, True])
def test_left_padded_batch_generates_like_each_prompt_alone(packed_attention):
    model = _llama()
    kvcompile.apply(model, "int8", packed_attention=packed_attention)
    g = torch.Generator().manual_seed(7)
    long_ids, short_ids = torch.randint(1, 256, (1, 30), generator=g), torch.randint(1, 256, (1, 22), generator=g)
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 8, dtype=torch.long), short_ids], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    both = model.generate(batch, attention_mask=mask, **gen)
    alone = model.generate(short_ids, attention_mask=torch.ones_like(short_ids), **gen)
    assert torch.equal(both[1, 30:], alone[0, 22:])


@pytest.mark.parametrize("packed_attention", [False, True])
def test_prefill_attends_in_full_precision_and_later_calls_over_the_packed_cache(ids, packed_attention):
    """The call that starts the cache (the prefill) sees its own K/V unquantized, so its logits are the
    full-precision model's exactly, even at 2 bits; the storage still holds them packed, and the next calls
    attend over it. full_precision_prefill=False quantizes what the prefill attends to as well."""
    model = _llama()
    kw = _cache_kw(model)
    with torch.inference_mode():
        want = model(ids[:, :64]).logits
        want_next = model(ids[:, :72]).logits[:, 64:]
    if packed_attention:
        kvcompile.apply(model, "kivi", packed_attention=True, residual=16)
    got = {}
    for fp_prefill in (True, False):
        cache = kvcompile.make_cache(model, "kivi", packed_attention=packed_attention,
                                     full_precision_prefill=fp_prefill, residual=16)
        with torch.inference_mode():
            first = model(ids[:, :64], use_cache=True, **{kw: cache}).logits
            nxt = model(ids[:, 64:72], use_cache=True, **{kw: cache}).logits
        assert cache.layers[0].k.lengths()[1] > 0 and cache.get_seq_length() == 72  # packed all along
        got[fp_prefill] = first, nxt
    torch.testing.assert_close(got[True][0], want, rtol=0, atol=0)
    assert _rel(got[False][0], want) > 1e-3  # attended over 2-bit K/V
    # the second call attends over the packed cache: not the full-precision logits
    assert 1e-3 < _rel(got[True][1], want_next) < 0.35
    # a reset cache starts a new sequence: its first call is a prefill again
    cache = kvcompile.make_cache(model, "kivi", packed_attention=packed_attention, residual=16)
    with torch.inference_mode():
        model(ids[:, 8:40], use_cache=True, **{kw: cache})
        cache.reset()
        again = model(ids[:, :64], use_cache=True, **{kw: cache}).logits
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_apply_passes_full_precision_prefill_to_its_caches(ids):
    model = _llama()
    kvcompile.apply(model, "kivi", residual=16, full_precision_prefill=False)
    with torch.inference_mode():
        out = model(ids[:, :40], use_cache=True)
    cache = getattr(out, _cache_kw(model), None) or out.past_key_values
    assert not cache.layers[0].full_precision_prefill
