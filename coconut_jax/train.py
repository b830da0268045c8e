"""Training and evaluation entry point.

    python -m coconut_jax.train --config configs/prosqa.py [--config.field=value ...]
    python -m coconut_jax.train --config configs/yaml.py:path/to/reference_args.yaml
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import optax

from coconut_jax import checkpoint, coconut, config as config_lib, data, evaluate, hf, sharding
from coconut_jax.metrics import MetricsSink
from coconut_jax.models.gpt2 import GPT2Model


# -- jitted steps --------------------------------------------------------------------------

def make_optimizer(c):
    return optax.adamw(c.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay)


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent", "feedback"), donate_argnums=(2,))
def accumulate(model, params, acc, arrays, key, *, prefix_len, n_latent, feedback):
    """Adds one micro-batch's gradient of the summed token loss (and the sums) to `acc`."""
    def f(p):
        s, n = coconut.loss_terms(model, p, arrays, prefix_len, n_latent, feedback=feedback, dropout_key=key)
        return s, n
    (s, n), g = jax.value_and_grad(f, has_aux=True)(params)
    return {"grads": jax.tree.map(jnp.add, acc["grads"], g), "loss": acc["loss"] + s, "count": acc["count"] + n}


def apply_update(tx, params, opt_state, acc):
    """One optimizer step on the token-weighted mean gradient of the accumulated micro-batches."""
    grads = jax.tree.map(lambda g: g / jnp.maximum(acc["count"], 1.0), acc["grads"])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, acc["loss"] / jnp.maximum(acc["count"], 1.0)


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent", "feedback"))
def eval_loss_terms(model, params, arrays, *, prefix_len, n_latent, feedback):
    return coconut.loss_terms(model, params, arrays, prefix_len, n_latent, feedback=feedback)


# -- set-up ---------------------------------------------------------------------------------

def prepare_synthetic(c) -> None:
    """The demo's offline data and model: a generated ProsQA-style set and a small GPT-2."""
    from coconut_jax import tiny
    from data_prep import prosqa_generator
    from data_prep.common import write_json
    root = os.path.join(c.save_path, c.name, "prepared")
    train, valid = os.path.join(root, "prosqa_train.json"), os.path.join(root, "prosqa_valid.json")
    model_dir = os.path.join(root, "model")
    p = c.prepare
    if jax.process_index() == 0 and not os.path.isdir(model_dir):
        graph = prosqa_generator.GraphConfig(min_nodes=p.min_nodes, max_nodes=p.max_nodes, n_concepts=p.n_concepts)
        if p.steps:
            graph = dataclasses.replace(graph, steps_distribution=tuple((int(s), 1.0) for s in p.steps))
        records = prosqa_generator.generate(p.train, seed=p.seed * 1000, g=graph)
        write_json(records, train)
        write_json(prosqa_generator.generate(p.valid, seed=p.seed * 1000 + 1, g=graph), valid)
        tiny.build(tiny.record_texts(records), model_dir, vocab_size=p.vocab_size, n_layer=p.n_layer,
                   n_embd=p.n_embd, n_head=p.n_head, n_positions=p.n_positions, seed=c.seed,
                   induction_heads=p.induction_heads)
        print(f"built {model_dir}")
    if jax.process_count() > 1:  # the other hosts read what host 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("coconut_jax.prepare_synthetic")
    c.train_path, c.val_path, c.model_id = train, valid, model_dir


def load_initial_params(c, config, params, tok):
    """Applies `load_model_path` (HF dir, reference torch file, or a checkpoint of ours).

    Returns ((config, params), checkpoint path or None). For a checkpoint of ours the params
    returned are the template (right shapes) its weights are restored onto.
    """
    path, source = c.load_model_path, None
    if path in ("", "None"):
        pass
    elif os.path.isfile(path):
        params = hf.import_reference_checkpoint(path, config)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config, params = hf.load_pretrained(path)
    elif checkpoint.is_checkpoint_dir(path):
        source = path
    else:
        raise config_lib.ConfigError(f"load_model_path={path!r}: not a HF directory, PyTorch file or checkpoint")
    config = dataclasses.replace(config, vocab_size=params["wte"].shape[0])
    if c.method in data.LATENT_METHODS:
        config, params = hf.add_latent_rows(config, params, tok)
    return (config, params), source


class Trainer:
    def __init__(self, c):
        config_lib.validate(c)
        sharding.maybe_initialize_distributed(c.coordinator_address, c.num_processes, c.process_id)
        if c.prepare.kind:
            prepare_synthetic(c)
        self.c = c
        self.main = jax.process_index() == 0
        self.run_dir = os.path.join(c.save_path, c.name)
        os.makedirs(self.run_dir, exist_ok=True)
        self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        self.cur = data.Curriculum(c.method, c.c_thought, c.max_latent_stage, c.epochs_per_stage,
                                   c.pad_latent_to_max, c.uniform_prob)
        self.feedback = c.method == "coconut"
        self.tok = hf.load_tokenizer(c.model_id)
        self.tokens = hf.latent_tokens(self.tok)
        config, params = hf.load_pretrained(c.model_id)
        (config, params), ckpt_source = load_initial_params(c, config, params, self.tok)
        self.model = GPT2Model(config, jnp.bfloat16 if c.bf16 else jnp.float32)
        self.param_sh = sharding.param_shardings(self.mesh, self.model.logical_axes(), self.model.param_shapes())
        self.tx = make_optimizer(c)
        self.params = sharding.put_params(params, self.param_sh)
        self.opt_state = self._new_opt_state()
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.micro = c.global_batch_size // c.gradient_accumulation_steps
        if self.micro % n_dev:
            raise config_lib.ConfigError(f"config: micro-batch {self.micro} is not divisible by {n_dev} data devices")
        limit = 5000 if c.debug else None
        self.val_records, self.val_examples = data.load_dataset(c.val_path, self.tok, 32 if c.debug else (c.max_val_examples or None), c.cache_dir)
        self.train_examples = [] if c.only_eval else data.load_dataset(c.train_path, self.tok, limit, c.cache_dir)[1]
        self.max_new = c.max_new_tokens or (64 if "gsm" in os.path.basename(c.val_path) else 128)
        self.ckpt = None if c.debug else checkpoint.Checkpoints(os.path.join(self.run_dir, "checkpoints"))
        self.step, self.epoch, self.batch_in_epoch, self.best_acc = 0, c.resume, 0, 0.0
        self.sink = MetricsSink(os.path.join(self.run_dir, "metrics.jsonl"), self._wandb(), enabled=self.main)
        if ckpt_source is not None:
            self._restore_weights_from(ckpt_source)
        elif self.ckpt is not None and self.ckpt.latest() is not None and not c.only_eval:
            self._resume(self.ckpt.latest())
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- state ----------------------------------------------------------------------------
    def _new_opt_state(self):
        return jax.jit(self.tx.init)(self.params)

    def _abstract_state(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": self.params, "opt_state": self.opt_state})

    def _resume(self, step):
        state, meta = self.ckpt.restore(step, self._abstract_state())
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        self.best_acc = meta["best_acc"]
        self.sink.truncate(meta["metrics_count"])
        self._print(f"resumed from {self.ckpt.dir}/{step}: epoch {self.epoch + 1}, batch {self.batch_in_epoch}")

    def _restore_weights_from(self, path):
        ckpt_dir, step = checkpoint.split_checkpoint_path(path)
        src = checkpoint.Checkpoints(ckpt_dir)
        step = src.latest() if step is None else step
        state, _ = src.restore(step, self._abstract_state())
        self.params = state["params"]
        self._print(f"loaded weights from {ckpt_dir}/{step}")

    def _save(self, end_of_epoch: bool):
        if self.ckpt is None:
            return
        meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "stage": self.cur.stage(self.epoch), "metrics_count": self.sink.count, "best_acc": self.best_acc,
                "end_of_epoch": end_of_epoch, "method": self.c.method}
        self.ckpt.save(self.step, self.params, self.opt_state, meta)
        if end_of_epoch:
            self.ckpt.drop_mid_epoch(self.step)

    def _on_sigterm(self, *_):
        self._stop = True

    def _wandb(self):
        if self.c.wandb_mode == "disabled" or self.c.debug or not self.main:
            return None
        import wandb
        return wandb.init(project=self.c.project, name=self.c.name, mode=self.c.wandb_mode,
                          config=self.c.to_dict(), dir=self.run_dir)

    def _print(self, *a):
        if self.main:
            print(*a, flush=True)

    def _progress(self, it, desc="", total=None):
        if not self.main:
            return it
        from tqdm.auto import tqdm
        return tqdm(it, desc=desc, total=total, dynamic_ncols=True, leave=False)

    def _put(self, batch):
        return sharding.put_batch(self.mesh, batch.arrays())

    def _plan(self, examples, stage, epoch, shuffle=True, hosts=True):
        return data.EpochPlan(examples, self.cur, self.tokens, stage, self.c.seed, epoch, self.micro,
                              self.c.pad_to_multiple, self.model.config.n_positions, self.c.overlong, shuffle,
                              self.c.static_shapes, jax.process_index() if hosts else 0, jax.process_count() if hosts else 1)

    # -- loop -----------------------------------------------------------------------------
    def run(self):
        c = self.c
        if c.only_eval:
            return self.evaluate(self.cur.stage(c.resume), eval_loss=True)
        result = {}
        while self.epoch < c.num_epochs and not self._stop:
            result = self.train_epoch()
        if self.ckpt is not None:
            self.ckpt.close()
        if self.sink.wandb_run is not None:
            self.sink.wandb_run.finish()
        if self.main and not self._stop:
            self.summarize()
        return result

    def summarize(self):
        """Per-stage table (last evaluation of each stage) and the curves as PNG."""
        from coconut_jax.metrics import read_metrics
        from coconut_jax.plot import plot_metrics
        path = os.path.join(self.run_dir, "metrics.jsonl")
        last = {e["stage"]: e for e in read_metrics(path) if "eval/acc" in e}
        print(f"\n{'stage':>5} {'thoughts':>8} {'val loss':>9} {'accuracy':>9} {'CoT match':>9} {'new tokens':>10}")
        for stage, e in sorted(last.items()):
            print(f"{stage:>5} {e['eval/thoughts']:>8} {e.get('eval/loss', float('nan')):>9.4f} "
                  f"{e['eval/acc']:>9.3f} {e['eval/cot_em']:>9.3f} {e['eval/new_tokens']:>10.1f}")
        print(f"curves: {plot_metrics(path)}")

    def train_epoch(self):
        c, epoch = self.c, self.epoch
        stage = self.cur.stage(epoch)
        plan = self._plan(self.train_examples, stage, epoch)
        if c.reset_optimizer and self.batch_in_epoch == 0:
            self.opt_state = self._new_opt_state()
        accum = c.gradient_accumulation_steps
        starts = list(range(self.batch_in_epoch, len(plan), accum))
        base = jax.random.key(c.seed)
        bar = self._progress(starts, desc=f"epoch {epoch + 1}/{c.num_epochs} stage {stage}", total=len(starts))
        t0, tokens = time.time(), 0
        update = jax.jit(functools.partial(apply_update, self.tx), donate_argnums=(0, 1))
        for start in bar:
            acc = {"grads": jax.tree.map(jnp.zeros_like, self.params), "loss": jnp.float32(0), "count": jnp.float32(0)}
            for k in range(start, min(start + accum, len(plan))):
                batch = plan.batch(k)
                tokens += int(batch.attention_mask.sum()) * jax.process_count()
                key = jax.random.fold_in(jax.random.fold_in(base, self.step), k - start)
                acc = accumulate(self.model, self.params, acc, self._put(batch), key, prefix_len=batch.prefix_len,
                                 n_latent=batch.n_latent, feedback=self.feedback)
            self.params, self.opt_state, loss = update(self.params, self.opt_state, acc)
            self.step += 1
            self.batch_in_epoch = min(start + accum, len(plan))
            loss = float(loss)
            if self.main and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}")
            self.sink.log({"step": self.step, "epoch": epoch + 1, "stage": stage, "train/loss": loss,
                           "train/tokens_per_s": tokens / max(time.time() - t0, 1e-9)})
            if self._stop or (c.checkpoint_every_steps and self.step % c.checkpoint_every_steps == 0
                              and self.batch_in_epoch < len(plan)):
                self._save(end_of_epoch=False)
                if self._stop:
                    self._print(f"SIGTERM: saved step {self.step}, exiting")
                    return {}
        result = self.evaluate(stage, eval_loss=True)
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        improved = result["eval/acc"] > self.best_acc
        self.best_acc = max(self.best_acc, result["eval/acc"])
        stage_end = self.cur.stage(self.epoch) != stage or self.epoch == c.num_epochs
        if not c.save_only_improve or improved or stage_end:
            self._save(end_of_epoch=True)
            if improved and self.ckpt is not None:
                self.ckpt.mark_best(self.step, result["eval/acc"])
        return result

    def evaluate(self, stage, eval_loss=True):
        c = self.c
        out = {"step": self.step, "epoch": self.epoch + 1, "stage": stage}
        if eval_loss:
            plan = self._plan(self.val_examples, stage, self.epoch, shuffle=False)
            total, count = 0.0, 0.0
            for batch in self._progress(plan.batches(), desc="val loss", total=len(plan)):
                s, n = eval_loss_terms(self.model, self.params, self._put(batch), prefix_len=batch.prefix_len,
                                       n_latent=batch.n_latent, feedback=self.feedback)
                total, count = total + float(s), count + float(n)
            out["eval/loss"] = total / max(count, 1.0)
        preds = evaluate.generate_predictions(
            self.model, self.params, self.val_examples, self.val_records, stage, self.cur, self.tokens, self.tok,
            batch_size=c.eval_batch_size, max_new_tokens=self.max_new, multiple=c.pad_to_multiple,
            put=self._put if jax.process_count() == 1 else (lambda b: b.arrays()),
            get=sharding.gather, progress=self._progress)
        summary = evaluate.summarize(preds)
        out.update({"eval/acc": summary["acc"], "eval/cot_em": summary["cot_em"],
                    "eval/new_tokens": summary["new_tokens"], "eval/thoughts": summary["thoughts"]})
        if self.main:
            path = os.path.join(self.run_dir, f"predictions_epoch{self.epoch + 1}.jsonl")
            with open(path, "w") as f:
                for p in preds:
                    f.write(json.dumps(p.to_json()) + "\n")
            for p in preds[:c.print_examples]:
                print(f"--- record {p.index} ({'correct' if p.correct else 'wrong'})\n{p.text}")
            print(f"epoch {self.epoch + 1} stage {stage}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in out.items() if k.startswith("eval/")), flush=True)
        self.sink.log(out)
        return out


def quiet_libraries():
    """Orbax logs every checkpoint step at INFO through absl; keep the console to our own
    progress unless the user asked for more with --verbosity."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv):
    from absl import flags
    trainer = Trainer(flags.FLAGS.config)
    trainer.run()


def cli():
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configuration file (configs/*.py)", lock_config=True)
    flags.mark_flags_as_required(["config"])

    def run(argv):
        quiet_libraries()
        try:
            main(argv)
        except (config_lib.ConfigError, data.DataError, hf.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(run)


if __name__ == "__main__":
    cli()
