"""An analysis-only torch.compile backend: run detection, hand the report out, return the graph unchanged.

    seen = []
    torch.compile(model, backend=make_detect_backend(on_report=seen.append), fullgraph=True)

``detect_backend`` is the same with no callback; its reports are kept (the last 32) for ``last_report()``.
Dynamo calls a backend once per compiled graph: prefill and decode are two calls, two reports.
The public "kvcompile" backend name is registered by the rewrite, not here.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

from torch import fx

from .debug import dump_graph, dump_text, next_graph_id
from .detect import detect
from .report import DetectionReport, build_report

__all__ = ["clear_reports", "detect_backend", "last_report", "make_detect_backend", "reports"]

log = logging.getLogger("kvcompile.passes")
_REPORTS: collections.deque[DetectionReport] = collections.deque(maxlen=32)


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
        dump_graph(gm, graph_id, "after")  # unchanged until the rewrite lands
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
