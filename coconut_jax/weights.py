"""Where a run's weights come from: one entry per format, and the rules that pick one (the
rules 2-5 of coconut_jax/rundir.py).

    source = weights.source_of(c.load_model_path)        # or Source("resume", ...): rule 2
    w = weights.start(c, source, tok)                       # config, params, parts, LoRA base record

Formats (`FORMATS`, each a function of the source giving `Weights`, before the method's rows):
  model      `model_id`'s pretrained weights.
  hf         a Hugging Face directory; an export of ours holds the parts generation needs beside
             the model (`part_<name>.safetensors`).
  reference  a state dict (`pytorch_model.bin` / `model.safetensors`, or the file itself) a
             reference implementation saved: the Coconut reference's (the model's own keys,
             prefixed `base_causallm.` by its Coconut runs), or a method's own layout, which the
             method reads (`Method.import_state_dict`; PEFT adapters in it are merged at the
             run's `lora.alpha`).
  ours       a step of another run's checkpoints (a LoRA run's trained params merged onto its
             rebuilt base) and the parts it holds.
  resume     the run's own checkpoint: shapes only; the checkpoint manager restores the rest.

Then the method's rows are added (`Method.add_rows`), and a LoRA run keeps a record of the base
it trains on (its source and digest), from which a resume rebuilds it.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from coconut_jax import checkpoint, hf, methods
from coconut_jax import files
from coconut_jax.files import cause
from coconut_jax.rundir import RunDirError

REFERENCE_PREFIX = "base_causallm."  # the Coconut reference's Coconut runs prefix the model's keys so
STATE_DICT_FILES = (hf.SAFETENSORS, hf.TORCH_BIN)


def part_file(name: str) -> str:
    """Where an export keeps a part generation needs, beside the model."""
    return f"part_{name}.safetensors"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a run's weights come from.

    kind: "resume" (own checkpoint: weights, optimizer and loop position), "ours" (weights of
    another run's checkpoint), "hf" (a Hugging Face directory), "reference" (a state dict of a
    reference implementation) or "model" (`model_id` alone).
    """
    kind: str
    path: str = ""
    step: int | None = None
    why: str = ""  # how the step was chosen

    def describe(self) -> str:
        where = f"{self.path}/{self.step}" if self.step is not None else self.path
        return f"{where} ({self.why})" if self.why else where


@dataclasses.dataclass(frozen=True)
class Ask:
    """What a format is asked for: the run's model_id (its config.json is the family), the
    tokenizer, the alpha a reference's PEFT adapters merge at, the method run and its parts."""
    model_id: str
    tok: object
    lora_alpha: float = 32.0
    parts: tuple[str, ...] = ()
    method: str | None = None


@dataclasses.dataclass
class Weights:
    """What a source gives: the model's config and host params (None for a resume, restored
    later), and the params it holds of the method's parts ({name: params})."""
    config: object
    params: dict | None
    parts: dict = dataclasses.field(default_factory=dict)
    method: str | None = None  # the method the source was trained with, when it says


def own_checkpoint(ckpt: checkpoint.Checkpoints | None, only_eval: bool, say=print) -> int | None:
    """The step a run resumes from (rule 2): the latest of its own whose metadata reads, if any
    (a damaged newer one is moved aside, with a line through `say`)."""
    if ckpt is None or only_eval:
        return None
    return ckpt.newest_readable(say)


def source_of(load_model_path: str | None) -> Source:
    """Resolves `load_model_path` (rule 3); None means the model of `model_id`."""
    path = load_model_path
    if path is None:
        return Source("model")
    if files.isfile(path):
        return Source("reference", path)
    if files.isfile(os.path.join(path, "config.json")):
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
    for name in STATE_DICT_FILES:  # a reference's output directory: its state dict, no config.json
        if files.isfile(os.path.join(path, name)):
            return Source("reference", os.path.join(path, name))
    raise RunDirError(f"load_model_path={path!r}: not a checkpoint of ours, a Hugging Face directory or a "
                      f"reference state dict (a PyTorch or safetensors file)")


def check_method(source_method: str | None, method: str, where: str, rows: int | None = None,
                 planned: int | None = None) -> None:
    """The reference refuses to load Coconut weights into a model without latent tokens. A
    method whose own added rows take the latent rows' places (`planned`, its vocabulary after
    `add_rows`, equal to the checkpoint's `rows`) takes them as they are."""
    m = methods.get(method)
    if methods.carries_latent_tokens(source_method) and not m.latent_tokens and (rows is None or rows != planned):
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


def _pretrained_config(model_id: str):
    return hf.load_config(hf.resolve_model_dir(model_id, weights=False))


# -- the formats -------------------------------------------------------------------------------

def _from_model_id(source: Source, ask: Ask) -> Weights:
    return Weights(*hf.load_pretrained(ask.model_id))


def _from_hf_dir(source: Source, ask: Ask) -> Weights:
    local = files.local_copy(source.path)
    config, params = hf.load_pretrained(local)
    found = {name: os.path.join(local, part_file(name)) for name in ask.parts}
    return Weights(config, params, {name: hf.read_tree(f) for name, f in found.items() if os.path.isfile(f)})


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict saved with `torch.save` or as safetensors."""
    if not files.isfile(path):
        raise hf.CheckpointError(f"{path}: checkpoint file not found")
    path = files.local_copy(path)
    return hf.read_safetensors(path) if path.endswith(".safetensors") else hf.torch_load(path)


def import_reference_state_dict(sd: dict, config, source: str, lora_alpha: float = 32.0, method: str | None = None):
    """A reference implementation's state dict -> (params, parts, the method it names or None).

    A method that recognises its reference's layout (`Method.import_state_dict`) gives the
    model's keys and its parts; PEFT-wrapped keys (`base_model.model.*`, adapters `lora_A` /
    `lora_B`) are merged at `lora_alpha`. Otherwise the Coconut reference's: the model's own
    keys, prefixed `base_causallm.` by its Coconut runs (method "coconut"). The vocabulary size
    is the checkpoint's. `method`: the run's, asked first (a variant reads more of a layout)."""
    from coconut_jax import models, peft_format
    parts, asked = {}, [methods.get(method)] if method else []
    method = None
    for m in asked + [m for m in methods.REGISTRY.values() if m not in asked]:
        found = m.import_state_dict(sd)
        if found is not None:
            sd, parts, method = *found, m.name
            break
    else:
        if any(k.startswith(REFERENCE_PREFIX) for k in sd):
            method = "coconut"
            sd = {k[len(REFERENCE_PREFIX):]: v for k, v in sd.items() if k.startswith(REFERENCE_PREFIX)}
    if peft_format.has_adapters(sd):
        sd = peft_format.merge_state_dict(sd, lora_alpha, models.family(models.model_type(config)))
    return _at_own_vocabulary(sd, config, source), parts, method


def _at_own_vocabulary(sd: dict, config, source: str) -> dict:
    """A Hugging Face state dict's params, the vocabulary size its embedding's (a reference's
    checkpoints and parts carry the rows they were saved with)."""
    names = hf.naming(config)
    embedding = next(t.name for t in names.tensors if t.path == ("wte",))
    wte = sd.get(names.prefix + embedding, sd.get(embedding))
    if wte is None:
        raise hf.CheckpointError(f"{source}: missing tensor(s): {names.prefix + embedding}")
    return hf.state_dict_to_params(sd, dataclasses.replace(config, vocab_size=wte.shape[0]), source)


def _from_reference(source: Source, ask: Ask) -> Weights:
    config = _pretrained_config(ask.model_id)
    params, parts, method = import_reference_state_dict(read_state_dict(source.path), config, source.path,
                                                        ask.lora_alpha, ask.method)
    return Weights(config, params, parts, method)


def _from_checkpoint(source: Source, ask: Ask) -> Weights:
    """Another run's checkpoint step (a LoRA run's merged onto its base) and the parts it holds;
    a damaged one is an error naming it (a hand-off never falls back to other weights)."""
    from coconut_jax import models
    where, model_id = f"load_model_path={source.describe()}", ask.model_id
    meta = _read_meta(source)
    config = _pretrained_config(model_id)
    try:
        stored = checkpoint.param_shapes(source.path, source.step)
        if "lora" not in meta:
            expected = models.build(dataclasses.replace(config, vocab_size=stored["wte"][0])).param_shapes()
            diff = shape_differences(stored, expected)
            if diff:
                raise RunDirError(f"{where}: its weights do not fit model_id={model_id!r} "
                                  f"({len(diff)} tensor(s) differ: {'; '.join(diff[:3])})")
        params = checkpoint_params(source, model_id, ask.tok, lora_alpha=ask.lora_alpha)[1]
        parts = (checkpoint.load_params(source.path, source.step, item="parts")
                 if ask.parts and "parts" in checkpoint.stored_items(source.path, source.step) else {})
    except checkpoint.DamagedCheckpoint as e:
        raise RunDirError(f"{where}: damaged checkpoint ({e.why})") from e
    return Weights(config, params, parts, meta.get("method"))


def _from_resume(source: Source, ask: Ask) -> Weights:
    config = _pretrained_config(ask.model_id)
    return Weights(dataclasses.replace(config, vocab_size=checkpoint.param_shapes(source.path, source.step)["wte"][0]),
                   None)


FORMATS = {"model": _from_model_id, "hf": _from_hf_dir, "reference": _from_reference, "ours": _from_checkpoint,
           "resume": _from_resume}


def load(source: Source, model_id: str, method: str, tok, lora_alpha: float = 32.0) -> Weights:
    """The weights a run of `method` on `model_id` starts from (rule 3), at the shapes the
    method needs: the source's, then the method's rows (`Method.add_rows`). A resume gives
    the shapes alone."""
    w = FORMATS[source.kind](source, Ask(model_id, tok, lora_alpha, tuple(p.name for p in methods.get(method).parts),
                                         method))
    if w.params is None:
        return w
    pretrained_vocab = _pretrained_config(model_id).vocab_size
    check_method(w.method, method, f"load_model_path={source.describe()}", w.params["wte"].shape[0],
                 methods.get(method).planned_vocab(pretrained_vocab, len(tok)))
    w.config = dataclasses.replace(w.config, vocab_size=w.params["wte"].shape[0])
    w.config, w.params = methods.get(method).add_rows(w.config, w.params, tok, pretrained_vocab)
    return w


def part_weights(source: Source, method: str, model_id: str, held: dict) -> dict:
    """{name: (model config or None, host params or None)} of the method's parts (rule 4): from
    what the source holds (`held`), else a "pretrained" part from `model_id` and a "fresh" one
    left to the method (None, None); params are None for a resume, restored from its checkpoint."""
    out = {}
    for part in methods.get(method).parts:
        if part.source not in ("pretrained", "fresh"):
            raise ValueError(f"method {method!r}: part {part.name!r} has unknown source {part.source!r}")
        if part.source == "fresh":
            out[part.name] = (None, held.get(part.name))
        elif source.kind == "resume":
            out[part.name] = (_pretrained_config(model_id), None)
        elif part.name in held:
            params = held[part.name]
            config = _pretrained_config(model_id)
            if isinstance(params, methods.base.HFStateDict):  # a reference's saved part
                params = _at_own_vocabulary(dict(params), config, f"part {part.name!r}")
            out[part.name] = (dataclasses.replace(config, vocab_size=params["wte"].shape[0]), params)
        else:
            out[part.name] = hf.load_pretrained(model_id)
    return out


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


def checkpoint_params(source: Source, model_id: str, tok, merge: bool = True,
                      lora_alpha: float | None = None) -> tuple[object, dict, object]:
    """(model config, host f32 params, LoRA model or None) of one of our checkpoint steps (of a
    run on `model_id`): a LoRA run's trained params joined to its rebuilt base (checked against
    its digest), with the adapters folded into the kernels (`merge`, a plain model: what a
    hand-off reads) or kept (the LoRA model's params: what a PEFT export writes)."""
    from coconut_jax import models, trainable
    from coconut_jax.models import lora as lora_lib
    meta = _read_meta(source)
    trained = checkpoint.load_params(source.path, source.step)
    if "lora" not in meta:
        config = _pretrained_config(model_id)
        return dataclasses.replace(config, vocab_size=trained["wte"].shape[0]), trained, None
    lora = lora_lib.Lora.from_record(meta["lora"])
    base_source, recorded = recorded_base(source)
    # A base that was itself a reference state dict with adapters merges them at the run's alpha.
    base = load(base_source, meta["base"]["model_id"], meta["method"], tok,
                lora.alpha if lora_alpha is None else lora_alpha)
    check_base(lora_lib.digest(base.params), recorded, source, base_source)
    model = models.build(base.config, lora=lora)
    frozen = trainable.split(base.params, lora_lib.trains(lora))[1]
    params = trainable.merge(trained, frozen)
    return base.config, (lora_lib.merged(model, params) if merge else params), model


@dataclasses.dataclass
class Start:
    """What a run starts from: the model's config and host params (under LoRA the frozen base),
    its parts' (config or None, params or None), and a LoRA run's base record (None otherwise)."""
    config: object
    params: dict | None
    parts: dict
    base: dict | None


def start(c, source: Source, tok) -> Start:
    """A run's weights from `source`. Under LoRA the params are the frozen base, which a resume
    rebuilds from the source its checkpoint records (and checks against the digest recorded
    with it)."""
    from coconut_jax.models import lora as lora_lib
    lora = c.lora.rank and not c.only_eval
    base_source, recorded = source, None
    if lora and source.kind == "resume":
        base_source, recorded = recorded_base(source)
    w = load(base_source, c.model_id, c.method, tok, c.lora.alpha)
    parts = part_weights(source, c.method, c.model_id, w.parts if source.kind != "resume" else {})
    if not lora:
        return Start(w.config, w.params, parts, None)
    digest = lora_lib.digest(w.params)
    if recorded is not None:
        check_base(digest, recorded, source, base_source)
    return Start(w.config, w.params, parts, base_record(base_source, c.model_id, digest))
