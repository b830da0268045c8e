"""A run, composed: `open_run` claims its directory and makes its mesh, checkpoints and metrics
sink; `build_run` loads its weights, state and data and puts it at its start (a resume or a
fresh start). Nothing here trains: `loop.fit` does, `evaluate.Evaluator` evaluates.

    ctx = open_run(c)            # run.json claimed, mesh, Checkpoints, MetricsSink
    prepare_demo_data(c)         # configs with `prepare.kind` only (the CLI's set-up)
    run = build_run(ctx)         # weights (own checkpoint, load_model_path or model_id), data
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp

from coconut_jax import (checkpoint, config as config_lib, data, evaluate, files, hf, hosts, latent_vocab, methods,
                         models, optimizer, rundir, sharding, steps, weights)
from coconut_jax.models import lora as lora_lib
from coconut_jax.metrics import MetricsSink


@dataclasses.dataclass
class RunContext:
    """Where a run lives and what it runs on (no weights, no data)."""
    c: object                 # the validated ml_collections config
    run_dir: str
    writes: bool              # False: loaded for inspection; nothing claimed, logged or saved
    main: bool                # this process writes the shared files
    mesh: object
    micro: int                # rows per micro-batch (global)
    ckpt: checkpoint.Checkpoints | None
    sink: MetricsSink

    @property
    def data_devices(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def say(self, *a) -> None:
        if self.main:
            print(*a, flush=True)


@dataclasses.dataclass
class Position:
    """Where a run is: optimizer steps taken, the epoch (0-based) and the batch within it, and
    the best evaluation accuracy so far (None before the first)."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_acc: float | None = None


@dataclasses.dataclass
class Run:
    ctx: RunContext
    cur: methods.Curriculum
    tok: object
    tokens: latent_vocab.LatentTokens
    model: object
    state: steps.TrainState
    base: dict | None           # a LoRA run's base record (weights.base_record); None otherwise
    val_records: list
    val_examples: data.TokenizedSet
    train_examples: data.TokenizedSet | list
    plan_settings: data.PlanSettings
    at: Position

    @property
    def c(self):
        return self.ctx.c

    @property
    def params(self):
        return self.state.params

    @property
    def run_dir(self) -> str:
        return self.ctx.run_dir

    def plan(self, examples, stage: int, epoch: int, shuffle: bool = True, static_shapes: bool | None = None,
             batch_size: int | None = None):
        """The batches of `examples` at `stage` in `epoch` (the method's `epoch_plan`: Coconut's
        `data.EpochPlan`), this host's rows; `batch_size` rows a batch instead of the micro-batch's."""
        settings = self.plan_settings if batch_size is None else dataclasses.replace(self.plan_settings,
                                                                                      batch_size=batch_size)
        return self.cur.spec.epoch_plan(examples, self.cur, self.tokens, stage, epoch, settings, shuffle,
                                        static_shapes)

    def inference_parts(self) -> dict:
        """{name: (module, params)} of the parts the run's method generates with."""
        modules = dict(self.state.part_models)
        return {p.name: (modules[p.name], self.state.parts[p.name]) for p in self.cur.spec.parts if p.inference}

    def put(self, batch):
        """A batch's arrays on the mesh, sharded over the data-parallel devices."""
        return sharding.put_batch(self.ctx.mesh, batch.arrays())


def open_run(c, writes: bool = True) -> RunContext:
    """Validates `c`, claims `{save_path}/{name}` (unless `writes` is False), makes the mesh and
    opens the run's checkpoints and metrics file. The multi-host runtime must be up already."""
    config_lib.validate(c)
    main = jax.process_index() == 0
    run_dir = os.path.join(c.save_path, c.name)
    if writes:
        rundir.claim(run_dir, c, write=main)
    mesh = config_lib.checked(sharding.make_mesh, c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    micro = c.global_batch_size // c.gradient_accumulation_steps
    config_lib.check_batch_arithmetic(micro, mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    ckpt = None if (c.debug or not writes) else checkpoint.Checkpoints(
        os.path.join(run_dir, "checkpoints"), main=main, asynchronous=c.async_checkpoints)
    sink = MetricsSink(os.path.join(run_dir, "metrics.jsonl"), _wandb(c, run_dir, main and writes),
                       enabled=main and writes)
    return RunContext(c, run_dir, writes, main, mesh, micro, ckpt, sink)


def _wandb(c, run_dir: str, writes: bool):
    if c.wandb_mode == "disabled" or c.debug or not writes:
        return None
    import wandb
    # wandb keeps its files on a local disk: a run in a bucket keeps them in the temporary directory.
    local = os.path.join(tempfile.gettempdir(), "coconut_jax-wandb", c.name) if files.is_remote(run_dir) else run_dir
    os.makedirs(local, exist_ok=True)
    return wandb.init(project=c.project, name=c.name, mode=c.wandb_mode, config=c.to_dict(), dir=local)


def build_model(c, config, lora_tokens=(), lora: bool = True):
    """The model of family config `config` as run config `c` runs it (compute dtype, layers,
    and LoRA's adapters unless `lora` is False; `lora_tokens`: the rows that train beside
    them, `Method.lora_tokens`). A LoRA target the family lacks is a ConfigError."""
    adapters = None
    if lora:
        adapters = config_lib.checked(lora_lib.from_config, c, models.family(models.model_type(config)), lora_tokens)
    return models.build(config, jnp.bfloat16 if c.bf16 else jnp.float32, scan_layers=c.scan_layers, remat=c.remat,
                        fused_attention=c.fused_attention, lora=adapters)


def trains(model, method):
    """Which of the model's params train: the method's choice, and under LoRA only what LoRA
    trains of it (None: all)."""
    if model.lora is None:
        return method.trains
    adapters = lora_lib.trains(model.lora)
    return lambda path: adapters(path) and method.trains(path)


def build_run(ctx: RunContext) -> Run:
    """Weights (the run's own newest good checkpoint, else `load_model_path`, else `model_id`),
    the sharded train state, the datasets, and the position to start from: a resume restores
    its checkpoint and cuts metrics.jsonl back to it; a fresh start empties metrics.jsonl."""
    c = ctx.c
    cur = methods.Curriculum.from_config(c)
    spec = cur.spec
    tok = hf.load_tokenizer(c.model_id)
    tokens = spec.special_tokens(tok, hf.load_config(hf.resolve_model_dir(c.model_id, weights=False)).vocab_size)
    own = weights.own_checkpoint(ctx.ckpt, c.only_eval, say=ctx.say)
    source = weights.Source("resume", ctx.ckpt.dir, own) if own is not None else weights.source_of(c.load_model_path)
    w = weights.start(c, source, tok)
    hosts.barrier("weights_loaded")  # a host reading a slower disk is not a failed collective
    config, params, base = w.config, w.params, w.base
    # An evaluation alone trains nothing: no adapters (a hand-off from a LoRA run arrives merged).
    model = build_model(c, config, spec.lora_tokens(tokens), lora=not c.only_eval)
    if model.lora is not None:
        params = lora_lib.attach(model, params, c.seed)
    parts = build_parts(c, spec, model, w.parts)
    val_records, val_examples = data.load_dataset(
        c.val_path, tok, 32 if c.debug else (c.max_val_examples or None), c.cache_dir, tfds_data_dir=c.tfds_data_dir,
        text_format=spec)
    train_examples = [] if c.only_eval else data.load_dataset(
        c.train_path, tok, 5000 if c.debug else None, c.cache_dir, with_records=False,
        tfds_data_dir=c.tfds_data_dir, text_format=spec)[1]
    # The learning-rate schedule spans the optimizer steps of the epochs this run trains.
    tx = optimizer.make_optimizer(c, optimizer.total_steps(c, spec.training_records(train_examples)))
    state = steps.TrainState(model, params, ctx.mesh, tx, jnp.dtype(c.param_dtype), loss=spec.loss, parts=parts,
                             trains=trains(model, spec), base_in_checkpoint=model.lora is None)
    targets = None
    if spec.step_targets:
        targets = data.StepTargets(c.step_groups, data.step_ids(tok), c.max_latent_stage, cur.thoughts_per_step)
        for path, examples in ((c.train_path, train_examples), (c.val_path, val_examples)):
            if len(examples):
                targets.check_parses(data.TokenizedSet.from_examples(examples), path)
    settings = data.PlanSettings(seed=c.seed, batch_size=ctx.micro, multiple=c.pad_to_multiple,
                                 max_len=model.config.n_positions, overlong=c.overlong, static_shapes=c.static_shapes,
                                 host=jax.process_index(), num_hosts=jax.process_count(), step_targets=targets)
    run = Run(ctx, cur, tok, tokens, model, state, base, val_records, val_examples, train_examples, settings,
              Position(epoch=c.resume))
    if source.kind == "resume":
        resume(run)
    else:
        ctx.sink.truncate(0)  # a start over: what an interrupted start logged is not this run's
        ctx.say(f"weights from {source.describe() or c.model_id}")
    return run


def part_model(c, spec, part, config):
    """The module of a "pretrained" part: the family's model of `config`, with LoRA adapters of
    the part's rank setting (`Part.lora_rank`) when it is > 0 (the run's `lora` alpha, dropout and
    targets; no token rows)."""
    rank = int(spec.setting(part.lora_rank)) if part.lora_rank else 0
    module = build_model(c, config, lora=False)
    if not rank:
        return module
    family = models.family(models.model_type(config))
    adapters = lora_lib.Lora(rank=rank, alpha=float(c.lora.alpha), dropout=float(c.lora.dropout),
                             targets=config_lib.checked(lora_lib.resolve_targets, family, tuple(c.lora.targets)))
    return module.replace(lora=adapters)


def build_parts(c, spec, model, stored: dict) -> dict:
    """{name: (module, host params or None)} of the method's parts: a "pretrained" part is the
    family's model of its config (fresh adapters added when it has LoRA's and its weights none);
    a "fresh" one the method's module (`Method.part_module`), from its stored params (a
    hand-off) or the run's seed (a resume then restores its own)."""
    out = {}
    for part in spec.parts:
        config_or_none, params = stored[part.name]
        if part.source == "fresh":
            module = spec.part_module(part, model.config)
            out[part.name] = (module, params if params is not None else module.init(c.seed))
        else:
            module = part_model(c, spec, part, config_or_none)
            if params is not None and module.lora is None and lora_lib.has_adapters(params):
                raise config_lib.ConfigError(f"config: the {part.name} handed on carries LoRA adapters; set "
                                             f"{part.lora_rank or 'its LoRA rank'} to their rank to go on with them")
            if module.lora is not None and params is not None and not lora_lib.has_adapters(params):
                params = lora_lib.attach(module, params, c.seed)
            out[part.name] = (module, params)
    return out


def resume(run: Run) -> None:
    """Restores the newest checkpoint that reads back whole (a damaged newer one is moved aside
    with one line, and the run goes on from the one before, as it went the first time)."""
    ctx = run.ctx
    step, state, meta = ctx.ckpt.restore_newest(run.state.abstract(), say=ctx.say)
    run.state.load(state)
    run.at = Position(meta["step"], meta["epoch"], meta["batch_in_epoch"], meta["best_acc"])
    ctx.sink.truncate(meta["metrics_count"])
    ctx.say(f"resumed from {ctx.ckpt.dir}/{step}: epoch {run.at.epoch + 1}, batch {run.at.batch_in_epoch}")


def save(run: Run, end_of_epoch: bool, eval_acc: float | None = None, best: bool = False) -> None:
    """Starts writing a checkpoint of the run where it is (`loop` flushes its logged losses
    first, so the metrics count it records is exact)."""
    ctx, at = run.ctx, run.at
    if ctx.ckpt is None:
        return
    meta = {"step": at.step, "epoch": at.epoch, "batch_in_epoch": at.batch_in_epoch,
            "stage": run.cur.stage(at.epoch), "metrics_count": ctx.sink.count, "best_acc": at.best_acc,
            "eval_acc": eval_acc, "method": run.c.method, "generation": evaluate.generation_settings(run.c)}
    if run.base is not None:
        meta.update(base=run.base, lora=run.model.lora.record())
    ctx.ckpt.save(at.step, run.state.checkpoint_tree(), meta, end_of_epoch=end_of_epoch,
                  best_acc=eval_acc if best else None)
