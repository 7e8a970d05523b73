"""PackedKV: one layer's K (or V) held packed, as a tensor subclass.

Layout and math: docs/format.md. In short, the tokens live in three parts, in sequence order: full-precision
sink tokens, a packed quantized middle (codes + scale/zero, preallocated to a capacity) and a full-precision
window of recent tokens, held as a ring (window token j at row ``(n_quant + j) % window.shape[2]``, so an append
moves no stored row). ``append`` is quantize-on-write: per-token layouts quantize every token as it arrives (the codes
of the window's tokens sit ahead of ``n_quant``, so a token leaving the window costs nothing); per-channel layouts
(KIVI keys) quantize a token group as it leaves the window. ``dequantize`` gives back the logical ``[B, H, L, D]``
tensor.

The subclass follows torchao's pattern (``tensor_data_names`` / ``tensor_attribute_names``, flatten/unflatten,
an op table) without depending on torchao. Its logical shape is ``[B, H, capacity, D]``: the storage extent,
which is static, so that a compiled decode step does not recompile as the sequence grows; the number of valid
tokens lives in the ``counts`` tensor ``[n_sink_filled, n_quant, n_window]``. Storage never grows in place:
``resized`` returns a larger copy (the transformers cache layer uses it to grow on demand). Any aten op without a rule raises
``NotImplementedError`` naming the op: nothing falls back to wrong numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from .. import quant
from ..schemes.base import TensorQuant

aten = torch.ops.aten

class CacheCapacityError(ValueError):
    """Raised when an append would exceed a fixed-capacity PackedKV."""


_META_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _meta_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _META_DTYPES:
        raise ValueError(f"unsupported meta_dtype {name!r}; valid: {', '.join(_META_DTYPES)}")
    return _META_DTYPES[name]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class PackedKV(torch.Tensor):
    tensor_data_names = ("codes", "scale", "zero", "sink", "window", "perm", "counts", "rope")
    tensor_attribute_names = ("quant", "head_dim", "n_sink", "window_size", "kv_dtype")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def __new__(cls, codes, scale, zero, sink, window, perm, counts, rope, quant, head_dim, n_sink, window_size,
                kv_dtype):
        b, h = sink.shape[:2]
        capacity = n_sink + codes.shape[2] + window_size
        return torch.Tensor._make_wrapper_subclass(
            cls, (b, h, capacity, head_dim), dtype=kv_dtype, device=sink.device, requires_grad=False
        )

    def __init__(self, codes, scale, zero, sink, window, perm, counts, rope, quant, head_dim, n_sink, window_size,
                 kv_dtype):
        self.codes = codes
        self.scale = scale
        self.zero = zero
        self.sink = sink
        self.window = window
        self.perm = perm
        self.counts = counts
        self.rope = rope
        self.quant = quant
        self.head_dim = head_dim
        self.n_sink = n_sink
        self.window_size = window_size
        self.kv_dtype = kv_dtype
        # host-side mirror of ``counts``, so that eager appends need no device sync
        self._host = None

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        head_dim: int,
        quant: TensorQuant,
        *,
        capacity: int,
        n_sink: int = 0,
        window: int = 0,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        meta_dtype: str | torch.dtype = "float16",
        rope_inv_freq: torch.Tensor | None = None,
    ) -> PackedKV:
        """Allocate storage for ``capacity`` tokens (sink + quantized middle + window).

        ``rope_inv_freq`` (the model's rotary inverse frequencies, [rotary_dim / 2]): quantize the middle
        *before* RoPE. Tokens are un-rotated by their position on the way in and rotated back on the way out
        (the same angle both ways, so only quantization error remains); pre-RoPE keys keep a stable
        per-channel structure that channel grouping can use (SKVQ's pre_rope, KVQuant).
        """
        meta = _meta_dtype(meta_dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"PackedKV holds floating-point K/V; got dtype {dtype}")
        g = quant.group_for(head_dim)
        flush = quant.flush
        mid = _mid_rows(capacity, n_sink, window, flush)
        nbytes_tok = _bytes_per_token(quant, head_dim)
        codes = torch.zeros(batch, heads, mid, nbytes_tok, dtype=torch.uint8, device=device)
        scale, zero = _alloc_meta(quant, batch, heads, mid, head_dim, g, meta, device)
        sink = torch.zeros(batch, heads, n_sink, head_dim, dtype=dtype, device=device)
        win = torch.zeros(batch, heads, window + flush - 1, head_dim, dtype=dtype, device=device)
        perm = None
        if quant.permute:
            perm = torch.arange(head_dim, device=device).repeat(heads, 1)
        counts = torch.zeros(3, dtype=torch.int64, device=device)
        rope = None
        if rope_inv_freq is not None:
            rope = rope_inv_freq.detach().to(device=device, dtype=torch.float32).clone()
            if 2 * rope.numel() > head_dim:
                raise ValueError(f"rope_inv_freq has {rope.numel()} frequencies, more than head_dim/2 = {head_dim // 2}")
        out = cls(codes, scale, zero, sink, win, perm, counts, rope, quant, head_dim, n_sink, window, dtype)
        out._host = [0, 0, 0]
        return out

    # ------------------------------------------------------------------ flatten / unflatten (torch.compile)
    def __tensor_flatten__(self):
        names = [n for n in self.tensor_data_names if getattr(self, n) is not None]
        return names, tuple(getattr(self, a) for a in self.tensor_attribute_names)

    @classmethod
    def __tensor_unflatten__(cls, inner, attrs, outer_size, outer_stride):
        data = [inner.get(n) for n in cls.tensor_data_names]
        return cls(*data, *attrs)

    def _with_data(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedKV:
        data = [None if getattr(self, n) is None else fn(getattr(self, n)) for n in self.tensor_data_names]
        out = type(self)(*data, *(getattr(self, a) for a in self.tensor_attribute_names))
        out._host = None if self._host is None else list(self._host)
        return out

    def __repr__(self):
        n_s, n_q, n_w = self.lengths()
        q = self.quant
        return (
            f"PackedKV(shape={tuple(self.shape)}, {q.kind} {q.bits}-bit {q.axis} groups, "
            f"sink={n_s}/{self.n_sink}, quantized={n_q}, window={n_w}/{self.window_size}, "
            f"bytes={self.storage_nbytes()})"
        )

    # ------------------------------------------------------------------ bookkeeping
    def lengths(self) -> tuple[int, int, int]:
        """(sink tokens, quantized tokens, window tokens), as Python ints."""
        if self._host is None:
            self._host = [int(x) for x in self.counts.tolist()]
        return tuple(self._host)

    @property
    def length(self) -> int:
        return sum(self.lengths())

    @property
    def capacity(self) -> int:
        """Tokens this PackedKV can hold: sink + the codes' rows (+ the window, where its tokens are quantized only
        when they leave it: per-channel layouts)."""
        return self.n_sink + self.codes.shape[2] + (0 if self.quantize_on_entry else self.window_size)

    @property
    def quantize_on_entry(self) -> bool:
        """Per-token layouts (flush 1) quantize each token as it arrives: the codes rows ``n_quant`` ..
        ``n_quant + n_window - 1`` hold the window's tokens (docs/format.md), except while a channel order waits for
        its calibration (``perm`` with ``n_quant == 0``)."""
        return self.quant.flush == 1

    def window_rows(self) -> torch.Tensor:
        """The window tensor's rows holding window tokens 0 .. n_window - 1 (oldest first): the window is a ring,
        token j at row ``(n_quant + j) % window.shape[2]``."""
        _, n_q, n_w = self.lengths()
        return (n_q + torch.arange(n_w, device=self.window.device)) % max(1, self.window.shape[2])

    def window_tokens(self) -> torch.Tensor:
        """The window's valid tokens in sequence order, as stored (channel order ``perm``): [B, H, n_window, D]."""
        return self.window.index_select(2, self.window_rows())

    def codes_rows_after(self, t: int) -> int:
        """Rows of the codes storage in use after appending ``t`` more tokens (what the capacity check compares):
        the middle, plus the window's tokens where they are quantized on entry."""
        n_s, n_q, n_w = self.lengths()
        if self.quantize_on_entry:
            return n_q + n_w + max(0, t - max(0, self.n_sink - n_s))
        return self.quantized_after(t)

    def quantized_after(self, t: int) -> int:
        """How many tokens the quantized middle will hold after appending ``t`` more tokens."""
        n_s, n_q, n_w = self.lengths()
        rest = t - min(t, self.n_sink - n_s)
        if rest <= 0:
            return n_q
        return n_q + max(0, (n_w + rest - self.window_size) // self.quant.flush * self.quant.flush)

    def resized(self, capacity: int) -> PackedKV:
        """A copy of this PackedKV with room for ``capacity`` tokens (it must hold what is already there)."""
        mid = _mid_rows(capacity, self.n_sink, self.window_size, self.quant.flush)
        _, n_q, n_w = self.lengths()
        if mid < n_q + (n_w if self.quantize_on_entry else 0):
            raise CacheCapacityError(f"cannot shrink a PackedKV holding {self.length} tokens to capacity {capacity}")
        per_meta = self.quant.flush if self.quant.axis == "channel" else 1

        def fit(t: torch.Tensor, n: int, meta: bool = False) -> torch.Tensor:
            if meta and per_meta == 1:  # per-token scales / zeros: rows aligned as PackedKV.empty allocates them
                out = _meta_zeros(*t.shape[:2], n, tuple(t.shape[3:]), t.dtype, t.device)
            else:
                out = t.new_zeros(*t.shape[:2], n, *t.shape[3:])
            keep = min(n, t.shape[2])
            out[:, :, :keep] = t[:, :, :keep]
            return out

        out = type(self)(
            fit(self.codes, mid), fit(self.scale, mid // per_meta, True),
            None if self.zero is None else fit(self.zero, mid // per_meta, True),
            self.sink.clone(), self.window.clone(), None if self.perm is None else self.perm.clone(),
            self.counts.clone(), self.rope, *(getattr(self, a) for a in self.tensor_attribute_names),
        )
        out._host = list(self.lengths())
        return out

    def storage_nbytes(self) -> int:
        """Bytes held: every storage tensor's real allocation (codes, metadata with its row padding, sink, window,
        perm, counts)."""
        return sum(t.untyped_storage().nbytes() for t in self._storage_tensors())

    def _storage_tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in self.tensor_data_names) if t is not None]

    def _set_counts(self, n_s: int, n_q: int, n_w: int) -> None:
        self._host = [n_s, n_q, n_w]
        self.counts.copy_(torch.tensor(self._host, dtype=torch.int64))

    # ------------------------------------------------------------------ quantize-on-write
    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """Full-precision tokens as stored: in the channel order ``perm`` (identity until it is calibrated)."""
        return x if self.perm is None else quant.apply_perm(x, self.perm)

    def _unstored(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.perm is None else quant.unapply_perm(x, self.perm)

    def append(self, x: torch.Tensor) -> None:
        """Append new tokens ``x`` of shape [B, H, T, D]; tokens leaving the window are quantized.

        With a channel permutation, every part (sink, middle, window) is stored in the permuted channel order,
        so that an attention kernel can fold the permutation into q and the output once for all parts.
        """
        b, h, cap, d = self.shape
        if x.dim() != 4 or x.shape[0] != b or x.shape[1] != h or x.shape[3] != d:
            raise ValueError(f"append expects [B={b}, H={h}, T, D={d}], got {tuple(x.shape)}")
        x = x.to(self.kv_dtype)
        n_s, n_q, n_w = self.lengths()
        take = min(x.shape[2], self.n_sink - n_s)
        if take > 0:
            self.sink[:, :, n_s : n_s + take] = self._stored(x[:, :, :take])
            n_s += take
        rest = x[:, :, max(take, 0):]
        if rest.shape[2] == 0:
            self._set_counts(n_s, n_q, n_w)
            return
        flush = self.quant.flush
        pend = n_w + rest.shape[2]
        n_move = max(0, (pend - self.window_size) // flush * flush)
        # an uncalibrated channel order (SKVQ) is calibrated by the first append that moves tokens out of the window,
        # from those tokens; until then no codes are written (they would be in the wrong order)
        calibrate = self.perm is not None and n_q == 0 and n_move > 0
        ready = self.perm is None or n_q > 0
        pending = None
        if calibrate or not self.quantize_on_entry:
            pending = torch.cat([self._unstored(self.window_tokens()), rest], dim=2) if n_w else rest
        if calibrate:
            self._calibrate_perm(pending[:, :, :n_move], n_s)
        if self.quantize_on_entry:
            if calibrate:  # the window's tokens get their codes now, with the new tokens
                self._quantize_into(pending, n_q)
            elif ready:
                self._quantize_into(rest, n_q + n_w)
        elif n_move:
            self._quantize_into(pending[:, :, :n_move], n_q)
        # the tokens that stay in the window, at their ring rows (after a calibration the old ones are re-stored in
        # the new channel order; otherwise only the new ones are written)
        first = n_move if calibrate else max(n_move, n_w)
        if first < pend:
            rows = (n_q + torch.arange(first, pend, device=self.window.device)) % self.window.shape[2]
            keep = pending[:, :, first:] if pending is not None else rest[:, :, first - n_w:]
            self.window[:, :, rows] = self._stored(keep)
        self._set_counts(n_s, n_q + n_move, pend - n_move)

    def _calibrate_perm(self, x: torch.Tensor, n_s: int) -> None:
        """SKVQ channel order, uncalibrated: taken from the first tokens that get quantized (the prefill).
        Before this, ``perm`` is the identity, so the sink tokens already stored are re-stored in the new order."""
        if self.rope is not None:
            pos = torch.arange(self.n_sink, self.n_sink + x.shape[2], device=x.device)
            x = rotate(x.float(), pos, self.rope, inverse=True)
        g = self.quant.group_for(self.head_dim)
        self.perm.copy_(quant.channel_perm_by_range(x.float(), g, bits=self.quant.bits,
                                                    clip_ratio=self.quant.clip_ratio))
        if n_s:
            self.sink[:, :, :n_s] = quant.apply_perm(self.sink[:, :, :n_s], self.perm)

    def _check_capacity(self, needed: int) -> None:
        """``needed``: rows of the codes storage an append fills (``codes_rows_after``)."""
        if needed > self.codes.shape[2]:
            tokens = self.n_sink + needed + (0 if self.quantize_on_entry else self.window_size)
            window = "" if self.quantize_on_entry else f" + {self.window_size} window"
            raise CacheCapacityError(
                f"kvcompile cache capacity exceeded: this layer holds at most {self.capacity} tokens "
                f"({self.n_sink} sink + {self.codes.shape[2]} quantized{window}), and this append needs room for "
                f"{tokens}; create the cache with a larger max_cache_len, or max_cache_len=None to grow on demand"
            )

    def _quantize_into(self, x: torch.Tensor, start: int) -> None:
        q = self.quant
        n = x.shape[2]
        self._check_capacity(start + n)
        d = self.head_dim
        if self.rope is not None:  # quantize before RoPE: undo the rotation of these positions
            pos = torch.arange(self.n_sink + start, self.n_sink + start + n, device=x.device)
            x = rotate(x.float(), pos, self.rope, inverse=True)
        g = q.group_for(d)  # along channels; along tokens (axis="channel") the group is q.group_size
        gs = q.group_size if q.axis == "channel" else g
        if self.perm is not None:
            x = quant.apply_perm(x, self.perm)
        meta = self.scale.dtype
        zero = None
        if q.kind == "affine":
            codes, scale, zero = quant.quantize_affine(x, q.bits, gs, axis=q.axis, clip_ratio=q.clip_ratio, meta_dtype=meta)
        elif q.kind == "nf":
            codes, scale = quant.quantize_nf(x, int(q.bits), g, meta_dtype=meta)
        elif q.kind == "int8":
            codes, scale = quant.quantize_int8(x, meta_dtype=meta)
        else:
            codes, scale = quant.quantize_fp8(x, meta_dtype=meta)
        packed = quant.pack_codes(codes, q.bits) if q.kind in ("affine", "nf") else codes
        self.codes[:, :, start : start + n] = packed
        if q.axis == "channel":
            s0, s1 = start // q.flush, (start + n) // q.flush
        else:
            s0, s1 = start, start + n
        self.scale[:, :, s0:s1] = scale
        if zero is not None:
            self.zero[:, :, s0:s1] = zero

    # ------------------------------------------------------------------ reading back
    def dequantize_middle(self) -> torch.Tensor:
        """The quantized middle, dequantized (float32), in the model's channel order: [B, H, n_quant, D]."""
        _, n_q, _ = self.lengths()
        q, d = self.quant, self.head_dim
        g = q.group_for(d)
        codes = self.codes[:, :, :n_q]
        meta_n = n_q // q.flush if q.axis == "channel" else n_q
        scale = self.scale[:, :, :meta_n]
        if q.kind == "affine":
            c = quant.unpack_codes(codes, q.bits, d)
            gs = q.group_size if q.axis == "channel" else g
            x = quant.dequantize_affine(c, scale, self.zero[:, :, :meta_n], gs, axis=q.axis)
        elif q.kind == "nf":
            x = quant.dequantize_nf(quant.unpack_codes(codes, q.bits, d), scale, int(q.bits), g)
        elif q.kind == "int8":
            x = quant.dequantize_int8(codes, scale)
        else:
            x = quant.dequantize_fp8(codes, scale)
        if self.perm is not None:
            x = quant.unapply_perm(x, self.perm)
        if self.rope is not None:
            x = rotate(x, torch.arange(self.n_sink, self.n_sink + n_q, device=x.device), self.rope)
        return x

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The logical [B, H, L, D] tensor: sink ++ dequantized middle ++ window."""
        dtype = dtype or self.kv_dtype
        n_s, n_q, n_w = self.lengths()
        parts = [self._unstored(self.sink[:, :, :n_s]).to(dtype)]
        if n_q:
            parts.append(self.dequantize_middle().to(dtype))
        parts.append(self._unstored(self.window_tokens()).to(dtype))
        return torch.cat(parts, dim=2)

    # ------------------------------------------------------------------ batch reordering (beam search)
    def select_batch(self, index: torch.Tensor) -> PackedKV:
        """A PackedKV holding batch entries ``index`` (beam search reorder / select)."""
        index = index.to(self.sink.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if t is self.perm or t is self.counts or t is self.rope else t.index_select(0, index)

        return self._with_data(pick)

    # ------------------------------------------------------------------ the op table
    _OPS: dict[Any, Callable] = {}

    @classmethod
    def implements(cls, *ops):
        def deco(fn):
            for op in ops:
                cls._OPS[op] = fn
            return fn

        return deco

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in cls._OPS:
            return cls._OPS[func](func, types, args, kwargs)
        arg_types = ", ".join(type(a).__name__ for a in args)
        raise NotImplementedError(
            f"PackedKV has no rule for {func} (argument types: {arg_types}); call .dequantize() to get a plain "
            "tensor of the valid tokens, or add a rule with PackedKV.implements"
        )

    __torch_function__ = torch._C._disabled_torch_function_impl


@PackedKV.implements(aten.detach.default, aten.alias.default)
def _detach(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._with_data(func))


@PackedKV.implements(aten.clone.default)
def _clone(func, types, args, kwargs):
    return args[0]._with_data(lambda t: t.clone())


@PackedKV.implements(aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    self = args[0]
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.dtype == self.kv_dtype and (t is self.sink or t is self.window):
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    out = self._with_data(move)
    if dtype is not None:
        out.kv_dtype = dtype
        return type(self)(*(getattr(out, n) for n in self.tensor_data_names),
                          *(getattr(out, a) for a in self.tensor_attribute_names))
    return out


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half convention on the first ``2 * len(inv_freq)`` channels of
    ``x [..., T, D]`` at positions ``pos [T]`` (float32); ``inverse`` rotates by minus the angle."""
    rd = 2 * inv_freq.numel()
    freqs = pos.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if inverse:
        sin = -sin
    xr, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rot * sin, rest], dim=-1)


def _mid_rows(capacity: int, n_sink: int, window: int, flush: int) -> int:
    """Rows of the codes storage for ``capacity`` tokens: every non-sink token for per-token layouts (quantized on
    entry, the window's tokens included), else the tokens past the window, in whole token groups."""
    if flush == 1:
        return max(0, capacity - n_sink)
    return _round_up(max(0, capacity - n_sink - window), flush)


def _bytes_per_token(q: TensorQuant, head_dim: int) -> int:
    if q.kind in ("int8", "fp8"):
        return head_dim
    return quant.packed_dim(head_dim, q.bits)


CODE_LINE_BYTES = 128  # the Gluon decode kernel's TMA ring reads each (batch, head)'s code rows as whole lines of this


def line_capacity(capacity: int, n_sink: int, *layouts: tuple[TensorQuant, int]) -> int:
    """The smallest capacity >= ``capacity`` at which each per-token layout among ``layouts`` ((quant, head_dim)
    pairs, e.g. a layer's K and V) keeps every (batch, head)'s code rows in whole ``CODE_LINE_BYTES`` lines: its
    middle (capacity less the sink) times its bytes per token a multiple of 128 (2-bit codes of 128 channels: a
    multiple of 4 tokens). The Gluon decode kernel reads such storage through its TMA ring
    (kvcompile/kernels/gluon_decode.py, ``tma_unsupported_reason``); elsewhere it loads the codes into registers,
    about 3% slower for the whole model. Layouts quantized per channel (KIVI keys) are left as they are."""
    step = 1
    for q, d in layouts:
        if q.flush == 1:
            step = math.lcm(step, CODE_LINE_BYTES // math.gcd(CODE_LINE_BYTES, _bytes_per_token(q, d)))
    if capacity <= n_sink:
        return capacity
    return n_sink + _round_up(capacity - n_sink, step)


META_ROW_ALIGN = 32  # per-token scale / zero rows allocated in multiples of this many tokens


def _meta_zeros(b: int, h: int, rows: int, tail: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros [b, h, rows, *tail] whose (batch, head) rows start every ``META_ROW_ALIGN`` tokens (a view of an
    allocation rounded up to that many rows): the Gluon decode kernel reads per-token fp16 scales and zeros as
    aligned int32 pairs and 16-byte vectors, whatever the capacity (storage_nbytes counts the allocation)."""
    return torch.zeros(b, h, _round_up(rows, META_ROW_ALIGN), *tail, dtype=dtype, device=device)[:, :, :rows]


def _alloc_meta(q: TensorQuant, b: int, h: int, mid: int, d: int, g: int, meta: torch.dtype, device):
    if q.kind in ("int8", "fp8"):
        return _meta_zeros(b, h, mid, (1,), meta, device), None
    if q.axis == "channel":
        shape = (b, h, mid // q.flush, d)
        scale = torch.zeros(shape, dtype=meta, device=device)
        zero = torch.zeros(shape, dtype=meta, device=device) if q.kind == "affine" else None
        return scale, zero
    scale = _meta_zeros(b, h, mid, (d // g,), meta, device)
    zero = _meta_zeros(b, h, mid, (d // g,), meta, device) if q.kind == "affine" else None
    return scale, zero


def bits_per_element(*packed: PackedKV) -> float:
    """Average stored bits per K/V element over the given PackedKVs (their real storage / valid elements)."""
    nbytes = sum(p.storage_nbytes() for p in packed)
    elems = sum(p.shape[0] * p.shape[1] * p.head_dim * p.length for p in packed)
    return math.inf if elems == 0 else 8.0 * nbytes / elems
