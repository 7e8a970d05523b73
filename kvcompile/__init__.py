"""kvcompile: packed low-bit KV caches for PyTorch LLMs.

    import kvcompile
    model = kvcompile.apply(model, scheme="skvq")      # generate/forward keep the KV cache packed
    print(kvcompile.report(model).to_text())           # bytes held per layer, measured from storage
    fast = torch.compile(model, backend="kvcompile")   # or backend=kvcompile.backend(scheme="kivi", ...)
    print(kvcompile.compile_report().to_text())        # what the passes matched, rewrote, and why not
"""

from .api import CacheReport, LayerReport, apply, make_cache, remove, report
from .cache import CacheCapacityError, KVCompileCache, PackedKV
from .passes import CompileReport, backend, compile_report
from .schemes import FP8, KIVI, NQKV, SKVQ, Int8, KVMix, PerToken, Scheme, TensorQuant, get_scheme, scheme_names

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "make_cache", "report", "CacheReport", "LayerReport", "backend", "compile_report",
    "CompileReport",
    "KVCompileCache", "PackedKV", "CacheCapacityError",
    "Scheme", "TensorQuant", "SKVQ", "KIVI", "NQKV", "Int8", "FP8", "KVMix", "PerToken", "get_scheme", "scheme_names",
]
