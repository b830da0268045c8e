"""Tokenized datasets cached on disk: flat .npy arrays with a checksummed manifest, memory-mapped
when read, keyed by the source's bytes, the tokenizer, the size limit and the format version."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from coconut_jax import files
from coconut_jax.data.records import DataError, load_records, validate_record
from coconut_jax.data.tokens import TokenizedSet, tokenize_records


CACHE_FORMAT = 2  # bump when the arrays' meaning changes: older caches are then re-tokenized
_ARRAYS = ("tokens", "pieces", "records")


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with files.open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(source_digest: str, tokenizer, max_size, text_format: str = "") -> str:
    """The dataset's contents, the whole tokenizer, the size limit, the format version and the
    method's text format ("": Coconut's): a change to any of them is a different cache."""
    h = hashlib.sha256(f"{source_digest}|{max_size}|v{CACHE_FORMAT}".encode())
    if text_format:  # only then: Coconut's caches keep their keys
        h.update(f"|format={text_format}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr(sorted(tokenizer.get_added_vocab().items())).encode())
    h.update(repr(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:24]


def _array_digest(a: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"), digest_size=16).hexdigest()


def write_cache(directory: str, ts: TokenizedSet) -> None:
    """The arrays as .npy files plus a manifest with their checksums, made under a temporary
    name and renamed into place, so a reader sees a whole cache or none. In a bucket the files
    are uploaded with the manifest last: a cache without it is none."""
    if files.is_remote(directory):
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, "cache")
            write_cache(local, ts)
            files.put_tree(local, directory, last=("manifest.json",))
        return
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", suffix=".tmp", dir=parent)
    manifest = {"format": CACHE_FORMAT, "n_records": len(ts)}
    for name in _ARRAYS:
        a = getattr(ts, name)
        np.save(os.path.join(tmp, f"{name}.npy"), a)
        manifest[name] = {"len": int(a.shape[0]), "blake2b": _array_digest(a)}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    try:
        os.replace(tmp, directory)
    except OSError:  # another process finished the same cache first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def read_cache(directory: str) -> TokenizedSet | None:
    """The cached arrays, memory-mapped, or None when absent; a cache that fails its checks
    (missing file, wrong length, checksum) is reported and None returned, so it is rebuilt."""
    manifest_path = os.path.join(directory, "manifest.json")
    if not files.isfile(manifest_path):
        return None
    where, directory = directory, files.local_copy(directory)
    manifest_path = os.path.join(directory, "manifest.json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {manifest.get('format')} (expected {CACHE_FORMAT})")
        arrays = {}
        for name in _ARRAYS:
            a = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
            if a.shape != (manifest[name]["len"],) or _array_digest(a) != manifest[name]["blake2b"]:
                raise ValueError(f"{name}.npy does not match its checksum")
            arrays[name] = a
        ts = TokenizedSet(**arrays)
        if len(ts) != manifest["n_records"] or ts.records[-1] != len(ts.pieces) - 1 or ts.pieces[-1] != len(ts.tokens):
            raise ValueError("the arrays do not fit together")
        return ts
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        print(f"warning: token cache {where} is unusable ({e}); re-tokenizing")
        shutil.rmtree(directory, ignore_errors=True)
        return None


def load_dataset(path: str, tokenizer, max_size: int | None = None, cache_dir: str | None = None,
                 with_records: bool = True, tfds_data_dir: str = "",
                 text_format=None) -> tuple[list[dict] | None, TokenizedSet]:
    """Validated records (None when not asked for) and their tokenized set, cached on disk
    when `cache_dir` is set.

    `path` is a Coconut JSON file or a TFDS split `tfds:NAME/SPLIT` (in `tfds_data_dir`,
    see `coconut_jax.tfds_source`), whose records are the same, in the same order, as the file
    it was packed from. A cached set is used only for the same contents, tokenizer, size
    limit and format version; `text_format` (a method, `Method.tokenize` and `format_key`;
    None: Coconut's) turns records into tokens. It is memory-mapped, so a training set costs its token count
    in int32 pages. With a cache hit and `with_records=False` the records are not even read
    (the cache was made from records that validated, and its key is their contents).
    """
    from coconut_jax import tfds_source
    tfds = tfds_source.is_tfds(path)
    if tfds:
        try:
            digest = tfds_source.fingerprint(path, tfds_data_dir)
        except (ValueError, ImportError, FileNotFoundError) as e:
            raise DataError(str(e)) from e
    elif not files.isfile(path):
        raise DataError(f"{path}: dataset file not found")
    else:
        digest = file_digest(path)
    key = getattr(text_format, "format_key", "")
    cache = os.path.join(cache_dir, cache_key(digest, tokenizer, max_size, key)) if cache_dir else None
    ts = read_cache(cache) if cache else None
    records = None
    if with_records or ts is None:
        if tfds:
            records = tfds_source.read_records(path, tfds_data_dir, max_size)
            for i, r in enumerate(records):
                validate_record(path, i, r)
        else:
            records = load_records(path, max_size)
    if ts is None:
        ts = (text_format.tokenize if text_format is not None else tokenize_records)(records, tokenizer, path)
        if cache:
            write_cache(cache, ts)
    return (records if with_records else None), ts
