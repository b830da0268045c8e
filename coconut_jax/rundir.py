"""A run's directory, and where a run's weights come from.

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
   Face directory, or a reference PyTorch file. They load first, at their own shapes; then
   the vocabulary grows and the latent rows are copied from `<<` when the method needs them.
   A Coconut checkpoint cannot start a method without latent tokens (as in the reference).
4. **A method's parts** (modules it adds beside the model, `methods.Part`) resume with the
   run; on a hand-off they come from the checkpoint of ours when it holds them, else from
   their source (`model_id`'s pretrained weights, at its own vocabulary).
5. **A LoRA run's checkpoints hold what trains**, with a record of the base (its source and a
   digest of its weights): a resume rebuilds the base from that source and refuses one whose
   digest differs; a hand-off from it, an export or a question asked of it reads the base with
   the adapters merged (`checkpoint_params`).
"""
from __future__ import annotations

import dataclasses
import json
import os

from coconut_jax import checkpoint, methods, tfds_source
from coconut_jax.files import cause, write_atomic

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
    return os.path.abspath(value) if field.endswith("_path") and local else value


def identity(c) -> dict:
    """What defines the run configured by `c` (see TRAIN_FIELDS / EVAL_FIELDS)."""
    fields = EVAL_FIELDS if c.only_eval else TRAIN_FIELDS
    if any(tfds_source.is_tfds(c[f]) for f in ("train_path", "val_path")):
        fields += ("tfds_data_dir",)  # only then: the records of runs on files do not change
    if methods.get(c.method).step_targets:
        fields += ("step_groups",)  # only then: runs of other methods keep the identity they had
    if methods.get(c.method).settings:
        fields += (c.method,)  # the method's own settings block
    ident = {"only_eval": bool(c.only_eval), **{f: _plain(_path_field(c, f)) for f in fields}}
    if c.lora.rank and not c.only_eval:  # only then, likewise
        ident["lora"] = {f: _plain(c.lora[f]) for f in LORA_FIELDS}
    return ident


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def claim(run_dir: str, c, write: bool) -> None:
    """Makes `run_dir` this run's directory, or refuses if it holds another run.

    A directory with run outputs but no `run.json` (written by something else) is refused too.
    `write` is true on the one process that writes the file.
    """
    ident = identity(c)
    path = os.path.join(run_dir, RUN_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError:
                raise RunDirError(f"{path}: unreadable run record; remove it or choose a new --config.name")
        diff = differences(old, ident)
        if diff:
            raise RunDirError(f"{run_dir} holds another run ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); "
                              f"choose a new --config.name (now {c.name!r}) or remove the directory")
        return
    if os.path.isdir(run_dir) and {"metrics.jsonl", "checkpoints"} & set(os.listdir(run_dir)):
        raise RunDirError(f"{run_dir} holds run outputs without a {RUN_FILE}; choose a new --config.name "
                          f"(now {c.name!r}) or remove the directory")
    if write:
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(path, json.dumps(ident, indent=1, sort_keys=True) + "\n")


# -- where the weights come from ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """Where a run's weights come from.

    kind: "resume" (own checkpoint: weights, optimizer and loop position), "ours" (weights of
    another run's checkpoint), "hf" (a Hugging Face directory), "reference" (a PyTorch file of
    the reference implementation) or "model" (`model_id` alone).
    """
    kind: str
    path: str = ""
    step: int | None = None
    why: str = ""  # how the step was chosen

    def describe(self) -> str:
        where = f"{self.path}/{self.step}" if self.step is not None else self.path
        return f"{where} ({self.why})" if self.why else where


def own_checkpoint(ckpt: checkpoint.Checkpoints | None, only_eval: bool, say=print) -> int | None:
    """The step a run resumes from (rule 2): the latest of its own whose metadata reads, if any
    (a damaged newer one is moved aside, with a line through `say`)."""
    if ckpt is None or only_eval:
        return None
    return ckpt.newest_readable(say)


def weight_source(load_model_path: str | None) -> Source:
    """Resolves `load_model_path` (rule 3); None means the model of `model_id`."""
    path = load_model_path
    if path is None:
        return Source("model")
    if os.path.isfile(path):
        return Source("reference", path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return Source("hf", path)
    if checkpoint.is_checkpoint_dir(path):
        ckpt_dir, step = checkpoint.split_checkpoint_path(path)
        if checkpoint.DAMAGED in os.path.basename(ckpt_dir):
            raise RunDirError(f"load_model_path={path!r}: a damaged checkpoint, moved aside; name another step")
        if step is not None:
            return Source("ours", ckpt_dir, step, "the step named")
        steps = checkpoint.steps(ckpt_dir)
        step = checkpoint.best_named(ckpt_dir)
        if step is not None:
            if step not in steps:
                # Never another step in its place: a hand-off takes the weights the user meant or none.
                raise RunDirError(f"load_model_path={path!r}: {checkpoint.BEST_FILE} names step {step}, which is "
                                  f"not there; name a step (one of {steps})")
            # The paper's hand-off: the run's best step of any stage (a CoT run's best CoT checkpoint).
            return Source("ours", ckpt_dir, step, f"best by accuracy over every stage, {checkpoint.BEST_FILE}")
        if not steps:
            raise RunDirError(f"load_model_path={path!r}: no checkpoint in this directory")
        return Source("ours", ckpt_dir, steps[-1], f"latest; no {checkpoint.BEST_FILE}")
    raise RunDirError(f"load_model_path={path!r}: not a checkpoint of ours, a Hugging Face directory or a "
                      f"PyTorch file")


def check_method(source_method: str | None, method: str, where: str) -> None:
    """The reference refuses to load Coconut weights into a model without latent tokens."""
    if methods.carries_latent_tokens(source_method) and not methods.get(method).latent_tokens:
        raise RunDirError(f"{where}: a {source_method} checkpoint (with latent tokens) cannot be loaded into "
                          f"method {method!r}")


def _flat_shapes(tree: dict, prefix: str = "") -> dict[str, tuple]:
    """{"h/0/c_fc/kernel": shape} of a nested dict of shapes or arrays."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_shapes(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = tuple(getattr(v, "shape", v))
    return out


def shape_differences(stored: dict, expected: dict) -> list[str]:
    a, b = _flat_shapes(stored), _flat_shapes(expected)
    return [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _read_meta(source: Source) -> dict:
    try:
        return checkpoint.read_meta(source.path, source.step)
    except (OSError, ValueError) as e:  # its meta file is missing or does not parse
        raise RunDirError(f"load_model_path={source.describe()}: damaged checkpoint (meta: {cause(e)})") from e


def _load_ours(source: Source, config, method: str, model_id: str, tok):
    """The params of another run's checkpoint step (a LoRA run's merged onto its base); a
    damaged one is an error naming it (a hand-off never falls back to other weights)."""
    from coconut_jax import models
    where = f"load_model_path={source.describe()}"
    meta = _read_meta(source)
    check_method(meta.get("method"), method, where)
    try:
        stored = checkpoint.param_shapes(source.path, source.step)
        if "lora" not in meta:
            expected = models.build(dataclasses.replace(config, vocab_size=stored["wte"][0])).param_shapes()
            diff = shape_differences(stored, expected)
            if diff:
                raise RunDirError(f"{where}: its weights do not fit model_id={model_id!r} "
                                  f"({len(diff)} tensor(s) differ: {'; '.join(diff[:3])})")
        return checkpoint_params(source, model_id, tok)[1]
    except checkpoint.DamagedCheckpoint as e:
        raise RunDirError(f"{where}: damaged checkpoint ({e.why})") from e


# -- LoRA: the base a run's adapters were trained on (rule 5) --------------------------------

def base_record(source: Source, model_id: str, digest: str) -> dict:
    """What a LoRA checkpoint records of its base: where it came from and its digest."""
    return {"source": dataclasses.asdict(source), "model_id": model_id, "digest": digest}


def recorded_base(source: Source) -> tuple[Source, str]:
    """(the base's source, its digest) that a LoRA checkpoint step records."""
    base = _read_meta(source).get("base")
    if base is None:
        raise RunDirError(f"{source.describe()}: a LoRA run's checkpoint without its base record")
    return Source(**base["source"]), base["digest"]


def check_base(digest: str, recorded: str, source: Source, base: Source) -> None:
    if digest != recorded:
        raise RunDirError(f"{source.describe()}: its LoRA adapters were trained on another base than "
                          f"{base.describe() or 'model_id'} gives now (digest {digest} vs {recorded}); restore "
                          f"it onto the base it was trained on")


def checkpoint_params(source: Source, model_id: str, tok, merge: bool = True) -> tuple[object, dict, object]:
    """(model config, host f32 params, LoRA model or None) of one of our checkpoint steps (of a
    run on `model_id`): a LoRA run's trained params joined to its rebuilt base (checked against
    its digest), with the adapters folded into the kernels (`merge`, a plain model: what a
    hand-off reads) or kept (the LoRA model's params: what a PEFT export writes)."""
    from coconut_jax import hf, models, trainable
    from coconut_jax.models import lora as lora_lib
    meta = _read_meta(source)
    trained = checkpoint.load_params(source.path, source.step)
    if "lora" not in meta:
        config = hf.load_config(hf.resolve_model_dir(model_id))
        return dataclasses.replace(config, vocab_size=trained["wte"].shape[0]), trained, None
    base_source, recorded = recorded_base(source)
    config, base = load_weights(base_source, meta["base"]["model_id"], meta["method"], tok)
    check_base(lora_lib.digest(base), recorded, source, base_source)
    lora = lora_lib.Lora.from_record(meta["lora"])
    model = models.build(config, lora=lora)
    frozen = trainable.split(base, lora_lib.trains(lora))[1]
    params = trainable.merge(trained, frozen)
    return config, (lora_lib.merged(model, params) if merge else params), model


def load_weights(source: Source, model_id: str, method: str, tok):
    """(model config, host params) a run starts from, at the shapes the method needs (rule 3).

    For `resume` only the shapes matter (the run's own checkpoint is restored onto them): the
    params returned are None."""
    from coconut_jax import hf
    config = hf.load_config(hf.resolve_model_dir(model_id))
    pretrained_vocab = config.vocab_size
    if source.kind == "resume":
        config = dataclasses.replace(config, vocab_size=checkpoint.param_shapes(source.path, source.step)["wte"][0])
        return config, None
    if source.kind == "model":
        config, params = hf.load_pretrained(model_id)
    elif source.kind == "hf":
        config, params = hf.load_pretrained(source.path)
    elif source.kind == "reference":
        params, source_method = hf.import_reference_checkpoint(source.path, config)
        check_method(source_method, method, f"load_model_path={source.path}")
    else:
        params = _load_ours(source, config, method, model_id, tok)
    config = dataclasses.replace(config, vocab_size=params["wte"].shape[0])
    return methods.get(method).add_rows(config, params, tok, pretrained_vocab)


def load_part_weights(source: Source, method: str, model_id: str) -> dict:
    """{name: (model config, host params or None)} of the method's parts (rule 4); params are
    None for a resume, which restores them from the run's own checkpoint."""
    from coconut_jax import hf
    parts = methods.get(method).parts
    if not parts:
        return {}
    stored = {}
    if source.kind == "ours" and "parts" in checkpoint.stored_items(source.path, source.step):
        try:
            stored = checkpoint.load_params(source.path, source.step, item="parts")
        except checkpoint.DamagedCheckpoint as e:
            raise RunDirError(f"load_model_path={source.describe()}: damaged checkpoint ({e.why})") from e
    out = {}
    for part in parts:
        if part.source not in ("pretrained", "fresh"):
            raise ValueError(f"method {method!r}: part {part.name!r} has unknown source {part.source!r}")
        if part.source == "fresh":  # built by the method (run.build_run): its params, if stored
            out[part.name] = (None, stored.get(part.name))
        elif source.kind == "resume":
            out[part.name] = (hf.load_config(hf.resolve_model_dir(model_id)), None)
        elif part.name in stored:
            config = hf.load_config(hf.resolve_model_dir(model_id))
            out[part.name] = (dataclasses.replace(config, vocab_size=stored[part.name]["wte"].shape[0]),
                              stored[part.name])
        else:
            out[part.name] = hf.load_pretrained(model_id)
    return out
