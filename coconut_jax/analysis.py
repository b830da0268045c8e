"""What the continuous thoughts encode (the Coconut paper, section 5).

    python -m coconut_jax.analysis --config configs/demo.py [--question 0] [--top_k 5] [--max_k N]
    python -m coconut_jax.analysis --config configs/gsm_simcot.py --decode-steps [--question 0]

The model is the run's (as `coconut_jax.generate` and `coconut_jax.export` read it: its best
step by accuracy within the last stage it reached; `--step N` or `--best_any_stage` otherwise).
For a trained model and a question:
  * `thoughts`: the continuous thoughts fed back at each latent position;
  * `decode_thoughts`: each thought read through the LM head (top tokens, probabilities);
  * `concept_mass`: for ProsQA, the probability each thought puts on each concept of the
    question's graph (the first token of the concept's name, as it follows "is a"), the
    paper's implicit value of frontier nodes, with `frontier_nodes` giving each node's
    distance from the person asked about;
  * `accuracy_by_thoughts`: validation accuracy when inference uses k = 0..max thoughts;
  * `decode_steps` (`--decode-steps`, methods with a step decoder: SIM-CoT): the trained
    decoder's greedy text for each group of `c_thought` thoughts, beside the step it replaced.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import sys
import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax import answers, config as config_lib, data, evaluate, files, methods
from coconut_jax.data.step_targets import StepPlan
from coconut_jax.plot import pyplot, save_figure


def thought_distributions(model, params, states: np.ndarray) -> np.ndarray:
    """Next-token distributions [n, V] the LM head gives each thought (float64, rows sum to 1)."""
    logits = model.logits(params, jnp.asarray(states, model.dtype))
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), np.float64)


def decode_thoughts(model, params, states: np.ndarray, tokenizer, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (token text, probability) of each thought through the LM head."""
    out = []
    for row in thought_distributions(model, params, states):
        top = np.argsort(-row, kind="stable")[:top_k]
        out.append([(tokenizer.decode([int(t)]), float(row[t])) for t in top])
    return out


def decode_steps(model, params, decoder, decoder_params, states: np.ndarray, c: int, eos: int,
                 max_tokens: int = 40) -> list[list[int]]:
    """The step decoder's greedy tokens (eos excluded) from each group of `c` thoughts, as in
    Coconut's training (position ids from 1; `step_decoder.decode`)."""
    from coconut_jax.methods import step_decoder
    groups = np.asarray(states)[:len(states) // c * c].reshape(-1, c, states.shape[-1])
    return step_decoder.decode(model, params, decoder, decoder_params, groups, eos, 1, max_tokens)


def replaced_steps(run, ex, stage: int) -> list[list[int]]:
    """The step targets (eos excluded) of a validation example at `stage`, as training builds them."""
    cur, targets = run.cur, run.plan_settings.step_targets
    seqs = data.Sequences.at(data.TokenizedSet.from_examples([ex]), np.array([stage]), cur, run.tokens)
    plan = StepPlan(targets, seqs, np.array([0]), lambda n: n, False)
    return [g[:-1] for g in plan.groups[0]]


def frontier_nodes(record: dict) -> dict[int, int]:
    """Distance (in edges) of each node reachable from the person asked about (`root`)."""
    from data_prep.prosqa_generator import distances, record_children
    return distances(record_children(record), record["root"])


@dataclasses.dataclass
class ConceptMass:
    concepts: list[str]          # the graph's symbols (record["idx_to_symbol"])
    mass: np.ndarray             # [n_thoughts, n_concepts]: probability of each concept's first token
    normalised: np.ndarray       # mass renormalised over the graph's concepts (rows sum to 1)
    shared_first_token: list[bool]  # concepts whose first token another concept of the graph shares


def concept_mass(model, params, states: np.ndarray, record: dict, tokenizer) -> ConceptMass:
    """Probability each thought puts on each concept of a ProsQA graph.

    A concept's value is the LM-head probability of the first token of " name" (how it
    follows "is a"). Concepts sharing a first token split its probability equally, so the
    masses of all concepts never sum to more than 1.
    """
    names = list(record["idx_to_symbol"])
    first = [tokenizer.encode(" " + n, add_special_tokens=False)[0] for n in names]
    share = collections.Counter(first)
    probs = thought_distributions(model, params, states)
    mass = np.stack([probs[:, t] / share[t] for t in first], axis=1)
    total = mass.sum(axis=1, keepdims=True)
    normalised = np.divide(mass, total, out=np.full_like(mass, 1.0 / max(len(names), 1)), where=total > 0)
    return ConceptMass(names, mass, normalised, [share[t] > 1 for t in first])


def accuracy_by_thoughts(model, params, examples, records, cur: methods.Curriculum, tokens, tokenizer, *,
                         max_k: int, batch_size: int, max_new_tokens: int, multiple: int = 32, parts=None,
                         **kw) -> dict[int, float]:
    """Accuracy when inference uses k x thoughts_per_step thoughts, k = 0..max_k (Coconut: the
    thoughts of k latent stages, question + <start> + k*c_thought latents + <end>), with the
    model unchanged (`Method.with_thoughts` makes the prompts, `Method.predict` answers them;
    `parts`: {name: (module, params)} generation needs)."""
    spec, out = cur.spec, {}
    for k in range(max_k + 1):
        at, stage = spec.with_thoughts(cur, k * cur.thoughts_per_step)
        preds = spec.predict(model, params, parts or {}, examples, records, stage, at, tokens, tokenizer,
                             batch_size=batch_size, max_new_tokens=max_new_tokens, multiple=multiple, **kw)
        out[k] = evaluate.summarize(preds)["acc"]
    return out


def plot_concept_mass(cm: ConceptMass, distance: dict[int, int], path: str) -> str:
    """Heat map of thought x concept mass, concepts ordered by distance from the person."""
    order = sorted(range(len(cm.concepts)), key=lambda i: (distance.get(i, 99), i))
    fig, ax = pyplot().subplots(figsize=(max(6, 0.35 * len(order)), 1.2 + 0.5 * cm.mass.shape[0]))
    ax.imshow(cm.normalised[:, order], aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{cm.concepts[i]} ({distance[i]})" if i in distance else cm.concepts[i] for i in order],
                       rotation=90, fontsize=7)
    ax.set_yticks(range(cm.mass.shape[0]))
    ax.set_yticklabels([f"thought {k + 1}" for k in range(cm.mass.shape[0])])
    ax.set_title("probability mass per concept (distance from the person in brackets)")
    return save_figure(fig, path, dpi=120)


def plot_accuracy_by_thoughts(acc: dict[int, float], path: str, thoughts_per_step: int = 1) -> str:
    """`acc` by k latent stages, drawn against the k * thoughts_per_step thoughts they use."""
    fig, ax = pyplot().subplots(figsize=(4.5, 3))
    ks = sorted(acc)
    ax.plot([k * thoughts_per_step for k in ks], [acc[k] for k in ks], marker="o")
    ax.set_xlabel("continuous thoughts at inference")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


# -- command line ----------------------------------------------------------------------------

def load_trained(c, step: int | None = None, best_any_stage: bool = False):
    """The run of `c` built on the model of the run (`trained.model_step`; or `step`, or its
    best step of any stage), else on `load_model_path` (the weights it started from), for
    inspection (nothing claimed or written)."""
    from coconut_jax import checkpoint, trained
    from coconut_jax.train import set_up
    c.only_eval = True
    c.wandb_mode = "disabled"
    config_lib.normalize(c)
    ckpt_dir = os.path.join(c.save_path, c.name, "checkpoints")
    if files.isdir(ckpt_dir) and checkpoint.steps(ckpt_dir):
        # The run's own weights win, as they do when it runs (a config's hand-off path is where it began).
        try:
            source = trained.pick_step(ckpt_dir, c, step, best_any_stage)
        except trained.TrainedError as e:
            raise config_lib.ConfigError(str(e)) from None
        print(f"model: {source.describe()}", flush=True)
        c.load_model_path = os.path.join(source.path, str(source.step))
    elif c.load_model_path is None:
        raise config_lib.ConfigError(f"{ckpt_dir}: no checkpoint to analyse; train the run first")
    return set_up(c, writes=False)


def report_steps(run, question: int, max_k: int | None) -> list[dict]:
    """Prints, for each group of thoughts of a validation question at stage `max_k`, what the
    step decoder writes from it beside the step those thoughts replaced."""
    from coconut_jax.config import ConfigError
    decoder = dict(run.state.part_models).get("decoder")
    if decoder is None or run.cur.spec.step_decoding is None:
        raise ConfigError(f"--decode-steps: method={run.c.method!r} has no step decoder (method=simcot has one)")
    spec, ex = run.cur.spec, run.val_examples[question]
    own = spec.written_steps(run.model, run.params, {**run.inference_parts(), "decoder": (decoder,
                             run.state.parts["decoder"])}, ex, run.tokens)
    if own is not None:  # the method pairs its thoughts with its steps itself
        print(f"question {question}: steps written by the decoder from each thought")
        rows = []
        for t, (got, want) in enumerate(own):
            rows.append({"group": t + 1, "decoded": run.tok.decode(got), "replaced": run.tok.decode(want)})
            print(f"thought {t + 1}: {rows[-1]['decoded']!r}   replaced: {rows[-1]['replaced']!r}")
        return rows
    cur, tokens, tok = run.cur, run.tokens, run.tok
    stage = cur.max_latent_stage + 1 if max_k is None else max_k
    prompt = data.eval_prompt(ex, stage, cur, tokens)
    states = answers.thoughts(run.model, run.params, prompt, tokens)
    c = cur.thoughts_per_step
    written = decode_steps(run.model, run.params, decoder, run.state.parts["decoder"], states, c, tokens.eos)
    rows = []
    print(f"question {question}: steps written by the decoder from each group of {c} thoughts (stage {stage})")
    for t, (got, want) in enumerate(zip(written, replaced_steps(run, ex, stage))):
        rows.append({"group": t + 1, "decoded": tok.decode(got), "replaced": tok.decode(want)})
        print(f"thoughts {c * t + 1}-{c * t + c}: {rows[-1]['decoded']!r}   replaced: {rows[-1]['replaced']!r}")
    return rows


def report(run, question: int, top_k: int, max_k: int | None, out_dir: str) -> dict:
    """Prints the analysis of one validation question and accuracy by k; writes two PNGs."""
    cur, tokens, tok, spec = run.cur, run.tokens, run.tok, run.cur.spec
    per = cur.thoughts_per_step
    # k counts latent stages (Coconut), each `per` thoughts; by default as many as the run's last stage has.
    max_k = spec.eval_thoughts(cur, cur.max_latent_stage)[0] // max(per, 1) if max_k is None else max_k
    parts = run.inference_parts()
    ex, record = run.val_examples[question], run.val_records[question]
    at, stage = spec.with_thoughts(cur, max_k * per)
    states = spec.thought_states(run.model, run.params, parts, ex, stage, at, tokens)
    files.makedirs(out_dir)
    print(f"question {question}: {record['question'][-120:]}")
    print(f"gold steps: {' '.join(record['steps'])}  answer: {record['answer']}")
    for k, top in enumerate(decode_thoughts(run.model, run.params, states, tok, top_k)):
        print(f"thought {k + 1}: " + "  ".join(f"{t!r} {p:.3f}" for t, p in top))
    result = {"question": question}
    if "idx_to_symbol" in record and len(states):
        cm = concept_mass(run.model, run.params, states, record, tok)
        dist = frontier_nodes(record)
        for k in range(len(states)):
            best = np.argsort(-cm.normalised[k])[:3]
            print(f"thought {k + 1} concept mass {cm.mass[k].sum():.3f}: " + ", ".join(
                f"{cm.concepts[i]} (dist {dist.get(i, '-')}) {cm.normalised[k, i]:.2f}" for i in best))
        result["concept_plot"] = plot_concept_mass(cm, dist, os.path.join(out_dir, f"concepts_q{question}.png"))
    acc = accuracy_by_thoughts(run.model, run.params, run.val_examples, run.val_records, cur, tokens,
                               tok, max_k=max_k, batch_size=evaluate.eval_rows_for(run.c),
                               max_new_tokens=evaluate.max_new_tokens_for(run.c),
                               multiple=run.c.eval_pad_to_multiple, parts=parts)
    print("accuracy by thoughts at inference: " + ", ".join(f"{k * per} (k={k}): {a:.3f}" for k, a in acc.items()))
    result["accuracy_by_k"] = acc
    result["accuracy_plot"] = plot_accuracy_by_thoughts(acc, os.path.join(out_dir, "accuracy_by_k.png"), per)
    return result


def cli():
    from absl import app, flags
    from ml_collections import config_flags
    from coconut_jax import rundir
    config_flags.DEFINE_config_file("config", None, "the run's configuration file", lock_config=True)
    flags.DEFINE_integer("question", 0, "validation question to analyse (position in the validation file)")
    flags.DEFINE_integer("top_k", 5, "tokens shown per thought")
    flags.DEFINE_integer("max_k", None, "largest number of latent stages at inference (default max_latent_stage)")
    flags.DEFINE_boolean("decode_steps", False, "only the step decoder's text for each group of thoughts (SIM-CoT)")
    flags.DEFINE_alias("decode-steps", "decode_steps")
    flags.DEFINE_integer("step", None, "the run's checkpoint step (default: the best by accuracy in the last stage reached)")
    flags.DEFINE_boolean("best_any_stage", False, "the run's best step by accuracy over every stage (best.json)")
    flags.DEFINE_alias("best-any-stage", "best_any_stage")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        from coconut_jax.train import quiet_libraries
        quiet_libraries()
        f = flags.FLAGS
        try:
            run = load_trained(f.config, f.step, f.best_any_stage)
            if f.decode_steps:
                report_steps(run, f.question, f.max_k)
            else:
                report(run, f.question, f.top_k, f.max_k, os.path.join(run.run_dir, "analysis"))
        except (config_lib.ConfigError, rundir.RunDirError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(main, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    cli()
