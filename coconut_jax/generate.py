"""Ask a trained model: a question, or every record of a Coconut JSON file.

    python -m coconut_jax.generate RUN_DIR_OR_HF_DIR --question "..." [--thoughts K] [--show-thoughts]
    python -m coconut_jax.generate RUN_DIR_OR_HF_DIR --input FILE.json [--thoughts K]

The model is read as `coconut_jax.export` reads it (the model of the run: its best step by
accuracy within the last stage it reached; `--best-any-stage` for the best of any stage,
`--step N` for one step; or a directory it exported). The prompt is the method's at the stage
that step was trained at: the question, then `<|start-latent|>`, the thoughts and
`<|end-latent|>` for methods with latent tokens (a question without written steps gets the
thoughts of one with steps enough; `--thoughts K` sets their number). Generation is the run's
evaluation, with its settings (`max_new_tokens`, batch rows, prompt buckets; flags override
them), so an answer to a validation question equals that question's line in the run's
predictions file. Output: one JSON line per question, with a predictions-file line's fields
(`thoughts` is their number); `--show-thoughts` adds `thought_tokens`, each continuous thought's
top tokens with their probabilities (as `coconut_jax.analysis` reads them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from coconut_jax import checkpoint, config as config_lib, data, models, rundir, trained, methods


def curriculum_for(settings: dict, thoughts: int | None) -> tuple[methods.Curriculum, int, bool]:
    """(curriculum, stage, whether the thought count is fixed) of the prompts: the run's at
    its step's stage, or exactly `thoughts` thoughts (`Method.with_thoughts`)."""
    cur = trained.curriculum(settings)
    if thoughts is None:
        return cur, settings["stage"], False
    try:
        return (*cur.spec.with_thoughts(cur, thoughts), True)
    except ValueError as e:
        raise trained.TrainedError(f"--thoughts: {e}") from None


def questions(args, tok, cur: methods.Curriculum, stage: int, fixed: bool):
    """(the records asked, their examples, and the curriculum and stage of their prompts)."""
    spec = cur.spec
    if args.question is not None:
        record = {"question": args.question, "steps": [], "answer": ""}
        if spec.format_key:  # the method's own text format
            return [record], spec.tokenize([record], tok, "--question"), cur, stage
        if not fixed and cur.markers:
            # No written steps to count: as many thoughts as a question with steps enough gets.
            cur, stage = spec.with_thoughts(cur, cur.eval_latents(cur.max_latent_stage, stage))
        return [record], [data.question_example(args.question, tok)], cur, stage
    records = data.load_records(args.input)
    return records, spec.tokenize(records, tok, args.input), cur, stage


def thought_tokens(model, params, states, tok, top_k: int) -> list[list[tuple[str, float]]]:
    from coconut_jax import analysis
    return analysis.decode_thoughts(model, params, states, tok, top_k) if len(states) else []


def ask(t: trained.Trained, records: list[dict], examples, cur: methods.Curriculum, stage: int, *,
        max_new_tokens: int | None = None, batch_size: int | None = None, show_thoughts: int = 0) -> list[dict]:
    """One dict per record: a predictions-file line (and its thoughts' top tokens), generated
    with the run's evaluation settings (`t.settings`) unless `max_new_tokens` or `batch_size`
    say otherwise."""
    g = t.settings
    max_new_tokens = g["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    batch_size = batch_size or config_lib.eval_rows(g["eval_batch_size"], jax.default_backend())
    spec = cur.spec
    tokens = spec.special_tokens(t.tok, g.get("pretrained_vocab", t.config.vocab_size))
    model = models.build(t.config)
    parts = t.part_args()
    context = model.config.n_positions
    coconut_prompts = not spec.format_key
    for r, ex in enumerate(examples if coconut_prompts and g["overlong"] == "error" else ()):  # "skip": left out
        n = len(data.eval_prompt(ex, stage, cur, tokens))
        if n + max_new_tokens - 1 > context:
            raise trained.TrainedError(f"question {r}: its prompt of {n} tokens and --max-new-tokens={max_new_tokens} "
                                       f"do not fit the model's context of {context} tokens")
    preds = spec.predict(model, t.params, parts, examples, records, stage, cur, tokens, t.tok,
                         batch_size=batch_size, max_new_tokens=max_new_tokens, multiple=g["eval_pad_to_multiple"],
                         context=context, overlong=g["overlong"])
    out = [p.to_json() for p in preds]
    if show_thoughts and cur.feedback:
        by_index = {i: ex for i, ex in enumerate(examples)}
        for line in out:
            states = spec.thought_states(model, t.params, parts, by_index[line["index"]], stage, cur, tokens)
            line["thought_tokens"] = [[[s, round(float(p), 4)] for s, p in top]
                                      for top in thought_tokens(model, t.params, states, t.tok, show_thoughts)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coconut_jax.generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a run directory (save_path/name) or a directory coconut_jax.export wrote")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--question", help="one question")
    src.add_argument("--input", help="a Coconut JSON file (question, steps, answer per record)")
    p.add_argument("--step", type=int, default=None,
                   help="a run's checkpoint step (default: the best by accuracy in the last stage reached)")
    p.add_argument("--best-any-stage", dest="best_any_stage", action="store_true",
                   help="the run's best step by accuracy over every stage (best.json), as a hand-off takes it")
    p.add_argument("--thoughts", type=int, default=None, help="continuous thoughts per prompt (default: the stage's)")
    p.add_argument("--show-thoughts", dest="show_thoughts", action="store_true",
                   help="each thought's top tokens (continuous-thought methods)")
    p.add_argument("--top-k", dest="top_k", type=int, default=5, help="tokens shown per thought")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None,
                   help="default: the run's (its evaluation's max_new_tokens); 64 for a plain HF directory")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="rows per generation batch (default: the run's eval_batch_size)")
    a = p.parse_args(argv)
    try:
        if a.thoughts is not None and a.thoughts < 0:
            raise trained.TrainedError(f"--thoughts={a.thoughts} must be >= 0")
        t = trained.open_trained(a.model, a.step, a.best_any_stage)
        cur, stage, fixed = curriculum_for(t.settings, a.thoughts)
        records, examples, cur, stage = questions(a, t.tok, cur, stage, fixed)
        shown = f"{a.thoughts} thoughts" if fixed else f"the prompts of {trained.describe_stage(t.settings)}"
        print(f"model: {t.where}; method {cur.method}, {shown}", file=sys.stderr, flush=True)
        lines = ask(t, records, examples, cur, stage, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                    show_thoughts=a.top_k if a.show_thoughts else 0)
    except (trained.TrainedError, rundir.RunDirError, checkpoint.CheckpointFault, data.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        for line in lines:
            print(json.dumps(line), flush=True)
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
