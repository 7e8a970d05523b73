"""Pure-PyTorch float32 reference for :func:`kvcompile.kernels.decode_attention.decode_attention`.

Same keyword signature; dequantizes the packed middle (docs/format.md: per-token affine groups, codes
little-endian within the byte), concatenates sink ++ middle ++ window, repeats the KV heads for GQA and
runs a masked softmax in float32. This is the spec the Triton kernel is tested against.
"""

from __future__ import annotations

import math

import torch

__all__ = ["decode_attention_reference", "unpack_codes_reference", "dequantize_per_token_reference"]


def unpack_codes_reference(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """uint8 [..., d * bits / 8] -> uint8 codes [..., d]; code j of byte i is element i * (8 // bits) + j
    and sits at bits j * bits .. (j + 1) * bits - 1 (bits in {1, 2, 4, 8})."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"unpack_codes_reference: bits={bits} unsupported")
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :d].to(torch.uint8)


def dequantize_per_token_reference(codes_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                                   bits: int, group_size: int, d: int) -> torch.Tensor:
    """float32 [..., T, d] = code * scale + zero per group of group_size consecutive channels."""
    c = unpack_codes_reference(codes_packed, bits, d).float()
    g = c.reshape(*c.shape[:-1], d // group_size, group_size)
    x = g * scale.float()[..., None] + zero.float()[..., None]
    return x.reshape(c.shape)


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
        mid = dequantize_per_token_reference(codes[:, :, :n_quant], scale[:, :, :n_quant],
                                             zero[:, :, :n_quant], bits, g, D)
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
