"""Pack Coconut JSON files into a TensorFlow Datasets dataset that every host of a pod reads
from shared storage (`train_path=tfds:NAME/SPLIT`, `tfds_data_dir=DIR`):

    python -m data_prep.tfds --data data/gsm_train.json,data/gsm_valid.json --name coconut_gsm8k --data_dir DIR

Each file becomes a split named after it without `.json` (`gsm_train`, `gsm_valid`), records
in file order (ArrayRecord files, random access). Records are validated as the JSON loader
does, with the same one-line errors; ProsQA's graph fields are kept when the records have them.
Needs the optional extra: pip install 'coconut_jax[tfds]'.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

import numpy as np

from coconut_jax import tfds_source
from coconut_jax.data import DataError, file_digest, load_records

VERSION = "1.0.0"


def _features(tfds, graph: bool):
    text = tfds.features.Text()
    spec = {"question": text, "answer": text, "steps": tfds.features.Sequence(text)}
    if graph:
        spec.update(idx_to_symbol=tfds.features.Sequence(text),
                    edges=tfds.features.Tensor(shape=(None, 2), dtype=np.int64),
                    root=np.int64, target=np.int64, neg_target=np.int64)
    return tfds.features.FeaturesDict(spec)


def _example(record: dict, graph: bool) -> dict:
    out = {"question": record["question"], "answer": record["answer"], "steps": list(record["steps"])}
    if graph:
        out.update(idx_to_symbol=list(record["idx_to_symbol"]),
                   edges=np.asarray(record["edges"], np.int64).reshape(-1, 2),
                   root=record["root"], target=record["target"], neg_target=record["neg_target"])
    return out


def _check_graph_fields(path: str, records: list[dict]) -> None:
    for i, r in enumerate(records):
        for field in tfds_source.GRAPH_FIELDS:
            if field not in r:
                raise DataError(f"{path}: record {i}: missing field '{field}' (record 0 has ProsQA's graph fields, "
                                f"so every record needs them)")


def split_name(path: str) -> str:
    """The split a file becomes: its name without `.json`."""
    base = os.path.basename(path)
    return base[:-len(".json")] if base.endswith(".json") else base


def pack(files: list[str], name: str, data_dir: str, overwrite: bool = False) -> str:
    """Writes the TFDS dataset `name` (version 1.0.0) under `data_dir`; returns its directory.

    Every file is read and validated before anything is written; an existing version
    directory is an error unless `overwrite`. TFDS writes into a temporary directory and
    renames it into place, so a failure leaves no partial dataset.
    """
    tfds = tfds_source.import_tfds("python -m data_prep.tfds")
    if not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise DataError(f"--name {name!r}: a TFDS dataset name is lower case letters, digits and underscores")
    splits, digests = {}, {}
    for path in files:
        split = split_name(path)
        if not re.match(r"^\w+$", split):
            raise DataError(f"{path}: the split would be named {split!r}; rename the file to letters, digits and "
                            f"underscores")
        if split in splits:
            raise DataError(f"{path}: a second file for split {split!r}")
        splits[split] = load_records(path)
        digests[split] = file_digest(path)
    graph = all(f in next(iter(splits.values()))[0] for f in tfds_source.GRAPH_FIELDS)
    if graph:
        for path, records in zip(files, splits.values()):
            _check_graph_fields(path, records)
    target = os.path.join(data_dir, name, VERSION)
    if os.path.exists(target):
        if not overwrite:
            raise DataError(f"{target}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(target)

    dataset_name = name

    class CoconutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(VERSION)

        def _info(self):
            # disable_shuffling: records keep their file order (examples are stored by key).
            return tfds.core.DatasetInfo(builder=self, features=_features(tfds, graph), disable_shuffling=True,
                                         metadata=tfds.core.MetadataDict({tfds_source.SOURCES_KEY: digests}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(records) for split, records in splits.items()}

        def _generate_examples(self, records):
            for i, r in enumerate(records):
                yield i, _example(r, graph)

    CoconutBuilder(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="comma-separated Coconut JSON files, one split each")
    p.add_argument("--name", required=True, help="the dataset name (tfds:NAME/SPLIT)")
    p.add_argument("--data_dir", required=True, help="where TFDS datasets live (local or gs://)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    files = [f for f in a.data.split(",") if f]
    target = pack(files, a.name, a.data_dir, a.overwrite)
    print(f"wrote {target}: {', '.join(f'tfds:{a.name}/{split_name(f)}' for f in files)}")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
