"""Orbax checkpoints of a run: params, optimizer state and the loop position, saved atomically.

Layout: `{run_dir}/checkpoints/{step}/` with items `state` (params + optimizer state) and
`meta` (epoch, batch in epoch, stage, step, metrics-file length, best accuracy, method, model
shape). Retention: every end-of-epoch checkpoint is kept (the reference keeps one per epoch),
the newest mid-epoch one until the epoch ends, and `best.json` names the best by accuracy.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from coconut_jax.files import write_atomic

BEST_FILE = "best.json"


class Checkpoints:
    """The checkpoints a run writes. Every process calls save/restore (Orbax coordinates them).

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and
    Orbax writes them in the background under a temporary name, renamed when complete (a
    step directory is whole or absent). What depends on a finished step — deleting the
    mid-epoch steps an epoch end supersedes, naming the best step in best.json — runs
    when it has finished: at the next save, `wait()` or `close()`.
    """

    def __init__(self, ckpt_dir: str, main: bool = True, asynchronous: bool = True):
        self.dir = os.path.abspath(ckpt_dir)
        self.main = main
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=asynchronous))
        self._after: list = []  # actions waiting for the step being written

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, *, end_of_epoch: bool = False,
             best_acc: float | None = None) -> None:
        """Starts writing `step`; once written, an end of epoch drops older mid-epoch steps and
        `best_acc` (when given) names this step in best.json."""
        self.wait()
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave({**meta, "end_of_epoch": end_of_epoch})), force=True)
        if end_of_epoch:
            self._after.append(lambda: self.drop_mid_epoch(step))
        if best_acc is not None:
            self._after.append(lambda: self.mark_best(step, best_acc))

    def wait(self) -> None:
        """Blocks until the last save is on disk, then runs what waited for it."""
        self.manager.wait_until_finished()
        after, self._after = self._after, []
        for action in after:
            action()

    def drop_mid_epoch(self, keep_step: int) -> None:
        """Deletes mid-epoch checkpoints older than `keep_step` (an end-of-epoch one)."""
        for step in self.manager.all_steps():
            if step < keep_step and not read_meta(self.dir, step).get("end_of_epoch"):
                self.manager.delete(step)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def mark_best(self, step: int, acc: float) -> None:
        """Names `step` in best.json (process 0 writes; atomic, so a reader never sees half a file)."""
        if not self.main:
            return
        write_atomic(os.path.join(self.dir, BEST_FILE), json.dumps({"step": step, "acc": acc}))

    def close(self) -> None:
        self.wait()
        self.manager.close()


# -- reading any run's checkpoints (a hand-off between runs) ------------------------------------

def is_checkpoint_dir(path: str) -> bool:
    """An Orbax step directory of ours (`.../checkpoints/{step}`) or a run's `checkpoints` dir."""
    return os.path.isdir(os.path.join(path, "state")) or (
        os.path.isdir(path) and (os.path.isfile(os.path.join(path, BEST_FILE)) or bool(steps(path))))


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
    """(run-level checkpoints dir, step or None) of a user-given checkpoint path."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None


def steps(ckpt_dir: str) -> list[int]:
    """Finished steps, oldest first (Orbax writes a step under a temporary name, then renames it)."""
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state")))


def best_step(ckpt_dir: str) -> int | None:
    """The step best.json names, if it still exists."""
    path = os.path.join(ckpt_dir, BEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        step = json.load(f)["step"]
    return step if step in steps(ckpt_dir) else None


def read_meta(ckpt_dir: str, step: int) -> dict:
    path = os.path.join(ckpt_dir, str(step), "meta", "metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.join(ckpt_dir, str(step))}: not a checkpoint of coconut_jax (no meta)")
    with open(path) as f:
        return json.load(f)


def _reader(ckpt_dir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def param_shapes(ckpt_dir: str, step: int) -> dict:
    """The stored params' shapes ({name: ... tuple}), read from the metadata alone."""
    tree = _reader(ckpt_dir).item_metadata(step)["state"]["params"]
    return jax.tree.map(lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, "shape"))


def load_params(ckpt_dir: str, step: int) -> dict:
    """The params of a step as host NumPy arrays at their stored shapes (no optimizer state)."""
    shapes = param_shapes(ckpt_dir, step)
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes,
                                     is_leaf=lambda s: isinstance(s, tuple))}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = _reader(ckpt_dir).restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
    return out["state"]["params"]
