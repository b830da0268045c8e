"""Every file a run reads or writes, on a local disk or in a bucket (`gs://...`), through one
layer: a reader (or a restart after a crash) sees the old file or the new one, never half of one;
a write that fails is one line (`WriteError`), not a traceback.

Local paths go to `os` exactly as they always did. Bucket paths go through one `gcsfs` client (the
`gcs` extra; Orbax writes its checkpoints there itself, through TensorStore and `etils.epath`).
What a bucket changes:

- **Whole files.** An object appears when its upload completes, whole, so a bucket file is
  written in one upload (no temporary and rename: a rename there is a copy and a delete).
- **Appending.** Objects cannot be appended to; `append_line` uploads the new line as its own
  object and has the store compose the two into the file (server side: nothing re-uploaded, and
  a reader sees the file before or after the line).
- **Directories** are name prefixes; `rename_tree` copies every object, then deletes the
  originals (not atomic: what it is used for tolerates being redone).
- **Libraries that only read local files** (transformers' loaders, safetensors) get a local copy
  of a bucket directory (`local_copy`).

An emulator is reached through the standard variables alone (`STORAGE_EMULATOR_HOST` for gcsfs,
`TENSORSTORE_GCS_HTTP_URL` for Orbax's arrays); `_under_an_emulator` does the rest.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

REMOTE = ("gs://",)


class WriteError(RuntimeError):
    """A run output that could not be written (no space, read-only, its directory gone). What
    was there before is left as it was."""


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE)


NEEDS_GCS = "a gs:// path needs gcsfs: pip install 'coconut_jax[gcs]'"


def bucket_support() -> bool:
    """Whether gcsfs is installed."""
    import importlib.util
    return importlib.util.find_spec("gcsfs") is not None


_FS = None


def _no_remembered_listings() -> None:
    """No gcsfs client of this process remembers a listing: ours, and the one Orbax reaches the
    bucket through (etils.epath's). Each changes what the other lists (Orbax adds steps, a damaged
    step is moved aside here), and a remembered listing would miss it. (A setting a user gave
    fsspec for `gs` is kept.)"""
    try:
        import fsspec.config
    except ImportError:
        return
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def _under_an_emulator() -> None:
    """gcsfs probes a bucket's layout over gRPC, which an emulator cannot answer (a minute lost
    per bucket): off under one. gcsfs reads the setting once, when it is first imported."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_no_remembered_listings()
_under_an_emulator()


def bucket():
    """The one gcsfs client of this process."""
    global _FS
    if _FS is None:
        _under_an_emulator()
        if not bucket_support():
            raise ImportError(NEEDS_GCS)
        import gcsfs
        _FS = gcsfs.GCSFileSystem(skip_instance_cache=True)
    return _FS


def _key(path: str) -> str:
    return path[len("gs://"):].rstrip("/")


def abspath(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return bucket().exists(_key(path)) if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    return bucket().isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return bucket().isdir(_key(path)) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return [os.path.basename(p.rstrip("/")) for p in bucket().ls(_key(path), detail=False)]
    return os.listdir(path)


def makedirs(path: str) -> None:
    """A directory (in a bucket, nothing: a directory there is the prefix of what it holds)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return bucket().cat_file(_key(path))
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def open_binary(path: str):
    """`path` open for reading bytes."""
    return bucket().open(_key(path), "rb") if is_remote(path) else open(path, "rb")


def upload(local: str, path: str) -> None:
    """Copies local file `local` to `path` whole (one upload in a bucket)."""
    if not is_remote(path):
        write_through(path, lambda tmp: shutil.copyfile(local, tmp))
        return
    try:
        bucket().put_file(local, _key(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise WriteError(f"{path}: not written ({cause(e)})") from e


def put_tree(local: str, path: str, last: tuple[str, ...]) -> None:
    """Local directory `local` as bucket directory `path`, replacing what was there: the old
    `last` files go first and the new ones are uploaded last, so a reader that looks for them
    sees the old directory, none, or the new one whole."""
    fs, root = bucket(), _key(path)
    if fs.exists(root):
        for name in last:
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}")
        fs.rm(root, recursive=True)
    names = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, ns in os.walk(local) for n in ns)
    for name in sorted(names, key=lambda n: n in last):
        upload(os.path.join(local, name), f"gs://{root}/{name}")


def remove(path: str) -> None:
    if is_remote(path):
        bucket().rm(_key(path))
    else:
        os.remove(path)


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


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes `path` whole or not at all (locally through a temporary sibling and a rename; in a
    bucket in one upload); on failure `path` is untouched and `WriteError` says why."""
    payload = data if isinstance(data, bytes) else data.encode("utf-8")
    if is_remote(path):
        try:
            bucket().pipe_file(_key(path), payload)
        except (OSError, ValueError, RuntimeError) as e:
            raise WriteError(f"{path}: not written ({cause(e)})") from e
        return
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise WriteError(f"{path}: not written ({cause(e)})") from e


def write_through(path: str, write) -> None:
    """`write(local_path)` (a library that writes a local file: a figure, an array), then the file
    put at `path` whole."""
    if not is_remote(path):
        tmp = temporary_sibling(path)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, os.path.basename(path))
        write(local)
        upload(local, path)


def append_line(path: str, line: str) -> None:
    """Appends one line; a failed append is cut back off, so the file keeps whole lines only."""
    if is_remote(path):
        _append_object(path, line)
        return
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


def _append_object(path: str, line: str) -> None:
    """The line as its own object, composed onto the end of `path` by the store (one request;
    the file is never downloaded or uploaded again), then the part object deleted."""
    try:
        if not exists(path):
            write_atomic(path, line)
            return
        part = temporary_sibling(path)
        write_atomic(part, line)
        fs = bucket()
        fs.merge(_key(path), [_key(path), _key(part)])
        fs.rm(_key(part))
    except (OSError, ValueError, RuntimeError) as e:
        raise WriteError(f"{path}: not written ({cause(e)})") from e


def rename_tree(src: str, dst: str) -> None:
    """Moves directory `src` to `dst` (locally a rename; in a bucket every object copied, then
    the originals deleted)."""
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs = bucket()
    fs.copy(_key(src), _key(dst), recursive=True)
    fs.rm(_key(src), recursive=True)


def local_copy(path: str, skip: tuple[str, ...] = ()) -> str:
    """`path` itself if local; for a bucket directory or file, a copy of it on this machine's
    disk, for libraries that read only local files. The copy is kept between runs (under the
    temporary directory), with a record of each object's version beside it: an object whose
    version is unchanged is not fetched again. Files ending in `skip` are left out."""
    if not is_remote(path):
        return path
    digest = hashlib.sha256(_key(path).encode()).hexdigest()[:16]
    base = os.path.join(tempfile.gettempdir(), "coconut_jax-bucket", digest)
    name = os.path.basename(_key(path))
    fs = bucket()
    if not fs.isdir(_key(path)):
        _fetch(fs, _key(path), os.path.join(base, name), os.path.join(base, ".versions", name))
        return os.path.join(base, name)
    root = _key(path)
    for key in fs.find(root):
        if skip and key.endswith(skip):
            continue
        rel = os.path.relpath(key, root)
        _fetch(fs, key, os.path.join(base, name, rel), os.path.join(base, ".versions", rel))
    return os.path.join(base, name)


def _fetch(fs, key: str, local: str, record: str) -> None:
    """Fetches one object unless `record` holds the version of it that `local` already is."""
    info = fs.info(key)
    version = str(info.get("generation") or info.get("etag") or info.get("size"))
    if os.path.isfile(local) and os.path.isfile(record) and read_text(record) == version:
        return
    for d in (os.path.dirname(local), os.path.dirname(record)):
        os.makedirs(d, exist_ok=True)
    tmp = temporary_sibling(local)
    fs.get_file(key, tmp)
    os.replace(tmp, local)
    write_atomic(record, version)
