"""Coconut data: JSON records -> validated examples -> token ids -> per-stage sequences -> batches.

Plain Python/NumPy (no JAX). Behaviour follows the reference implementation exactly
(see README "Faithfulness"): tokenization, the stage schedule, the latent/marker layout,
labels, and the left padding that aligns the first latent of every row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from typing import Iterator, Sequence

import numpy as np

IGNORE = -100
METHODS = ("coconut", "cot", "no_thoughts", "no_cot", "pause_as_thought")
LATENT_METHODS = ("coconut", "pause_as_thought")  # sequences with markers and latent tokens
OVERLONG_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A dataset that cannot be used, naming the file, the record and what is wrong."""


# -- records -----------------------------------------------------------------------------

def load_records(path: str, max_size: int | None = None) -> list[dict]:
    """Reads and validates a dataset in the Coconut JSON format (a list of records)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
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
        _validate(path, i, r)
    return data[:max_size] if max_size else data


def _validate(path: str, i: int, r) -> None:
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


# -- tokenization ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    idx: int
    question: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    answer: tuple[int, ...]


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def tokenize_records(records: Sequence[dict], tokenizer, source: str = "<records>") -> list[Example]:
    """SPEC §1: question+"\\n", each step+"\\n", "### "+answer then eos (batched, fast tokenizer)."""
    questions = _encode(tokenizer, [r["question"] + "\n" for r in records], True)
    flat_steps = _encode(tokenizer, [s + "\n" for r in records for s in r["steps"]], False)
    answers = _encode(tokenizer, ["### " + r["answer"] for r in records], False)
    eos = tokenizer.eos_token_id
    out, k = [], 0
    for i, r in enumerate(records):
        n = len(r["steps"])
        out.append(Example(i, tuple(questions[i]), tuple(tuple(s) for s in flat_steps[k:k + n]),
                           tuple(answers[i]) + (eos,)))
        k += n
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


def _cache_key(path: str, tokenizer, max_size) -> str:
    st = os.stat(path)
    h = hashlib.sha256()
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{max_size}|v1".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr(sorted(tokenizer.get_added_vocab().items())).encode())
    return h.hexdigest()[:24]


def load_dataset(path: str, tokenizer, max_size: int | None = None, cache_dir: str | None = None):
    """Validated records and their tokenized examples, cached on disk when `cache_dir` is set.

    The cache key covers the file (path, size, mtime) and the whole tokenizer, so a changed
    file or tokenizer is re-tokenized.
    """
    records = load_records(path, max_size)
    cache = os.path.join(cache_dir, f"{_cache_key(path, tokenizer, max_size)}.pkl") if cache_dir else None
    if cache and os.path.isfile(cache):
        with open(cache, "rb") as f:
            return records, pickle.load(f)
    examples = tokenize_records(records, tokenizer, path)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(examples, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cache)
    return records, examples


# -- curriculum -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Curriculum:
    """The sequence-building settings of SPEC §3 (field names as in the reference YAML)."""
    method: str = "coconut"
    c_thought: int = 1
    max_latent_stage: int = 6
    epochs_per_stage: int = 5
    pad_latent_to_max: bool = True
    uniform_prob: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")

    @property
    def thoughts_per_step(self) -> int:
        # The reference trains "w/o thought" as a plain LM with c_thought forced to 0.
        return 0 if self.method == "no_thoughts" else self.c_thought

    @property
    def markers(self) -> bool:
        return self.method in LATENT_METHODS

    def stage(self, epoch: int) -> int:
        """Scheduled stage of a 0-based epoch."""
        return 0 if self.method in ("cot", "no_cot") else epoch // self.epochs_per_stage

    def latent_steps(self, n_steps: int, stage: int) -> tuple[int, int]:
        """(steps dropped, latent steps) for a record with `n_steps` steps trained at `stage`."""
        if self.method == "no_cot":
            return n_steps, 0
        if stage > self.max_latent_stage:
            n = self.max_latent_stage if self.pad_latent_to_max else min(n_steps, self.max_latent_stage)
            return n_steps, n
        return min(stage, n_steps), stage

    def eval_latents(self, n_steps: int, stage: int) -> int:
        m = self.max_latent_stage if self.pad_latent_to_max else min(self.max_latent_stage, n_steps)
        return min(m, stage) * self.thoughts_per_step


def training_sequence(ex: Example, stage: int, cur: Curriculum, tokens) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of SPEC §3 for one record at an (already drawn) stage."""
    dropped, n_latent_steps = cur.latent_steps(len(ex.steps), stage)
    n_latent = n_latent_steps * cur.thoughts_per_step
    # Only the latent methods have latent steps with thoughts (no_thoughts has c_thought 0).
    head = list(ex.question) + ([tokens.start] + [tokens.latent] * n_latent + [tokens.end] if cur.markers else [])
    tail = [t for s in ex.steps[dropped:] for t in s] + list(ex.answer)
    return head + tail, [IGNORE] * len(head) + tail


def eval_prompt(ex: Example, stage: int, cur: Curriculum, tokens) -> list[int]:
    if not cur.markers:
        return list(ex.question)
    return list(ex.question) + [tokens.start] + [tokens.latent] * cur.eval_latents(len(ex.steps), stage) + [tokens.end]


def draw_stages(examples: Sequence[Example], stage: int, cur: Curriculum, seed: int, epoch: int) -> np.ndarray:
    """Per-record stage of an epoch: `stage`, or with probability uniform_prob a uniform draw
    from 0..len(steps) — a deterministic function of (seed, epoch)."""
    stages = np.full(len(examples), stage, np.int64)
    if cur.uniform_prob > 0:
        rng = np.random.default_rng([seed, epoch, 1])
        hit = rng.random(len(examples)) < cur.uniform_prob
        draws = np.floor(rng.random(len(examples)) * np.array([len(e.steps) + 1 for e in examples])).astype(np.int64)
        stages = np.where(hit, draws, stages)
    return stages


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of an epoch: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_lengths(lengths: Sequence[int], indices: Sequence[int], limit: int, policy: str, what: str) -> np.ndarray:
    """Which sequences fit the model's context; too-long ones are an error or skipped (reported)."""
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy {policy!r} is not one of {OVERLONG_POLICIES}")
    lengths = np.asarray(lengths)
    bad = np.nonzero(lengths > limit)[0]
    if len(bad):
        shown = ", ".join(str(indices[i]) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        msg = (f"{what}: {len(bad)} sequence(s) longer than the model context of {limit} tokens "
               f"(records {shown}; longest {lengths.max()})")
        if policy == "error":
            raise DataError(msg + "; set overlong='skip' to leave them out")
        print(f"warning: {msg}; skipped (overlong='skip')")
    return lengths <= limit


# -- batching ----------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    """Fixed-shape arrays for one (global or host-local) batch.

    Rows whose latents exist are left-padded so their first latent sits at `prefix_len`
    (SPEC §4; rounded up to the bucket size, which only adds masked pads). All latents of
    the batch lie in [prefix_len, prefix_len + n_latent); `latent_mask` marks them, so the
    model never inspects token ids. Filler rows (index -1) complete the last batch.
    """
    input_ids: np.ndarray       # [B, T] int32
    attention_mask: np.ndarray  # [B, T] int32
    position_ids: np.ndarray    # [B, T] int32
    labels: np.ndarray          # [B, T] int32, IGNORE where not trained
    latent_mask: np.ndarray     # [B, T] bool
    indices: np.ndarray         # [B] record index, -1 for filler rows
    prefix_len: int             # static: first latent position (0 when no latents)
    n_latent: int               # static: number of thought passes

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("input_ids", "attention_mask", "position_ids", "labels", "latent_mask")}

    def rows(self, start: int, stop: int) -> "Batch":
        """A slice of rows with the same static shape parameters (a host's share)."""
        return dataclasses.replace(self, **{k: v[start:stop] for k, v in self.arrays().items()},
                                   indices=self.indices[start:stop])


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def collate(seqs: Sequence[tuple[list[int], list[int] | None]], indices: Sequence[int], *, latent_id: int,
            pad_id: int, batch_size: int, multiple: int = 32, min_prefix: int = 0, min_width: int = 0) -> Batch:
    """SPEC §4 batching: aligned first latent, then right padding, to bucketed lengths.

    `min_prefix`/`min_width` let a caller fix the shapes of every batch of an epoch (one
    compiled program per stage) at the price of more padding."""
    if len(seqs) > batch_size:
        raise ValueError(f"{len(seqs)} sequences for a batch of {batch_size}")
    firsts = [ids.index(latent_id) if latent_id in ids else None for ids, _ in seqs]
    counts = [ids.count(latent_id) for ids, _ in seqs]
    with_latent = [f for f in firsts if f is not None]
    prefix = round_up(max(with_latent + [min_prefix]), multiple) if with_latent else 0
    lefts = [prefix - f if f is not None else 0 for f in firsts]
    width = round_up(max([left + len(ids) for left, (ids, _) in zip(lefts, seqs)] + [1, min_width]), multiple)
    shape = (batch_size, width)
    input_ids = np.full(shape, pad_id, np.int32)
    attention = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    labels = np.full(shape, IGNORE, np.int32)
    for r, (left, (ids, lab)) in enumerate(zip(lefts, seqs)):
        n = len(ids)
        input_ids[r, left:left + n] = ids
        attention[r, left:left + n] = 1
        positions[r, left:left + n] = np.arange(n)
        if lab is not None:
            labels[r, left:left + n] = lab
    idx = np.full(batch_size, -1, np.int64)
    idx[:len(indices)] = indices
    latent = (input_ids == latent_id) & (attention == 1)
    return Batch(input_ids, attention, positions, labels, latent, idx, prefix, max(counts + [0]))


@dataclasses.dataclass
class EpochPlan:
    """The batches of one training epoch, deterministic in (seed, epoch), resumable at any batch.

    `host`/`num_hosts` select the rows this process feeds: every host builds the same global
    batch layout (so static shapes agree) but keeps only its contiguous slice of rows.
    """
    examples: Sequence[Example]
    cur: Curriculum
    tokens: object
    stage: int
    seed: int
    epoch: int
    batch_size: int
    multiple: int = 32
    max_len: int | None = None
    overlong: str = "error"
    shuffle: bool = True
    static_shapes: bool = False  # every batch of the epoch padded to the same shape
    host: int = 0
    num_hosts: int = 1

    def __post_init__(self):
        if self.batch_size % self.num_hosts:
            raise ValueError(f"global batch {self.batch_size} is not divisible by {self.num_hosts} hosts")
        stages = draw_stages(self.examples, self.stage, self.cur, self.seed, self.epoch)
        self._seqs = [training_sequence(e, int(s), self.cur, self.tokens) for e, s in zip(self.examples, stages)]
        keep = np.ones(len(self._seqs), bool)
        if self.max_len is not None:
            keep = check_lengths([len(s[0]) for s in self._seqs], [e.idx for e in self.examples], self.max_len,
                                 self.overlong, f"training sequences at stage {self.stage}")
        order = epoch_order(len(self._seqs), self.seed, self.epoch) if self.shuffle else np.arange(len(self._seqs))
        self._order = order[keep[order]]
        self._min_prefix = self._min_width = 0
        if self.static_shapes and len(self._order):
            seqs = [self._seqs[i][0] for i in self._order]
            firsts = [ids.index(self.tokens.latent) for ids in seqs if self.tokens.latent in ids]
            self._min_prefix = max(firsts + [0])
            self._min_width = max(len(ids) + (round_up(self._min_prefix, self.multiple) - ids.index(self.tokens.latent)
                                              if self.tokens.latent in ids else 0) for ids in seqs)

    def __len__(self) -> int:
        return -(-len(self._order) // self.batch_size)

    @property
    def num_sequences(self) -> int:
        return len(self._order)

    def batch(self, k: int) -> Batch:
        rows = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        full = collate([self._seqs[i] for i in rows], [self.examples[i].idx for i in rows],
                       latent_id=self.tokens.latent, pad_id=self.tokens.pad, batch_size=self.batch_size,
                       multiple=self.multiple, min_prefix=self._min_prefix, min_width=self._min_width)
        share = self.batch_size // self.num_hosts
        return full.rows(self.host * share, (self.host + 1) * share)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        for k in range(start, len(self)):
            yield self.batch(k)
