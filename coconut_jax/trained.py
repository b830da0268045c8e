"""A trained model read back for use outside training (`coconut_jax.export`,
`coconut_jax.generate`, `coconut_jax.analysis`): from a run directory (`save_path/name`) at
*the model of the run* (`model_step`), or a step named, or from a Hugging Face directory
`coconut_jax.export` wrote.

The model of a run is what it ends with: the best step by validation accuracy among the steps
trained at the last stage the run reached (the latest step when none recorded an accuracy). A
Coconut run asked a question answers with its final stage's thoughts, not with an earlier
stage that scored higher but still writes part of its chain. `best_any_stage` takes the best
step of the whole run instead: the rule of hand-offs (`load_model_path`), where a CoT run's best
checkpoint starts the Coconut run, as in the paper.

What a prompt and its generation need besides the weights (method, thoughts per step, the stage
the step was trained at, the run's evaluation settings) comes from the run's `run.json` and the
step's metadata; an export writes it to `coconut_jax.json` beside the model, so a question asked
of the export is asked, and answered, as the run's evaluation would.
"""
from __future__ import annotations

import dataclasses
import json
import os

from coconut_jax import checkpoint, config as config_lib, evaluate, files, hf, methods, rundir, weights
from coconut_jax.models import lora as lora_lib

SETTINGS_FILE = "coconut_jax.json"
# The run settings a prompt depends on (with the stage; beside them, those its evaluation
# generated with: `evaluate.generation_settings`).
PROMPT_FIELDS = ("method", "c_thought", "max_latent_stage", "epochs_per_stage", "pad_latent_to_max")
# What a Hugging Face directory without SETTINGS_FILE is asked with: a plain language model.
# (its generation: the config's defaults, and 64 new tokens.)
PLAIN_SETTINGS = {"method": "cot", "c_thought": 1, "max_latent_stage": 0, "epochs_per_stage": 1,
                  "pad_latent_to_max": False, "stage": 0,
                  **evaluate.generation_settings(config_lib.base_config()), "max_new_tokens": 64}


class TrainedError(ValueError):
    """A directory that holds no trained model of ours, or a step that is not there."""


@dataclasses.dataclass
class Trained:
    where: str               # what was read, for messages ("<run>/checkpoints/12 (best by accuracy, ...)")
    config: object           # the model family's config
    params: dict             # host f32 params of the plain model (LoRA merged)
    tok: object
    settings: dict           # PROMPT_FIELDS, "stage" and the generation settings
    model_id: str            # the run's model_id (what a PEFT export's base is)
    lora_model: object = None  # a LoRA run's model (None otherwise) ...
    lora_params: dict | None = None  # ... and its params with the adapters unmerged
    base: dict | None = None  # a LoRA run's base record (weights.base_record)
    parts: dict = dataclasses.field(default_factory=dict)  # {name: host params} of the parts generation needs

    @property
    def method(self):
        """The method record, with the run's own settings."""
        return curriculum(self.settings).spec

    def part_args(self) -> dict:
        """{name: (module, params)} of the parts generation needs, as `Method.predict` takes them."""
        spec = self.method
        return {p.name: (spec.part_module(p, self.config), self.parts[p.name]) for p in spec.parts if p.inference}


def run_config(run_dir: str):
    """The config a run directory's `run.json` records (other fields at their defaults)."""
    path = os.path.join(run_dir, rundir.RUN_FILE)
    if not files.isfile(path):
        raise TrainedError(f"{run_dir}: not a run directory of coconut_jax (no {rundir.RUN_FILE})")
    try:
        ident = json.loads(files.read_text(path))
    except json.JSONDecodeError as e:
        raise TrainedError(f"{path}: unreadable run record ({e})") from None
    c = config_lib.base_config()
    for k, v in ident.items():
        if k in c and hasattr(c[k], "update"):  # prepare, lora, a method's own settings block
            c[k].update(v)
        elif k in c and k != "only_eval":
            c[k] = tuple(v) if isinstance(v, list) else v
    c.save_path, c.name = os.path.split(files.abspath(run_dir).rstrip("/"))
    if c.prepare.kind:
        from coconut_jax.demo import prepare
        c.model_id = prepare.prepared_paths(prepare.prepared_root(c))[2]
    return c


def trained_stage(c, meta: dict) -> int:
    """The stage the step's weights were last trained (and evaluated) at: an end-of-epoch step
    holds the epoch before `epoch`, a mid-epoch one the epoch `epoch`."""
    epoch = meta["epoch"] - 1 if meta["batch_in_epoch"] == 0 and meta["epoch"] > 0 else meta["epoch"]
    return methods.get(c.method).stage(epoch, c.epochs_per_stage)


def curriculum(settings: dict):
    """The curriculum of a step's prompt settings (PROMPT_FIELDS, and the method's own block)."""
    return methods.Curriculum.from_config(settings)


def describe_stage(settings: dict) -> str:
    """"stage 5 (6 thoughts)": the step's stage and the thoughts its prompts carry."""
    stage, cur = settings["stage"], curriculum(settings)
    k, exact = cur.spec.eval_thoughts(cur, stage)
    if not k:
        return f"stage {stage} (no thoughts)"
    return f"stage {stage} ({'' if exact else 'up to '}{k} thought{'s' if k != 1 else ''})"


def prompt_settings(c) -> dict:
    """What a run's prompts depend on (PROMPT_FIELDS, the method's own settings block, the
    pretrained vocabulary its added ids follow)."""
    from coconut_jax import hf
    out = {f: c[f] for f in PROMPT_FIELDS} | {b: c[b].to_dict() for b in methods.get(c.method).blocks()}
    return out | {"pretrained_vocab": hf.load_config(hf.resolve_model_dir(c.model_id, weights=False)).vocab_size}


def model_step(ckpt_dir: str, c, best_any_stage: bool = False) -> weights.Source:
    """The model of a run (this module's docstring): the best step by accuracy within the last
    stage its checkpoints reached, else its latest; with `best_any_stage`, the step a hand-off
    takes (`best.json`: the best of every stage)."""
    if best_any_stage:
        return weights.source_of(ckpt_dir)
    found = []
    for step in checkpoint.steps(ckpt_dir):
        try:
            meta = checkpoint.read_meta(ckpt_dir, step)
        except (OSError, ValueError):  # a damaged step: judged (and named) only if it is picked
            continue
        found.append((trained_stage(c, meta), step, meta.get("eval_acc")))
    if not found:
        raise TrainedError(f"{ckpt_dir}: no checkpoint whose metadata reads")
    last = max(stage for stage, _, _ in found)
    scored = [(acc, -step) for stage, step, acc in found if stage == last and acc is not None]
    if scored:
        acc, step = max(scored)  # the earliest of equals, as best.json names them
        return weights.Source("ours", ckpt_dir, -step, f"best by accuracy ({acc:.4f}) in the last stage reached")
    return weights.Source("ours", ckpt_dir, max(step for _, step, _ in found), "latest; no accuracy recorded")


def pick_step(ckpt_dir: str, c, step: int | None, best_any_stage: bool = False) -> weights.Source:
    if step is not None and best_any_stage:
        raise TrainedError("--step and --best-any-stage both choose the step; give one")
    if step is None:
        return model_step(ckpt_dir, c, best_any_stage)
    have = checkpoint.steps(ckpt_dir)
    if step not in have:
        raise TrainedError(f"{ckpt_dir}: no step {step} (steps: {', '.join(map(str, have)) or 'none'})")
    return weights.Source("ours", ckpt_dir, step, "the step named")


def from_run(run_dir: str, step: int | None = None, best_any_stage: bool = False) -> Trained:
    c = run_config(run_dir)
    ckpt_dir = os.path.join(files.abspath(run_dir), "checkpoints")
    if not files.isdir(ckpt_dir):
        raise TrainedError(f"{run_dir}: no checkpoints (a run with debug=True saves none)")
    source = pick_step(ckpt_dir, c, step, best_any_stage)
    tok = hf.load_tokenizer(c.model_id)
    # Read once (a LoRA run's base is loaded and digested once), merged here when it has adapters.
    config, params, lora_model = weights.checkpoint_params(source, c.model_id, tok, merge=False)
    lora_params = None
    if lora_model is not None:
        lora_params, params = params, lora_lib.merged(lora_model, params)
    meta = checkpoint.read_meta(source.path, source.step)
    # The step records how its run's evaluation generated; a step saved before it did so gets
    # what run.json gives (the defaults of the fields it does not record).
    generation = meta.get("generation") or evaluate.generation_settings(c)
    settings = prompt_settings(c) | {"stage": trained_stage(c, meta)} | generation
    needed = [p.name for p in config_lib.method_of(c).parts if p.inference]
    parts = checkpoint.load_params(source.path, source.step, item="parts") if needed else {}
    return Trained(source.describe(), config, params, tok, settings, c.model_id, lora_model, lora_params,
                   meta.get("base"), {name: parts[name] for name in needed})


def from_hf(model_dir: str) -> Trained:
    """A Hugging Face directory; its prompt settings from `coconut_jax.json` when it has one,
    else those of a plain language model (method cot: the question alone). A bucket directory is
    read from a local copy (`files.local_copy`)."""
    shown, model_dir = model_dir, files.local_copy(model_dir)
    config, params = hf.load_pretrained(model_dir)
    tok = hf.load_tokenizer(model_dir)
    path = os.path.join(model_dir, SETTINGS_FILE)
    settings = dict(PLAIN_SETTINGS)
    if os.path.isfile(path):
        with open(path) as f:
            settings.update(json.load(f))
    t = Trained(shown, config, params, tok, settings, model_dir)
    for part in t.method.parts:
        if part.inference:
            file = os.path.join(model_dir, weights.part_file(part.name))
            if not os.path.isfile(file):
                raise TrainedError(f"{shown}: no {weights.part_file(part.name)}, which method {t.method.name!r} "
                                   f"generates with")
            t.parts[part.name] = hf.read_tree(file)
    return t


def open_trained(path: str, step: int | None = None, best_any_stage: bool = False) -> Trained:
    """A run directory or a Hugging Face directory (`TrainedError` for anything else)."""
    if files.isfile(os.path.join(path, "config.json")):
        if step is not None or best_any_stage:
            raise TrainedError(f"{path}: a Hugging Face directory has no steps (--step and --best-any-stage are "
                               f"for run directories)")
        return from_hf(path)
    if files.isfile(os.path.join(path, rundir.RUN_FILE)):
        return from_run(path, step, best_any_stage)
    if not files.isdir(path):
        raise TrainedError(f"{path}: not found")
    raise TrainedError(f"{path}: neither a run directory of coconut_jax (run.json) nor a Hugging Face "
                       f"directory (config.json)")
