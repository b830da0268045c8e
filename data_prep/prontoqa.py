"""ProntoQA (5-hop, fictional ontology) generator output -> Coconut JSON.

Generate `5hop_0shot_random.json` with the ProntoQA generator (github.com/asaparov/prontoqa,
`python run_experiment.py --model-name json --model-size dummy --ordering random --num-trials
10000 --few-shot-examples 0 --ontology fictional --min-hops 5 --max-hops 5 --hops-skip 1`), then

    python -m data_prep.prontoqa --input 5hop_0shot_random.json --out data

question = question + " " + query; steps = chain-of-thought sentences paired two by two;
the first 9000 examples are train, the next 200 valid, the rest test.
"""
from __future__ import annotations

import argparse
import json
import os

from data_prep.common import PrepError, fetch, write_json

SPLIT_SIZES = (("train", 9000), ("valid", 200))


def convert(data, source: str) -> list[dict]:
    if not isinstance(data, dict):
        raise PrepError(f"{source}: expected the generator's JSON object of examples")
    out = []
    for key, value in data.items():
        try:
            ex = value["test_example"]
            cot = ex["chain_of_thought"]
            out.append({"question": ex["question"] + " " + ex["query"],
                        "steps": [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)],
                        "answer": ex["answer"]})
        except (KeyError, TypeError) as e:
            raise PrepError(f"{source}: example {key!r}: missing field {e}") from e
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert ProntoQA generator output to Coconut JSON")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        data = json.loads(fetch("", a.input))
    except json.JSONDecodeError as e:
        raise PrepError(f"{a.input}: not JSON ({e.msg})") from e
    records, start = convert(data, a.input), 0
    for split, size in SPLIT_SIZES:
        write_json(records[start:start + size], os.path.join(a.out, f"prontoqa_{split}.json"))
        start += size
    write_json(records[start:], os.path.join(a.out, "prontoqa_test.json"))


if __name__ == "__main__":
    try:
        main()
    except PrepError as e:
        raise SystemExit(f"error: {e}")
