"""Step targets: what each group of `c_thought` thoughts must write out (SIM-CoT, SPEC-SIMCOT §2).

For a record at a stage, the *replaced* steps (those its thoughts stand for) are split into
groups, one per group of thoughts:

- rule "brackets" (the reference's parse): the replaced steps' tokens back to back; each group
  is a `<<` token through the next `>>` token (tokens outside `<<...>>`, like each step's
  newline, are dropped). A tokenizer that merges `>>\\n` into one token has it split first.
- rule "steps" (for data whose steps hold no brackets, e.g. ProsQA): each replaced step is a
  group, without its trailing newline.

Then, as the reference does: when there are fewer groups than `max_latent_stage`, the filler
(the sequence after `<|end-latent|>` up to its eos: the steps still written and the answer)
is appended until there is a group per group of thoughts; groups from `max_latent_stage` on
are merged into one (a newline between a `>>` and the `<<` after it, between any two for the
"steps" rule). Each target ends with eos; arrays are right-padded with eos. No JAX here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from coconut_jax.data.records import DataError

RULES = ("brackets", "steps")


@dataclasses.dataclass(frozen=True)
class StepIds:
    """The token ids the parse reads: `<<`, `>>`, the newline and `>>\n`, each None where the
    tokenizer has no single token for it, and eos."""
    open: int | None
    close: int | None
    newline: int | None
    merged: int | None
    eos: int


def _single(tok, text: str) -> int | None:
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def step_ids(tok) -> StepIds:
    return StepIds(_single(tok, "<<"), _single(tok, ">>"), _single(tok, "\n"), _single(tok, ">>\n"),
                   tok.eos_token_id)


def _bracket_groups(flat: list[int], ids: StepIds) -> list[list[int]]:
    """The reference's scan (SPEC-SIMCOT §2): `<<` through the next `>>`; a group that runs to
    the end loses its trailing id-0 tokens (the reference's right padding, which it strips)."""
    if ids.merged is not None:  # the reference splits `>>\n` and drops leading id-0 tokens
        out = []
        for t in flat:
            if t == ids.merged:
                out += [ids.close, ids.newline]
            elif t != 0 or out:
                out.append(t)
        flat = out
    groups, i = [], 0
    while i < len(flat):
        if flat[i] != ids.open:
            i += 1
            continue
        group = [ids.open]
        i += 1
        while i < len(flat):
            group.append(flat[i])
            if flat[i] == ids.close:
                break
            i += 1
        while group and group[-1] == 0:
            group.pop()
        groups.append(group)
    return groups


def _step_groups(steps: list[list[int]], ids: StepIds) -> list[list[int]]:
    out = []
    for s in steps:
        s = list(s)
        if s and s[-1] == ids.merged:
            s[-1] = ids.close
        while s and s[-1] == ids.newline:
            s.pop()
        out.append(s)
    return out


@dataclasses.dataclass(frozen=True)
class StepTargets:
    """How a run builds step targets (built once from its config and tokenizer)."""
    rule: str
    ids: StepIds
    max_latent_stage: int
    thoughts_per_step: int

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"step_groups={self.rule!r} is not one of {', '.join(RULES)}")
        if self.rule == "brackets" and None in (self.ids.open, self.ids.close, self.ids.newline):
            raise DataError("step_groups='brackets': the tokenizer has no single token for <<, >> or the newline, "
                            "on which the reference parses its groups; set --config.step_groups=steps")

    def groups(self, replaced: list[list[int]], filler: list[int], n_groups: int) -> list[list[int]]:
        """The targets (each ending with eos) of one record: `replaced` its replaced steps'
        tokens, `filler` what follows its thoughts up to eos, `n_groups` its groups of thoughts."""
        if n_groups == 0:
            return []
        if self.rule == "brackets":
            groups = _bracket_groups([t for s in replaced for t in s], self.ids)
        else:
            groups = _step_groups(replaced, self.ids)
        m = self.max_latent_stage
        if len(groups) < m and filler:
            groups += [list(filler)] * max(n_groups - len(groups), 0)
        out, merged = [], []
        for k, g in enumerate(groups):
            if k < m - 1:
                out.append(g + [self.ids.eos])
                continue
            joins = self.rule == "steps" or (merged and merged[-1] == self.ids.close and g and g[0] == self.ids.open)
            if merged and joins:
                merged.append(self.ids.newline)
            merged += g
        if merged:
            out.append(merged + [self.ids.eos])
        return out[:n_groups]

    def check_parses(self, ts, source: str) -> None:
        """The brackets rule on data whose steps hold no `<<` anywhere is a one-line error."""
        if self.rule != "brackets" or not len(ts) or not int(ts.n_steps.sum()):
            return
        if not np.any(ts.tokens == self.ids.open) or not np.any(ts.tokens == self.ids.close):
            raise DataError(f"{source}: no step holds a <<...>> group, so step_groups='brackets' (the reference's "
                            f"parse) finds nothing to supervise; set --config.step_groups=steps")


class StepPlan:
    """The step targets of an epoch plan's records, parsed once per plan and padded into
    `step_ids`/`step_mask` arrays [rows, groups, length] batch by batch. `pad(n)`: the length
    an array of n tokens is padded to (the plan's length buckets)."""

    def __init__(self, targets: StepTargets, seqs, rows: np.ndarray, pad: Callable[[int], int], static: bool):
        self.targets, self.pad = targets, pad
        ts, per = seqs.ts, targets.thoughts_per_step
        self.groups: dict[int, list[list[int]]] = {}
        for i in rows.tolist():
            n_groups = int(seqs.n_latent[i]) // per if per else 0
            first_step = int(ts.records[i]) + 1
            replaced = [ts.piece(j) for j in range(first_step, first_step + int(seqs.dropped[i]))]
            tail = ts.tokens[seqs.tail_start[i]:seqs.tail_start[i] + seqs.tail_len[i]].tolist()
            filler = tail[:tail.index(targets.ids.eos)] if targets.ids.eos in tail else tail
            self.groups[i] = targets.groups(replaced, filler, n_groups)
        self.static = None
        if static and self.groups:
            self.static = (max(len(g) for g in self.groups.values()), self._length(list(self.groups)))

    def _length(self, rows) -> int:
        longest = max((len(t) for i in rows for t in self.groups.get(i, [])), default=0)
        return self.pad(longest + 1)  # the reference pads each group to its longest + 1

    def arrays(self, rows, share: int, all_rows) -> dict[str, np.ndarray]:
        """`step_ids` (eos-padded) and `step_mask` (1 on each target's tokens and its eos) of
        `rows` (this host's), shaped by `all_rows` (the global batch) or the plan's static shape."""
        n_groups, length = self.static or (max((len(self.groups[i]) for i in all_rows), default=0),
                                           self._length(all_rows))
        ids = np.full((share, n_groups, length), self.targets.ids.eos, np.int32)
        mask = np.zeros((share, n_groups, length), np.int32)
        for r, i in enumerate(rows):
            for t, g in enumerate(self.groups[i]):
                ids[r, t, :len(g)] = g
                mask[r, t, :len(g)] = 1
        return {"step_ids": ids, "step_mask": mask}
