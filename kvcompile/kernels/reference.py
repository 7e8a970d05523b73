"""Pure-PyTorch float32 reference for :func:`kvcompile.kernels.decode_attention.decode_attention`.

Same keyword signature; dequantizes the packed middle with the project's reference quantizer
(``kvcompile.quant``: per-token affine groups, codes little-endian within the byte, docs/format.md),
concatenates sink ++ middle ++ window, repeats the KV heads for GQA and runs a masked softmax in float32. This is the spec the Triton kernel is tested against.
"""

from __future__ import annotations

import math

import torch

from ..quant import dequantize_affine, unpack_codes

__all__ = ["decode_attention_reference"]


def decode_attention_reference(
    *,
    q: torch.Tensor,
    k_sink: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_window: torch.Tensor,
    v_sink: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_window: torch.Tensor,
    n_quant: int,
    n_window: int,
    k_bits: int,
    v_bits: int,
    k_group_size: int,
    v_group_size: int,
    sm_scale: float | None = None,
    **_tuning,  # the kernel's tuning knobs (num_splits, block_n, ...) do not change the result
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, Nq, D] float32, lse [B, Hq, Nq] float32, natural log)."""
    B, Hq, NQ, D = q.shape
    Hkv = k_codes.shape[1]
    r = Hq // Hkv
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    n_quant, n_window = int(n_quant), int(n_window)

    def logical(sink, codes, scale, zero, window, bits, g):
        c = unpack_codes(codes[:, :, :n_quant], bits, D)
        mid = dequantize_affine(c, scale[:, :, :n_quant], zero[:, :, :n_quant], g, axis="token")
        return torch.cat([sink.float(), mid, window[:, :, :n_window].float()], dim=2)

    k = logical(k_sink, k_codes, k_scale, k_zero, k_window, k_bits, k_group_size)
    v = logical(v_sink, v_codes, v_scale, v_zero, v_window, v_bits, v_group_size)
    L = k.shape[2]
    k = k.repeat_interleave(r, dim=1)
    v = v.repeat_interleave(r, dim=1)
    scores = torch.einsum("bhnd,bhtd->bhnt", q.float(), k) * sm_scale
    # new token i is logical position L - NQ + i and sees positions <= its own
    pos = torch.arange(L, device=q.device)
    lim = L - NQ + torch.arange(NQ, device=q.device)
    scores = scores.masked_fill(pos[None, :] > lim[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhnt,bhtd->bhnd", torch.softmax(scores, dim=-1), v)
    return out, lse
