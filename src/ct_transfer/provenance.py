"""Provenance: which code made a run or an export (ct-transfer, torch, timm versions, the source
commit when the package runs from a git checkout)."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the source tree this package is imported from (with ``+dirty`` when it has
    uncommitted changes), or None outside a checkout or without git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    import torch

    from . import __version__

    return {"ct_transfer": __version__, "torch": torch.__version__, "timm": _version("timm"),
            "python": platform.python_version(), "source_commit": source_commit()}
