"""Per-KV-head channel permutations (docs/format.md, "Channel permutation"), SKVQ-style reorder.

``perm: [H, D]`` int64; quantization sees ``x[..., h, :, perm[h]]``, so the channels that ``perm[h]``
puts next to each other share a per-token group.

How :func:`channel_perm_by_range` chooses ``perm[h]`` (calibration only, not a hot path):

1. Features: each channel's ``(min, max)`` over batch and tokens (SKVQ clusters channels on these).
2. Candidates: the identity; channels sorted by range ``max - min``; sorted by midpoint
   ``(max + min) / 2``; and a balanced k-means on ``(min, max)`` into ``D // group_size`` clusters of
   exactly ``group_size`` channels (Lloyd iterations, greedy capacity-limited assignment, seeded from
   the range sort; deterministic).
3. Keep the candidate whose per-token affine quantization (``quantize_affine`` at the given ``bits`` and
   ``clip_ratio``, float32 metadata) has the smallest squared error on ``x`` itself. Ties keep the
   earlier candidate, identity first, so the result never does worse than no permutation on the
   calibration data. Measuring the real error matters: at 2 bits and below the textbook proxy
   ``sum(range**2)`` ranks candidates wrongly (sorting by range can lower it and still lose SQNR).

Within a group, channels keep ascending index order; groups are ordered by their first channel's
position in the winning candidate. With ``group_size == D`` every permutation is equivalent and the
identity is returned.
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_group
from .affine import dequantize_affine, quantize_affine
from .pack import check_bits

_KMEANS_ITERS = 25


def _check_perm(perm: torch.Tensor, h: int | None = None, d: int | None = None) -> None:
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.dim() != 2:
        raise ValueError(f"perm must be an int64 tensor [H, D], got {getattr(perm, 'dtype', perm)} "
                         f"{tuple(getattr(perm, 'shape', ()))}")
    if h is not None and tuple(perm.shape) != (h, d):
        raise ValueError(f"perm must have shape [H, D] = {(h, d)} for this x, got {tuple(perm.shape)}")
    if perm.numel() and not torch.compiler.is_compiling():
        ar = torch.arange(perm.shape[1], device=perm.device)
        if not torch.equal(perm.sort(-1).values, ar.expand_as(perm)):
            raise ValueError("perm rows must each be a permutation of 0..D-1")


def _check_x(x: torch.Tensor) -> None:
    check_float(x, min_dim=3)


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[h, perm[h, i]] = i``."""
    _check_perm(perm)
    inv = torch.empty_like(perm)
    src = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return inv.scatter_(1, perm, src)


def apply_perm(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``y[..., h, t, i] = x[..., h, t, perm[h, i]]`` for ``x [..., H, T, D]`` (normally ``[B, H, T, D]``)."""
    _check_x(x)
    _check_perm(perm, x.shape[-3], x.shape[-1])
    idx = perm[:, None, :].expand(x.shape)
    return torch.gather(x, -1, idx)


def unapply_perm(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_perm`: ``unapply_perm(apply_perm(x, perm), perm) == x``."""
    return apply_perm(y, invert_perm(perm))


def _quant_error(xh: torch.Tensor, order: torch.Tensor, group_size: int, bits: float, clip_ratio: float) -> float:
    """Squared error of per-token affine quantization of ``xh[..., order]`` (float32 metadata)."""
    xp = xh[..., order]
    codes, scale, zero = quantize_affine(xp, bits, group_size, "token", clip_ratio, meta_dtype=torch.float32)
    return float((dequantize_affine(codes, scale, zero, group_size, "token") - xp).double().square().sum())


def _balanced_kmeans(feat: torch.Tensor, init: torch.Tensor, group_size: int) -> torch.Tensor:
    """Cluster ``feat [D, F]`` into ``D // group_size`` clusters of exactly ``group_size`` points.

    ``init`` is an ordering of the points whose consecutive chunks seed the clusters. Returns an ordering
    (cluster by cluster).
    """
    d = feat.shape[0]
    k = d // group_size
    assign = torch.empty(d, dtype=torch.long)
    assign[init] = torch.arange(d) // group_size
    for _ in range(_KMEANS_ITERS):
        cent = torch.zeros(k, feat.shape[1], dtype=feat.dtype).index_add_(0, assign, feat) / group_size
        dist = (feat[:, None, :] - cent[None, :, :]).square().sum(-1)  # [D, k]
        # Greedy balanced assignment: closest (point, cluster) pairs first, each cluster up to group_size.
        pairs = torch.argsort(dist.flatten(), stable=True).tolist()
        new = [-1] * d
        fill = [0] * k
        left = d
        for p in pairs:
            i, c = divmod(p, k)
            if new[i] < 0 and fill[c] < group_size:
                new[i] = c
                fill[c] += 1
                left -= 1
                if not left:
                    break
        new_t = torch.tensor(new, dtype=torch.long)
        if torch.equal(new_t, assign):
            break
        assign = new_t
    return _order_from_groups(assign, torch.arange(d))


def _order_from_groups(assign: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Ordering: groups in order of their lowest ``rank`` member, channels ascending inside a group."""
    k = int(assign.max()) + 1
    first = torch.full((k,), rank.numel(), dtype=torch.long).scatter_reduce_(0, assign, rank, "amin")
    group_pos = torch.argsort(first)  # group ids in display order
    pos_of_group = torch.empty_like(group_pos)
    pos_of_group[group_pos] = torch.arange(k)
    key = pos_of_group[assign] * assign.numel() + torch.arange(assign.numel())
    return torch.argsort(key)


def _canonical(order: torch.Tensor, group_size: int) -> torch.Tensor:
    """Same groups as ``order``, channels ascending within each group, groups by first appearance."""
    d = order.numel()
    assign = torch.empty(d, dtype=torch.long)
    assign[order] = torch.arange(d) // group_size
    rank = torch.empty(d, dtype=torch.long)
    rank[order] = torch.arange(d)
    return _order_from_groups(assign, rank)


def channel_perm_by_range(
    x: torch.Tensor, group_size: int, *, bits: float = 2, clip_ratio: float = 1.0
) -> torch.Tensor:
    """Per KV head, an order of the channels that puts channels with similar ranges in one group.

    ``x``: calibration keys or values ``[B, H, T, D]``. ``bits`` and ``clip_ratio``: the per-token affine
    quantization the candidates are scored with (use the scheme's own). Returns ``perm [H, D]`` int64 on
    ``x.device`` (computed on CPU). See the module docstring for the method.
    """
    check_float(x)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, T, D], got shape {tuple(x.shape)}")
    b, h, t, d = x.shape
    check_group(d, group_size, "D (the last dim of x)")
    check_bits(bits)
    if b * t == 0:
        raise ValueError("x must hold at least one token to calibrate a permutation")
    xf = x.detach().float().cpu()
    mn = xf.amin(dim=(0, 2))  # [H, D]
    mx = xf.amax(dim=(0, 2))
    ident = torch.arange(d)
    perms = []
    for head in range(h):
        if group_size == d:
            perms.append(ident)
            continue
        xh = xf[:, head].reshape(b * t, d)
        lo, hi = mn[head].double(), mx[head].double()
        by_range = torch.argsort(hi - lo, stable=True)
        by_mid = torch.argsort(hi + lo, stable=True)
        kmeans = _balanced_kmeans(torch.stack([lo, hi], dim=1), by_range, group_size)
        best, best_err = ident, _quant_error(xh, ident, group_size, bits, clip_ratio)
        for cand in (by_range, by_mid, kmeans):
            cand = _canonical(cand, group_size)
            err = _quant_error(xh, cand, group_size, bits, clip_ratio)
            if err < best_err:
                best, best_err = cand, err
        perms.append(best)
    return torch.stack(perms).to(device=x.device, dtype=torch.int64)
