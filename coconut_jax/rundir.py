"""A run's directory (rule 1), and the rules of where a run's weights come from (2-5), which
coconut_jax/weights.py implements, one entry per format.

The rules, in the order they apply (SPEC §7 and the reference's `run.py`):

1. **One run per directory.** `{save_path}/{name}/run.json` records what defines the run
   (method, model, data, curriculum, seed, batch). A run that finds a different one there
   stops with one line naming `--config.name`; it never appends to or resumes another run.
2. **Its own checkpoints always win.** A run that finds checkpoints of itself resumes from the
   latest, whatever `load_model_path` and `resume` say (a preempted chain restarts with the
   same command). A run with none starts over: what an interrupted start logged is dropped.
3. **Otherwise weights come from `load_model_path`**: a checkpoint of ours (a `checkpoints`
   directory, meaning the step `best.json` names, the best of every stage as the paper's
   hand-off takes it, else the latest; or one step), a Hugging
   Face directory, or a state dict a reference implementation saved. They load first, at their own shapes; then
   the vocabulary grows by the rows the method's tokens need (`Method.add_rows`).
   A Coconut checkpoint cannot start a method without latent tokens (as in the reference),
   unless that method adds three rows of its own, which then take the latent rows' places.
4. **A method's parts** (modules it adds beside the model, `methods.Part`) resume with the
   run; on a hand-off they come from the source when it holds them (a checkpoint of ours, an
   export, a reference state dict the method reads), else from their source (`model_id`'s
   pretrained weights, at its own vocabulary, or the method's fresh module).
5. **A LoRA run's checkpoints hold what trains**, with a record of the base (its source and a
   digest of its weights): a resume rebuilds the base from that source and refuses one whose
   digest differs; a hand-off from it, an export or a question asked of it reads the base with
   the adapters merged (`weights.checkpoint_params`).
"""
from __future__ import annotations

import json
import os

from coconut_jax import files, hosts, methods, tfds_source

RUN_FILE = "run.json"
# What makes two training runs the same run; anything else (lr, epochs, logging) may change on
# a restart. `load_model_path` and `resume` are left out on purpose: rule 2 ignores them.
TRAIN_FIELDS = ("method", "model_id", "train_path", "val_path", "c_thought", "max_latent_stage",
                "epochs_per_stage", "pad_latent_to_max", "uniform_prob", "seed", "global_batch_size", "prepare")
LORA_FIELDS = ("rank", "alpha", "dropout", "targets", "train_embeddings")
# An evaluation is defined by what it evaluates, on what, at which stage.
EVAL_FIELDS = ("method", "model_id", "val_path", "c_thought", "max_latent_stage", "pad_latent_to_max",
               "load_model_path", "resume", "prepare")


class RunDirError(ValueError):
    """A run directory that holds another run, or a weight source that cannot start this run."""


def _plain(value):
    """Config values as JSON would give them back (tuples -> lists, ConfigDicts -> dicts)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value))


def _path_field(c, field):
    value = c[field]
    local = isinstance(value, str) and value != "" and not tfds_source.is_tfds(value)
    return files.abspath(value) if field.endswith("_path") and local else value


def identity(c) -> dict:
    """What defines the run configured by `c` (see TRAIN_FIELDS / EVAL_FIELDS)."""
    fields = EVAL_FIELDS if c.only_eval else TRAIN_FIELDS
    if any(tfds_source.is_tfds(c[f]) for f in ("train_path", "val_path")):
        fields += ("tfds_data_dir",)  # only then: the records of runs on files do not change
    if methods.get(c.method).step_targets:
        fields += ("step_groups",)  # only then: runs of other methods keep the identity they had
    fields += methods.get(c.method).blocks()  # the method's own settings blocks
    ident = {"only_eval": bool(c.only_eval), **{f: _plain(_path_field(c, f)) for f in fields}}
    if c.lora.rank and not c.only_eval:  # only then, likewise
        ident["lora"] = {f: _plain(c.lora[f]) for f in LORA_FIELDS}
    return ident


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def claim(run_dir: str, c, write: bool) -> None:
    """Makes `run_dir` this run's directory, or refuses if it holds another run.

    A directory with run outputs but no `run.json` (written by something else) is refused too.
    `write` is true on the one process that writes the file. Every process returns once it is
    written; nothing else is written into the directory before every process has looked, so all
    processes reach the same verdict.
    """
    ident = identity(c)
    path = os.path.join(run_dir, RUN_FILE)
    if not _holds_this_run(run_dir, path, ident, c.name) and write:
        files.makedirs(run_dir)
        files.write_atomic(path, json.dumps(ident, indent=1, sort_keys=True) + "\n")
    hosts.barrier("run_claimed")


def _holds_this_run(run_dir: str, path: str, ident: dict, name: str) -> bool:
    """True if `path` records this run, False if the directory holds no run; else RunDirError."""
    if files.isfile(path):
        try:
            old = json.loads(files.read_text(path))
        except json.JSONDecodeError:
            raise RunDirError(f"{path}: unreadable run record; remove it or choose a new --config.name")
        diff = differences(old, ident)
        if diff:
            raise RunDirError(f"{run_dir} holds another run ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); "
                              f"choose a new --config.name (now {name!r}) or remove the directory")
        return True
    if files.isdir(run_dir) and {"metrics.jsonl", "checkpoints"} & set(files.listdir(run_dir)):
        raise RunDirError(f"{run_dir} holds run outputs without a {RUN_FILE}; choose a new --config.name "
                          f"(now {name!r}) or remove the directory")
    return False
