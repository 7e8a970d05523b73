"""Packed KV storage (``PackedKV``) and the transformers cache built on it."""

from .hf import KVCompileCache, PackedLayer
from .packed import CacheCapacityError, PackedKV, bits_per_element

__all__ = ["CacheCapacityError", "KVCompileCache", "PackedKV", "PackedLayer", "bits_per_element"]
