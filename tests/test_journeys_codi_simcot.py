"""SIM-CoT's decoder on CODI as users run it: configs/gsm_codi_simcot.py through the CLI (tiny
data, model and LoRA), killed and restarted, on 8 devices, exported and asked (the decoder never
leaves), and `analysis --decode-steps` reading what each thought writes out."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint
from coconut_jax.metrics import read_metrics
from tests.conftest import ROOT, built_once, run_cli, subprocess_env
from tests.test_journeys import assert_same_run, data_paths, evals, kill_at_checkpoint, world  # noqa: F401
from tests.test_journeys_codi import CODI, SMALL

pytestmark = pytest.mark.slow

RUN = CODI  # CODI's journey runs: the same sizes and epochs, the decoder added by the config


@pytest.fixture(scope="session")
def simcot_run(world, tmp_path_factory):
    def build(root):
        r = run_cli(root, *data_paths(world, "gsm"), *RUN, config="configs/gsm_codi_simcot.py")
        (root / "train.stdout").write_text(r.stdout)
    return built_once(tmp_path_factory, "codi_simcot_run", build)


def test_codi_simcot_trains_its_four_terms_and_the_decoder_learns(simcot_run):
    run = simcot_run / "gsm-codi-simcot"
    steps = [e for e in read_metrics(run / "metrics.jsonl") if "train/loss" in e]
    assert len(steps) == 15
    for e in steps:
        parts = e["train/student"] + e["train/teacher"] + e["train/distill"] + e["train/steps"]
        assert abs(e["train/loss"] - parts) < 1e-4
    # The decoder learns to write each step out from its thought (a random-token start: ~6 nats).
    assert steps[-1]["train/steps"] < steps[0]["train/steps"] - 0.3
    assert all("eval/steps" in e for e in evals(run))
    ckpt = str(run / "checkpoints")
    parts = checkpoint.load_params(ckpt, checkpoint.steps(ckpt)[-1], item="parts")
    assert set(parts) == {"projection", "decoder"}


def test_codi_simcot_killed_resumes_exactly(simcot_run, world, tmp_path):
    args = (*data_paths(world, "gsm"), *RUN, "--config.checkpoint_every_steps=1")
    proc = run_cli(tmp_path, *args, config="configs/gsm_codi_simcot.py", popen=True)
    kill_at_checkpoint(proc, tmp_path / "gsm-codi-simcot", 7, "the run's step 7")
    run_cli(tmp_path, *args, config="configs/gsm_codi_simcot.py")
    assert_same_run(simcot_run / "gsm-codi-simcot", tmp_path / "gsm-codi-simcot")
    ckpts = [str(r / "gsm-codi-simcot" / "checkpoints") for r in (simcot_run, tmp_path)]
    last = checkpoint.steps(ckpts[0])[-1]
    a, b = (checkpoint.load_params(c, last, item="parts") for c in ckpts)
    np.testing.assert_array_equal(a["decoder"]["wte"], b["decoder"]["wte"])


def test_the_decoder_never_leaves_and_its_thoughts_can_be_read(simcot_run, world, tmp_path):
    run = simcot_run / "gsm-codi-simcot"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                              text=True, check=True)
    cli("coconut_jax.export", str(run), "--out", str(tmp_path / "export"))
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert "part_projection.safetensors" in files and not any("decoder" in f for f in files)
    lines = [json.loads(x) for x in cli("coconut_jax.generate", str(tmp_path / "export"), "--input",
                                        world["gsm_valid"]).stdout.splitlines()]
    assert len(lines) == 6 and {x["thoughts"] for x in lines} == {3}
    out = cli("coconut_jax.analysis", "--config", "configs/gsm_codi_simcot.py", *data_paths(world, "gsm"), *RUN,
              f"--config.save_path={simcot_run}", "--decode-steps").stdout
    rows = [x for x in out.splitlines() if x.startswith("thought ")]
    # Each record's chain holds one step (its two, the last dropped): thought 1 has a target.
    assert rows and "replaced: '<<" in rows[0]


def test_codi_simcot_on_8_devices_matches_one_device(world, tmp_path):
    args = (*data_paths(world, "gsm"), *SMALL, "--config.num_epochs=1", "--config.global_batch_size=16",
            "--config.eval_batch_size=8")
    run_cli(tmp_path / "one", *args, config="configs/gsm_codi_simcot.py")
    run_cli(tmp_path / "eight", *args, config="configs/gsm_codi_simcot.py", devices=8)
    one, eight = (read_metrics(tmp_path / d / "gsm-codi-simcot" / "metrics.jsonl") for d in ("one", "eight"))
    for a, b in zip(one, eight):
        for k in ("train/student", "train/teacher", "train/steps", "eval/steps"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), k


def test_lora_on_the_decoder_trains_its_adapters_alone_and_resumes_exactly(world, tmp_path):
    """`step_decoder.lora_rank`: the decoder's base stays the pretrained model bit for bit, its
    adapters train (and the term falls), and a run killed mid-epoch resumes exactly."""
    from coconut_jax import hf
    args = (*data_paths(world, "gsm"), *RUN, "--config.step_decoder.lora_rank=4", "--config.checkpoint_every_steps=1")
    run_cli(tmp_path / "whole", *args, config="configs/gsm_codi_simcot.py")
    run = tmp_path / "whole" / "gsm-codi-simcot"
    steps = [e for e in read_metrics(run / "metrics.jsonl") if "train/loss" in e]
    assert steps[-1]["train/steps"] < steps[0]["train/steps"] - 0.1
    ckpt = str(run / "checkpoints")
    decoder = checkpoint.load_params(ckpt, checkpoint.steps(ckpt)[-1], item="parts")["decoder"]
    pretrained = hf.load_pretrained(world["model"])[1]
    for path, base in [(("wte",), pretrained["wte"]), (("h", "0", "c_fc", "kernel"), pretrained["h"]["0"]["c_fc"]["kernel"])]:
        stored = decoder
        for k in path:
            stored = stored[k]
        np.testing.assert_array_equal(np.asarray(stored), np.asarray(base)[:np.asarray(stored).shape[0]])
    assert np.abs(np.asarray(decoder["h"]["0"]["c_fc"]["lora_b"])).max() > 0  # B starts at 0: it trained

    proc = run_cli(tmp_path / "killed", *args, config="configs/gsm_codi_simcot.py", popen=True)
    kill_at_checkpoint(proc, tmp_path / "killed" / "gsm-codi-simcot", 7, "the run's step 7")
    run_cli(tmp_path / "killed", *args, config="configs/gsm_codi_simcot.py")
    assert_same_run(run, tmp_path / "killed" / "gsm-codi-simcot")
    again = str(tmp_path / "killed" / "gsm-codi-simcot" / "checkpoints")
    jax.tree.map(np.testing.assert_array_equal, decoder,
                 checkpoint.load_params(again, checkpoint.steps(again)[-1], item="parts")["decoder"])
