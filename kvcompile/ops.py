"""The two custom ops through which a graph touches packed KV (``torch.library``, namespace ``kvcompile``).

- ``kvcompile::quantize_kv_write_``: append new K or V tokens to packed storage, in place (quantize-on-write).
- ``kvcompile::dequant_attention``: attention of new queries over packed K and V (sink + quantized middle +
  window), causal among the new tokens, GQA without repeat_kv, optional additive or boolean mask.

Both take the packed storage as its plain inner tensors (what ``PackedKV.__tensor_flatten__`` gives), plus the
static quantization config as scalars, so a compiled graph sees ordinary tensors; the number of valid tokens
is the ``counts`` tensor, never a Python int, so decode steps do not recompile. Each op has a fake (meta)
implementation, a CPU implementation on the PyTorch references, and a CUDA implementation that uses the fused
Triton kernel where it supports the layout and is expected to win (``fused_decode_is_profitable``: called
eagerly, its launch overhead loses to SDPA below very long contexts), and dequantize + SDPA otherwise.
``KVCOMPILE_FUSED=always|never`` overrides that choice (``auto`` by default).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from .cache.packed import PackedKV
from .schemes.base import TensorQuant

log = logging.getLogger("kvcompile")

_FALLBACK_LOGGED: set[str] = set()


def _quant(kind: str, bits: float, group_size: int, axis: str, clip_ratio: float, permuted: bool) -> TensorQuant:
    return TensorQuant(kind, bits if bits != int(bits) else int(bits), group_size or None, axis, clip_ratio, permuted)


def _packed(codes, scale, zero, sink, window, perm, counts, rope, kind, bits, group_size, axis, clip_ratio, n_sink,
            window_size) -> PackedKV:
    q = _quant(kind, bits, group_size, axis, clip_ratio, perm is not None)
    return PackedKV(codes, scale, zero, sink, window, perm, counts, rope, q, sink.shape[-1], n_sink, window_size,
                    sink.dtype)


# ---------------------------------------------------------------------------------------------- write

@torch.library.custom_op(
    "kvcompile::quantize_kv_write_",
    mutates_args=("codes", "scale", "zero", "sink", "window", "perm", "counts"),
)
def quantize_kv_write_(
    new: Tensor, codes: Tensor, scale: Tensor, zero: Optional[Tensor], sink: Tensor, window: Tensor,
    perm: Optional[Tensor], counts: Tensor, rope: Optional[Tensor], kind: str, bits: float, group_size: int,
    axis: str, clip_ratio: float, n_sink: int, window_size: int,
) -> None:
    """Append ``new`` [B, H, T, D] to the packed storage; tokens leaving the window are quantized."""
    pk = _packed(codes, scale, zero, sink, window, perm, counts, rope, kind, bits, group_size, axis, clip_ratio, n_sink,
                 window_size)
    pk.append(new)


@quantize_kv_write_.register_fake
def _(new, codes, scale, zero, sink, window, perm, counts, rope, kind, bits, group_size, axis, clip_ratio, n_sink,
      window_size):
    return None


def write(pk: PackedKV, new: Tensor) -> None:
    """``quantize_kv_write_`` on a PackedKV's storage."""
    q = pk.quant
    torch.ops.kvcompile.quantize_kv_write_(
        new, pk.codes, pk.scale, pk.zero, pk.sink, pk.window, pk.perm, pk.counts, pk.rope, q.kind, float(q.bits),
        q.group_size or 0, q.axis, q.clip_ratio, pk.n_sink, pk.window_size,
    )
    pk._host = None  # the op wrote counts


# ---------------------------------------------------------------------------------------------- attention

def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor],
                        is_causal: bool) -> Tensor:
    """float32 attention of q [B, Hq, Nq, D] over plain k, v [B, Hkv, L, D]; the Nq queries are the last Nq
    positions (causal among themselves when ``is_causal``); ``mask`` is additive (float) or boolean (True keeps),
    broadcastable to [B, Hq, Nq, >= L] (columns past L are ignored)."""
    b, hq, nq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    r = hq // hkv
    qf = q.float().reshape(b, hkv, r * nq, d)
    s = (qf @ k.float().transpose(-1, -2)).reshape(b, hq, nq, length) * scale
    if mask is not None:
        m = mask[..., :length]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    if is_causal and nq > 1:
        pos = torch.arange(length - nq, length, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(length, device=q.device)[None, :] > pos, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p)  # fully masked rows give zeros, as SDPA's memory-efficient path does
    out = (p.reshape(b, hkv, r * nq, length) @ v.float()).reshape(b, hq, nq, v.shape[-1])
    return out


@torch.library.custom_op("kvcompile::dequant_attention", mutates_args=())
def dequant_attention(
    q: Tensor,
    k_codes: Tensor, k_scale: Tensor, k_zero: Optional[Tensor], k_sink: Tensor, k_window: Tensor,
    k_perm: Optional[Tensor], k_counts: Tensor, k_rope: Optional[Tensor],
    v_codes: Tensor, v_scale: Tensor, v_zero: Optional[Tensor], v_sink: Tensor, v_window: Tensor,
    v_perm: Optional[Tensor], v_counts: Tensor, v_rope: Optional[Tensor],
    k_kind: str, k_bits: float, k_group_size: int, k_axis: str,
    v_kind: str, v_bits: float, v_group_size: int, v_axis: str,
    n_sink: int, window_size: int, scale: float, mask: Optional[Tensor], is_causal: bool,
) -> Tensor:
    """Attention of q [B, Hq, Nq, D] over packed K/V; returns [B, Hq, Nq, D] contiguous, in q's dtype."""
    kp = _packed(k_codes, k_scale, k_zero, k_sink, k_window, k_perm, k_counts, k_rope, k_kind, k_bits, k_group_size,
                 k_axis, 1.0, n_sink, window_size)
    vp = _packed(v_codes, v_scale, v_zero, v_sink, v_window, v_perm, v_counts, v_rope, v_kind, v_bits, v_group_size,
                 v_axis, 1.0, n_sink, window_size)
    if q.is_cuda:
        out = _fused_cuda(q, kp, vp, scale, mask, is_causal)
        return out if out is not None else _dequant_sdpa(q, kp, vp, scale, mask, is_causal)
    return attention_reference(q, kp.dequantize(torch.float32), vp.dequantize(torch.float32), scale, mask,
                               is_causal).to(q.dtype).contiguous()


@dequant_attention.register_fake
def _(q, k_codes, k_scale, k_zero, k_sink, k_window, k_perm, k_counts, k_rope, v_codes, v_scale, v_zero, v_sink,
      v_window, v_perm, v_counts, v_rope, k_kind, k_bits, k_group_size, k_axis, v_kind, v_bits, v_group_size, v_axis, n_sink,
      window_size, scale, mask, is_causal):
    return q.new_empty(q.shape)  # contiguous, as the real implementations return


def attention(q: Tensor, k: PackedKV, v: PackedKV, *, scale: float | None = None, mask: Tensor | None = None,
              is_causal: bool = False) -> Tensor:
    """``dequant_attention`` on two PackedKVs."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    kq, vq = k.quant, v.quant
    return torch.ops.kvcompile.dequant_attention(
        q, k.codes, k.scale, k.zero, k.sink, k.window, k.perm, k.counts, k.rope,
        v.codes, v.scale, v.zero, v.sink, v.window, v.perm, v.counts, v.rope,
        kq.kind, float(kq.bits), kq.group_size or 0, kq.axis,
        vq.kind, float(vq.bits), vq.group_size or 0, vq.axis,
        k.n_sink, k.window_size, float(scale), mask, bool(is_causal),
    )


def _fused_unsupported(q: Tensor, kp: PackedKV, vp: PackedKV, mask: Optional[Tensor], is_causal: bool) -> str | None:
    """Why the fused kernel cannot run this call (None: it can)."""
    from .kernels import decode_attention as k

    for p in (kp, vp):
        if p.rope is not None:
            return "K/V quantized before RoPE (the kernel does not re-apply RoPE yet)"
        qt = p.quant
        if qt.kind != "affine" or qt.axis != "token":
            return f"{qt.kind} quantization with {qt.axis}-axis groups"
        if qt.bits not in k.SUPPORTED_BITS:
            return f"{qt.bits}-bit codes"
        g = qt.group_for(p.head_dim)
        if not (g == p.head_dim or g in k.SUPPORTED_GROUP_SIZES):
            return f"group size {g}"
    if q.shape[-1] not in k.SUPPORTED_HEAD_DIMS or vp.head_dim != q.shape[-1]:
        return f"head dim {q.shape[-1]}"
    if q.dtype not in k.SUPPORTED_DTYPES or kp.kv_dtype != q.dtype:
        return f"{q.dtype} queries over {kp.kv_dtype} K/V"
    if (q.shape[1] // kp.shape[1]) * q.shape[2] > k._MAX_ROWS:
        return "more than 64 query rows per KV head (GQA ratio x new tokens)"
    if mask is not None:
        return "an explicit attention mask"
    if q.shape[2] > 1 and not is_causal:
        return "several new tokens without causal masking"
    return None


def _fused_cuda(q: Tensor, kp: PackedKV, vp: PackedKV, scale: float, mask: Optional[Tensor],
                is_causal: bool) -> Tensor | None:
    """The Triton path, or None where it does not apply or would not win (the caller then dequantizes)."""
    reason = _fused_unsupported(q, kp, vp, mask, is_causal)
    if reason is not None:
        if reason not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(reason)
            log.warning("kvcompile: the fused attention kernel does not support %s yet; dequantizing + SDPA "
                        "instead (correct, slower)", reason)
        return None
    from .kernels.decode_attention import decode_attention, fused_decode_is_profitable

    n_s, n_q, n_w = kp.lengths()
    b, hq, nq, d = q.shape
    policy = os.environ.get("KVCOMPILE_FUSED", "auto")  # auto | always | never
    if policy == "never":
        return None
    if policy != "always" and not fused_decode_is_profitable(batch=b, kv_heads=kp.shape[1], head_dim=d, seq_len=n_s + n_q + n_w,
                                      k_bits=int(kp.quant.bits), v_bits=int(vp.quant.bits)):
        return None  # short context: dequantize + SDPA is as fast
    r = hq // kp.shape[1]
    qq = q
    if kp.perm is not None:  # fold the key channel order into q: q . k == q[perm] . k[perm]
        idx = kp.perm.repeat_interleave(r, dim=0)[None, :, None, :].expand(b, hq, nq, d)
        qq = torch.gather(q, -1, idx)
    out, _ = decode_attention(
        q=qq, k_sink=kp.sink[:, :, :n_s], k_codes=kp.codes, k_scale=kp.scale, k_zero=kp.zero,
        k_window=kp.window, v_sink=vp.sink[:, :, :n_s], v_codes=vp.codes, v_scale=vp.scale, v_zero=vp.zero,
        v_window=vp.window, n_quant=n_q, n_window=n_w, k_bits=int(kp.quant.bits), v_bits=int(vp.quant.bits),
        k_group_size=kp.quant.group_for(d), v_group_size=vp.quant.group_for(vp.head_dim), sm_scale=scale,
    )
    if vp.perm is not None:  # values were stored in their permuted order: put the output channels back
        inv = torch.argsort(vp.perm, dim=-1).repeat_interleave(r, dim=0)[None, :, None, :].expand_as(out)
        out = torch.gather(out, -1, inv)
    if not torch.compiler.is_compiling():
        counters["kvcompile"]["fused_attention_calls"] += 1
    return out.contiguous()


def _dequant_sdpa(q: Tensor, kp: PackedKV, vp: PackedKV, scale: float, mask: Optional[Tensor],
                  is_causal: bool) -> Tensor:
    """Dequantize the valid tokens to q's dtype, then SDPA (GQA without repeat): the non-fused CUDA path."""
    k, v = kp.dequantize(q.dtype), vp.dequantize(q.dtype)
    length, nq = k.shape[2], q.shape[2]
    attn_mask = None
    if mask is not None:
        attn_mask = mask[..., :length]
        attn_mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
    if is_causal and nq > 1:
        causal = torch.ones(nq, length, dtype=torch.bool, device=q.device).tril(length - nq)
        if attn_mask is None:
            attn_mask = causal
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    ).contiguous()
