"""The training loop's own cost: seconds per optimizer step of the real loop against the bare
jitted step on the same batches.

    python benchmarks/train_loop.py [--config configs/tiny.py] [--repeats 5] [--epoch 1]

Builds the run of `--config` (its prepared data and model, under a temporary directory),
then times, interleaved `--repeats` times, one epoch of
  bare   the jitted accumulate + update on batches collated and put on the devices
         beforehand (nothing else: what the device needs)
  loop   `loop.train_steps`: collation and transfer (prefetched), dropout keys,
         loss logging to metrics.jsonl, the SIGTERM check
Both end with the params ready. Prints one JSON object: median seconds per step of each,
their spread, and loop/bare.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coconut_jax import config as config_lib, loop as loop_lib, steps  # noqa: E402
from coconut_jax.train import set_up  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epoch", type=int, default=1, help="which epoch's batches (its stage sets the thoughts)")
    p.add_argument("--train", type=int, default=256, help="training records of a prepared (demo) dataset")
    a = p.parse_args()
    c = config_lib.load_config_file(a.config)
    work = tempfile.mkdtemp(prefix="coconut_loop_")
    c.save_path, c.cache_dir, c.checkpoint_every_steps = work, os.path.join(work, "cache"), 0
    c.overlong = "skip"  # a longer generated record is not what this measures
    if c.prepare.kind:
        c.prepare.train = a.train
    run = set_up(c)
    run.at.epoch = a.epoch
    stage = run.cur.stage(a.epoch)
    plan = run.plan(run.train_examples, stage, a.epoch)
    accum = c.gradient_accumulation_steps
    n_steps = -(-len(plan) // accum)
    batches = [plan.batch(k) for k in range(len(plan))]
    on_device = [run.put(b) for b in batches]
    base = jax.random.key(c.seed)
    losses, preemption = loop_lib.LossLog(run.ctx.sink, c.log_every_steps), loop_lib.Preemption()

    def bare():
        for s in range(n_steps):
            ks = range(s * accum, min((s + 1) * accum, len(plan)))
            steps.train_step(run.state, ((batches[k], on_device[k]) for k in ks), method=run.cur.spec, base_key=base,
                             step=s, loss_chunk=c.loss_chunk)
        jax.block_until_ready(run.state.params)

    def loop():
        run.at.batch_in_epoch = 0
        loop_lib.train_steps(run, plan, stage, losses, preemption, lambda it, **kw: it)
        jax.block_until_ready(run.state.params)

    bare(), loop()  # compile every shape of the epoch
    times = {"bare": [], "loop": []}
    for _ in range(a.repeats):
        for name, fn in (("bare", bare), ("loop", loop)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n_steps)
    out = {"config": os.path.relpath(a.config, ROOT), "steps_per_epoch": n_steps, "micro_batch": run.ctx.micro,
           "device": jax.devices()[0].device_kind}
    for name, ts in times.items():
        out[f"{name}_s_per_step_median"] = float(np.median(ts))
        out[f"{name}_s_per_step_spread"] = [float(np.min(ts)), float(np.max(ts))]
    out["loop_over_bare"] = out["loop_s_per_step_median"] / out["bare_s_per_step_median"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
