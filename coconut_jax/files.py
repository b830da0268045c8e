"""Writing files so that a reader (or a restart after a crash) sees the old file or the new
one, never half of one."""
from __future__ import annotations

import os


def temporary_sibling(path: str) -> str:
    """A name next to `path` for writing it (per process, so concurrent writers do not collide;
    the extension is kept for writers that choose the format from it)."""
    root, ext = os.path.splitext(path)
    return f"{root}.{os.getpid()}.tmp{ext}"


def write_atomic(path: str, text: str) -> None:
    """Writes `path` through a temporary sibling and a rename."""
    tmp = temporary_sibling(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
