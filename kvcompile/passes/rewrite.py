"""Rewrite matched attention sites into the kvcompile ops, for models whose KV cache is a persistent buffer
written by index (gpt-fast's ``KVCache``; transformers' ``StaticCache``, whose layers ``index_copy_`` into
``keys``/``values``).

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
``input_pos = arange(T)``), with no host read; and (2) with ``check_positions`` (default on), a host-side
check in the wrapper that each write continues the sequence (the position is recomputed from the graph's
inputs by the few nodes that compute it) -- a write at any other position raises instead of silently
appending at the wrong place. The same check seeds a fresh packed storage from the full-precision buffer
when its first rewritten write comes at position p > 0 (a prefill that ran eagerly, or compiled without a
match, filled ``buffer[..., :p]``). The mask is passed through: ``dequant_attention`` takes a mask whose
last dim (positions) may exceed the valid length, extra columns ignored.

Open: the full-precision buffers are still allocated (Dynamo guards their sizes and the model still owns
them); on this route the packed storage is in addition to them. ``kvcompile.apply(model, compile=True)``
(the transformers cache-API route) holds only packed storage.
"""

from __future__ import annotations

import math
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from .. import ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from ..cache.packed import PackedKV
from ..schemes.base import LayerSpec, Scheme
from ._fx import op_name, shape, static_int, tensor_meta
from .detect import AttentionSite, CacheWrite, Detection

__all__ = ["RewritePlan", "SiteOutcome", "StorageSpec", "clear_storage", "packed_storage", "rewrite"]

_INDEX_KINDS = ("setitem_index", "index_copy", "index_put")
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

    @property
    def key(self) -> tuple:
        return (self.quant, self.n_sink, self.window, self.meta_dtype)

    def allocate(self, buffer: torch.Tensor) -> PackedKV:
        b, h, cap, d = buffer.shape
        return PackedKV.empty(b, h, d, self.quant, capacity=cap, n_sink=self.n_sink, window=self.window,
                              dtype=buffer.dtype, device=buffer.device, meta_dtype=self.meta_dtype)

    def entry(self, buffer: torch.Tensor) -> _Entry:
        e = _STORE.get(buffer)
        if e is None or e.spec_key != self.key:
            e = _Entry(self.allocate(buffer), self.key)
            _STORE[buffer] = e
        return e


@dataclass
class _Group:
    """One rewritten site at run time: its K and V storages and how to recompute its write position."""

    site: int
    k: int  # index into plan.storages
    v: int
    position: int | None  # index into plan.positions


@dataclass
class _PositionFn:
    """The nodes that compute a write position, cut out of the graph so the wrapper can evaluate them."""

    module: fx.GraphModule
    inputs: tuple[int, ...]  # which graph inputs it takes


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

    @property
    def empty(self) -> bool:
        return not self.storages

    def extra_inputs(self, args: list[Any], *, check_positions: bool) -> list[torch.Tensor]:
        entries = [s.entry(args[s.buffer_input]) for s in self.storages]
        if check_positions or any(e.fresh for e in entries):
            self._check(args, entries, check_positions)
        extra: list[torch.Tensor] = []
        for s, e in zip(self.storages, entries):
            extra.extend(getattr(e.packed, n) for n in s.inner)
            e.packed._host = None  # the graph writes the counts in place: eager readers re-read them
        return extra

    def _check(self, args: list[Any], entries: list[_Entry], check_positions: bool) -> None:
        values: dict[int, torch.Tensor] = {}
        for g in self.groups:
            if g.position is None:
                continue
            if g.position not in values:
                fn = self.positions[g.position]
                values[g.position] = fn.module(*(args[i] for i in fn.inputs)).reshape(-1)
            pos = values[g.position]
            first, t = int(pos[0]), pos.numel()
            for which in (g.k, g.v):
                e, spec = entries[which], self.storages[which]
                if first == 0:
                    e.length = 0  # the graph resets the counts
                elif e.fresh:
                    # a prefill wrote buffer[..., :first] in full precision: take it over, packed
                    buf = args[spec.buffer_input]
                    e.packed._set_counts(0, 0, 0)
                    e.packed.append(buf[:, :, :first])
                    e.length = first
                elif check_positions and e.length is not None and first != e.length:
                    raise ValueError(
                        f"kvcompile: a rewritten KV-cache write (site #{g.site}, {spec.source}) comes at position "
                        f"{first}, but its packed cache holds {e.length} tokens. Packed caches append: each write "
                        "must continue the sequence, or start a new one at position 0."
                    )
                if check_positions and not torch.equal(pos.cpu(), torch.arange(first, first + t)):
                    raise ValueError(f"kvcompile: write positions {pos.tolist()} are not consecutive")
                e.length = None if e.length is None or not check_positions else e.length + t
                e.fresh = False


# ---------------------------------------------------------------------------------------------- the rewrite


@torch.fx.node.has_side_effect
def restart_at_position_zero(counts: torch.Tensor, position: torch.Tensor) -> None:
    """Zero a packed storage's ``counts`` when a write's first position is 0 (a new sequence). In graph, no
    host read: ``counts *= (position[0] != 0)``."""
    counts.mul_(position.reshape(-1)[:1].ne(0).to(counts.dtype))


log = logging.getLogger("kvcompile")
_WARNED: set[str] = set()


def rewrite(gm: fx.GraphModule, detection: Detection, example_inputs: list[Any], scheme: Scheme) -> RewritePlan:
    """Rewrite every site of ``detection`` whose K and V come from index writes into persistent buffers.

    Sites already on the kvcompile ops (``kind == "packed"``) are left as they are; every other site keeps
    running in full precision and gets its reasons in the plan's outcomes. Modifies ``gm`` in place.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    plan = RewritePlan(n_inputs=len(placeholders))
    rewritable = [s for s in detection.sites if s.kind != "packed"]
    specs = scheme.layer_specs(max(1, len(rewritable)))
    if rewritable and any(sp.k_pre_rope for sp in specs) and "pre_rope" not in _WARNED:
        # the graph does not hand the passes the model's rotary frequencies: keys are quantized after RoPE here
        _WARNED.add("pre_rope")
        log.warning("kvcompile backend: %s asks for keys quantized before RoPE (pre_rope), which the rewrite of "
                    "model-owned caches does not do yet: its keys are quantized after RoPE (use "
                    "kvcompile.apply(model, ..., compile=True) for pre-RoPE keys)", scheme.name)
    layer = 0
    position_ids: dict[fx.Node, int] = {}
    last_placeholder = placeholders[-1] if placeholders else None
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
        why = _why_not(site, example_inputs, spec) if site.matched else None
        if not site.matched or why:
            if why:
                outcome.reasons.append(why)
            continue
        # ---- new placeholders for the two storages
        new_storages = []
        for w, q in ((site.k_write, spec.k), (site.v_write, spec.v)):
            buf = example_inputs[w.storage_input_index]
            proto = StorageSpec(w.storage_input_index, w.storage_source, q, spec.n_sink, spec.window,
                                scheme.meta_dtype, ())
            pk = proto.allocate(buf)
            inner = tuple(n for n in PackedKV.tensor_data_names if getattr(pk, n) is not None)
            s = StorageSpec(proto.buffer_input, proto.source, q, spec.n_sink, spec.window, scheme.meta_dtype, inner)
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
            outcome.full_precision_bytes += buf.numel() * buf.element_size()
        (ks, knodes, kpk), (vs, vnodes, vpk) = new_storages
        # ---- the writes: reset on position 0, then quantize_kv_write_, where the original write was
        pos = site.k_write.position
        for w, s, nodes in ((site.k_write, ks, knodes), (site.v_write, vs, vnodes)):
            with graph.inserting_before(w.node):
                if isinstance(pos, fx.Node):
                    graph.call_function(restart_at_position_zero, (nodes["counts"], w.position))
                q = s.quant
                graph.call_function(_QW, (
                    w.new, *(nodes[n] for n in PackedKV.tensor_data_names), q.kind, float(q.bits),
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
        site.output.replace_all_uses_with(attn)
        for w in (site.k_write, site.v_write):
            if w.node.users:  # a functional write's result is only read by the chain to the site: now dead
                continue
            graph.erase_node(w.node)
        plan.groups.append(_Group(i, len(plan.storages) - 2, len(plan.storages) - 1,
                                  _position_fn(gm, pos, placeholders, position_ids, plan)))
        outcome.status = "rewritten"
    if not plan.empty:
        # Only pure nodes go: Dynamo's graph keeps in-place calls (``cumulative_length.add_(1)``) as unused
        # call_method nodes, which FX's default DCE would drop.
        graph.eliminate_dead_code(is_impure_node=_is_impure)
        gm.recompile()
    return plan


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output") or node.is_impure():
        return True
    name = op_name(node) or (node.target if isinstance(node.target, str) else getattr(node.target, "__name__", ""))
    return name.endswith("_") or name in ("setitem", "copy_") or node.op == "call_module"


def _why_not(site: AttentionSite, example_inputs: list[Any], spec: LayerSpec) -> str | None:
    """Why a site whose writes were found still cannot be rewritten (None: it can)."""
    kw, vw = site.k_write, site.v_write
    for label, w in (("k", kw), ("v", vw)):
        if w.kind not in _INDEX_KINDS:
            if w.family == "cat":
                return (f"{label}: the cache is appended by cat and handed back to the caller (DynamicCache, "
                        "nanoGPT's returned 'present'); that rewrite is not implemented: use "
                        "kvcompile.apply(model, scheme, compile=True), or a static cache written by index")
            return f"{label}: {w.kind} writes (by slice) are not rewritten yet; only index writes are"
        if not isinstance(w.position, fx.Node):
            return f"{label}: the write position is not a tensor"
        if w.storage_input_index is None:
            return f"{label}: the written buffer is not a graph input"
        buf = example_inputs[w.storage_input_index]
        if not isinstance(buf, torch.Tensor) or buf.dim() != 4 or w.dim != 2:
            return f"{label}: the buffer is not laid out [batch, heads, tokens, head_dim]"
        if not buf.dtype.is_floating_point:
            return f"{label}: the buffer holds {buf.dtype}, not floating-point K/V"
        if any(isinstance(x, torch.SymInt) for x in buf.shape):
            return f"{label}: the buffer has a dynamic shape"
        t = site.k_trace if label == "k" else site.v_trace
        if t.sliced:
            return f"{label}: attention reads a slice of the buffer, not all of it"
        if not _only_read_by(w.storage, w.node, t.chain, site):
            return f"{label}: the buffer is read outside this attention site"
    if kw.position is not vw.position and _position_key(kw.position) != _position_key(vw.position):
        return "K and V are written at different positions"
    if kw.storage is vw.storage:
        return "K and V share one buffer"
    q = shape(site.q)
    kb = example_inputs[kw.storage_input_index]
    vb = example_inputs[vw.storage_input_index]
    if q is None or static_int(q[-1]) != kb.shape[-1] or vb.shape[-1] != kb.shape[-1]:
        return "q, K and V head dims differ"
    hq = static_int(q[-3]) if len(q) >= 3 else None
    if hq is None or hq % kb.shape[1]:
        return "the query heads are not a multiple of the KV heads"
    for label, qq in (("k", spec.k), ("v", spec.v)):
        try:
            qq.group_for(kb.shape[-1])
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


def _only_read_by(buf: fx.Node, write: fx.Node, chain: tuple[fx.Node, ...], site: AttentionSite) -> bool:
    allowed = set(chain) | {write, site.output, *site.nodes}
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

