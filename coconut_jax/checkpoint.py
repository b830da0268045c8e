"""Orbax checkpoints of a run: params, optimizer state and the loop position, saved atomically.

Layout: `{run_dir}/checkpoints/{step}/` with items `state` (params + optimizer state) and
`meta` (epoch, batch in epoch, stage, step, metrics-file length, best accuracy). Retention:
every end-of-epoch checkpoint is kept (the reference keeps one per epoch), the newest
mid-epoch one until the epoch ends, and `best.json` names the best by accuracy.
"""
from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, ckpt_dir: str):
        self.dir = os.path.abspath(ckpt_dir)
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def drop_mid_epoch(self, keep_step: int) -> None:
        """Deletes mid-epoch checkpoints older than `keep_step` (an end-of-epoch one)."""
        for step in self.manager.all_steps():
            if step < keep_step and not self.meta(step).get("end_of_epoch"):
                self.manager.delete(step)

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def mark_best(self, step: int, acc: float) -> None:
        tmp = os.path.join(self.dir, "best.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "acc": acc}, f)
        os.replace(tmp, os.path.join(self.dir, "best.json"))

    def close(self) -> None:
        self.manager.close()


def is_checkpoint_dir(path: str) -> bool:
    """An Orbax step directory of ours (`.../checkpoints/{step}`) or a run's `checkpoints` dir."""
    return os.path.isdir(os.path.join(path, "state")) or (
        os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path)))


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
    """(run-level checkpoints dir, step or None for latest) of a user-given checkpoint path."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None
