"""The two custom ops through which a graph touches packed KV (``torch.library``, namespace ``kvcompile``).

- ``kvcompile::quantize_kv_write_``: append new K or V tokens to packed storage, in place (quantize-on-write).
- ``kvcompile::dequant_attention``: attention of new queries over packed K and V (sink + quantized middle +
  window), causal among the new tokens, GQA without repeat_kv, optional additive or boolean mask.

Both take the packed storage as its plain inner tensors (what ``PackedKV.__tensor_flatten__`` gives), plus the
static quantization config as scalars, so a compiled graph sees ordinary tensors; the number of valid tokens
is the ``counts`` tensor, never a Python int, so decode steps do not recompile. Each op has a fake (meta)
implementation, a CPU implementation on the PyTorch references, and a CUDA implementation that uses the fused
Triton kernel wherever it supports the layout, and dequantize + SDPA otherwise. The fused kernel is the faster
route at every length measured, eagerly too (``benchmarks/bench_eager.py``, H100: about 60 us per eager call from
256 to 32k tokens with the launchers' cached plans, kvcompile/kernels/launch.py, against 490 us to 12 ms for
dequantize + SDPA, whose host work and sync alone exceed the kernel launch's).
``KVCOMPILE_FUSED=never`` forces the fallback (``always`` / ``auto``: the fused kernel where supported).
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
    """Append ``new`` [B, H, T, D] to the packed storage; tokens leaving the window are quantized.

    CPU: the reference (``PackedKV.append``). CUDA: the quantize-on-write Triton kernel
    (kvcompile/kernels/quantize_write.py; counts read on the device, no host sync) where it covers the layout,
    else the reference (``_write_fused`` says why, logged once per reason)."""
    pk = _packed(codes, scale, zero, sink, window, perm, counts, rope, kind, bits, group_size, axis, clip_ratio, n_sink,
                 window_size)
    if new.is_cuda:
        reason = _write_fused(new, pk)
        if reason is None:
            return
        _log_write_fallback(reason)
    pk.append(new)


@quantize_kv_write_.register_fake
def _(new, codes, scale, zero, sink, window, perm, counts, rope, kind, bits, group_size, axis, clip_ratio, n_sink,
      window_size):
    return None


def write(pk: PackedKV, new: Tensor) -> None:
    """``quantize_kv_write_`` on a PackedKV's storage."""
    q = pk.quant
    if pk._host is not None and not torch.compiler.is_compiling():
        # the host knows the length: raise before writing (the CUDA kernel cannot raise; past capacity it
        # writes nothing and keeps the counts)
        pk._check_capacity(pk.codes_rows_after(new.shape[2]))
    torch.ops.kvcompile.quantize_kv_write_(
        new, pk.codes, pk.scale, pk.zero, pk.sink, pk.window, pk.perm, pk.counts, pk.rope, q.kind, float(q.bits),
        q.group_size or 0, q.axis, q.clip_ratio, pk.n_sink, pk.window_size,
    )
    pk._host = None  # the op wrote counts


def write_pair(k: PackedKV, k_new: Tensor, v: PackedKV, v_new: Tensor) -> None:
    """A layer's K and V writes. On CUDA, outside ``torch.compile``, one launch of the quantize-on-write kernel
    writes both (one launch per layer and step; the kernel's ``pair``, with each side's own layout where they
    differ, as KIVI's do) where the kernel covers both layouts; otherwise, and inside compiled graphs (two
    ``quantize_kv_write_`` ops, which the graph passes match per storage), ``write`` each."""
    if k_new.is_cuda and not torch.compiler.is_compiling():
        for pk, new in ((k, k_new), (v, v_new)):
            if pk._host is not None:
                pk._check_capacity(pk.codes_rows_after(new.shape[2]))
        if _write_pair_fused(k, k_new, v, v_new) is None:
            return
    write(k, k_new)
    write(v, v_new)


def _write_pair_fused(k: PackedKV, k_new: Tensor, v: PackedKV, v_new: Tensor) -> str | None:
    """One write launch for a layer's two storages (their own layouts: the kernel takes one of each, e.g. KIVI's
    per-channel keys beside per-token values); None, or why the caller must write them apart."""
    from .kernels.quantize_write import quantize_write

    for pk, new in ((k, k_new), (v, v_new)):
        reason = _write_unsupported(new, pk) or _perm_unready(new, pk)
        if reason is not None:
            return reason
    if tuple(k_new.shape) != tuple(v_new.shape) or k_new.device != v_new.device:
        return f"new tokens {tuple(k_new.shape)} on {k_new.device} vs {tuple(v_new.shape)} on {v_new.device}"
    qk, qv = k.quant, v.quant
    second = dict(new=v_new, codes=v.codes, scale=v.scale, zero=v.zero, sink=v.sink, window=v.window, perm=v.perm,
                  counts=v.counts, kind=qv.kind, bits=qv.bits, group_size=qv.group_size or 0, axis=qv.axis,
                  clip_ratio=qv.clip_ratio, n_sink=v.n_sink, window_size=v.window_size, rope=v.rope)
    same = quantize_write(new=k_new, codes=k.codes, scale=k.scale, zero=k.zero, sink=k.sink, window=k.window,
                          perm=k.perm, counts=k.counts, kind=qk.kind, bits=qk.bits, group_size=qk.group_size or 0,
                          axis=qk.axis, clip_ratio=qk.clip_ratio, n_sink=k.n_sink, window_size=k.window_size,
                          rope=k.rope, pair=second)
    k._host = v._host = None  # the kernel wrote the counts
    if not torch.compiler.is_compiling():
        counters["kvcompile"]["fused_write_calls"] += 2
        counters["kvcompile"]["fused_write_pair_launches"] += 1
        if not same:
            counters["kvcompile"]["fused_write_mixed_pair_launches"] += 1
    return None


_WRITE_FALLBACK_LOGGED: set[str] = set()
# perm tensors that a write outside graph capture found calibrated (n_quant > 0); see _write_fused
_PERM_CALIBRATED = None


def _log_write_fallback(reason: str) -> None:
    if reason not in _WRITE_FALLBACK_LOGGED:
        _WRITE_FALLBACK_LOGGED.add(reason)
        log.warning("kvcompile: the quantize-on-write kernel does not cover %s; writing with the PyTorch "
                    "reference instead (correct, slower, syncs with the host)", reason)


def _write_unsupported(new: Tensor, pk: PackedKV) -> str | None:
    """Why the quantize-on-write kernel cannot take this layout (None: it can). The static rule; the
    channel-order calibration is decided per call in ``_write_fused``."""
    from .kernels.quantize_write import unsupported_reason

    q = pk.quant
    if new.dim() != 4 or not new.is_floating_point():
        return f"new tokens of shape {tuple(new.shape)} and dtype {new.dtype}"
    return unsupported_reason(kind=q.kind, bits=q.bits, group_size=q.group_size or 0, axis=q.axis,
                              head_dim=pk.head_dim, kv_dtype=pk.kv_dtype, meta_dtype=pk.scale.dtype,
                              has_rope=pk.rope is not None)


def _perm_unready(new: Tensor, pk: PackedKV) -> str | None:
    """For a channel-permuted storage: why this write must run the reference (it may calibrate the order), or
    None (see ``_write_fused``)."""
    global _PERM_CALIBRATED
    if pk.perm is None:
        return None
    if _PERM_CALIBRATED is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _PERM_CALIBRATED = WeakIdKeyDictionary()
    if new.is_cuda and torch.cuda.is_current_stream_capturing():
        if pk.perm not in _PERM_CALIBRATED:
            raise RuntimeError(
                "kvcompile: capturing a CUDA graph that writes a channel-permuted (SKVQ) layer whose channel "
                "order was not seen calibrated: the order is calibrated on the host by the first write that "
                "quantizes tokens. Run the prefill and one decode step through kvcompile.ops.write (or the "
                "compiled model) before capturing, as CUDA graph warm-up does, or use reorder=False")
    elif int(pk.counts[1]) == 0:
        return "the write that may calibrate the channel order (n_quant == 0; a host-side search)"
    else:
        _PERM_CALIBRATED[pk.perm] = True
    return None


def _write_fused(new: Tensor, pk: PackedKV) -> str | None:
    """Run the quantize-on-write kernel; returns None, or why the caller must use the reference instead.

    The SKVQ channel order (``perm``) is calibrated on the host (``PackedKV._calibrate_perm``, a search over
    candidate orders) by the first write that quantizes anything (``n_quant == 0``). Outside CUDA graph capture
    a layout with ``perm`` therefore reads ``n_quant`` on the host (8 bytes; the only sync of this path) and
    sends the calls with ``n_quant == 0`` to the reference. During capture nothing may be read: the kernel runs
    if an earlier uncaptured write saw this ``perm`` calibrated (the warm-up steps before a capture do), else
    this raises. A captured graph that resets ``counts`` to a new sequence keeps the channel order it has
    (it cannot re-calibrate on the device)."""
    reason = _write_unsupported(new, pk) or _perm_unready(new, pk)
    if reason is not None:
        return reason
    from .kernels.quantize_write import quantize_write

    q = pk.quant
    quantize_write(new=new, codes=pk.codes, scale=pk.scale, zero=pk.zero, sink=pk.sink, window=pk.window,
                   perm=pk.perm, counts=pk.counts, kind=q.kind, bits=q.bits, group_size=q.group_size or 0,
                   axis=q.axis, clip_ratio=q.clip_ratio, n_sink=pk.n_sink, window_size=pk.window_size, rope=pk.rope)
    if not torch.compiler.is_compiling():
        counters["kvcompile"]["fused_write_calls"] += 1
    return None


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
        return _attention_cuda(q, kp, vp, scale, mask, is_causal)
    return attention_reference(q, kp.dequantize(torch.float32), vp.dequantize(torch.float32), scale, mask,
                               is_causal).to(q.dtype).contiguous()


@dequant_attention.register_fake
def _(q, k_codes, k_scale, k_zero, k_sink, k_window, k_perm, k_counts, k_rope, v_codes, v_scale, v_zero, v_sink,
      v_window, v_perm, v_counts, v_rope, k_kind, k_bits, k_group_size, k_axis, v_kind, v_bits, v_group_size, v_axis, n_sink,
      window_size, scale, mask, is_causal):
    return q.new_empty(q.shape)  # contiguous, as the real implementations return


def _attention_cuda(q: Tensor, kp: PackedKV, vp: PackedKV, scale: float, mask: Optional[Tensor],
                    is_causal: bool) -> Tensor:
    """The CUDA implementation: the fused decode kernel, else for a chunk of new tokens the chunked-prefill kernel,
    else dequantize + SDPA."""
    out = _fused_cuda(q, kp, vp, scale, mask, is_causal)
    if out is None and q.shape[2] > 1:  # a chunk of new tokens: the chunked-prefill kernel
        out = _prefill_cuda(q, kp, vp, scale, mask, is_causal)
    return out if out is not None else _dequant_sdpa(q, kp, vp, scale, mask, is_causal)


def attention(q: Tensor, k: PackedKV, v: PackedKV, *, scale: float | None = None, mask: Tensor | None = None,
              is_causal: bool = False) -> Tensor:
    """``dequant_attention`` on two PackedKVs. Called eagerly on CUDA (plain tensors, nothing tracing, no
    gradient wanted) it runs the op's CUDA implementation directly: the torch.library dispatch cost about 86 us per
    call on the H100 host (``benchmarks/bench_eager.py --breakdown``), a third of an eager decode call."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if (q.is_cuda and type(q) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not (q.requires_grad and torch.is_grad_enabled())):
        return _attention_cuda(q, k, v, float(scale), mask, bool(is_causal))
    return _attention_op(q, k, v, scale, mask, is_causal)


def _attention_op(q: Tensor, k: PackedKV, v: PackedKV, scale: float, mask: Tensor | None, is_causal: bool) -> Tensor:
    """``kvcompile::dequant_attention`` through the dispatcher, on the PackedKVs' storage."""
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

    if vp.rope is not None:
        return "values quantized before RoPE"
    if vp.quant.bits == 1.5 and kp.quant.axis == "channel":
        return "ternary values beside per-channel keys"
    if kp.rope is not None and (kp.quant.kind != "affine" or kp.quant.bits not in (2, 4) or kp.quant.axis != "token"):
        return f"keys before RoPE in {kp.quant.kind} {kp.quant.bits}-bit codes along the {kp.quant.axis} axis"
    for p in (kp, vp):
        qt = p.quant
        if qt.kind not in k.SUPPORTED_FORMATS:
            return f"{qt.kind} quantization"
        if qt.bits not in (k.SUPPORTED_V_BITS if p is vp and qt.kind == "affine" and qt.axis == "token"
                           else k.SUPPORTED_BITS):
            return f"{qt.bits}-bit {'values' if p is vp else 'keys'}"
        if qt.bits == 8 and (qt.axis != "token" or qt.group_for(p.head_dim) != p.head_dim):
            return "8-bit codes in groups smaller than the head dim"
        if qt.kind == "nf" and qt.bits != 4:
            return f"NF{qt.bits} codes (the kernel takes NF4)"
        if qt.axis == "channel":  # KIVI keys: per-channel groups of group_size tokens
            if p is vp:
                return "per-channel (axis='channel') values"
            if qt.group_size not in k.SUPPORTED_TOKEN_GROUPS:
                return f"per-channel keys in groups of {qt.group_size} tokens"
        else:
            g = qt.group_for(p.head_dim)
            if not (g == p.head_dim or g in k.SUPPORTED_GROUP_SIZES):
                return f"group size {g}"
    nf_reason = _nf_group_fill_unsupported(q, kp, vp)
    if nf_reason is not None:
        return nf_reason
    if vp.quant.flush > kp.quant.flush:  # the kernel needs V's packed middle at least as long as K's
        return "values flushed in larger token groups than keys"
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


def _nf_group_fill_unsupported(q: Tensor, kp: PackedKV, vp: PackedKV) -> str | None:
    """NF4 codes in groups below the head dim need the kernel's group fill (the launcher's rule,
    ``group_fill_groups``): grouped sides share one group size and (D / group) x the query rows fit 64 MMA rows."""
    from .kernels.decode_attention import group_fill_groups

    d = q.shape[-1]
    gk = kp.quant.group_for(d) if kp.quant.axis == "token" else d
    gv = vp.quant.group_for(vp.head_dim)
    nf_grouped = (kp.quant.kind == "nf" and gk < d) or (vp.quant.kind == "nf" and gv < d)
    if not nf_grouped:
        return None
    if group_fill_groups(head_dim=d, k_group_size=gk, v_group_size=gv, k_channel=False,
                         rows=(q.shape[1] // kp.shape[1]) * q.shape[2]) == 0:
        return (f"NF4 codes in groups of {gk} (K) / {gv} (V) channels with {q.shape[1] // kp.shape[1]} x "
                f"{q.shape[2]} query rows per KV head (the kernel's group fill needs equal groups and at most 64 rows)")
    return None


def _fold_key_order(q: Tensor, kp: PackedKV, r: int) -> Tensor:
    """q in the keys' stored channel order (a kernel then reads permuted keys as they are):
    q . k == q[perm] . k[perm]. ``r`` query heads share each KV head's order."""
    if kp.perm is None:
        return q
    idx = kp.perm.repeat_interleave(r, dim=0)[None, :, None, :].expand(q.shape)
    return torch.gather(q, -1, idx)


def _unfold_value_order(out: Tensor, vp: PackedKV, r: int) -> Tensor:
    """A kernel's output over values stored in their permuted channel order, put back in model order."""
    if vp.perm is None:
        return out
    inv = torch.argsort(vp.perm, dim=-1).repeat_interleave(r, dim=0)[None, :, None, :].expand_as(out)
    return torch.gather(out, -1, inv)


# (the call's static facts) -> (why the fused kernel cannot take it or None, decode_attention's layout arguments)
_FUSED_STATIC: dict = {}


def _fused_static(q: Tensor, kp: PackedKV, vp: PackedKV, mask: Optional[Tensor], is_causal: bool):
    """``_fused_unsupported`` and the kernel's layout arguments, computed once per combination of what they depend
    on (an eager decode step asks again for every layer)."""
    key = (q.shape, q.dtype, kp.shape[1], kp.quant, vp.quant, kp.kv_dtype, kp.head_dim, vp.head_dim,
           kp.rope is None, vp.rope is None, mask is None, is_causal)
    hit = _FUSED_STATIC.get(key)
    if hit is None:
        reason = _fused_unsupported(q, kp, vp, mask, is_causal)
        layout = None
        if reason is None:
            d, kq, vq = q.shape[-1], kp.quant, vp.quant
            layout = dict(
                k_bits=int(kq.bits), v_bits=1.5 if vq.bits == 1.5 else int(vq.bits), k_axis=kq.axis,
                k_group_size=kq.group_size if kq.axis == "channel" else kq.group_for(d),
                v_group_size=vq.group_for(vp.head_dim), k_format=kq.kind, v_format=vq.kind, window_ring=True)
        hit = (reason, layout, vp.quant.flush != kp.quant.flush)
        if len(_FUSED_STATIC) > 1024:
            _FUSED_STATIC.clear()
        _FUSED_STATIC[key] = hit
    return hit


def _fused_cuda(q: Tensor, kp: PackedKV, vp: PackedKV, scale: float, mask: Optional[Tensor],
                is_causal: bool) -> Tensor | None:
    """The Triton path, or None where it does not apply or would not win (the caller then dequantizes)."""
    reason, layout, v_ahead = _fused_static(q, kp, vp, mask, is_causal)
    if reason is not None:
        if reason not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(reason)
            log.warning("kvcompile: the fused decode-attention kernel does not support %s yet; using the "
                        "chunked-prefill kernel where it applies, else dequantize + SDPA (correct, slower)", reason)
        return None
    from .kernels.decode_attention import decode_attention

    if os.environ.get("KVCOMPILE_FUSED", "auto") == "never":  # auto | always | never
        return None
    r = q.shape[1] // kp.shape[1]
    qq = _fold_key_order(q, kp, r)
    # lengths stay on the device (``counts``): no host sync, so the step can be captured in a CUDA graph.
    # K and V count separately when they flush differently (KIVI: V's middle runs ahead of K's).
    out, _ = decode_attention(
        q=qq, k_sink=kp.sink, k_codes=kp.codes, k_scale=kp.scale, k_zero=kp.zero,
        k_window=kp.window, v_sink=vp.sink, v_codes=vp.codes, v_scale=vp.scale, v_zero=vp.zero,
        v_window=vp.window, lengths=kp.counts, v_lengths=vp.counts if v_ahead else None, sm_scale=scale,
        k_rope=kp.rope, k_perm=kp.perm if kp.rope is not None else None, **layout,
    )
    out = _unfold_value_order(out, vp, r)
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


def _prefill_unsupported(q: Tensor, kp: PackedKV, vp: PackedKV, mask: Optional[Tensor]) -> str | None:
    """Why the chunked-prefill kernel cannot run this call (None: it can)."""
    from .kernels import prefill_attention as pa

    if vp.rope is not None:
        return "values quantized before RoPE (the prefill kernel rotates keys only)"
    if kp.rope is not None and (kp.quant.kind != "affine" or kp.quant.bits not in (2, 4)):
        return f"keys before RoPE in {kp.quant.kind} {kp.quant.bits}-bit codes (prefill kernel: affine 2 / 4-bit)"
    for p, bits in ((kp, pa.SUPPORTED_BITS), (vp, pa.SUPPORTED_V_BITS)):
        qt = p.quant
        if qt.kind not in pa.SUPPORTED_FORMATS:
            return f"{qt.kind} quantization (prefill kernel: {', '.join(pa.SUPPORTED_FORMATS)})"
        if qt.bits not in (bits if qt.kind == "affine" else (4,) if qt.kind == "nf" else (8,)):
            return f"{qt.bits}-bit {qt.kind} codes (prefill kernel: {bits}; NF4)"
        if qt.axis == "channel":  # KIVI keys: per-channel groups of group_size tokens
            if p is vp:
                return "per-channel (axis='channel') values (prefill kernel: keys only)"
            if qt.bits not in (2, 4) or kp.rope is not None:
                return f"per-channel {qt.bits}-bit keys{' before RoPE' if kp.rope is not None else ''}"
            if qt.group_size not in pa._da.SUPPORTED_TOKEN_GROUPS:
                return f"per-channel keys in groups of {qt.group_size} tokens"
            continue
        g = qt.group_for(p.head_dim)
        if not (g == p.head_dim or g in pa.SUPPORTED_GROUP_SIZES):
            return f"group size {g} (prefill kernel: the head dim, {', '.join(map(str, pa.SUPPORTED_GROUP_SIZES))})"
        if qt.bits == 8 and g != p.head_dim:
            return "8-bit codes in groups smaller than the head dim"
    if q.shape[-1] not in pa.SUPPORTED_HEAD_DIMS or vp.head_dim != q.shape[-1]:
        return f"head dim {q.shape[-1]} (prefill kernel: {pa.SUPPORTED_HEAD_DIMS})"
    if q.dtype not in pa.SUPPORTED_DTYPES or kp.kv_dtype != q.dtype:
        return f"{q.dtype} queries over {kp.kv_dtype} K/V (prefill kernel: float16 / bfloat16, same dtype)"
    if mask is not None:
        return "an explicit attention mask (prefill kernel: causal or none)"
    if vp.quant.flush > kp.quant.flush:  # the kernel reads V's middle ahead of K's, not behind
        return "values flushed in larger token groups than keys"
    if vp.quant.flush != kp.quant.flush and (vp.quant.kind != "affine" or vp.quant.bits not in (2, 4)):
        return f"{vp.quant.kind} {vp.quant.bits}-bit values ahead of per-channel keys (prefill kernel: affine 2 / 4-bit)"
    return None


def prefill_kwargs(q: Tensor, kp: PackedKV, vp: PackedKV) -> dict:
    """The chunked-prefill kernel's storage keywords for a K / V pair of PackedKV (``prefill_attention(**kw,
    sm_scale=..., causal=...)``), with q folded into the keys' channel order (the output comes in the values' order:
    ``_unfold_value_order``). Lengths are the caches' host ints (``PackedKV.lengths``)."""
    n_s, n_q, n_w = kp.lengths()
    v_n_q = vp.lengths()[1] if vp.quant.flush != kp.quant.flush else n_q  # KIVI: V's middle runs ahead of K's
    d = q.shape[-1]
    return dict(
        q=_fold_key_order(q, kp, q.shape[1] // kp.shape[1]), k_sink=kp.sink[:, :, :n_s], k_codes=kp.codes,
        k_scale=kp.scale, k_zero=kp.zero, k_window=kp.window, v_sink=vp.sink[:, :, :n_s], v_codes=vp.codes,
        v_scale=vp.scale, v_zero=vp.zero, v_window=vp.window, n_quant=n_q, n_window=n_w, v_n_quant=v_n_q,
        k_bits=int(kp.quant.bits), v_bits=1.5 if vp.quant.bits == 1.5 else int(vp.quant.bits), k_axis=kp.quant.axis,
        k_group_size=kp.quant.group_size if kp.quant.axis == "channel" else kp.quant.group_for(d),
        v_group_size=vp.quant.group_for(vp.head_dim), k_rope=kp.rope, k_perm=kp.perm if kp.rope is not None else None,
        k_format=kp.quant.kind, v_format=vp.quant.kind, window_ring=True)  # PackedKV's windows are rings


def _prefill_cuda(q: Tensor, kp: PackedKV, vp: PackedKV, scale: float, mask: Optional[Tensor],
                  is_causal: bool) -> Tensor | None:
    """The chunked-prefill Triton kernel (many query rows per KV head), or None where it does not apply or is
    not expected to win (``prefill_is_profitable``; ``KVCOMPILE_FUSED=always|never`` overrides): the caller
    then dequantizes + SDPA. The channel permutation is folded into q and the output, as in ``_fused_cuda``."""
    policy = os.environ.get("KVCOMPILE_FUSED", "auto")  # auto | always | never
    if policy == "never":
        return None
    reason = _prefill_unsupported(q, kp, vp, mask)
    if reason is not None:
        key = "prefill: " + reason
        if key not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(key)
            log.warning("kvcompile: the chunked-prefill kernel does not support %s; dequantizing + SDPA instead "
                        "(correct, slower)", reason)
        return None
    from .kernels.prefill_attention import prefill_attention, prefill_is_profitable

    n_s, n_q, n_w = kp.lengths()
    b, hq, nq, d = q.shape
    hkv = kp.shape[1]
    causal = bool(is_causal) and nq > 1
    if causal and n_s + n_q + n_w < nq:
        return None  # the chunk's own K/V are not in the cache: not this kernel's contract
    per_element = kp.rope is not None or vp.quant.bits == 1.5
    register = kp.quant.axis == "channel"  # per-channel keys: a lower matrix rate (prefill_attention's constants)
    if policy != "always" and not prefill_is_profitable(batch=b, kv_heads=hkv, rows=(hq // hkv) * nq, new_tokens=nq,
                                                         seq_len=n_s + n_q + n_w, head_dim=d, per_element=per_element,
                                                         register_dequant=register):
        return None
    r = hq // hkv
    out, _ = prefill_attention(**prefill_kwargs(q, kp, vp), sm_scale=scale, causal=causal)
    out = _unfold_value_order(out, vp, r)
    if not torch.compiler.is_compiling():
        counters["kvcompile"]["prefill_attention_calls"] += 1
    return out.contiguous()
