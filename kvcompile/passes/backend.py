"""The torch.compile backends: ``"kvcompile"`` (detect + rewrite + inductor) and an analysis-only one.

    torch.compile(model, backend="kvcompile")                         # by name (entry point), default options
    torch.compile(model, backend=kvcompile.backend(scheme="kivi", k_bits=4, compiler="inductor"))

The name is registered through the ``torch_dynamo_backends`` entry point in pyproject.toml, pointing at
``kvcompile_backend`` (the default options). ``backend(...)`` makes one with other options. Per graph
Dynamo hands it, a backend: dumps the graph (``KVCOMPILE_DEBUG_GRAPHS``), runs ``detect``, runs
``rewrite`` (persistent caches written by index or slice, and concatenated caches returned to the caller ->
kvcompile ops on packed storage fed as extra inputs; the wrapper swaps handles in for returned caches), counts
in ``torch._dynamo.utils.counters["kvcompile"]``, records a ``GraphReport`` (``kvcompile.compile_report()``),
then hands the graph to inductor (``compile_fx``; or ``aot_eager`` / ``eager`` for debugging) inside a
``config.patch`` that adds a no-op post-grad pass whose ``uuid()`` hashes the pass files and the options, so
inductor's caches never serve a graph rewritten by other code or options.

``make_detect_backend`` / ``detect_backend``: analysis only, the graph is compiled unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..schemes.base import Scheme, get_scheme
from .debug import dump_graph, dump_text, next_graph_id
from .detect import COUNTER, detect
from .report import DetectionReport, GraphReport, build_graph_report, build_report

__all__ = ["KVCompileBackend", "backend", "clear_reports", "compile_report", "detect_backend", "kvcompile_backend",
           "last_report", "make_detect_backend", "reports"]

log = logging.getLogger("kvcompile.passes")
_REPORTS: collections.deque[DetectionReport] = collections.deque(maxlen=32)
_GRAPH_REPORTS: collections.deque[GraphReport] = collections.deque(maxlen=64)

_COMPILERS = ("inductor", "aot_eager", "eager")
_PKG = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- "kvcompile"


@dataclass(frozen=True)
class BackendOptions:
    scheme: Scheme
    compiler: str = "inductor"
    check_positions: bool = True
    rewrite: bool = True
    capacity: int = 4096
    release_buffers: bool = False
    full_precision_prefill: bool = True

    def __post_init__(self):
        if self.compiler not in _COMPILERS:
            raise ValueError(f"unknown compiler {self.compiler!r}; valid: {', '.join(_COMPILERS)}")
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity must be a positive number of tokens, got {self.capacity!r}")


class _CacheKey(CustomGraphPass):
    """A no-op post-grad pass that only carries ``uuid()`` into inductor's cache key."""

    def __init__(self, uuid: str, chained: Any = None):
        self._uuid, self._chained = uuid, chained

    def __call__(self, graph: fx.Graph) -> None:
        if self._chained is not None:
            self._chained(graph)

    def uuid(self) -> Any:
        inner = self._chained.uuid() if self._chained is not None and hasattr(self._chained, "uuid") else None
        return (self._uuid, inner)


class KVCompileBackend:
    """A torch.compile backend: find attention sites and KV-cache writes, rewrite them into the kvcompile ops,
    compile the rest with inductor. Make one with ``kvcompile.backend(...)``."""

    def __init__(self, options: BackendOptions):
        self.options = options

    def __repr__(self):
        o = self.options
        return f"kvcompile.backend(scheme={o.scheme.describe()}, compiler={o.compiler!r})"

    def uuid(self) -> str:
        """Hash of the files that decide the rewrite and of the options."""
        files = sorted((_PKG / "passes").glob("*.py")) + [_PKG / "ops.py", _PKG / "cache" / "packed.py"]
        h = hashlib.sha256(get_hash_for_files(tuple(str(f) for f in files)))
        h.update(repr(self.options).encode())
        return h.hexdigest()

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from .rewrite import RewritePlan, cat_pasts, rewrite

        graph_id = next_graph_id()
        dump_graph(gm, graph_id, "before")
        gm = _copy(gm)  # Dynamo reads its own graph after the backend returns: rewrite a copy
        detection = detect(gm, example_inputs)
        before = build_report(detection, name=graph_id)
        _REPORTS.append(before)
        n_inputs = len([n for n in gm.graph.nodes if n.op == "placeholder"])
        if self.options.rewrite:
            plan = rewrite(gm, detection, list(example_inputs), self.options.scheme, capacity=self.options.capacity,
                           full_precision_prefill=self.options.full_precision_prefill)
            plan.release_buffers = self.options.release_buffers
        else:
            plan = RewritePlan(n_inputs=n_inputs, guarded=cat_pasts(detection, "the backend's rewrite=False"))
        report = build_graph_report(before, plan, self.options.scheme, gm)
        _GRAPH_REPORTS.append(report)
        c = counters[COUNTER]
        c["rewritten_sites"] += report.counts["rewritten"]
        c["rewritten_writes"] += 2 * report.counts["rewritten"]
        c["full_precision_sites"] += report.counts["unmatched"]
        log.debug("%s", report.to_text())
        dump_text(report.to_text(), graph_id, "report")
        dump_graph(gm, graph_id, "after")
        inner = self._compile(gm, list(example_inputs) + _static_fakes(plan.example_extra, example_inputs))
        if plan.empty:
            return _guarded(inner, plan) if plan.guarded else inner
        return _with_packed_inputs(inner, plan, self.options.check_positions)

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        compiler = self.options.compiler
        if compiler == "eager":
            return gm.forward
        if compiler == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(gm, example_inputs)
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx

        key = _CacheKey(self.uuid(), config.post_grad_custom_pre_pass)
        with config.patch(post_grad_custom_pre_pass=key):
            return compile_fx(gm, example_inputs)


def _static_fakes(extra: list[torch.Tensor], example_inputs: list[Any]) -> list[Any]:
    """The packed storages' example tensors as fake tensors of static shape in Dynamo's fake mode (where there is one).

    These inputs have no Dynamo source: the backend's wrapper feeds them. Given as real tensors, AOTAutograd fakes them
    itself, and in a graph that Dynamo recompiled with dynamic shapes it gives their sizes symbols. For a view (the
    per-token scale / zero rows are views of allocations padded to 32 tokens) it then relates the view's symbols to
    its base's, and Dynamo's guards on those symbols fail ("sources must not be empty for symbol"). Their shapes are
    the storages' own, fixed for the graph's life, so static fakes are what they are."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None or not extra:
        return list(extra)
    return [fake_mode.from_tensor(t, static_shapes=True) for t in extra]


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    for old, new in env.items():  # AOTAutograd reads the Dynamo source of each input from the node
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    for attr in ("meta", "_param_name_to_source", "_source_to_user_stacks"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


def _with_packed_inputs(inner: Callable, plan, check_positions: bool) -> Callable:
    """The compiled graph, called with the packed storages appended to Dynamo's inputs (Dynamo calls a
    backend's function with positional arguments, and so does this wrapper)."""

    def run(*args: Any) -> Any:
        extra, entries = plan.extra_inputs(args, check_positions=check_positions)
        return plan.outputs(args, inner(*args, *extra), entries)

    return run


def _guarded(inner: Callable, plan) -> Callable:
    """A graph with nothing rewritten whose cat sites could still be handed a packed cache handle."""

    def run(*args: Any) -> Any:
        plan.check_guarded(args)
        return inner(*args)

    return run


def backend(scheme: str | Scheme = "skvq", *, compiler: str = "inductor", check_positions: bool = True,
            rewrite: bool = True, capacity: int = 4096, release_buffers: bool = False,
            full_precision_prefill: bool = True, **overrides: Any) -> KVCompileBackend:
    """A kvcompile torch.compile backend with these options.

    ``scheme`` (a name or config) and ``overrides`` (``k_bits=4``, ...) decide how rewritten caches are packed;
    sites already on the kvcompile ops (``kvcompile.apply(..., compile=True)``) keep their cache's scheme.
    ``compiler``: what compiles the rewritten graph: "inductor" (default), "aot_eager" or "eager".
    ``check_positions``: verify on the host, per call, that each rewritten cache write continues the sequence
    (one small read of the position tensor per call; turn off for CUDA graphs once the caller is trusted).
    ``rewrite=False``: detect and report only.
    ``capacity``: tokens (prompt + generated) that each packed storage replacing a concatenated cache holds
    (nanoGPT's returned "present", transformers' DynamicCache); a persistent buffer's storage takes the buffer's
    own length instead. Exceeding it raises ``CacheCapacityError``.
    ``release_buffers=True``: once packed storage has taken over a persistent buffer (index or slice writes:
    gpt-fast, ``StaticCache``), free the buffer's memory (it keeps its shape and views one NaN), so the packed
    cache is all that holds the tokens. The buffer then cannot be written outside the compiled graph
    (``StaticCache.reset()`` raises: use a new cache per sequence, or restart at position 0 through the graph).
    Dynamo recompiles once for the changed strides.
    ``full_precision_prefill`` (default True): a rewritten persistent-buffer write that starts a sequence (first
    position 0) attends over its own new K/V in full precision, as ``KVCompileCache`` does; its tokens are
    packed all the same, and later calls attend over the packed storage. (A concatenated cache's prefill has no
    past and attends in full precision anyway.)
    """
    return KVCompileBackend(BackendOptions(get_scheme(scheme, **overrides), compiler, check_positions, rewrite,
                                           capacity, release_buffers, full_precision_prefill))


kvcompile_backend = backend()
"""The backend registered under the name "kvcompile" (default options)."""


def compile_report():
    """What the kvcompile backends did to every graph they compiled (the last 64), as a ``CompileReport``."""
    from .report import CompileReport

    return CompileReport(tuple(_GRAPH_REPORTS))


# ---------------------------------------------------------------------------------------------- analysis only


def make_detect_backend(
    on_report: Callable[[DetectionReport], None] | None = None,
    compiler: Callable[[fx.GraphModule, list[Any]], Callable] | None = None,
) -> Callable[[fx.GraphModule, list[Any]], Callable]:
    """A backend that reports what ``detect`` finds and then runs ``gm.forward`` (or ``compiler(gm, inputs)``)."""

    def detect_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        graph_id = next_graph_id()
        dump_graph(gm, graph_id, "before")
        report = build_report(detect(gm, example_inputs), name=graph_id)
        _REPORTS.append(report)
        log.debug("%s", report.to_text())
        dump_text(report.to_text(), graph_id, "report")
        dump_graph(gm, graph_id, "after")  # unchanged: analysis only
        if on_report is not None:
            on_report(report)
        return compiler(gm, example_inputs) if compiler is not None else gm.forward

    return detect_backend


detect_backend = make_detect_backend()


def last_report() -> DetectionReport | None:
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[DetectionReport]:
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
    _GRAPH_REPORTS.clear()

