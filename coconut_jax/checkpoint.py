"""Orbax checkpoints of a run: params, optimizer state and the loop position, saved atomically,
verified when read back.

Layout: `{run_dir}/checkpoints/{step}/` with items `state` (params + optimizer state) and
`meta` (epoch, batch in epoch, stage, step, metrics-file length, best accuracy, the epoch's
accuracy at an epoch end, method, and a checksum of every stored array). Retention: every
end-of-epoch checkpoint is kept (the reference keeps one per epoch), the newest mid-epoch one
until the epoch ends, and `best.json` names the best by accuracy.

Damage (a failing disk, an interrupted copy between machines) is found when a step is read
back: its metadata must parse, its arrays must decode, and each array must match the checksum
stored with it (Orbax alone restores a flipped bit in a data file without a word). A run's own
damaged step is renamed `{step}.damaged` (never deleted) and the next newest is tried; a write
that fails is one `WriteError` naming the step, and leaves the steps before it as they were.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from coconut_jax import files, hosts
from coconut_jax.files import WriteError, cause

BEST_FILE = "best.json"
DAMAGED = ".damaged"
COMMIT_FILE = "commit_success.txt"  # what Orbax writes last into a step in a bucket


class CheckpointFault(Exception):
    """A checkpoint that cannot be used as it is; the message is one line."""


class DamagedCheckpoint(CheckpointFault):
    """A step that does not read back as it was written."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: damaged checkpoint ({why})")
        self.path, self.why = path, why


class CheckpointMismatch(CheckpointFault):
    """A whole step whose stored arrays do not fit what this run's settings build."""


class NoGoodCheckpoint(CheckpointFault):
    """Every step of a run's checkpoints is damaged."""


# -- checksums: order-free, so a checkpoint resharded onto another mesh verifies the same ------

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _arrays(tree) -> dict:
    """{"params/h/0/c_fc/kernel": array} of the array leaves of a tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): x for p, x in leaves if hasattr(x, "dtype") and hasattr(x, "shape")}


@jax.jit
def _device_sums(arrays: dict) -> dict:
    # The bits of every element summed modulo 2**32: integer addition in any order gives the
    # same figure, whatever the sharding; any one changed element changes it.
    return {k: jnp.sum(jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32),
                       dtype=jnp.uint32) for k, x in arrays.items()}


def fingerprint(tree) -> dict:
    """{path: [dtype, checksum]} of every array of a tree of device arrays."""
    arrays = _arrays(tree)
    sums = jax.device_get(_device_sums(arrays))
    return {k: [str(arrays[k].dtype), int(sums[k])] for k in arrays}


def host_fingerprint(tree) -> dict:
    """`fingerprint` of host NumPy arrays (the same figures)."""
    out = {}
    for k, x in _arrays(tree).items():
        bits = np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))
        out[k] = [str(x.dtype), int(np.sum(bits, dtype=np.uint64) % (1 << 32))]
    return out


def check_fingerprint(got: dict, stored: dict | None, where: str, prefix: str = "") -> None:
    """Raises DamagedCheckpoint naming the first array whose checksum differs. Arrays read at
    another dtype than stored (the run's `param_dtype` changed) cannot be compared."""
    for path, (dtype, value) in (stored or {}).items():
        if path.startswith(prefix) and path in got and got[path][0] == dtype and got[path][1] != value:
            raise DamagedCheckpoint(where, f"{path} does not match its checksum")


class Checkpoints:
    """The checkpoints a run writes. Every process calls save/restore (Orbax coordinates them).

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and
    Orbax writes them in the background under a temporary name, renamed when complete (a
    step directory is whole or absent). What depends on a finished step — deleting the
    mid-epoch steps an epoch end supersedes, naming the best step in best.json — runs
    when it has finished: at the next save, `wait()` or `close()`. A write that fails raises
    `WriteError` there, before anything that depends on it runs.
    """

    def __init__(self, ckpt_dir: str, main: bool = True, asynchronous: bool = True):
        self.dir = files.abspath(ckpt_dir)
        self.main = main
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=asynchronous))
        self._after: list = []  # actions waiting for the step being written
        self._writing: int | None = None

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def _write_error(self, step, e: BaseException) -> WriteError:
        return WriteError(f"{os.path.join(self.dir, str(step))}: checkpoint not written ({cause(e)}); the steps "
                          f"before it are intact, and the same command resumes from the newest of them")

    def _check_writable(self, step: int) -> None:
        """A directory that cannot be written (read-only, no permission, removed under the run)
        fails here, in the caller's thread, before Orbax's background writers start: they would
        each log the failure and wait minutes for one another before the process could exit."""
        probe = os.path.join(self.dir, f".writable.{os.getpid()}")
        try:
            files.write_atomic(probe, str(step))
            files.remove(probe)
        except (OSError, WriteError) as e:
            raise self._write_error(step, e) from e

    def save(self, step: int, state: dict, meta: dict, *, end_of_epoch: bool = False,
             best_acc: float | None = None) -> None:
        """Starts writing `step` (`state`: a `TrainState.checkpoint_tree()`, {"params",
        "opt_state"} and the method's "parts" if any); once written, an end of epoch drops
        older mid-epoch steps and `best_acc` (when given) names this step in best.json."""
        self.wait()
        self._check_writable(step)
        meta = {**meta, "end_of_epoch": end_of_epoch, "fingerprint": fingerprint(state)}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._write_error(step, e) from e
        self._writing = step
        if end_of_epoch:
            self._after.append(lambda: self.drop_mid_epoch(step))
        if best_acc is not None:
            self._after.append(lambda: self.mark_best(step, best_acc))

    def wait(self) -> None:
        """Blocks until the last save is on disk, then runs what waited for it."""
        step, self._writing = self._writing, None
        after, self._after = self._after, []
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from e
        for action in after:
            try:
                action()
            except OSError as e:
                raise WriteError(f"{self.dir}: after writing step {step} ({cause(e)})") from e

    def drop_mid_epoch(self, keep_step: int) -> None:
        """Deletes mid-epoch checkpoints older than `keep_step` (an end-of-epoch one). A step
        whose metadata does not read is left for a restore to judge."""
        for step in self.manager.all_steps():
            if step < keep_step:
                try:
                    mid_epoch = not read_meta(self.dir, step).get("end_of_epoch")
                except (OSError, ValueError):
                    continue
                if mid_epoch:
                    self.manager.delete(step)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """(state, meta) of `step`, verified: DamagedCheckpoint if it does not read back as
        written, CheckpointMismatch if it is whole but not of this run's shapes."""
        where = os.path.join(self.dir, str(step))
        stored = stored_arrays(self.dir, step)
        expected = {k: tuple(x.shape) for k, x in _arrays(abstract_state).items()}
        diff = [f"{k} {stored[k][0] if k in stored else None} vs {expected.get(k)}"
                for k in sorted(set(stored) | set(expected)) if k not in stored or stored[k][0] != expected.get(k)]
        if diff:
            raise CheckpointMismatch(f"{where}: its arrays do not fit this run's settings ({len(diff)} differ: "
                                     f"{'; '.join(diff[:3])}); was the optimizer or the model changed?")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise DamagedCheckpoint(where, cause(e)) from e
        check_fingerprint(fingerprint(out["state"]), out["meta"].get("fingerprint"), where)
        return out["state"], out["meta"]

    def newest_readable(self, say: Callable[[str], None]) -> int | None:
        """The newest step whose array metadata reads, each unreadable newer one moved aside;
        None when there is no checkpoint at all."""
        found = sorted(self.manager.all_steps(), reverse=True)
        for step in found:
            try:
                stored_arrays(self.dir, step)
                error = None
            except DamagedCheckpoint as e:
                error = e
            if hosts.all_agree(error is None):
                return step
            self.set_aside(step, error or self._elsewhere(step), say)
        if found:
            raise self._none_restores(len(found))
        return None

    def restore_newest(self, abstract_state: dict, say: Callable[[str], None]) -> tuple[int, dict, dict]:
        """(step, state, meta) of the newest step that restores whole; each damaged newer one
        is moved aside. NoGoodCheckpoint when none restores."""
        found = sorted(self.manager.all_steps(), reverse=True)
        for step in found:
            try:
                state, meta = self.restore(step, abstract_state)
                error = None
            except DamagedCheckpoint as e:
                error = e
            if hosts.all_agree(error is None):
                return step, state, meta
            self.set_aside(step, error or self._elsewhere(step), say)
        raise self._none_restores(len(found))

    def _elsewhere(self, step: int) -> DamagedCheckpoint:
        return DamagedCheckpoint(os.path.join(self.dir, str(step)), "did not read back on another host")

    def _none_restores(self, n: int) -> NoGoodCheckpoint:
        return NoGoodCheckpoint(f"{self.dir}: no checkpoint restores ({n} moved aside as *{DAMAGED}, kept); the "
                                f"same command now starts the run over")

    def set_aside(self, step: int, error: DamagedCheckpoint, say: Callable[[str], None]) -> None:
        """Renames a damaged step `{step}.damaged` (nothing is deleted) and keeps best.json off it.
        (In a bucket the rename is a copy, then a delete: interrupted, the step is found damaged
        again and moved aside again, to `{step}.damaged.1`.)"""
        src = os.path.join(self.dir, str(step))
        dst, n = src + DAMAGED, 1
        while files.exists(dst):
            dst, n = f"{src}{DAMAGED}.{n}", n + 1
        if self.main:
            try:
                files.rename_tree(src, dst)
                self._repair_best(step)
            except (OSError, WriteError) as e:
                raise WriteError(f"{src}: damaged ({error.why}) and could not be moved aside ({cause(e)})") from e
        hosts.barrier(f"set_aside_{step}")
        self.manager.reload()
        say(f"checkpoint {src} is damaged ({error.why}); moved aside to {os.path.basename(dst)}")

    def _repair_best(self, gone: int) -> None:
        """If best.json named the step `gone`, names the best remaining end-of-epoch step by its
        recorded accuracy (the earliest of equals, as the run names them), or removes the file."""
        path = os.path.join(self.dir, BEST_FILE)
        try:
            named = json.loads(files.read_text(path))["step"]
        except (OSError, ValueError, KeyError):
            return
        if named != gone:
            return
        scored = []
        for step in steps(self.dir):
            try:
                acc = read_meta(self.dir, step).get("eval_acc")
            except (OSError, ValueError):
                continue
            if acc is not None:
                scored.append((acc, -step))
        if scored:
            acc, step = max(scored)
            files.write_atomic(path, json.dumps({"step": -step, "acc": acc}))
        else:
            files.remove(path)

    def mark_best(self, step: int, acc: float) -> None:
        """Names `step` in best.json (process 0 writes; atomic, so a reader never sees half a file)."""
        if not self.main:
            return
        files.write_atomic(os.path.join(self.dir, BEST_FILE), json.dumps({"step": step, "acc": acc}))

    def close(self) -> None:
        self.wait()
        self.manager.close()


# -- reading any run's checkpoints (a hand-off between runs) ------------------------------------

def is_checkpoint_dir(path: str) -> bool:
    """An Orbax step directory of ours (`.../checkpoints/{step}`) or a run's `checkpoints` dir."""
    return files.isdir(os.path.join(path, "state")) or (
        files.isdir(path) and (files.isfile(os.path.join(path, BEST_FILE)) or bool(steps(path))))


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
    """(run-level checkpoints dir, step or None) of a user-given checkpoint path."""
    path = files.abspath(path).rstrip("/")
    if files.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None


def steps(ckpt_dir: str) -> list[int]:
    """Finished steps, oldest first (on a disk Orbax writes a step under a temporary name, then
    renames it; in a bucket it writes the step in place and marks it finished with a commit file
    last; a damaged step moved aside is `{step}.damaged`)."""
    finished = ((lambda n: files.isfile(os.path.join(ckpt_dir, n, COMMIT_FILE))) if files.is_remote(ckpt_dir)
                else (lambda n: os.path.isdir(os.path.join(ckpt_dir, n, "state"))))
    return sorted(int(n) for n in files.listdir(ckpt_dir) if n.isdigit() and finished(n))


def best_named(ckpt_dir: str) -> int | None:
    """The step best.json names (whether or not it is still there), or None without the file."""
    path = os.path.join(ckpt_dir, BEST_FILE)
    if not files.isfile(path):
        return None
    return json.loads(files.read_text(path))["step"]


def read_meta(ckpt_dir: str, step: int) -> dict:
    path = os.path.join(ckpt_dir, str(step), "meta", "metadata")
    if not files.isfile(path):
        raise FileNotFoundError(f"{os.path.join(ckpt_dir, str(step))}: not a checkpoint of coconut_jax (no meta)")
    return json.loads(files.read_text(path))


def _reader(ckpt_dir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def _stored_tree(ckpt_dir: str, step: int) -> dict:
    try:
        return _reader(ckpt_dir).item_metadata(step)["state"]
    except Exception as e:
        raise DamagedCheckpoint(os.path.join(ckpt_dir, str(step)), cause(e)) from e


def stored_arrays(ckpt_dir: str, step: int) -> dict:
    """{path: (shape, dtype)} of every stored array, read from the metadata alone."""
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in _arrays(_stored_tree(ckpt_dir, step)).items()}


def param_shapes(ckpt_dir: str, step: int) -> dict:
    """The stored params' shapes ({name: ... tuple}), read from the metadata alone."""
    tree = _stored_tree(ckpt_dir, step)["params"]
    return jax.tree.map(lambda m: tuple(m.shape), tree, is_leaf=lambda m: hasattr(m, "shape"))


def stored_items(ckpt_dir: str, step: int) -> set[str]:
    """The top-level items of a step's state ("params", "opt_state", and "parts" when the
    run's method added modules of its own), from the metadata alone."""
    return set(_stored_tree(ckpt_dir, step))


def load_params(ckpt_dir: str, step: int, item: str = "params") -> dict:
    """The model's params of a step (or, with item="parts", the method's parts: {name:
    params}) as host float32 NumPy arrays at their stored shapes, no optimizer state, verified
    against their checksums."""
    where = os.path.join(ckpt_dir, str(step))
    tree = _stored_tree(ckpt_dir, step)[item]
    target = {item: jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree,
                                 is_leaf=lambda m: hasattr(m, "shape"))}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        out = _reader(ckpt_dir).restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
        stored = read_meta(ckpt_dir, step).get("fingerprint")
    except Exception as e:
        raise DamagedCheckpoint(where, cause(e)) from e
    params = out["state"][item]
    check_fingerprint(host_fingerprint({item: params}), stored, where, prefix=f"{item}/")
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)
