"""CODI's text and batches (no JAX): a record becomes a teacher sequence (question, written
chain, answer) and a student's encoder (question + bot) and decoder (eot + answer) sequences.

Text (the reference's train.py, as SPEC-CODI §1 reads it): the question with the tokenizer's
own special tokens (Llama's bos); the teacher's chain the record's steps joined by spaces,
without the last one unless `include_last_cot`; the answer text "The answer is: N" then eos,
N the last space-separated word of the record's answer. Chain and answer carry no special
token, each piece is cut at 256 tokens. A record trains only when N starts with a digit and
question + steps + answer (raw strings back to back) tokenize to at most `max_token_num`
tokens; evaluation asks every question.

A record is four pieces of a `data.TokenizedSet`: question, chain, answer, and a verdict piece
[kept (0/1), the answer's distilled token]: the index in the answer text of the token before
the answer's first digit token (the ":" of GPT-2's "The answer is: 18", Llama's " " before
"18"), where the reference distils.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from coconut_jax.data.batching import PlanSettings, round_up
from coconut_jax.data.curriculum import check_lengths, epoch_order
from coconut_jax.data.records import DataError
from coconut_jax.data.tokens import TokenizedSet, _encode, _pack
from coconut_jax.labels import IGNORE

from coconut_jax.methods.codi import PHRASE
PIECE_MAX = 256  # the reference tokenizes each piece with truncation at 256 tokens


@dataclasses.dataclass(frozen=True, eq=False)
class Tokens:
    """The ids CODI adds after the pretrained vocabulary `V`: pad = V, bot = V+1, eot = V+2;
    and those a chain's steps are parsed on (`<<` and ` <<` where single tokens, `>>`)."""
    vocab: int
    eos: int
    opens: tuple[int, ...] = ()
    close: int | None = None

    @property
    def pad(self) -> int:
        return self.vocab

    @property
    def bot(self) -> int:
        return self.vocab + 1

    @property
    def eot(self) -> int:
        return self.vocab + 2


def step_ids(tok) -> tuple[tuple[int, ...], int | None]:
    """(the ids a step starts with: `<<` and ` <<`, those that are one token; `>>`'s id or None)."""
    def single(text):
        ids = tok.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None
    return tuple(i for i in (single("<<"), single(" <<")) if i is not None), single(">>")


def chain_groups(chain: list[int], tokens: Tokens, n_groups: int) -> list[list[int]]:
    """The step targets of a teacher chain (SIM-CoT's CODI variant): each `<<`...`>>` in it
    (a start without an end is skipped, tokens between steps dropped), then the end token (eos);
    beyond `n_groups - 1` steps the rest joined into the last group with one end token; fewer
    steps leave the last groups empty."""
    groups, i = [], 0
    while i < len(chain):
        if chain[i] not in tokens.opens:
            i += 1
            continue
        j = i + 1
        while j < len(chain) and chain[j] != tokens.close:
            j += 1
        if j < len(chain):
            groups.append(chain[i:j + 1])
        i = j + 1
    if len(groups) >= n_groups:
        groups = groups[:n_groups - 1] + [[t for g in groups[n_groups - 1:] for t in g]]
    return [g + [tokens.eos] for g in groups]


def encoder_rows(questions, rows: int, width: int, tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [rows, width] of the student's encoder: each question then `bot`, left-padded
    with `pad` (the reference's collator); rows beyond the questions all pad."""
    ids = np.full((rows, width), tokens.pad, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r, q in enumerate(questions):
        ids[r, width - len(q) - 1:] = np.append(np.asarray(q, np.int32), tokens.bot)
        mask[r, width - len(q) - 1:] = 1
    return ids, mask


def verdicts(ts: TokenizedSet) -> tuple[np.ndarray, np.ndarray]:
    """(whether each record trains [R] bool, its answer's distilled token [R]) from the verdict pieces."""
    if not len(ts):
        return np.zeros(0, bool), np.zeros(0, np.int64)
    v = ts.tokens[ts.pieces[ts.records[:-1] + 3][:, None] + np.arange(2)]
    return v[:, 0] == 1, v[:, 1].astype(np.int64)


def teacher_chain(steps: list[str], include_last: bool) -> str:
    return " ".join(steps if include_last else steps[:-1])


def answer_text(answer: str, answers: str) -> str:
    """What follows "The answer is: ": the answer's last word ("number", the reference's) or all of it."""
    return (answer.split(" ")[-1] if answers == "number" else answer.strip()).replace("####", "")


def digit_tokens(tok) -> np.ndarray:
    """[len(tok)] bool: whether a token's text holds a digit."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return np.array([p is not None and re.search(r"[0-9]", p) is not None for p in pieces], bool)


def tokenize(records, tok, source: str, include_last_cot: bool, max_token_num: int,
             answers: str = "number") -> TokenizedSet:
    """Records -> CODI's four pieces per record (module docstring). An answer whose text does
    not start with the phrase's tokens, or (numbers) holds no digit token after it, is a
    DataError naming the record (the reference stops in a debugger there). With "text"
    answers every record trains (within `max_token_num`) and the distilled token is the
    phrase's last."""
    phrase = _encode(tok, [PHRASE], False)[0]
    digits = digit_tokens(tok)
    questions = _encode(tok, [r["question"] for r in records], True)
    chains = _encode(tok, [teacher_chain(r["steps"], include_last_cot) for r in records], False)
    words = [answer_text(r["answer"], answers) for r in records]
    texts = _encode(tok, ["The answer is: " + w for w in words], False)
    whole = _encode(tok, [r["question"] + " ".join(r["steps"]) + r["answer"] for r in records], True)
    pieces = []
    numeric = answers == "number"
    for i, (q, c, a, w, n) in enumerate(zip(questions, chains, texts, words, whole)):
        a = a[:PIECE_MAX]
        where = f"{source}: record {i}"
        if a[:len(phrase)] != phrase:
            raise DataError(f"{where}: the answer text 'The answer is: {w}' does not start with the tokens of "
                            f"{PHRASE!r}; its position cannot be placed")
        kept = bool(w) and (w[0].isdigit() or not numeric) and len(n) <= max_token_num
        after = ([j for j in range(len(phrase), len(a)) if a[j] < len(digits) and digits[a[j]]] if numeric
                 else [len(phrase)])
        if kept and not after:
            raise DataError(f"{where}: no digit token after {PHRASE!r} in its answer text; the distilled token "
                            f"cannot be placed")
        pieces += [q[:PIECE_MAX], c[:PIECE_MAX], a + [tok.eos_token_id], [int(kept), (after[0] - 1) if after else 0]]
    return TokenizedSet.from_parts([_pack(pieces)], [4] * len(records))


@dataclasses.dataclass
class Batch:
    """One (host-local) CODI batch: the arrays the forward reads, and what the loop asks of a batch."""
    data: dict
    indices: np.ndarray
    n_latent: int
    pad: int
    prefix_len: int = 0

    def arrays(self) -> dict:
        return self.data

    def token_count(self) -> int:
        """Real tokens through the model: the teacher's, the student's question, bot, thoughts
        and decoder."""
        d = self.data
        rows = int(d["rows"].sum())
        return int((d["ref_ids"] != self.pad).sum() + d["enc_mask"].sum() + (d["dec_ids"] != self.pad).sum()) \
            + self.n_latent * rows

    @property
    def width(self) -> int:
        return max(self.data["ref_ids"].shape[1], self.data["enc_ids"].shape[1] + self.n_latent
                   + self.data["dec_ids"].shape[1])


class Plan:
    """An epoch's CODI batches (or the validation set's, unshuffled, the file's order), this
    host's rows. Only records whose verdict is "kept" take part. Widths are bucketed to
    `settings.multiple`, one per epoch with static shapes; except that, when pads are attended
    as the reference attends them (`exact_encoder`), an evaluation batch's encoder is exactly as
    wide as its longest question, as the reference's collator pads it."""

    def __init__(self, examples, tokens: Tokens, n_latent: int, settings: PlanSettings, epoch: int,
                 shuffle: bool = True, static_shapes: bool | None = None, exact_encoder: bool = False,
                 step_groups: int = 0, reference_lengths: bool = False):
        s = settings
        if s.batch_size % s.num_hosts:
            raise ValueError(f"global batch {s.batch_size} is not divisible by {s.num_hosts} hosts")
        ts = self.ts = TokenizedSet.from_examples(examples)
        self.tokens, self.n_latent, self.settings = tokens, n_latent, s
        first = ts.records[:-1]
        length = lambda j: ts.pieces[first + j + 1] - ts.pieces[first + j]  # noqa: E731
        self.q_start, self.q_len = ts.pieces[first], length(0)
        self.c_start, self.c_len = ts.pieces[first + 1], length(1)
        self.a_start, self.a_len = ts.pieces[first + 2], length(2)
        kept, self.distilled = verdicts(ts)
        self.teacher_len = self.q_len + self.c_len + self.a_len
        self.student_len = self.q_len + 1 + n_latent + 1 + self.a_len
        if s.max_len is not None and len(ts):
            kept &= check_lengths(np.maximum(self.teacher_len, self.student_len), np.arange(len(ts)), s.max_len,
                                  s.overlong, "CODI sequences (teacher; student with its thoughts)")
        order = epoch_order(len(ts), s.seed, epoch) if shuffle else np.arange(len(ts))
        self._order = order[kept[order]]
        static = s.static_shapes if static_shapes is None else static_shapes
        self.exact_encoder = exact_encoder and not shuffle
        # Step targets (a step decoder): `step_groups` groups per record, parsed from its chain.
        self.step_groups, self.reference_lengths = step_groups, reference_lengths
        self.groups = {i: chain_groups(self._piece(self.c_start, self.c_len, i).tolist(), tokens, step_groups)
                       for i in self._order.tolist()} if step_groups else {}
        self._fixed = None
        if static and len(self._order):
            o = self._order
            longest_step = max((len(g) for gs in self.groups.values() for g in gs), default=1)
            self._fixed = tuple(int(x.max()) for x in (self.teacher_len[o], self.q_len[o] + 1, self.a_len[o] + 1)) \
                + (longest_step,)

    def __len__(self) -> int:
        return -(-len(self._order) // self.settings.batch_size)

    @property
    def num_sequences(self) -> int:
        return len(self._order)

    def batches(self, start: int = 0):
        for k in range(start, len(self)):
            yield self.batch(k)

    def _piece(self, start, n, i) -> np.ndarray:
        return self.ts.tokens[start[i]:start[i] + n[i]]

    def batch(self, k: int) -> Batch:
        s, t = self.settings, self.tokens
        rows_all = self._order[k * s.batch_size:(k + 1) * s.batch_size]
        share = s.batch_size // s.num_hosts
        rows = rows_all[s.host * share:(s.host + 1) * share]
        fixed = self._fixed or (0, 0, 0, 0)
        m = s.multiple
        wt = round_up(max(int(self.teacher_len[rows_all].max(initial=1)), fixed[0]), m)
        enc_longest = int((self.q_len[rows_all] + 1).max(initial=1))
        we = enc_longest if self.exact_encoder else round_up(max(enc_longest, fixed[1]), m)
        wd = round_up(max(int((self.a_len[rows_all] + 1).max(initial=1)), fixed[2]), m)
        d = {"ref_ids": np.full((share, wt), t.pad, np.int32), "ref_labels": np.full((share, wt), IGNORE, np.int32),
             "ref_pos": np.zeros(share, np.int32), "dec_ids": np.full((share, wd), t.pad, np.int32),
             "dec_labels": np.full((share, wd), IGNORE, np.int32), "dec_pos": np.zeros(share, np.int32),
             "rows": np.zeros(share, np.float32)}
        for r, i in enumerate(rows.tolist()):
            q = self._piece(self.q_start, self.q_len, i)
            c = self._piece(self.c_start, self.c_len, i)
            a = self._piece(self.a_start, self.a_len, i)
            ref = np.concatenate([q, c, a])
            d["ref_ids"][r, :len(ref)] = ref
            d["ref_labels"][r, len(q):len(ref)] = ref[len(q):]
            d["ref_pos"][r] = len(q) + len(c) + self.distilled[i]
            dec = np.append(t.eot, a)
            d["dec_ids"][r, :len(dec)] = dec
            d["dec_labels"][r, :len(dec)] = dec
            d["dec_pos"][r] = 1 + self.distilled[i]
            d["rows"][r] = 1.0
        d["enc_ids"], d["enc_mask"] = encoder_rows([self._piece(self.q_start, self.q_len, i) for i in rows.tolist()],
                                                   share, we, t)
        if self.step_groups:
            d.update(self._step_arrays(rows_all, rows, share, fixed[3]))
        idx = np.full(share, -1, np.int64)
        idx[:len(rows)] = rows
        return Batch(d, idx, self.n_latent, t.pad)

    def _step_arrays(self, rows_all, rows, share: int, fixed: int) -> dict:
        """`step_ids` (pad-padded) and `step_mask` [rows, groups, length]: each group's tokens and
        its end token. With `reference_lengths`, the reference's lengths (its quirk): the batch's
        first row sets each group's length, min(its length + 1, the longest), or 1 when it has no
        such group, and every row's group is cut there."""
        g, t = self.step_groups, self.tokens
        longest = max((len(x) for i in rows_all.tolist() for x in self.groups[i]), default=1)
        length = round_up(max(longest, fixed), self.settings.multiple)
        ids = np.full((share, g, length), t.pad, np.int32)
        mask = np.zeros((share, g, length), np.int32)
        for r, i in enumerate(rows.tolist()):
            for k, x in enumerate(self.groups[i]):
                ids[r, k, :len(x)], mask[r, k, :len(x)] = x, 1
        if self.reference_lengths and len(rows_all):
            first = self.groups[int(rows_all[0])]
            for k in range(g):
                keep = min(len(first[k]) + 1, longest) if k < len(first) else 1
                mask[:, k, keep:] = 0
        return {"step_ids": ids, "step_mask": mask}
