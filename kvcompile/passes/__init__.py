"""FX passes and the torch.compile backend.

detect: find attention sites and the KV-cache writes feeding them; rewrite: turn index-written persistent
caches into the kvcompile ops on packed storage; report: what was found and done; backend: the "kvcompile"
torch.compile backend (``kvcompile.backend(...)`` for options) and an analysis-only one.
"""

from .backend import (KVCompileBackend, backend, clear_reports, compile_report, detect_backend, kvcompile_backend,
                      last_report, make_detect_backend, reports)
from .detect import AttentionSite, CacheWrite, Detection, MaskTerm, OperandTrace, RepeatKV, detect
from .report import (CompileReport, DetectionReport, GraphReport, SiteOutcomeReport, SiteReport, WriteReport,
                     build_report)
from .rewrite import clear_storage, packed_storage

__all__ = [
    "AttentionSite", "CacheWrite", "CompileReport", "Detection", "DetectionReport", "GraphReport", "KVCompileBackend",
    "MaskTerm", "OperandTrace", "RepeatKV", "SiteOutcomeReport", "SiteReport", "WriteReport", "backend",
    "build_report", "clear_reports", "clear_storage", "compile_report", "detect", "detect_backend",
    "kvcompile_backend", "last_report", "make_detect_backend", "packed_storage", "reports",
]
