"""ProsQA: download the published splits in the Coconut JSON format.

    python -m data_prep.prosqa --out data [--local DIR]

`--local DIR` reads `DIR/prosqa_{split}.json` instead (the reference repository's `data/`
directory, on a machine without internet).
"""
from __future__ import annotations

import argparse
import json
import os

from data_prep.common import PrepError, fetch, write_json

URL = "https://raw.githubusercontent.com/facebookresearch/coconut/main/data/prosqa_{split}.json"


def main(argv=None):
    p = argparse.ArgumentParser(description="Download ProsQA")
    p.add_argument("--out", required=True)
    p.add_argument("--splits", default="train,valid,test")
    p.add_argument("--local", default=None, help="a directory holding prosqa_{split}.json (no download)")
    a = p.parse_args(argv)
    for split in a.splits.split(","):
        url = URL.format(split=split)
        local = os.path.join(a.local, f"prosqa_{split}.json") if a.local else None
        try:
            records = json.loads(fetch(url, local))
        except json.JSONDecodeError as e:
            raise PrepError(f"{local or url}: not JSON ({e.msg})") from e
        write_json(records, os.path.join(a.out, f"prosqa_{split}.json"))


if __name__ == "__main__":
    try:
        main()
    except PrepError as e:
        raise SystemExit(f"error: {e}")
