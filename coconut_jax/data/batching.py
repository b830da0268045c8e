"""Sequences -> fixed-shape batches (SPEC §4): the first latent of every row aligned, bucketed
lengths, and an epoch's batches planned from the flat token arrays."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from coconut_jax.data.curriculum import IGNORE, Sequences, check_lengths, draw_stages, epoch_order
from coconut_jax.data.step_targets import StepPlan, StepTargets
from coconut_jax.data.tokens import Example, TokenizedSet


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
    extras: dict = dataclasses.field(default_factory=dict)  # a method's own arrays (step targets)

    def arrays(self) -> dict[str, np.ndarray]:
        base = ("input_ids", "attention_mask", "position_ids", "labels", "latent_mask")
        return {**{k: getattr(self, k) for k in base}, **self.extras}

    # What the training loop reads of any method's batch (throughput and FLOPs).
    def token_count(self) -> int:
        """The real (unpadded) tokens the batch runs through the model."""
        return int(self.attention_mask.sum())

    @property
    def width(self) -> int:
        """The sequence length the attention's cost is counted at."""
        return self.input_ids.shape[1]


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


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """How a run turns records into batches, built once from its config: the seed of the
    shuffles and stage draws, the global (micro-)batch, the length buckets, the model's context
    and what to do with longer sequences, one shape per epoch or not, and this host's share."""
    seed: int
    batch_size: int
    multiple: int = 32
    max_len: int | None = None
    overlong: str = "error"
    static_shapes: bool = False
    host: int = 0
    num_hosts: int = 1
    step_targets: StepTargets | None = None  # the method's step targets, when it has them


@dataclasses.dataclass
class EpochPlan:
    """The batches of one training epoch, deterministic in (seed, epoch), resumable at any batch.

    Every record's sequence at its drawn stage is described by a few integers (question
    slice, latent count, tail slice) computed for all records at once with NumPy; tokens
    are copied from the flat arrays only when a batch is built. `settings.host`/`num_hosts`
    select the rows this process feeds: the layout (static shapes) is that of the global
    batch, but only this host's contiguous share of rows is filled.
    """
    examples: TokenizedSet | Sequence[Example]
    cur: object  # the run's methods.Curriculum
    tokens: object
    stage: int
    epoch: int
    settings: PlanSettings
    shuffle: bool = True
    static_shapes: bool | None = None  # every batch padded to one shape; None: as `settings` say

    def __post_init__(self):
        s = self.settings
        if s.batch_size % s.num_hosts:
            raise ValueError(f"global batch {s.batch_size} is not divisible by {s.num_hosts} hosts")
        ts = self.ts = TokenizedSet.from_examples(self.examples)
        stages = draw_stages(ts.n_steps, self.stage, self.cur, s.seed, self.epoch)
        self.seqs = Sequences.at(ts, stages, self.cur, self.tokens)
        self._n_latent, self._lengths, self._firsts = self.seqs.n_latent, self.seqs.lengths, self.seqs.firsts
        keep = np.ones(len(ts), bool)
        if s.max_len is not None:
            keep = check_lengths(self._lengths, np.arange(len(ts)), s.max_len, s.overlong,
                                 f"training sequences at stage {self.stage}")
        order = epoch_order(len(ts), s.seed, self.epoch) if self.shuffle else np.arange(len(ts))
        self._order = order[keep[order]]
        static = s.static_shapes if self.static_shapes is None else self.static_shapes
        self._steps = None if s.step_targets is None else StepPlan(
            s.step_targets, self.seqs, self._order, lambda n: round_up(n, s.multiple), bool(static))
        self._min_prefix = self._min_width = 0
        if static and len(self._order):
            firsts, lengths = self._firsts[self._order], self._lengths[self._order]
            self._min_prefix = int(firsts.max(initial=0))
            self._min_width = int((lengths + np.where(firsts >= 0, round_up(self._min_prefix, s.multiple) - firsts,
                                                      0)).max())

    def __len__(self) -> int:
        return -(-len(self._order) // self.settings.batch_size)

    @property
    def num_sequences(self) -> int:
        return len(self._order)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of record i at its drawn stage, from the flat arrays."""
        return self.seqs[i]

    def batch(self, k: int) -> Batch:
        s = self.settings
        batch_rows = self._order[k * s.batch_size:(k + 1) * s.batch_size]
        prefix, lefts, width = _layout(self._lengths[batch_rows], self._firsts[batch_rows], s.multiple,
                                       self._min_prefix, self._min_width)
        share = s.batch_size // s.num_hosts
        mine = slice(s.host * share, (s.host + 1) * share)
        rows, lefts = batch_rows[mine], lefts[mine]
        input_ids, attention, positions, labels = _empty_batch(share, width, self.tokens.pad)
        for r, (i, left) in enumerate(zip(rows.tolist(), lefts.tolist())):
            ids, lab = self.sequence(i)
            input_ids[r, left:left + len(ids)] = ids
            labels[r, left:left + len(ids)] = lab
        n_latent = int(self._n_latent[batch_rows].max(initial=0)) if self.cur.markers else 0
        batch = _finish(input_ids, attention, positions, labels, lefts, self._lengths[rows], rows, share,
                        self.tokens.latent, prefix, n_latent)
        if self._steps is not None:
            batch.extras = self._steps.arrays(rows.tolist(), share, batch_rows.tolist())
        return batch

    def batches(self, start: int = 0) -> Iterator[Batch]:
        for k in range(start, len(self)):
            yield self.batch(k)
