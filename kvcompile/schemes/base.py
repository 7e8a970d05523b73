"""Scheme configs: small frozen dataclasses, a registry by name, JSON round-trip.

A scheme is what a user picks (``"skvq"``, ``"kivi"``, ...). It resolves, per layer, into a
:class:`LayerSpec`: how K and V are quantized (:class:`TensorQuant`), how many leading tokens stay in full
precision (attention sinks) and how many recent tokens (the window). Everything below the scheme layer
(the packed cache, the ops, the kernels) only ever sees a ``LayerSpec``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar

KINDS = ("affine", "nf", "int8", "fp8")
AFFINE_BITS = (1, 1.5, 2, 3, 4, 8)
NF_BITS = (2, 3, 4)
AXES = ("token", "channel")


@dataclass(frozen=True)
class TensorQuant:
    """How one of K or V is stored. See docs/format.md for the exact math.

    kind: ``affine`` (asymmetric min/max groups), ``nf`` (normal-float codebook), ``int8`` or ``fp8``
    (per-token scale). ``group_size`` None means one group spanning the head dim (token axis).
    ``axis="channel"`` groups ``group_size`` tokens of one channel (KIVI keys).
    ``permute``: reorder channels inside each head so that channels of similar range share a group (SKVQ).
    """

    kind: str = "affine"
    bits: float = 2
    group_size: int | None = None
    axis: str = "token"
    clip_ratio: float = 1.0
    permute: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantization kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.kind == "affine" and self.bits not in AFFINE_BITS:
            raise ValueError(
                f"unsupported bits={self.bits} for affine quantization; supported: {', '.join(map(str, AFFINE_BITS))}"
                " (1.5 = ternary)"
            )
        if self.kind == "nf" and self.bits not in NF_BITS:
            raise ValueError(f"unsupported bits={self.bits} for NF quantization; supported: {', '.join(map(str, NF_BITS))}")
        if self.kind in ("int8", "fp8") and self.bits != 8:
            raise ValueError(f"{self.kind} stores 8 bits per element; got bits={self.bits}")
        if self.axis not in AXES:
            raise ValueError(f"unknown axis {self.axis!r}; valid: {', '.join(AXES)}")
        if self.axis == "channel" and (self.kind != "affine" or self.group_size is None):
            raise ValueError("axis='channel' (groups along tokens) needs kind='affine' and an explicit group_size")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.permute and self.axis != "token":
            raise ValueError("permute=True (channel reorder) applies to per-token groups (axis='token') only")

    @property
    def flush(self) -> int:
        """Tokens quantized together: a whole token group for per-channel groups, else one."""
        return self.group_size if self.axis == "channel" else 1

    def group_for(self, head_dim: int) -> int:
        """The group size along channels (token axis) for this head dim, validated."""
        g = head_dim if self.group_size is None or self.axis == "channel" else self.group_size
        if self.axis == "token" and head_dim % g:
            raise ValueError(
                f"group_size={g} does not divide the head dim {head_dim}; choose a divisor of {head_dim}"
            )
        return g


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer's cache stores."""

    k: TensorQuant
    v: TensorQuant
    n_sink: int = 0
    window: int = 0
    k_pre_rope: bool = False  # quantize keys before RoPE (needs the model's rotary frequencies)

    def __post_init__(self):
        if self.n_sink < 0 or self.window < 0:
            raise ValueError(f"n_sink and window must be >= 0, got {self.n_sink}, {self.window}")

    @property
    def k_bits(self) -> float:
        return self.k.bits

    @property
    def v_bits(self) -> float:
        return self.v.bits


_REGISTRY: dict[str, type[Scheme]] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make a scheme available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def scheme_names() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Scheme:
    """Base of every scheme config. Subclasses are frozen dataclasses with flat, user-facing fields."""

    name: ClassVar[str] = ""
    meta_dtype: str = "float16"

    def layer_spec(self, layer_idx: int, num_layers: int) -> LayerSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_specs(self, num_layers: int) -> list[LayerSpec]:
        return [self.layer_spec(i, num_layers) for i in range(num_layers)]

    def replace(self, **overrides: Any) -> Scheme:
        valid = [f.name for f in fields(self)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
            )
        return dataclasses.replace(self, **overrides)

    def describe(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self.name}({opts})"

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.name, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scheme:
        d = dict(d)
        name = d.pop("scheme", None)
        cls = _lookup(name)
        return cls().replace(**d)

    @staticmethod
    def from_json(s: str) -> Scheme:
        return Scheme.from_dict(json.loads(s))


def _lookup(name: str | None) -> type[Scheme]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {', '.join(scheme_names())}")
    return _REGISTRY[name]


def get_scheme(scheme: str | Scheme, **overrides: Any) -> Scheme:
    """Resolve a scheme name or config, applying per-call overrides (``get_scheme("kivi", k_bits=4)``)."""
    if isinstance(scheme, Scheme):
        return scheme.replace(**overrides) if overrides else scheme
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a name or a Scheme config, got {type(scheme).__name__}")
    cfg = _lookup(scheme)()
    return cfg.replace(**overrides) if overrides else cfg
