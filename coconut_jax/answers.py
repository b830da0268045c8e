"""Greedy answers, batched and scored (SPEC §6), and the continuous thoughts of a prompt: what
a Coconut-family method generates with (`Method.predict`'s and `Method.thought_states`'
defaults), and what `evaluate` and `analysis` read. Below the methods: it imports the data
pipeline, the model code and the scoring, nothing that imports the methods' registry."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from coconut_jax import coconut, data, metrics


@dataclasses.dataclass
class Prediction:
    index: int
    text: str
    answer: str
    gold: str
    correct: bool
    cot_match: bool
    new_tokens: int
    thoughts: int

    def to_json(self) -> dict:
        return {"index": self.index, "text": self.text, "answer": self.answer, "gold": self.gold,
                "correct": self.correct, "cot_match": self.cot_match, "new_tokens": self.new_tokens,
                "thoughts": self.thoughts}


def batch_rows(n: int, batch_size: int, row_multiple: int = 1) -> int:
    """Rows per evaluation batch: as few batches as `batch_size` (rounded up to `row_multiple`,
    the devices the rows are split over) allows, with the questions spread evenly over them
    (200 at 64 a batch: 4 x 56 rows, not 3 x 64 and a 64-row batch holding 8), rounded up to
    `row_multiple`."""
    cap = data.round_up(batch_size, row_multiple)
    batches = max(1, -(-n // cap))
    return data.round_up(max(1, -(-n // batches)), row_multiple)


def prompt_batches(examples: Sequence[data.Example], stage: int, cur, tokens, batch_size: int,
                   multiple: int, fits: np.ndarray | None = None,
                   row_multiple: int = 1) -> list[tuple[data.Batch, list[list[int]]]]:
    """Evaluation prompts grouped by length (less padding), as batches of one row count
    (`batch_rows`) whose lengths are padded to `multiple`; `fits` (a mask over `examples`)
    leaves out prompts that do not fit the context."""
    prompts = [data.eval_prompt(e, stage, cur, tokens) for e in examples]
    order = sorted((i for i in range(len(examples)) if fits is None or fits[i]), key=lambda i: (len(prompts[i]), i))
    size = batch_rows(len(order), batch_size, row_multiple)
    out = []
    for s in range(0, len(order), size):
        rows = order[s:s + size]
        batch = data.collate([(prompts[i], None) for i in rows], [examples[i].idx for i in rows],
                             latent_id=tokens.latent, pad_id=tokens.pad, batch_size=size, multiple=multiple)
        out.append((batch, [prompts[i] for i in rows]))
    return out


def fitting_prompts(examples, stage, cur, tokens, max_new_tokens: int, context: int, overlong: str) -> np.ndarray:
    """Which prompts leave room for `max_new_tokens` in the model's context (the last new token
    is never fed back); the others are an error or, with overlong='skip', left out and scored wrong."""
    lengths = [len(data.eval_prompt(e, stage, cur, tokens)) + max_new_tokens - 1 for e in examples]
    return data.check_lengths(lengths, [e.idx for e in examples], context, overlong,
                              f"validation prompts at stage {stage} plus max_new_tokens={max_new_tokens}")


def generate_predictions(model, params, examples, records, stage, cur, tokens, tokenizer, *, batch_size: int,
                         max_new_tokens: int, multiple: int = 32, row_multiple: int = 1, context: int | None = None,
                         overlong: str = "error",
                         put: Callable = None, get: Callable = np.asarray,
                         progress: Callable = lambda it, **kw: it) -> list[Prediction]:
    """Greedy answers for `examples` at `stage`, scored against their records (SPEC §6).

    Prompts that do not fit `context` with `max_new_tokens` are an error or left out (`overlong`);
    batches hold at most `batch_size` rows rounded up to a multiple of `row_multiple`."""
    put = put or (lambda b: b.arrays())
    fits = None if context is None else fitting_prompts(examples, stage, cur, tokens, max_new_tokens, context, overlong)
    # Every batch is dispatched before any result is read back, so the device decodes batch
    # k+1 while the host turns batch k into text.
    batches = prompt_batches(examples, stage, cur, tokens, batch_size, multiple, fits, row_multiple)
    running = [coconut.generate(model, params, put(batch), tokens.eos, prefix_len=batch.prefix_len,
                                n_latent=batch.n_latent, max_new_tokens=max_new_tokens,
                                feedback=cur.feedback)
               for batch, _ in batches]
    preds = []
    for (batch, prompts), (toks, kept) in progress(list(zip(batches, running)), desc=f"generate (stage {stage})"):
        toks, kept = get(toks), get(kept)
        for r, prompt in enumerate(prompts):
            idx = int(batch.indices[r])
            rec = records[idx]
            text = tokenizer.decode(list(prompt) + toks[r, :kept[r]].tolist(), skip_special_tokens=True)
            preds.append(Prediction(idx, text, metrics.extract_answer(text), metrics.normalise_answer(rec["answer"]),
                                    metrics.is_correct(text, rec["answer"]), metrics.cot_matches(text, rec["steps"]),
                                    int(kept[r]), list(prompt).count(tokens.latent)))
    return sorted(preds, key=lambda p: p.index)


def _single(prompt: Sequence[int], tokens) -> data.Batch:
    return data.collate([(list(prompt), None)], [0], latent_id=tokens.latent, pad_id=tokens.pad, batch_size=1,
                        multiple=1)


def thoughts(model, params, prompt: Sequence[int], tokens) -> np.ndarray:
    """The continuous thoughts of one prompt, [n_latent, E]: thought k is the last hidden
    state at the position before latent k, computed with the earlier thoughts fed back."""
    batch = _single(prompt, tokens)
    hidden = coconut.latent_forward(model, params, batch.arrays(), batch.prefix_len, batch.n_latent)
    where = np.nonzero(batch.latent_mask[0])[0]
    return np.asarray(hidden[0, where - 1], np.float32)
