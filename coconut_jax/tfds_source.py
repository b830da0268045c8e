"""Coconut datasets stored as TensorFlow Datasets (`tfds:NAME/SPLIT` paths).

`python -m data_prep.tfds` packs Coconut JSON files into a TFDS dataset (ArrayRecord files,
one split per file, records in file order); `train_path` / `val_path` then name a split as
`tfds:NAME/SPLIT`, read from `tfds_data_dir` (local or `gs://`) through `tfds.data_source`
(random access, no TensorFlow). tensorflow-datasets is an optional extra, imported only here
and only when such a path is used.
"""
from __future__ import annotations

import re

import numpy as np

PREFIX = "tfds:"
EXTRA = "pip install 'coconut_jax[tfds]'"
_PATH = re.compile(r"^tfds:([A-Za-z_][\w]*)/(\w+)$")
# ProsQA's graph fields, packed when the records have them.
GRAPH_FIELDS = ("idx_to_symbol", "edges", "root", "target", "neg_target")
SOURCES_KEY = "coconut_sources"  # dataset metadata: split -> digest of the JSON file it was made from


def is_tfds(path: str) -> bool:
    return str(path).startswith(PREFIX)


def valid_path(path: str) -> bool:
    return bool(_PATH.match(path))


def parse(path: str) -> tuple[str, str]:
    """(dataset name, split) of `tfds:NAME/SPLIT`; ValueError otherwise."""
    m = _PATH.match(path)
    if not m:
        raise ValueError(f"{path}: a TFDS source is written tfds:NAME/SPLIT (e.g. tfds:coconut_gsm8k/gsm_train)")
    return m.group(1), m.group(2)


def import_tfds(what: str):
    """tensorflow_datasets, or a one-line error saying which extra to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"{what} needs tensorflow-datasets ({EXTRA})") from e
    return tfds


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def decode(example: dict) -> dict:
    """A stored example as the JSON record it came from (strings, lists, ints)."""
    record = {"question": _text(example["question"]), "steps": [_text(s) for s in example["steps"]],
              "answer": _text(example["answer"])}
    if "edges" in example:
        record.update(idx_to_symbol=[_text(s) for s in example["idx_to_symbol"]],
                      edges=np.asarray(example["edges"]).reshape(-1, 2).tolist(),
                      root=int(example["root"]), target=int(example["target"]), neg_target=int(example["neg_target"]))
    return record


def _failed(path: str, data_dir: str, e: Exception) -> FileNotFoundError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = f" in {data_dir}" if data_dir else ""
    return FileNotFoundError(f"{path}: no such TFDS dataset split{where} ({type(e).__name__}: {first})")


def _split_info(path: str, data_dir: str):
    """(the dataset's info, the split's info), from its metadata files alone."""
    tfds = import_tfds(path)
    name, split = parse(path)
    try:  # TFDS raises many types (not found, bad files)
        info = tfds.builder(name, data_dir=data_dir or None).info
    except Exception as e:
        raise _failed(path, data_dir, e) from e
    if split not in info.splits:
        raise _failed(path, data_dir, KeyError(f"splits: {', '.join(sorted(info.splits))}"))
    return info, info.splits[split]


def read_records(path: str, data_dir: str, max_size: int | None = None) -> list[dict]:
    """The first `max_size` records (all when None) of the split, in their stored order, read
    by random access: only those records are read."""
    tfds = import_tfds(path)
    name, split = parse(path)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
        raise _failed(path, data_dir, e) from e
    n = len(source) if not max_size else min(max_size, len(source))
    return [decode(source[i]) for i in range(n)]


def fingerprint(path: str, data_dir: str) -> str:
    """What identifies the split's contents: the digest of the JSON file it was packed from
    (recorded by the packer) and the split's size. Reads the metadata only, so a run that
    finds its token cache never opens the record files."""
    info, split = _split_info(path, data_dir)
    sources = dict(info.metadata or {}).get(SOURCES_KEY, {})
    return f"{sources.get(split.name, info.version)}|{split.num_examples}"
