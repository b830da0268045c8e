"""Coconut data: JSON records -> validated examples -> token ids -> per-stage sequences -> batches.

Plain Python/NumPy (no JAX). Token ids live in flat arrays (`TokenizedSet`, memory-mapped
from a verified cache), and an epoch's sequences are a few integers per record computed with
NumPy, so a 385k-record set costs its tokens in int32 and no per-record Python objects.
Behaviour follows the reference implementation exactly
(see README "Faithfulness"): tokenization, the stage schedule, the latent/marker layout,
labels, and the left padding that aligns the first latent of every row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np

from coconut_jax import methods

IGNORE = -100
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


# -- the token cache ----------------------------------------------------------------------------

CACHE_FORMAT = 2  # bump when the arrays' meaning changes: older caches are then re-tokenized
_ARRAYS = ("tokens", "pieces", "records")


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _cache_key(source_digest: str, tokenizer, max_size) -> str:
    """The dataset's contents, the whole tokenizer, the size limit and the format version: a
    change to any of them is a different cache."""
    h = hashlib.sha256(f"{source_digest}|{max_size}|v{CACHE_FORMAT}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr(sorted(tokenizer.get_added_vocab().items())).encode())
    h.update(repr(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:24]


def _array_digest(a: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"), digest_size=16).hexdigest()


def write_cache(directory: str, ts: TokenizedSet) -> None:
    """The arrays as .npy files plus a manifest with their checksums, made under a temporary
    name and renamed into place, so a reader sees a whole cache or none."""
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
    if not os.path.isfile(manifest_path):
        return None
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
        print(f"warning: token cache {directory} is unusable ({e}); re-tokenizing")
        shutil.rmtree(directory, ignore_errors=True)
        return None


def load_dataset(path: str, tokenizer, max_size: int | None = None, cache_dir: str | None = None,
                 with_records: bool = True, tfds_data_dir: str = "") -> tuple[list[dict] | None, TokenizedSet]:
    """Validated records (None when not asked for) and their tokenized set, cached on disk
    when `cache_dir` is set.

    `path` is a Coconut JSON file or a TFDS split `tfds:NAME/SPLIT` (in `tfds_data_dir`,
    see `coconut_jax.tfds_source`), whose records are the same, in the same order, as the file
    it was packed from. A cached set is used only for the same contents, tokenizer, size
    limit and format version; it is memory-mapped, so a training set costs its token count
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
    elif not os.path.isfile(path):
        raise DataError(f"{path}: dataset file not found")
    else:
        digest = file_digest(path)
    cache = os.path.join(cache_dir, _cache_key(digest, tokenizer, max_size)) if cache_dir else None
    ts = read_cache(cache) if cache else None
    records = None
    if with_records or ts is None:
        if tfds:
            records = tfds_source.read_records(path, tfds_data_dir, max_size)
            for i, r in enumerate(records):
                _validate(path, i, r)
        else:
            records = load_records(path, max_size)
    if ts is None:
        ts = tokenize_records(records, tokenizer, path)
        if cache:
            write_cache(cache, ts)
    return (records if with_records else None), ts


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
        methods.get(self.method)  # ValueError naming the known methods

    @property
    def spec(self) -> methods.Method:
        """The method's definition (methods/), which decides everything below."""
        return methods.get(self.method)

    @property
    def thoughts_per_step(self) -> int:
        return self.spec.thoughts_per_step(self.c_thought)

    @property
    def markers(self) -> bool:
        return self.spec.latent_tokens

    @property
    def feedback(self) -> bool:
        return self.spec.feedback

    def stage(self, epoch: int) -> int:
        """Scheduled stage of a 0-based epoch."""
        return self.spec.stage(epoch, self.epochs_per_stage)

    def latent_steps(self, n_steps, stage):
        """(steps dropped, latent steps) for records with `n_steps` steps trained at `stage`
        (scalars or NumPy arrays of records alike)."""
        return self.spec.latent_steps(n_steps, stage, self.max_latent_stage, self.pad_latent_to_max)

    def eval_latents(self, n_steps: int, stage: int) -> int:
        m = self.max_latent_stage if self.pad_latent_to_max else min(self.max_latent_stage, n_steps)
        return min(m, stage) * self.thoughts_per_step


def training_sequence(ex: Example, stage: int, cur: Curriculum, tokens) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of SPEC §3 for one record at an (already drawn) stage."""
    dropped, n_latent_steps = (int(x) for x in cur.latent_steps(len(ex.steps), stage))
    n_latent = n_latent_steps * cur.thoughts_per_step
    # Only the latent methods have latent steps with thoughts (no_thoughts has c_thought 0).
    head = list(ex.question) + ([tokens.start] + [tokens.latent] * n_latent + [tokens.end] if cur.markers else [])
    tail = [t for s in ex.steps[dropped:] for t in s] + list(ex.answer)
    return head + tail, [IGNORE] * len(head) + tail


def eval_prompt(ex: Example, stage: int, cur: Curriculum, tokens) -> list[int]:
    if not cur.markers:
        return list(ex.question)
    return list(ex.question) + [tokens.start] + [tokens.latent] * cur.eval_latents(len(ex.steps), stage) + [tokens.end]


def draw_stages(n_steps: np.ndarray, stage: int, cur: Curriculum, seed: int, epoch: int) -> np.ndarray:
    """Per-record stage of an epoch (`n_steps`: each record's step count): `stage`, or with
    probability uniform_prob a uniform draw from 0..n_steps — a function of (seed, epoch)."""
    n_steps = np.asarray(n_steps)
    stages = np.full(len(n_steps), stage, np.int64)
    if cur.uniform_prob > 0:
        rng = np.random.default_rng([seed, epoch, 1])
        hit = rng.random(len(n_steps)) < cur.uniform_prob
        draws = np.floor(rng.random(len(n_steps)) * (n_steps + 1)).astype(np.int64)
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


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def _layout(lengths: np.ndarray, firsts: np.ndarray, multiple: int, min_prefix: int = 0, min_width: int = 0):
    """(prefix, left pads, width) of SPEC §4: rows with latents (first latent at `firsts`,
    -1 for none) are left-padded so their first latent sits at `prefix`, a bucket multiple;
    every row then ends within `width`, also a bucket multiple."""
    has = firsts >= 0
    prefix = round_up(int(max(firsts[has].max(), min_prefix)), multiple) if has.any() else 0
    lefts = np.where(has, prefix - firsts, 0)
    width = round_up(int(max((lefts + lengths).max(initial=0), 1, min_width)), multiple)
    return prefix, lefts, width


def _empty_batch(batch_size: int, width: int, pad_id: int):
    shape = (batch_size, width)
    return (np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
            np.full(shape, IGNORE, np.int32))


def _finish(input_ids, attention, positions, labels, lefts, lengths, indices, batch_size, latent_id, prefix, n_latent):
    for r, (left, n) in enumerate(zip(lefts.tolist(), lengths.tolist())):
        attention[r, left:left + n] = 1
        positions[r, left:left + n] = np.arange(n)
    idx = np.full(batch_size, -1, np.int64)
    idx[:len(indices)] = indices
    latent = (input_ids == latent_id) & (attention == 1)
    return Batch(input_ids, attention, positions, labels, latent, idx, prefix, n_latent)


def collate(seqs: Sequence[tuple[list[int], list[int] | None]], indices: Sequence[int], *, latent_id: int,
            pad_id: int, batch_size: int, multiple: int = 32, min_prefix: int = 0, min_width: int = 0) -> Batch:
    """SPEC §4 batching of explicit sequences: aligned first latent, then right padding, to
    bucketed lengths. (Training batches come from `EpochPlan`, which lays out the same way
    straight from the flat token arrays.)

    `min_prefix`/`min_width` let a caller fix the shapes of every batch of an epoch (one
    compiled program per stage) at the price of more padding."""
    if len(seqs) > batch_size:
        raise ValueError(f"{len(seqs)} sequences for a batch of {batch_size}")
    firsts = np.array([ids.index(latent_id) if latent_id in ids else -1 for ids, _ in seqs], np.int64)
    lengths = np.array([len(ids) for ids, _ in seqs], np.int64)
    prefix, lefts, width = _layout(lengths, firsts, multiple, min_prefix, min_width)
    input_ids, attention, positions, labels = _empty_batch(batch_size, width, pad_id)
    for r, (left, (ids, lab)) in enumerate(zip(lefts.tolist(), seqs)):
        input_ids[r, left:left + len(ids)] = ids
        if lab is not None:
            labels[r, left:left + len(ids)] = lab
    n_latent = max([ids.count(latent_id) for ids, _ in seqs] + [0])
    return _finish(input_ids, attention, positions, labels, lefts, lengths, indices, batch_size, latent_id, prefix,
                   n_latent)


@dataclasses.dataclass
class EpochPlan:
    """The batches of one training epoch, deterministic in (seed, epoch), resumable at any batch.

    Every record's sequence at its drawn stage is described by a few integers (question
    slice, latent count, tail slice) computed for all records at once with NumPy; tokens
    are copied from the flat arrays only when a batch is built. `host`/`num_hosts` select
    the rows this process feeds: the layout (static shapes) is that of the global batch,
    but only this host's contiguous share of rows is filled.
    """
    examples: TokenizedSet | Sequence[Example]
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
        ts = self.ts = TokenizedSet.from_examples(self.examples)
        n_steps = ts.n_steps
        stages = draw_stages(n_steps, self.stage, self.cur, self.seed, self.epoch)
        dropped, latent_steps = self.cur.latent_steps(n_steps, stages)
        first_piece = ts.records[:-1]
        self._q_start = ts.pieces[first_piece]
        self._q_len = ts.pieces[first_piece + 1] - self._q_start
        self._n_latent = (latent_steps * self.cur.thoughts_per_step).astype(np.int64)
        self._tail_start = ts.pieces[first_piece + 1 + dropped]
        self._tail_len = ts.pieces[ts.records[1:]] - self._tail_start
        markers = 2 if self.cur.markers else 0
        self._head_len = self._q_len + (self._n_latent + markers if markers else 0)
        self._lengths = self._head_len + self._tail_len
        # The first latent follows the question and <start>; rows without latents have none.
        self._firsts = np.where((self._n_latent > 0) & bool(markers), self._q_len + 1, -1)
        keep = np.ones(len(ts), bool)
        if self.max_len is not None:
            keep = check_lengths(self._lengths, np.arange(len(ts)), self.max_len, self.overlong,
                                 f"training sequences at stage {self.stage}")
        order = epoch_order(len(ts), self.seed, self.epoch) if self.shuffle else np.arange(len(ts))
        self._order = order[keep[order]]
        self._min_prefix = self._min_width = 0
        if self.static_shapes and len(self._order):
            firsts, lengths = self._firsts[self._order], self._lengths[self._order]
            self._min_prefix = int(firsts.max(initial=0))
            self._min_width = int((lengths + np.where(firsts >= 0, round_up(self._min_prefix, self.multiple) - firsts,
                                                      0)).max())

    def __len__(self) -> int:
        return -(-len(self._order) // self.batch_size)

    @property
    def num_sequences(self) -> int:
        return len(self._order)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of record i at its drawn stage, from the flat arrays."""
        toks, t = self.tokens, self.ts.tokens
        q = t[self._q_start[i]:self._q_start[i] + self._q_len[i]]
        head = [q] + ([np.array([toks.start] + [toks.latent] * int(self._n_latent[i]) + [toks.end], np.int32)]
                      if self.cur.markers else [])
        tail = t[self._tail_start[i]:self._tail_start[i] + self._tail_len[i]]
        ids = np.concatenate(head + [tail])
        labels = np.concatenate([np.full(self._head_len[i], IGNORE, np.int32), tail])
        return ids, labels

    def batch(self, k: int) -> Batch:
        batch_rows = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        prefix, lefts, width = _layout(self._lengths[batch_rows], self._firsts[batch_rows], self.multiple,
                                       self._min_prefix, self._min_width)
        share = self.batch_size // self.num_hosts
        mine = slice(self.host * share, (self.host + 1) * share)
        rows, lefts = batch_rows[mine], lefts[mine]
        input_ids, attention, positions, labels = _empty_batch(share, width, self.tokens.pad)
        for r, (i, left) in enumerate(zip(rows.tolist(), lefts.tolist())):
            ids, lab = self.sequence(i)
            input_ids[r, left:left + len(ids)] = ids
            labels[r, left:left + len(ids)] = lab
        n_latent = int(self._n_latent[batch_rows].max(initial=0)) if self.cur.markers else 0
        return _finish(input_ids, attention, positions, labels, lefts, self._lengths[rows], rows, share,
                       self.tokens.latent, prefix, n_latent)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        for k in range(start, len(self)):
            yield self.batch(k)
