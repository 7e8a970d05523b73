"""A transformers ``Cache`` whose layers keep K and V packed (``PackedKV``).

Works with any model that uses transformers' cache API (``DynamicCache`` by default), GQA included, on
transformers >= 5.17 (whose layers call ``update(k, v, layer_idx)``) and newer releases (which add
``kwargs=``). This eager path hands attention the dequantized K/V of the valid tokens, so the model's own
attention code (sdpa, eager, ...) runs unchanged; what the cache *holds* between steps is only the packed
storage. The fused path, where attention reads the packed bytes, goes through the kvcompile ops.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..schemes.base import LayerSpec, Scheme, get_scheme
from .packed import CacheCapacityError, PackedKV, bits_per_element, line_capacity

GROW_TOKENS = 64
"""A cache made with max_cache_len=None grows its packed storage in steps of this many tokens."""


class PackedLayer(CacheLayerMixin):
    """One attention layer's packed K and V."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, spec: LayerSpec, *, meta_dtype: str = "float16", max_cache_len: int | None = None,
                 packed_attention: bool = False, rope_inv_freq: torch.Tensor | None = None,
                 full_precision_prefill: bool = True):
        super().__init__()
        if spec.k_pre_rope and rope_inv_freq is None:
            raise ValueError(
                "this scheme quantizes keys before RoPE (pre_rope=True), which needs the model's rotary "
                "frequencies: build the cache from the model (kvcompile.make_cache(model, ...) or "
                "kvcompile.apply(model, ...)), or pass pre_rope=False"
            )
        self.rope_inv_freq = rope_inv_freq if spec.k_pre_rope else None
        self.packed_attention = packed_attention
        self.full_precision_prefill = full_precision_prefill
        self._empty = True  # no token written yet: the next update is the prefill (a Python flag, no device read)
        self.spec = spec
        self.meta_dtype = meta_dtype
        self.max_cache_len = max_cache_len
        self.k: PackedKV | None = None
        self.v: PackedKV | None = None
        self._host_stale = False

    def __repr__(self):
        return f"PackedLayer(k={self.k!r}, v={self.v!r})" if self.is_initialized else "PackedLayer(empty)"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        # the storage rounded up to whole 128-byte code lines (the decode kernel's fastest read); update() holds
        # the cache to max_cache_len itself
        cap = line_capacity(self.max_cache_len or 0, self.spec.n_sink, (self.spec.k, d), (self.spec.v, dv))
        common = dict(
            capacity=cap,
            n_sink=self.spec.n_sink,
            window=self.spec.window,
            dtype=key_states.dtype,
            device=key_states.device,
            meta_dtype=self.meta_dtype,
        )
        self.k = PackedKV.empty(b, h, d, self.spec.k, rope_inv_freq=self.rope_inv_freq, **common)
        self.v = PackedKV.empty(b, value_states.shape[1], dv, self.spec.v, **common)
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prefill, self._empty = self._empty, False
        if torch.compiler.is_compiling():
            k, v = self._compiled_update(key_states, value_states)
            return (key_states, value_states) if prefill and self.full_precision_prefill else (k, v)
        self._refresh_host_counts()
        t = key_states.shape[-2]
        if self.max_cache_len is None:
            self.k = self._grown(self.k, t)
            self.v = self._grown(self.v, t)
        elif self.k.length + t > self.max_cache_len:
            raise CacheCapacityError(
                f"kvcompile cache capacity exceeded: this layer holds at most max_cache_len={self.max_cache_len} "
                f"tokens and holds {self.k.length}, and this update adds {t}; create the cache with a larger "
                "max_cache_len, or max_cache_len=None to grow on demand"
            )
        if key_states.is_cuda:  # the quantize-on-write kernel, one launch for K and V where it covers both
            from ..ops import write_pair

            write_pair(self.k, key_states, self.v, value_states)
        else:
            self.k.append(key_states)
            self.v.append(value_states)
        if prefill and self.full_precision_prefill:
            # the call that starts the cache attends to its own K/V as computed (KIVI and transformers'
            # QuantizedCache do the same); the storage holds them packed for every later call
            return key_states, value_states
        if self.packed_attention:  # attention reads the packed storage (attn_implementation="kvcompile")
            return self.k, self.v
        return self.k.dequantize(), self.v.dequantize()

    def _compiled_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """The update as a compiled graph sees it: two ``kvcompile::quantize_kv_write_`` calls on the inner
        tensors of preallocated storage; the valid length stays in the ``counts`` tensors (no host read, so
        no specialization on the length and no recompile per token)."""
        if self.max_cache_len is None:
            raise RuntimeError(
                "a kvcompile cache compiled with torch.compile needs a fixed capacity: create it with "
                "max_cache_len=N (kvcompile.apply(model, scheme, max_cache_len=N) or compile=True)"
            )
        if not self.packed_attention:
            raise RuntimeError(
                "a kvcompile cache under torch.compile hands attention the packed storage: use "
                "packed_attention=True (kvcompile.apply(..., packed_attention=True) or compile=True)"
            )
        from ..ops import write  # ops imports cache.packed: import here, not at module level

        write(self.k, key_states)
        write(self.v, value_states)
        self._host_stale = True  # eager readers re-read the counts (see _refresh_host_counts)
        return self.k, self.v

    def _refresh_host_counts(self) -> None:
        """After compiled steps wrote the counts in place, drop the PackedKVs' host-side mirrors of them."""
        if self._host_stale and self.is_initialized:
            self.k._host = None
            self.v._host = None
        self._host_stale = False

    def early_initialization(self, batch: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                             device: torch.device | str, v_head_dim: int | None = None) -> None:
        """Allocate the packed storage now, outside any compiled region (a compiled prefill must not allocate)."""
        k = torch.empty(batch, num_heads, 0, head_dim, dtype=dtype, device=device)
        v = torch.empty(batch, num_heads, 0, v_head_dim or head_dim, dtype=dtype, device=device)
        self.lazy_initialization(k, v)

    @staticmethod
    def _grown(p: PackedKV, t: int) -> PackedKV:
        need = p.codes_rows_after(t)
        if need <= p.codes.shape[2]:
            return p
        step = max(GROW_TOKENS, p.quant.flush)
        return p.resized(p.capacity - p.codes.shape[2] + -(-need // step) * step)

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens held. Eagerly a Python int (from the host-side mirror, no device sync); under torch.compile
        a 0-dim int64 tensor read from the counts, as transformers' StaticLayer returns its cumulative_length,
        so that positions are computed in the graph and the length is never specialized on."""
        if not self.is_initialized:
            return 0
        if torch.compiler.is_compiling():
            return self.k.counts.sum()
        self._refresh_host_counts()
        return self.k.length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        if torch.compiler.is_compiling() and self.is_initialized:
            # static mask width: the storage capacity (mask columns are positions; the attention op ignores
            # columns past the valid length), so the mask shape does not change as the sequence grows
            return max(self.k.shape[2], self.v.shape[2]), 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self) -> None:
        self.k = self.v = None
        self.is_initialized = False
        self._empty = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._refresh_host_counts()
            self.k = self.k.select_batch(beam_idx)
            self.v = self.v.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.k.shape[0]
            self.reorder_cache(torch.arange(b).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a packed kvcompile cache cannot be cropped (quantized tokens cannot be un-quantized); "
            "assisted/speculative decoding needs a full-precision cache"
        )

    def offload(self):
        raise NotImplementedError("a packed kvcompile cache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("a packed kvcompile cache does not support offloading")

    # ------------------------------------------------------------------ what it holds
    def storage_nbytes(self) -> int:
        self._refresh_host_counts()
        return 0 if not self.is_initialized else self.k.storage_nbytes() + self.v.storage_nbytes()

    def full_precision_nbytes(self) -> int:
        """Bytes the same tokens take in a plain cache of the model's dtype."""
        if not self.is_initialized:
            return 0
        self._refresh_host_counts()
        return sum(p.shape[0] * p.shape[1] * p.head_dim * p.length * p.kv_dtype.itemsize for p in (self.k, self.v))


class KVCompileCache(Cache):
    """A transformers Cache of ``PackedLayer``s, one per decoder layer, built from a scheme.

    ``max_cache_len=None`` grows the packed storage on demand; an int preallocates it and raises
    ``CacheCapacityError`` when exceeded. ``packed_attention=True`` hands attention the ``PackedKV`` tensors
    themselves, for a model whose ``attn_implementation`` is ``"kvcompile"`` (see ``kvcompile.attention``);
    otherwise attention gets the dequantized K/V and any attention implementation works.

    ``full_precision_prefill=True`` (default): the first update of a layer (the prefill, or the first chunk of
    a chunked prefill) hands attention the K/V it was given, unquantized, as KIVI and transformers'
    ``QuantizedCache`` do, and as the torch.compile backend's concatenation route does; every later call
    attends over the packed cache. ``False`` makes the prefill attend over its own quantized K/V too.
    """

    def __init__(self, config, scheme: str | Scheme = "skvq", *, max_cache_len: int | None = None,
                 packed_attention: bool = False, rope_inv_freq: torch.Tensor | None = None,
                 full_precision_prefill: bool = True, **overrides):
        self.scheme = get_scheme(scheme, **overrides)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = text_config.num_hidden_layers
        layers = [
            PackedLayer(spec, meta_dtype=self.scheme.meta_dtype, max_cache_len=max_cache_len,
                        packed_attention=packed_attention, rope_inv_freq=rope_inv_freq,
                        full_precision_prefill=full_precision_prefill)
            for spec in self.scheme.layer_specs(num_layers)
        ]
        super().__init__(layers=layers)

    def early_initialization(self, batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                             device: torch.device | str) -> None:
        """Allocate every layer's packed storage now (needs ``max_cache_len``): before a compiled call, which must
        not allocate it inside its graph."""
        for layer in self.layers:
            if not layer.is_initialized:
                layer.early_initialization(batch_size, num_heads, head_dim, dtype, device)

    def storage_nbytes(self) -> int:
        """Bytes held by every layer's packed storage (measured from the tensors)."""
        return sum(layer.storage_nbytes() for layer in self.layers)

    def full_precision_nbytes(self) -> int:
        return sum(layer.full_precision_nbytes() for layer in self.layers)

    def bits_per_element(self) -> float:
        """Average stored bits per cached K/V element, metadata, sink and window included."""
        packed = [p for layer in self.layers if layer.is_initialized for p in (layer.k, layer.v)]
        return bits_per_element(*packed)
