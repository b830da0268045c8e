"""Validation: batched generation and scoring, the teacher-forced validation loss, and a run's
evaluation at a stage (`Evaluator`)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from coconut_jax import coconut, config as config_lib, data, files, metrics, sharding, steps


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


def prompt_batches(examples: Sequence[data.Example], stage: int, cur: data.Curriculum, tokens, batch_size: int,
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


def summarize(preds: Sequence[Prediction], questions: int | None = None) -> dict[str, float]:
    """Accuracy and CoT match over all `questions` (those left out as too long count as wrong);
    generated tokens and thoughts averaged over the answered ones."""
    questions = len(preds) if questions is None else questions
    n, answered = max(questions, 1), max(len(preds), 1)
    return {"acc": sum(p.correct for p in preds) / n, "cot_em": sum(p.cot_match for p in preds) / n,
            "new_tokens": sum(p.new_tokens for p in preds) / answered,
            "thoughts": sum(p.thoughts for p in preds) / answered, "skipped": questions - len(preds)}


class Evaluator:
    """A run's evaluation at a stage: the validation loss (when asked; one program per stage, the
    sums kept on the device), greedy answers to every validation question, the predictions file,
    the printed examples, and one metrics event. Called as `evaluator(stage, eval_loss=True)`."""

    def __init__(self, run, progress: Callable = lambda it, **kw: it):
        c = run.c
        self.run, self.progress = run, progress
        self.rows, self.max_new = eval_rows_for(c), max_new_tokens_for(c)

    def loss(self, stage: int) -> dict:
        """{"eval/loss": the method's objective over the validation set, and "eval/<term>" for
        each term of a several-term loss}: each term's sums over every batch, divided once."""
        run, spec = self.run, self.run.cur.spec
        # A per-batch term is only the reference's in the reference's batches: eval_batch_size rows.
        rows = data.round_up(self.rows, run.ctx.data_devices) if spec.loss_per_batch else None
        plan = run.plan(run.val_examples, stage, run.at.epoch, shuffle=False, static_shapes=True, batch_size=rows)
        batches = [steps.eval_loss_terms(run.model, run.params, run.put(batch), method=spec,
                                         prefix_len=batch.prefix_len, n_latent=batch.n_latent,
                                         loss_chunk=run.c.loss_chunk, parts=run.state.parts,
                                         part_models=run.state.part_models)
                   for batch in self.progress(plan.batches(), desc="val loss", total=len(plan))]
        batches = jax.device_get(batches)
        out, total = {}, None
        for term, w in spec.loss:
            s, n = (float(x) for x in np.sum([b[term] for b in batches], axis=0)) if batches else (0.0, 0.0)
            mean = s / max(n, 1.0)
            weighted = mean if w == 1.0 else w * mean
            total = weighted if total is None else total + weighted
            out[f"eval/{term}"] = mean
        return {"eval/loss": total, **(out if len(spec.loss) > 1 else {})}

    def __call__(self, stage: int, eval_loss: bool = True) -> dict:
        run, c, ctx = self.run, self.run.c, self.run.ctx
        out = {"step": run.at.step, "epoch": run.at.epoch + 1, "stage": stage}
        if eval_loss:
            out.update(self.loss(stage))
        one_process = jax.process_count() == 1
        parts = {p.name: (dict(run.state.part_models)[p.name], run.state.parts[p.name])
                 for p in run.cur.spec.parts if p.inference}
        preds = run.cur.spec.predict(
            run.model, run.params, parts, run.val_examples, run.val_records, stage, run.cur, run.tokens, run.tok,
            # Sharded over this host's devices: batches padded to a multiple of them with unscored filler rows.
            batch_size=self.rows, row_multiple=ctx.data_devices if one_process else 1,
            max_new_tokens=self.max_new, multiple=c.eval_pad_to_multiple, context=run.model.config.n_positions,
            overlong=c.overlong, put=run.put if one_process else (lambda b: b.arrays()),
            get=sharding.gather, progress=self.progress)
        summary = summarize(preds, len(run.val_examples))
        out.update({f"eval/{k}": summary[k] for k in ("acc", "cot_em", "new_tokens", "thoughts")})
        if summary["skipped"]:
            out["eval/skipped"] = summary["skipped"]
        if ctx.main:
            if ctx.writes:
                files.write_atomic(os.path.join(run.run_dir, f"predictions_epoch{run.at.epoch + 1}.jsonl"),
                                   "".join(json.dumps(p.to_json()) + "\n" for p in preds))
            for p in preds[:c.print_examples]:
                print(f"--- record {p.index} ({'correct' if p.correct else 'wrong'})\n{p.text}")
            print(f"epoch {run.at.epoch + 1} stage {stage}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in out.items() if k.startswith("eval/")), flush=True)
        ctx.sink.log(out)
        return out


def eval_rows_for(c) -> int:
    """Rows per generation batch for this run (`eval_batch_size`, or chosen by the device)."""
    return config_lib.eval_rows(c.eval_batch_size, jax.default_backend())


def max_new_tokens_for(c) -> int:
    """`max_new_tokens`, or the method's own default, or the reference's: 64 for GSM8K (by the
    file's name), else 128."""
    return (c.max_new_tokens or config_lib.method_of(c).max_new_tokens()
            or (64 if "gsm" in os.path.basename(c.val_path) else 128))


def generation_settings(c) -> dict:
    """The settings this run's evaluation generates with (`max_new_tokens` resolved): what every
    checkpoint records, so that `coconut_jax.generate` answers as the run evaluated."""
    return {"max_new_tokens": max_new_tokens_for(c), "eval_batch_size": c.eval_batch_size,
            "eval_pad_to_multiple": c.eval_pad_to_multiple, "overlong": c.overlong}
