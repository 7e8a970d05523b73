"""The schemes, from the papers. Each is a frozen dataclass of user-facing options.

Where a paper leaves a choice open, the default here says what was chosen and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import LayerSpec, Scheme, TensorQuant, register_scheme


def _per_token_spec(cfg: SKVQ | PerToken, *, reorder: bool, pre_rope: bool) -> LayerSpec:
    """Per-token affine K and V (``cfg``'s bits, group size and clip ratios) with ``cfg``'s sinks and window: the
    layout of ``skvq`` and of ``pertoken`` (which is ``skvq`` without the reorder and keys before RoPE)."""
    return LayerSpec(
        k=TensorQuant("affine", cfg.k_bits, cfg.group_size, "token", cfg.k_clip_ratio, reorder),
        v=TensorQuant("affine", cfg.v_bits, cfg.group_size, "token", cfg.v_clip_ratio, reorder),
        n_sink=cfg.n_sink,
        window=cfg.window,
        k_pre_rope=pre_rope,
    )


@register_scheme
@dataclass(frozen=True)
class SKVQ(Scheme):
    """SKVQ (Duanmu et al., 2024): per-token group quantization after a channel reorder, clipped ranges,
    full-precision attention sinks and a sliding window of recent tokens.

    ``v_bits=1.5`` is ternary (3 levels, packed 5 per byte: 1.6 stored bits). The channel order is not
    calibrated offline yet (calibration is a separate step): it is taken from the first tokens that get
    quantized (the prefill), clustering channels of similar range into the same group inside each head.
    ``pre_rope``: keys are quantized before RoPE (SKVQ's pre_rope option): the cache un-rotates them by position
    on write and rotates them back on read, so the channel order is stable across positions.

    Defaults measured on SmolLM2-135M (head dim 64, README's quality table): groups of 16 channels with pre-RoPE
    keys, reorder and a 0.95 key clip; groups of 32 or post-RoPE keys lost most of the quality at 2 bits.
    """

    name = "skvq"
    k_bits: float = 2
    v_bits: float = 1.5
    group_size: int = 16
    k_clip_ratio: float = 0.95
    v_clip_ratio: float = 1.0
    reorder: bool = True
    pre_rope: bool = True
    window: int = 128
    n_sink: int = 4

    def layer_spec(self, layer_idx: int, num_layers: int) -> LayerSpec:
        return _per_token_spec(self, reorder=self.reorder, pre_rope=self.pre_rope)


@register_scheme
@dataclass(frozen=True)
class KIVI(Scheme):
    """KIVI (Liu et al., 2024): keys per-channel (groups of ``group_size`` tokens), values per-token
    (groups of ``group_size`` channels), a full-precision residual of the most recent tokens.

    Keys are flushed into the quantized part a whole token group at a time, as in the paper. The paper keeps
    no sink tokens; ``n_sink`` is available as an option.
    """

    name = "kivi"
    k_bits: float = 2
    v_bits: float = 2
    group_size: int = 32
    residual: int = 128
    n_sink: int = 0

    def layer_spec(self, layer_idx: int, num_layers: int) -> LayerSpec:
        return LayerSpec(
            k=TensorQuant("affine", self.k_bits, self.group_size, "channel"),
            v=TensorQuant("affine", self.v_bits, self.group_size, "token"),
            n_sink=self.n_sink,
            window=self.residual,
        )


@register_scheme
@dataclass(frozen=True)
class PerToken(Scheme):
    """Per-token affine groups with full-precision attention sinks and a window of recent tokens: kvcompile's own
    preset (not from a paper) for the layout its fastest GPU kernel takes.

    The defaults are 4-bit keys and 2-bit values in one group per head (``group_size=None``), 4 sink and 128 recent
    tokens, no clipping. That is SKVQ's structure without its channel reorder, small groups and keys before RoPE,
    which the GPU pays for (README, "Which layout runs fastest at what quality"). Measured on SmolLM2 (head dim 64):
    +2.3% perplexity at 5.57 bits per element, where ``kivi`` K2V2 costs +15.6% at 5.15. On CUDA with head dim 128
    the Gluon decode kernel serves it, 4.1x faster than fp16 attention at 32k tokens on the H100. Keys at 2 bits in
    whole-head groups lose the model (+463-524%): keep ``k_bits=4``, or use groups of 16-32 channels.
    """

    name = "pertoken"
    k_bits: float = 4
    v_bits: float = 2
    group_size: int | None = None
    k_clip_ratio: float = 1.0
    v_clip_ratio: float = 1.0
    window: int = 128
    n_sink: int = 4

    def layer_spec(self, layer_idx: int, num_layers: int) -> LayerSpec:
        return _per_token_spec(self, reorder=False, pre_rope=False)


@register_scheme
@dataclass(frozen=True)
class NQKV(Scheme):
    """NQKV (Cai et al., 2025): per-block normal-quantile codebooks (NF-k, blockwise absmax scale)."""

    name = "nqkv"
    bits: int = 4
    block_size: int = 64
    window: int = 128
    n_sink: int = 4

    def layer_spec(self, layer_idx: int, num_layers: int) -> LayerSpec:
        q = TensorQuant("nf", self.bits, self.block_size, "token")
        return LayerSpec(k=q, v=q, n_sink=self.n_sink, window=self.window)


@dataclass(frozen=True)
class _PerToken8Bit(Scheme):
    """8 bits per element with one absmax scale per token, for K and V alike (``kind`` says which format)."""

    kind: ClassVar[str] = ""
    window: int = 0
    n_sink: int = 0

    def layer_spec(self, layer_idx: int, num_layers: int) -> LayerSpec:
        q = TensorQuant(self.kind, 8)
        return LayerSpec(k=q, v=q, n_sink=self.n_sink, window=self.window)


@register_scheme
@dataclass(frozen=True)
class Int8(_PerToken8Bit):
    """int8 per token, symmetric absmax scale: the production baseline."""

    name = "int8"
    kind = "int8"


@register_scheme
@dataclass(frozen=True)
class FP8(_PerToken8Bit):
    """fp8 (e4m3) per token with an absmax scale: the production baseline."""

    name = "fp8"
    kind = "fp8"


@register_scheme
@dataclass(frozen=True)
class KVMix(Scheme):
    """KVmix (Li et al., 2025): per-layer K/V bit widths from gradient norms, under a bit budget.

    It needs a calibration profile, which ``kvcompile.calibrate`` will produce; that step does not exist yet.
    """

    name = "kvmix"
    profile: str | None = None

    def __post_init__(self):
        raise NotImplementedError(
            "scheme 'kvmix' needs a calibration profile (per-layer bit widths from kvcompile.calibrate), "
            "and calibration is not implemented yet; use 'kivi' or 'skvq' meanwhile"
        )
