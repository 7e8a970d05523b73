"""Pure-PyTorch float32 reference for :func:`kvcompile.kernels.decode_attention.decode_attention`.

Same keyword signature; dequantizes the packed middle with the project's reference quantizer
(``kvcompile.quant``: affine groups per token, or for keys with ``k_axis="channel"`` per channel over
``k_group_size`` tokens; codes little-endian within the byte, docs/format.md; or ``*_format`` "int8" / "fp8":
one absmax scale per token; "nf": NF4 codebook values times a per-group absmax scale), then per sequence
concatenates sink[:n_sink] ++ middle[:n_quant] ++ window[:n_window] (or the window's ring rows, ``window_ring``)
with that sequence's lengths, repeats the KV heads for GQA and runs a masked softmax in float32. This is the spec
the Triton kernel is tested against. Keys quantized before RoPE (``k_rope``, ``k_perm``): the middle is rotated by its positions
(kvcompile.cache.packed.rotate) in model channel order, then compared in the stored order.
"""

from __future__ import annotations

import math

import torch

from ..quant import dequantize_affine, dequantize_fp8, dequantize_int8, dequantize_nf, unpack_codes

__all__ = ["decode_attention_reference", "lengths_per_row", "rotate_stored"]


def lengths_per_row(lengths, B: int, caps: tuple[int, int, int], name: str = "lengths") -> list[tuple[int, int, int]]:
    """[(n_sink, n_quant, n_window)] * B from a [3] or [B, 3] int tensor; raises on lengths outside
    [0, capacity] (the kernel clamps them instead: never a read out of bounds)."""
    t = torch.as_tensor(lengths).cpu().to(torch.int64)
    if t.shape == (3,):
        t = t[None].expand(B, 3)
    if t.shape != (B, 3):
        raise ValueError(f"{name} shape {tuple(t.shape)} must be (3,) or ({B}, 3)")
    rows = [tuple(int(x) for x in row) for row in t.tolist()]
    for b, row in enumerate(rows):
        for part, n, c in zip(("n_sink", "n_quant", "n_window"), row, caps):
            if not 0 <= n <= c:
                raise ValueError(f"{name}[{b}]: {part}={n} outside [0, {c}]")
    return rows


def rotate_stored(k: torch.Tensor, inv_freq: torch.Tensor, perm: torch.Tensor | None, start: int) -> torch.Tensor:
    """Keys quantized before RoPE, float32 [B, H, T, D] in the stored channel order ``perm`` [H, D] (the model
    channel at each stored column; None: the identity): token t rotated to position ``start + t`` (PackedKV's
    middle convention) with the cache's own ``rotate`` in model channel order, returned in the stored order."""
    from ..cache.packed import rotate

    H, D = k.shape[1], k.shape[-1]
    perm = (torch.arange(D, device=k.device).expand(H, D) if perm is None
            else perm.to(device=k.device, dtype=torch.int64))
    pidx = perm[None, :, None, :].expand_as(k)
    model = torch.empty_like(k).scatter_(-1, pidx, k)
    pos = torch.arange(start, start + k.shape[2], device=k.device)
    return torch.gather(rotate(model, pos, inv_freq.to(device=k.device, dtype=torch.float32)), -1, pidx)


def decode_attention_reference(
    *,
    q: torch.Tensor,
    k_sink: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor | None,
    k_window: torch.Tensor,
    v_sink: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor | None,
    v_window: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    n_quant: int | None = None,
    n_window: int | None = None,
    lengths: torch.Tensor | None = None,
    v_lengths: torch.Tensor | None = None,
    k_axis: str = "token",
    k_format: str = "affine",
    v_format: str = "affine",
    sm_scale: float | None = None,
    k_rope: torch.Tensor | None = None,
    k_perm: torch.Tensor | None = None,
    window_ring: bool = False,
    **_tuning,  # the kernel's tuning knobs (num_splits, block_n, ...) do not change the result
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, Nq, D] float32, lse [B, Hq, Nq] float32, natural log). A query row that sees
    no token (a sequence shorter than its new tokens, or empty) gets out 0 and lse -inf.

    ``window_ring``: the windows are rings (PackedKV's layout, docs/format.md): window token j of a row sits at
    row ``(n_quant + j) % window.shape[2]`` of that row's K (V) window, with the row's own K (V) n_quant.
    Otherwise window token j is row j."""
    B, Hq, NQ, D = q.shape
    Hkv = k_codes.shape[1]
    r = Hq // Hkv
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    S = k_sink.shape[2]
    if lengths is None:
        k_rows = [(S, int(n_quant), int(n_window))] * B
        v_rows = k_rows
    else:
        k_rows = lengths_per_row(lengths, B, (S, k_codes.shape[2], k_window.shape[2]))
        v_rows = k_rows if v_lengths is None else lengths_per_row(
            v_lengths, B, (S, v_codes.shape[2], v_window.shape[2]), "v_lengths")
        for b, (kr, vr) in enumerate(zip(k_rows, v_rows)):
            if kr[0] != vr[0] or sum(kr) != sum(vr) or vr[1] < kr[1]:
                raise ValueError(f"row {b}: K lengths {kr} and V lengths {vr} must share n_sink and the total, "
                                 "with V's n_quant >= K's")

    def middle(codes, scale, zero, bits, g, axis, fmt):  # the whole capacity, dequantized: [B, H, cap, D]
        if fmt == "int8":
            return dequantize_int8(codes, scale)
        if fmt == "fp8":
            return dequantize_fp8(codes, scale)
        if fmt == "nf":
            return dequantize_nf(unpack_codes(codes, bits, D), scale, bits, g)
        return dequantize_affine(unpack_codes(codes, bits, D), scale, zero, g, axis=axis)

    k_mid = middle(k_codes, k_scale, k_zero, k_bits, k_group_size, k_axis, k_format)
    if k_rope is not None:
        k_mid = rotate_stored(k_mid, k_rope, k_perm, S)
    v_mid = middle(v_codes, v_scale, v_zero, v_bits, v_group_size, "token", v_format)
    out = torch.zeros(B, Hq, NQ, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, NQ), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        def logical(sink, mid, window, row):
            n_s, n_q, n_w = row
            rows = torch.arange(n_w, device=window.device)
            if window_ring:
                rows = (n_q + rows) % window.shape[2]
            return torch.cat([sink[b, :, :n_s].float(), mid[b, :, :n_q], window[b][:, rows].float()], dim=1)

        k = logical(k_sink, k_mid, k_window, k_rows[b]).repeat_interleave(r, dim=0)  # [Hq, L, D]
        v = logical(v_sink, v_mid, v_window, v_rows[b]).repeat_interleave(r, dim=0)
        L = k.shape[1]
        scores = torch.einsum("hnd,htd->hnt", q[b].float(), k) * sm_scale
        # new token i is logical position L - NQ + i and sees positions <= its own
        pos = torch.arange(L, device=q.device)
        lim = L - NQ + torch.arange(NQ, device=q.device)
        scores = scores.masked_fill(pos[None, :] > lim[:, None], float("-inf"))
        lse[b] = torch.logsumexp(scores, dim=-1)
        seen = torch.isfinite(lse[b])[..., None]
        p = torch.where(seen, torch.softmax(scores, dim=-1), 0.0)
        out[b] = torch.einsum("hnt,htd->hnd", p, v)
    return out, lse
