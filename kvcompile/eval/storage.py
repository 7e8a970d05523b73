"""Stored bits per K/V element of a cache, measured from the tensors it holds.

Measured, never computed from a formula: the bytes are the sizes of the tensors the cache keeps
(packed codes, scales, zero points / shifts, full-precision residual), recursing into tensor
subclasses (quanto's ``WeightQBitsTensor`` -> ``PackedTensor`` -> ``uint8``) through
``__tensor_flatten__``, and from a torch.compile-rewritten cache's handles to the packed storage they stand
for; the element count is the number of logical K and V elements they represent.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["tensor_storage_bytes", "cache_bits_per_element", "cache_storage"]

logger = logging.getLogger(__name__)


def tensor_storage_bytes(t) -> int:
    """Bytes held by ``t``: plain tensors ``numel * element_size``; PackedKV its ``storage_nbytes()``; other wrapper
    subclasses the sum over their inner tensors (``__tensor_flatten__``), recursively."""
    if t is None:
        return 0
    if callable(getattr(t, "storage_nbytes", None)):  # PackedKV: its allocations (padded scale rows included)
        return t.storage_nbytes()
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        if t.numel() > 1 and all(s == 0 for s in t.stride()):  # a handle from the kvcompile backend?
            from kvcompile.passes.rewrite import packed_storage

            packed = packed_storage(t)
            if packed is not None:  # it holds no values: its packed storage does
                return packed.storage_nbytes()
        return t.numel() * t.element_size()
    return 0


def _numel(t) -> int:
    return 0 if t is None or not isinstance(t, torch.Tensor) else t.numel()


def cache_storage(cache) -> tuple[int, int] | None:
    """``(stored_bytes, n_kv_elements)`` over all layers of a transformers cache, or None when its
    layout is not known here. Handles full-precision layers (``keys``/``values``) and transformers'
    ``QuantizedLayer`` (``_quantized_keys``/``_quantized_values`` plus the full-precision residual)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    nbytes = 0
    nelem = 0
    for layer in layers:
        parts = []
        if hasattr(layer, "_quantized_keys"):
            parts += [getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)]
        parts += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for t in parts:
            nbytes += tensor_storage_bytes(t)
            nelem += _numel(t)
    if nelem == 0:
        return None
    return nbytes, nelem


def cache_bits_per_element(cache) -> tuple[float | None, bool]:
    """``(bits, estimated)``: average stored bits per K/V element of ``cache``.

    A cache that reports its own (``cache.bits_per_element()``, the kvcompile cache) is asked; otherwise
    the layers' tensors are measured (:func:`cache_storage`). ``(None, False)`` when neither works.
    """
    own = getattr(cache, "bits_per_element", None)
    if callable(own):
        try:
            return float(own()), False
        except Exception as e:  # a cache that cannot report is not worth failing an evaluation for
            logger.warning("%s.bits_per_element() failed: %s", type(cache).__name__, e)
    try:
        measured = cache_storage(cache)
    except Exception as e:
        logger.warning("could not measure the storage of %s: %s", type(cache).__name__, e)
        measured = None
    if measured is None:
        return None, False
    nbytes, nelem = measured
    return 8.0 * nbytes / nelem, False
