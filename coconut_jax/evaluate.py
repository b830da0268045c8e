"""A run's evaluation at a stage (`Evaluator`): the teacher-forced validation loss, greedy
answers to every validation question (the method's `predict`; Coconut's: coconut_jax.answers),
the predictions file and the metrics event."""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from coconut_jax import config as config_lib, data, files, sharding, steps
from coconut_jax.answers import Prediction


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
        preds = run.cur.spec.predict(
            run.model, run.params, run.inference_parts(), run.val_examples, run.val_records, stage, run.cur, run.tokens, run.tok,
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
