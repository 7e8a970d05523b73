"""Graph dumps for debugging the passes: set ``KVCOMPILE_DEBUG_GRAPHS=<dir>`` and every graph a kvcompile
backend sees is written there before and after its passes, with the detection report next to it.
Files, never stdout; the paths are logged at DEBUG level on the ``kvcompile.passes`` logger.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

from torch import fx

__all__ = ["ENV_VAR", "debug_dir", "dump_graph", "dump_text", "next_graph_id"]

ENV_VAR = "KVCOMPILE_DEBUG_GRAPHS"
log = logging.getLogger("kvcompile.passes")
_ids = itertools.count()


def next_graph_id() -> str:
    return f"graph{next(_ids):03d}"


def debug_dir() -> Path | None:
    """The dump directory, read at call time so tests and users can set it after import."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


def dump_text(text: str, graph_id: str, stage: str, suffix: str = ".txt") -> Path | None:
    root = debug_dir()
    if root is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{os.getpid()}_{graph_id}_{stage}{suffix}"
    path.write_text(text)
    log.debug("kvcompile: wrote %s", path)
    return path


def dump_graph(gm: fx.GraphModule, graph_id: str, stage: str) -> Path | None:
    """Write ``gm``'s readable code as ``<pid>_<graph_id>_<stage>.py``; no-op unless the variable is set."""
    if debug_dir() is None:
        return None
    return dump_text(gm.print_readable(print_output=False), graph_id, stage, ".py")
