"""Find attention sites and the KV-cache writes that feed them, in the FX graph a torch.compile backend gets.

Graph level: Dynamo's torch-level FX graph (``def backend(gm, example_inputs)``), not aten after AOTAutograd.

* Attention is one node there: ``torch._C._nn.scaled_dot_product_attention`` with its ``scale``,
  ``is_causal``, ``enable_gqa`` and ``attn_mask`` arguments intact. After AOTAutograd, SDPA becomes a
  backend-specific op (``_scaled_dot_product_flash_attention_for_cpu``, ``_efficient_attention`` ...) or is
  decomposed into bmm/softmax, differently per device and dtype. Eager attention (matmul, scale, mask,
  softmax, matmul) reads the same at both levels, so nothing is lost by matching it here.
* Cache writes keep their identity: a placeholder is the user's object (``node.meta["grapharg"].source``
  names it, e.g. ``L['kwargs']['cache'].layers[0].keys`` or ``L['self']...._buffers['k_cache']``), which is
  what persistent packed storage must be keyed on, and in-place writes (``setitem``, ``index_copy_``) are
  still in place. Functionalization turns those into ``index_put`` + an epilogue ``copy_`` into a renamed
  input, and repeat_kv into ``expand`` + ``clone`` + ``_unsafe_view``; the link to the source is harder to
  recover. A rewrite at this level inserts custom ops that AOTAutograd/inductor then see as opaque calls
  (the feasibility probe showed mutating custom ops survive that path in place).
* The price is spellings: ``x @ y`` / ``torch.matmul`` / ``x.matmul``, methods vs functions, in-place vs
  functional writes. ``_fx.op_name`` folds them into one name per op; the matchers below compare names.

This is the "hand-built matcher where tracing cannot express it" case of the style guide: the sites
vary in a long tail (masks added or ``where``-d or ``masked_fill``-ed, scale on q or on the scores, casts,
dropout, repeat_kv or ``enable_gqa`` or ``repeat_interleave``) and the K/V walk crosses an arbitrary chain
of views back to a write, which ``replace_pattern`` cannot express without one pattern per combination.

Sites already on the kvcompile ops (``kind="packed"``: a model set up by ``kvcompile.apply(...,
compile=True)``, whose cache layer calls ``quantize_kv_write_`` and whose attention function calls
``dequant_attention``) are matched at the same level, by op name, and count as matched; there the packed
state enters the graph as a ``PackedKV`` tensor subclass held by the cache, which Dynamo flattens into one
placeholder per inner tensor (codes, scale, ..., counts), and the ops write those in place.

Output: ``detect(gm)`` returns a ``Detection`` of ``AttentionSite`` objects that hold the graph's own nodes
(q/k/v operands, scale and mask nodes, the repeat to remove, the write and its storage placeholder and
position), so a rewrite can consume them directly; ``report.build_report`` turns them into plain data.
Detection never changes the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._fx import (arg, graph_order, is_input, ndim, op_name, same_sizes, shape, source_name, static_int,
                  tensor_meta)

__all__ = ["AttentionSite", "CacheWrite", "Detection", "MaskTerm", "OperandTrace", "RepeatKV", "detect"]

COUNTER = "kvcompile"

# Ops a K/V operand may pass through between the cache write and attention without changing which tokens
# it holds: layout, dtype and copies. Each is handled by `_step_back`, which also tracks the token dim.
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten"}
_SAME_DIMS = {"contiguous", "expand", "expand_as", "to", "type", "type_as", "float", "half", "bfloat16", "clone", "detach",
              "_to_copy", "alias"}
_CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "_to_copy"}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MAX_PEEL = 10


# ----------------------------------------------------------------------------------------------------------
# Match records. They hold live nodes of the graph they were found in; report.py renders them as names.


@dataclass
class RepeatKV:
    """A GQA head repeat on the way from the cache to attention; a fused kernel reads ``source`` instead."""

    source: fx.Node  # [..., H_kv, S, D]
    output: fx.Node  # [..., H_kv * n_rep, S, D]
    n_rep: int | None
    nodes: tuple[fx.Node, ...]  # source-side first: getitem/unsqueeze, expand, reshape; or repeat_interleave
    spelling: Literal["expand_reshape", "repeat_interleave"]


@dataclass
class CacheWrite:
    """One write of new tokens into a KV cache."""

    kind: Literal["cat", "index_copy", "index_put", "setitem_index", "setitem_slice", "slice_copy", "slice_scatter",
                  "packed"]
    node: fx.Node  # the cat / index_copy_ / setitem / copy_ / kvcompile::quantize_kv_write_ node
    storage: fx.Node  # the past tensor (cat) or the buffer written into, usually a placeholder
    new: fx.Node  # the new-token tensor
    position: Any  # index tensor node, slice start (node or int); None for cat (appends at the end)
    dim: int  # token dim of `storage`, non-negative
    in_place: bool
    storage_source: str | None  # Dynamo source of the storage placeholder
    storage_input_index: int | None  # its position among the graph's placeholders (= example_inputs index)

    @property
    def family(self) -> Literal["cat", "index", "slice", "packed"]:
        if self.kind in ("cat", "packed"):
            return self.kind
        if self.kind in ("setitem_slice", "slice_copy", "slice_scatter"):
            return "slice"
        return "index"

    @property
    def storage_is_input(self) -> bool:
        return is_input(self.storage)


@dataclass
class OperandTrace:
    """The walk from an attention operand back to where its tokens come from."""

    operand: fx.Node
    root: fx.Node  # first node that is not a layout/dtype op
    chain: tuple[fx.Node, ...]  # operand first, up to (not including) root
    seq_dim: int | None  # token dim in root's coordinates (non-negative), None where a reshape lost it
    repeat: RepeatKV | None
    sliced: bool  # a partial slice on the way: attention reads part of the storage
    write: CacheWrite | None = None
    reason: str | None = None


@dataclass
class MaskTerm:
    kind: Literal["attn_mask", "additive", "where", "masked_fill"]
    mask: Any  # the mask tensor node (bool condition or additive bias)
    op: fx.Node | None  # the add / where / masked_fill node; None for SDPA's attn_mask argument
    fill: Any = None  # the fill value of where / masked_fill


@dataclass
class AttentionSite:
    kind: Literal["sdpa", "eager", "packed"]  # packed: already kvcompile::dequant_attention (cache-API route)
    output: fx.Node  # the SDPA node, the probs @ v matmul, or the dequant_attention node
    q: fx.Node
    k: fx.Node  # [..., S, D] as attention reads it (after any repeat); for eager, before the transpose
    v: fx.Node
    k_trace: OperandTrace
    v_trace: OperandTrace
    scale_terms: tuple[tuple[str, Any], ...] = ()  # ("mul" | "div", float | node) on the scores
    q_scale_terms: tuple[tuple[str, Any], ...] = ()  # the same, applied to q before the matmul (OPT, GPT-2)
    q_scale_ops: tuple[fx.Node, ...] = ()
    masks: tuple[MaskTerm, ...] = ()
    is_causal: bool = False
    enable_gqa: bool = False
    dropout_p: Any = 0.0
    softmax_dtype: torch.dtype | None = None
    nodes: tuple[fx.Node, ...] = ()  # the site's own nodes (SDPA; or matmul ... matmul for eager)
    reasons: list[str] = field(default_factory=list)

    @property
    def mask(self) -> Any:
        return self.masks[0].mask if self.masks else None

    @property
    def head_dim(self) -> int | None:
        s = shape(self.q)
        return static_int(s[-1]) if s else None

    @property
    def gqa_ratio(self) -> int | None:
        """Query heads per KV head, from the example shapes (1 for MHA); None if unknown."""
        for t in (self.k_trace, self.v_trace):
            if t.repeat is not None and t.repeat.n_rep:
                return t.repeat.n_rep
        qs, ks = shape(self.q), shape(self.k)
        if not qs or not ks or len(qs) < 3 or len(ks) < 3:
            return None
        hq, hk = static_int(qs[-3]), static_int(ks[-3])
        return hq // hk if hq and hk and hq % hk == 0 else None

    @property
    def scale(self) -> float | fx.Node | None:
        """Score scale: a float, a node, or None for SDPA's default 1/sqrt(head_dim). Excludes q pre-scaling."""
        if self.kind == "sdpa" and not self.scale_terms:
            return None
        return _fold_scale(self.scale_terms)

    @property
    def effective_scale(self) -> float | None:
        """The single constant a fused kernel multiplies q.k by (score scale times any q pre-scale)."""
        base = self.scale
        if base is None and self.kind == "sdpa":
            base = 1.0 / math.sqrt(self.head_dim) if self.head_dim else None
        pre = _fold_scale(self.q_scale_terms)
        if isinstance(base, (int, float)) and isinstance(pre, (int, float)):
            return float(base) * float(pre)
        return None

    @property
    def k_write(self) -> CacheWrite | None:
        return self.k_trace.write

    @property
    def v_write(self) -> CacheWrite | None:
        return self.v_trace.write

    @property
    def matched(self) -> bool:
        return self.k_write is not None and self.v_write is not None


@dataclass
class Detection:
    graph: fx.Graph
    sites: list[AttentionSite]

    @property
    def writes(self) -> list[CacheWrite]:
        seen: dict[fx.Node, CacheWrite] = {}
        for s in self.sites:
            for w in (s.k_write, s.v_write):
                if w is not None:
                    seen.setdefault(w.node, w)
        return list(seen.values())

    def counts(self) -> dict[str, int]:
        writes = self.writes
        return {
            "attention_sites": len(self.sites),
            "sdpa_sites": sum(s.kind == "sdpa" for s in self.sites),
            "eager_sites": sum(s.kind == "eager" for s in self.sites),
            "packed_sites": sum(s.kind == "packed" for s in self.sites),
            "matched_sites": sum(s.matched for s in self.sites),
            "unmatched": sum(not s.matched for s in self.sites),
            "repeat_kv": sum(s.k_trace.repeat is not None or s.v_trace.repeat is not None for s in self.sites),
            "cache_writes_cat": sum(w.family == "cat" for w in writes),
            "cache_writes_index": sum(w.family == "index" for w in writes),
            "cache_writes_slice": sum(w.family == "slice" for w in writes),
            "cache_writes_packed": sum(w.family == "packed" for w in writes),
        }


def _fold_scale(terms: tuple[tuple[str, Any], ...]) -> float | fx.Node | None:
    if not terms:
        return 1.0
    value = 1.0
    for kind, t in terms:
        if isinstance(t, (int, float)):
            value = value * t if kind == "mul" else value / t
        elif len(terms) == 1 and kind == "mul":
            return t
        else:
            return None  # a node divisor or several node terms: the rewrite must read scale_terms
    return value


# ----------------------------------------------------------------------------------------------------------
# Entry point


def detect(gm: fx.GraphModule, example_inputs: Any = None, *, count: bool = True) -> Detection:
    """Find every attention site of ``gm`` and the cache writes feeding its K and V. Does not modify ``gm``.

    ``example_inputs`` is used only when the graph carries no example values (not a Dynamo graph): then
    fake-tensor propagation fills them in, since shapes decide GQA ratios and token dims.
    """
    graph = gm.graph
    if example_inputs is not None and not any(tensor_meta(n) is not None for n in graph.nodes):
        _propagate_fake(gm, example_inputs)
    order = graph_order(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ctx = _Ctx(order, {n: i for i, n in enumerate(placeholders)})
    sites: list[AttentionSite] = []
    for node in graph.nodes:
        name = op_name(node)
        if name == "sdpa":
            sites.append(_match_sdpa(node, ctx))
        elif name == "dequant_attention":
            sites.append(_match_packed(node, ctx))
        elif name == "softmax":
            site = _match_eager(node, ctx)
            if site is not None:
                sites.append(site)
    sites.sort(key=lambda s: order[s.output])
    result = Detection(graph, sites)
    if count:
        c = counters[COUNTER]
        c["graphs"] += 1
        for key, value in result.counts().items():
            c[key] += value
    return result


@dataclass
class _Ctx:
    order: dict[fx.Node, int]
    input_index: dict[fx.Node, int]


def _propagate_fake(gm: fx.GraphModule, example_inputs: Any) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*example_inputs)


# ----------------------------------------------------------------------------------------------------------
# Attention sites


def _match_sdpa(node: fx.Node, ctx: _Ctx) -> AttentionSite:
    p = {name: arg(node, i, name, None) for i, name in enumerate(_SDPA_PARAMS)}
    q, k, v = p["query"], p["key"], p["value"]
    scale = p["scale"]
    q_terms, q_ops = _q_prescale(q)
    site = AttentionSite(
        kind="sdpa",
        output=node,
        q=q,
        k=k,
        v=v,
        k_trace=_trace(k, -2, node, ctx),
        v_trace=_trace(v, -2, node, ctx),
        scale_terms=() if scale is None else (("mul", scale),),
        q_scale_terms=q_terms,
        q_scale_ops=q_ops,
        masks=() if p["attn_mask"] is None else (MaskTerm("attn_mask", p["attn_mask"], None),),
        is_causal=bool(p["is_causal"]) if isinstance(p["is_causal"], bool) else False,
        enable_gqa=bool(p["enable_gqa"]) if isinstance(p["enable_gqa"], bool) else False,
        dropout_p=0.0 if p["dropout_p"] is None else p["dropout_p"],
        nodes=(node,),
    )
    if not isinstance(p["is_causal"], (bool, type(None))) or not isinstance(p["enable_gqa"], (bool, type(None))):
        site.reasons.append("is_causal / enable_gqa is not a constant")
    _finish(site)
    return site


# kvcompile::dequant_attention's arguments: q, 7 K storage tensors, 7 V storage tensors, then scalars
_DA_K, _DA_V, _DA_SCALE, _DA_MASK, _DA_CAUSAL = 1, 9, 27, 28, 29


def _match_packed(node: fx.Node, ctx: _Ctx) -> AttentionSite:
    """An attention site that already reads packed storage (a model set up by ``kvcompile.apply`` with
    ``packed_attention=True``: the cache layer and the attention function call the kvcompile ops, which Dynamo
    records as they are). Its writes are the ``quantize_kv_write_`` calls into the same storage tensors."""
    args = node.args

    def packed_trace(first: int, label: str) -> OperandTrace:
        codes = args[first] if len(args) > first else None
        trace = OperandTrace(codes, codes, (), 2, None, False)
        if not isinstance(codes, fx.Node):
            trace.reason = f"{label}: packed storage is not a graph node"
            return trace
        writes = [u for u in codes.users if op_name(u) == "quantize_kv_write_" and u.args[1] is codes
                  and ctx.order[u] < ctx.order[node]]
        if not writes:
            trace.reason = (f"{label}: reads packed storage {_describe(codes)} that nothing in this graph writes "
                            "before attention reads it")
            return trace
        w = writes[-1]
        trace.write = CacheWrite(
            kind="packed", node=w, storage=codes, new=w.args[0], position=w.args[7], dim=2, in_place=True,
            storage_source=source_name(codes) if is_input(codes) else None,
            storage_input_index=ctx.input_index.get(codes),
        )
        return trace

    scale = args[_DA_SCALE] if len(args) > _DA_SCALE else None
    mask = args[_DA_MASK] if len(args) > _DA_MASK else None
    causal = args[_DA_CAUSAL] if len(args) > _DA_CAUSAL else False
    site = AttentionSite(
        kind="packed", output=node, q=args[0], k=args[_DA_K], v=args[_DA_V],
        k_trace=packed_trace(_DA_K, "k"), v_trace=packed_trace(_DA_V, "v"),
        scale_terms=(("mul", scale),) if scale is not None else (),
        masks=() if mask is None else (MaskTerm("attn_mask", mask, None),),
        is_causal=bool(causal) if isinstance(causal, bool) else False, nodes=(node,),
    )
    _finish(site)
    return site


def _match_eager(softmax: fx.Node, ctx: _Ctx) -> AttentionSite | None:
    """softmax(scores) -> [casts] -> [dropout] -> probs @ v, with scores = mask(scale(q @ k^T)). None if the
    softmax does not feed a matmul as its left operand (a router, a sampling head: not attention)."""
    dim = arg(softmax, 1, "dim", None)
    nd = ndim(softmax)
    if dim is None or (dim != -1 and (nd is None or dim != nd - 1)):
        return None
    post: list[fx.Node] = []
    pv: fx.Node | None = None
    cur = softmax
    dropout_p: Any = 0.0
    for _ in range(6):
        nxt = None
        for user in cur.users:
            name = op_name(user)
            if name == "matmul" and user.args[0] is cur:
                pv = user
                break
            if name in _CASTS and user.args[0] is cur:
                nxt = user
            elif name == "dropout" and arg(user, 0, "input") is cur:
                nxt = user
                training = arg(user, 2, "training", True)
                dropout_p = arg(user, 1, "p", 0.5) if training is not False else 0.0
        if pv is not None or nxt is None:
            break
        post.append(nxt)
        cur = nxt
    if pv is None:
        return None
    peeled = _peel_scores(arg(softmax, 0, "input"), 0)
    v = pv.args[1]
    if peeled is None:
        site = AttentionSite(
            kind="eager", output=pv, q=softmax, k=softmax, v=v,
            k_trace=OperandTrace(softmax, softmax, (), None, None, False,
                                 reason="k: no q @ k^T found before the softmax"),
            v_trace=_trace(v, -2, pv, ctx), nodes=(softmax, *post, pv),
        )
        site.reasons.append("softmax feeds probs @ v, but its input is not recognised as mask(scale(q @ k^T))")
        _finish(site)
        return site
    qk, kt, scale_terms, masks, pre = peeled
    q = qk.args[0]
    k = kt.args[0] if kt is not None else qk.args[1]
    q_terms, q_ops = _q_prescale(q)
    softmax_dtype = arg(softmax, 3, "dtype", None)
    site = AttentionSite(
        kind="eager",
        output=pv,
        q=q,
        k=k,
        v=v,
        # Trace k^T from its token dim -1: the transpose (if any) becomes the first chain link.
        k_trace=_trace(qk.args[1], -1, qk, ctx),
        v_trace=_trace(v, -2, pv, ctx),
        scale_terms=tuple(scale_terms),
        q_scale_terms=q_terms,
        q_scale_ops=q_ops,
        masks=tuple(masks),
        dropout_p=dropout_p,
        softmax_dtype=softmax_dtype if isinstance(softmax_dtype, torch.dtype) else None,
        nodes=(qk, *([kt] if kt is not None else []), *pre, softmax, *post, pv),
    )
    if kt is None:
        site.reasons.append("k enters q @ k^T without a visible transpose of its last two dims")
    _finish(site)
    return site


def _peel_scores(x: Any, depth: int):
    """Walk back from the softmax input through casts, masks and scales to the q @ k^T matmul.

    Returns (qk_matmul, k_transpose_or_None, scale_terms, masks, nodes) or None. Which operand of an
    add / mul / where is the score side is decided by which one reaches the matmul.
    """
    if not isinstance(x, fx.Node) or depth > _MAX_PEEL:
        return None
    name = op_name(x)
    if name == "matmul":
        kt = x.args[1]
        return x, (kt if _is_last2_transpose(kt) else None), [], [], []

    def inner(score: Any, build) -> Any:
        r = _peel_scores(score, depth + 1)
        if r is None:
            return None
        qk, kt, scales, masks, nodes = r
        build(scales, masks)
        return qk, kt, scales, masks, [*nodes, x]

    if name in _CASTS:
        return inner(x.args[0], lambda s, m: None)
    if name == "add" and len(x.args) == 2:
        a, b = x.args
        return (inner(a, lambda s, m: m.append(MaskTerm("additive", b, x)))
                or inner(b, lambda s, m: m.append(MaskTerm("additive", a, x))))
    if name == "masked_fill":
        term = MaskTerm("masked_fill", arg(x, 1, "mask"), x, arg(x, 2, "value"))
        return inner(x.args[0], lambda s, m: m.append(term))
    if name == "where" and len(x.args) == 3:
        cond, a, b = x.args
        return (inner(a, lambda s, m: m.append(MaskTerm("where", cond, x, b)))
                or inner(b, lambda s, m: m.append(MaskTerm("where", cond, x, a))))
    if name == "mul" and len(x.args) == 2:
        a, b = x.args
        return inner(a, lambda s, m: s.append(("mul", b))) or inner(b, lambda s, m: s.append(("mul", a)))
    if name == "div" and len(x.args) == 2 and not x.kwargs.get("rounding_mode"):
        return inner(x.args[0], lambda s, m: s.append(("div", x.args[1])))
    return None


def _is_last2_transpose(node: Any) -> bool:
    name = op_name(node)
    nd = ndim(node)
    if name == "transpose" and len(node.args) >= 3:
        a, b = node.args[1], node.args[2]
        if not isinstance(a, int) or not isinstance(b, int):
            return False
        if nd is None:
            return {a, b} == {-1, -2}
        return {a % nd, b % nd} == {nd - 1, nd - 2}
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        n = len(dims)
        dims = [d % n for d in dims if isinstance(d, int)]
        return len(dims) == n >= 2 and dims == [*range(n - 2), n - 1, n - 2]
    return name == "t" and nd == 2


def _is_scalar(x: Any) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, fx.Node):
        t = tensor_meta(x)
        if t is not None:
            return statically_known_true(t.numel() == 1)
        return isinstance(x.meta.get("example_value", x.meta.get("val")), (torch.SymFloat, torch.SymInt))
    return False


def _q_prescale(q: Any) -> tuple[tuple[tuple[str, Any], ...], tuple[fx.Node, ...]]:
    """Scalar multiplies/divides applied to q on its way to attention, through layout ops (OPT: q_proj(x) * s)."""
    terms: list[tuple[str, Any]] = []
    ops: list[fx.Node] = []
    cur = q
    for _ in range(_MAX_PEEL):
        name = op_name(cur)
        if name in _RESHAPES | _SAME_DIMS | {"transpose", "permute"}:
            cur = cur.args[0]
        elif name == "mul" and len(cur.args) == 2 and _is_scalar(cur.args[1]):
            terms.append(("mul", cur.args[1]))
            ops.append(cur)
            cur = cur.args[0]
        elif name == "mul" and len(cur.args) == 2 and _is_scalar(cur.args[0]):
            terms.append(("mul", cur.args[0]))
            ops.append(cur)
            cur = cur.args[1]
        elif name == "div" and len(cur.args) == 2 and _is_scalar(cur.args[1]) and not cur.kwargs.get("rounding_mode"):
            terms.append(("div", cur.args[1]))
            ops.append(cur)
            cur = cur.args[0]
        else:
            break
        if not isinstance(cur, fx.Node):
            break
    return tuple(terms), tuple(ops)


def _finish(site: AttentionSite) -> None:
    for label, t in (("k", site.k_trace), ("v", site.v_trace)):
        if t.write is None and t.reason:
            site.reasons.append(t.reason if t.reason.startswith(f"{label}:") else f"{label}: {t.reason}")
    if isinstance(site.dropout_p, (int, float)) and site.dropout_p:
        site.reasons.append(f"dropout p={site.dropout_p} is active (training graph?)")


# ----------------------------------------------------------------------------------------------------------
# K/V operand -> cache write


def _trace(operand: Any, seq: int, reader: fx.Node, ctx: _Ctx) -> OperandTrace:
    """Walk from ``operand`` back through layout/dtype ops to its root; then identify the cache write.

    ``seq`` is the token dim of ``operand`` as a negative index; it is carried back through every step
    (transposes swap it, reshapes keep it only where the trailing dims are unchanged) so that a write is
    accepted only along the dim attention reads tokens from, not a head-dim ``cat`` such as partial RoPE.
    """
    if not isinstance(operand, fx.Node):
        return OperandTrace(operand, operand, (), None, None, False, reason="operand is not a graph node")
    chain: list[fx.Node] = []
    repeat: RepeatKV | None = None
    sliced = False
    cur: fx.Node = operand
    cur_seq: int | None = seq
    while True:
        rep = _match_repeat(cur)
        if rep is not None and repeat is None:
            repeat = rep
            chain.extend(reversed(rep.nodes))
            cur_seq = _same_trailing(rep.output, rep.source, cur_seq)
            cur = rep.source
            continue
        step = _step_back(cur, cur_seq)
        if step is None:
            break
        prev, cur_seq, part = step
        sliced = sliced or part
        chain.append(cur)
        cur = prev
    nd = ndim(cur)
    seq_pos = None if cur_seq is None or nd is None else cur_seq + nd
    trace = OperandTrace(operand, cur, tuple(chain), seq_pos, repeat, sliced)
    read_at = chain[-1] if chain else reader
    _find_write(trace, read_at, ctx)
    return trace


def _match_repeat(node: fx.Node) -> RepeatKV | None:
    """transformers' repeat_kv (``x[:, :, None].expand(b, h, n, s, d).reshape(b, h*n, s, d)``, also spelled with
    unsqueeze) and gpt-fast's ``x.repeat_interleave(n, dim=1)``."""
    name = op_name(node)
    if name == "repeat_interleave":
        src = node.args[0]
        reps = arg(node, 1, "repeats")
        dim = arg(node, 2, "dim")
        nd = ndim(node)
        if not isinstance(src, fx.Node) or not isinstance(reps, int) or not isinstance(dim, int) or nd is None:
            return None
        if dim % nd != nd - 3:  # head dim of [..., H, S, D]
            return None
        return RepeatKV(src, node, reps, (node,), "repeat_interleave")
    if name not in _RESHAPES:
        return None
    expand = node.args[0]
    if op_name(expand) not in ("expand", "expand_as"):
        return None
    insert = expand.args[0]
    iname = op_name(insert)
    if iname == "unsqueeze":
        pass
    elif iname == "getitem" and isinstance(insert.args[1], tuple) and None in insert.args[1]:
        pass
    else:
        return None
    src = insert.args[0]
    s_src, s_out = shape(src), shape(node)
    if s_src is None or s_out is None or len(s_src) != len(s_out) or len(s_src) < 3:
        return None
    if not same_sizes(s_src[-2:], s_out[-2:]) or not same_sizes(s_src[:-3], s_out[:-3]):
        return None
    h_src, h_out = static_int(s_src[-3]), static_int(s_out[-3])
    n_rep = h_out // h_src if h_src and h_out and h_out % h_src == 0 else None
    return RepeatKV(src, node, n_rep, (insert, expand, node), "expand_reshape")


def _same_trailing(out: fx.Node, inp: Any, seq: int | None) -> int | None:
    """Keep a negative token dim across a reshape when every dim from it to the end is unchanged."""
    if seq is None:
        return None
    so, si = shape(out), shape(inp)
    if so is None or si is None or len(so) < -seq or len(si) < -seq:
        return None
    return seq if same_sizes(so[seq:], si[seq:]) else None


def _step_back(node: fx.Node, seq: int | None) -> tuple[fx.Node, int | None, bool] | None:
    """One step from ``node`` to its tensor input, with the token dim mapped; None where the walk stops."""
    name = op_name(node)
    if name is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    inp = node.args[0]
    nd = ndim(node)
    if name in _SAME_DIMS:
        return inp, seq, False
    if name in _RESHAPES:
        return inp, _same_trailing(node, inp, seq), False
    if name == "transpose":
        a, b = node.args[1], node.args[2]
        if seq is None or not isinstance(a, int) or not isinstance(b, int):
            return inp, None, False
        if nd is None and (a >= 0 or b >= 0):
            return inp, None, False
        a, b = (a - nd if a >= 0 else a), (b - nd if b >= 0 else b)
        return inp, (b if seq == a else a if seq == b else seq), False
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if seq is None or nd is None or not all(isinstance(d, int) for d in dims):
            return inp, None, False
        return inp, (dims[seq + nd] % nd) - nd, False
    if name == "unsqueeze":
        d = arg(node, 1, "dim")
        if seq is None or nd is None or not isinstance(d, int):
            return inp, None, False
        d, p = d % nd, seq + nd
        return inp, (None if d == p else seq + 1 if d > p else seq), False
    if name == "narrow":
        return inp, seq, True
    if name == "getitem":
        return _getitem_back(node, inp, seq)
    return None


def _getitem_back(node: fx.Node, inp: fx.Node, seq: int | None):
    """Basic indexing by slices / None / Ellipsis only (an int or tensor index selects, it is no view)."""
    if tensor_meta(inp) is None:
        return None  # getitem on a tuple (split/chunk outputs): the walk ends here
    idx = node.args[1]
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or isinstance(i, slice) for i in items):
        return None
    n_in, n_out = ndim(inp), ndim(node)
    partial = any(isinstance(i, slice) and i != slice(None) for i in items)
    if seq is None or n_in is None or n_out is None:
        return inp, None, partial
    consumed = sum(isinstance(i, slice) for i in items)
    expanded: list[Any] = []
    for i in items:
        expanded.extend([slice(None)] * (n_in - consumed) if i is Ellipsis else [i])
    out_to_in: list[int | None] = []
    d_in = 0
    for i in expanded:
        if i is None:
            out_to_in.append(None)
        else:
            out_to_in.append(d_in)
            d_in += 1
    out_to_in.extend(range(d_in, n_in))
    if len(out_to_in) != n_out:
        return inp, None, partial
    src = out_to_in[seq + n_out]
    return inp, (None if src is None else src - n_in), partial


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        src = source_name(node)
        return f"`{node.name}`" + (f" ({src})" if src else "")
    target = node.target
    what = op_name(node) or (target if isinstance(target, str) else getattr(target, "__name__", str(target)))
    return f"`{node.name}` ({what})"


def _find_write(trace: OperandTrace, read_at: fx.Node, ctx: _Ctx) -> None:
    root, seq = trace.root, trace.seq_dim
    name = op_name(root)
    if name == "cat":
        trace.write, trace.reason = _write_from_cat(root, seq, ctx)
        return
    if name in ("index_copy", "index_copy_", "index_put", "index_put_", "slice_scatter"):
        w = _write_from_call(root, ctx)
        if w is not None:
            trace.write, trace.reason = _check_dim(w, seq)
            return
    if is_input(root):
        writes = [w for w in _writes_into(root, ctx) if ctx.order[w.node] < ctx.order[read_at]]
        if not writes:
            trace.reason = (f"no cache write: reads graph input {_describe(root)}, which nothing in this graph "
                            "writes before attention reads it")
            return
        trace.write, trace.reason = _check_dim(writes[-1], seq)
        return
    writes = [w for w in _writes_into(root, ctx) if ctx.order[w.node] < ctx.order[read_at]]
    if writes:
        trace.reason = (f"{_describe(writes[-1].node)} writes into {_describe(root)}, a tensor created in this graph "
                        "(e.g. a cache lazily allocated inside a compiled prefill), not storage passed in")
        return
    trace.reason = f"no cache write feeds it: computed inline (traced back to {_describe(root)})"


def _check_dim(w: CacheWrite, seq: int | None) -> tuple[CacheWrite | None, str | None]:
    if seq is None or w.dim == seq:
        return w, None
    return None, (f"{_describe(w.node)} writes {_describe(w.storage)} along dim {w.dim}, "
                  f"but attention reads tokens along dim {seq}")


def _root_of(node: Any) -> Any:
    cur = node
    while isinstance(cur, fx.Node):
        step = _step_back(cur, None)
        if step is None:
            break
        cur = step[0]
    return cur


def _make_write(kind, node, storage, new, position, dim, in_place, ctx: _Ctx) -> CacheWrite:
    root = _root_of(storage)
    return CacheWrite(
        kind=kind, node=node, storage=root if is_input(root) else storage, new=new, position=position,
        dim=dim, in_place=in_place,
        storage_source=source_name(root) if is_input(root) else None,
        storage_input_index=ctx.input_index.get(root),
    )


def _write_from_cat(node: fx.Node, seq: int | None, ctx: _Ctx) -> tuple[CacheWrite | None, str | None]:
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    nd = ndim(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None, f"no cache write feeds it: {_describe(node)} has a non-constant layout"
    dim_pos = dim % nd if nd is not None else dim
    token_dim = seq if seq is not None else (nd - 2 if nd is not None else None)
    if token_dim is None or dim_pos != token_dim:
        return None, (f"no cache write feeds it: computed inline (traced back to {_describe(node)}, "
                      f"a cat along dim {dim} that is not the token dim)")
    if len(tensors) != 2:
        return None, f"{_describe(node)} concatenates {len(tensors)} tensors along the token dim, expected [past, new]"
    past, new = tensors
    w = _make_write("cat", node, past, new, None, dim_pos, False, ctx)
    if not w.storage_is_input:
        return None, (f"{_describe(node)} appends to {_describe(past)}, which is computed in this graph, "
                      "not a cache passed in")
    return w, None


def _write_from_call(node: fx.Node, ctx: _Ctx) -> CacheWrite | None:
    """index_copy(_) / index_put(_) / slice_scatter, whose result (or, in place, whose self) is the cache."""
    name = op_name(node)
    storage = node.args[0]
    nd = ndim(storage) or ndim(node)
    in_place = name.endswith("_")
    if name.startswith("index_copy"):
        dim, index, new = arg(node, 1, "dim"), arg(node, 2, "index"), arg(node, 3, "source")
        if not isinstance(dim, int) or nd is None:
            return None
        return _make_write("index_copy", node, storage, new, index, dim % nd, in_place, ctx)
    if name.startswith("index_put"):
        indices, new = arg(node, 1, "indices"), arg(node, 2, "values")
        if not isinstance(indices, (list, tuple)):
            return None
        used = [i for i, x in enumerate(indices) if x is not None]
        if len(used) != 1:
            return None
        return _make_write("index_put", node, storage, new, indices[used[0]], used[0], in_place, ctx)
    if name == "slice_scatter":
        new, dim, start = arg(node, 1, "src"), arg(node, 2, "dim", 0), arg(node, 3, "start")
        if not isinstance(dim, int) or nd is None:
            return None
        return _make_write("slice_scatter", node, storage, new, start, dim % nd, False, ctx)
    return None


def _writes_into(buf: fx.Node, ctx: _Ctx) -> list[CacheWrite]:
    """In-place writes into a graph input, in graph order: ``buf[idx] = new`` (setitem), ``buf.index_copy_``,
    ``buf.index_put_``, and ``buf[..slices..].copy_(new)`` / ``buf.narrow(...).copy_(new)``."""
    found: list[CacheWrite] = []
    nd = ndim(buf)
    for user in buf.users:
        name = op_name(user)
        if not user.args or user.args[0] is not buf:
            continue
        if name == "setitem":
            w = _write_from_setitem(user, buf, nd, ctx)
        elif name in ("index_copy_", "index_put_"):
            w = _write_from_call(user, ctx)
        elif name in ("getitem", "narrow"):
            w = _write_from_alias_copy(user, buf, nd, ctx)
        else:
            w = None
        if w is not None:
            found.append(w)
    found.sort(key=lambda w: ctx.order[w.node])
    return found


def _expand_index(idx: Any, nd: int | None) -> list[Any] | None:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if nd is None:
        return None if Ellipsis in items else items
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = nd - (len(items) - 1 - sum(i is None for i in items))
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    return items


def _write_from_setitem(node: fx.Node, buf: fx.Node, nd: int | None, ctx: _Ctx) -> CacheWrite | None:
    items = _expand_index(node.args[1], nd)
    if items is None or None in items:
        return None
    chosen = [(d, i) for d, i in enumerate(items) if not (isinstance(i, slice) and i == slice(None))]
    if len(chosen) != 1:
        return None  # a batch-and-position write or a whole-buffer write: not a token write we know
    dim, index = chosen[0]
    new = node.args[2]
    if isinstance(index, slice):
        return _make_write("setitem_slice", node, buf, new, index.start, dim, True, ctx)
    return _make_write("setitem_index", node, buf, new, index, dim, True, ctx)


def _write_from_alias_copy(alias: fx.Node, buf: fx.Node, nd: int | None, ctx: _Ctx) -> CacheWrite | None:
    copies = [u for u in alias.users if op_name(u) == "copy_" and u.args[0] is alias]
    if len(copies) != 1:
        return None
    if op_name(alias) == "narrow":
        dim, start = arg(alias, 1, "dim"), arg(alias, 2, "start")
        if not isinstance(dim, int) or nd is None:
            return None
        return _make_write("slice_copy", copies[0], buf, copies[0].args[1], start, dim % nd, True, ctx)
    items = _expand_index(alias.args[1], nd)
    if items is None or None in items or not all(isinstance(i, slice) for i in items):
        return None
    chosen = [(d, i) for d, i in enumerate(items) if i != slice(None)]
    if len(chosen) != 1:
        return None
    dim, sl = chosen[0]
    return _make_write("slice_copy", copies[0], buf, copies[0].args[1], sl.start, dim, True, ctx)
