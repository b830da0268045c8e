"""Coconut JSON records: a list of {question, steps, answer}, validated with one-line errors
naming the file, the record and the field."""
from __future__ import annotations

import json
from coconut_jax import files


class DataError(ValueError):
    """A dataset that cannot be used, naming the file, the record and what is wrong."""


# -- records -----------------------------------------------------------------------------

def load_records(path: str, max_size: int | None = None) -> list[dict]:
    """Reads and validates a dataset in the Coconut JSON format (a list of records)."""
    if not files.isfile(path):
        raise DataError(f"{path}: dataset file not found")
    text = files.read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found a JSON {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the list of records is empty")
    for i, r in enumerate(data):
        validate_record(path, i, r)
    return data[:max_size] if max_size else data


def validate_record(path: str, i: int, r) -> None:
    where = f"{path}: record {i}"
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected an object with question/steps/answer, found {type(r).__name__}")
    for field in ("question", "answer", "steps"):
        if field not in r:
            raise DataError(f"{where}: missing field '{field}'")
    if not isinstance(r["question"], str) or not r["question"].strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string")
    if not isinstance(r["answer"], str):
        raise DataError(f"{where}: field 'answer' must be a string, found {type(r['answer']).__name__}")
    if not isinstance(r["steps"], list):
        raise DataError(f"{where}: field 'steps' must be a list of strings, found {type(r['steps']).__name__}")
    for j, s in enumerate(r["steps"]):
        if not isinstance(s, str):
            raise DataError(f"{where}: field 'steps' item {j} must be a string, found {type(s).__name__}")
