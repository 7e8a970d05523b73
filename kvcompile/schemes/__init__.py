"""Scheme configs and their registry."""

from .base import LayerSpec, Scheme, TensorQuant, get_scheme, register_scheme, scheme_names
from .schemes import FP8, KIVI, NQKV, SKVQ, Int8, KVMix, PerToken

__all__ = [
    "FP8", "KIVI", "NQKV", "SKVQ", "Int8", "KVMix", "PerToken",
    "LayerSpec", "Scheme", "TensorQuant", "get_scheme", "register_scheme", "scheme_names",
]
