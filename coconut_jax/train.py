"""Training and evaluation entry point.

    python -m coconut_jax.train --config configs/prosqa.py [--config.field=value ...]
    python -m coconut_jax.train --config configs/yaml.py:path/to/reference_args.yaml
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax import checkpoint, config as config_lib, data, evaluate, feed, files, hf, models, rundir, sharding, steps
from coconut_jax.demo import prepare
from coconut_jax.metrics import MetricsSink, stage_table


class Trainer:
    """One run: set-up (run directory, weights, data), the epoch loop, evaluation, checkpoints.

    `writes=False` loads a run for inspection (analysis): nothing is claimed, logged or saved.
    """

    def __init__(self, c, writes: bool = True):
        config_lib.validate(c)
        start_distributed(c)
        use_compilation_cache(c)
        self.c, self.writes = c, writes
        self.main = jax.process_index() == 0
        self.run_dir = os.path.join(c.save_path, c.name)
        if writes:
            rundir.claim(self.run_dir, c, write=self.main)
        self.mesh = config_lib.checked(sharding.make_mesh, c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        self.data_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.micro = c.global_batch_size // c.gradient_accumulation_steps
        config_lib.check_batch_arithmetic(self.micro, self.data_devices, jax.process_count())
        if c.prepare.kind:
            prepare.prepare_synthetic(c)
        self.cur = data.Curriculum(c.method, c.c_thought, c.max_latent_stage, c.epochs_per_stage,
                                   c.pad_latent_to_max, c.uniform_prob)
        self.tok = hf.load_tokenizer(c.model_id)
        self.tokens = hf.latent_tokens(self.tok)
        self.ckpt = None if (c.debug or not writes) else checkpoint.Checkpoints(
            os.path.join(self.run_dir, "checkpoints"), main=self.main, asynchronous=c.async_checkpoints)
        own = rundir.own_checkpoint(self.ckpt, c.only_eval, say=self._print)
        source = rundir.Source("resume", self.ckpt.dir, own) if own is not None else rundir.weight_source(c.load_model_path)
        config, params = rundir.load_weights(source, c.model_id, c.method, self.tok)
        self.model = models.build(config, jnp.bfloat16 if c.bf16 else jnp.float32, scan_layers=c.scan_layers,
                                  remat=c.remat, fused_attention=c.fused_attention)
        self.state = steps.TrainState(self.model, params, self.mesh, steps.make_optimizer(c), jnp.dtype(c.param_dtype))
        self.val_records, self.val_examples = data.load_dataset(
            c.val_path, self.tok, 32 if c.debug else (c.max_val_examples or None), c.cache_dir,
            tfds_data_dir=c.tfds_data_dir)
        self.train_examples = [] if c.only_eval else data.load_dataset(
            c.train_path, self.tok, 5000 if c.debug else None, c.cache_dir, with_records=False,
            tfds_data_dir=c.tfds_data_dir)[1]
        self.eval_rows = config_lib.eval_rows(c.eval_batch_size, jax.default_backend())
        self.max_new = c.max_new_tokens or (64 if "gsm" in os.path.basename(c.val_path) else 128)
        self.step, self.epoch, self.batch_in_epoch, self.best_acc = 0, c.resume, 0, None
        self.sink = MetricsSink(os.path.join(self.run_dir, "metrics.jsonl"), self._wandb(), enabled=self.main and writes)
        if source.kind == "resume":
            self._resume()
        else:
            self.sink.truncate(0)  # a start over: what an interrupted start logged is not this run's
            self._print(f"weights from {source.describe() or c.model_id}")
        self._pending = []       # logged steps whose losses are still on the device
        self._signalled = False  # this process got SIGTERM
        self.stopped = False     # every process agreed to stop (and saved)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    @property
    def params(self):
        return self.state.params

    # -- state ----------------------------------------------------------------------------
    def _resume(self):
        """Restores the newest checkpoint that reads back whole (a damaged newer one is moved
        aside with one line, and the run goes on from the one before, as it went the first time)."""
        step, state, meta = self.ckpt.restore_newest(self.state.abstract(), say=self._print)
        self.state.load(state)
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        self.best_acc = meta["best_acc"]
        self.sink.truncate(meta["metrics_count"])
        self._print(f"resumed from {self.ckpt.dir}/{step}: epoch {self.epoch + 1}, batch {self.batch_in_epoch}")

    def _save(self, end_of_epoch: bool, eval_acc: float | None = None, best: bool = False):
        if self.ckpt is None:
            return
        self._flush_losses()  # the metrics count in meta must include every finished step
        meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "stage": self.cur.stage(self.epoch), "metrics_count": self.sink.count, "best_acc": self.best_acc,
                "eval_acc": eval_acc, "method": self.c.method}
        self.ckpt.save(self.step, self.state.params, self.state.opt_state, meta, end_of_epoch=end_of_epoch,
                       best_acc=eval_acc if best else None)

    def _on_sigterm(self, *_):
        self._signalled = True

    def _stop_agreed(self) -> bool:
        """Whether any host got SIGTERM: then every host saves the same step and exits. Asked
        after every step, so no host leaves the loop while another waits in a collective."""
        if jax.process_count() == 1:
            return self._signalled
        from jax.experimental import multihost_utils
        return bool(np.max(multihost_utils.process_allgather(np.int32(self._signalled))))

    def _wandb(self):
        if self.c.wandb_mode == "disabled" or self.c.debug or not (self.main and self.writes):
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

    def _plan(self, examples, stage, epoch, shuffle=True, static_shapes=None):
        static = self.c.static_shapes if static_shapes is None else static_shapes
        return data.EpochPlan(examples, self.cur, self.tokens, stage, self.c.seed, epoch, self.micro,
                              self.c.pad_to_multiple, self.model.config.n_positions, self.c.overlong, shuffle,
                              static, jax.process_index(), jax.process_count())

    # -- loop -----------------------------------------------------------------------------
    def run(self):
        c = self.c
        if c.only_eval:
            return self.evaluate(self.cur.stage(c.resume), eval_loss=c.only_eval_loss)
        result = {}
        while self.epoch < c.num_epochs and not self.stopped:
            result = self.train_epoch()
        if self.ckpt is not None:
            self.ckpt.close()
        if self.sink.wandb_run is not None:
            self.sink.wandb_run.finish()
        if self.main and not self.stopped:
            from coconut_jax.plot import plot_metrics
            path = os.path.join(self.run_dir, "metrics.jsonl")
            print("\n" + stage_table(path) + f"\ncurves: {plot_metrics(path)}")
        return result

    def train_epoch(self):
        c, epoch = self.c, self.epoch
        stage = self.cur.stage(epoch)
        plan = self._plan(self.train_examples, stage, epoch)
        if c.reset_optimizer and self.batch_in_epoch == 0:
            self.state.reset_optimizer()
        self._train_steps(plan, stage)
        if self.stopped:
            return {}
        result = self.evaluate(stage, eval_loss=True)
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        improved = self.best_acc is None or result["eval/acc"] > self.best_acc
        self.best_acc = result["eval/acc"] if improved else self.best_acc
        stage_end = self.cur.stage(self.epoch) != stage or self.epoch == c.num_epochs
        if not c.save_only_improve or improved or stage_end:
            self._save(end_of_epoch=True, eval_acc=result["eval/acc"], best=improved)
        return result

    def _train_steps(self, plan, stage):
        """The optimizer steps of an epoch from `self.batch_in_epoch` on (or until SIGTERM).

        Batches are collated and put on the devices by a background thread while earlier
        steps run; losses stay on the device until `log_every_steps` of them are read back
        at once, so nothing in the loop waits for the device."""
        c, epoch = self.c, self.epoch
        accum = c.gradient_accumulation_steps
        starts = list(range(self.batch_in_epoch, len(plan), accum))

        def micro(start):  # the micro-batches of the optimizer step starting at `start`
            return range(start, min(start + accum, len(plan)))

        def make(k):
            batch = plan.batch(k)
            return batch, self._put(batch), int(batch.attention_mask.sum()) * jax.process_count()
        base = jax.random.key(c.seed)
        bar = self._progress(starts, desc=f"epoch {epoch + 1}/{c.num_epochs} stage {stage}", total=len(starts))
        self._epoch_clock = (time.time(), 0)
        acc = self.state.new_accumulator()
        with feed.Prefetch(make, (k for s in starts for k in micro(s)), depth=c.prefetch_batches) as batches:
            for start in bar:
                tokens = 0
                for k in micro(start):
                    batch, arrays, n = next(batches)
                    tokens += n
                    acc = steps.accumulate(self.model, self.state.params, acc, arrays,
                                           (base, np.int32(self.step), np.int32(k - start)),
                                           method=self.cur.spec, prefix_len=batch.prefix_len,
                                           n_latent=batch.n_latent, loss_chunk=c.loss_chunk)
                loss, acc = self.state.update(acc)
                self.step += 1
                self.batch_in_epoch = micro(start).stop
                self._pending.append({"step": self.step, "epoch": epoch + 1, "stage": stage, "train/loss": loss,
                                      "tokens": tokens})
                if len(self._pending) >= c.log_every_steps:
                    self._flush_losses(bar)
                stop = self._stop_agreed()
                if stop or (c.checkpoint_every_steps and self.step % c.checkpoint_every_steps == 0
                            and self.batch_in_epoch < len(plan)):
                    self._save(end_of_epoch=False)
                    if stop:
                        self.stopped = True
                        if self.ckpt is not None:
                            self.ckpt.wait()
                        self._print(f"SIGTERM: saved step {self.step}, exiting")
                        return
        self._flush_losses(bar)

    def _flush_losses(self, bar=None):
        """Reads back the losses of the steps not yet logged (one transfer) and logs them."""
        if not self._pending:
            return
        losses = jax.device_get([e["train/loss"] for e in self._pending])
        t0, tokens = self._epoch_clock
        elapsed = max(time.time() - t0, 1e-9)
        for e, loss in zip(self._pending, losses):
            tokens += e.pop("tokens")
            self.sink.log({**e, "train/loss": float(loss), "train/tokens_per_s": tokens / elapsed})
        self._epoch_clock = (t0, tokens)
        if self.main and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
        self._pending = []

    def evaluate(self, stage, eval_loss=True):
        c = self.c
        out = {"step": self.step, "epoch": self.epoch + 1, "stage": stage}
        if eval_loss:
            # One shape for the whole validation set (one program per stage); the sums stay on
            # the device until the end.
            plan = self._plan(self.val_examples, stage, self.epoch, shuffle=False, static_shapes=True)
            terms = [steps.eval_loss_terms(self.model, self.state.params, self._put(batch),
                                           method=self.cur.spec, prefix_len=batch.prefix_len,
                                           n_latent=batch.n_latent, loss_chunk=c.loss_chunk)
                     for batch in self._progress(plan.batches(), desc="val loss", total=len(plan))]
            total, count = (float(x) for x in np.sum(jax.device_get(terms), axis=0)) if terms else (0.0, 0.0)
            out["eval/loss"] = total / max(count, 1.0)
        one_process = jax.process_count() == 1
        preds = evaluate.generate_predictions(
            self.model, self.state.params, self.val_examples, self.val_records, stage, self.cur, self.tokens, self.tok,
            # Sharded over this host's devices: batches padded to a multiple of them with unscored filler rows.
            batch_size=self.eval_rows, row_multiple=self.data_devices if one_process else 1,
            max_new_tokens=self.max_new, multiple=c.eval_pad_to_multiple, context=self.model.config.n_positions,
            overlong=c.overlong, put=self._put if one_process else (lambda b: b.arrays()),
            get=sharding.gather, progress=self._progress)
        summary = evaluate.summarize(preds, len(self.val_examples))
        out.update({f"eval/{k}": summary[k] for k in ("acc", "cot_em", "new_tokens", "thoughts")})
        if summary["skipped"]:
            out["eval/skipped"] = summary["skipped"]
        if self.main:
            if self.writes:
                files.write_atomic(os.path.join(self.run_dir, f"predictions_epoch{self.epoch + 1}.jsonl"),
                                    "".join(json.dumps(p.to_json()) + "\n" for p in preds))
            for p in preds[:c.print_examples]:
                print(f"--- record {p.index} ({'correct' if p.correct else 'wrong'})\n{p.text}")
            print(f"epoch {self.epoch + 1} stage {stage}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in out.items() if k.startswith("eval/")), flush=True)
        self.sink.log(out)
        return out


def start_distributed(c) -> None:
    """The multi-host runtime, with a wrong `JAX_*` variable or setting as one line."""
    try:
        sharding.maybe_initialize_distributed(c.coordinator_address, c.num_processes, c.process_id)
    except KeyError as e:
        raise config_lib.ConfigError(f"distributed start-up: environment variable {e.args[0]} is not set") from e
    except ValueError as e:
        raise config_lib.ConfigError(f"distributed start-up: {e}") from e


def use_compilation_cache(c) -> None:
    """Turns on the persistent XLA cache (`compilation_cache_dir`); called before anything compiles."""
    cache = config_lib.compilation_cache_dir(c)
    if not cache:
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Every program, not only those over JAX's default 1 s: a restart compiles nothing.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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
        except (config_lib.ConfigError, data.DataError, hf.CheckpointError, rundir.RunDirError,
                checkpoint.CheckpointFault) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except files.WriteError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Without waiting for background writers (a checkpoint write that failed leaves
            # Orbax threads that wait minutes on one another): what is on disk is already whole.
            os._exit(2)
    app.run(run, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    cli()
