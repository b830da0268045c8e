"""Records -> token ids (SPEC §1), held as flat arrays (`TokenizedSet`), never per-record
Python objects."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Sequence

import numpy as np

from coconut_jax.data.records import DataError


@dataclasses.dataclass(frozen=True)
class Example:
    """One record's token ids (a view for evaluation, analysis and tests; training reads the
    flat arrays of `TokenizedSet` directly)."""
    idx: int
    question: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    answer: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedSet:
    """Every record's token ids as flat arrays, never as per-record Python objects.

    Record r is pieces `records[r] .. records[r+1]-1`: its question, its steps, then its
    answer ("### answer" + eos); piece j is `tokens[pieces[j]:pieces[j+1]]`. A record's
    pieces lie back to back, so "the steps from k on, then the answer" is one slice.
    The arrays may be memory-mapped from the cache (read-only).
    """
    tokens: np.ndarray   # int32 [N]
    pieces: np.ndarray   # int64 [P+1]
    records: np.ndarray  # int64 [R+1]

    def __len__(self) -> int:
        return len(self.records) - 1

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizedSet) and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in ("tokens", "pieces", "records"))

    @property
    def n_steps(self) -> np.ndarray:
        return np.diff(self.records) - 2

    def piece(self, j: int) -> tuple[int, ...]:
        return tuple(self.tokens[self.pieces[j]:self.pieces[j + 1]].tolist())

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = int(self.records[i]), int(self.records[i + 1])
        return Example(i, self.piece(a), tuple(self.piece(j) for j in range(a + 1, b - 1)), self.piece(b - 1))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def head(self, n: int) -> "TokenizedSet":
        """The first n records."""
        n = min(n, len(self))
        return TokenizedSet(self.tokens[:self.pieces[self.records[n]]], self.pieces[:self.records[n] + 1],
                            self.records[:n + 1])

    @classmethod
    def from_parts(cls, parts: Sequence[tuple[np.ndarray, np.ndarray]], pieces_per_record: Sequence[int]):
        """From `_pack`ed runs of pieces (tokens, piece lengths) and each record's piece count."""
        tokens = np.concatenate([t for t, _ in parts] or [np.zeros(0, np.int32)])
        lengths = np.concatenate([n for _, n in parts] or [np.zeros(0, np.int64)])
        return cls(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   np.concatenate([[0], np.cumsum(pieces_per_record)]).astype(np.int64))

    @classmethod
    def from_pieces(cls, per_record: Sequence[Sequence[Sequence[int]]]) -> "TokenizedSet":
        """From each record's pieces (question, steps..., answer)."""
        return cls.from_parts([_pack([p for r in per_record for p in r])], [len(r) for r in per_record])

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> "TokenizedSet":
        if isinstance(examples, TokenizedSet):
            return examples
        return cls.from_pieces([(e.question, *e.steps, e.answer) for e in examples])


def _pack(pieces: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of token ids -> (their tokens back to back as int32, each piece's length)."""
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    return np.fromiter(itertools.chain.from_iterable(pieces), np.int32, int(lengths.sum())), lengths


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text. Repeated texts (short steps and answers repeat a lot in large
    sets) are encoded once."""
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # The Rust tokenizer straight (parallel over the batch, no offsets, no Python-side
        # post-processing): several times faster than the tokenizer's __call__ on big sets.
        ids = [e.ids for e in backend.encode_batch_fast(unique, add_special_tokens=special)]
    else:
        ids = tokenizer(unique, add_special_tokens=special)["input_ids"]
    if len(unique) == len(texts):
        return ids
    by_text = dict(zip(unique, ids))
    return [by_text[t] for t in texts]


def question_example(question: str, tokenizer, idx: int = 0) -> Example:
    """A question alone (no steps, no answer), tokenized as `tokenize_records` tokenizes a
    record's question: what a prompt is built from when there is nothing else."""
    return Example(idx, tuple(_encode(tokenizer, [question + "\n"], True)[0]), (), ())


TOKENIZE_CHUNK = 20_000  # records per batch call: bounds the Python lists alive at once


def tokenize_records(records: Sequence[dict], tokenizer, source: str = "<records>") -> TokenizedSet:
    """SPEC §1: question+"\\n", each step+"\\n", "### "+answer then eos (batched, fast tokenizer)."""
    eos = tokenizer.eos_token_id
    parts, counts = [], []
    for s in range(0, len(records), TOKENIZE_CHUNK):
        chunk = records[s:s + TOKENIZE_CHUNK]
        questions = _encode(tokenizer, [r["question"] + "\n" for r in chunk], True)
        flat_steps = _encode(tokenizer, [x + "\n" for r in chunk for x in r["steps"]], False)
        answers = _encode(tokenizer, ["### " + r["answer"] for r in chunk], False)
        ordered, k = [], 0
        for i, r in enumerate(chunk):
            n = len(r["steps"])
            ordered.append(questions[i])
            ordered.extend(flat_steps[k:k + n])
            ordered.append(answers[i] + [eos])
            counts.append(n + 2)
            k += n
        parts.append(_pack(ordered))
    out = TokenizedSet.from_parts(parts, counts)
    if records:
        _check_concatenation(records[0], out[0], tokenizer, source)
    return out


def _check_concatenation(record: dict, ex: Example, tokenizer, source: str) -> None:
    """The reference asserts that the pieces concatenate to the whole text; so do we."""
    whole = record["question"] + "\n" + "\n".join(record["steps"]) + "\n### " + record["answer"]
    expected = tokenizer(whole, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    got = list(ex.question) + [t for s in ex.steps for t in s] + list(ex.answer)
    if got != expected:
        raise DataError(f"{source}: record 0: question/steps/answer do not tokenize to the same ids as the "
                        f"whole text; this tokenizer merges across the newlines Coconut splits on")
