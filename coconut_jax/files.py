"""Writing files so that a reader (or a restart after a crash) sees the old file or the new
one, never half of one; a write that fails is one line (`WriteError`), not a traceback."""
from __future__ import annotations

import os


class WriteError(RuntimeError):
    """A run output that could not be written (no space, read-only, its directory gone). What
    was there before is left as it was."""


def temporary_sibling(path: str) -> str:
    """A name next to `path` for writing it (per process, so concurrent writers do not collide;
    the extension is kept for writers that choose the format from it)."""
    root, ext = os.path.splitext(path)
    return f"{root}.{os.getpid()}.tmp{ext}"


def cause(e: BaseException) -> str:
    """An exception as one short line (libraries' messages can run to pages)."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def write_atomic(path: str, text: str) -> None:
    """Writes `path` through a temporary sibling and a rename; on failure `path` is untouched,
    the temporary is removed and `WriteError` says why."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise WriteError(f"{path}: not written ({cause(e)})") from e


def append_line(path: str, line: str) -> None:
    """Appends one line; a failed append is cut back off, so the file keeps whole lines only."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:
        try:
            if os.path.exists(path):
                os.truncate(path, size)
        except OSError:
            pass
        raise WriteError(f"{path}: not written ({cause(e)})") from e
