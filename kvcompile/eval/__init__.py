"""Quality evaluation: the teacher-forced perplexity protocol and storage measurement."""

from kvcompile.eval.perplexity import (
    PerplexityResult,
    cache_kwarg_name,
    essay_token_ids,
    essay_windows,
    evaluate_perplexity,
    make_windows,
    output_cache,
    perplexity,
    quanto_cache_factory,
)
from kvcompile.eval.storage import cache_bits_per_element, cache_storage, tensor_storage_bytes

__all__ = [
    "PerplexityResult",
    "cache_bits_per_element",
    "cache_kwarg_name",
    "cache_storage",
    "essay_token_ids",
    "essay_windows",
    "evaluate_perplexity",
    "make_windows",
    "output_cache",
    "perplexity",
    "quanto_cache_factory",
    "tensor_storage_bytes",
]
