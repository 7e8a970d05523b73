"""The kvcompile custom ops: opcheck, agreement with the references, and compiling without recompiles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile import ops
from kvcompile.cache import PackedKV
from kvcompile.schemes import TensorQuant

QUANTS = [
    TensorQuant("affine", 2, 8, "token"),
    TensorQuant("affine", 2, 8, "token", permute=True),
    TensorQuant("affine", 1.5, 16, "token"),
    TensorQuant("affine", 2, 4, "channel"),
    TensorQuant("nf", 4, 8, "token"),
    TensorQuant("int8", 8),
    TensorQuant("fp8", 8),
]


def _filled(q, length, *, b=2, h=2, d=16, n_sink=2, window=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pk = PackedKV.empty(b, h, d, q, capacity=64, n_sink=n_sink, window=window, dtype=dtype)
    pk.append(torch.randn(b, h, length, d, generator=g).to(dtype))
    return pk


def _write_args(pk, new):
    q = pk.quant
    return (new, pk.codes, pk.scale, pk.zero, pk.sink, pk.window, pk.perm, pk.counts, pk.rope, q.kind, float(q.bits),
            q.group_size or 0, q.axis, q.clip_ratio, pk.n_sink, pk.window_size)


def _attn_args(q, k, v, mask=None, is_causal=False, scale=0.25):
    kq, vq = k.quant, v.quant
    return (q, k.codes, k.scale, k.zero, k.sink, k.window, k.perm, k.counts, k.rope,
            v.codes, v.scale, v.zero, v.sink, v.window, v.perm, v.counts, v.rope,
            kq.kind, float(kq.bits), kq.group_size or 0, kq.axis, vq.kind, float(vq.bits), vq.group_size or 0,
            vq.axis, k.n_sink, k.window_size, scale, mask, is_causal)


@pytest.mark.parametrize("qi", range(len(QUANTS)))
def test_opcheck_quantize_kv_write(qi):
    pk = _filled(QUANTS[qi], 20)
    torch.library.opcheck(torch.ops.kvcompile.quantize_kv_write_.default, _write_args(pk, torch.randn(2, 2, 3, 16)))


@pytest.mark.parametrize("qi", range(len(QUANTS)))
def test_opcheck_dequant_attention(qi):
    k, v = _filled(QUANTS[qi], 30, seed=1), _filled(QUANTS[qi], 30, seed=2)
    q = torch.randn(2, 3, 4, 16).transpose(1, 2)  # non-contiguous, [B=2, Hq=4, Nq=3, D=16]; GQA 2
    torch.library.opcheck(torch.ops.kvcompile.dequant_attention.default, _attn_args(q, k, v, is_causal=True))
    mask = torch.zeros(2, 1, 3, 30)
    mask[0, :, :, :5] = float("-inf")
    torch.library.opcheck(torch.ops.kvcompile.dequant_attention.default, _attn_args(q, k, v, mask=mask))


@settings(deadline=None, max_examples=20, derandomize=True)
@given(qi=st.integers(0, len(QUANTS) - 1), first=st.integers(0, 30), t=st.integers(1, 8))
def test_write_op_equals_append(qi, first, t):
    a, b = _filled(QUANTS[qi], first, seed=3), _filled(QUANTS[qi], first, seed=3)
    new = torch.randn(2, 2, t, 16)
    a.append(new)
    ops.write(b, new)
    assert a.lengths() == b.lengths()
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=0)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(qi=st.integers(0, len(QUANTS) - 1), length=st.integers(1, 40), nq=st.integers(1, 4),
       r=st.sampled_from([1, 2, 3]), causal=st.booleans())
def test_attention_op_equals_dense_attention_on_dequantized_kv(qi, length, nq, r, causal):
    nq = min(nq, length)
    k, v = _filled(QUANTS[qi], length, seed=4), _filled(QUANTS[qi], length, seed=5)
    q = torch.randn(2, 2 * r, nq, 16)
    out = ops.attention(q, k, v, scale=0.3, is_causal=causal)
    kd, vd = k.dequantize(), v.dequantize()
    kr, vr = kd.repeat_interleave(r, dim=1), vd.repeat_interleave(r, dim=1)
    mask = None
    if causal and nq > 1:
        mask = torch.ones(nq, length, dtype=torch.bool).tril(length - nq)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_decode_steps_compile_once_with_no_graph_break():
    import torch._dynamo.testing

    torch._dynamo.reset()
    q_ = TensorQuant("affine", 2, 8, "token")
    k = PackedKV.empty(1, 2, 16, q_, capacity=64, n_sink=2, window=4, dtype=torch.float32)
    v = PackedKV.empty(1, 2, 16, q_, capacity=64, n_sink=2, window=4, dtype=torch.float32)
    k.append(torch.randn(1, 2, 10, 16))
    v.append(torch.randn(1, 2, 10, 16))
    kr, vr = k.clone(), v.clone()

    def step(q, new_k, new_v, k_parts, v_parts):
        torch.ops.kvcompile.quantize_kv_write_(new_k, *k_parts[:8], "affine", 2.0, 8, "token", 1.0, 2, 4)
        torch.ops.kvcompile.quantize_kv_write_(new_v, *v_parts[:8], "affine", 2.0, 8, "token", 1.0, 2, 4)
        return torch.ops.kvcompile.dequant_attention(
            q, *k_parts, *v_parts, "affine", 2.0, 8, "token", "affine", 2.0, 8, "token", 2, 4, 0.25, None, False)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    parts = lambda p: (p.codes, p.scale, p.zero, p.sink, p.window, p.perm, p.counts, p.rope)  # noqa: E731
    for _ in range(12):
        q = torch.randn(1, 2, 1, 16)
        nk, nv = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
        out = compiled(q, nk, nv, parts(k), parts(v))
        kr.append(nk)
        vr.append(nv)
        ref = ops.attention(q, kr, vr, scale=0.25)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    k._host = None
    assert k.lengths() == kr.lengths()
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("nq,r,rope", [(1, 4, False), (3, 3, False), (1, 1, False), (1, 4, True), (1, 1, True)])
def test_cuda_fused_path_matches_reference(dtype, permute, nq, r, rope, monkeypatch):
    """The fused path against float32 attention over the dequantized cache (PackedKV.dequantize: with rope, keys
    quantized before RoPE and rotated back there, the spec the kernel's per-element rotation must meet)."""
    monkeypatch.setenv("KVCOMPILE_FUSED", "always")
    torch.manual_seed(0)
    q_ = TensorQuant("affine", 2, 32, "token", permute=permute)
    v_ = TensorQuant("affine", 4, 64, "token", permute=permute)
    b, hkv, d, length = 2, 2, 64, 3000
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)) if rope else None
    k = PackedKV.empty(b, hkv, d, q_, capacity=4096, n_sink=4, window=128, dtype=dtype, device="cuda",
                       rope_inv_freq=inv)
    v = PackedKV.empty(b, hkv, d, v_, capacity=4096, n_sink=4, window=128, dtype=dtype, device="cuda")
    k.append(torch.randn(b, hkv, length, d, device="cuda", dtype=dtype))
    v.append(torch.randn(b, hkv, length, d, device="cuda", dtype=dtype))
    q = torch.randn(b, hkv * r, nq, d, device="cuda", dtype=dtype)
    fused = ops._fused_cuda(q, k, v, 0.125, None, True)
    assert fused is not None, ops._fused_unsupported(q, k, v, None, True)
    ref = ops.attention_reference(q, k.dequantize(torch.float32), v.dequantize(torch.float32), 0.125, None, True)
    rel = ((fused.float() - ref).norm() / ref.norm()).item()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 5e-3), rel
    # the op itself (whichever path it takes) and the dequantize + SDPA path agree too
    torch.testing.assert_close(ops.attention(q, k, v, scale=0.125, is_causal=True).float(), ref, rtol=0.05, atol=0.02)
    torch.testing.assert_close(ops._dequant_sdpa(q, k, v, 0.125, None, True).float(), ref, rtol=0.05, atol=0.02)
    # eagerly ops.attention skips the dispatcher: the same result as the op itself
    torch.testing.assert_close(ops.attention(q, k, v, scale=0.125, is_causal=True),
                               ops._attention_op(q, k, v, 0.125, None, True), rtol=0, atol=0)
