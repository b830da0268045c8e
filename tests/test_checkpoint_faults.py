"""Damaged checkpoints and failed writes: what a run does with each, exactly.

In process, on a small state with fixed values (the same bytes on every machine): damage to
each part of a step is found and the step is moved aside; a hand-off never falls back; a write
that fails leaves what was there. Through the CLI: the issue's case (a damaged file in the
newest step) resumes from the one before and ends as the uninterrupted run ends, and a run whose
checkpoints directory turns read-only stops with one line and resumes on the next start.
"""
import glob
import json
import os
import random
import shutil
import subprocess

import jax
import numpy as np
import optax
import pytest

from coconut_jax import checkpoint, config as config_lib, files, hf, metrics, rundir, optimizer, sharding, steps, weights
from coconut_jax.models.gpt2 import GPT2Model
from tests.conftest import ROOT, assert_first_epochs_match, cli_command, run_cli, stored_params


@pytest.fixture(scope="module")
def state(tiny_dir):
    """The tiny model's params (seeded, so fixed bytes) and moments that are functions of them."""
    config, params = hf.load_pretrained(tiny_dir)
    s = steps.TrainState(GPT2Model(config), params, sharding.make_mesh(), optimizer.make_optimizer(config_lib.base_config()))
    adam = s.opt_state[0]
    s.opt_state = (adam._replace(count=adam.count + 3, mu=jax.tree.map(lambda p: p * 0.5, s.params),
                                 nu=jax.tree.map(lambda p: p * p, s.params)), *s.opt_state[1:])
    return s


@pytest.fixture(scope="module")
def saved(state, tmp_path_factory):
    """Steps 4 (accuracy 0.5) and 8 (0.7, the best) of a run, as the trainer writes them."""
    d = str(tmp_path_factory.mktemp("saved") / "checkpoints")
    ck = checkpoint.Checkpoints(d)
    for step, acc in ((4, 0.5), (8, 0.7)):
        ck.save(step, state.checkpoint_tree(), {"step": step, "method": "coconut", "eval_acc": acc},
                end_of_epoch=True, best_acc=acc)
    ck.close()
    return d


def _copy(saved, tmp_path):
    d = str(tmp_path / "checkpoints")
    shutil.copytree(saved, d)
    return d


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def _restore_newest(d, state):
    lines = []
    ck = checkpoint.Checkpoints(d)
    step = ck.newest_readable(lines.append)
    got = ck.restore_newest(state.abstract(), lines.append) if step is not None else None
    ck.close()
    return got, lines


def _overwrite(path, data):
    with open(path, "wb") as f:
        f.write(data)


DAMAGE = {
    "meta (JSON)": lambda step: _overwrite(f"{step}/meta/metadata", b'{"step": 8, "epo'),
    "sharding file": lambda step: _overwrite(f"{step}/state/_sharding", random.Random(0).randbytes(100)),
    "array metadata": lambda step: _overwrite(f"{step}/state/_METADATA", random.Random(1).randbytes(100)),
    "array index": lambda step: _overwrite(f"{step}/state/manifest.ocdbt", random.Random(2).randbytes(100)),
    # An interrupted copy: no commit markers, every data file cut to half its bytes. (Cutting
    # only some files is not certain damage: the data files are named at random and some hold
    # nothing the restore reads.)
    "truncated": lambda step: (
        [os.remove(p) for p in glob.glob(f"{step}/**/commit_success.txt", recursive=True)],
        [_overwrite(p, open(p, "rb").read()[: os.path.getsize(p) // 2])
         for p in glob.glob(f"{step}/state/**/d/*", recursive=True)]),
}


@pytest.mark.parametrize("part", list(DAMAGE))
def test_a_damaged_step_is_moved_aside_and_the_one_before_restores(saved, state, tmp_path, part):
    d = _copy(saved, tmp_path)
    DAMAGE[part](os.path.join(d, "8"))
    (step, restored, meta), lines = _restore_newest(d, state)
    assert step == 4 and meta["step"] == 4 and _equal(restored, {"params": state.params, "opt_state": state.opt_state})
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint {d}/8 is damaged (") and "\n" not in lines[0]
    assert lines[0].endswith("moved aside to 8.damaged")
    assert sorted(os.listdir(d)) == ["4", "8.damaged", "best.json"]  # nothing deleted
    # best.json named 8: it now names the best step left, by its recorded accuracy.
    assert json.load(open(os.path.join(d, "best.json"))) == {"step": 4, "acc": 0.5}


@pytest.mark.slow
def test_every_flipped_data_byte_is_found_or_harmless(saved, state, tmp_path):
    """One flipped byte (a tenth, two tenths, ... nine tenths into each data file, in turn): the
    step is moved aside (Orbax's decoding or our checksums), or it restores exactly what was
    saved; never other values. Orbax alone restores some flips silently with wrong values: the
    checksums catch those, in the params and in the optimizer's moments. (Which arrays a data
    file holds, in which order, depends on the writes' timing: with three flips per file a busy
    machine once left no params flip among those only the checksums catch.)"""
    caught = []
    data_files = sorted(os.path.relpath(p, saved) for p in glob.glob(f"{saved}/8/state/**/d/*", recursive=True))
    assert data_files
    for i, (rel, at) in enumerate((rel, at) for rel in data_files for at in np.arange(1, 10) / 10):
        d = _copy(saved, tmp_path / str(i))
        path = os.path.join(d, rel)
        b = bytearray(open(path, "rb").read())
        b[int(len(b) * at)] ^= 0x01
        _overwrite(path, bytes(b))
        (step, restored, _), lines = _restore_newest(d, state)
        if step == 8:
            assert not lines and _equal(restored, {"params": state.params, "opt_state": state.opt_state}), rel
        else:
            assert step == 4 and len(lines) == 1 and "is damaged" in lines[0], rel
            caught.append(lines[0].split(" is damaged ")[1])
        shutil.rmtree(d)
    print("\n".join(caught))
    by_checksum = [line for line in caught if "does not match its checksum" in line]
    assert any(line.startswith("(params/") for line in by_checksum), caught
    assert any(line.startswith("(opt_state/") for line in by_checksum), caught


def test_a_changed_array_fails_its_checksum(saved, state, tmp_path):
    """The comparison itself: a stored checksum that differs names the array."""
    d = _copy(saved, tmp_path)
    meta_path = os.path.join(d, "8", "meta", "metadata")
    meta = json.load(open(meta_path))
    meta["fingerprint"]["params/h/0/c_fc/kernel"][1] += 1
    _overwrite(meta_path, json.dumps(meta).encode())
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"params/h/0/c_fc/kernel does not match its checksum"):
        checkpoint.Checkpoints(d).restore(8, state.abstract())
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"params/h/0/c_fc/kernel does not match its checksum"):
        checkpoint.load_params(d, 8)


def test_no_step_restores_is_one_error_and_nothing_is_deleted(saved, state, tmp_path):
    d = _copy(saved, tmp_path)
    for step in ("4", "8"):
        DAMAGE["sharding file"](os.path.join(d, step))
    with pytest.raises(checkpoint.NoGoodCheckpoint, match=r"no checkpoint restores \(2 moved aside as \*\.damaged"):
        _restore_newest(d, state)
    assert sorted(os.listdir(d)) == ["4.damaged", "8.damaged"]  # best.json named a damaged step: gone


def test_a_whole_step_of_other_settings_is_not_called_damaged(saved, state, tmp_path):
    """Another optimizer's state (a setting changed between restarts) is the run's mistake, not
    damage: one line, and the checkpoints stay as they are."""
    d = _copy(saved, tmp_path)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    other = steps.TrainState(state.model, None, state.mesh, tx)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"checkpoints/8: its arrays do not fit this run's settings"):
        checkpoint.Checkpoints(d).restore_newest(other.abstract(), print)
    assert sorted(os.listdir(d)) == ["4", "8", "best.json"]


# -- a hand-off takes the weights named, or none --------------------------------------------------

def test_hand_off_from_a_damaged_best_step_is_one_line(saved, tiny_dir, tmp_path):
    d = _copy(saved, tmp_path)
    DAMAGE["sharding file"](os.path.join(d, "8"))
    tok = hf.load_tokenizer(tiny_dir)
    for path in (d, os.path.join(d, "8")):  # the best step by best.json, and the step named
        source = weights.source_of(path)
        assert source.step == 8
        with pytest.raises(rundir.RunDirError) as e:
            weights.load(source, tiny_dir, "coconut", tok)
        assert f"load_model_path={d}/8" in str(e.value) and "damaged checkpoint" in str(e.value)
        assert "\n" not in str(e.value)
    DAMAGE["meta (JSON)"](os.path.join(d, "4"))
    with pytest.raises(rundir.RunDirError, match=r"load_model_path=.*/4 \(the step named\): damaged checkpoint \(meta"):
        weights.load(weights.source_of(os.path.join(d, "4")), tiny_dir, "coconut", tok)


def test_hand_off_never_takes_another_step_than_best_json_names(saved, tmp_path):
    d = _copy(saved, tmp_path)
    shutil.rmtree(os.path.join(d, "8"))
    with pytest.raises(rundir.RunDirError, match=r"best.json names step 8, which is not there; name a step \(one of \[4\]\)"):
        weights.source_of(d)
    os.rename(os.path.join(d, "4"), os.path.join(d, "4.damaged"))
    with pytest.raises(rundir.RunDirError, match="a damaged checkpoint, moved aside"):
        weights.source_of(os.path.join(d, "4.damaged"))


# -- writes that fail leave the last good state ----------------------------------------------------

def test_a_save_that_raises_is_one_line_and_leaves_the_steps_before(saved, state, tmp_path, monkeypatch):
    d = _copy(saved, tmp_path)
    best = open(os.path.join(d, "best.json")).read()
    ck = checkpoint.Checkpoints(d)

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck.manager, "save", no_space)
    with pytest.raises(files.WriteError, match=r"checkpoints/12: checkpoint not written \(OSError: No space left on device\)"):
        ck.save(12, state.checkpoint_tree(), {"step": 12}, end_of_epoch=True, best_acc=0.9)
    assert checkpoint.steps(d) == [4, 8] and open(os.path.join(d, "best.json")).read() == best


def test_a_background_write_that_fails_names_its_step_and_runs_nothing_after_it(saved, state, tmp_path, monkeypatch):
    """The write fails after `save` returned: `wait` says so, and best.json and the retention
    that wait for the step do not run."""
    d = _copy(saved, tmp_path)
    best = open(os.path.join(d, "best.json")).read()
    ck = checkpoint.Checkpoints(d)
    ck.save(12, state.checkpoint_tree(), {"step": 12}, end_of_epoch=True, best_acc=0.9)

    def removed(*a, **k):
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(ck.manager, "wait_until_finished", removed)
    with pytest.raises(files.WriteError, match=r"checkpoints/12: checkpoint not written \(FileNotFoundError"):
        ck.wait()
    assert open(os.path.join(d, "best.json")).read() == best


def test_a_metrics_line_that_fails_midway_is_cut_back_off(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    sink = metrics.MetricsSink(path)
    sink.log({"step": 1})
    real_open = open

    class HalfThenFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: HalfThenFull(real_open(p, *a, **k)) if p == path
                        else real_open(p, *a, **k))
    with pytest.raises(files.WriteError, match=r"metrics.jsonl: not written \(OSError: No space left on device\)"):
        sink.log({"step": 2, "train/loss": 1.25})
    monkeypatch.undo()
    assert open(path).read() == '{"step": 1}\n' and sink.count == 1


def test_an_atomic_write_into_a_removed_directory_leaves_nothing(tmp_path):
    gone = tmp_path / "run"
    with pytest.raises(files.WriteError, match=r"predictions_epoch1.jsonl: not written \(FileNotFoundError"):
        files.write_atomic(str(gone / "predictions_epoch1.jsonl"), "x")
    path = tmp_path / "best.json"
    path.write_text("old")
    real_replace = os.replace

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")
    os.replace = refuse
    try:
        with pytest.raises(files.WriteError, match="Permission denied"):
            files.write_atomic(str(path), "new")
    finally:
        os.replace = real_replace
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["best.json"]


# -- through the CLI -------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_a_damaged_newest_step_resumes_from_the_one_before_and_ends_as_uninterrupted(tiny_run, tmp_path):
    """The issue's case: one file of the newest checkpoint overwritten with 100 random bytes.
    The same command moves it aside with one line, redoes the last epoch from the step before,
    and logs and stores what the uninterrupted run did."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    DAMAGE["sharding file"](str(run / "checkpoints" / "12"))
    r = run_cli(tmp_path)
    damaged = [line for line in r.stdout.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith(f"checkpoint {run}/checkpoints/12 is damaged (")
    assert f"resumed from {run}/checkpoints/8: epoch 3, batch 0" in r.stdout and "Traceback" not in r.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["12", "12.damaged", "4", "8", "best.json"]
    assert_first_epochs_match(tiny_run, run, epochs=3, tol=0)
    assert _equal(stored_params(tiny_run), stored_params(run))
    best = json.load(open(run / "checkpoints" / "best.json"))["step"]
    assert best in checkpoint.steps(str(run / "checkpoints"))


def _can_mount_read_only(path):
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{path}" "{path}"'], capture_output=True)
    return probe.returncode == 0


def _files(d):
    return {p: open(p, "rb").read() for p in sorted(glob.glob(f"{d}/**", recursive=True)) if os.path.isfile(p)}


@pytest.mark.slow
def test_a_read_only_checkpoints_directory_stops_the_run_with_one_line_then_it_resumes(tiny_run, tmp_path):
    """The run's checkpoints directory is mounted read-only (a private mount namespace, so this
    holds for root too): training one more epoch ends at its save with one line naming the step,
    exit 2, the steps and best.json as they were; the next start resumes from the newest step."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints"
    if shutil.which("unshare") is None or not _can_mount_read_only(ckpt):
        pytest.skip("no user and mount namespaces here (unshare -rm) to make a read-only directory")
    before = _files(ckpt)
    cmd, env = cli_command(tmp_path, "--config.num_epochs=4")
    script = f'mount --bind -o ro "{ckpt}" "{ckpt}" && exec "$@"'
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{ckpt}/16: checkpoint not written (" in errors[0], r.stderr[-2000:]
    assert "Read-only file system" in errors[0] and "Traceback" not in r.stderr
    assert _files(ckpt) == before
    r = run_cli(tmp_path, "--config.num_epochs=4")
    assert f"resumed from {ckpt}/12: epoch 4, batch 0" in r.stdout
    assert checkpoint.steps(str(ckpt)) == [4, 8, 12, 16]
    ref = metrics.read_metrics(os.path.join(tiny_run, "metrics.jsonl"))
    got = metrics.read_metrics(run / "metrics.jsonl")
    assert [e.get("train/loss") for e in got[:len(ref)]] == [e.get("train/loss") for e in ref]
    assert [e["epoch"] for e in got[len(ref):]] == [4] * (len(got) - len(ref)) and got[-1].get("eval/acc") is not None
