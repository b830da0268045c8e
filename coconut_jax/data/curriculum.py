"""What a record becomes at a stage (SPEC §3): which steps are dropped, how many thoughts
replace them, the evaluation prompt. The stage schedule and what differs between methods come
from the run's curriculum (`methods.Curriculum`, passed in as `cur`: this pipeline does not
import the methods)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from coconut_jax.labels import IGNORE
from coconut_jax.data.records import DataError
from coconut_jax.data.tokens import Example, TokenizedSet

OVERLONG_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Every record's training sequence at its stage (SPEC §3), as a few integers per record
    computed for all records at once: the question's slice, the number of thoughts, and the
    tail's slice (the steps kept, then the answer, back to back in the flat arrays). Tokens
    are copied out only when a sequence is asked for. The one builder of training sequences."""
    ts: TokenizedSet
    tokens: object  # start/end/latent ids (latent_vocab.LatentTokens)
    markers: bool
    q_start: np.ndarray
    q_len: np.ndarray
    n_latent: np.ndarray
    tail_start: np.ndarray
    tail_len: np.ndarray
    dropped: np.ndarray  # steps left out (replaced by thoughts, or dropped outright)

    @classmethod
    def at(cls, ts: TokenizedSet, stages: np.ndarray, cur, tokens) -> "Sequences":
        dropped, latent_steps = cur.latent_steps(ts.n_steps, stages)
        first_piece = ts.records[:-1]
        q_start = ts.pieces[first_piece]
        tail_start = ts.pieces[first_piece + 1 + dropped]
        return cls(ts, tokens, cur.markers, q_start, ts.pieces[first_piece + 1] - q_start,
                   (latent_steps * cur.thoughts_per_step).astype(np.int64), tail_start,
                   ts.pieces[ts.records[1:]] - tail_start, np.broadcast_to(dropped, ts.n_steps.shape))

    @property
    def head_len(self) -> np.ndarray:
        """Question, then `<start>`, the thoughts and `<end>` when the method has markers."""
        return self.q_len + (self.n_latent + 2 if self.markers else 0)

    @property
    def lengths(self) -> np.ndarray:
        return self.head_len + self.tail_len

    @property
    def firsts(self) -> np.ndarray:
        """Position of each sequence's first latent (after the question and `<start>`), -1 for none."""
        return np.where((self.n_latent > 0) & self.markers, self.q_len + 1, -1)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of record i: the head is not trained (IGNORE), the tail is."""
        t, toks = self.ts.tokens, self.tokens
        head = [t[self.q_start[i]:self.q_start[i] + self.q_len[i]]]
        if self.markers:
            head.append(np.array([toks.start] + [toks.latent] * int(self.n_latent[i]) + [toks.end], np.int32))
        tail = t[self.tail_start[i]:self.tail_start[i] + self.tail_len[i]]
        n_head = sum(len(h) for h in head)
        return np.concatenate(head + [tail]), np.concatenate([np.full(n_head, IGNORE, np.int32), tail])


def training_sequence(ex: Example, stage: int, cur, tokens) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of SPEC §3 for one record at an (already drawn) stage."""
    ids, labels = Sequences.at(TokenizedSet.from_examples([ex]), np.array([stage]), cur, tokens)[0]
    return ids.tolist(), labels.tolist()


def eval_prompt(ex: Example, stage: int, cur, tokens) -> list[int]:
    if not cur.markers:
        return list(ex.question)
    return list(ex.question) + [tokens.start] + [tokens.latent] * cur.eval_latents(len(ex.steps), stage) + [tokens.end]


def draw_stages(n_steps: np.ndarray, stage: int, cur, seed: int, epoch: int) -> np.ndarray:
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
