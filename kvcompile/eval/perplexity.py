"""The quality protocol: teacher-forced perplexity through a KV cache.

Protocol (what every quality number in this project means):

1. Tokenize the Paul Graham essays (:func:`kvcompile.assets.paul_graham_essays`) with the model's
   tokenizer (its default special tokens; SmolLM2's adds none) into one long id sequence.
2. Cut ``n_windows`` windows of ``length`` tokens spread evenly over it (:func:`make_windows`).
3. For each window, with a fresh cache: one forward over the first ``prefill`` tokens, then the rest of
   the window teacher-forced through the cache in chunks of ``chunk`` tokens, every forward receiving the
   cache of the previous one. Only the decode part is scored: the logits of the last prefill token
   predict token ``prefill``, ..., so targets are positions ``prefill .. length-1``
   (``length - prefill`` targets per window). The prompt is therefore read back from the (possibly
   quantized) cache for every scored token, which is what a KV-cache scheme changes.
4. Perplexity = ``exp(mean NLL)`` over all scored tokens of all windows.

transformers versions: 5.17 names the cache argument of ``forward`` ``past_key_values`` and returns it
as ``output.past_key_values``; 5.24 names both ``cache`` (``past_key_values`` still works there with a
deprecation warning). :func:`cache_kwarg_name` inspects the forward signature once per model class.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "make_windows",
    "essay_token_ids",
    "essay_windows",
    "perplexity",
    "evaluate_perplexity",
    "PerplexityResult",
    "quanto_cache_factory",
    "cache_kwarg_name",
    "output_cache",
]


# ----------------------------------------------------------------------------------------------- data


def make_windows(token_ids, n_windows: int = 8, length: int = 2048) -> torch.LongTensor:
    """``n_windows`` windows of ``length`` tokens spread evenly over ``token_ids``.

    Window ``i`` starts at ``round(i * (N - length) / (n_windows - 1))`` (Python ``round``), so the first
    starts at 0 and the last ends at ``N``; a single window starts at 0. Windows overlap when
    ``n_windows * length > N``. ``token_ids`` may be a list, a 1-D tensor or a ``[1, N]`` tensor.
    Returns a ``LongTensor[n_windows, length]``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (or [1, N]); got shape {tuple(ids.shape)}")
    if n_windows < 1 or length < 1:
        raise ValueError(f"n_windows and length must be >= 1; got {n_windows}, {length}")
    n = ids.numel()
    if n < length:
        raise ValueError(f"text has {n} tokens, fewer than one window of {length}")
    if n_windows == 1:
        starts = [0]
    else:
        starts = [round(i * (n - length) / (n_windows - 1)) for i in range(n_windows)]
    return torch.stack([ids[s : s + length] for s in starts])


def essay_token_ids(tokenizer) -> torch.LongTensor:
    """The Paul Graham essays tokenized as one 1-D sequence (tokenizer defaults for special tokens)."""
    from kvcompile.assets import paul_graham_essays

    text = paul_graham_essays()
    # One long call; silence the "sequence longer than model max length" warning, it does not apply here.
    tok_logger = logging.getLogger("transformers.tokenization_utils_base")
    level = tok_logger.level
    tok_logger.setLevel(logging.ERROR)
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        tok_logger.setLevel(level)
    return torch.as_tensor(ids, dtype=torch.long)


def essay_windows(tokenizer, n_windows: int = 8, length: int = 2048) -> torch.LongTensor:
    """:func:`make_windows` over :func:`essay_token_ids` (the standard evaluation input)."""
    return make_windows(essay_token_ids(tokenizer), n_windows=n_windows, length=length)


# ---------------------------------------------------------------------------- transformers versions


@functools.lru_cache(maxsize=None)
def _forward_params(forward_owner: type) -> tuple[frozenset, bool]:
    sig = inspect.signature(forward_owner.forward)
    names = frozenset(sig.parameters)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def cache_kwarg_name(model) -> str:
    """Name of the cache argument of ``model.forward``: ``"cache"`` (transformers >= 5.2x) or
    ``"past_key_values"`` (5.17 and hand-written models in that style)."""
    names, _ = _forward_params(type(_unwrapped(model)))
    if "cache" in names:
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    raise TypeError(
        f"{type(_unwrapped(model)).__name__}.forward takes neither `cache` nor `past_key_values`; cannot pass a KV cache"
    )


def _accepts(model, name: str) -> bool:
    names, _ = _forward_params(type(_unwrapped(model)))
    return name in names


def _unwrapped(model):
    """The module ``torch.compile`` wrapped (its ``OptimizedModule`` forwards ``*args, **kwargs``)."""
    return getattr(model, "_orig_mod", model)


def output_cache(output):
    """The cache returned by a forward, whichever name this transformers version uses (or None)."""
    for name in ("cache", "past_key_values"):  # "cache" first: 5.24 aliases past_key_values with a warning
        # ModelOutput is a dict holding only its non-None fields; 5.24's `past_key_values` alias is not a key
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def _logits(output) -> torch.Tensor:
    return output["logits"] if isinstance(output, dict) else output.logits


# -------------------------------------------------------------------------------------------- metric


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    window_ppl: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # average stored bits per K/V element of each window's cache at its end (None where not measurable)
    bits_per_element: float | None = None
    bits_estimated: bool = False

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(target) for logits ``[T, V]`` and targets ``[T]``, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).sum()


def evaluate_perplexity(
    model,
    windows: torch.Tensor,
    cache_factory: Callable[[], object] | None = None,
    prefill: int = 1024,
    chunk: int = 64,
    progress: bool = True,
    measure_bits: bool = True,
) -> PerplexityResult:
    """:func:`perplexity` with details: per-window perplexity, time, and the stored bits per K/V element
    of each window's final cache (see :func:`kvcompile.eval.storage.cache_bits_per_element`)."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() == 1:
        windows = windows.unsqueeze(0)
    n_win, length = windows.shape
    if not 1 <= prefill < length:
        raise ValueError(f"need 1 <= prefill < window length; got prefill={prefill}, length={length}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")

    cache_name = cache_kwarg_name(model)
    keep_kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    use_cache_kw = {"use_cache": True} if _accepts(model, "use_cache") else {}
    device = next(model.parameters()).device
    n_decode_inputs = length - 1 - prefill  # tokens prefill .. length-2 are fed; token length-1 is only a target
    n_chunks = math.ceil(n_decode_inputs / chunk)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_win * (1 + n_chunks), desc="perplexity", unit="fwd", leave=False)

    from kvcompile.eval.storage import cache_bits_per_element

    was_training = model.training
    model.eval()
    nll_total = 0.0
    window_ppl: list[float] = []
    bits: list[float] = []
    estimated = False
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for w in range(n_win):
                ids = windows[w].to(device).unsqueeze(0)
                cache = cache_factory() if cache_factory is not None else None
                kw = {cache_name: cache} if cache is not None else {}
                out = model(input_ids=ids[:, :prefill], **kw, **use_cache_kw, **keep_kw)
                returned = output_cache(out)
                cache = returned if returned is not None else cache
                if cache is None:
                    raise RuntimeError("the model returned no cache; cannot continue the window through a cache")
                # logits of the last prefill token predict token `prefill`
                nll = _nll_sum(_logits(out)[0, -1:], ids[0, prefill : prefill + 1])
                if bar is not None:
                    bar.set_postfix(window=f"{w + 1}/{n_win}")
                    bar.update(1)
                for start in range(prefill, length - 1, chunk):
                    stop = min(start + chunk, length - 1)
                    out = model(input_ids=ids[:, start:stop], **{cache_name: cache}, **use_cache_kw)
                    returned = output_cache(out)
                    if returned is not None:
                        cache = returned
                    # inputs start..stop-1 predict targets start+1..stop
                    nll = nll + _nll_sum(_logits(out)[0], ids[0, start + 1 : stop + 1])
                    if bar is not None:
                        bar.update(1)
                nll = float(nll)
                nll_total += nll
                window_ppl.append(math.exp(nll / (length - prefill)))
                if measure_bits:
                    b, est = cache_bits_per_element(cache)
                    if b is not None:
                        bits.append(b)
                        estimated = estimated or est
                logger.debug("window %d/%d: ppl %.4f", w + 1, n_win, window_ppl[-1])
                del cache, out
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    n_tokens = n_win * (length - prefill)
    return PerplexityResult(
        ppl=math.exp(nll_total / n_tokens),
        nll_sum=nll_total,
        n_tokens=n_tokens,
        window_ppl=window_ppl,
        seconds=time.perf_counter() - t0,
        bits_per_element=(sum(bits) / len(bits)) if bits else None,
        bits_estimated=estimated,
    )


def perplexity(
    model,
    windows: torch.Tensor,
    cache_factory: Callable[[], object] | None = None,
    prefill: int = 1024,
    chunk: int = 64,
    progress: bool = True,
) -> float:
    """Teacher-forced decode perplexity of ``model`` over ``windows`` (``LongTensor[n, length]``).

    Per window: one forward over ``windows[:, :prefill]`` with a cache, then the remaining tokens in
    chunks of ``chunk`` through that cache; scored are the ``length - prefill`` targets at positions
    ``prefill .. length-1``. Returns ``exp(mean NLL)`` over all windows.

    ``cache_factory``: zero-argument callable returning a fresh transformers ``Cache``, called once per
    window; ``None`` lets the model create its own (``DynamicCache``).
    """
    return evaluate_perplexity(
        model, windows, cache_factory=cache_factory, prefill=prefill, chunk=chunk, progress=progress,
        measure_bits=False,
    ).ppl


# ---------------------------------------------------------------------------------- quanto baseline


def quanto_cache_factory(
    model,
    bits: int,
    axis_key: int = 0,
    axis_value: int = 0,
    q_group_size: int = 64,
    residual_length: int = 128,
) -> Callable[[], object]:
    """A factory of transformers ``QuantizedCache(backend="quanto", ...)`` for ``model``.

    The defaults are transformers' own (``axis_key=0``, ``axis_value=0``, ``q_group_size=64``,
    ``residual_length=128``). In quanto, ``axis=0`` groups ``q_group_size`` consecutive elements of the
    flattened ``[B, H, T, D]`` tensor (with head dim 64: one group per token and head, i.e. per-token),
    ``axis=-1`` groups along the other dims per channel (KIVI-style per-channel for keys).
    """
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        raise ImportError(
            "the quanto KV-cache baseline needs optimum-quanto: `pip install optimum-quanto` "
            "(or `pip install kvcompile[bench]`)"
        )
    from transformers.cache_utils import QuantizedCache

    config = model.config
    kwargs = dict(nbits=bits, axis_key=axis_key, axis_value=axis_value, q_group_size=q_group_size,
                  residual_length=residual_length)

    def factory():
        return QuantizedCache(backend="quanto", config=config, **kwargs)

    factory()  # fail now (bad bits/axis, unsupported model) rather than inside the evaluation loop
    return factory
