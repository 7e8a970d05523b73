"""What the passes found, as plain data: one ``SiteReport`` per attention site, ``to_text()`` for people.

Reports hold node *names* and constants, never live nodes, so they stay valid after the graph is
rewritten or freed. The matcher output a rewrite consumes is ``detect.Detection`` (live nodes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._fx import render

if TYPE_CHECKING:
    from .detect import AttentionSite, CacheWrite, Detection

__all__ = ["DetectionReport", "SiteReport", "WriteReport", "build_report"]


@dataclass(frozen=True)
class WriteReport:
    kind: str  # cat | index_copy | index_put | setitem_index | setitem_slice | slice_copy | slice_scatter
    family: str  # cat | index | slice
    node: str
    storage: str  # the past placeholder (cat) or the buffer written into
    storage_source: str | None  # Dynamo source, e.g. L['kwargs']['cache'].layers[0].keys
    storage_input_index: int | None  # index into the backend's example_inputs
    new: str
    position: Any  # node name, int, or None (cat appends)
    dim: int
    in_place: bool

    def describe(self) -> str:
        where = f"`{self.storage}`" + (f" ({self.storage_source})" if self.storage_source else "")
        pos = "" if self.position is None else f" at {self.position}"
        return f"{self.kind} of `{self.new}` into {where}, token dim {self.dim}{pos}"


@dataclass(frozen=True)
class SiteReport:
    index: int
    kind: str  # sdpa | eager
    output: str
    q: str
    k: str
    v: str
    scale: Any  # float, node name, or None (SDPA default 1/sqrt(head_dim), or see scale_terms)
    scale_terms: tuple[tuple[str, Any], ...]  # ("mul" | "div", float | node name) applied to the scores
    q_scale_terms: tuple[tuple[str, Any], ...]  # the same applied to q before attention (OPT)
    effective_scale: float | None  # score scale times any scaling applied to q before attention
    mask: str | None
    mask_kinds: tuple[str, ...]
    is_causal: bool
    enable_gqa: bool
    gqa_ratio: int | None
    repeat_kv: str | None  # expand_reshape | repeat_interleave: a repeat a fused kernel would drop
    k_write: WriteReport | None
    v_write: WriteReport | None
    reasons: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        return self.k_write is not None and self.v_write is not None


@dataclass(frozen=True)
class DetectionReport:
    name: str
    sites: tuple[SiteReport, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def matched_sites(self) -> tuple[SiteReport, ...]:
        return tuple(s for s in self.sites if s.matched)

    @property
    def unmatched_sites(self) -> tuple[SiteReport, ...]:
        return tuple(s for s in self.sites if not s.matched)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        c = self.counts
        lines = [
            f"kvcompile detection [{self.name}]: {len(self.sites)} attention site(s) "
            f"({c.get('sdpa_sites', 0)} sdpa, {c.get('eager_sites', 0)} eager); "
            f"K/V cache writes matched for {len(self.matched_sites)}, not for {len(self.unmatched_sites)}"
        ]
        for s in self.sites:
            if s.scale is None and s.scale_terms:
                scale = "".join(("*" if op == "mul" else "/") + str(t) for op, t in s.scale_terms)
            elif s.scale is None:
                scale = "default"
            else:
                scale = f"{s.scale:.6g}" if isinstance(s.scale, float) else s.scale
            eff = "" if s.effective_scale is None else f" (effective {s.effective_scale:.6g})"
            gqa = "?" if s.gqa_ratio is None else str(s.gqa_ratio)
            how = f" via {s.repeat_kv}" if s.repeat_kv else (" via enable_gqa" if s.enable_gqa else "")
            mask = f"{s.mask} ({'+'.join(s.mask_kinds)})" if s.mask else "none"
            lines.append(
                f"  #{s.index} {s.kind:<5} out=`{s.output}` q=`{s.q}` k=`{s.k}` v=`{s.v}` scale={scale}{eff} "
                f"gqa={gqa}{how} mask={mask} causal={s.is_causal}"
            )
            for label, w in (("K", s.k_write), ("V", s.v_write)):
                lines.append(f"      {label}: " + (w.describe() if w else "not matched"))
            for r in s.reasons:
                lines.append(f"      why: {r}")
        return "\n".join(lines)


def _write_report(w: CacheWrite | None) -> WriteReport | None:
    if w is None:
        return None
    return WriteReport(
        kind=w.kind, family=w.family, node=w.node.name, storage=w.storage.name, storage_source=w.storage_source,
        storage_input_index=w.storage_input_index, new=render(w.new), position=render(w.position), dim=w.dim,
        in_place=w.in_place,
    )


def _site_report(i: int, s: AttentionSite) -> SiteReport:
    repeat = s.k_trace.repeat or s.v_trace.repeat
    return SiteReport(
        index=i, kind=s.kind, output=s.output.name, q=render(s.q), k=render(s.k), v=render(s.v),
        scale=render(s.scale), scale_terms=render(s.scale_terms), q_scale_terms=render(s.q_scale_terms),
        effective_scale=s.effective_scale, mask=render(s.mask),
        mask_kinds=tuple(m.kind for m in s.masks), is_causal=s.is_causal, enable_gqa=s.enable_gqa,
        gqa_ratio=s.gqa_ratio, repeat_kv=repeat.spelling if repeat else None,
        k_write=_write_report(s.k_write), v_write=_write_report(s.v_write), reasons=tuple(s.reasons),
    )


def build_report(detection: Detection, name: str = "graph") -> DetectionReport:
    return DetectionReport(
        name=name,
        sites=tuple(_site_report(i, s) for i, s in enumerate(detection.sites)),
        counts=detection.counts(),
    )


# ---------------------------------------------------------------------------------------------- after the rewrite


@dataclass(frozen=True)
class SiteOutcomeReport:
    """One attention site after the kvcompile backend's passes."""

    index: int
    kind: str  # sdpa | eager | packed
    status: str  # rewritten (now on the kvcompile ops) | packed (was already) | unmatched (full precision)
    matched: str  # what matched: "K: ... / V: ..." or ""
    scheme: str | None
    k_bits: float | None
    v_bits: float | None
    n_sink: int | None
    window: int | None
    packed_bytes: int  # measured from the storage tensors
    full_precision_bytes: int  # the full-precision buffers it replaces (or would take, same capacity)
    reasons: tuple[str, ...]

    @property
    def bytes_saved(self) -> int:
        return self.full_precision_bytes - self.packed_bytes if self.packed_bytes else 0


@dataclass(frozen=True)
class GraphReport:
    name: str
    detection: DetectionReport
    sites: tuple[SiteOutcomeReport, ...]
    counts: dict[str, int]
    code: str  # the graph's code after the passes (what inductor compiled)

    def to_text(self) -> str:
        c = self.counts
        lines = [
            f"kvcompile [{self.name}]: {len(self.sites)} attention site(s): {c['rewritten']} rewritten, "
            f"{c['packed']} already packed, {c['unmatched']} left in full precision"
        ]
        for s in self.sites:
            bits = "" if s.k_bits is None else f" {s.scheme} K{s.k_bits:g}/V{s.v_bits:g}-bit"
            extra = "" if s.n_sink is None else f" sink={s.n_sink} window={s.window}"
            size = ""
            if s.packed_bytes:
                size = (f" packed {s.packed_bytes:,} B vs full precision {s.full_precision_bytes:,} B "
                        f"({s.full_precision_bytes / s.packed_bytes:.2f}x)")
            lines.append(f"  #{s.index} {s.kind:<6} {s.status:<9}{bits if s.status != 'unmatched' else ''}"
                         f"{extra if s.status == 'rewritten' else ''}{size}")
            if s.matched:
                lines.append(f"      matched: {s.matched}")
            for r in s.reasons:
                lines.append(f"      why not: {r}")
        return "\n".join(lines)


@dataclass(frozen=True)
class CompileReport:
    """Every graph the kvcompile backends compiled (``kvcompile.compile_report()``)."""

    graphs: tuple[GraphReport, ...]

    @property
    def sites(self) -> tuple[SiteOutcomeReport, ...]:
        return tuple(s for g in self.graphs for s in g.sites)

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.sites)

    def to_text(self) -> str:
        if not self.graphs:
            return "kvcompile: no graph compiled yet"
        return "\n".join(g.to_text() for g in self.graphs)


def build_graph_report(detection: DetectionReport, plan: Any, scheme: Any, gm: Any) -> GraphReport:
    rows = []
    for site, out in zip(detection.sites, plan.outcomes):
        matched = ""
        if site.k_write is not None and site.v_write is not None:
            matched = f"K: {site.k_write.describe()} / V: {site.v_write.describe()}"
        spec = out.spec
        k_bits = v_bits = None
        scheme_name = None
        if out.status == "rewritten" and spec is not None:
            k_bits, v_bits, scheme_name = spec.k_bits, spec.v_bits, scheme.name
        elif out.status == "packed":
            scheme_name, k_bits, v_bits = _packed_bits(gm, site)
        rows.append(SiteOutcomeReport(
            index=site.index, kind=site.kind, status=out.status, matched=matched, scheme=scheme_name,
            k_bits=k_bits, v_bits=v_bits, n_sink=None if spec is None else spec.n_sink,
            window=None if spec is None else spec.window, packed_bytes=out.packed_bytes,
            full_precision_bytes=out.full_precision_bytes, reasons=tuple(out.reasons),
        ))
    counts = {k: sum(r.status == k for r in rows) for k in ("rewritten", "packed", "unmatched")}
    return GraphReport(detection.name, detection, tuple(rows), counts, gm.code)


from .detect import _DA_SCALE  # noqa: E402


def _packed_bits(gm: Any, site: SiteReport) -> tuple[str | None, float | None, float | None]:
    """(scheme label, K bits, V bits) of a site already on dequant_attention, from its arguments."""
    for node in gm.graph.nodes:
        if node.name == site.output and len(node.args) > _DA_SCALE:
            kk = _DA_SCALE - 10  # k_kind; then k_bits, k_group_size, k_axis, v_kind, v_bits, ...
            return (f"cache ({node.args[kk]}/{node.args[kk + 4]})", float(node.args[kk + 1]),
                    float(node.args[kk + 5]))
    return None, None, None
