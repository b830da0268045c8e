"""The training loop: `fit` runs the epochs of a built run; `train_steps` is one epoch's
optimizer steps with its hooks (losses logged, checkpoints every N steps, preemption).

Batches are collated and put on the devices by a background thread while earlier steps run;
losses stay on the device until `log_every_steps` of them are read back at once, so nothing in
the loop waits for the device.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

import jax
import numpy as np

from coconut_jax import costs, feed, steps
from coconut_jax.metrics import stage_table
from coconut_jax.run import Run, save


def progress_bar(main: bool) -> Callable:
    """tqdm on the process that prints, nothing elsewhere."""
    def bar(it, desc="", total=None):
        if not main:
            return it
        from tqdm.auto import tqdm
        return tqdm(it, desc=desc, total=total, dynamic_ncols=True, leave=False)
    return bar


class Preemption:
    """SIGTERM on any host stops every host at the same step: asked after every step (a
    collective), so no host leaves the loop while another waits in one."""

    def __init__(self):
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.signalled = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        from jax.experimental import multihost_utils
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.signalled))))


class LossLog:
    """Training losses of logged steps, kept on the device and read back together (one transfer),
    with the epoch's tokens per second and, on an accelerator of known peak (`costs.PEAK_BF16`),
    the model FLOP utilisation of the epoch so far (`train/mfu`)."""

    def __init__(self, sink, every: int, peak_flops: float | None = None):
        self.sink, self.every, self.peak = sink, every, peak_flops
        self.pending: list[dict] = []
        self.reported = False  # the start report (devices, mesh, memory) printed
        self.clock = (time.time(), 0, 0.0)

    def start_epoch(self) -> None:
        self.clock = (time.time(), 0, 0.0)

    def add(self, event: dict, bar=None) -> None:
        self.pending.append(event)
        if len(self.pending) >= self.every:
            self.flush(bar)

    def flush(self, bar=None) -> None:
        if not self.pending:
            return
        losses = jax.device_get([e.pop("losses") for e in self.pending])
        t0, tokens, flops = self.clock
        elapsed = max(time.time() - t0, 1e-9)
        for e, step_losses in zip(self.pending, losses):
            tokens += e.pop("tokens")
            flops += e.pop("flops", 0.0)
            mfu = {"train/mfu": flops / elapsed / self.peak} if self.peak else {}
            self.sink.log({**e, **{f"train/{k}": float(v) for k, v in step_losses.items()},
                           "train/tokens_per_s": tokens / elapsed, **mfu})
        self.clock = (t0, tokens, flops)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(losses[-1]['loss']):.4f}", tok_s=f"{tokens / elapsed:.0f}",
                            **({"mfu": f"{flops / elapsed / self.peak:.3f}"} if self.peak else {}))
        self.pending = []


def report_start(run: Run, batch) -> dict:
    """Prints the devices, the mesh, the micro-batch and the step's per-device memory (XLA's
    analysis of the compiled step at the first batch's shape; `coconut_jax.plan` computes the
    same before a run). Compiling here is the first step's compilation, not an extra one."""
    c, mesh = run.c, run.ctx.mesh
    rows, width = len(batch.indices) * jax.process_count(), batch.width
    mem = costs.step_memory(run.model, run.state.layout, run.state.update_fn, run.cur.spec,
                            costs.global_shapes(mesh, batch.arrays(), jax.process_count()),
                            prefix_len=batch.prefix_len, n_latent=batch.n_latent, loss_chunk=c.loss_chunk)
    dev = jax.devices()[0]
    per = rows // run.ctx.data_devices
    run.ctx.say(f"devices: {jax.device_count()} x {dev.device_kind} ({jax.process_count()} process(es)); mesh data="
                f"{mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}; micro-batch {rows} x "
                f"{width} tokens ({per} rows per data-parallel device; "
                f"{c.gradient_accumulation_steps} micro-batch(es) per step)")
    run.ctx.say("step memory per device: " + ", ".join(f"{k[:-3]} {v:.3g}" for k, v in mem.items()) + " GiB")
    return mem


def train_steps(run: Run, plan, stage: int, losses: LossLog, preemption: Preemption, progress: Callable) -> bool:
    """The optimizer steps of an epoch from `run.at.batch_in_epoch` on. Saves every
    `checkpoint_every_steps` within the epoch; on an agreed preemption saves and returns True."""
    c, at = run.c, run.at
    accum = c.gradient_accumulation_steps
    starts = list(range(at.batch_in_epoch, len(plan), accum))

    def micro(start):  # the micro-batches of the optimizer step starting at `start`
        return range(start, min(start + accum, len(plan)))

    def make(k):
        batch = plan.batch(k)
        return batch, run.put(batch), batch.token_count() * jax.process_count()
    if starts and not losses.reported:
        report_start(run, plan.batch(starts[0]))
        losses.reported = True
    base = jax.random.key(c.seed)
    bar = progress(starts, desc=f"epoch {at.epoch + 1}/{c.num_epochs} stage {stage}", total=len(starts))
    losses.start_epoch()
    with feed.Prefetch(make, (k for s in starts for k in micro(s)), depth=c.prefetch_batches) as batches:
        for start in bar:
            tokens, flops = [0], [0.0]

            def micro_batches():
                for _ in micro(start):
                    batch, arrays, n = next(batches)
                    tokens[0] += n
                    if losses.peak:
                        flops[0] += costs.model_flops(run.model, n, batch.width)
                    yield batch, arrays
            step_losses = steps.train_step(run.state, micro_batches(), method=run.cur.spec, base_key=base,
                                           step=at.step, loss_chunk=c.loss_chunk)
            at.step += 1
            at.batch_in_epoch = micro(start).stop
            losses.add({"step": at.step, "epoch": at.epoch + 1, "stage": stage, "losses": step_losses,
                        "tokens": tokens[0], "flops": flops[0] / jax.device_count()}, bar)
            stop = preemption.agreed()
            if stop or (c.checkpoint_every_steps and at.step % c.checkpoint_every_steps == 0
                        and at.batch_in_epoch < len(plan)):
                losses.flush()  # the metrics count a checkpoint records includes every finished step
                save(run, end_of_epoch=False)
                if stop:
                    if run.ctx.ckpt is not None:
                        run.ctx.ckpt.wait()
                    run.ctx.say(f"SIGTERM: saved step {at.step}, exiting")
                    return True
    losses.flush(bar)
    return False


def train_epoch(run: Run, evaluator, losses: LossLog, preemption: Preemption, progress: Callable) -> dict | None:
    """One epoch: its steps, the evaluation at its end, the end-of-epoch checkpoint (best.json
    when the accuracy improved). None when preempted."""
    c, at = run.c, run.at
    epoch, stage = at.epoch, run.cur.stage(at.epoch)
    plan = run.plan(run.train_examples, stage, epoch)
    if c.reset_optimizer and at.batch_in_epoch == 0:
        run.state.reset_optimizer()
    if train_steps(run, plan, stage, losses, preemption, progress):
        return None
    result = evaluator(stage, eval_loss=True)
    at.epoch, at.batch_in_epoch = epoch + 1, 0
    improved = at.best_acc is None or result["eval/acc"] > at.best_acc
    at.best_acc = result["eval/acc"] if improved else at.best_acc
    stage_end = run.cur.stage(at.epoch) != stage or at.epoch == c.num_epochs
    if not c.save_only_improve or improved or stage_end:
        losses.flush()
        save(run, end_of_epoch=True, eval_acc=result["eval/acc"], best=improved)
    return result


def fit(run: Run, evaluator, progress: Callable | None = None) -> dict:
    """Every epoch from where the run is to `num_epochs` (or a preemption); then the checkpoints
    are closed, wandb finished, and the stage table and curves written. The last evaluation."""
    ctx = run.ctx
    progress = progress or progress_bar(ctx.main)
    losses = LossLog(ctx.sink, run.c.log_every_steps, costs.peak_flops(jax.devices()[0].device_kind)
                     if jax.default_backend() != "cpu" else None)
    preemption = Preemption()
    result, stopped = {}, False
    while run.at.epoch < run.c.num_epochs:
        out = train_epoch(run, evaluator, losses, preemption, progress)
        if out is None:
            stopped = True
            break
        result = out
    if ctx.ckpt is not None:
        ctx.ckpt.close()
    if ctx.sink.wandb_run is not None:
        ctx.sink.wandb_run.finish()
    if ctx.main and ctx.writes and not stopped:
        from coconut_jax.plot import plot_metrics
        path = os.path.join(run.run_dir, "metrics.jsonl")
        print("\n" + stage_table(path) + f"\ncurves: {plot_metrics(path)}")
    return result
