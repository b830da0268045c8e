"""The training CLI: configs, accumulation, exact resume, sharding, only_eval."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coconut_jax import config as config_lib, data, train
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
from coconut_jax.metrics import read_metrics as metrics
from tests.conftest import run_cli


def final_params(run_dir):
    from coconut_jax.checkpoint import Checkpoints
    ck = Checkpoints(os.path.join(run_dir, "checkpoints"))
    step = ck.latest()
    import orbax.checkpoint as ocp
    state = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return jax.tree.map(np.asarray, state["params"])


def assert_first_epochs_match(ref_dir, got_dir, keys, epochs=2, tol=1e-5):
    """The run in `got_dir` logged what the reference run logged in its first `epochs`."""
    ref = [e for e in metrics(os.path.join(ref_dir, "metrics.jsonl")) if e["epoch"] <= epochs]
    got = metrics(os.path.join(got_dir, "metrics.jsonl"))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for k in keys:
            if k in a:
                assert abs(a[k] - b[k]) <= tol, (k, a, b)


def test_training_learns_and_logs(tiny_run):
    m = metrics(os.path.join(tiny_run, "metrics.jsonl"))
    train_losses = [e["train/loss"] for e in m if "train/loss" in e]
    evals = [e for e in m if "eval/loss" in e]
    assert len(evals) == 3 and [e["stage"] for e in evals] == [0, 1, 2]
    assert train_losses[-1] < train_losses[0]
    for e in m:
        assert {"step", "epoch", "stage"} <= set(e)
    preds = [json.loads(line) for line in open(os.path.join(tiny_run, "predictions_epoch3.jsonl"))]
    assert len(preds) == 8 and set(preds[0]) == {"index", "text", "answer", "gold", "correct", "cot_match", "new_tokens", "thoughts"}


def test_resume_after_sigkill_is_exact(tiny_run, tmp_path):
    ckpts = tmp_path / "tiny" / "checkpoints"
    proc = run_cli(tmp_path, "--config.checkpoint_every_steps=1", popen=True)
    deadline = time.time() + 240
    # Kill once a mid-epoch checkpoint of the second epoch exists (step 6 of 12).
    while not (ckpts / "6").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli(tmp_path, "--config.checkpoint_every_steps=1")
    a, b = metrics(os.path.join(tiny_run, "metrics.jsonl")), metrics(tmp_path / "tiny" / "metrics.jsonl")
    strip = lambda m: [{k: v for k, v in e.items() if k != "train/tokens_per_s"} for e in m]
    assert strip(a) == strip(b)
    jax.tree.map(np.testing.assert_array_equal, final_params(tiny_run), final_params(tmp_path / "tiny"))


def test_only_eval_reproduces_the_final_evaluation(tiny_run, tmp_path):
    run_cli(tmp_path, "--config.only_eval=True", "--config.resume=2",
            f"--config.load_model_path={tiny_run}/checkpoints",
            "--config.prepare.kind=", f"--config.val_path={tiny_run}/prepared/prosqa_valid.json",
            f"--config.model_id={tiny_run}/prepared/model")
    final = [e for e in metrics(os.path.join(tiny_run, "metrics.jsonl")) if "eval/acc" in e][-1]
    again = metrics(tmp_path / "tiny" / "metrics.jsonl")[-1]
    for k in ("eval/acc", "eval/cot_em", "eval/loss", "stage"):
        assert again[k] == pytest.approx(final[k], abs=1e-6), k
    texts = lambda p: [json.loads(line)["text"] for line in open(p)]
    assert texts(tmp_path / "tiny" / "predictions_epoch3.jsonl") == texts(os.path.join(tiny_run, "predictions_epoch3.jsonl"))


def test_sharded_on_8_devices_equals_single_device(tiny_run, tmp_path):
    run_cli(tmp_path, "--config.num_epochs=2", "--config.mesh.data=4", "--config.mesh.fsdp=2",
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert_first_epochs_match(tiny_run, tmp_path / "tiny", ("train/loss", "eval/loss"))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_single_process(tiny_run, tmp_path):
    """Two local processes on the CPU distributed runtime (one device each, each feeding
    its half of every batch) train exactly like one process."""
    port = _free_port()
    procs = [run_cli(tmp_path, "--config.num_epochs=2", f"--config.coordinator_address=127.0.0.1:{port}",
                     "--config.num_processes=2", f"--config.process_id={i}", popen=True, capture=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert_first_epochs_match(tiny_run, tmp_path / "tiny", ("train/loss", "eval/loss", "eval/acc"))


def test_gradient_accumulation_equals_full_batch():
    cfg = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = GPT2Model(cfg)
    params = model.init(0)
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(8):
        ids = rng.integers(1, 37, size=4 + i).tolist() + [37] + [39] * (i % 3) + [38] + rng.integers(1, 37, size=3 + i % 4).tolist()
        lab = [data.IGNORE] * (ids.index(38) + 1) + ids[ids.index(38) + 1:]
        seqs.append((ids, lab))
    batch = lambda rows: data.collate([seqs[i] for i in rows], rows, latent_id=39, pad_id=0, batch_size=len(rows), multiple=4)
    tx = train.make_optimizer(config_lib.base_config())
    update = jax.jit(lambda p, o, a: train.apply_update(tx, p, o, a))

    def step(groups):
        acc = {"grads": jax.tree.map(jnp.zeros_like, params), "loss": jnp.float32(0), "count": jnp.float32(0)}
        for rows in groups:
            b = batch(rows)
            acc = train.accumulate(model, params, acc, b.arrays(), None, prefix_len=b.prefix_len,
                                   n_latent=b.n_latent, feedback=True)
        return update(params, tx.init(params), acc)

    p1, _, l1 = step([list(range(8))])
    p2, _, l2 = step([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert abs(float(l1) - float(l2)) <= 1e-6
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6


REFERENCE_PROSQA_YAML = """\
project: coconut
save_path: YOUR_PATH_TO_SAVE_THE_MODEL
name: prosqa-coconut
local: True
only_eval: False
coconut: True
special_token: False
cot: False
no_thoughts: False
no_cot: False
c_thought: 1
epochs_per_stage: 5
max_latent_stage: 6
pad_latent_to_max: True
save_only_improve: False
uniform_prob: 0.0
model_id: openai-community/gpt2
load_model_path: None
seed: 0
resume: 0
bf16: False
train_path: data/prosqa_train.json
val_path: data/prosqa_valid.json
reset_optimizer: True
batch_size_training: 32
debug: False
gradient_accumulation_steps: 1
num_epochs: 50
lr: !!float "1e-4"
weight_decay: 0.01
"""


def test_reference_yaml_parses_into_our_config(tmp_path):
    from configs import prosqa
    path = tmp_path / "prosqa_coconut.yaml"
    path.write_text(REFERENCE_PROSQA_YAML)
    got, ours = config_lib.from_reference_yaml(str(path)), prosqa.get_config()
    for k in ("method", "c_thought", "epochs_per_stage", "max_latent_stage", "pad_latent_to_max", "uniform_prob",
              "num_epochs", "lr", "weight_decay", "global_batch_size", "reset_optimizer", "train_path", "val_path",
              "gradient_accumulation_steps", "bf16", "seed", "resume", "model_id", "name"):
        assert got[k] == ours[k], k


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(REFERENCE_PROSQA_YAML.replace("cot: False", "cot: True"))
    with pytest.raises(config_lib.ConfigError, match="exactly one of coconut/cot"):
        config_lib.from_reference_yaml(str(bad))
    bad.write_text(REFERENCE_PROSQA_YAML + "mystery: 3\n")
    with pytest.raises(config_lib.ConfigError, match="unknown setting 'mystery'"):
        config_lib.from_reference_yaml(str(bad))


@pytest.mark.parametrize("override,message", [
    (dict(method="latent"), "method='latent' is not one of"),
    (dict(train_path="/nope/train.json"), "train_path='/nope/train.json': file not found"),
    (dict(global_batch_size=10, gradient_accumulation_steps=4), "not divisible by gradient_accumulation_steps"),
    (dict(only_eval=True), "only_eval needs load_model_path"),
    (dict(wandb_mode="maybe"), "wandb_mode='maybe'"),
])
def test_bad_configs(tmp_path, override, message):
    c = config_lib.base_config()
    good = tmp_path / "d.json"
    good.write_text("[]")
    c.train_path = c.val_path = str(good)
    c.update(override)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path):
    r = run_cli(tmp_path, "--config.method=latent", check=False)
    assert r.returncode == 2
    assert "error: config: method='latent' is not one of" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path, "--config.no_such_field=1", check=False)
    assert r.returncode != 0 and "no_such_field" in r.stderr


def test_wandb_offline_needs_no_account_or_network(tmp_path):
    """wandb_mode=offline logs to a local run directory (no login, no network)."""
    pytest.importorskip("wandb")
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    run_cli(tmp_path, "--config.num_epochs=1", "--config.wandb_mode=offline", env=env)
    runs = list((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    assert metrics(tmp_path / "tiny" / "metrics.jsonl")[-1]["epoch"] == 1
