"""Quantization error metrics."""

from __future__ import annotations

import math

import torch


def sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 * log10(||x||^2 / ||x - x_hat||^2)`` (float64 sums).

    ``inf`` when ``x_hat`` equals ``x`` (zero noise), ``-inf`` when ``x`` is all zero but ``x_hat`` is not.
    The same quantity as torchao's ``compute_error``.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"sqnr needs equal shapes, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    xd = x.double()
    signal = float(xd.square().sum())
    noise = float((xd - x_hat.double()).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
