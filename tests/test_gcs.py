"""Runs whose every path is `gs://`, against a local Cloud Storage emulator (the `gcs_bucket`
fixture): the file layer, a training run, SIGKILL and a damaged step, a hand-off, export and
generation. What only a real bucket shows (throughput, permissions) is in docs/launch.md."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint, files
from coconut_jax.metrics import read_metrics
from tests.conftest import ROOT, finish_processes, run_cli, start_processes, stored_params, subprocess_env
from tests.test_journeys import SIZES, _wait_for, without_speed, world  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gcs

COT = (*SIZES, "--config.num_epochs=2", "--config.checkpoint_every_steps=2")


def upload_world(world, prefix):
    """The tiny GSM data and model in the bucket; (train, valid, model) paths."""
    for split in ("train", "valid"):
        files.upload(world[f"gsm_{split}"], f"{prefix}/data/gsm_{split}.json")
    for name in os.listdir(world["model"]):
        files.upload(os.path.join(world["model"], name), f"{prefix}/model/{name}")
    return f"{prefix}/data/gsm_train.json", f"{prefix}/data/gsm_valid.json", f"{prefix}/model"


def bucket_args(world, prefix):
    train, valid, model = upload_world(world, prefix)
    return (f"--config.train_path={train}", f"--config.val_path={valid}", f"--config.model_id={model}",
            f"--config.save_path={prefix}/runs", f"--config.cache_dir={prefix}/cache")


def test_the_file_layer_on_a_bucket(gcs_bucket, tmp_path):
    root = f"{gcs_bucket}/{tmp_path.name}"
    files.write_atomic(f"{root}/a/run.json", '{"x": 1}')
    files.write_atomic(f"{root}/a/blob", b"\x00\x01")
    assert json.loads(files.read_text(f"{root}/a/run.json")) == {"x": 1}
    for i in range(3):  # the first line creates the file, the others are composed onto it
        files.append_line(f"{root}/a/metrics.jsonl", f"{i}\n")
    assert files.read_text(f"{root}/a/metrics.jsonl") == "0\n1\n2\n"
    assert sorted(files.listdir(f"{root}/a")) == ["blob", "metrics.jsonl", "run.json"]  # no part left over
    files.rename_tree(f"{root}/a", f"{root}/b")
    assert not files.exists(f"{root}/a/run.json") and files.isfile(f"{root}/b/blob")
    local = files.local_copy(f"{root}/b")
    assert open(os.path.join(local, "blob"), "rb").read() == b"\x00\x01"
    files.write_atomic(f"{root}/b/blob", b"\x02")  # a newer version of the object is fetched again
    assert open(os.path.join(files.local_copy(f"{root}/b"), "blob"), "rb").read() == b"\x02"
    with pytest.raises(files.WriteError, match="gs://no-such-bucket/x: not written"):
        files.write_atomic("gs://no-such-bucket/x", "y")


@pytest.fixture(scope="session")
def bucket_cot_run(gcs_bucket, world, tmp_path_factory):
    """configs/gsm_cot.py with data, model, cache and run directory in the bucket; (prefix, args, stdout)."""
    prefix = f"{gcs_bucket}/{tmp_path_factory.mktemp('cot').name}"
    args = (*bucket_args(world, prefix), *COT)
    r = run_cli(tmp_path_factory.mktemp("cwd"), *args, config="configs/gsm_cot.py")
    return prefix, args, r.stdout


def test_a_run_with_every_path_in_a_bucket(bucket_cot_run, tmp_path):
    """Data, model, token cache and the run directory in the bucket: the run trains, evaluates,
    checkpoints and writes its files there; another run's settings there are refused, and a
    bucket that cannot be written is one line."""
    prefix, args, out = bucket_cot_run
    run = f"{prefix}/runs/gsm-cot"
    assert {"run.json", "metrics.jsonl", "checkpoints", "curves.png", "predictions_epoch2.jsonl"} <= set(
        files.listdir(run))
    events = read_metrics(f"{run}/metrics.jsonl")
    assert [e["epoch"] for e in events if "eval/acc" in e] == [1, 2]
    ckpt = f"{run}/checkpoints"
    assert checkpoint.steps(ckpt) and checkpoint.best_named(ckpt) in checkpoint.steps(ckpt)
    caches = files.listdir(f"{prefix}/cache")
    assert any(files.isfile(f"{prefix}/cache/{c}/manifest.json") for c in caches)
    r = run_cli(tmp_path, *args, "--config.seed=7", config="configs/gsm_cot.py", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {run} holds another run")
    gone = "gs://no-such-bucket/runs"  # a write that fails: one line, exit 2
    r = run_cli(tmp_path, *args, f"--config.save_path={gone}", config="configs/gsm_cot.py", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: {gone}/gsm-cot/run.json: not written"), r.stderr[-2000:]


@pytest.mark.slow
def test_killed_then_a_damaged_step_in_the_bucket_resumes_exactly(bucket_cot_run, world, gcs_bucket, tmp_path):
    """SIGKILL mid-epoch; the newest step is then damaged in the bucket. The same command moves
    it aside (one line), resumes from the step before and ends as the uninterrupted run did."""
    ref_prefix, _, _ = bucket_cot_run
    prefix = f"{gcs_bucket}/{tmp_path.name}"
    args = (*bucket_args(world, prefix), *COT)
    ckpt = f"{prefix}/runs/gsm-cot/checkpoints"
    proc = run_cli(tmp_path, *args, config="configs/gsm_cot.py", popen=True)
    _wait_for(proc, lambda: files.exists(ckpt) and 4 in checkpoint.steps(ckpt), "checkpoint 4", timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = checkpoint.steps(ckpt)[-1]
    data = f"{ckpt}/{newest}/state/ocdbt.process_0/d"
    name = max(files.listdir(data), key=lambda n: len(files.read_bytes(f"{data}/{n}")))
    blob = bytearray(files.read_bytes(f"{data}/{name}"))
    blob[len(blob) // 2:] = bytes(len(blob) - len(blob) // 2)
    files.write_atomic(f"{data}/{name}", bytes(blob))
    r = run_cli(tmp_path, *args, config="configs/gsm_cot.py")
    assert f"checkpoint {ckpt}/{newest} is damaged" in r.stdout
    assert files.isdir(f"{ckpt}/{newest}{checkpoint.DAMAGED}")
    ref = f"{ref_prefix}/runs/gsm-cot"
    assert without_speed(read_metrics(f"{prefix}/runs/gsm-cot/metrics.jsonl")) == without_speed(
        read_metrics(f"{ref}/metrics.jsonl"))
    jax.tree.map(np.testing.assert_array_equal, stored_params(ref), stored_params(f"{prefix}/runs/gsm-cot"))


@pytest.mark.slow
def test_hand_off_export_and_generate_through_the_bucket(bucket_cot_run, tmp_path):
    """Coconut from the bucket's CoT checkpoints into the bucket; its export written to the
    bucket; questions asked of the export and of the run there; a memory plan of the bucket's model."""
    prefix, args, _ = bucket_cot_run
    cot = f"{prefix}/runs/gsm-cot"
    r = run_cli(tmp_path, *args[:5], *SIZES, "--config.num_epochs=4", f"--config.load_model_path={cot}/checkpoints",
                config="configs/gsm.py")
    assert f"weights from {cot}/checkpoints/" in r.stdout
    run = f"{prefix}/runs/gsm-coconut"
    assert [e["stage"] for e in read_metrics(f"{run}/metrics.jsonl") if "eval/acc" in e] == [1]

    def cli(*argv):
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(), capture_output=True,
                              text=True, check=True).stdout
    out = f"{prefix}/export"
    assert f"wrote {out}" in cli("-m", "coconut_jax.export", run, "--out", out)
    assert files.isfile(f"{out}/config.json") and files.isfile(f"{out}/coconut_jax.json")
    question = json.loads(files.read_text(f"{prefix}/data/gsm_valid.json"))[0]["question"]
    from_export = cli("-m", "coconut_jax.generate", out, "--question", question, "--max-new-tokens", "8")
    from_run = cli("-m", "coconut_jax.generate", run, "--question", question, "--max-new-tokens", "8")
    assert from_export.strip() and from_export.splitlines()[-1] == from_run.splitlines()[-1]
    plan = json.loads(cli("-m", "coconut_jax.plan", "--config", "configs/gsm.py", f"--config.model_id={prefix}/model",
                          "--length", "64", "--json"))
    assert plan["stages"] and plan["stages"][0]["total_gb"] > 0


@pytest.mark.slow
def test_two_hosts_write_one_run_in_the_bucket(bucket_cot_run, world, gcs_bucket, tmp_path):
    """Two processes (a pod's hosts, one device each) with nothing shared but the bucket log the
    one-process run's losses and answers and leave its checkpoints there."""
    ref_prefix, _, _ = bucket_cot_run
    prefix = f"{gcs_bucket}/{tmp_path.name}"
    finish_processes(start_processes(tmp_path, *bucket_args(world, prefix), *COT, config="configs/gsm_cot.py"))
    one, two = (read_metrics(f"{p}/runs/gsm-cot/metrics.jsonl") for p in (ref_prefix, prefix))
    assert [sorted(e) for e in one] == [sorted(e) for e in two]
    for a, b in zip(one, two):
        for k, v in a.items():
            if k.startswith(("train/", "eval/")) and k != "train/tokens_per_s":
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k)
    ckpt = f"{prefix}/runs/gsm-cot/checkpoints"
    assert checkpoint.steps(ckpt) == checkpoint.steps(f"{ref_prefix}/runs/gsm-cot/checkpoints")
