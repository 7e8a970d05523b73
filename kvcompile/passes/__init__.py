"""FX passes: find attention sites and the KV-cache writes feeding them (detect), report them (report),
and an analysis-only torch.compile backend (backend). The rewrite into kvcompile ops comes next."""

from .backend import clear_reports, detect_backend, last_report, make_detect_backend, reports
from .detect import AttentionSite, CacheWrite, Detection, MaskTerm, OperandTrace, RepeatKV, detect
from .report import DetectionReport, SiteReport, WriteReport, build_report

__all__ = [
    "AttentionSite", "CacheWrite", "Detection", "DetectionReport", "MaskTerm", "OperandTrace", "RepeatKV",
    "SiteReport", "WriteReport", "build_report", "clear_reports", "detect", "detect_backend", "last_report",
    "make_detect_backend", "reports",
]
