"""Rewrite matched attention sites into the kvcompile ops, for models whose KV cache is a persistent buffer
written by index (gpt-fast's ``KVCache``; transformers' ``StaticCache``, whose layers ``index_copy_`` into
``keys``/``values``) or by slice at a start position (Meta's reference Llama: ``cache_k[:, start : start + T] =
xk`` into a token-major ``[B, S, H, D]`` buffer, read back as the prefix ``cache_k[:, : start + T]``, which the
wrapper checks is exactly the written prefix), or a past concatenated with the new tokens and handed back to the caller (nanoGPT's
returned "present"; transformers' ``DynamicCache``, whose layers store ``torch.cat([keys, new])`` back on
themselves, which Dynamo turns into a graph output).

Graph level: Dynamo's torch-level graph, the same one ``detect`` reads (see its docstring). Here the write
is one node on a placeholder whose Dynamo source names the buffer, and attention is one node (SDPA) or one
recognisable chain (matmul, scale, mask, softmax, matmul); after AOTAutograd the write is an ``index_put``
plus an epilogue ``copy_`` into a renamed input, and the link to the buffer is gone. The inserted ops are
opaque to AOTAutograd and inductor, which compile the rest of the graph around them.

How persistent packed state enters and leaves the graph: **extra graph inputs, owned outside the graph**.

* The packed storage (a ``PackedKV``: codes, scale, zero, sink, window, perm, counts) lives in a registry
  keyed by the identity of the full-precision buffer it replaces (a weak reference: it goes when the
  buffer goes). It is looked up at *run time* from the buffer the compiled function receives, not baked
  in at compile time: Dynamo's guards on a buffer are on its shape and dtype, so one compiled graph may
  serve two model instances, or a new ``StaticCache``, and each must get its own storage.
* The rewritten graph gets one new placeholder per inner tensor of each storage, appended after Dynamo's
  inputs; the backend's wrapper appends the tensors at each call. The kvcompile ops read and write them in
  place (``quantize_kv_write_`` mutates them; AOTAutograd keeps the mutation on the real input), so the
  state persists between calls with no copy and at a fixed address.
* Nothing leaves the graph: the write is in place, and the valid length is the ``counts`` inner tensor.

How the sequence position reaches the ops: **it does not need to, except to start a sequence**. Packed
storage is an append log (``counts`` says how many tokens are valid), so ``quantize_kv_write_`` appends at
``counts``, never at a position. The user's position tensor feeds (1) a small in-graph reset that zeroes
the counts when the first position of a write is 0 (a new sequence, as gpt-fast's prefill at
``input_pos = arange(T)``), with no host read (a slice write's start is a Python int, so that reset happens in
the wrapper instead); and (2) with ``check_positions`` (default on), a host-side
check in the wrapper that each write continues the sequence (the position is recomputed from the graph's
inputs by the few nodes that compute it) -- a write at any other position raises instead of silently
appending at the wrong place. The same check seeds a fresh packed storage from the full-precision buffer
when its first rewritten write comes at position p > 0 (a prefill that ran eagerly, or compiled without a
match, filled ``buffer[..., :p]``). The mask is passed through: ``dequant_attention`` takes a mask whose
last dim (positions) may exceed the valid length, extra columns ignored.

Concatenated caches (the cat route). The past is a graph input and the concatenation a graph output, which
the caller keeps and passes back. The rewritten graph appends the new tokens to packed storage
(``quantize_kv_write_``) and attends over it; in the output slot of the concatenation it returns the new
tokens, and the backend's wrapper swaps in a **handle**: a tensor of the concatenation's logical shape
``[B, H, L + T, D]`` that holds no tokens (one NaN broadcast with zero strides, so ``past.size(-2)`` and
``get_seq_length()`` stay true and a stray read shows NaN, not plausible numbers), registered in the same
weak-keyed registry as the storage it stands for. On the next call the handle arrives as the past; the
wrapper finds its storage and checks that the handle's length is the storage's (a stale handle raises). A past
that is not a handle (a full-precision prefill that was not rewritten, since it had no past to append to) is
taken over: a new storage of ``capacity`` tokens (the backend option) is seeded from its values. Handles
change strides (0) and length each step, so Dynamo compiles the decode step twice (the first, full-precision
past; then a dynamic length) and never again. The caller's full-precision past is dropped once it passes the
handle back: on this route the packed storage is all that holds the cache. A handle reaching a graph that
could not rewrite its site raises instead of attending over NaN.

A write that starts a sequence (first position 0: the prefill) is packed like any other, but with
``full_precision_prefill`` (the backend's default) the site's output there is attention over the written
tokens themselves in full precision, as ``KVCompileCache`` hands its prefill
(``prefill_attention_in_full_precision``: both outputs are computed and one is selected in the graph, no
host read; the full-precision one is T x T). The cat route needs nothing for it: its prefill has no past
and is not rewritten.

On the index route the full-precision buffers stay allocated by default (Dynamo guards their sizes and the
model still owns them), so there the packed storage is in addition to them. With the backend's
``release_buffers=True`` the wrapper frees each buffer once its storage has taken it over: the tensor keeps
its shape and now views one NaN with zero strides (``release_buffer``); Dynamo recompiles once for the new
strides. ``kvcompile.apply(model, compile=True)`` (the transformers cache-API route) and the cat route hold
only packed storage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from .. import ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from ..cache.packed import PackedKV, line_capacity
from ..schemes.base import LayerSpec, Scheme
from ._fx import ndim, op_name, shape, source_name, static_int, tensor_meta
from .detect import AttentionSite, CacheWrite, Detection

__all__ = ["RewritePlan", "SiteOutcome", "StorageSpec", "clear_storage", "packed_storage", "rewrite"]

_INDEX_KINDS = ("setitem_index", "index_copy", "index_put")
_SLICE_KINDS = ("setitem_slice", "slice_copy")  # in place, at a slice start
_DA = torch.ops.kvcompile.dequant_attention.default
_QW = torch.ops.kvcompile.quantize_kv_write_.default


# ---------------------------------------------------------------------------------------------- state


@dataclass
class _Entry:
    """The packed storage for one full-precision buffer, plus the host-side view of its length."""

    packed: PackedKV
    spec_key: tuple
    length: int | None = 0  # tokens held, as the wrapper last knew it; None: unknown (checks are off)
    fresh: bool = True  # no rewritten write has reached it yet


_STORE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_storage(buffer: torch.Tensor) -> PackedKV | None:
    """The packed storage that replaces ``buffer`` in graphs compiled with the kvcompile backend, if any."""
    entry = _STORE.get(buffer)
    return None if entry is None else entry.packed


def clear_storage() -> None:
    """Forget every packed storage (the next compiled call starts empty ones)."""
    _STORE.clear()


@dataclass(frozen=True)
class StorageSpec:
    """One packed storage the rewritten graph reads: which input holds the buffer it replaces, and its layout."""

    buffer_input: int  # index into the graph's inputs of the full-precision buffer
    source: str | None  # its Dynamo source
    quant: Any  # TensorQuant
    n_sink: int
    window: int
    meta_dtype: str
    inner: tuple[str, ...]  # the PackedKV inner tensors fed as extra inputs, in order
    # cat route: the past is a graph input, the concatenation a graph output the caller passes back next call
    family: str = "index"  # "index" (persistent buffer written by index) | "cat" (returned present)
    capacity: int | None = None  # cat route: tokens the packed storage holds (the buffer's extent otherwise)
    shape: tuple[int, int, int] | None = None  # cat route: (batch, heads, head_dim)
    new_tokens: int | None = None  # cat route: tokens appended per call, where static
    outputs: tuple[int, ...] = ()  # cat route: graph output slots of the concatenation
    rope_input: int | None = None  # keys quantized before RoPE: the graph input holding the rotary inv_freq
    layout: str = "bhsd"  # the buffer's: [batch, heads, tokens, head_dim], or "bshd" (token-major, Meta's Llama)

    @property
    def key(self) -> tuple:
        return (self.quant, self.n_sink, self.window, self.meta_dtype, self.capacity, self.rope_input is not None)

    def allocate(self, buffer: torch.Tensor, args: list[Any]) -> PackedKV:
        if self.family == "cat":
            (b, h, d), cap = self.shape, self.capacity
        elif self.layout == "bshd":
            b, cap, h, d = buffer.shape
        else:
            b, h, cap, d = buffer.shape
        rope = None if self.rope_input is None else args[self.rope_input]
        # rounded up to whole 128-byte code lines (the decode kernel's TMA ring reads them); the cat route checks its
        # own capacity, the index route's positions end at the buffer's
        cap = line_capacity(cap, self.n_sink, (self.quant, d))
        return PackedKV.empty(b, h, d, self.quant, capacity=cap, n_sink=self.n_sink, window=self.window,
                              dtype=buffer.dtype, device=buffer.device, meta_dtype=self.meta_dtype,
                              rope_inv_freq=rope)

    def entry(self, args: list[Any]) -> _Entry:
        buffer = args[self.buffer_input]
        e = _STORE.get(buffer)
        if e is None or e.spec_key != self.key:
            e = _Entry(self.allocate(buffer, args), self.key)
            _STORE[buffer] = e
        return e


@dataclass
class _Group:
    """One rewritten site at run time: its K and V storages and how to recompute its write position."""

    site: int
    k: int  # index into plan.storages
    v: int
    position: int | None  # index into plan.positions
    by_slice: bool = False  # slice write: the position is its start (an int); the counts reset on the host
    tokens: int | None = None  # tokens written per call (slice writes), where static
    read_end: int | None = None  # attention reads buffer[:end]: index into plan.positions of `end`


@dataclass
class _PositionFn:
    """The nodes that compute a write position, cut out of the graph so the wrapper can evaluate them."""

    module: fx.GraphModule | None
    inputs: tuple[int, ...]  # which graph inputs it takes
    const: int | None = None  # a position fixed in the graph (Dynamo specialised it)

    def __call__(self, args: list[Any]) -> torch.Tensor:
        if self.module is None:
            return torch.tensor([self.const])
        return torch.as_tensor(self.module(*(args[i] for i in self.inputs))).reshape(-1)


@dataclass
class SiteOutcome:
    index: int
    status: str  # rewritten | packed | unmatched
    reasons: list[str] = field(default_factory=list)
    spec: LayerSpec | None = None
    packed_bytes: int = 0
    full_precision_bytes: int = 0


@dataclass
class RewritePlan:
    """What ``rewrite`` did to a graph; the backend's wrapper uses it to feed the extra inputs."""

    n_inputs: int
    storages: list[StorageSpec] = field(default_factory=list)
    groups: list[_Group] = field(default_factory=list)
    positions: list[_PositionFn] = field(default_factory=list)
    outcomes: list[SiteOutcome] = field(default_factory=list)
    example_extra: list[torch.Tensor] = field(default_factory=list)  # fresh storage, for compiling
    # inputs that are the past of a concatenation this graph could not rewrite: a handle there is an error
    guarded: list[tuple[int, str]] = field(default_factory=list)  # (input index, why the site was not rewritten)
    release_buffers: bool = False  # free the full-precision buffers once packed storage has taken them over

    @property
    def empty(self) -> bool:
        return not self.storages

    def check_guarded(self, args: list[Any]) -> None:
        for i, why in self.guarded:
            if isinstance(args[i], torch.Tensor) and (_is_handle(args[i]) or args[i] in _STORE):
                raise ValueError(
                    "kvcompile: a packed cache handle, returned by a graph in which this cache was rewritten, reached "
                    f"a graph in which it could not be ({why}); it holds no values. Keep the model's code path the "
                    "same across decode steps, or compile with kvcompile.backend(..., rewrite=False)."
                )

    def extra_inputs(self, args: list[Any], *, check_positions: bool) -> tuple[list[torch.Tensor], list[_Entry]]:
        """The packed storages' inner tensors to append to Dynamo's inputs, and their entries (for ``outputs``)."""
        self.check_guarded(args)
        entries = [s.entry(args) if s.family == "index" else _cat_entry(s, args) for s in self.storages]
        if any(s.family == "index" for s in self.storages) and (
                check_positions or any(e.fresh for e in entries) or any(g.by_slice for g in self.groups)):
            self._check(args, entries, check_positions)
        if self.release_buffers:
            for s in self.storages:
                if s.family == "index":
                    release_buffer(args[s.buffer_input])
        extra: list[torch.Tensor] = []
        for s, e in zip(self.storages, entries):
            extra.extend(getattr(e.packed, n) for n in s.inner)
            e.packed._host = None  # the graph writes the counts in place: eager readers re-read them
        return extra, entries

    def outputs(self, args: list[Any], outs: Any, entries: list[_Entry]) -> Any:
        """Cat route: put a handle in each graph output slot that held a concatenated cache (the graph returns
        the new tokens there), and record that the handle now stands for the storage."""
        if not any(s.family == "cat" for s in self.storages):
            return outs
        flat = list(outs)
        for s, e in zip(self.storages, entries):
            if s.family != "cat" or not s.outputs:
                continue
            t = flat[s.outputs[0]].shape[2]
            past = args[s.buffer_input]
            e.length += t
            b, h, d = s.shape
            handle = _handle((b, h, e.length, d), past.dtype, past.device)
            _STORE[handle] = e
            for i in s.outputs:
                flat[i] = handle
        return type(outs)(flat) if isinstance(outs, tuple) else flat

    def _check(self, args: list[Any], entries: list[_Entry], check_positions: bool) -> None:
        values: dict[int, torch.Tensor] = {}

        def value(i: int) -> torch.Tensor:
            if i not in values:
                values[i] = self.positions[i](args)
            return values[i]

        for g in self.groups:
            if g.position is None:
                continue
            pos = value(g.position)
            first = int(pos[0])
            t = g.tokens if g.by_slice else pos.numel()
            if g.read_end is not None and t is not None and int(value(g.read_end)[0]) != first + t:
                raise ValueError(
                    f"kvcompile: attention (site #{g.site}) reads the first {int(value(g.read_end)[0])} tokens of its "
                    f"cache, but the rewritten cache holds {first + t} after this write; only reads of the whole "
                    "written prefix are rewritten"
                )
            for which in (g.k, g.v):
                e, spec = entries[which], self.storages[which]
                if first == 0:
                    if g.by_slice:  # no position tensor to reset the counts with in the graph: reset here
                        e.packed._set_counts(0, 0, 0)
                    e.length = 0  # the graph resets the counts
                elif e.fresh:
                    # a prefill wrote buffer[..., :first] in full precision: take it over, packed
                    buf = args[spec.buffer_input]
                    e.packed._set_counts(0, 0, 0)
                    e.packed.append(buf[:, :first].transpose(1, 2) if spec.layout == "bshd" else buf[:, :, :first])
                    e.length = first
                elif check_positions and e.length is not None and first != e.length:
                    raise ValueError(
                        f"kvcompile: a rewritten KV-cache write (site #{g.site}, {spec.source}) comes at position "
                        f"{first}, but its packed cache holds {e.length} tokens. Packed caches append: each write "
                        "must continue the sequence, or start a new one at position 0."
                    )
                if check_positions and not g.by_slice and not torch.equal(pos.cpu(), torch.arange(first, first + t)):
                    raise ValueError(f"kvcompile: write positions {pos.tolist()} are not consecutive")
                e.length = None if e.length is None or t is None or not check_positions else e.length + t
                e.fresh = False


def release_buffer(buf: torch.Tensor) -> None:
    """Give a full-precision cache buffer's memory back once packed storage holds its tokens: the tensor keeps
    its shape (Dynamo guards it, the model still owns it) but now views one NaN with zero strides, so it holds
    no tokens and a stray read shows NaN; an in-place write to it (``StaticCache.reset``) raises."""
    if buf.numel() <= 1 or all(st == 0 for st in buf.stride()):
        return
    nan = torch.full((1,), float("nan"), dtype=buf.dtype, device=buf.device)
    with torch.no_grad():
        buf.set_(nan.untyped_storage(), 0, buf.shape, (0,) * buf.dim())


def cat_pasts(detection: Detection, why: str) -> list[tuple[int, str]]:
    """The graph inputs that are the past of a concatenation, for ``RewritePlan.guarded``."""
    out = []
    for site in detection.sites:
        for w in (site.k_write, site.v_write):
            if w is not None and w.family == "cat" and w.storage_input_index is not None:
                out.append((w.storage_input_index, why))
    return out


def _handle(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What a rewritten graph returns in place of a concatenated cache: a tensor of the logical shape
    [B, H, L, D] that holds no tokens (one NaN, broadcast), so shape reads (``past.size(-2)``) stay true and a
    read of its values shows NaN rather than plausible numbers. ``packed_storage(handle)`` gives the storage."""
    return torch.full((1,), float("nan"), dtype=dtype, device=device).expand(shape)


def _is_handle(x: torch.Tensor) -> bool:
    return x.numel() > 1 and all(st == 0 for st in x.stride())


def _cat_entry(spec: StorageSpec, args: list[Any]) -> _Entry:
    """The packed storage a concatenated cache's past stands for: the one whose handle it is, or a new one
    seeded from its values (a full-precision past, e.g. from a prefill that was not rewritten)."""
    past = args[spec.buffer_input]
    n = past.shape[2] if past.dim() == 4 else 0
    e = _STORE.get(past)
    if e is not None and e.spec_key == spec.key:
        if e.length + (spec.new_tokens or 1) > spec.capacity:
            _capacity_error(spec, e.length + (spec.new_tokens or 1))
        if e.length != n:
            raise ValueError(
                f"kvcompile: a cache handle for {n} tokens was passed back, but its packed storage now holds "
                f"{e.length} (a later call appended to it). Packed caches append: pass back the cache the "
                "previous call returned; to branch or rewind a sequence, start again from its full-precision prefix."
            )
        return e
    if _is_handle(past):
        raise ValueError(
            "kvcompile: this past K/V holds no values: it looks like a cache handle returned by a kvcompile-"
            "rewritten graph, changed outside it (e.g. index_select for beam search, or a slice). Handles can only "
            "be passed back as they were returned."
        )
    if past.dim() != 4 and past.numel():
        raise ValueError(f"kvcompile: past K/V must be [batch, heads, tokens, head_dim], got {tuple(past.shape)}")
    e = _Entry(spec.allocate(past, args), spec.key, length=0, fresh=False)
    if n and bool(torch.isnan(past).any()):
        raise ValueError(
            "kvcompile: the past K/V to take over holds NaN: a cache handle (which holds no values) was probably "
            "copied or reindexed outside the compiled graph (e.g. index_select for beam search), which packed "
            "caches do not support"
        )
    if n:
        if n + (spec.new_tokens or 1) > spec.capacity:
            _capacity_error(spec, n + (spec.new_tokens or 1))
        e.packed.append(past)
        e.length = n
    return e


def _capacity_error(spec: StorageSpec, needed: int):
    from ..cache.packed import CacheCapacityError

    raise CacheCapacityError(
        f"kvcompile: a concatenated KV cache ({spec.source}) needs room for {needed} tokens, but the backend's "
        f"packed storage holds {spec.capacity}; compile with kvcompile.backend(..., capacity=N) for a larger N"
    )


# ---------------------------------------------------------------------------------------------- the rewrite


@torch.fx.node.has_side_effect
def restart_at_position_zero(counts: torch.Tensor, position: torch.Tensor) -> None:
    """Zero a packed storage's ``counts`` when a write's first position is 0 (a new sequence). In graph, no
    host read: ``counts *= (position[0] != 0)``."""
    counts.mul_(position.reshape(-1)[:1].ne(0).to(counts.dtype))


def prefill_attention_in_full_precision(start, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                                        packed_out: torch.Tensor, mask: Any, scale: float | None,
                                        is_causal: bool) -> torch.Tensor:
    """A rewritten persistent-buffer site's output: the packed attention, or, where the write starts a sequence
    (``start``, its first position, is 0), attention over the written tokens themselves in full precision (the
    cache route's ``full_precision_prefill``). Both are computed, so there is no host read; the second is over
    the T new tokens only (mask columns are positions: the first T)."""
    t = k_new.shape[-2]
    fp = torch.nn.functional.scaled_dot_product_attention(
        q, k_new, v_new, attn_mask=None if mask is None else mask[..., :t],
        is_causal=mask is None and is_causal and q.shape[-2] > 1, scale=scale, enable_gqa=True)
    if isinstance(start, torch.Tensor):
        first = start.reshape(-1)[:1].eq(0).reshape(())
    else:
        first = torch.scalar_tensor(start, device=q.device).eq(0)
    return torch.where(first, fp.to(packed_out.dtype), packed_out)


log = logging.getLogger("kvcompile")
_WARNED: set[str] = set()


def rewrite(gm: fx.GraphModule, detection: Detection, example_inputs: list[Any], scheme: Scheme, *,
            capacity: int = 4096, full_precision_prefill: bool = True) -> RewritePlan:
    """Rewrite every site of ``detection`` whose K and V come from index writes into persistent buffers, or
    from concatenations with a past that the graph returns (``capacity``: tokens each such packed storage holds).

    Sites already on the kvcompile ops (``kind == "packed"``) are left as they are; every other site keeps
    running in full precision and gets its reasons in the plan's outcomes. Modifies ``gm`` in place.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    plan = RewritePlan(n_inputs=len(placeholders))
    rewritable = [s for s in detection.sites if s.kind != "packed"]
    specs = scheme.layer_specs(max(1, len(rewritable)))
    rope_input = None
    if rewritable and any(sp.k_pre_rope for sp in specs):
        rope_input = _rope_input(placeholders, example_inputs)
        if rope_input is None and "pre_rope" not in _WARNED:
            # no rotary frequencies among the graph's inputs: keys are quantized after RoPE here
            _WARNED.add("pre_rope")
            log.warning("kvcompile backend: %s asks for keys quantized before RoPE (pre_rope), but this graph has "
                        "no single rotary `inv_freq` input to undo RoPE with: its keys are quantized after RoPE",
                        scheme.name)
    layer = 0
    position_ids: dict[fx.Node, int] = {}
    last_placeholder = placeholders[-1] if placeholders else None
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    out_slots = _output_slots(out_node)
    for i, site in enumerate(detection.sites):
        outcome = SiteOutcome(i, "unmatched", list(site.reasons))
        plan.outcomes.append(outcome)
        if site.kind == "packed":
            outcome.status = "packed" if site.matched else "unmatched"
            outcome.packed_bytes, outcome.full_precision_bytes = _packed_site_bytes(site, example_inputs)
            continue
        spec = specs[layer] if layer < len(specs) else specs[-1]
        layer += 1
        outcome.spec = spec
        why = _why_not(site, example_inputs, spec, out_slots) if site.matched else None
        if not site.matched or why:
            if why:
                outcome.reasons.append(why)
            for w in (site.k_write, site.v_write):
                if w is not None and w.family == "cat" and w.storage_input_index is not None:
                    plan.guarded.append((w.storage_input_index, why or "; ".join(site.reasons) or "unmatched"))
            continue
        # ---- new placeholders for the two storages
        new_storages = []
        is_cat = site.k_write.family == "cat"
        for label, w, q in (("k", site.k_write, spec.k), ("v", site.v_write, spec.v)):
            buf = example_inputs[w.storage_input_index]
            extra = {}
            if is_cat:
                ns = shape(w.new)
                extra = dict(family="cat", capacity=capacity,
                             shape=(static_int(ns[0]), static_int(ns[1]), static_int(ns[3])),
                             new_tokens=static_int(ns[2]), outputs=tuple(out_slots.get(w.node, ())))
            elif w.dim == 1:
                extra = dict(layout="bshd")
            proto = StorageSpec(w.storage_input_index, w.storage_source, q, spec.n_sink, spec.window,
                                scheme.meta_dtype, (), **extra)
            if label == "k" and spec.k_pre_rope and rope_input is not None:
                proto = dataclasses.replace(proto, rope_input=rope_input)
            pk = proto.allocate(buf, example_inputs)
            inner = tuple(n for n in PackedKV.tensor_data_names if getattr(pk, n) is not None)
            s = dataclasses.replace(proto, inner=inner)
            nodes = {}
            for n in PackedKV.tensor_data_names:
                if n not in inner:
                    nodes[n] = None
                    continue
                with graph.inserting_after(last_placeholder):
                    ph = graph.placeholder(f"kvcompile_{w.storage.name}_{n}")
                ph.meta["example_value"] = getattr(pk, n)
                ph.meta["kvcompile_extra_input"] = True
                ph._dynamo_source = None  # fed by the backend's wrapper, not by Dynamo
                last_placeholder = ph
                nodes[n] = ph
            plan.storages.append(s)
            plan.example_extra.extend(getattr(pk, n) for n in inner)
            new_storages.append((s, nodes, pk))
            outcome.packed_bytes += pk.storage_nbytes()
            outcome.full_precision_bytes += (pk.numel() if is_cat else buf.numel()) * buf.element_size()
        (ks, knodes, kpk), (vs, vnodes, vpk) = new_storages
        # ---- the writes: reset on position 0, then quantize_kv_write_, where the original write was
        pos = site.k_write.position
        by_slice = site.k_write.kind in _SLICE_KINDS
        written = []
        for w, s, nodes in ((site.k_write, ks, knodes), (site.v_write, vs, vnodes)):
            with graph.inserting_before(w.node):
                if isinstance(pos, fx.Node) and not by_slice:
                    graph.call_function(restart_at_position_zero, (nodes["counts"], w.position))
                q = s.quant
                new = w.new
                if s.layout == "bshd":  # token-major buffer: the packed storage is [B, H, T, D]
                    new = graph.call_method("transpose", (new, 1, 2))
                written.append(new)
                graph.call_function(_QW, (
                    new, *(nodes[n] for n in PackedKV.tensor_data_names), q.kind, float(q.bits),
                    q.group_size or 0, q.axis, q.clip_ratio, s.n_sink, s.window,
                ))
        # ---- attention
        mask, scale, is_causal = _attention_args(site)
        kq, vq = ks.quant, vs.quant
        with graph.inserting_before(site.output):
            if isinstance(mask, tuple):  # masked_fill(mask, -inf): True marks what is masked out
                mask = graph.call_function(torch.logical_not, (mask[1],))
            attn = graph.call_function(_DA, (
                site.q, *(knodes[n] for n in PackedKV.tensor_data_names),
                *(vnodes[n] for n in PackedKV.tensor_data_names),
                kq.kind, float(kq.bits), kq.group_size or 0, kq.axis,
                vq.kind, float(vq.bits), vq.group_size or 0, vq.axis,
                ks.n_sink, ks.window, float(scale), mask, bool(is_causal),
            ))
        attn.meta.update({k: v for k, v in site.output.meta.items() if k in ("example_value", "stack_trace",
                                                                             "nn_module_stack", "source_fn_stack")})
        out = attn
        if full_precision_prefill and not is_cat and isinstance(pos, (fx.Node, int)):
            with graph.inserting_after(attn):
                out = graph.call_function(prefill_attention_in_full_precision, (
                    pos, site.q, written[0], written[1], attn, mask, scale, bool(is_causal)))
            out.meta.update(attn.meta)
        site.output.replace_all_uses_with(out)
        for w in (site.k_write, site.v_write):
            if is_cat:  # the caller gets the new tokens there; the backend's wrapper swaps in a handle
                _detach_cat(graph, w, out_node)
            if w.node.users:  # a functional write's result is only read by the chain to the site: now dead
                continue
            graph.erase_node(w.node)
        tokens = None
        if by_slice:
            ns = shape(site.k_write.new)
            tokens = static_int(ns[site.k_write.dim]) if ns is not None else None
        end = _prefix_end(site.k_trace)
        plan.groups.append(_Group(i, len(plan.storages) - 2, len(plan.storages) - 1,
                                  _position_fn(gm, pos, placeholders, position_ids, plan), by_slice, tokens,
                                  None if end is None else _position_fn(gm, end, placeholders, position_ids, plan)))
        outcome.status = "rewritten"
    if not plan.empty:
        # Only pure nodes go: Dynamo's graph keeps in-place calls (``cumulative_length.add_(1)``) as unused
        # call_method nodes, which FX's default DCE would drop.
        graph.eliminate_dead_code(is_impure_node=_is_impure)
        gm.recompile()
    return plan


def _rope_input(placeholders: list[fx.Node], example_inputs: list[Any]) -> int | None:
    """The graph input holding the model's rotary inverse frequencies (a buffer named ``inv_freq``, as
    transformers' ``*RotaryEmbedding`` modules keep), if there is exactly one; None otherwise (no RoPE, RoPE from
    precomputed tables, or several rotary bases)."""
    found = []
    for i, ph in enumerate(placeholders):
        src = source_name(ph) or ""
        x = example_inputs[i] if i < len(example_inputs) else None
        if "inv_freq" in src.rsplit(".", 1)[-1] and isinstance(x, torch.Tensor) and x.dim() == 1 \
                and x.dtype.is_floating_point:
            found.append(i)
    return found[0] if len(found) == 1 else None


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output") or node.is_impure():
        return True
    name = op_name(node) or (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", ""))
    return name.endswith("_") or name in ("setitem", "copy_") or node.op == "call_module"


def _output_slots(out_node: fx.Node) -> dict[fx.Node, list[int]]:
    """Which flat output slots of the graph hold each node (Dynamo's graphs return a flat tuple)."""
    slots: dict[fx.Node, list[int]] = {}
    outs = out_node.args[0]
    if isinstance(outs, (tuple, list)):
        for i, o in enumerate(outs):
            if isinstance(o, fx.Node):
                slots.setdefault(o, []).append(i)
    return slots


_SIZE_READS = ("size", "sym_size", "dim", "numel", "sym_numel")


def _size_reads(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if (op_name(u) or "").split(".")[0] in _SIZE_READS]


def _detach_cat(graph: fx.Graph, w: CacheWrite, out_node: fx.Node) -> None:
    """Cut a rewritten cat out of what is left of the graph: the output gets the new tokens (the wrapper swaps
    in a handle), and size reads become sizes of the past and the new tokens."""
    cat = w.node
    out_node.args = (tuple(w.new if o is cat else o for o in out_node.args[0]),) + tuple(out_node.args[1:])
    for u in _size_reads(cat):
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        name = (op_name(u) or "").split(".")[0]
        if name == "dim":
            u.replace_input_with(cat, w.new)
            continue
        with graph.inserting_before(u):
            d = None if dim is None else dim % 4
            if name in ("numel", "sym_numel"):
                a = graph.call_method("numel", (w.storage,))
                b = graph.call_method("numel", (w.new,))
                repl = graph.call_function(operator.add, (a, b))
            elif d is None:
                repl = None
            elif d == w.dim:
                a = graph.call_method("size", (w.storage, d))
                b = graph.call_method("size", (w.new, d))
                repl = graph.call_function(operator.add, (a, b))
            else:
                repl = graph.call_method("size", (w.new, d))
        if repl is None:  # x.size(): a torch.Size of the concatenation
            with graph.inserting_before(u):
                a = graph.call_method("size", (w.storage, w.dim))
                b = graph.call_method("size", (w.new, w.dim))
                n = graph.call_function(operator.add, (a, b))
                sizes = [graph.call_method("size", (w.new, i)) if i != w.dim else n for i in range(4)]
                repl = graph.call_function(torch.Size, (sizes,))
        repl.meta.update(u.meta)
        u.replace_all_uses_with(repl)
        graph.erase_node(u)


def _why_not_cat(site: AttentionSite, example_inputs: list[Any], out_slots: dict[fx.Node, list[int]]) -> str | None:
    """Why a site whose K and V are concatenated with a past cannot be rewritten (None: it can)."""
    for label, w in (("k", site.k_write), ("v", site.v_write)):
        if w.kind != "cat":
            return f"{label}: a {w.kind} write next to a cat write for the other operand"
        if w.storage_input_index is None:
            return f"{label}: the past K/V is not a graph input"
        past = example_inputs[w.storage_input_index]
        ns = shape(w.new)
        if not isinstance(past, torch.Tensor) or not past.dtype.is_floating_point:
            return f"{label}: the past is not a floating-point tensor"
        if ns is None or len(ns) != 4 or w.dim != 2 or (past.dim() != 4 and past.numel()):
            return f"{label}: the cache is not laid out [batch, heads, tokens, head_dim]"
        if any(static_int(ns[i]) is None for i in (0, 1, 3)):
            return f"{label}: the new K/V has a dynamic batch, head or head-dim size"
        t = site.k_trace if label == "k" else site.v_trace
        if t.sliced:
            return f"{label}: attention reads a slice of the concatenated cache, not all of it"
        if w.node not in out_slots:
            return f"{label}: the concatenated cache is not returned to the caller, so there is nothing to append to"
        if not _only_read_by(w.node, w.node, t.chain, site, out_ok=True):
            return f"{label}: the concatenated cache is read outside this attention site"
        if any(u is not w.node and u not in _size_reads(w.storage) for u in w.storage.users):
            return f"{label}: the past K/V is read outside the concatenation"
    if site.k_write.storage is site.v_write.storage:
        return "K and V share one past tensor"
    return None


def _why_not(site: AttentionSite, example_inputs: list[Any], spec: LayerSpec,
             out_slots: dict[fx.Node, list[int]]) -> str | None:
    """Why a site whose writes were found still cannot be rewritten (None: it can)."""
    kw, vw = site.k_write, site.v_write
    if kw.family == "cat" or vw.family == "cat":
        why = _why_not_cat(site, example_inputs, out_slots)
        if why:
            return why
        kshape, vshape = [tuple(static_int(x) for x in shape(w.new)) for w in (kw, vw)]
        return _why_not_common(site, spec, kshape, vshape)
    if kw.kind in _SLICE_KINDS and vw.kind not in _SLICE_KINDS or vw.kind in _SLICE_KINDS and kw.kind not in _SLICE_KINDS:
        return "K is written by slice and V by index (or the other way round)"
    for label, w in (("k", kw), ("v", vw)):
        if w.kind in _SLICE_KINDS:
            if not isinstance(w.position, (int, fx.Node)) or isinstance(w.position, bool):
                return f"{label}: the slice start is not a number"
            ns = shape(w.new)
            if ns is None or static_int(ns[w.dim]) is None:
                return f"{label}: the number of tokens written by slice is not static"
        elif w.kind not in _INDEX_KINDS:
            return f"{label}: {w.kind} writes are not rewritten yet; only index writes and in-place slice writes are"
        elif not isinstance(w.position, fx.Node):
            return f"{label}: the write position is not a tensor"
        if w.storage_input_index is None:
            return f"{label}: the written buffer is not a graph input"
        buf = example_inputs[w.storage_input_index]
        if not isinstance(buf, torch.Tensor) or buf.dim() != 4 or w.dim not in (1, 2):
            return f"{label}: the buffer is not laid out [batch, heads, tokens, head_dim] or [batch, tokens, heads, head_dim]"
        if not buf.dtype.is_floating_point:
            return f"{label}: the buffer holds {buf.dtype}, not floating-point K/V"
        if any(isinstance(x, torch.SymInt) for x in buf.shape):
            return f"{label}: the buffer has a dynamic shape"
        t = site.k_trace if label == "k" else site.v_trace
        if t.sliced and _prefix_end(t) is None:
            return f"{label}: attention reads a slice of the buffer that is not a prefix [:end]"
        if not _only_read_by(w.storage, w.node, t.chain, site):
            return f"{label}: the buffer is read outside this attention site"
    if kw.position is not vw.position and _position_key(kw.position) != _position_key(vw.position):
        return "K and V are written at different positions"
    if kw.storage is vw.storage:
        return "K and V share one buffer"
    if kw.dim != vw.dim:
        return "K and V buffers have different layouts"
    if (_prefix_end(site.k_trace) is None) != (_prefix_end(site.v_trace) is None) or \
            _position_key(_prefix_end(site.k_trace)) != _position_key(_prefix_end(site.v_trace)):
        return "attention reads different prefixes of K and V"
    kb = example_inputs[kw.storage_input_index]
    vb = example_inputs[vw.storage_input_index]
    ks, vs = tuple(kb.shape), tuple(vb.shape)
    if kw.dim == 1:  # token-major: compare as [batch, heads, tokens, head_dim]
        ks, vs = (ks[0], ks[2], ks[1], ks[3]), (vs[0], vs[2], vs[1], vs[3])
    return _why_not_common(site, spec, ks, vs)


def _why_not_common(site: AttentionSite, spec: LayerSpec, kshape: tuple, vshape: tuple) -> str | None:
    q = shape(site.q)
    if q is None or static_int(q[-1]) != kshape[-1] or vshape[-1] != kshape[-1]:
        return "q, K and V head dims differ"
    hq = static_int(q[-3]) if len(q) >= 3 else None
    if hq is None or hq % kshape[1]:
        return "the query heads are not a multiple of the KV heads"
    for label, qq in (("k", spec.k), ("v", spec.v)):
        try:
            qq.group_for(kshape[-1])
        except ValueError as e:
            return f"{label}: {e}"
    if site.kind == "sdpa" and site.dropout_p not in (0, 0.0, None):
        return "SDPA with dropout"
    if isinstance(site.dropout_p, (int, float)) and site.dropout_p:
        return "dropout is active"
    if len(site.masks) > 1:
        return f"{len(site.masks)} mask terms; one is supported"
    if site.masks and site.masks[0].kind in ("where", "masked_fill"):
        m = site.masks[0]
        if not _is_neg_inf(m.fill):
            return f"the {m.kind} mask fills with {m.fill!r}, not -inf / the dtype's minimum"
    _, scale, _ = _attention_args(site)
    if scale is None:
        return "the attention scale is not a constant"
    return None


def _only_read_by(buf: fx.Node, write: fx.Node, chain: tuple[fx.Node, ...], site: AttentionSite, *,
                  out_ok: bool = False) -> bool:
    allowed = set(chain) | {write, site.output, *site.nodes}
    if out_ok:
        allowed |= {n for n in buf.users if n.op == "output" or n in _size_reads(buf)}
    todo = [u for u in buf.users]
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in allowed:
            return False
        if n is not site.output and n not in site.nodes:
            todo.extend(n.users)
    return True


def _prefix_end(trace) -> Any:
    """Where attention reads ``buffer[..., :end]`` (a prefix along the token dim, sliced right off the
    buffer): ``end`` (an int or a node); None where it reads the whole buffer or any other slice."""
    if not trace.sliced or not trace.chain or trace.write is None:
        return None
    def cuts(n: fx.Node) -> bool:
        if op_name(n) == "narrow":
            return True
        if op_name(n) != "getitem" or not isinstance(n.args[0], fx.Node) or tensor_meta(n.args[0]) is None:
            return False
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return any(isinstance(i, slice) and i != slice(None) for i in idx)

    partial = [n for n in trace.chain if cuts(n)]
    node = trace.chain[-1]
    if len(partial) != 1 or partial[0] is not node or node.args[0] is not trace.root:
        return None
    dim, nd = trace.write.dim, ndim(trace.root)
    if op_name(node) == "narrow":
        d, start, length = (list(node.args[1:]) + [None, None, None])[:3]
        return length if isinstance(d, int) and d % nd == dim and start == 0 else None
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if Ellipsis in items or None in items or len(items) > nd or not all(isinstance(i, slice) for i in items):
        return None
    items += [slice(None)] * (nd - len(items))
    for d, it in enumerate(items):
        if d == dim:
            if it.start not in (None, 0) or it.step not in (None, 1) or it.stop is None:
                return None
        elif it != slice(None):
            return None
    return items[dim].stop


def _position_key(pos: Any) -> Any:
    return pos.name if isinstance(pos, fx.Node) else pos


def _is_neg_inf(x: Any) -> bool:
    if isinstance(x, (int, float)):
        return x == -math.inf or x <= torch.finfo(torch.float16).min
    return False


def _attention_args(site: AttentionSite) -> tuple[Any, float | None, bool]:
    """(mask for dequant_attention, score scale, is_causal) of a site."""
    if site.kind == "sdpa":
        scale = site.scale
        if scale is None:
            d = site.head_dim
            scale = 1.0 / math.sqrt(d) if d else None
    else:
        scale = site.scale
    if not isinstance(scale, (int, float)):
        scale = None
    mask = None
    if site.masks:
        m = site.masks[0]
        if m.kind == "masked_fill":  # True = masked out: the op's boolean masks keep True
            mask = ("not", m.mask)
        else:
            mask = m.mask
    return mask, scale, site.is_causal


def _position_fn(gm: fx.GraphModule, pos: Any, placeholders: list[fx.Node], cache: dict[fx.Node, int],
                 plan: RewritePlan) -> int | None:
    """Cut the nodes computing ``pos`` out into a small module the wrapper can run on the call's inputs.
    None when they include a mutation (the value before the graph runs would not be the value it writes at)."""
    if isinstance(pos, int) and not isinstance(pos, bool):
        plan.positions.append(_PositionFn(None, (), const=pos))
        return len(plan.positions) - 1
    if not isinstance(pos, fx.Node):
        return None
    if pos in cache:
        return cache[pos]
    needed: list[fx.Node] = []
    todo, seen = [pos], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        needed.append(n)
        name = op_name(n) or ""
        if n.op not in ("placeholder", "call_function", "call_method") or name.endswith("_") or name == "setitem":
            return None
        todo.extend(a for a in n.all_input_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    needed.sort(key=order.__getitem__)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = []
    for n in needed:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
            inputs.append(placeholders.index(n))
        else:
            env[n] = g.node_copy(n, env.__getitem__)
    g.output(env[pos])
    plan.positions.append(_PositionFn(fx.GraphModule(gm, g), tuple(inputs)))
    cache[pos] = len(plan.positions) - 1
    return cache[pos]


def _packed_site_bytes(site: AttentionSite, example_inputs: list[Any]) -> tuple[int, int]:
    """(packed bytes, full-precision bytes for the same capacity) of a site that already reads packed storage."""
    from .detect import _DA_K, _DA_SCALE, _DA_V

    n_parts = len(PackedKV.tensor_data_names)
    packed = full = 0
    node = site.output
    for first in (_DA_K, _DA_V):
        parts = node.args[first:first + n_parts]
        tensors = [tensor_meta(p) for p in parts if p is not None]
        if any(t is None for t in tensors):
            return 0, 0
        packed += sum(t.numel() * t.element_size() for t in tensors)
        sink, window = tensor_meta(parts[3]), tensor_meta(parts[4])
        codes = tensor_meta(parts[0])
        n_sink, win = node.args[_DA_SCALE - 2], node.args[_DA_SCALE - 1]
        cap = n_sink + codes.shape[2] + win
        b, h, _, d = sink.shape
        full += b * h * cap * d * sink.element_size()
    return int(packed), int(full)

