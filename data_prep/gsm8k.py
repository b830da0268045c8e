"""GSM8K (the augmented iCoT version) -> Coconut JSON.

    python -m data_prep.gsm8k --out data            # downloads train/valid/test
    python -m data_prep.gsm8k --out data --valid ../shared/data/gsm_valid.txt   # local copies

Each raw line is `question||<<a=b>> <<c=d>> #### answer`: the steps are the text between
`||` and the first `##`, stripped and split on single spaces; the answer is the text after
the last `##`, stripped.
"""
from __future__ import annotations

import argparse
import os

from data_prep.common import PrepError, fetch, write_json

URL = "https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/main/data/gsm8k/{split}.txt"
SPLITS = ("train", "valid", "test")


def convert_line(line: str, source: str, lineno: int) -> dict:
    if line.count("||") != 1 or "##" not in line:
        raise PrepError(f"{source}: line {lineno}: expected 'question||steps #### answer'")
    question, rest = line.split("||")
    return {"question": question, "steps": rest.split("##")[0].strip().split(" "),
            "answer": rest.split("##")[-1].strip()}


def convert_text(text: str, source: str) -> list[dict]:
    return [convert_line(line, source, i + 1) for i, line in enumerate(text.splitlines()) if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert GSM8K (iCoT format) to Coconut JSON")
    p.add_argument("--out", required=True, help="output folder (gsm_{split}.json)")
    for s in SPLITS:
        p.add_argument(f"--{s}", help=f"local copy of {s}.txt (skip the download)")
    p.add_argument("--splits", default=",".join(SPLITS))
    a = p.parse_args(argv)
    for split in a.splits.split(","):
        local = getattr(a, split)
        text = fetch(URL.format(split=split), local)
        write_json(convert_text(text, local or URL.format(split=split)), os.path.join(a.out, f"gsm_{split}.json"))


if __name__ == "__main__":
    try:
        main()
    except PrepError as e:
        raise SystemExit(f"error: {e}")
