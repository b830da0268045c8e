"""Shared helpers of the dataset preparation scripts."""
from __future__ import annotations

import json
import os
import urllib.request


class PrepError(RuntimeError):
    pass


def fetch(url: str, local: str | None) -> str:
    """Text of `local` when given (offline use), else of `url`."""
    if local:
        if not os.path.isfile(local):
            raise PrepError(f"{local}: input file not found")
        with open(local, encoding="utf-8") as f:
            return f.read()
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read().decode("utf-8")
    except OSError as e:
        raise PrepError(f"{url}: download failed ({e}); pass a local copy instead") from e


def write_json(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(records)} records")
