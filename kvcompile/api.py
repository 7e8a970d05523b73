"""Entry points: ``apply``, ``remove``, ``make_cache``, ``report``. No math here."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from .cache.hf import KVCompileCache
from .schemes.base import Scheme, get_scheme

log = logging.getLogger("kvcompile")

_STATE_ATTR = "_kvcompile_state"


@dataclass
class _State:
    scheme: Scheme
    max_cache_len: int | None
    cache_kw: str
    packed_attention: bool = False
    full_precision_prefill: bool = True
    compiled: bool = False
    previous_attn: Any = None
    rope_inv_freq: Any = None
    handle: Any = None
    last_cache: Any = None  # the newest cache this model made (held until the next one, or remove())
    warned: set = field(default_factory=set)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _head_dims(config) -> tuple[int, int]:
    c = _text_config(config)
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return d, d


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's rotary inverse frequencies (from its ``*RotaryEmbedding`` module), or None.

    Used to quantize keys before RoPE (``pre_rope``): the cache un-rotates keys by position on write and
    rotates them back on read, in transformers' rotate-half convention.
    """
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and type(module).__name__.endswith("RotaryEmbedding"):
            return inv.detach().float()
    return None


def make_cache(model_or_config, scheme: str | Scheme = "skvq", *, max_cache_len: int | None = None,
               packed_attention: bool = False, full_precision_prefill: bool = True,
               **overrides) -> KVCompileCache:
    """A fresh packed cache for this model (or config). Pass it as the model's cache argument.

    ``packed_attention=True`` needs a model whose attention implementation is "kvcompile" (``apply`` sets it).
    ``full_precision_prefill`` (default True): the prefill attends to its own K/V unquantized; later calls
    attend over the packed cache (see ``KVCompileCache``).
    """
    config = getattr(model_or_config, "config", model_or_config)
    rope = rope_inv_freq(model_or_config) if isinstance(model_or_config, torch.nn.Module) else None
    return KVCompileCache(config, scheme, max_cache_len=max_cache_len, packed_attention=packed_attention,
                          rope_inv_freq=rope, full_precision_prefill=full_precision_prefill, **overrides)


def apply(model: torch.nn.Module, scheme: str | Scheme = "skvq", *, max_cache_len: int | None = None,
          packed_attention: bool | None = None, compile: bool = False, compile_options: dict | None = None,
          full_precision_prefill: bool = True, **overrides) -> torch.nn.Module:
    """Set ``model`` up so that ``generate`` and forward calls keep their KV cache packed.

    ``scheme`` is a name (``kvcompile.scheme_names()``) or a config object (``kvcompile.SKVQ(k_bits=4)``);
    keyword overrides change single options (``apply(model, "kivi", k_bits=4)``). Forward calls that start a
    cache (``use_cache=True`` with no cache, or an empty ``DynamicCache`` as ``generate`` makes) get a
    ``KVCompileCache``; a cache that is already packed is used as is. Returns the same model.

    ``packed_attention``: attention reads the packed storage through ``kvcompile::dequant_attention`` (the
    fused Triton kernel on CUDA) instead of getting dequantized K/V; it sets the model's attention
    implementation to "kvcompile" (registered through transformers' ``AttentionInterface``). None (default)
    turns it on for models on a CUDA device, where the fused kernel pays; on CPU both paths compute the same.

    ``full_precision_prefill`` (default True): the call that starts a cache (the prefill) attends to its own
    K/V unquantized, as KIVI and transformers' ``QuantizedCache`` do; the cache stores them packed and every
    later call (decode steps, later prefill chunks) attends over the packed cache. False makes the prefill
    attend over its own quantized K/V as well.

    ``compile=True``: also compile the model's forward with the kvcompile torch.compile backend
    (``kvcompile.backend(scheme)``; ``compile_options`` go to ``torch.compile``, e.g. ``{"fullgraph": True}``).
    It implies ``packed_attention=True`` and a fixed capacity (``max_cache_len``, default the model's
    ``max_position_embeddings``), and the cache's storage is allocated before the first compiled call, so a
    decode step compiles once (static storage, the valid length in a tensor) and graph breaks are errors when
    ``fullgraph`` is set. The compiled forward is set on this model instance (``model.forward``); ``remove``
    puts the class's forward back.

    This installs a forward pre-hook (the ``nn.Module`` hook API): no function of torch or transformers is
    replaced. ``kvcompile.remove(model)`` undoes it.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        st = getattr(model, _STATE_ATTR)
        raise RuntimeError(
            f"kvcompile is already applied to this model (scheme {st.scheme.name!r}); "
            "call kvcompile.remove(model) first to change the scheme"
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(_text_config(config), "num_hidden_layers"):
        raise TypeError(
            "kvcompile.apply needs a transformers model that uses transformers' cache API "
            f"(got {type(model).__name__}, which has no config.num_hidden_layers)"
        )
    cfg = get_scheme(scheme, **overrides)
    # fail now, not at the first forward, when the scheme does not fit the model's head size
    head_dim_k, head_dim_v = _head_dims(config)
    for spec in cfg.layer_specs(_text_config(config).num_hidden_layers):
        spec.k.group_for(head_dim_k)
        spec.v.group_for(head_dim_v)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    if compile:
        if packed_attention is False:
            raise ValueError("compile=True reads the packed storage in attention: packed_attention cannot be False")
        packed_attention = True
        if max_cache_len is None:
            max_cache_len = getattr(_text_config(config), "max_position_embeddings", None)
            if not max_cache_len:
                raise ValueError("compile=True needs a fixed capacity: pass max_cache_len=N")
    if packed_attention is None:
        packed_attention = next(model.parameters()).device.type == "cuda"
    state = _State(scheme=cfg, max_cache_len=max_cache_len, cache_kw=cache_kw, packed_attention=packed_attention,
                   compiled=compile, rope_inv_freq=rope_inv_freq(model),
                   full_precision_prefill=full_precision_prefill)
    if any(spec.k_pre_rope for spec in cfg.layer_specs(1)) and state.rope_inv_freq is None:
        raise ValueError(
            f"scheme {cfg.name!r} with pre_rope=True needs a model with rotary embeddings (a *RotaryEmbedding "
            f"module with inv_freq); {type(model).__name__} has none: pass pre_rope=False"
        )
    if packed_attention:
        from .attention import register

        state.previous_attn = config._attn_implementation
        model.set_attn_implementation(register())
    state.handle = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    setattr(model, _STATE_ATTR, state)
    if compile:
        from .passes import backend

        # the forward of this instance (hooks stay eager: the cache is made and allocated outside the graph)
        model.forward = torch.compile(model.forward, backend=backend(cfg), **(compile_options or {}))
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: later forward calls use the model's default cache again."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("kvcompile is not applied to this model")
    state.handle.remove()
    if state.compiled and "forward" in vars(model):
        del model.forward
    if state.packed_attention:
        model.set_attn_implementation(state.previous_attn)
    delattr(model, _STATE_ATTR)
    return model


def _pre_hook(module, args, kwargs):
    state: _State = getattr(module, _STATE_ATTR)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(_text_config(module.config), "use_cache", True)
    if not use_cache:
        return None
    given = [k for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
    current = kwargs[given[0]] if given else None
    if isinstance(current, KVCompileCache):
        return None
    if current is None or (type(current) is DynamicCache and current.get_seq_length() == 0):
        for k in ("cache", "past_key_values"):
            kwargs.pop(k, None)
        cache = KVCompileCache(module.config, state.scheme, max_cache_len=state.max_cache_len,
                               packed_attention=state.packed_attention, rope_inv_freq=state.rope_inv_freq,
                               full_precision_prefill=state.full_precision_prefill)
        if state.compiled:
            _allocate(module, cache, args, kwargs)
        state.last_cache = cache
        kwargs[state.cache_kw] = cache
        return args, kwargs
    kind = type(current).__name__
    if kind not in state.warned:
        state.warned.add(kind)
        log.warning("kvcompile: a %s was passed to a model set up by kvcompile.apply; it is used as given "
                    "(not packed). Pass no cache, or kvcompile.make_cache(model), to keep the KV cache packed.", kind)
    return None


def _allocate(model, cache: KVCompileCache, args, kwargs) -> None:
    """Allocate the cache's storage now, outside the compiled forward (a compiled call must not allocate it)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        return  # the layers allocate lazily at the first update
    c = _text_config(model.config)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim, _ = _head_dims(model.config)
    p = next(model.parameters())
    cache.early_initialization(ids.shape[0], heads, head_dim, p.dtype, p.device)


# ---------------------------------------------------------------------- report

@dataclass(frozen=True)
class LayerReport:
    layer: int
    scheme: str
    k_bits: float
    v_bits: float
    n_sink: int
    window: int
    tokens: int
    packed_bytes: int
    full_precision_bytes: int

    @property
    def ratio(self) -> float:
        return self.full_precision_bytes / self.packed_bytes if self.packed_bytes else float("nan")


@dataclass(frozen=True)
class CacheReport:
    scheme: str
    options: str
    layers: tuple[LayerReport, ...]

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.layers)

    @property
    def full_precision_bytes(self) -> int:
        return sum(r.full_precision_bytes for r in self.layers)

    @property
    def ratio(self) -> float:
        return self.full_precision_bytes / self.packed_bytes if self.packed_bytes else float("nan")

    def to_text(self) -> str:
        lines = [
            f"kvcompile cache: {self.options}",
            f"{'layer':>5} {'K bits':>6} {'V bits':>6} {'sink':>4} {'window':>6} {'tokens':>6} "
            f"{'packed bytes':>12} {'fp bytes':>12} {'ratio':>6}",
        ]
        for r in self.layers:
            lines.append(
                f"{r.layer:>5} {r.k_bits:>6g} {r.v_bits:>6g} {r.n_sink:>4} {r.window:>6} {r.tokens:>6} "
                f"{r.packed_bytes:>12,} {r.full_precision_bytes:>12,} {r.ratio:>6.2f}"
            )
        lines.append(
            f"{'total':>5} {'':>6} {'':>6} {'':>4} {'':>6} {'':>6} {self.packed_bytes:>12,} "
            f"{self.full_precision_bytes:>12,} {self.ratio:>6.2f}"
        )
        return "\n".join(lines)


def report(model_or_cache) -> CacheReport:
    """Per layer: scheme, bits, tokens held, bytes held (measured from storage) against full precision.

    Takes a ``KVCompileCache``, or a model set up by ``apply`` (reports the newest cache it made).
    """
    cache = model_or_cache
    if not isinstance(cache, KVCompileCache):
        state = getattr(model_or_cache, _STATE_ATTR, None)
        if state is None:
            raise TypeError("kvcompile.report takes a KVCompileCache or a model set up by kvcompile.apply")
        cache = state.last_cache
        if cache is None:
            raise RuntimeError("this model has not made a kvcompile cache yet (run a forward or generate first)")
    rows = []
    for i, layer in enumerate(cache.layers):
        rows.append(
            LayerReport(
                layer=i,
                scheme=cache.scheme.name,
                k_bits=layer.spec.k_bits,
                v_bits=layer.spec.v_bits,
                n_sink=layer.spec.n_sink,
                window=layer.spec.window,
                tokens=int(layer.get_seq_length()),
                packed_bytes=layer.storage_nbytes(),
                full_precision_bytes=layer.full_precision_nbytes(),
            )
        )
    return CacheReport(scheme=cache.scheme.name, options=cache.scheme.describe(), layers=tuple(rows))
