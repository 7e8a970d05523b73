"""PackedKV and the transformers cache layer: quantize-on-write, window sliding, sinks, capacity, bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile import quant
from kvcompile.cache import CacheCapacityError, KVCompileCache, PackedKV
from kvcompile.cache.hf import PackedLayer
from kvcompile.schemes import LayerSpec, TensorQuant, get_scheme

SETTINGS = settings(deadline=None, max_examples=25, derandomize=True)

QUANTS = [
    TensorQuant("affine", 2, 8, "token"),
    TensorQuant("affine", 1.5, 8, "token", clip_ratio=0.9),
    TensorQuant("affine", 4, 4, "channel"),
    TensorQuant("affine", 3, None, "token"),
    TensorQuant("nf", 4, 8, "token"),
    TensorQuant("int8", 8),
    TensorQuant("fp8", 8),
]


def _expected_middle(q: TensorQuant, x: torch.Tensor) -> torch.Tensor:
    """The reference: quantize the middle tokens in one go with the quant functions."""
    d = x.shape[-1]
    g = q.group_for(d)
    if q.kind == "affine":
        gs = q.group_size if q.axis == "channel" else g
        c, s, z = quant.quantize_affine(x, q.bits, gs, axis=q.axis, clip_ratio=q.clip_ratio)
        return quant.dequantize_affine(c, s, z, gs, axis=q.axis)
    if q.kind == "nf":
        c, s = quant.quantize_nf(x, int(q.bits), g)
        return quant.dequantize_nf(c, s, int(q.bits), g)
    if q.kind == "int8":
        return quant.dequantize_int8(*quant.quantize_int8(x))
    return quant.dequantize_fp8(*quant.quantize_fp8(x))


def _chunks(total: int, cuts: list[int]) -> list[int]:
    pts = sorted({c % (total + 1) for c in cuts} | {0, total})
    return [b - a for a, b in zip(pts, pts[1:]) if b > a]


@SETTINGS
@given(
    qi=st.integers(0, len(QUANTS) - 1),
    length=st.integers(1, 70),
    n_sink=st.sampled_from([0, 1, 4]),
    window=st.sampled_from([0, 3, 8]),
    cuts=st.lists(st.integers(0, 70), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_append_matches_reference_for_any_chunking(qi, length, n_sink, window, cuts, seed):
    q = QUANTS[qi]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, length, 16, generator=g)
    pk = PackedKV.empty(2, 3, 16, q, capacity=80, n_sink=n_sink, window=window, dtype=torch.float32)
    for t in _chunks(length, cuts):
        done = pk.length
        pk.append(x[:, :, done : done + t])
    n_s, n_q, n_w = pk.lengths()
    assert n_s == min(length, n_sink)
    assert n_s + n_q + n_w == length
    assert n_q % q.flush == 0
    if length > n_sink:
        assert window <= n_w + (0 if n_q else window) and n_w <= window + q.flush - 1
    assert pk.counts.tolist() == [n_s, n_q, n_w]
    out = pk.dequantize()
    assert out.shape == (2, 3, length, 16)
    torch.testing.assert_close(out[:, :, :n_s], x[:, :, :n_s], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, length - n_w :], x[:, :, length - n_w :], rtol=0, atol=0)
    if n_q:
        mid = x[:, :, n_s : n_s + n_q]
        torch.testing.assert_close(out[:, :, n_s : n_s + n_q], _expected_middle(q, mid), rtol=0, atol=0)
    if q.flush == 1 and n_w:
        # per-token layouts quantize on entry: the codes rows past n_quant hold the window's tokens (docs/format.md)
        ahead = pk.clone()
        ahead._set_counts(n_s, n_q + n_w, 0)
        torch.testing.assert_close(ahead.dequantize_middle()[:, :, n_q:], _expected_middle(q, x[:, :, n_s + n_q :]),
                                   rtol=0, atol=0)


@SETTINGS
@given(qi=st.integers(0, len(QUANTS) - 1), first=st.integers(0, 40), t=st.integers(1, 9), seed=st.integers(0, 999))
def test_a_write_leaves_other_slots_bit_identical(qi, first, t, seed):
    q = QUANTS[qi]
    g = torch.Generator().manual_seed(seed)
    pk = PackedKV.empty(1, 2, 16, q, capacity=64, n_sink=2, window=4, dtype=torch.float32)
    pk.append(torch.randn(1, 2, first, 16, generator=g))
    _, n_q0, n_w0 = pk.lengths()
    before = {n: getattr(pk, n).clone() for n in ("codes", "scale", "zero", "sink", "window")
              if getattr(pk, n) is not None}
    pk.append(torch.randn(1, 2, t, 16, generator=g))
    _, n_q1, n_w1 = pk.lengths()
    per_meta = q.flush if q.axis == "channel" else 1
    # per-token layouts quantize on entry: the codes in use are the middle and the window's tokens
    ahead0, ahead1 = (n_w0, n_w1) if q.flush == 1 else (0, 0)
    for name, old in before.items():
        new = getattr(pk, name)
        if name == "sink":
            n_old = min(first, 2)
            assert torch.equal(new[:, :, :n_old], old[:, :, :n_old])
            continue
        if name == "window":  # a ring: the rows of the tokens that stay are not moved
            stay = range(max(n_q1 - n_q0, 0), n_w0)
            rows = [(n_q0 + j) % new.shape[2] for j in stay]
            assert torch.equal(new[:, :, rows], old[:, :, rows])
            continue
        lo, hi = n_q0 + ahead0, n_q1 + ahead1
        if name != "codes":
            lo, hi = lo // per_meta, hi // per_meta
        assert torch.equal(new[:, :, :lo], old[:, :, :lo]), name
        assert torch.equal(new[:, :, hi:], old[:, :, hi:]), name


def test_sinks_and_window_slide():
    q = TensorQuant("affine", 2, 8, "token")
    pk = PackedKV.empty(1, 1, 8, q, capacity=100, n_sink=4, window=5, dtype=torch.float32)
    x = torch.randn(1, 1, 30, 8)
    for i in range(30):
        pk.append(x[:, :, i : i + 1])
        n = i + 1
        assert pk.lengths() == (min(n, 4), max(0, n - 4 - 5), min(max(n - 4, 0), 5))
    assert torch.equal(pk.dequantize()[:, :, -5:], x[:, :, -5:])
    assert torch.equal(pk.dequantize()[:, :, :4], x[:, :, :4])


def test_kivi_keys_flush_a_token_group_at_a_time():
    q = TensorQuant("affine", 2, 4, "channel")
    pk = PackedKV.empty(1, 1, 8, q, capacity=64, window=6, dtype=torch.float32)
    seen = []
    for i in range(20):
        pk.append(torch.randn(1, 1, 1, 8))
        seen.append(pk.lengths()[1])
    assert all(n % 4 == 0 for n in seen)
    assert seen[9] == 4 and seen[8] == 0  # 10 tokens: 6 window + one group of 4 once 10 are there


def test_capacity_exceeded_says_what_to_do():
    pk = PackedKV.empty(1, 1, 8, TensorQuant("int8", 8), capacity=10, dtype=torch.float32)
    pk.append(torch.randn(1, 1, 10, 8))
    with pytest.raises(CacheCapacityError, match="max_cache_len"):
        pk.append(torch.randn(1, 1, 1, 8))


def test_resized_keeps_contents():
    q = TensorQuant("affine", 4, 8, "token")
    pk = PackedKV.empty(2, 2, 16, q, capacity=20, n_sink=2, window=3, dtype=torch.float32)
    pk.append(torch.randn(2, 2, 20, 16))
    big = pk.resized(100)
    assert big.capacity >= 100 and big.lengths() == pk.lengths()
    torch.testing.assert_close(big.dequantize(), pk.dequantize(), rtol=0, atol=0)
    big.append(torch.randn(2, 2, 50, 16))
    assert big.length == 70


def test_storage_bytes_are_measured_from_tensors():
    q = TensorQuant("affine", 2, 16, "token")
    pk = PackedKV.empty(1, 4, 64, q, capacity=1024, n_sink=4, window=128, dtype=torch.float16)
    expect = sum(t.untyped_storage().nbytes() for t in (pk.codes, pk.scale, pk.zero, pk.sink, pk.window, pk.counts))
    assert pk.storage_nbytes() == expect
    # the per-token scales and zeros: rows padded to a multiple of 32 tokens (1020 -> 1024), counted
    assert pk.scale.untyped_storage().nbytes() == 4 * 1024 * (64 // 16) * 2 and pk.scale.shape[2] == 1020
    assert pk.codes.shape[-1] == 16  # 64 channels at 2 bits
    # at full capacity, the 2-bit middle + fp16 window and sinks stay well under fp16's 16 bits (the window's tokens
    # also hold their codes: quantized on entry, 1020 rows of codes beside the 4 sink tokens)
    assert pk.codes.shape[2] == 1024 - 4
    pk.append(torch.randn(1, 4, 1024, 64, dtype=torch.float16))
    bits = 8 * pk.storage_nbytes() / (4 * 64 * 1024)
    assert 3.0 < bits < 6.5


def test_ops_without_a_rule_raise_naming_the_op():
    pk = PackedKV.empty(1, 1, 8, TensorQuant("int8", 8), capacity=4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="aten.add"):
        pk + 1
    with pytest.raises(NotImplementedError, match="dequantize"):
        torch.matmul(torch.randn(1, 1, 2, 8), pk.transpose(-1, -2))


def test_clone_detach_and_to_keep_the_data():
    pk = PackedKV.empty(1, 2, 8, TensorQuant("affine", 4, 8, "token"), capacity=16, window=2, dtype=torch.float32)
    pk.append(torch.randn(1, 2, 9, 8))
    for other in (pk.clone(), pk.detach(), pk.to("cpu")):
        assert isinstance(other, PackedKV)
        torch.testing.assert_close(other.dequantize(), pk.dequantize(), rtol=0, atol=0)
    c = pk.clone()
    c.append(torch.randn(1, 2, 1, 8))
    assert pk.length == 9 and c.length == 10


def test_select_batch_reorders_every_part():
    q = TensorQuant("affine", 2, 4, "channel")
    pk = PackedKV.empty(3, 2, 8, q, capacity=64, n_sink=2, window=4, dtype=torch.float32)
    pk.append(torch.randn(3, 2, 30, 8))
    idx = torch.tensor([2, 0, 0])
    torch.testing.assert_close(pk.select_batch(idx).dequantize(), pk.dequantize()[idx], rtol=0, atol=0)


def test_layer_grows_on_demand_and_fixed_layer_raises():
    spec = get_scheme("kivi").layer_spec(0, 1)
    grow = PackedLayer(spec)
    fixed = PackedLayer(spec, max_cache_len=200)
    for layer in (grow, fixed):
        k = torch.randn(1, 2, 150, 32)
        layer.update(k, k)
        assert layer.get_seq_length() == 150
    grow.update(torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32))
    assert grow.get_seq_length() == 450
    with pytest.raises(CacheCapacityError):
        fixed.update(torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32))


def test_cache_bits_per_element_counts_everything():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    cache = KVCompileCache(cfg, "int8")
    for i in range(2):
        cache.update(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), i)
    # int8 codes + one fp16 scale per token of 16 channels = 9 bits, plus the 24-byte counters
    assert cache.bits_per_element() == pytest.approx(9.0, abs=0.1)
    assert cache.storage_nbytes() < cache.full_precision_nbytes()


def test_layer_spec_validation_errors():
    with pytest.raises(ValueError, match="divide the head dim"):
        TensorQuant("affine", 2, 48, "token").group_for(64)
    with pytest.raises(ValueError, match="supported"):
        TensorQuant("affine", 5, 32)
    with pytest.raises(ValueError, match="n_sink"):
        LayerSpec(TensorQuant(), TensorQuant(), n_sink=-1)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_permuted_and_pre_rope_storage_round_trips(pre_rope):
    """Sink and window come back exact; the middle is the reference quantization in the stored channel order
    (and before RoPE); every stored part is in the permuted order, as the fused kernel assumes."""
    from kvcompile.cache.packed import rotate

    torch.manual_seed(0)
    q = TensorQuant("affine", 2, 8, "token", permute=True)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)) if pre_rope else None
    x = torch.randn(1, 2, 60, 16) * torch.exp(torch.randn(16))
    pk = PackedKV.empty(1, 2, 16, q, capacity=64, n_sink=3, window=5, dtype=torch.float32, rope_inv_freq=inv)
    pk.append(x[:, :, :2])
    pk.append(x[:, :, 2:41])
    pk.append(x[:, :, 41:])
    n_s, n_q, n_w = pk.lengths()
    assert (n_s, n_q, n_w) == (3, 52, 5)
    assert not torch.equal(pk.perm, torch.arange(16).repeat(2, 1))
    out = pk.dequantize()
    torch.testing.assert_close(out[:, :, :3], x[:, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, -5:], x[:, :, -5:], rtol=0, atol=0)
    assert torch.equal(pk.sink, quant.apply_perm(x[:, :, :3], pk.perm))
    assert torch.equal(pk.window_tokens(), quant.apply_perm(x[:, :, -5:], pk.perm))
    mid = x[:, :, 3:55]
    if pre_rope:
        mid = rotate(mid, torch.arange(3, 55), inv, inverse=True)
    c, s, z = quant.quantize_affine(quant.apply_perm(mid, pk.perm), 2, 8)
    expect = quant.unapply_perm(quant.dequantize_affine(c, s, z, 8), pk.perm)
    if pre_rope:
        expect = rotate(expect, torch.arange(3, 55), inv)
    torch.testing.assert_close(out[:, :, 3:55], expect, rtol=1e-5, atol=1e-5)


def test_codes_on_entry_after_a_late_calibration():
    """A channel order calibrated by the first token leaving the window (one-token appends): until then the window's
    tokens have no codes; that append writes the codes of the whole window with the new token, so every non-sink
    token's codes (middle and window) are the reference quantization in the calibrated order, as later appends keep
    them (docs/format.md, quantize on entry)."""
    torch.manual_seed(1)
    q = TensorQuant("affine", 2, 8, "token", permute=True)
    x = torch.randn(1, 2, 20, 16) * torch.exp(torch.randn(16))
    pk = PackedKV.empty(1, 2, 16, q, capacity=32, n_sink=2, window=5, dtype=torch.float32)
    for i in range(20):
        pk.append(x[:, :, i : i + 1])
        if i == 6:  # 2 sink + 5 window: nothing quantized, no codes written yet
            assert pk.lengths() == (2, 0, 5) and not pk.codes.any()
    n_s, n_q, n_w = pk.lengths()
    assert (n_s, n_q, n_w) == (2, 13, 5)
    c, s, z = quant.quantize_affine(quant.apply_perm(x[:, :, 2:], pk.perm), 2, 8)
    assert torch.equal(pk.codes[:, :, : n_q + n_w], quant.pack_codes(c, 2))
    assert torch.equal(pk.scale[:, :, : n_q + n_w], s) and torch.equal(pk.zero[:, :, : n_q + n_w], z)
    assert torch.equal(pk.window_tokens(), quant.apply_perm(x[:, :, -5:], pk.perm))


def test_line_capacity_rounds_per_token_middles_to_whole_code_lines():
    from kvcompile.cache.packed import line_capacity

    k2 = TensorQuant("affine", 2, 128, "token")
    assert line_capacity(1003, 4, (k2, 128), (k2, 128)) == 1004  # middle 999 -> 1000 tokens of 32 bytes
    assert line_capacity(1004, 4, (k2, 128)) == 1004
    assert line_capacity(1001, 0, (TensorQuant("affine", 4, 128, "token"), 128)) == 1002  # 64 bytes a token
    assert line_capacity(1001, 0, (TensorQuant("affine", 2, 64, "token"), 64)) == 1008  # 16 bytes a token
    assert line_capacity(1001, 0, (TensorQuant("int8", 8), 128)) == 1001  # whole lines already
    kivi_k = TensorQuant("affine", 2, 32, "channel")
    assert line_capacity(1001, 0, (kivi_k, 128)) == 1001  # per-channel keys: left as they are
    assert line_capacity(1001, 0, (kivi_k, 128), (TensorQuant("affine", 2, 32, "token"), 128)) == 1004
    assert line_capacity(3, 4, (k2, 128)) == 3  # no middle


def test_fixed_layer_stores_whole_code_lines_and_holds_max_cache_len():
    """A layer of max_cache_len 1003 (2-bit per-token K and V, 4 sink tokens) allocates its middle rounded up to whole
    128-byte code lines, which the decode kernel's TMA ring reads (on CPU only the device is missing), and still
    raises past 1003 tokens."""
    from kvcompile.kernels import gluon_decode as gd

    q = TensorQuant("affine", 2, 128, "token")
    layer = PackedLayer(LayerSpec(q, q, n_sink=4, window=8), max_cache_len=1003)
    x = torch.randn(1, 2, 1000, 128)
    layer.update(x, x)
    layer.update(x[:, :, :3], x[:, :, :3])
    assert layer.get_seq_length() == 1003 and layer.k.codes.shape[2] == 1000
    if gd.HAVE_TMA:
        k, v = layer.k, layer.v
        why = gd.tma_unsupported_reason(k.codes, k.scale, k.zero, v.codes, v.scale, v.zero)
        assert "sm_90" in why, why
    with pytest.raises(CacheCapacityError, match="max_cache_len=1003"):
        layer.update(x[:, :, :1], x[:, :, :1])
